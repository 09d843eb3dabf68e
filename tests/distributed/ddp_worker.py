"""Run under `torchrun --nproc_per_node=2` (gloo, CPU). Writes OUT/ddp_results.json from rank 0.

Every rank sees different data (md.fit shards a Dataset with a DistributedSampler; the probes get
disjoint shards). For each regulator: train, then the maximum absolute difference of the
parameters between ranks, and the coefficients themselves: every step's public coefficient
state (OGM k, OPM drop mask, InfoReg alpha / window, ...) and every epoch's logged regulator
values (epoch means of q, rho, alpha, delta, scores, traces, valuation counts, ...) gathered from
both ranks and compared (DDP averages gradients anyway, so equal weights cannot show that the
forward-side statistics were all-reduced). Then the distributed probe results, for the test to
compare with one process on the union of the shards.
"""

import gc
import json
import sys

import torch
import torch.distributed as dist

import modaldiag as md

REGULATORS = {
    "joint": lambda: None,
    "InfoReg": lambda: md.InfoReg(),
    "InfoReg*": lambda: md.InfoReg(unimodal_loss=True),
    "InfoReg (released)": lambda: md.InfoReg(variant="released"),
    "Relearning": lambda: md.Relearning(every=1, max_resets=2),
    "OGM-GE": lambda: md.OGM(noise=True),
    "OPM": lambda: md.OPM(),
    "MMPareto": lambda: md.MMPareto(),
    "Valuation (sample)": lambda: md.ValuationResampling("sample", warmup=1),
    "Valuation (modality)": lambda: md.ValuationResampling("modality", warmup=1),
    "AGM": lambda: md.AGM(alpha=2.0),
    "AGM (released)": lambda: md.AGM(variant="released"),
    "PMR": lambda: md.PMR(per_weight=0.1),
    "MMCosine": lambda: md.MMCosine(lam=0.1),
    "MBSD": lambda: md.MBSD(),
    "CML": lambda: md.CML(),
    "LFM (learnable)": lambda: md.LFM(schedule="learnable", lr_alpha=1e3, h_over="all"),
    "GBlending": lambda: md.GBlending(super_epoch=1),
    "AMCo": lambda: md.AMCo(),
    "MLA": lambda: md.MLA(),
    "MLA (released)": lambda: md.MLA(variant="released"),
    "ReconBoost": lambda: md.ReconBoost(1, 1),
    "UMT": lambda: md.UMT(teacher_epochs=1),
    # a given teacher must be the same on every rank: built from a fixed seed
    "UMT (projection)": lambda: md.UMT(teachers={"a": (torch.manual_seed(7), torch.nn.Linear(8, 5))[1]},
                                       projection=True, teacher_epochs=1),
    "UME": lambda: md.UME(),
    "UME (separate)": lambda: md.UME(heads="separate"),
    # its drop masks differ per rank by design (seeded with the rank); weights and logs do not
    "ModalityDropout": lambda: md.ModalityDropout(p=0.3),
    "Greedy": lambda: md.Greedy(epsilon=0.0, steps=2, warmup=1),
    "Greedy (random)": lambda: md.Greedy(mode="random", warmup=0),
}

#: the head each regulator trains (MLA's gradient projection needs the shared linear head)
FUSION = {"MLA": "shared", "MLA (released)": "shared"}


def data():
    return md.datasets.synthetic(n_samples=400, num_classes=3, strength={"a": 2.0, "b": 0.6},
                                 dims={"a": 8, "b": 8}, seed=0)


def shard(dataset, rank, world):
    return dataset.subset(list(range(rank, len(dataset), world)))


class Snapshot(md.training.Callback):
    """After every optimizer step: the regulator's public per-step coefficients and a digest of
    this rank's batch (to prove the ranks saw different data)."""

    def __init__(self, reg):
        self.reg, self.steps = reg, []

    def on_train_batch_end(self, ctx) -> None:
        reg, snap = self.reg, {}
        if isinstance(reg, md.OGM):
            snap["k"] = dict(reg.coefficients)
        if isinstance(reg, md.OPM):
            snap["mask"] = None if reg.last_mask is None else reg.last_mask.int().tolist()
        if isinstance(reg, md.InfoReg):
            snap["alpha"] = dict(reg._alpha)
            snap["window"] = dict(reg.window)
        if isinstance(reg, (md.AGM, md.PMR)):
            snap["coefficients"] = dict(reg.coefficients)
        if isinstance(reg, md.CML):
            snap["order"] = reg.last_order
        if isinstance(reg, md.AMCo):
            snap["dependent"] = {m: bool(v) for m, v in reg.dependent.items()}
            snap["masks"] = {m: t.int().tolist() for m, t in reg.last_masks.items()}
        if isinstance(reg, md.LFM):
            snap["alpha_c"] = float(reg.alpha_c)
        if isinstance(reg, md.GBlending):
            snap["weights"] = list(reg.weights or [])
        if isinstance(reg, md.MLA):
            snap["projector"] = None if reg.projector is None else float(reg.projector.sum())
            snap["updates"] = reg.updates
        if isinstance(reg, md.Greedy):
            snap["greedy"] = {"bdr": dict(reg.last_bdr), "pending": reg.pending,
                              "remaining": reg.remaining, "a_byp": dict(reg.speed.a_byp)}
        if isinstance(reg, md.UMT):
            snap["teachers"] = [float(p.double().sum()) for t in reg.teachers.values()
                                for p in t.parameters()]
        owned = getattr(reg, "owned_parameters", None)
        if owned is not None:  # regulator-owned parameters (heads, AMCo's map, cosine weights)
            snap["owned"] = [float(p.detach().double().sum()) for p in owned()]
        self.steps.append({"coef": snap, "data": float(ctx.labels.double().sum()
                                                       + ctx.inputs["a"].double().sum())})


def _leaves(obj, path=""):
    """Flatten nested dicts/lists into (path, value) pairs."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def coefficient_mismatch(mine) -> list[str]:
    """Gather ``mine`` from every rank; the paths whose values differ from rank 0's."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    ref = dict(_leaves(gathered[0]))
    bad = []
    for other in gathered[1:]:
        got = dict(_leaves(other))
        if set(got) != set(ref):
            bad.append(f"structure differs: {sorted(set(got) ^ set(ref))[:5]}")
            continue
        for k, v in ref.items():
            w = got[k]
            if isinstance(v, float) and isinstance(w, float):
                if abs(v - w) > 1e-6 * max(1.0, abs(v)):
                    bad.append(f"{k}: {v} vs {w}")
            elif v != w:
                bad.append(f"{k}: {v!r} vs {w!r}")
    return bad


def max_param_diff(model) -> float:
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    d = data()
    results = {"world": world, "regulators": {}}
    for name, make in REGULATORS.items():
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        model = (md.models.mid_fusion_model(d, widths=(8, 8)) if name.startswith("Greedy") else
                 md.models.default_model(d, feature_dim=8, fusion=FUSION.get(name, "concat")))
        reg = make()
        snap = Snapshot(reg)
        hist = md.fit(model, d.train, val_loader=shard(d.val, rank, world).loader(64), epochs=3,
                      regulator=reg, batch_size=32, seed=0, progress=False, restore_best=False,
                      callbacks=[snap])
        logged = [rec.get("regulator", {}) for rec in hist]
        steps = [s["coef"] for s in snap.steps]
        data_digest = [s["data"] for s in snap.steps]
        gathered = [None] * world
        dist.all_gather_object(gathered, data_digest)
        results["regulators"][name] = {
            "max_param_diff": max_param_diff(model),
            "train_n": hist[-1]["train"]["n"],
            "n_steps": len(steps),
            "data_differs": all(a != b for a, b in zip(gathered[0], gathered[1], strict=True)),
            "coefficient_mismatch": coefficient_mismatch({"steps": steps, "logged": logged}),
            "logged_keys": sorted({k for rec in logged for k in rec}),
            "steps": steps if rank == 0 else None,
            "logged": logged,
        }
    # probes on disjoint shards
    torch.manual_seed(0)
    model = md.models.default_model(d, feature_dim=8)
    md.fit(model, d.train, epochs=3, batch_size=32, seed=0, progress=False)
    torch.save(model.state_dict(), f"{out}/probe_model.pt") if rank == 0 else None
    test, val = shard(d.test, rank, world), shard(d.val, rank, world)
    sv = md.shapley(model, test.loader(17))
    fisher = md.fisher_trace(model, test.loader(17))
    sep = md.separability(model, shard(d.train, rank, world).loader(50), val.loader(50))
    uni = md.unimodal_scores(model, test.loader(17))
    rep = md.diagnose(model, test.loader(17), val.loader(17), fisher="per_sample")
    rob = md.robustness(model, test.loader(17), n_resamples=50)
    results["probes"] = {
        "shapley_values": sv.values.tolist(), "shapley_labels": sv.labels.tolist(),
        "fisher": fisher,
        "separability": {m: [s.train_purity, s.val_purity, s.linear_probe] for m, s in sep.items()},
        "unimodal": {m: [s.accuracy, s.true_prob, s.cross_entropy] for m, s in uni.items()},
        "diagnose": [rep.dominant, rep.weakest, rep.fused_accuracy],
        "robustness": rob.to_dict(),
        "robustness_mismatch": coefficient_mismatch(rob.to_dict()),
    }
    if rank == 0:
        with open(f"{out}/ddp_results.json", "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    gc.collect()  # release gloo's last buffers before the group goes (see examples/torchrun_ddp.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
