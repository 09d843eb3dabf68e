"""Regulators against closed forms on hand-made inputs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import modaldiag as md
from modaldiag.regulators import (
    extra_copies,
    ogm_coefficients,
    opm_drop_probability,
    pareto_combine,
)
from modaldiag.training.callbacks import StepContext
from modaldiag.training.loop import CallOrderError


def _ctx(model, x, y, epoch=0, step=0):
    ctx = StepContext(model=model, epoch=epoch, step=step, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    ctx.compute_unimodal_logits()
    return ctx


# ---------------------------------------------------------------- OGM
def test_ogm_coefficients_closed_form_on_hand_made_batch():
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    ctx = _ctx(model, x, y)
    s = {m: float(F.softmax(ctx.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).sum())
         for m in model.modalities}
    reg = md.OGM(alpha=0.5)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {m: [p.grad.clone() for p in model.encoders[m].parameters()] for m in model.modalities}
    reg.on_before_optimizer_step(ctx)
    rho = {"m0": s["m0"] / s["m1"], "m1": s["m1"] / s["m0"]}
    for m in model.modalities:
        k = 1 - math.tanh(0.5 * rho[m]) if rho[m] > 1 else 1.0
        assert reg.coefficients[m] == pytest.approx(k)
        for g0, p in zip(before[m], model.encoders[m].parameters(), strict=True):
            torch.testing.assert_close(p.grad, g0 * k)
    head_grads = [p.grad for p in model.head_parameters()]
    assert all(g is not None for g in head_grads)


def test_ogm_three_modalities_and_jump_at_one():
    k, rho = ogm_coefficients({"a": 6.0, "b": 2.0, "c": 4.0}, alpha=0.3)
    assert rho["a"] == pytest.approx(6 / 3) and rho["b"] == pytest.approx(2 / 5)
    assert k["a"] == pytest.approx(1 - math.tanh(0.6)) and k["b"] == 1.0
    k_eq, _ = ogm_coefficients({"a": 1.0, "b": 1.0}, alpha=0.8)
    assert k_eq == {"a": 1.0, "b": 1.0}
    k_up, _ = ogm_coefficients({"a": 1.0001, "b": 1.0}, alpha=0.8)
    assert k_up["a"] == pytest.approx(1 - math.tanh(0.8), abs=1e-3)  # the documented jump


def test_ogm_ge_noise_scale_and_window():
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=64), torch.arange(64) % 3
    ctx = _ctx(model, x, y, epoch=0, step=3)
    reg = md.OGM(alpha=0.0, noise=True)  # k = 1: only the noise acts
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    p = model.encoders["m0"].net[0].weight
    g0 = p.grad.clone()
    reg.on_before_optimizer_step(ctx)
    noise = p.grad - g0
    assert noise.std().item() == pytest.approx(g0.std().item(), rel=0.35)
    outside = md.OGM(alpha=0.5, noise=True, start_epoch=5)
    ctx2 = _ctx(model, x, y, epoch=1)
    outside.on_after_forward(ctx2)
    model.zero_grad()
    F.cross_entropy(ctx2.logits, y).backward()
    g1 = p.grad.clone()
    outside.on_before_optimizer_step(ctx2)
    torch.testing.assert_close(p.grad, g1)  # outside [start, end): untouched


def test_ogm_conv_only_touches_only_conv_weights():
    torch.manual_seed(0)
    encs = {"a": md.models.Conv1dEncoder(2, 4, channels=(3,)), "b": md.models.MLPEncoder(5, 4)}
    model = md.MultimodalClassifier(encs, {"a": 4, "b": 4}, 3)
    x = {"a": torch.randn(6, 2, 8) * 5, "b": torch.randn(6, 5) * 0.01}
    y = torch.arange(6) % 3
    ctx = _ctx(model, x, y)
    reg = md.OGM(alpha=1.0, conv_only=True)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    fc_before = model.encoders["a"].fc.weight.grad.clone()
    reg.on_before_optimizer_step(ctx)
    torch.testing.assert_close(model.encoders["a"].fc.weight.grad, fc_before)


# ---------------------------------------------------------------- InfoReg
def test_inforeg_penalty_gradient_on_dominant_encoder_only():
    torch.manual_seed(0)
    model = make_model(3, "late")
    x, y = make_inputs(model, batch=10), torch.arange(10) % 3
    reg = md.InfoReg(beta=0.9, multi="leaders")
    ctx = _ctx(model, x, y)
    reg.on_train_epoch_start(ctx)  # anchors = current weights, window open (epoch 0)
    with torch.no_grad():  # move the weights away from the anchors
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ctx = _ctx(model, x, y)
    reg.on_after_forward(ctx)
    s = {m: float(F.softmax(ctx.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).mean())
         for m in model.modalities}
    delta = md.probes.inforeg_gap(s)
    F.cross_entropy(ctx.logits, y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    weakest = min(s, key=s.get)
    assert delta[weakest] == 0
    logged = reg.collect_logs()["alpha"]
    for m in model.modalities:
        alpha = math.exp(0.9 * math.tanh(delta[m])) if delta[m] > 0 else 0.0
        assert logged[m] == pytest.approx(alpha)
        for (n, p), anchor in zip(model.encoders[m].named_parameters(), reg.anchors[m], strict=True):
            expected = grads[f"encoders.{m}.{n}"] + alpha * (p.detach() - anchor)
            torch.testing.assert_close(p.grad, expected)
    for n, p in model.fusion.named_parameters():  # head untouched
        torch.testing.assert_close(p.grad, grads[f"fusion.{n}"])
    # equals the autograd gradient of the proximal penalty
    penalty_grads = torch.autograd.grad(reg.penalty(model), [p for m in model.modalities
                                                             for p in model.encoders[m].parameters()
                                                             if m in reg._alpha])
    dominant = [m for m in model.modalities if m in reg._alpha]
    flat = [p for m in dominant for p in model.encoders[m].parameters()]
    for g, p, (n_full) in zip(penalty_grads, flat, [n for m in dominant for n, _ in
                                                    model.encoders[m].named_parameters()], strict=True):
        m = next(m for m in dominant if any(q is p for q in model.encoders[m].parameters()))
        torch.testing.assert_close(p.grad - grads[f"encoders.{m}.{n_full}"], g)


def test_inforeg_no_penalty_outside_window():
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=10), torch.arange(10) % 3
    reg = md.InfoReg()
    reg.traces = {"m0": [1.0, 2.0, 2.0], "m1": [1.0, 2.0, 2.01]}  # rho = 0 / .005 < K: closed
    ctx = _ctx(model, x, y, epoch=3)
    reg.on_train_epoch_start(ctx)
    assert reg.window == {"m0": False, "m1": False}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ctx = _ctx(model, x, y, epoch=3)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    reg.on_before_optimizer_step(ctx)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)
    assert reg.collect_logs()["alpha"] == {"m0": 0.0, "m1": 0.0}


def test_inforeg_star_adds_unimodal_losses_and_records_history(synth):
    model = md.models.default_model(synth, feature_dim=8)
    hist = md.fit(model, synth.train.loader(64, shuffle=True), epochs=3,
                  regulator=md.InfoReg(unimodal_loss=True), progress=False)
    rec = hist[-1]["regulator"]
    assert set(rec) >= {"alpha", "delta", "score", "trace", "window_open", "window_rho"}
    assert len(hist.series("regulator.trace.a")) == 3


# ---------------------------------------------------------------- Re-learning
def test_relearning_is_exact_interpolation_to_init():
    torch.manual_seed(0)
    model = make_model(3, "gated")
    reg = md.Relearning(lam=3.0)
    reg.remember_init(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    gaps = {"m0": 0.1, "m1": 0.0, "m2": 0.3}
    alphas = reg.alphas(gaps)
    assert alphas["m0"] == pytest.approx(math.tanh(0.3)) and alphas["m1"] == 0.0
    reg.reinitialise(model, alphas)
    for n, p in model.named_parameters():
        if n.startswith("encoders."):
            a = alphas[n.split(".")[1]]
            torch.testing.assert_close(p.detach(), (1 - a) * current[n] + a * init[n])
        else:
            assert torch.equal(p.detach(), current[n])  # head untouched


def test_relearning_schedule_and_optimizer_reset(synth):
    model = md.models.default_model(synth, feature_dim=8)
    reg = md.Relearning(every=2, max_resets=2, reset_optimizer=True, reset_bn=True)
    hist = md.fit(model, synth.train.loader(64, shuffle=True), synth.val.loader(128), epochs=7,
                  regulator=reg, progress=False)
    assert reg.resets == 2 and [h["epoch"] for h in reg.history] == [1, 3]
    assert "alpha" in hist[1]["regulator"] and "regulator" not in hist[5]
    with pytest.raises(ValueError, match="needs held-out data"):
        md.fit(model, synth.train.loader(64), epochs=2, regulator=md.Relearning(every=1),
               progress=False)


# ---------------------------------------------------------------- OPM
def test_opm_drop_rate_matches_q_and_preserves_expectation():
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x = make_inputs(model, batch=4000)
    x["m0"] = x["m0"] * 4  # make m0 dominant-ish; whatever, q is computed from rho
    y = torch.arange(4000) % 3
    reg = md.OPM(q_base=0.5, lam=0.5, p_exe=1.0)
    feats = {m: f.detach() for m, f in model.encode(x).items()}
    dominant, q, rho = reg.drop_plan(model, feats, y)
    assert q == pytest.approx(opm_drop_probability(rho[dominant], 0.5, 0.5))
    assert q == pytest.approx(min(1, 0.5 * (1 + 0.5 * math.tanh(max(0, rho[dominant] - 1)))))
    ctx = StepContext(model=model, labels=y, epoch=0, step=7)
    out = reg.transform_features(feats, ctx)
    drop_rate = 1 - reg.last_mask.float().mean().item()
    assert drop_rate == pytest.approx(q, abs=0.03)
    kept = reg.last_mask
    torch.testing.assert_close(out[dominant][kept], feats[dominant][kept] / (1 - q))
    assert torch.all(out[dominant][~kept] == 0)
    other = next(m for m in model.modalities if m != dominant)
    assert torch.equal(out[other], feats[other])
    # p_exe: fraction of modulated batches
    reg_p = md.OPM(p_exe=0.3)
    executed = 0
    for step in range(400):
        reg_p.transform_features(feats, StepContext(model=model, labels=y, epoch=0, step=step))
        executed += reg_p.last_mask is not None
    assert executed / 400 == pytest.approx(0.3, abs=0.07)


# ---------------------------------------------------------------- MMPareto
def test_pareto_combine_closed_forms():
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])  # cos > 0
    final, w, cos = pareto_combine(g_mm, g_u, gamma=1.5)
    assert w == 0.5 and cos > 0
    torch.testing.assert_close(final, 1.5 * (g_mm + g_u))
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])  # conflicting
    final, w, cos = pareto_combine(g_mm, g_u, gamma=1.5)
    w_ref = float(((g_u @ g_u - g_mm @ g_u) / ((g_mm - g_u) @ (g_mm - g_u))).clamp(0, 1))
    assert cos < 0 and w == pytest.approx(w_ref)
    h = 2 * (w_ref * g_mm + (1 - w_ref) * g_u)
    scale = max(1.0, float((g_mm + g_u).norm() / h.norm()))
    torch.testing.assert_close(final, 1.5 * scale * h)
    # min-norm property: h/2 is the min-norm point of the segment
    ts = torch.linspace(0, 1, 1001)
    norms = torch.stack([(t * g_mm + (1 - t) * g_u).norm() for t in ts])
    assert (h / 2).norm() <= norms.min() + 1e-6


def test_mmpareto_step_matches_manual_per_encoder_combination():
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=12), torch.arange(12) % 3
    reg = md.MMPareto(gamma=1.5)
    ctx = _ctx(model, x, y)
    reg.on_after_forward(ctx)
    loss_mm = ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, y)
    ctx.loss = sum(ctx.losses.values())
    params = list(model.parameters())
    g_mm = torch.autograd.grad(loss_mm, params, retain_graph=True)
    g_u = torch.autograd.grad(sum(v for k, v in ctx.losses.items() if k.startswith("unimodal/")),
                              params, retain_graph=True, allow_unused=True)
    g_u = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_u, strict=True)]
    assert reg.backward(ctx)
    index = {id(p): i for i, p in enumerate(params)}
    for m in model.modalities:
        ps = list(model.encoders[m].parameters())
        a = torch.cat([g_mm[index[id(p)]].flatten() for p in ps])
        b = torch.cat([g_u[index[id(p)]].flatten() for p in ps])
        ref, _, _ = pareto_combine(a, b, 1.5)
        got = torch.cat([p.grad.flatten() for p in ps])
        torch.testing.assert_close(got, ref)
    for p in model.head_parameters():
        torch.testing.assert_close(p.grad, g_mm[index[id(p)]] + g_u[index[id(p)]])


# ---------------------------------------------------------------- valuation re-sampling
def test_resampling_counts_equal_two_times_one_minus_phi():
    phi = torch.tensor([[1.5, 0.5], [0.0, 2.0], [1.0, 1.0], [-0.5, 0.75]], dtype=torch.float64)
    counts = extra_copies(phi)
    assert counts.tolist() == [[0, 1], [2, 0], [0, 0], [3, 1]]  # round half up: 2 * .25 = .5 -> 1


def test_sample_level_plan_uses_valuation_and_never_copies_data(synth):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=8)
    md.fit(model, synth.train.loader(64, shuffle=True), epochs=2, progress=False)
    reg = md.ValuationResampling(level="sample", warmup=0)
    entries, masks, _ = reg.plan(model, synth.train, 64, epoch=0)
    sv = md.shapley(model, synth.train.loader(512))
    counts = extra_copies(sv.values)
    n = len(synth.train)
    assert len(entries) == n + int(counts.sum())
    for j, m in enumerate(model.modalities):
        only_m = masks[n:, j] & (masks[n:].sum(1) == 1)
        assert int(only_m.sum()) == int(counts[:, j].sum()) == reg.last_counts[m]
        per_sample = torch.bincount(entries[n:][only_m], minlength=n)
        assert torch.equal(per_sample, counts[:, j])
    assert entries.dtype == torch.long  # indices, not copies


def test_resampled_batches_apply_presence_masks(synth):
    model = md.models.default_model(synth, feature_dim=8)
    reg = md.ValuationResampling(level="modality", warmup=0, subset=0.5, alpha=3.0)
    seen = {"masked": 0}

    class Spy(md.Callback):
        def on_after_forward(self, ctx):
            zero_rows = (ctx.features["a"].abs().sum(1) == 0) | (ctx.features["b"].abs().sum(1) == 0)
            seen["masked"] += int(zero_rows.sum())

    hist = md.fit(model, synth.train.loader(64, shuffle=True), epochs=2, regulator=[reg, Spy()],
                  progress=False, monitor=False)
    extra = sum(hist[e]["regulator"]["extra_copies"][m] for e in range(2) for m in ("a", "b"))
    assert extra > 0 and seen["masked"] >= extra
    assert hist[0]["train"]["n"] > len(synth.train)


# ---------------------------------------------------------------- composition
def test_composition_rules(synth):
    model = md.models.default_model(synth, feature_dim=8)
    loader = synth.train.loader(64)
    with pytest.raises(ValueError, match="cannot be combined"):
        md.fit(model, loader, epochs=1, regulator=[md.OGM(), md.MMPareto()], progress=False)
    with pytest.raises(ValueError, match="two OGM regulators"):
        md.fit(model, loader, epochs=1, regulator=[md.OGM(), md.OGM()], progress=False)
    hist = md.fit(model, loader, epochs=2, progress=False,
                  regulator=[md.ValuationResampling(warmup=1), md.OGM(noise=True), md.OPM()])
    logs = hist[1]["regulator"]  # several regulators: namespaced, so OGM's and OPM's rho coexist
    assert "coefficient" in logs["OGM"] and "extra_copies" in logs["ValuationResampling"]
    assert set(logs["OGM"]["rho"]) == set(logs["OPM"]["rho"]) == {"a", "b"}


@pytest.mark.parametrize("make", [lambda: md.InfoReg(), lambda: md.Relearning(every=1),
                                  lambda: md.OGM(noise=True), lambda: md.OPM(),
                                  lambda: md.MMPareto(), lambda: md.ValuationResampling(warmup=1),
                                  lambda: md.ValuationResampling("modality", warmup=1)])
def test_every_regulator_trains_three_modalities(make):
    data = md.datasets.synthetic(n_samples=300, num_classes=3,
                                 strength={"a": 2.0, "b": 1.0, "c": 0.3}, dims=8, seed=1)

    def train(reg):
        torch.manual_seed(0)
        model = md.models.default_model(data, fusion="gated", feature_dim=8)
        hist = md.fit(model, data.train.loader(32, shuffle=True), data.val.loader(64), epochs=3,
                      regulator=reg, progress=False, seed=0)
        return model, hist

    reg = make()
    model, hist = train(reg)
    joint, _ = train(None)
    assert len(hist) == 3 and all(torch.isfinite(p).all() for p in model.parameters())
    # the regulator acted: same seed, data and budget, yet other weights than joint training
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), joint.parameters(),
                                                          strict=True))
    assert diff > 1e-4, type(reg).__name__
    # and it logged a coefficient for each of the three modalities
    logs = [rec["regulator"] for rec in hist if "regulator" in rec]
    assert logs
    per_modality = [v for rec in logs for v in rec.values() if isinstance(v, dict)]
    assert per_modality and all(set(v) == {"a", "b", "c"} for v in per_modality)


# ---------------------------------------------------------------- plain loop, resume
@pytest.mark.parametrize("make", [lambda: md.InfoReg(), lambda: md.OGM(alpha=0.5, noise=True),
                                  lambda: md.OPM(p_exe=1.0)], ids=["InfoReg", "OGM-GE", "OPM"])
def test_plain_loop_equals_fit(synth, make):
    """The README's loop (no batch_end call) trains exactly as md.fit, randomness included."""
    def model():
        torch.manual_seed(0)
        return md.models.default_model(synth, feature_dim=8)

    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    md.fit(ref, synth.train.loader(64), epochs=3, optimizer=opt, regulator=make(),
           seed=None, progress=False)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run = md.Regulation(net, opt, make(), monitor=True)
    for epoch in range(3):
        for inputs, labels in run.epoch_start(epoch, synth.train.loader(64)):
            opt.zero_grad()
            run.backward(inputs, labels)
            opt.step()
        run.epoch_end()
    assert run.ctx.step == 3 * len(synth.train.loader(64))  # one step per optimizer step
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: None, lambda: md.InfoReg(), lambda: md.Relearning(every=2),
                                  lambda: md.OGM(noise=True), lambda: md.OPM(),
                                  lambda: md.MMPareto(), lambda: md.ValuationResampling(warmup=1)])
def test_resumed_run_ends_with_identical_weights(synth, tmp_path, make):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(synth, feature_dim=8)
        md.fit(model, synth.train.loader(64, shuffle=True), synth.val.loader(256), epochs=epochs,
               regulator=make(), checkpoint_dir=ckpt, resume=resume, restore_best=False,
               progress=False, seed=3)
        return model

    full = run(4, tmp_path / "full", False)
    run(2, tmp_path / "split", False)
    resumed = run(4, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    hist = md.History.load(tmp_path / "split" / "history.json")
    assert [r["epoch"] for r in hist.epochs] == [0, 1, 2, 3]


# ---------------------------------------------------------------- end to end on real data
def _train_eval(data, make, seed, epochs=20):
    torch.manual_seed(seed)
    model = md.models.default_model(data)
    reg = make()
    md.fit(model, data.train.loader(64, shuffle=True), data.val.loader(400), epochs=epochs,
           regulator=reg, progress=False, seed=seed)
    uni = md.probes.evaluate(model, data.test.loader(400)).unimodal
    sep = md.separability(model, data.train.loader(1200), data.test.loader(400), silhouette=False)
    return uni, sep, reg


def test_inforeg_raises_weak_view_on_real_pair(fou_pix):
    """mfeat-fou-pix, same seed and budget: InfoReg vs joint, over 3 seeds (measured: unimodal
    fou +0.035/+0.053/+0.031, linear probe +0.002/+0.025/+0.005)."""
    d_uni, d_probe = [], []
    for seed in (0, 1, 2):
        joint_uni, joint_sep, _ = _train_eval(fou_pix, lambda: None, seed)
        reg_uni, reg_sep, _ = _train_eval(fou_pix, lambda: md.InfoReg(), seed)
        d_uni.append(reg_uni["fou"].accuracy - joint_uni["fou"].accuracy)
        d_probe.append(reg_sep["fou"].linear_probe - joint_sep["fou"].linear_probe)
    assert min(d_uni) > 0 and sum(d_uni) / 3 > 0.02
    assert min(d_probe) >= 0 and sum(d_probe) / 3 > 0.005


def test_relearning_end_to_end_on_real_pair(fou_pix):
    """Re-learning's soft re-initialisation on real data follows alpha = tanh(lam * gap).

    On mfeat the train/val purity gaps are small (no overfitting), so the re-initialisation is
    mild and does NOT raise the weak view (measured: fou unimodal -0.008/-0.005/-0.005, linear
    probe 0/+0.007/0 over seeds 0-2); see docs/methods/relearning.md.
    """
    _, _, reg = _train_eval(fou_pix, lambda: md.Relearning(lam=3.0, every=5, max_resets=3), 0)
    assert reg.resets == 3
    for event in reg.history:
        for m, gap in event["gap"].items():
            assert event["alpha"][m] == pytest.approx(math.tanh(3.0 * gap))
            assert 0 <= gap < 0.1


def test_resampling_from_a_user_subset_loader_stays_inside_the_subset(synth):
    from torch.utils.data import DataLoader, Subset

    subset = Subset(synth.train, list(range(100)))
    loader = DataLoader(subset, batch_size=32, shuffle=True)
    model = md.models.default_model(synth, feature_dim=8)
    hist = md.fit(model, loader, epochs=2, regulator=md.ValuationResampling(warmup=1),
                  progress=False, monitor=False)
    extra = sum(hist[1]["regulator"]["extra_copies"].values())
    assert hist[1]["train"]["n"] == 100 + extra


# ---------------------------------------------------------------- mixed precision
def test_fit_with_autocast_trains(synth):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=16)
    hist = md.fit(model, synth.train.loader(64, shuffle=True), synth.val.loader(256), epochs=4,
                  lr=0.05, amp=True, regulator=md.InfoReg(), progress=False)
    assert hist[-1]["val"]["acc"] > 0.5 and all(torch.isfinite(p).all() for p in model.parameters())
    sv = md.shapley(model, synth.val.loader(256), autocast=True)
    ref = md.shapley(model, synth.val.loader(256))
    assert (sv.values - ref.values).abs().mean() < 0.1  # bfloat16 logits: close, not identical


def test_regulators_see_unscaled_gradients_with_a_grad_scaler(synth):
    """OGM under a GradScaler (scale 1024) acts on the same gradients as without one."""
    x, y = next(iter(synth.train.loader(64)))

    def grads(scaler):
        torch.manual_seed(0)
        model = md.models.default_model(synth, feature_dim=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = {}

        class Spy(md.Callback):
            def on_before_optimizer_step(self, ctx):
                seen["g"] = torch.cat([p.grad.flatten() for p in ctx.model.parameters()]).clone()

        run = md.Regulation(model, opt, [md.OGM(alpha=0.5), Spy()], scaler=scaler)
        run.epoch_start(0, [(x, y)])
        run.backward(x, y)
        return seen["g"]

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.testing.assert_close(grads(scaler), grads(None))


@pytest.mark.parametrize("make", [lambda: md.MMPareto(), lambda: md.ReconBoost()])
def test_a_grad_scaler_is_refused_for_a_regulator_that_runs_its_own_backward(synth, make):
    """Its backward is not scaled, so unscaling before the step would shrink its gradients."""
    model = md.models.default_model(synth, feature_dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="runs its own backward pass, which a float16 GradScaler"):
        md.Regulation(model, opt, make(), scaler=torch.amp.GradScaler("cpu"))


# ---------------------------------------------------------------- issue 11: run state, randomness
REGULATORS = {
    "InfoReg": lambda: md.InfoReg(),
    "Relearning": lambda: md.Relearning(every=1, max_resets=1),
    "OGM-GE": lambda: md.OGM(alpha=0.5, noise=True),
    "OPM": lambda: md.OPM(),
    "MMPareto": lambda: md.MMPareto(),
    "Valuation-sample": lambda: md.ValuationResampling(warmup=1),
    "Valuation-modality": lambda: md.ValuationResampling("modality", warmup=1),
    "AGM": lambda: md.AGM(alpha=2.0),
    "PMR": lambda: md.PMR(),
    "MMCosine": lambda: md.MMCosine(),
    "MBSD": lambda: md.MBSD(),
    "CML": lambda: md.CML(),
    "LFM": lambda: md.LFM(schedule="learnable", lr_alpha=1e3),
    "GBlending": lambda: md.GBlending(super_epoch=1),
    "AMCo": lambda: md.AMCo(),
}


@pytest.fixture(scope="module")
def small():
    return md.datasets.synthetic(n_samples=160, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 6, "b": 6}, seed=2)


def _fit_fresh_model(data, regulator, epochs=3):
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=6)
    md.fit(model, data.train.loader(32), data.val.loader(64), epochs=epochs, regulator=regulator,
           monitor=False, restore_best=False, progress=False, seed=0)
    return model


@pytest.mark.parametrize("name", list(REGULATORS))
def test_reused_regulator_trains_like_a_new_one(small, name):
    """Second fit with the same object == a fit with a brand-new object (equal weights)."""
    epochs = 3 if name == "InfoReg" else 2  # InfoReg's window needs two epochs of traces
    reused = REGULATORS[name]()
    _fit_fresh_model(small, reused, epochs)
    second = _fit_fresh_model(small, reused, epochs)
    fresh = _fit_fresh_model(small, REGULATORS[name](), epochs)
    for (n, a), (_, b) in zip(second.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_reused_regulators_forget_exactly_their_run_state(small):
    info, relearn = md.InfoReg(), md.Relearning(every=1, max_resets=1)
    first = _fit_fresh_model(small, info)
    assert len(info.traces["a"]) == 3 and info.anchors
    _fit_fresh_model(small, relearn)
    assert relearn.resets == 1
    torch.manual_seed(5)  # a different model: Re-learning must pull toward ITS init
    other = md.models.default_model(small, feature_dim=6)
    init = [p.detach().clone() for p in other.encoders["a"].parameters()]
    md.fit(other, small.train.loader(32), small.val.loader(64), epochs=1, regulator=relearn,
           monitor=False, progress=False, seed=0)
    assert relearn.resets == 1 and len(relearn.history) == 1  # counted afresh, reset again
    for p0, kept in zip(init, relearn.init_params["a"], strict=True):
        assert torch.equal(p0, kept)
    assert first is not other


def test_load_state_dict_survives_the_next_run_start(small):
    """Resume: state restored with load_state_dict is kept by on_fit_start; a fresh run is not."""
    info = md.InfoReg()
    model = _fit_fresh_model(small, info, epochs=2)
    state = info.state_dict()
    resumed = md.InfoReg()
    resumed.load_state_dict(state)
    ctx = StepContext(model=model)
    resumed.on_fit_start(ctx)
    assert resumed.traces == state["traces"] and len(resumed.traces["a"]) == 2
    resumed.on_fit_start(ctx)  # the restore is consumed by one start: the next run is fresh
    assert resumed.traces == {} and resumed.anchors == {}


def _grad_spy(store):
    class Spy(md.Callback):
        def on_before_optimizer_step(self, ctx):
            store.append({n: p.grad.detach().clone() for n, p in ctx.model.named_parameters()
                          if n.startswith("encoders.") and p.grad is not None})
    return Spy()


def test_plain_loop_draws_new_ge_noise_and_opm_masks_at_every_step(synth):
    """README loop without batch_end: noise/std and drop masks differ between steps 0, 1, 2."""
    x, y = next(iter(synth.train.loader(64)))
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same gradients
    before, after = [], []
    ogm = md.OGM(alpha=0.0, noise=True)  # k = 1: only the noise acts
    run = md.Regulation(model, opt, [_grad_spy(before), ogm, _grad_spy(after)])
    run.epoch_start(0, [(x, y)] * 3)
    for _ in range(3):
        opt.zero_grad()
        run.backward(x, y)
        opt.step()
    assert run.ctx.step == 2  # steps 0, 1, 2 (the third's end comes at the next call)
    assert run.state_dict()["step"] == 3  # a checkpoint counts the step already taken
    name = "encoders.a.net.0.weight"
    unit = [(a[name] - b[name]) / b[name].std() for a, b in zip(after, before, strict=True)]
    for i in range(3):
        torch.testing.assert_close(before[i][name], before[0][name])  # same gradients
        assert unit[i].std().item() == pytest.approx(1.0, rel=0.2)  # N(0, std(g)^2)
    assert (unit[0] - unit[1]).abs().mean() > 0.5 and (unit[1] - unit[2]).abs().mean() > 0.5

    opm = md.OPM(q_base=0.5, p_exe=1.0)
    run = md.Regulation(model, opt, opm)
    run.epoch_start(0, [(x, y)] * 3)
    masks = []
    for _ in range(3):
        opt.zero_grad()
        run.backward(x, y)
        opt.step()
        masks.append(opm.last_mask.clone())
    drops = [int((~m).sum()) for m in masks]
    assert all(d > 0 for d in drops)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_batch_end_is_optional_and_never_double_counts(synth):
    x, y = next(iter(synth.train.loader(32)))
    model = md.models.default_model(synth, feature_dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = md.Regulation(model, opt, md.OGM())
    run.epoch_start(0, [(x, y)])
    for explicit in (True, False, True, False):
        opt.zero_grad()
        run.backward(x, y)
        opt.step()
        if explicit:
            run.batch_end()
    run.epoch_end()
    assert run.ctx.step == 4


# ---------------------------------------------------------------- issue 11: declared constraints
NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = [
    (md.InfoReg, {"beta": -0.5}, "beta"), (md.InfoReg, {"beta": NAN}, "beta"),
    (md.InfoReg, {"K": -0.1}, "K"), (md.InfoReg, {"K": 1.0}, "K"), (md.InfoReg, {"K": NAN}, "K"),
    (md.InfoReg, {"rule": "median"}, "rule"), (md.InfoReg, {"trace": "exact"}, "trace"),
    (md.InfoReg, {"score": "acc"}, "score"), (md.InfoReg, {"coefficient": "x"}, "coefficient"),
    (md.InfoReg, {"unimodal_loss": "yes"}, "unimodal_loss"),
    (md.InfoReg, {"regulate_always": 1}, "regulate_always"),
    (md.InfoReg, {"code_scale": (0.95,)}, "code_scale"),
    (md.InfoReg, {"code_scale": (0.95, NAN)}, "code_scale"),
    (md.Relearning, {"lam": 0.0}, "lam"), (md.Relearning, {"lam": INF}, "lam"),
    (md.Relearning, {"every": 0}, "every"), (md.Relearning, {"every": 2.5}, "every"),
    (md.Relearning, {"max_resets": -1}, "max_resets"), (md.Relearning, {"val_loader": 3}, "val_loader"),
    (md.Relearning, {"reset_bn": "no"}, "reset_bn"), (md.Relearning, {"reset_optimizer": None}, "reset_optimizer"),
    (md.Relearning, {"seed": -1}, "seed"),
    (md.OGM, {"alpha": -1.0}, "alpha"), (md.OGM, {"alpha": NAN}, "alpha"),
    (md.OGM, {"noise": "yes"}, "noise"), (md.OGM, {"start_epoch": -1}, "start_epoch"),
    (md.OGM, {"end_epoch": 0}, "end_epoch"), (md.OGM, {"start_epoch": 5, "end_epoch": 3}, "end_epoch"),
    (md.OGM, {"conv_only": 1}, "conv_only"), (md.OGM, {"seed": 1.5}, "seed"),
    (md.OPM, {"q_base": 0.0}, "q_base"), (md.OPM, {"q_base": 1.5}, "q_base"),
    (md.OPM, {"lam": -1.0}, "lam"), (md.OPM, {"lam": INF}, "lam"), (md.OPM, {"p_exe": 0.0}, "p_exe"),
    (md.OPM, {"p_exe": NAN}, "p_exe"), (md.OPM, {"start_epoch": 2, "end_epoch": 2}, "end_epoch"),
    (md.OPM, {"seed": -3}, "seed"),
    (md.MMPareto, {"gamma": -1.0}, "gamma"), (md.MMPareto, {"gamma": 0.0}, "gamma"),
    (md.MMPareto, {"gamma": NAN}, "gamma"), (md.MMPareto, {"gamma": INF}, "gamma"),
    (md.MMPareto, {"gamma": "1.5"}, "gamma"),
    (md.ValuationResampling, {"level": "batch"}, "level"),
    (md.ValuationResampling, {"warmup": -1}, "warmup"), (md.ValuationResampling, {"warmup": 1.5}, "warmup"),
    (md.ValuationResampling, {"alpha": 0.0}, "alpha"), (md.ValuationResampling, {"alpha": NAN}, "alpha"),
    (md.ValuationResampling, {"subset": 0.0}, "subset"), (md.ValuationResampling, {"subset": 1.5}, "subset"),
    (md.ValuationResampling, {"value": "accuracy"}, "value"),
    (md.ValuationResampling, {"baseline": "median"}, "baseline"),
    (md.ValuationResampling, {"seed": -1}, "seed"),
]


@pytest.mark.parametrize("cls, kwargs, arg", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{a}-{k[a]!r}" for c, k, a in BAD_ARGUMENTS])
def test_every_regulator_argument_is_validated(cls, kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=rf"{cls.__name__}: .*\b{arg}\b"):
        cls(**kwargs)


def test_constraints_are_declared_for_every_constructor_argument():
    import inspect

    for cls in (md.InfoReg, md.Relearning, md.OGM, md.OPM, md.MMPareto, md.ValuationResampling,
                md.Regulation):
        args = [n for n in inspect.signature(cls).parameters if n not in ("model", "regulator",
                                                                            "device", "callbacks")]
        assert set(args) <= set(cls._parameter_constraints), cls.__name__
    # good values still pass, with the documented edge cases
    md.OGM(alpha=0.0, noise=True, start_epoch=2, end_epoch=3)
    md.OPM(q_base=1.0, lam=0.0, p_exe=1.0)
    md.InfoReg(beta=0.0, K=0.0)
    every = md.Relearning(every=np.int64(3)).every  # integer scalars of numpy/torch are integers
    assert every == 3 and type(every) is int
    assert md.OGM(end_epoch=torch.tensor(4)).end_epoch == 4


@pytest.mark.parametrize("kwargs, arg", [
    ({"optimizer": None}, "optimizer"), ({"monitor": "yes"}, "monitor"),
    ({"unimodal_loss_weight": -1.0}, "unimodal_loss_weight"),
    ({"unimodal_loss_weight": NAN}, "unimodal_loss_weight"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"), ({"amp": 1}, "amp"), ({"scaler": object()}, "scaler"),
])
def test_regulation_arguments_are_validated(kwargs, arg):
    model = make_model()
    args = {"optimizer": torch.optim.SGD(model.parameters(), lr=0.1), **kwargs}
    with pytest.raises((ValueError, TypeError), match=rf"Regulation: {arg}\b"):
        md.Regulation(model, args.pop("optimizer"), md.OGM(), **args)


# ---------------------------------------------------------------- issue 11: optimizer coverage
def test_optimizer_over_another_model_is_refused(synth):
    model, other = make_model(), make_model(seed=1)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=rf"covers 0 of the model's {n_trainable} trainable"):
        md.Regulation(model, torch.optim.SGD(other.parameters(), lr=0.1))
    net = md.models.default_model(synth, feature_dim=8)
    foreign = torch.optim.SGD(md.models.default_model(synth, feature_dim=8).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"covers 0 of the model's \d+ trainable"):
        md.fit(net, synth.train.loader(64), epochs=1, optimizer=foreign, progress=False)


def test_optimizer_missing_an_encoder_is_refused_and_frozen_ones_are_fine():
    import warnings

    model = make_model()
    without_m1 = [p for n, p in model.named_parameters() if not n.startswith("encoders.m1.")]
    with pytest.raises(ValueError, match=r"encoder 'm1'.*requires_grad_\(False\)"):
        md.Regulation(model, torch.optim.SGD(without_m1, lr=0.1))
    partial = [p for n, p in model.named_parameters() if n != "encoders.m0.net.0.bias"]
    with pytest.warns(UserWarning, match=r"encoder 'm0': 1 of 4"):
        md.Regulation(model, torch.optim.SGD(partial, lr=0.1))
    model.encoders["m1"].requires_grad_(False)  # frozen: not expected in the optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        md.Regulation(model, torch.optim.SGD(without_m1, lr=0.1))


# ---------------------------------------------------------------- issue 11: internal keys
def test_groups_hold_modalities_only_and_the_head_separately():
    model = make_model(3, "gated")
    reg = md.OGM()
    groups = reg.groups(model)
    assert list(groups) == list(model.modalities)
    head = reg.head_parameters(model)
    assert {id(p) for p in head} == {id(p) for p in model.head_parameters()}
    assert not {id(p) for p in head} & {id(p) for ps in groups.values() for p in ps}


def test_a_modality_named___head___is_modulated_and_the_fusion_head_is_not():
    torch.manual_seed(0)
    encs = {"__head__": md.models.MLPEncoder(5, 4, hidden=(8,)), "b": md.models.MLPEncoder(5, 4, hidden=(8,))}
    try:
        model = md.MultimodalClassifier(encs, {"__head__": 4, "b": 4}, 3)
    except ValueError:
        pytest.skip("the model constructor refuses the name '__head__' (separation tested above)")
    with torch.no_grad():  # b's features do not reach the logits: '__head__' dominates
        model.fusion.fc.weight[:, 4:] = 0
        model.fusion.fc.bias.zero_()
    x = make_inputs(model, batch=16)
    ctx = _ctx(model, x, torch.zeros(16, dtype=torch.long))
    y = ctx.unimodal_logits["__head__"].argmax(1)
    ctx = _ctx(model, x, y)
    reg = md.OGM(alpha=0.5)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    k = reg.coefficients["__head__"]
    assert k < 1 and reg.coefficients["b"] == 1.0
    for n, p in model.named_parameters():
        expected = before[n] * k if n.startswith("encoders.__head__.") else before[n]
        torch.testing.assert_close(p.grad, expected, msg=n)


# ---------------------------------------------------------------- issue 11: errors that say what to do
def test_backward_before_epoch_start_says_to_call_it(synth):
    x, y = next(iter(synth.train.loader(16)))
    model = md.models.default_model(synth, feature_dim=8)
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), md.InfoReg())
    with pytest.raises(CallOrderError, match=r"before epoch_start.*run\.epoch_start\(epoch, train_loader\)"):
        run.backward(x, y)
    assert issubclass(CallOrderError, ValueError) and issubclass(CallOrderError, RuntimeError)
    run.epoch_start(0, [(x, y)])
    assert run.backward(x, y) is not None
    run.epoch_end()
    with pytest.raises(CallOrderError, match="after epoch_end without a new epoch_start"):
        run.backward(x, y)


def test_data_parallel_with_mmpareto_is_refused_with_advice(synth):
    model = md.models.default_model(synth, feature_dim=8)
    wrapped = torch.nn.DataParallel(model)
    with pytest.raises(ValueError, match=r"MMPareto.*DataParallel.*DistributedDataParallel.*model\.module"):
        md.Regulation(wrapped, torch.optim.SGD(model.parameters(), lr=0.1), md.MMPareto())
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        md.fit(wrapped, synth.train.loader(64), epochs=1, regulator=md.MMPareto(), progress=False)


def test_tuple_batches_get_the_adapter_recipe():
    model = make_model()
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = make_inputs(model, batch=4)
    run.epoch_start(0, [])
    with pytest.raises(ValueError, match=r"adapt_loader\(loader, lambda b: \(\{'m0': b\[0\]"):
        run.backward(x["m0"], torch.zeros(4, dtype=torch.long))


def test_nan_features_from_finite_inputs_name_the_encoder():
    model = make_model()
    with torch.no_grad():
        model.encoders["m1"].net[0].weight[0, 0] = float("nan")
    x, y = make_inputs(model, batch=6), torch.arange(6) % 3
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), md.OPM())
    run.epoch_start(0, [])
    with pytest.raises(ValueError, match=r"encoder 'm1' \(MLPEncoder\) produced NaN/inf features "
                                         r"from finite inputs; 1 of its parameter values"):
        run.backward(x, y)
    skip = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), md.InfoReg(),
                         on_nonfinite="skip")
    skip.epoch_start(0, [])
    with pytest.warns(UserWarning, match="encoder 'm1'"):
        assert skip.backward(x, y) is None
    assert skip.epoch_stats["skipped"] == 1


def test_composition_check_lives_in_training_and_is_reexported():
    import inspect

    import modaldiag.regulators.base as base
    import modaldiag.training.callbacks as callbacks
    import modaldiag.training.loop as loop

    assert base.check_composition is callbacks.check_composition
    assert "import" not in inspect.getsource(loop.as_callbacks)
    with pytest.raises(ValueError, match="cannot be combined"):
        callbacks.check_composition([md.MMPareto(), md.OGM()])


def test_resuming_without_the_saved_regulator_is_refused(synth):
    x, y = next(iter(synth.train.loader(16)))
    model = md.models.default_model(synth, feature_dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = md.Regulation(model, opt, md.InfoReg())
    run.epoch_start(0, [(x, y)])
    run.backward(x, y)
    run.epoch_end()
    plain = md.Regulation(model, opt)
    with pytest.raises(ValueError, match=r"trained with \['InfoReg'\], which this run lacks"):
        plain.load_state_dict(run.state_dict())


# ---------------------------------------------------------------- options pinned by value
def _conv_model(seed=0):
    """Modality "a": a 2-D CNN with BatchNorm (4-D conv grads, BN buffers); "b": an MLP."""
    torch.manual_seed(seed)
    encs = {"a": md.models.Conv2dEncoder(2, 6, channels=(3, 4)), "b": md.models.MLPEncoder(5, 6)}
    return md.MultimodalClassifier(encs, {"a": 6, "b": 6}, 3)


def _conv_batch(n=16, seed=0, strong="a"):
    g = torch.Generator().manual_seed(seed)
    x = {"a": torch.randn(n, 2, 8, 8, generator=g), "b": torch.randn(n, 5, generator=g)}
    x[strong] = x[strong] * 5
    return x, torch.arange(n) % 3


def test_inforeg_star_gradient_equals_autograd_of_joint_plus_unimodal_ce():
    torch.manual_seed(0)
    model = make_model(3, "gated")
    x, y = make_inputs(model, batch=12, seed=4), torch.tensor([0, 2, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2])
    ref = make_model(3, "gated")
    ref.load_state_dict(model.state_dict())
    feats = ref.encode(x)
    loss = F.cross_entropy(ref.head(feats), y) + sum(
        F.cross_entropy(ref.head(feats, present=[m]), y) for m in ref.modalities)
    want = torch.autograd.grad(loss, list(ref.parameters()))
    plain = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = md.Regulation(model, opt, md.InfoReg(unimodal_loss=True))
    run.epoch_start(0, [(x, y)])
    opt.zero_grad()
    run.backward(x, y)  # step 0: the weights equal the anchors, so the proximal term is 0
    for (n, p), g in zip(model.named_parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=n)
    # the unimodal terms really change the gradient (of encoders and head)
    assert max((g - g0).abs().max().item() for g, g0 in zip(want, plain, strict=True)) > 1e-3
    assert set(run.ctx.losses) == {"multimodal", "unimodal/m0", "unimodal/m1", "unimodal/m2"}


def test_inforeg_without_unimodal_loss_is_the_joint_gradient_only():
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=10, seed=2), torch.arange(10) % 3
    ref = make_model(2, "concat")
    ref.load_state_dict(model.state_dict())
    want = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = md.Regulation(model, opt, md.InfoReg())
    run.epoch_start(0, [(x, y)])
    opt.zero_grad()
    run.backward(x, y)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert set(run.ctx.losses) == {"multimodal"}


@pytest.mark.parametrize("reset_bn", [False, True])
@pytest.mark.parametrize("reset_optimizer", [False, True])
def test_relearning_reset_bn_and_optimizer_values(reset_bn, reset_optimizer):
    model = _conv_model()
    reg = md.Relearning(lam=3.0, reset_bn=reset_bn, reset_optimizer=reset_optimizer)
    reg.remember_init(model)
    init_buf = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for s in range(3):
        x, y = _conv_batch(seed=s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    cur_buf = {n: b.clone() for n, b in model.named_buffers()}
    assert any(not torch.equal(cur_buf[n], init_buf[n]) for n in cur_buf if "running" in n)
    state_before = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                    for p in model.parameters()}
    alphas = {"a": 0.25, "b": 0.6}
    reg.reinitialise(model, alphas, opt)
    for n, b in model.named_buffers():
        m = n.split(".")[1]
        if not reset_bn:
            assert torch.equal(b, cur_buf[n]), n
        elif b.is_floating_point():
            torch.testing.assert_close(b, (1 - alphas[m]) * cur_buf[n] + alphas[m] * init_buf[n],
                                       msg=n)
        else:  # num_batches_tracked: back to its initial count
            assert torch.equal(b, init_buf[n]) and int(cur_buf[n]) == 3, n
    enc_ids = {id(p) for m in model.modalities for p in model.encoders[m].parameters()}
    for p in model.parameters():
        if reset_optimizer and id(p) in enc_ids:
            assert p not in opt.state or not opt.state[p]
        else:  # head state (and everything without the option) kept, value for value
            assert set(opt.state[p]) == set(state_before[id(p)])
            for k, v in opt.state[p].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_before[id(p)][k])), k
    # the next step after a reset starts the Adam moments anew for the encoders
    if reset_optimizer:
        x, y = _conv_batch(seed=9)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        p = model.encoders["b"].net[0].weight
        assert int(opt.state[p]["step"]) == 1
        assert int(opt.state[model.fusion.fc.weight]["step"]) == 4


def test_ogm_conv_only_scales_exactly_the_4d_grads_by_k():
    model = _conv_model()
    x, y = _conv_batch(n=24)
    ctx = _ctx(model, x, y)
    s = {m: float(F.softmax(ctx.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).sum())
         for m in model.modalities}
    dominant = max(s, key=s.get)
    rho = s[dominant] / min(s.values())
    k = 1 - math.tanh(1.0 * rho)
    assert rho > 1 and k < 0.5
    reg = md.OGM(alpha=1.0, conv_only=True)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    assert reg.coefficients[dominant] == pytest.approx(k)
    n4 = 0
    for n, p in model.named_parameters():
        if p.grad.dim() == 4 and n.startswith(f"encoders.{dominant}."):
            torch.testing.assert_close(p.grad, before[n] * k, msg=n)
            n4 += 1
        else:  # conv bias, BN affine, fc, the other encoder and the head: untouched
            assert torch.equal(p.grad, before[n]), n
    assert dominant == "a" and n4 == 2  # both Conv2d weights
    # default (conv_only=False): every parameter of the dominant encoder by the same k
    model2 = _conv_model()
    ctx2 = _ctx(model2, x, y)
    reg2 = md.OGM(alpha=1.0)
    reg2.on_after_forward(ctx2)
    F.cross_entropy(ctx2.logits, y).backward()
    before2 = {n: p.grad.clone() for n, p in model2.named_parameters()}
    reg2.on_before_optimizer_step(ctx2)
    for n, p in model2.named_parameters():
        scale = k if n.startswith(f"encoders.{dominant}.") else 1.0
        torch.testing.assert_close(p.grad, before2[n] * scale, msg=n)


def test_ogm_ge_noise_std_is_the_unmodulated_std_per_tensor_at_alpha_above_zero():
    torch.manual_seed(0)
    encs = {"a": md.models.MLPEncoder(40, 32, hidden=(64,)), "b": md.models.MLPEncoder(40, 32, hidden=(64,))}
    model = md.MultimodalClassifier(encs, {"a": 32, "b": 32}, 3)
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(64, 40, generator=g) * 4, "b": torch.randn(64, 40, generator=g) * 0.1}
    y = torch.arange(64) % 3
    ctx = _ctx(model, x, y, epoch=0, step=5)
    reg = md.OGM(alpha=2.0, noise=True)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {m: [p.grad.clone() for p in model.encoders[m].parameters()] for m in model.modalities}
    head_before = [p.grad.clone() for p in model.fusion.parameters()]
    reg.on_before_optimizer_step(ctx)
    k = reg.coefficients
    dominant = min(k, key=k.get)
    assert k[dominant] < 0.3  # modulated and unmodulated std differ by > 3x
    for m in model.modalities:
        for g0, p in zip(before[m], model.encoders[m].parameters(), strict=True):
            noise = p.grad - k[m] * g0
            want = g0.std().item()
            assert noise.std().item() == pytest.approx(want, rel=0.3), (m, tuple(p.shape))
            assert abs(noise.mean().item()) < 4 * want / math.sqrt(noise.numel()) + 1e-12
    for g0, p in zip(head_before, model.fusion.parameters(), strict=True):
        assert torch.equal(p.grad, g0)  # no noise on the head


def test_opm_with_a_mean_baseline_drops_to_the_baseline_and_rescales_the_deviation():
    """f' = b + (f - b) * keep / (1 - q): dropped rows become the baseline b, kept rows keep their
    deviation from b, rescaled; with a non-zero b (not only the zero default)."""
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x = make_inputs(model, batch=400, seed=3)
    x["m0"] = x["m0"] * 4
    y = torch.arange(400) % 3
    model.set_baseline({"m0": torch.full((4,), 0.7), "m1": torch.full((5,), -0.3)})
    reg = md.OPM(q_base=0.5, lam=0.5, p_exe=1.0)
    feats = {m: f.detach() for m, f in model.encode(x).items()}
    out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=0, step=2))
    assert reg.last_masks, "nothing was dropped: the case does not test the rescaling"
    q_logged = reg.collect_logs()["q"]  # one step: the epoch mean is that step's q
    for m, keep in reg.last_masks.items():
        base = model.absent_feature(m, feats[m])
        assert float(base.abs().min()) > 0.2  # really a non-zero baseline
        q = q_logged[m]
        assert 0 < q < 1
        dropped = ~keep
        assert dropped.any() and keep.any()
        torch.testing.assert_close(out[m][dropped], base[dropped])
        torch.testing.assert_close(out[m][keep], base[keep] + (feats[m][keep] - base[keep]) / (1 - q))


def test_a_loss_term_replaced_by_a_hook_is_checked_for_non_finite_values(synth):
    """A hook that replaces the multimodal term (UME trains its unimodal terms instead) cannot
    slip a NaN total past the check that ran before the hooks."""
    x, y = next(iter(synth.train.loader(32)))
    model = md.models.default_model(synth, feature_dim=8)

    class Replace(md.Callback):
        def on_after_forward(self, ctx):
            ctx.losses["multimodal"] = ctx.losses["multimodal"] * float("nan")

    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Replace()])
    run.epoch_start(0, [(x, y)])
    with pytest.raises(ValueError, match="non-finite"):
        run.backward(x, y)
