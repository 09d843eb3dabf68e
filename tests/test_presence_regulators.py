"""Missing modalities in the regulators that read batches or re-encode inputs themselves (issue 16,
part 2): PMR's prototypes and scores, G-Blending's branches, LFM's alignment, UMT's teachers.
Principle: an absent entry is the baseline, never data; a statistic that characterises modality m
is taken over the samples where m is present. Each check is against a brute force."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model
from torch import nn

import modaldiag as md
from modaldiag.regulators.gblending import GBlending
from modaldiag.regulators.lfm import LFM, lfm_alignment
from modaldiag.regulators.pmr import PMR, prototype_log_probs
from modaldiag.regulators.umt import UMT, train_unimodal_models
from modaldiag.training.callbacks import StepContext

RTOL, ATOL = 1e-5, 1e-6
CPU = torch.device("cpu")


def _mask(n, absent):
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(absent)] = False
    return keep


def _masked_batches(model, sizes, absent, seed=1, classes=3, placeholder=0.0):
    """``[(x, y, present)]``: batch j has the rows ``absent[m][j]`` of modality m absent (their
    input set to ``placeholder``)."""
    out = []
    for j, n in enumerate(sizes):
        x = make_inputs(model, batch=n, seed=seed + j)
        y = (torch.arange(n) + j) % classes
        present = {m: _mask(n, rows[j]) for m, rows in absent.items()}
        for m, keep in present.items():
            x[m][~keep] = placeholder
        out.append((x, y, present))
    return out


# ---------------------------------------------------------------- PMR
def test_pmr_prototypes_are_means_over_present_rows():
    model = make_model().eval()
    # class 2 (rows 2, 5 of batch 0; rows 1, 4 of batch 1) has m0 absent everywhere
    loader = _masked_batches(model, [6, 6], {"m0": [[1, 2, 5], [0, 1, 4]], "m1": [[0], []]},
                             placeholder=50.0)
    reg = PMR(fraction=1.0)
    reg.update_prototypes(model, loader, use_momentum=False)
    with torch.no_grad():
        feats = [model.encode(x) for x, _, _ in loader]
    for m in model.modalities:
        f = torch.cat([fb[m] for fb in feats])
        y = torch.cat([b[1] for b in loader])
        keep = torch.cat([b[2][m] for b in loader])
        for k in range(3):
            rows = keep & (y == k)
            if not bool(rows.any()):
                assert m == "m0" and k == 2
                assert float(reg.prototypes[m][k].abs().sum()) == 0.0
                continue
            torch.testing.assert_close(reg.prototypes[m][k], f[rows].mean(0), rtol=RTOL, atol=ATOL)
    # class 2 has no m0 prototype: not "seen" (its samples drive no PMR term yet)
    assert reg.seen.tolist() == [True, True, False]
    logs = reg.collect_logs()
    assert logs["prototype_samples"] == {"0": 4, "1": 4, "2": 4}  # every sample read
    assert logs["prototype_absent"] == {"m0": 6, "m1": 1}
    # the placeholders would have moved the prototypes: the test can fail
    plain = PMR(fraction=1.0)
    plain.update_prototypes(model, [(x, y) for x, y, _ in loader], use_momentum=False)
    assert not torch.allclose(plain.prototypes["m0"][1], reg.prototypes["m0"][1])

    # a later epoch where class 0 has no present m1 sample: m1's class-0 prototype is kept,
    # m0's is mixed with momentum; class 2 becomes seen once m0 is read for it
    again = _masked_batches(model, [6], {"m1": [[0, 3]]}, seed=7)
    old = {m: c.clone() for m, c in reg.prototypes.items()}
    reg.momentum = 0.25
    reg.update_prototypes(model, again, use_momentum=True)
    x, y, present = again[0]
    with torch.no_grad():
        f = model.encode(x)
    torch.testing.assert_close(reg.prototypes["m1"][0], old["m1"][0], rtol=0, atol=0)
    want = 0.75 * f["m0"][y == 0].mean(0) + 0.25 * old["m0"][0]
    torch.testing.assert_close(reg.prototypes["m0"][0], want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(reg.prototypes["m0"][2], f["m0"][y == 2].mean(0), rtol=RTOL,
                               atol=ATOL)  # unseen before: the new mean, no momentum
    assert reg.seen.tolist() == [True, True, True]


def test_pmr_step_scores_and_loss_over_present_rows():
    model = make_model().eval()
    x = make_inputs(model, batch=8, seed=3)
    y = torch.arange(8) % 3
    keep = _mask(8, [0, 4, 5])
    present = {"m0": keep}
    with torch.no_grad():
        feats = model.mask_features(model.encode(x), present)
    reg = PMR(alpha=0.7)
    g = torch.Generator().manual_seed(0)
    reg.prototypes = {m: torch.randn(3, f.shape[1], generator=g) for m, f in feats.items()}
    reg.seen = torch.tensor([True, True, True])
    ctx = StepContext(model=model, epoch=0, features=feats, labels=y, losses={}, present=present)
    reg.on_after_forward(ctx)
    logs = reg.collect_logs()
    lq = {m: prototype_log_probs(feats[m], reg.prototypes[m]).gather(1, y[:, None]).squeeze(1)
          for m in feats}
    # m0: mean over its 5 present rows; m1: over all 8
    assert logs["pce"]["m0"] == pytest.approx(float(-lq["m0"][keep].mean()), rel=RTOL)
    assert logs["pce"]["m1"] == pytest.approx(float(-lq["m1"].mean()), rel=RTOL)
    s0 = float(lq["m0"][keep].exp().mean()) * 8  # the mean on the all-present sum's scale
    s1 = float(lq["m1"].exp().sum())
    assert logs["score"]["m0"] == pytest.approx(s0, rel=RTOL)
    assert logs["score"]["m1"] == pytest.approx(s1, rel=RTOL)
    assert logs["rho"]["m0"] == pytest.approx(s0 / s1, rel=RTOL)
    slow = "m0" if s0 < s1 else "m1"
    want = -lq[slow][keep].mean() if slow == "m0" else -lq[slow].mean()
    torch.testing.assert_close(ctx.losses[f"pmr/{slow}"], 0.7 * want, rtol=RTOL, atol=ATOL)
    # a batch with no m0 sample: m0 neutral (rho 1, no term), no NaN anywhere
    ctx = StepContext(model=model, epoch=0, features=feats, labels=y, losses={},
                      present={"m0": torch.zeros(8, dtype=torch.bool)})
    reg.on_after_forward(ctx)
    logs = reg.collect_logs()
    assert logs["rho"]["m0"] == 1.0 and logs["beta"]["m0"] == 0.0 and "pmr/m0" not in ctx.losses


# ---------------------------------------------------------------- G-Blending
@pytest.mark.parametrize("heads", ["separate", "shared"])
def test_gblending_measured_losses_exclude_absent_samples(heads):
    model = make_model().eval()
    model.set_baseline({"m0": torch.full((4,), 0.3), "m1": torch.full((5,), -0.2)})
    loader = _masked_batches(model, [5, 7], {"m0": [[1, 3], [0, 2, 6]], "m1": [[4], []]})
    reg = GBlending(heads=heads)
    reg._create_heads(model, model.feature_dims)
    got = reg._mean_losses(model, reg.heads, loader, [0, 1, 2], CPU)
    with torch.no_grad():
        ce = {0: [], 1: [], 2: []}
        for x, y, present in loader:
            feats = model.mask_features(model.encode(x), present)
            ce[2].append(F.cross_entropy(model.head(feats), y, reduction="none"))
            for k, m in enumerate(model.modalities):
                if heads == "separate":
                    logits = reg.heads[m](feats[m])
                else:
                    logits = model.head(feats, present=(m,))
                ce[k].append(F.cross_entropy(logits, y, reduction="none")[present[m]])
    want = [float(torch.cat(ce[k]).mean()) for k in (0, 1, 2)]
    assert got == pytest.approx(want, rel=RTOL, abs=ATOL)
    assert sum(len(c) for c in ce[0]) == 7 and sum(len(c) for c in ce[2]) == 12
    # the placeholders' rows would change m0's mean: the test can fail
    plain = reg._mean_losses(model, reg.heads, [(x, y) for x, y, _ in loader], [0], CPU)
    assert plain[0] != pytest.approx(want[0], rel=1e-3)
    # modality absent from every sample: no loss to measure (NaN, hence w~ = 0)
    none = [(x, y, {"m0": torch.zeros(len(y), dtype=torch.bool)}) for x, y, _ in loader]
    assert torch.isnan(torch.tensor(reg._mean_losses(model, reg.heads, none, [0], CPU)[0]))


@pytest.mark.parametrize("heads, variant", [("separate", "paper"), ("shared", "paper"),
                                            ("shared", "released")])
def test_gblending_trial_steps_equal_steps_on_the_present_subset(heads, variant):
    """A trial epoch of modality m0's branch on masked batches is, step for step, the trial on
    each batch's present subset (batches without any m0 row skipped), bit-identical."""
    model = make_model().train()
    loader = _masked_batches(model, [6, 6, 6], {"m0": [[1, 2], [0, 1, 2, 3, 4, 5], [5]]},
                             placeholder=9.0)
    subset = [({m: v[p["m0"]] for m, v in x.items()}, y[p["m0"]]) for x, y, p in loader
              if bool(p["m0"].any())]
    reg = GBlending(heads=heads, variant=variant, super_epoch=2)
    if heads == "separate":
        reg._create_heads(model, model.feature_dims)

    def trial(batches):
        net = copy.deepcopy(model)
        lin = copy.deepcopy(reg.heads)
        params = list(net.parameters()) + ([p for h in lin.values() for p in h.parameters()]
                                           if lin else [])
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        total = reg._trial_epoch(net, lin, opt, params, batches, 0, CPU, variant == "released")
        return total, net, lin

    t_mask, net_mask, lin_mask = trial(loader)
    t_sub, net_sub, lin_sub = trial(subset)
    assert t_mask == t_sub
    for (name, a), b in zip(net_mask.state_dict().items(), net_sub.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    if lin_mask:
        assert torch.equal(lin_mask["m0"].weight, lin_sub["m0"].weight)
    t_plain, net_plain, _ = trial([(x, y) for x, y, _ in loader])
    assert t_plain != t_mask


@pytest.mark.parametrize("heads", ["separate", "shared"])
def test_gblending_step_branch_loss_over_present_rows(heads):
    model = make_model()
    x = make_inputs(model, batch=7, seed=2)
    y = torch.arange(7) % 3
    keep = _mask(7, [2, 3])
    feats = model.mask_features(model.encode(x), {"m1": keep})
    reg = GBlending(heads=heads)
    reg._create_heads(model, model.feature_dims)
    reg.weights = [0.2, 0.3, 0.5]
    ctx = StepContext(model=model, epoch=0, features=feats, labels=y, present={"m1": keep},
                      losses={"multimodal": F.cross_entropy(model.head(feats), y)})
    ctx.unimodal_logits = model.unimodal_logits(feats)  # the loop computes them (shared heads)
    reg.on_after_forward(ctx)
    z1 = reg.heads["m1"](feats["m1"]) if heads == "separate" else model.head(feats, present=("m1",))
    z0 = reg.heads["m0"](feats["m0"]) if heads == "separate" else model.head(feats, present=("m0",))
    torch.testing.assert_close(ctx.losses["gblending/m1"], 0.3 * F.cross_entropy(z1[keep], y[keep]),
                               rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ctx.losses["gblending/m0"], 0.2 * F.cross_entropy(z0, y),
                               rtol=RTOL, atol=ATOL)
    ctx.losses = {"multimodal": ctx.losses["multimodal"]}
    ctx.present = {"m1": torch.zeros(7, dtype=torch.bool)}
    reg.on_after_forward(ctx)
    assert float(ctx.losses["gblending/m1"].detach()) == 0.0
    assert ctx.losses["gblending/m1"].requires_grad


# ---------------------------------------------------------------- LFM
def test_lfm_alignment_over_samples_that_have_both_modalities():
    model = make_model(m=3)
    x = make_inputs(model, batch=8, seed=4)
    y = torch.arange(8) % 3
    present = {"m0": _mask(8, [0, 1]), "m2": _mask(8, [1, 5])}
    feats = model.mask_features(model.encode(x), present)
    reg = LFM()
    ctx = StepContext(model=model, epoch=0, features=feats, labels=y, present=present,
                      losses={"multimodal": F.cross_entropy(model.head(feats), y)})
    reg.on_after_forward(ctx)
    z = model.unimodal_logits(feats)
    both = {("m0", "m1"): present["m0"], ("m0", "m2"): present["m0"] & present["m2"],
            ("m1", "m2"): present["m2"]}
    want = sum(lfm_alignment(z[a][rows], z[b][rows]) for (a, b), rows in both.items()) / 3
    torch.testing.assert_close(ctx.losses["lfm/alignment"], 2 * reg.alpha_a * want,
                               rtol=RTOL, atol=ATOL)
    everyone = sum(lfm_alignment(z[a], z[b]) for a, b in both) / 3
    assert float(everyone) != pytest.approx(float(want), rel=1e-3)
    # the learnable schedule's held-out batch keeps its mask (first half of the first batch)
    learn = LFM(schedule="learnable", val_loader=[(x, y, present)])
    _, _, held = learn._held_out_batch(StepContext(model=model))
    assert set(held) == {"m0", "m2"} and held["m2"].tolist() == [True, False, True, True]
    assert lfm_alignment(z["m0"], z["m1"], mask=torch.zeros(8, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------- UMT
def _bn_model():
    torch.manual_seed(0)
    enc = {"a": nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)),
           "b": nn.Sequential(nn.Linear(6, 5))}
    return md.MultimodalClassifier(enc, {"a": 4, "b": 5}, 3).train()


def test_umt_teacher_trains_on_the_present_subset_exactly():
    """Teacher 'a' on masked batches == teacher 'a' on each batch's present rows (batches with
    no row, or one row under BatchNorm, dropped): same weights, same BatchNorm statistics, bit
    for bit, although the placeholders are far from the data."""
    model = _bn_model()
    g = torch.Generator().manual_seed(5)
    loader = []
    for j, absent in enumerate([[1, 4], [0, 1, 2, 3, 4, 5], [2], [0, 1, 2, 3, 5], []]):
        x = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(6, 6, generator=g)}
        keep = _mask(6, absent)
        x["a"][~keep] = 40.0
        loader.append((x, (torch.arange(6) + j) % 3, {"a": keep}))
    subset = [({"a": x["a"][p["a"]], "b": x["b"][p["a"]]}, y[p["a"]]) for x, y, p in loader
              if int(p["a"].sum()) >= 2]
    assert len(subset) == 3
    got = train_unimodal_models(model, loader, epochs=2, lr=0.1, modalities=["a"])["a"]
    want = train_unimodal_models(model, subset, epochs=2, lr=0.1, modalities=["a"])["a"]
    for (name, v), w in zip(got["encoder"].state_dict().items(),
                            want["encoder"].state_dict().values(), strict=True):
        assert torch.equal(v, w), name
    assert torch.equal(got["head"].weight, want["head"].weight)
    # accuracy on the masked loader: present rows only (brute force)
    with torch.no_grad():
        hits = n = 0
        for x, y, p in loader:
            pred = got["head"](got["encoder"](x["a"][p["a"]])).argmax(1)
            hits += int((pred == y[p["a"]]).sum())
            n += int(p["a"].sum())
    assert got["accuracy"] == pytest.approx(hits / n) and n == 16
    plain = train_unimodal_models(model, [(x, y) for x, y, _ in loader], epochs=2, lr=0.1,
                                  modalities=["a"])["a"]
    assert not torch.equal(plain["encoder"][1].running_mean, got["encoder"][1].running_mean)


# ---------------------------------------------------------------- through md.fit
def _regulator(name):
    return {"pmr": lambda: PMR(fraction=0.5),
            "gblending": lambda: GBlending(super_epoch=1),
            "lfm": lambda: LFM(schedule="learnable", lr_alpha=0.5),
            "umt": lambda: UMT(teacher_epochs=1)}[name]()


def _plain_batches(ds, bs):
    return [({m: t[i:i + bs] for m, t in ds.inputs.items()}, ds.labels[i:i + bs])
            for i in range(0, len(ds), bs)]


@pytest.mark.parametrize("name", ["pmr", "gblending", "lfm", "umt"])
def test_all_true_masks_are_bit_identical_and_missing_data_trains(name):
    data = md.datasets.synthetic(n_samples=90, num_classes=3, dims={"a": 4, "b": 4},
                                 missing_rate={"a": 0.3}, seed=0)
    train, val = _plain_batches(data.train, 16), _plain_batches(data.val, 32)
    flag = [(x, y, {"a": torch.ones(len(y), dtype=torch.bool)}) for x, y in train]
    fval = [(x, y, {"b": torch.ones(len(y), dtype=torch.bool)}) for x, y in val]
    runs = []
    for tr, va in ((train, val), (flag, fval)):
        torch.manual_seed(0)
        model = md.models.default_model(data, feature_dim=4)
        reg = _regulator(name)
        hist = md.fit(model, tr, val_loader=va, epochs=1, progress=False, seed=1, regulator=reg)
        runs.append((model.state_dict(), hist.to_dataframe().drop(columns="time_s"),
                     reg.state_dict()))
    for k, v in runs[0][0].items():
        assert torch.equal(v, runs[1][0][k]), k
    assert runs[0][1].equals(runs[1][1])
    # the synthetic data's own masks (30% of 'a' absent): trains, finite, absences logged
    masked = data.train.loader(16)
    assert len(next(iter(masked))) == 3
    model = md.models.default_model(data, feature_dim=4)
    hist = md.fit(model, masked, val_loader=data.val.loader(32), epochs=1, progress=False,
                  seed=1, regulator=_regulator(name))
    frame = hist.to_dataframe()
    assert frame["train.loss"].notna().all() and frame["val.loss"].notna().all()
    if name == "pmr":
        assert frame["regulator.prototype_absent.a"].iloc[0] > 0
