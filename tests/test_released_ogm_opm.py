"""OGM and OPM ``variant="released"`` against small, independent transcriptions of the authors'
public code (GeWu-Lab/OGM-GE_CVPR2022 ``main.py``; GeWu-Lab/BML_TPAMI2024 ``models/Classifier.py``
and ``main.py``), written here in plain torch without modaldiag's helpers; plus the paper-form
OPM checks of issue 12 item 6 (a fixture with rho far from 1, expectation measured) and the M > 2
continuity of the coefficients (item 3)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.regulators.ogm import ogm_coefficients
from modaldiag.regulators.opm import opm_drop_probability, opm_released_theta
from modaldiag.training.callbacks import StepContext

REL = dict(rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ oracles (plain torch)
def oracle_ogm_released(fa, fv, w, b, y, alpha):
    """The released OGM step for a concat head: logits W_m f_m + b/2, ratio, Eq. (10)."""
    da = fa.shape[1]
    out_a = fa @ w[:, :da].T + b / 2
    out_v = fv @ w[:, da:].T + b / 2
    score_a = sum(F.softmax(out_a, 1)[i][y[i]] for i in range(len(y)))
    score_v = sum(F.softmax(out_v, 1)[i][y[i]] for i in range(len(y)))
    ratio_v = float(score_v / score_a)
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v, coeff_a = 1 - math.tanh(alpha * max(ratio_v, 0.0)), 1.0
    else:
        coeff_a, coeff_v = 1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0
    return {"a": coeff_a, "v": coeff_v}, {"a": ratio_a, "v": ratio_v}


def oracle_opm_released(f1, f2, w, b, y, q_base, lam, mask):
    """The released OPM forward for a concat head: calcu_q, then Modality_drop with a given
    (B, 2) keep mask: every modality's kept feature divided by (1 - theta)."""
    d1, d2 = f1.shape[1], f2.shape[1]
    t1 = f1 @ w[:, :d1].T + b / 2
    t2 = f2 @ w[:, d1:].T + b / 2
    p1 = sum(F.softmax(t1, 1)[i][y[i]] for i in range(len(y)))
    p2 = sum(F.softmax(t2, 1)[i][y[i]] for i in range(len(y)))
    r1 = math.tanh(max(float(p1 / p2) - 1, 0.0))
    r2 = math.tanh(max(float(p2 / p1) - 1, 0.0))
    q = [q_base * (1 + lam * r1) if r1 > 0 else 0.0, q_base * (1 + lam * r2) if r2 > 0 else 0.0]
    q = [min(max(v, 0.0), 1.0) for v in q]
    theta = (d1 * q[0] + d2 * q[1]) / (d1 + d2)
    m = mask.float()
    return q, theta, f1 * m[:, :1] / (1 - theta), f2 * m[:, 1:] / (1 - theta)


# ------------------------------------------------------------------ fixtures
def _conv_encoder(d):
    # a 4-D conv weight, a 1-D conv bias and a 2-D linear weight: conv_only is visible
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, d))


def _ogm_fixture(bias=(2.5, -2.0, 0.5)):
    torch.manual_seed(0)
    model = md.MultimodalClassifier({"a": _conv_encoder(6), "v": _conv_encoder(5)},
                                    {"a": 6, "v": 5}, 3, fusion="concat")
    with torch.no_grad():
        model.fusion.fc.weight[:, :6].mul_(12)
        model.fusion.fc.weight[:, 6:].mul_(2)
        model.fusion.fc.bias.copy_(torch.tensor(bias))
    g = torch.Generator().manual_seed(1)
    x = {"a": 3 * torch.randn(16, 1, 6, 6, generator=g), "v": torch.randn(16, 1, 6, 6, generator=g)}
    y = torch.tensor([0, 2, 0, 2, 2, 1, 2, 2, 2, 2, 1, 0, 2, 0, 2, 2])
    return model, x, y


def _ctx(model, x, y, epoch=0, step=0):
    ctx = StepContext(model=model, epoch=epoch, step=step, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    ctx.compute_unimodal_logits()
    return ctx


def _ogm_step(reg, model, x, y, epoch=0, step=0):
    """One step through the regulator's hooks; returns (features, grads before, grads after)."""
    model.zero_grad(set_to_none=True)
    ctx = _ctx(model, x, y, epoch, step)
    reg.on_fit_start(ctx)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    after = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {m: f.detach() for m, f in ctx.features.items()}, before, after


# ------------------------------------------------------------------ OGM released
@pytest.mark.parametrize("epoch,inside", [(1, False), (2, True), (4, True), (5, False)])
def test_ogm_released_coefficients_and_gradients_equal_the_oracle(epoch, inside):
    model, x, y = _ogm_fixture()
    alpha = 0.8
    reg = md.OGM(alpha=alpha, start_epoch=2, end_epoch=4, variant="released")
    feats, before, after = _ogm_step(reg, model, x, y, epoch=epoch)
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    k, rho = oracle_ogm_released(feats["a"], feats["v"], w, b, y, alpha)
    assert rho["a"] > 1.2 and k["a"] < 0.3  # the fixture modulates audio clearly
    assert reg._sums["rho"]["a"] == pytest.approx(rho["a"], rel=1e-6)
    assert reg._sums["rho"]["v"] == pytest.approx(rho["v"], rel=1e-6)
    expect = k if inside else {"a": 1.0, "v": 1.0}  # window [2, 4], both ends included
    for m in ("a", "v"):
        assert reg.coefficients[m] == pytest.approx(expect[m], rel=1e-6)
    for name, g in after.items():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        if m is not None and g.dim() == 4:  # released: only 4-D gradients are modulated
            torch.testing.assert_close(g, before[name] * expect[m], **REL)
        else:
            torch.testing.assert_close(g, before[name], rtol=0, atol=0)
    conv = after["encoders.a.0.weight"]
    if inside:
        assert not torch.allclose(conv, before["encoders.a.0.weight"])


def test_ogm_released_and_paper_differ_by_the_bias_share():
    model, x, y = _ogm_fixture()
    rel = md.OGM(alpha=0.8, variant="released")
    pap = md.OGM(alpha=0.8)
    feats, before, after_rel = _ogm_step(rel, model, x, y)
    _, _, after_pap = _ogm_step(pap, model, x, y)
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    # paper: the other modality at its (zero) baseline, so the FULL bias: W_a f_a + b
    s = [F.softmax(f @ wm.T + b, 1).gather(1, y[:, None]).sum()
         for f, wm in ((feats["a"], w[:, :6]), (feats["v"], w[:, 6:]))]
    rho_paper = float(s[0] / s[1])
    _, rho_rel = oracle_ogm_released(feats["a"], feats["v"], w, b, y, 0.8)
    assert pap._sums["rho"]["a"] == pytest.approx(rho_paper, rel=1e-6)
    assert rel._sums["rho"]["a"] == pytest.approx(rho_rel["a"], rel=1e-6)
    assert rho_paper == pytest.approx(1.289, abs=2e-3)  # this fixture: 1.289 (paper)
    assert rho_rel["a"] == pytest.approx(1.375, abs=2e-3)  # vs 1.375 (released)
    assert pap.coefficients["a"] / rel.coefficients["a"] > 1.10  # k differs by > 10 %
    # and paper modulates the linear layer too, released does not
    assert not torch.allclose(after_pap["encoders.a.4.weight"], after_rel["encoders.a.4.weight"])
    # with a zero bias the two scores coincide
    model0, x0, y0 = _ogm_fixture(bias=(0.0, 0.0, 0.0))
    r0, p0 = md.OGM(variant="released"), md.OGM()
    _ogm_step(r0, model0, x0, y0)
    _ogm_step(p0, model0, x0, y0)
    assert r0._sums["rho"]["a"] == pytest.approx(p0._sums["rho"]["a"], rel=1e-6)


def test_ogm_released_late_head_uses_each_modality_own_linear():
    torch.manual_seed(3)
    model = md.MultimodalClassifier({"a": _conv_encoder(4), "v": _conv_encoder(4)},
                                    {"a": 4, "v": 4}, 3, fusion="late")
    with torch.no_grad():
        model.fusion.heads["a"].weight.mul_(10)
        model.fusion.heads["a"].bias.copy_(torch.tensor([1.0, -1.0, 0.0]))
        model.fusion.heads["v"].bias.copy_(torch.tensor([-3.0, 3.0, 0.5]))
    g = torch.Generator().manual_seed(4)
    x = {m: 3 * torch.randn(12, 1, 6, 6, generator=g) for m in ("a", "v")}
    with torch.no_grad():  # labels that modality a predicts: rho far from 1
        y = model.fusion.heads["a"](model.encoders["a"](x["a"])).argmax(1)
    reg = md.OGM(alpha=0.5, variant="released")
    feats, before, after = _ogm_step(reg, model, x, y)
    ha, hv = model.fusion.heads["a"], model.fusion.heads["v"]
    sa = F.softmax(feats["a"] @ ha.weight.detach().T + ha.bias.detach(), 1).gather(1, y[:, None]).sum()
    sv = F.softmax(feats["v"] @ hv.weight.detach().T + hv.bias.detach(), 1).gather(1, y[:, None]).sum()
    rho_v = float(sv / sa)
    k = ({"a": 1.0, "v": 1 - math.tanh(0.5 * rho_v)} if rho_v > 1
         else {"a": 1 - math.tanh(0.5 / rho_v), "v": 1.0})
    assert reg._sums["rho"]["v"] == pytest.approx(rho_v, rel=1e-6)
    assert reg.coefficients == pytest.approx(k, rel=1e-6)
    assert rho_v < 0.8 and k["a"] < 0.8
    # paper: fc_a(f_a) + bias of v (v at its zero baseline) -- a different score
    pap = md.OGM(alpha=0.5)
    _ogm_step(pap, model, x, y)
    assert abs(pap._sums["rho"]["v"] - rho_v) > 0.05


def test_ogm_released_tie_modulates_the_first_modality():
    k_rel, _ = ogm_coefficients({"a": 3.0, "v": 3.0}, 0.8, "released")
    k_pap, _ = ogm_coefficients({"a": 3.0, "v": 3.0}, 0.8)
    assert k_rel == pytest.approx({"a": 1 - math.tanh(0.8), "v": 1.0})
    assert k_pap == {"a": 1.0, "v": 1.0}
    # away from the tie both forms agree
    for s in ({"a": 3.0, "v": 2.0}, {"a": 2.0, "v": 3.0}):
        assert ogm_coefficients(s, 0.8, "released")[0] == pytest.approx(ogm_coefficients(s, 0.8)[0])


def test_ogm_released_ge_noise_only_on_4d_with_unmodulated_std():
    model, x, y = _ogm_fixture()
    reg = md.OGM(alpha=2.6, noise=True, variant="released", seed=5)
    _, before, after = _ogm_step(reg, model, x, y)
    k = reg.coefficients["a"]
    assert k < 0.01  # strongly modulated: modulated and unmodulated std differ 100-fold
    name = "encoders.a.0.weight"
    noise = after[name] - k * before[name]
    assert noise.std().item() == pytest.approx(before[name].std().item(), rel=0.15)
    for n, g in after.items():
        if g.dim() != 4:
            torch.testing.assert_close(g, before[n], rtol=0, atol=0)
    # deterministic in (seed, step)
    reg2 = md.OGM(alpha=2.6, noise=True, variant="released", seed=5)
    _, _, again = _ogm_step(reg2, model, x, y)
    torch.testing.assert_close(again[name], after[name], rtol=0, atol=0)


# ------------------------------------------------------------------ refusals
def _model(fusion, m=2):
    torch.manual_seed(0)
    names = [f"m{i}" for i in range(m)]
    enc = {n: nn.Linear(3, 4) for n in names}
    return md.MultimodalClassifier(enc, {n: 4 for n in names}, 3, fusion=fusion)


@pytest.mark.parametrize("fusion", ["film", "gated", "sum", "wrapped"])
@pytest.mark.parametrize("cls", [md.OGM, md.OPM])
def test_released_refuses_heads_without_a_released_definition(cls, fusion):
    if fusion == "wrapped":
        net = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4), "h": nn.Linear(8, 3)})
        model = md.wrap(net, {"a": net["a"], "b": net["b"]},
                        head=lambda f: net["h"](torch.cat([f["a"], f["b"]], 1)), num_classes=3)
    else:
        model = _model(fusion)
    with pytest.raises(ValueError, match="released"):
        cls(variant="released").on_fit_start(StepContext(model=model))
    cls().on_fit_start(StepContext(model=model))  # the paper form works on every head
    for ok in ("concat", "late"):
        cls(variant="released").on_fit_start(StepContext(model=_model(ok)))


def test_released_options_are_validated_and_recorded():
    with pytest.raises(ValueError, match="conv_only"):
        md.OGM(variant="released", conv_only=False)
    with pytest.raises(ValueError, match="variant"):
        md.OGM(variant="code")
    with pytest.raises(ValueError, match="variant"):
        md.OPM(variant="Released")
    assert md.OGM(variant="released").config()["conv_only"] is True
    assert md.OGM().config() == {"alpha": 0.8, "noise": False, "start_epoch": 0,
                                 "end_epoch": None, "conv_only": False, "variant": "paper"}
    assert md.OGM(variant="released", start_epoch=3, end_epoch=3).active(3)  # inclusive
    assert not md.OGM(start_epoch=2, end_epoch=3).active(3)  # paper: end excluded
    assert md.OPM(variant="released").start_epoch == 6
    assert md.OPM().start_epoch == 0
    assert md.OPM(variant="released", start_epoch=2).start_epoch == 2
    assert md.OPM(variant="released").config()["variant"] == "released"


# ------------------------------------------------------------------ OPM fixtures
def _opm_fixture(batch=64, extra=3, seed=0, extra_v=None):
    """Concat head, C = 2, zero bias, features whose class-0 logits give every sample the true-class
    probability 0.8 (modality a) and 0.4 (modality v): rho_a = 2 exactly, q far from 0.5. Extra
    feature columns (random per sample) have zero weight: they move nothing but the expectation
    check."""
    d = 1 + extra
    dv = d if extra_v is None else 1 + extra_v
    model = md.MultimodalClassifier({"a": nn.Identity(), "v": nn.Identity()}, {"a": d, "v": dv}, 2,
                                    fusion="concat")
    with torch.no_grad():
        model.fusion.fc.weight.zero_()
        model.fusion.fc.bias.zero_()
        model.fusion.fc.weight[0, 0] = 1.0
        model.fusion.fc.weight[0, d] = 1.0
    g = torch.Generator().manual_seed(seed)
    logit = {"a": math.log(0.8 / 0.2), "v": math.log(0.4 / 0.6)}
    feats = {m: torch.cat([torch.full((batch, 1), logit[m]),
                           1 + torch.rand(batch, e, generator=g)], 1)
             for m, e in (("a", extra), ("v", dv - 1))}
    return model, feats, torch.zeros(batch, dtype=torch.long)


Q2 = 0.5 * (1 + 0.5 * math.tanh(1.0))  # q at rho = 2 (q_base = lam = 0.5): 0.6904


def _mean_over_draws(reg, model, feats, y, steps, epoch=10):
    total = {m: torch.zeros_like(f) for m, f in feats.items()}
    dropped = torch.zeros(())
    for step in range(steps):
        out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=epoch, step=step))
        for m in feats:
            total[m] += out[m]
        mask = reg.last_mask if reg.variant == "paper" else reg.last_mask[:, 0]
        dropped += (~mask).float().mean()
    return {m: t / steps for m, t in total.items()}, float(dropped / steps)


def test_opm_paper_fixture_far_from_one_drop_rate_and_expectation():
    model, feats, y = _opm_fixture()
    reg = md.OPM(p_exe=1.0)
    dominant, q, rho = reg.drop_plan(model, feats, y)
    assert dominant == "a" and rho["a"] == pytest.approx(2.0, rel=1e-5)
    assert q == pytest.approx(Q2, rel=1e-5) and abs(q - 0.5) > 0.15
    mean, drop = _mean_over_draws(reg, model, feats, y, steps=300)
    # an inverted keep-mask would drop 1 - q = 0.31 of the samples
    assert drop == pytest.approx(Q2, abs=0.02)
    # preserves expectation: mean over 300 draws of f' = f (aggregate ratio, 64 x 3 entries;
    # std of the estimate ~0.01; a missing 1/(1-q) gives 0.31, an inverted mask 2.2)
    cols = slice(1, None)
    ratio = float((mean["a"][:, cols] * feats["a"][:, cols]).sum() / feats["a"][:, cols].pow(2).sum())
    assert ratio == pytest.approx(1.0, abs=0.04)
    # per sample: every entry within 0.35 f (about 4.5 standard errors of a 300-draw mean)
    assert torch.all((mean["a"][:, cols] / feats["a"][:, cols] - 1).abs() < 0.35)
    torch.testing.assert_close(mean["v"], feats["v"])  # the other modality untouched


def test_opm_released_equals_the_oracle_and_rescales_every_modality():
    model, feats, y = _opm_fixture(batch=40, extra=3, extra_v=7)  # d = 4 and 8: theta = q / 3
    with torch.no_grad():  # a nonzero bias: the released b/2 matters for the scores
        model.fusion.fc.bias.copy_(torch.tensor([0.7, -0.4]))
        model.fusion.fc.weight[1, 2] = 0.9
    reg = md.OPM(p_exe=1.0, variant="released")
    ctx = StepContext(model=model, labels=y, epoch=6, step=3)
    out = reg.transform_features(feats, ctx)
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    q, theta, o1, o2 = oracle_opm_released(feats["a"], feats["v"], w, b, y, 0.5, 0.5, reg.last_mask)
    assert reg.last_mask.shape == (40, 2)
    assert reg._sums["q"]["a"] == pytest.approx(q[0], rel=1e-6) and q[0] > 0.5
    assert reg._sums["q"]["v"] == q[1] == 0.0
    assert reg.last_theta == pytest.approx(theta, rel=1e-6) and theta == pytest.approx(q[0] / 3)
    torch.testing.assert_close(out["a"], o1, **REL)
    torch.testing.assert_close(out["v"], o2, **REL)
    assert torch.all(reg.last_mask[:, 1])  # q = 0: never dropped
    assert not torch.all(reg.last_mask[:, 0])


def test_opm_released_expected_dominant_feature_is_047_f_vs_f_for_paper():
    # the closed form at rho = 2, equal dimensions
    theta = opm_released_theta({"a": Q2, "v": 0.0}, {"a": 512, "v": 512})
    assert theta == pytest.approx(Q2 / 2)
    assert (1 - Q2) / (1 - theta) == pytest.approx(0.4728, abs=1e-4)
    # measured on the regulators (rho = 2 exactly): released 0.47 f, paper f
    model, feats, y = _opm_fixture(batch=400, extra=1)
    rel, pap = md.OPM(p_exe=1.0, variant="released"), md.OPM(p_exe=1.0)
    m_rel, drop_rel = _mean_over_draws(rel, model, feats, y, steps=20)
    m_pap, drop_pap = _mean_over_draws(pap, model, feats, y, steps=20)
    assert drop_rel == pytest.approx(Q2, abs=0.02) and drop_pap == pytest.approx(Q2, abs=0.02)
    r_rel = float(m_rel["a"][:, 1].sum() / feats["a"][:, 1].sum())
    r_pap = float(m_pap["a"][:, 1].sum() / feats["a"][:, 1].sum())
    assert r_rel == pytest.approx(0.4728, abs=0.02)
    assert r_pap == pytest.approx(1.0, abs=0.04)
    # released also scales the other modality by 1 / (1 - theta) = 1.53; paper leaves it alone
    torch.testing.assert_close(m_rel["v"], feats["v"] / (1 - Q2 / 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_pap["v"], feats["v"])


def test_opm_released_warm_up_is_epochs_0_to_5():
    model, feats, y = _opm_fixture(batch=50)
    reg = md.OPM(p_exe=1.0, variant="released")
    for epoch in range(6):  # released: warm_up = 1 if epoch <= 5 (0-based epochs)
        out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=epoch, step=epoch))
        assert reg.last_mask is None and all(out[m] is feats[m] for m in feats)
    out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=6, step=6))
    assert reg.last_mask is not None and not torch.equal(out["v"], feats["v"])
    paper = md.OPM(p_exe=1.0)
    paper.transform_features(feats, StepContext(model=model, labels=y, epoch=0, step=0))
    assert paper.last_mask is not None  # the paper form has no warm-up


# ------------------------------------------------------------------ M > 2 continuity
def _q_released(scores, q_base=0.5, lam=0.5):
    names = list(scores)
    rho = {m: scores[m] / (sum(scores[k] for k in names if k != m) / (len(names) - 1))
           for m in names}
    return {m: opm_drop_probability(r, q_base, lam) if r > 1 else 0.0 for m, r in rho.items()}, rho


def test_coefficients_continuous_for_three_modalities_except_the_paper_jump_at_one():
    gen = torch.Generator().manual_seed(0)
    eps = 1e-7
    checked = 0
    for _ in range(300):
        s = (torch.rand(3, generator=gen) + 0.05).tolist()
        scores = dict(zip("abc", s, strict=True))
        k, rho = ogm_coefficients(scores, 0.8, "released")
        if min(abs(r - 1) for r in rho.values()) < 1e-3:
            continue  # the documented jump at rho = 1 (the paper's own rule at M = 2)
        checked += 1
        for m in "abc":
            bumped = {**scores, m: scores[m] + eps}
            k2, _ = ogm_coefficients(bumped, 0.8, "released")
            assert max(abs(k2[n] - k[n]) for n in k) < 1e-5
            assert k2 == pytest.approx(ogm_coefficients(bumped, 0.8)[0])
            q, _ = _q_released(scores)
            q2, _ = _q_released(bumped)
            assert max(abs(q2[n] - q[n]) for n in q) < 1e-5
    assert checked > 250
    # the released-OPM rule at M = 3 is the regulator's: two modalities above the mean both drop
    model = _model("concat", m=3)
    feats = {f"m{i}": torch.randn(30, 4) for i in range(3)}
    q, rho = md.OPM(variant="released").released_plan(model, feats, torch.arange(30) % 3)
    assert q == pytest.approx({m: opm_drop_probability(r, 0.5, 0.5) if r > 1 else 0.0
                               for m, r in rho.items()})
    # M = 2 reduction: exactly the two-modality rule
    k2, rho2 = ogm_coefficients({"a": 3.0, "v": 2.0}, 0.8, "released")
    assert k2 == pytest.approx({"a": 1 - math.tanh(0.8 * 1.5), "v": 1.0})


# ------------------------------------------------------------------ end to end
def test_released_variants_run_in_fit_and_refuse_film_there():
    data = md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 8, "b": 8}, seed=0)
    model = md.models.default_model(data, feature_dim=6)
    reg = md.OGM(alpha=0.8, noise=True, variant="released")
    hist = md.fit(model, data.train.loader(40, shuffle=True), epochs=1, regulator=reg,
                  progress=False)
    assert set(hist[0]["regulator"]["coefficient"]) == {"a", "b"}
    opm = md.OPM(p_exe=1.0, variant="released", start_epoch=0)
    hist = md.fit(model, data.train.loader(40, shuffle=True), epochs=1, regulator=opm,
                  progress=False)
    q = hist[0]["regulator"]["q"]
    assert set(q) == {"a", "b"} and max(q.values()) > 0.1  # some batches were modulated
    torch.manual_seed(0)
    film = md.MultimodalClassifier({"a": nn.Linear(8, 6), "b": nn.Linear(8, 6)}, {"a": 6, "b": 6},
                                   3, fusion="film")
    for bad in (md.OGM(variant="released"), md.OPM(variant="released")):
        with pytest.raises(ValueError, match="film"):
            md.fit(film, data.train.loader(40), epochs=1, regulator=bad, progress=False)


def _opm_plan_for_scores(scores):
    """Drop probabilities of the paper form for given true-class probability sums (M = 3)."""
    reg = md.OPM()
    names = list(scores)

    class Uni:
        modalities = tuple(names)

        def unimodal_logits(self, features):
            return features

    labels = torch.zeros(1, dtype=torch.long)
    # logits whose softmax true-class probability is exactly s: [log s, log(1 - s)]
    feats = {m: torch.tensor([[math.log(s), math.log(1 - s)]]) for m, s in scores.items()}
    q, rho = reg.drop_probabilities(Uni(), feats, labels)
    return q, rho


def test_opm_paper_m3_leaders_are_continuous_and_m2_is_the_paper():
    q1, _ = _opm_plan_for_scores({"a": 0.60, "b": 0.59, "c": 0.10})
    q2, _ = _opm_plan_for_scores({"a": 0.59, "b": 0.60, "c": 0.10})
    assert q1["a"] == pytest.approx(0.657, abs=1e-3) and q1["b"] == pytest.approx(0.649, abs=1e-3)
    assert q1["c"] == 0.0
    # a 0.01 swap of the two leaders moves each q by < 0.01 (it used to jump 0.657 -> 0)
    assert abs(q1["a"] - q2["a"]) < 0.01 and abs(q1["b"] - q2["b"]) < 0.01
    # M = 2: only the dominant modality has q > 0, equal to the paper's formula
    q, rho = _opm_plan_for_scores({"a": 0.8, "b": 0.4})
    assert q["b"] == 0.0
    assert q["a"] == pytest.approx(md.regulators.opm_drop_probability(rho["a"], 0.5, 0.5), rel=1e-6)
