"""Greedy (R18): the BDR closed form and decision, the conditional learning speed against a brute
force, the mid-fusion protocol of MidFusionClassifier (partition, re-balancing cuts the other
modalities out of the re-balanced branch, running means), the refusal of late-fusion models,
md.fit (forced and random re-balancing, the step pattern), exact resume, the contract (absence,
coalitions, diagnose)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.models.midfusion import MidFusionClassifier, mid_fusion_model
from modaldiag.regulators.greedy import Greedy, rebalance_decision
from modaldiag.training.callbacks import Callback
from modaldiag.training.speed import ConditionalSpeedMonitor, bdr, conditional_speeds, speed_gap

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tiny():
    return md.datasets.synthetic(n_samples=200, num_classes=3, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 6, "b": 5}, seed=0)


def mlp_model(dims=(6, 5), widths=(4, 3), num_classes=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    names = [chr(ord("a") + i) for i in range(len(dims))]
    return MidFusionClassifier.for_shapes({n: (d,) for n, d in zip(names, dims, strict=True)},
                                          num_classes, widths, **kwargs)


def batch(dims=(6, 5), n=7, seed=1, num_classes=3):
    g = torch.Generator().manual_seed(seed)
    names = [chr(ord("a") + i) for i in range(len(dims))]
    x = {m: torch.randn(n, d, generator=g) for m, d in zip(names, dims, strict=True)}
    return x, torch.randint(num_classes, (n,), generator=g)


# ====================================================================== closed forms
def test_r18_bdr_and_decision_closed_form():
    values = bdr((2.0, 1.0), (0.2, 1.0))
    assert values == pytest.approx([1.0, 0.0], abs=ATOL)
    assert speed_gap(values) == pytest.approx(1.0, abs=ATOL)
    assert rebalance_decision(values, 0.01, 5) == (0, 5)
    named = bdr({"a": 2.0, "v": 1.0}, {"a": 0.2, "v": 1.0})
    assert rebalance_decision(named, 0.01, 5) == ("a", 5)
    # M = 2: caring modality 0 iff d_speed > 0
    assert rebalance_decision([0.0, 1.0], 0.01, 5) == (1, 5)
    assert speed_gap([0.0, 1.0]) == pytest.approx(-1.0)
    # within epsilon, NaN (nothing accumulated): no decision
    assert rebalance_decision([0.3, 0.305], 0.01, 5) == (None, 0)
    assert rebalance_decision(bdr((1.0, 0.0), (1.0, 1.0)), 0.01, 5) == (None, 0)
    # M > 2: spread = max - min, argmax re-balanced
    assert speed_gap([0.2, 0.9, -0.1]) == pytest.approx(1.0)
    assert rebalance_decision([0.2, 0.9, -0.1], 0.5, 3) == (1, 3)
    assert rebalance_decision([0.2, 0.9, -0.1], 1.0, 3) == (None, 0)


def _brute_mu(model, prefixes):
    g2 = w2 = 0.0
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            w2 += float(p.detach().double().pow(2).sum())
            if p.grad is not None:
                g2 += float(p.grad.double().pow(2).sum())
    return g2 / w2


def test_mu_equals_a_brute_force_after_one_backward():
    model = mlp_model()
    x, y = batch()
    loss = sum(F.cross_entropy(z, y) for z in model.branch_logits(model.encode(x)).values())
    loss.backward()
    byp, main = conditional_speeds(model)
    for m in ("a", "b"):
        blocks = [f"fusion_blocks.{i}.squeeze." for i in range(2)]
        blocks += [f"fusion_blocks.{i}.excite.{m}." for i in range(2)]
        assert byp[m] == pytest.approx(_brute_mu(model, blocks), rel=RTOL)
        assert main[m] == pytest.approx(_brute_mu(model, [f"encoders.{m}.", f"classifiers.{m}."]),
                                        rel=RTOL)
        assert byp[m] > 0 and main[m] > 0
    mon = ConditionalSpeedMonitor()
    mon.accumulate(model)
    out = mon.accumulate(model)  # same gradients twice: A doubles, BDR unchanged
    for m in ("a", "b"):
        assert mon.a_byp[m] == pytest.approx(2 * byp[m], rel=RTOL)
        assert out[m] == pytest.approx(math.log10(byp[m] / main[m]), rel=RTOL)
    assert mon.logs()["d_speed"] == pytest.approx(out["a"] - out["b"], rel=RTOL)


@pytest.mark.parametrize("dims", [(6, 5), (6, 5, 4)])
def test_main_and_bypass_partition_every_trainable_parameter(dims):
    model = mlp_model(dims)
    mods = model.modalities
    main = {m: {id(p) for p in model.main_params(m)} for m in mods}
    byp = {m: {id(p) for p in model.bypass_params(m)} for m in mods}
    every_bypass = set().union(*byp.values())
    for p in model.parameters():
        owners = [m for m in mods if id(p) in main[m]]
        assert len(owners) + (id(p) in every_bypass) == 1  # main of exactly one branch, or bypass
    shared = {id(p) for b in model.fusion_blocks for p in b.squeeze.parameters()}
    for m in mods:
        assert shared <= byp[m]  # shared fusion parameters count for every branch
        own = {id(p) for b in model.fusion_blocks for p in b.excite[m].parameters()}
        assert byp[m] == shared | own
        assert all(not (own & byp[k]) for k in mods if k != m)
    assert {id(p) for p in model.main_params(mods[0])} == (
        {id(p) for p in model.encoders[mods[0]].parameters()}
        | {id(p) for p in model.classifiers[mods[0]].parameters()})


@pytest.mark.parametrize("by", ["gate", "squeeze"])
def test_rebalance_cuts_the_other_modalities_out_of_the_branch(by):
    model = mlp_model((6, 5, 4), rebalance_by=by)
    model.train()
    x, y = batch((6, 5, 4))
    x = {m: v.requires_grad_(True) for m, v in x.items()}
    z = model.branch_logits(model.encode(x))["a"]
    plain = torch.autograd.grad(z.sum(), [x["b"], x["c"]])
    assert all(float(g.abs().max()) > 0 for g in plain)  # ordinary step: b and c reach branch a
    with model.rebalance("a"):
        assert model.rebalancing == "a"
        z = model.branch_logits(model.encode(x))["a"]
        cut = torch.autograd.grad(z.sum(), [x["b"], x["c"], x["a"]], allow_unused=True)
    assert model.rebalancing is None
    # gate form: an exactly zero gradient (the gate is kept in the graph times 0); squeeze form:
    # the other inputs are not in branch a's graph at all
    assert all(g is None or float(g.abs().max()) == 0.0 for g in cut[:2])
    assert float(cut[2].abs().max()) > 0  # a still learns from its own input
    # and its output does not change when the others' inputs do (eval: buffers fixed)
    model.eval()
    other = dict(x, b=x["b"] + 3.0, c=-x["c"])
    with model.rebalance("a"), torch.no_grad():
        f1, f2 = model.encode(x)["a"], model.encode(other)["a"]
    torch.testing.assert_close(f1, f2, rtol=RTOL, atol=ATOL)


def test_gate_rebalance_leaves_a_zero_gradient_on_the_replaced_excitation():
    model = mlp_model()
    x, y = batch()
    with model.rebalance("a"):
        loss = sum(F.cross_entropy(z, y) for z in model.branch_logits(model.encode(x)).values())
    loss.backward()
    for block in model.fusion_blocks:
        for p in block.excite["a"].parameters():
            assert p.grad is not None and float(p.grad.abs().max()) == 0.0  # used, exactly 0
        assert float(block.excite["b"].weight.grad.abs().max()) > 0


def test_running_means_are_cumulative_and_change_only_in_training():
    model = mlp_model()
    x1, _ = batch(seed=1)
    x2, _ = batch(seed=2, n=5)
    gates, squeezes = [], []

    def spy(block, inputs, output):
        squeezes.append({m: s.detach().clone() for m, s in inputs[0].items()})
        gates.append({m: g.detach().clone() for m, g in output.items()})

    handle = model.fusion_blocks[0].register_forward_hook(spy)
    model.train()
    with torch.no_grad():
        model.encode(x1)
        model.encode(x2)
    handle.remove()
    for m in ("a", "b"):
        expect = (gates[0][m].mean(0) + gates[1][m].mean(0)) / 2  # (batch mean + 1 * mean) / 2
        torch.testing.assert_close(model.encoders[m].gate_mean(0), expect, rtol=RTOL, atol=ATOL)
        expect_s = (squeezes[0][m].mean(0) + squeezes[1][m].mean(0)) / 2
        torch.testing.assert_close(model.encoders[m].squeeze_mean(0), expect_s, rtol=RTOL,
                                   atol=ATOL)
        assert int(model.encoders[m].updates) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the branch alone runs at its running-mean gates: equal to the model under rebalance(m)
    with torch.no_grad(), model.rebalance("b"):
        torch.testing.assert_close(model.encoders["b"](x1["b"]), model.encode(x1)["b"],
                                   rtol=RTOL, atol=ATOL)


# ====================================================================== refusal
@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_greedy_and_the_monitor_refuse_late_fusion_models(tiny, fusion):
    model = md.models.default_model(tiny, fusion=fusion, feature_dim=4)
    for cb in (Greedy(), ConditionalSpeedMonitor()):
        with pytest.raises(ValueError, match="mid fusion") as err:
            md.fit(model, tiny.train, epochs=1, regulator=cb if isinstance(cb, Greedy) else None,
                   callbacks=[] if isinstance(cb, Greedy) else [cb], progress=False)
        msg = str(err.value)
        assert "bypass_params" in msg and "MidFusionClassifier" in msg
        assert "conditional_utilization" in msg and "no cross-modal connections" in msg


# ====================================================================== training
class Trace(Callback):
    """Per optimizer step: the modality re-balanced during the step, and Greedy's BDR after it."""

    def __init__(self, greedy):
        self.greedy, self.steps = greedy, []

    def on_after_forward(self, ctx):
        self._flag = ctx.model.rebalancing

    def on_train_batch_end(self, ctx):
        self.steps.append((ctx.epoch, self._flag, dict(self.greedy.last_bdr)))


def test_fit_forced_rebalancing_follows_the_argmax_for_q_steps(tiny):
    model = mid_fusion_model(tiny, widths=(4, 4))
    reg = Greedy(epsilon=0.0, steps=3, warmup=1)
    trace, monitor = Trace(reg), ConditionalSpeedMonitor()
    hist = md.fit(model, tiny.train, epochs=3, regulator=reg, batch_size=20, progress=False,
                  seed=0, callbacks=[trace, monitor])
    flags = [f for _, f, _ in trace.steps]
    per_epoch = len(flags) // 3
    assert per_epoch == 7 and all(f is None for f in flags[:per_epoch])  # warm-up
    # epsilon = 0: every regular step after the warm-up starts 3 re-balancing steps on the argmax
    i = per_epoch
    while i < len(flags):
        assert flags[i] is None if i == per_epoch else True
        if flags[i] is None:
            values = trace.steps[i][2]
            target = max(values, key=values.get)
            window = flags[i + 1:i + 4]
            assert window == [target] * len(window)
            i += 4
        else:
            i += 1
    regular = sum(f is None for f in flags)
    assert regular == per_epoch + 4  # 14 steps after warm-up: R BBB R BBB R BBB R B
    assert reg.speed.steps == regular  # only regular steps are accumulated
    # the stand-alone monitor skips the same steps (model.rebalancing is set during them)
    assert monitor.steps == regular and monitor.a_byp == pytest.approx(reg.speed.a_byp, rel=RTOL)
    assert hist.series("speed.bdr.a") == pytest.approx([r["regulator"]["bdr"]["a"] for r in hist],
                                                       rel=RTOL)
    assert hist.series("speed.steps") == [7, 9, 11]
    rec = hist[-1]["regulator"]
    assert set(rec["bdr"]) == {"a", "b"}
    assert rec["d_speed"] == pytest.approx(rec["bdr"]["a"] - rec["bdr"]["b"], rel=RTOL)
    counts = [sum(r["regulator"]["rebalance_steps"].values()) for r in hist]
    assert counts == [0, 5, 5] and hist[0]["regulator"]["active"] == 0.0
    assert sum(hist[-1]["regulator"]["rebalanced"].values()) == pytest.approx(5 / 7)
    assert all(math.isfinite(v) for v in hist[-1]["regulator"]["branch_ce"].values())


def test_loss_is_the_sum_of_branch_cross_entropies(tiny):
    model = mid_fusion_model(tiny, widths=(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = md.Regulation(model, opt, Greedy())
    run.epoch_start(0, tiny.train.loader(16))
    x, y = next(iter(tiny.train.loader(16)))
    loss = run.backward(x, y)
    ctx = run.ctx
    expect = sum(F.cross_entropy(z, ctx.labels) for z in model.branch_logits(ctx.features).values())
    assert float(loss) == pytest.approx(float(expect.detach()), rel=RTOL)
    torch.testing.assert_close(ctx.logits, torch.stack(list(
        model.branch_logits(ctx.features).values())).mean(0), rtol=RTOL, atol=ATOL)


def test_random_mode_is_seeded_and_draws_every_choice(tiny):
    def run(seed):
        model = mid_fusion_model(tiny, widths=(4, 4))
        reg = Greedy(mode="random", warmup=0, seed=seed)
        trace = Trace(reg)
        md.fit(model, tiny.train, epochs=4, regulator=reg, batch_size=10, progress=False, seed=0,
               callbacks=[trace])
        return [f for _, f, _ in trace.steps]
    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other
    assert first[0] is None and {None, "a", "b"} == set(first)
    # roughly uniform over {none, a, b}: 56 draws
    assert all(8 <= first.count(c) <= 30 for c in (None, "a", "b"))


def test_resumed_run_ends_with_identical_weights_and_state(tiny, tmp_path):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = mid_fusion_model(tiny, widths=(4, 4))
        reg = Greedy(epsilon=0.0, steps=4, warmup=1)
        md.fit(model, tiny.train.loader(32, shuffle=True), epochs=epochs, regulator=reg,
               checkpoint_dir=ckpt, resume=resume, restore_best=False, progress=False, seed=3)
        return model, reg

    full, reg_full = run(3, tmp_path / "full", False)
    run(2, tmp_path / "split", False)
    resumed, reg_res = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    sa, sb = reg_full.state_dict(), reg_res.state_dict()
    assert sa["speed"] == sb["speed"] and sa["pending"] == sb["pending"]
    assert sa["remaining"] == sb["remaining"] and torch.equal(sa["generator"], sb["generator"])
    fresh = Greedy()
    fresh.load_state_dict(sa)
    assert fresh.speed.a_byp == reg_full.speed.a_byp and fresh.remaining == reg_full.remaining


# ====================================================================== contract
def test_contract_absence_coalitions_and_diagnose(tiny):
    model = mid_fusion_model(tiny, widths=(4, 4))
    md.fit(model, tiny.train, epochs=1, regulator=Greedy(), progress=False, seed=0)
    model.eval()
    x, _ = next(iter(tiny.test.loader(16)))
    with torch.no_grad():
        feats = model.encode(x)
        model.check_absence(feats)
        masks = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
        fast = model.head_coalitions(feats, masks)
        for k, mask in enumerate(masks.tolist()):
            present = [m for m, keep in zip(model.modalities, mask, strict=True) if keep]
            torch.testing.assert_close(fast[k], model.head(feats, present=present), rtol=RTOL,
                                       atol=ATOL)
        # absent branch at the zero baseline: its classifier's bias
        expect = (model.classifiers["a"](feats["a"]) + model.classifiers["b"].bias) / 2
        torch.testing.assert_close(model.head(feats, present=["a"]), expect, rtol=RTOL, atol=ATOL)
    rep = md.diagnose(model, tiny.test.loader(64), fisher=None, n_resamples=50)
    assert rep.dominant in {"a", "b", None} and 0.0 <= rep.fused_accuracy <= 1.0
    assert rep.fused_accuracy == pytest.approx(md.probes.evaluate(model, tiny.test.loader(64)).accuracy)


def test_conv_and_frame_stages_build_and_run():
    model = MidFusionClassifier.for_shapes({"s": (3, 16), "i": (2, 8, 8), "v": (3, 2, 8, 8)}, 4,
                                           widths=(4, 6))
    x = {"s": torch.randn(2, 3, 16), "i": torch.randn(2, 2, 8, 8), "v": torch.randn(2, 3, 2, 8, 8)}
    assert model(x).shape == (2, 4)
    assert model.feature_dims == {"s": 6, "i": 6, "v": 6}


@pytest.mark.parametrize("kwargs,name", [({"steps": 0}, "steps"), ({"epsilon": -1.0}, "epsilon"),
                                         ({"mode": "greedy"}, "mode"), ({"warmup": -1}, "warmup"),
                                         ({"variant": "released"}, "variant"), ({"seed": -2}, "seed")])
def test_bad_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Greedy(**kwargs)


def test_variant_bb_defaults():
    assert (Greedy().epsilon, Greedy().steps, Greedy().warmup) == (0.01, 5, 2)
    bb = Greedy(variant="bb")
    assert (bb.epsilon, bb.steps, bb.warmup) == (0.001, 5, 0)


def test_bad_model_construction_is_refused():
    with pytest.raises(ValueError, match="same number"):
        MidFusionClassifier({"a": [nn.Linear(2, 3)], "b": [nn.Linear(2, 3), nn.Linear(3, 3)]},
                            {"a": [3], "b": [3, 3]}, 2)
    with pytest.raises(ValueError, match="fusion_after"):
        MidFusionClassifier({"a": [nn.Linear(2, 3)], "b": [nn.Linear(2, 3)]},
                            {"a": [3], "b": [3]}, 2, fusion_after=[1])
    model = MidFusionClassifier({"a": [nn.Linear(2, 3)], "b": [nn.Linear(2, 3)]},
                                {"a": [4], "b": [3]}, 2)
    with pytest.raises(ValueError, match="channels"):
        model({"a": torch.randn(2, 2), "b": torch.randn(2, 2)})
    with pytest.raises(ValueError, match="modalities"):
        with model.rebalance("c"):
            pass


def test_lightning_smoke(tiny):
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    torch.manual_seed(0)
    lit = ModalDiagModule(mid_fusion_model(tiny, widths=(4, 4)), lr=0.05)
    reg = Greedy(epsilon=0.0, steps=2, warmup=1)
    cb = ModalDiagCallback(reg, monitor=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(lit, tiny.train.loader(20, shuffle=True))
    logs = [rec["regulator"] for rec in cb.logs]
    # 7 steps per epoch; epoch 1 after the warm-up: R BB R BB R -> 4 re-balancing steps
    assert [sum(r["rebalance_steps"].values()) for r in logs] == [0, 4]
    assert reg.speed.steps == 7 + 3


def test_gate_scale_is_the_mmtm_papers_two_sigma_by_default_and_the_released_sigma_on_request():
    from modaldiag.models.midfusion import MMTMBlock
    torch.manual_seed(0)
    sq = {"a": torch.randn(5, 3), "b": torch.randn(5, 4)}
    paper, released = MMTMBlock({"a": 3, "b": 4}), MMTMBlock({"a": 3, "b": 4}, gate_scale=1.0)
    released.load_state_dict(paper.state_dict())
    g2, g1 = paper(sq), released(sq)
    for m in ("a", "b"):
        torch.testing.assert_close(g2[m], 2 * g1[m])
        assert float(g1[m].max()) < 1.0 < float(g2[m].max())
    model = MidFusionClassifier.for_shapes({"a": (6,), "b": (6,)}, 3, widths=(4,), gate_scale=1.0)
    assert float(model.encoders["a"].gate_mean(0)[0]) == 0.5  # the running mean starts at k/2
    with pytest.raises(ValueError, match="gate_scale"):
        MidFusionClassifier.for_shapes({"a": (6,), "b": (6,)}, 3, gate_scale=0.0)
