"""MMCosine (R9), MBSD (R10) and LFM (R12) against hand-computed closed forms on fixed batches,
plus M = 3, gated heads, resume, logging, Lightning and argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import modaldiag as md
from modaldiag.models.fusion import CosineFusion
from modaldiag.regulators import lfm_alignment, lfm_fitted_alpha, mbsd_pair_terms, nce_loss
from modaldiag.training.callbacks import StepContext

RTOL, ATOL = 1e-4, 1e-5


def _ctx(model, x, y, epoch=0):
    ctx = StepContext(model=model, epoch=epoch, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, y)
    return ctx


@pytest.fixture(scope="module")
def tiny3():
    return md.datasets.synthetic(n_samples=96, num_classes=3,
                                 strength={"a": 2.0, "b": 0.5, "c": 1.0},
                                 dims={"a": 6, "b": 5, "c": 4}, seed=0)


def _fit(data, reg, fusion="gated", epochs=2, **kw):
    torch.manual_seed(0)
    model = md.models.default_model(data, fusion=fusion, feature_dim=4)
    hist = md.fit(model, data.train.loader(32, shuffle=True), data.val.loader(64), epochs=epochs,
                  regulator=reg, progress=False, seed=0, **kw)
    return model, hist


# ================================================================ MMCosine (R9)
def _r9_head():
    head = CosineFusion({"a": 2, "v": 2}, 2, scale=10.0)
    with torch.no_grad():
        head.weights["a"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.weights["v"].weight.copy_(torch.tensor([[0.0, 3.0], [1.0, 0.0]]))
    return head, {"a": torch.tensor([[1.0, 0.0]]), "v": torch.tensor([[1.0, 1.0]])}


def test_cosine_head_closed_form_r9():
    head, f = _r9_head()
    z = head(f)
    torch.testing.assert_close(z, torch.tensor([[10 + 10 / math.sqrt(2), 10 / math.sqrt(2)]]))
    assert z[0, 0].item() == pytest.approx(17.071, abs=1e-3)
    assert z[0, 1].item() == pytest.approx(7.071, abs=1e-3)
    ce = F.cross_entropy(z, torch.tensor([0]))
    assert ce.item() == pytest.approx(math.log1p(math.exp(-10)), rel=1e-3)  # 4.54e-5
    # the weights' norms do not matter, only their directions; the scale multiplies everything
    with torch.no_grad():
        head.weights["v"].weight.mul_(7.0)
    torch.testing.assert_close(head(f), z)
    head.scale = 15.0
    torch.testing.assert_close(head(f), z * 1.5)


def test_cosine_head_in_a_model_absence_and_coalitions():
    model = make_model(3, "cosine")
    x = make_inputs(model, batch=5)
    f = model.encode(x)
    model.check_absence(f)  # absent modalities really drop out
    uni = model.unimodal_logits(f)
    head = model.fusion
    for m in model.modalities:  # zero baseline: s * cos(f_m, W_m) only
        expected = head.scale * F.normalize(f[m], dim=1) @ F.normalize(head.weights[m].weight, dim=1).T
        torch.testing.assert_close(uni[m], expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(model.head(f, present=(m,)), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(sum(uni.values()), model.head(f), rtol=RTOL, atol=ATOL)
    masks = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    fast = model.head_coalitions(f, masks)
    for k, row in enumerate(masks):
        present = [m for m, keep in zip(model.modalities, row, strict=True) if keep]
        torch.testing.assert_close(fast[k], model.head(f, present=present), rtol=RTOL, atol=ATOL)
    assert torch.equal(fast[1], torch.zeros_like(fast[1]))  # no modality: all-zero logits
    assert "cosine" in md.models.FUSIONS


def test_cosine_head_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        CosineFusion({"a": 2, "b": 2}, 3, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        CosineFusion({"a": 2, "b": 2}, 3, scale=float("nan"))
    head = CosineFusion({"a": 2, "b": 2}, 3, scale=15.0)
    with pytest.raises(ValueError, match="scale"):
        head.scale = -1.0
    # the scale is part of the model: saved and restored with its state_dict
    other = CosineFusion({"a": 2, "b": 2}, 3)
    other.load_state_dict(head.state_dict())
    assert other.scale == 15.0 and "s" in head.state_dict()


def test_nce_closed_forms():
    f = torch.eye(2)
    y = torch.tensor([0, 1])
    # cos = I, tau = 1: q_ii = e/(e+1), positives and negatives each give log(1 + 1/e)
    assert nce_loss(f, f, y, temperature=1.0).item() == pytest.approx(2 * math.log1p(math.exp(-1)),
                                                                      rel=1e-5)
    # one class only: no negatives (the released code divides by zero there) -> positive part only
    same = nce_loss(f, f, torch.tensor([0, 0]), temperature=1.0)
    q_pos, q_neg = math.e / (math.e + 1), 1 / (math.e + 1)
    assert same.item() == pytest.approx(0.5 * (-math.log(q_pos) - math.log(q_neg)), rel=1e-5)
    with pytest.raises(ValueError, match="equal"):
        nce_loss(torch.ones(2, 3), torch.ones(2, 4), y)


def test_mmcosine_form_head_refuses_other_heads_with_a_recipe(tiny3):
    for fusion in ("gated", "concat"):
        with pytest.raises(ValueError, match="fusion='cosine'.*form='auxiliary'"):
            _fit(tiny3, md.MMCosine(form="head"), fusion=fusion, epochs=1)
    # on the cosine head the scale is the head's and no auxiliary weight applies
    cos = make_model(2, "cosine")
    ctx = _ctx(cos, make_inputs(cos), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="model.fusion.scale"):
        md.MMCosine(scale=15.0).on_fit_start(ctx)
    with pytest.raises(ValueError, match="weight"):
        md.MMCosine(weight=2.0).on_fit_start(ctx)
    md.MMCosine(scale=10.0, weight=1.0).on_fit_start(ctx)  # the head's own values: accepted
    assert md.MMCosine().resolved_form(cos) == "head"
    assert md.MMCosine().resolved_form(make_model(2, "gated")) == "auxiliary"
    assert md.MMCosine(form="auxiliary").resolved_form(cos) == "auxiliary"


def test_cosine_logits_closed_form_r9():
    feats = {"a": torch.tensor([[1.0, 0.0]]), "v": torch.tensor([[1.0, 1.0]])}
    w = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "v": torch.tensor([[0.0, 3.0], [1.0, 0.0]])}
    z = md.regulators.mmcosine.cosine_logits(feats, w, 10.0)
    torch.testing.assert_close(z, torch.tensor([[10 + 10 / math.sqrt(2), 10 / math.sqrt(2)]]))
    head, f = _r9_head()  # the same function as the cosine head
    torch.testing.assert_close(z, head(f))


def test_mmcosine_auxiliary_loss_by_hand_three_modalities():
    model = make_model(3, "gated")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    reg = md.MMCosine(scale=7.0, weight=0.5, seed=4)
    ctx = _ctx(model, x, y)
    reg.on_fit_start(ctx)
    w = reg.weights
    assert {m: tuple(t.shape) for m, t in w.items()} == {"m0": (3, 4), "m1": (3, 5), "m2": (3, 6)}
    for t in w.values():  # nn.Linear's law, from the seed, without the global RNG
        assert t.requires_grad and float(t.detach().abs().max()) <= 1 / math.sqrt(t.shape[1])
    other = md.MMCosine(seed=4)
    other.on_fit_start(_ctx(model, x, y))
    assert all(torch.equal(w[m], other.weights[m]) for m in w)
    reg.on_after_forward(ctx)
    f = ctx.features
    z = torch.zeros(8, 3)
    for m in model.modalities:  # cos(u, w) = <u, w> / (|u| |w|), written out
        wm = w[m].detach()
        z = z + (f[m] @ wm.T) / (f[m].norm(dim=1, keepdim=True) * wm.norm(dim=1)[None, :])
    expected = 0.5 * F.cross_entropy(7.0 * z, y)
    torch.testing.assert_close(ctx.losses["mmcosine/auxiliary"], expected, rtol=RTOL, atol=ATOL)
    # invariant to the norms of W_m; the head gets no gradient from it, every encoder and W_m do
    with torch.no_grad():
        w["m1"].mul_(9.0)
    ctx2 = _ctx(model, x, y)
    reg.on_after_forward(ctx2)
    aux = ctx2.losses["mmcosine/auxiliary"]
    torch.testing.assert_close(aux, expected, rtol=RTOL, atol=ATOL)
    head = list(model.fusion.parameters())
    enc = [next(model.encoders[m].parameters()) for m in model.modalities]
    grads = torch.autograd.grad(aux, head + enc + reg.owned_parameters(), allow_unused=True)
    assert all(g is None for g in grads[:len(head)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(head):])
    reg.on_train_epoch_end(ctx2)
    logs = reg.collect_logs()
    assert logs["scale"] == 7.0 and logs["weight"] == 0.5
    # the unweighted CE, the same at both steps (W_m's norm does not matter)
    assert logs["auxiliary_ce"] == pytest.approx(float(F.cross_entropy(7.0 * z.detach(), y)),
                                                 rel=1e-5)
    for m in model.modalities:
        cos = F.normalize(f[m].detach(), dim=1) @ F.normalize(w[m].detach(), dim=1).T
        assert logs["true_cosine"][m] == pytest.approx(float(cos.gather(1, y[:, None]).mean()),
                                                       rel=1e-5)
        assert logs["weight_norm"][m] == pytest.approx(float(w[m].detach().norm(dim=1).mean()),
                                                       rel=1e-5)


def test_mmcosine_fit_gated_three_modalities_defaults_trains_its_weights(tiny3):
    torch.manual_seed(0)
    model = md.models.default_model(tiny3, fusion="gated", feature_dim=4)
    before = md.MMCosine()
    before.on_fit_start(StepContext(model=model))
    init = {m: t.detach().clone() for m, t in before.weights.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reg = md.MMCosine()
    hist = md.fit(model, tiny3.train.loader(32, shuffle=True), tiny3.val.loader(64), epochs=2,
                  optimizer=opt, regulator=reg, progress=False, seed=0)
    rec = hist.epochs[-1]["regulator"]
    assert set(rec["true_cosine"]) == set(rec["weight_norm"]) == {"a", "b", "c"}
    assert rec["scale"] == 10.0 and rec["weight"] == 1.0 and math.isfinite(rec["auxiliary_ce"])
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(any(p is w for p in held) for w in reg.owned_parameters())
    assert all(not torch.equal(init[m], reg.weights[m].detach()) for m in init)
    assert isinstance(model.fusion, md.models.fusion.GatedFusion)  # the head still predicts


def test_mmcosine_wrapped_model_sizes_its_weights_from_a_batch(tiny3):
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 4), "b": torch.nn.Linear(5, 3),
                               "c": torch.nn.Linear(4, 2), "fc": torch.nn.Linear(9, 3)})
    model = md.wrap(net, encoders={m: net[m] for m in "abc"},
                    head=lambda f: net["fc"](torch.cat([f["a"], f["b"], f["c"]], 1)), num_classes=3)
    reg = md.MMCosine()
    hist = md.fit(model, tiny3.train.loader(32), tiny3.val.loader(64), epochs=1, regulator=reg,
                  progress=False, seed=0)
    assert {m: tuple(w.shape) for m, w in reg.weights.items()} == {
        "a": (3, 4), "b": (3, 3), "c": (3, 2)}
    assert "auxiliary_ce" in hist.epochs[-1]["regulator"]


def test_mmcosine_auxiliary_resume_is_exact_and_plain_loop_equals_fit(tiny3, tmp_path):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(tiny3, fusion="gated", feature_dim=4)
        reg = md.MMCosine(lam=0.1)
        md.fit(model, tiny3.train.loader(32, shuffle=True), tiny3.val.loader(64), epochs=epochs,
               regulator=reg, checkpoint_dir=ckpt, resume=resume, restore_best=False,
               progress=False, seed=3)
        return model, reg

    full, reg_full = run(3, tmp_path / "full", False)
    run(1, tmp_path / "split", False)
    resumed, reg_res = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert all(torch.equal(reg_full.weights[m], reg_res.weights[m]) for m in reg_full.weights)
    saved = reg_res.state_dict()["weights"]
    assert all(torch.equal(saved[m], reg_res.weights[m]) for m in saved)
    with pytest.raises(ValueError, match="form='head'"):
        md.MMCosine(form="head").load_state_dict(reg_res.state_dict())

    def model():
        torch.manual_seed(0)
        return md.models.default_model(tiny3, fusion="gated", feature_dim=4)

    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    reg_fit = md.MMCosine()
    md.fit(ref, tiny3.train.loader(32), tiny3.val.loader(16), epochs=1, optimizer=opt,
           regulator=reg_fit, seed=None, progress=False, restore_best=False)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    reg_loop = md.MMCosine()
    run_ = md.Regulation(net, opt, reg_loop)
    for inputs, labels in run_.epoch_start(0, tiny3.train.loader(32)):
        opt.zero_grad()
        run_.backward(inputs, labels)
        opt.step()
    run_.epoch_end()
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for m in reg_fit.weights:
        torch.testing.assert_close(reg_fit.weights[m], reg_loop.weights[m], rtol=1e-6, atol=1e-6)


def test_mmcosine_auxiliary_lightning(tiny3):
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    torch.manual_seed(0)
    model = md.models.default_model(tiny3, fusion="gated", feature_dim=4)
    reg = md.MMCosine()
    cb = ModalDiagCallback(reg, monitor=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(ModalDiagModule(model, lr=0.05), tiny3.train.loader(32))
    held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert all(any(p is w for p in held) for w in reg.owned_parameters())
    init = md.MMCosine()
    init.on_fit_start(StepContext(model=model))
    assert all(not torch.equal(init.weights[m], reg.weights[m].detach()) for m in init.weights)
    assert "auxiliary_ce" in cb.logs[-1]["regulator"]


def test_mmcosine_logs_and_contrastive_term_by_hand():
    torch.manual_seed(0)  # lam > 0 needs equal feature widths
    enc = {n: md.models.MLPEncoder(5, 4, hidden=(8,)) for n in ("a", "b", "c")}
    model = md.MultimodalClassifier(enc, {n: 4 for n in enc}, 3, fusion="cosine")
    x = {n: torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(enc)}
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    reg = md.MMCosine(lam=0.3, temperature=0.2)
    ctx = _ctx(model, x, y)
    reg.on_after_forward(ctx)
    f = ctx.features
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    expected = 0.3 * sum(nce_loss(f[a], f[b], y, 0.2) for a, b in pairs) / 3
    torch.testing.assert_close(ctx.losses["mmcosine/nce"], expected)
    reg.on_train_epoch_end(ctx)
    logs = reg.collect_logs()
    cos = {m: c.detach() for m, c in model.fusion.cosines(f).items()}
    for m in enc:
        assert logs["true_cosine"][m] == pytest.approx(float(cos[m].gather(1, y[:, None]).mean()),
                                                       rel=1e-5)
        w = model.fusion.weights[m].weight.detach()
        assert logs["weight_norm"][m] == pytest.approx(float(w.norm(dim=1).mean()), rel=1e-5)
    assert logs["scale"] == 10.0 and set(logs["nce"]) == {"a|b", "a|c", "b|c"}
    # lam > 0 with unequal widths is refused at the start of training
    with pytest.raises(ValueError, match="equal width"):
        md.MMCosine(lam=0.1).on_fit_start(_ctx(make_model(2, "cosine"), make_inputs(make_model(2, "cosine")),
                                             torch.zeros(6, dtype=torch.long)))


def test_mmcosine_fit_three_modalities_defaults(tiny3):
    model, hist = _fit(tiny3, md.MMCosine(), fusion="cosine")
    rec = hist.epochs[-1]["regulator"]
    assert set(rec["true_cosine"]) == {"a", "b", "c"} and rec["scale"] == 10.0
    assert isinstance(model.fusion, CosineFusion)


# ================================================================ MBSD (R10)
def test_mbsd_pair_terms_closed_form_r10():
    z_a = torch.tensor([[math.log(9.0), 0.0]])  # p_a = (0.9, 0.1)
    z_v = torch.tensor([[math.log(1.5), 0.0]])  # p_v = (0.6, 0.4)
    y = torch.tensor([0])
    gate, rs, kd = mbsd_pair_terms(z_a, z_v, y)
    assert gate.item() == pytest.approx(0.3, rel=RTOL)
    assert rs.item() == pytest.approx(1.6052, abs=1e-4)
    assert kd.item() == pytest.approx(0.22629, abs=1e-5)
    assert (gate * rs).item() == pytest.approx(0.4816, abs=1e-4)
    assert (gate * kd).item() == pytest.approx(0.06789, abs=1e-5)
    g2, _, kd2 = mbsd_pair_terms(z_v, z_a, y)  # symmetric in the pair order
    assert g2.item() == pytest.approx(0.3) and kd2.item() == pytest.approx(0.22629, abs=1e-5)
    gate_r, _, kd_r = mbsd_pair_terms(z_a, z_v, y, variant="released")
    assert kd_r.item() == pytest.approx(-0.8465, abs=1e-4)
    assert (gate_r * kd_r).item() == pytest.approx(-0.2539, abs=1e-4)
    _, rs_p, _ = mbsd_pair_terms(z_a, z_v, y, rs_on="probs")
    assert rs_p.item() == pytest.approx((0.3 ** 2 + 0.3 ** 2) / 2, rel=RTOL)


def test_mbsd_gate_and_gradients():
    y = torch.tensor([0])
    # both unimodal predictions wrong: no distillation at all
    gate, _, _ = mbsd_pair_terms(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]), y)
    assert gate.item() == 0.0
    # paper: the gate is a constant and KD pulls only the weak modality
    z_a = torch.tensor([[math.log(9.0), 0.0]], requires_grad=True)
    z_v = torch.tensor([[math.log(1.5), 0.0]], requires_grad=True)
    gate, rs, kd = mbsd_pair_terms(z_a, z_v, y)
    assert not gate.requires_grad
    ga, gv = torch.autograd.grad(kd.sum(), (z_a, z_v))
    assert torch.equal(ga, torch.zeros_like(ga)) and gv.abs().sum() > 0
    # released: the gate carries gradient (written in place into fresh tensors)
    gate_r, _, _ = mbsd_pair_terms(z_a, z_v, y, variant="released")
    assert gate_r.requires_grad


def test_mbsd_loss_terms_three_modalities_and_pair_mean():
    model = make_model(3, "gated")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    reg = md.MBSD()
    ctx = _ctx(model, x, y)
    reg.on_after_forward(ctx)
    uni = model.unimodal_logits(ctx.features)
    for m in model.modalities:
        torch.testing.assert_close(ctx.losses[f"mbsd/unimodal/{m}"], F.cross_entropy(uni[m], y))
    pairs = [("m0", "m1"), ("m0", "m2"), ("m1", "m2")]
    terms = []
    for a, b in pairs:
        g, rs, kd = mbsd_pair_terms(uni[a], uni[b], y)
        terms.append((g * (rs + kd)).mean())
    torch.testing.assert_close(ctx.losses["mbsd/distill"], sum(terms) / 3, rtol=RTOL, atol=ATOL)
    # M = 2 is the single pair (no mean over anything else)
    model2 = make_model(2, "gated")
    ctx2 = _ctx(model2, make_inputs(model2, batch=8), y)
    md.MBSD().on_after_forward(ctx2)
    u2 = model2.unimodal_logits(ctx2.features)
    g, rs, kd = mbsd_pair_terms(u2["m0"], u2["m1"], y)
    torch.testing.assert_close(ctx2.losses["mbsd/distill"], (g * (rs + kd)).mean())
    # continuity of the M > 2 rule: a tiny change of one modality's logits moves the loss by a
    # tiny amount (a pair mean, no selection of "the" dominant modality)
    bumped = dict(uni)
    bumped["m2"] = uni["m2"] + 1e-4
    terms_b = [(g * (rs + kd)).mean() for g, rs, kd in
               (mbsd_pair_terms(bumped[a], bumped[b], y) for a, b in pairs)]
    assert abs(float(sum(terms_b) / 3 - sum(terms) / 3)) < 1e-3


def test_mbsd_window_and_logs():
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    reg = md.MBSD(start_epoch=1, end_epoch=3)
    ctx = _ctx(model, x, y, epoch=0)
    reg.on_after_forward(ctx)
    assert set(ctx.losses) == {"multimodal"}
    assert reg.active(1) and reg.active(2) and not reg.active(3)
    released = md.MBSD(start_epoch=1, end_epoch=3, variant="released")
    assert released.active(3) and not released.active(4)  # inclusive end, as released
    ctx = _ctx(model, x, y, epoch=2)
    reg.on_after_forward(ctx)
    reg.on_train_epoch_end(ctx)
    logs = reg.collect_logs()
    assert set(logs) == {"gate", "rs", "kd", "term", "unimodal_ce", "active"}
    uni = model.unimodal_logits(ctx.features)
    g, rs, kd = mbsd_pair_terms(uni["m0"], uni["m1"], y)
    assert logs["gate"]["m0|m1"] == pytest.approx(float(g.mean()), rel=1e-5, abs=1e-7)
    assert logs["kd"]["m0|m1"] == pytest.approx(float(kd.mean()), rel=1e-5, abs=1e-7)
    assert logs["active"] is True


def test_mbsd_released_uses_the_concat_slices_and_refuses_other_heads(tiny3):
    model = make_model(2, "concat")
    with torch.no_grad():
        model.fusion.fc.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    ctx = _ctx(model, x, y)
    md.MBSD(variant="released").on_after_forward(ctx)
    w = model.fusion.fc.weight
    d0 = model.feature_dims["m0"]
    z0 = ctx.features["m0"] @ w[:, :d0].T + model.fusion.fc.bias / 2
    torch.testing.assert_close(ctx.losses["mbsd/unimodal/m0"], F.cross_entropy(z0, y))
    with pytest.raises(ValueError, match="MBSD"):
        _fit(tiny3, md.MBSD(variant="released"), fusion="gated", epochs=1)


def test_mbsd_fit_gated_three_modalities_defaults(tiny3):
    _, hist = _fit(tiny3, md.MBSD())
    rec = hist.epochs[-1]["regulator"]
    assert set(rec["gate"]) == {"a|b", "a|c", "b|c"} and set(rec["unimodal_ce"]) == {"a", "b", "c"}


# ================================================================ LFM (R12)
def test_lfm_alignment_closed_form_r12():
    z_p = torch.tensor([[0.0, 0.0]])              # p = (0.5, 0.5)
    z_q = torch.tensor([[math.log(9.0), 0.0]])    # q = (0.9, 0.1)
    assert lfm_alignment(z_p, z_q).item() == pytest.approx(0.11797, abs=1e-5)
    assert lfm_alignment(z_p, z_q, "js").item() == pytest.approx(0.10175, abs=1e-5)
    assert lfm_alignment(z_q, z_p).item() == pytest.approx(0.11797, abs=1e-5)  # symmetric
    assert lfm_alignment(z_q, z_q).item() == pytest.approx(0.0, abs=1e-7)
    # batch mean of per-sample sums over classes (BalanceBenchmark's "batchmean")
    both = lfm_alignment(torch.cat([z_p, z_q]), torch.cat([z_q, z_q]))
    assert both.item() == pytest.approx(0.11797 / 2, abs=1e-5)


def test_lfm_fitted_schedule():
    for epoch, value in ((0, 0.2046), (30, 0.354), (100, 0.539), (200, 0.902)):
        assert lfm_fitted_alpha(epoch) == pytest.approx(value, abs=1e-3)
    assert lfm_fitted_alpha(183, clip=False) == pytest.approx(1.0105, abs=1e-3)
    assert lfm_fitted_alpha(183) == 0.95 and lfm_fitted_alpha(250) == 0.05  # paper: clipped
    assert lfm_fitted_alpha(250, clip=False) < -2  # released: the raw polynomial


def test_lfm_loss_is_twice_the_weighted_sum_three_modalities():
    model = make_model(3, "gated")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    reg = md.LFM()
    ctx = _ctx(model, x, y, epoch=30)
    reg.on_train_epoch_start(ctx)
    assert reg.alpha_c == pytest.approx(0.354, abs=1e-3)
    reg.on_after_forward(ctx)
    uni = model.unimodal_logits(ctx.features)
    a_mean = sum(lfm_alignment(uni[a], uni[b]) for a, b in
                 (("m0", "m1"), ("m0", "m2"), ("m1", "m2"))) / 3
    ce = F.cross_entropy(ctx.logits, y)
    expected = 2 * (reg.alpha_c * ce + (1 - reg.alpha_c) * a_mean)
    torch.testing.assert_close(sum(ctx.losses.values()), expected, rtol=RTOL, atol=ATOL)
    logs = reg.collect_logs()
    assert logs["alpha_c"] == pytest.approx(reg.alpha_c) and logs["alpha_a"] == pytest.approx(
        1 - reg.alpha_c)


def _flat_grad(model, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(), params)])


def test_lfm_learnable_hypergradient_against_finite_differences():
    torch.manual_seed(0)
    model = make_model(2, "gated").double()
    x = {m: v.double() for m, v in make_inputs(model, batch=8).items()}
    y = torch.arange(8) % 3
    val = [(x, y)]
    reg = md.LFM(schedule="learnable", val_loader=val, held_out=1.0, h_over="all", lr_alpha=50.0)
    params = [p for p in model.parameters() if p.requires_grad]
    alpha_c = reg.alpha_c

    def losses():
        f = model.encode(x)
        ce = F.cross_entropy(model.head(f), y)
        uni = model.unimodal_logits(f)
        return ce, lfm_alignment(uni["m0"], uni["m1"])

    def total():
        ce, a = losses()
        return alpha_c * ce + (1 - alpha_c) * a

    g_ce = _flat_grad(model, lambda: losses()[0]).detach()
    eps = 1e-5
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    torch.nn.utils.vector_to_parameters(theta + eps * g_ce, params)
    up = _flat_grad(model, total)
    torch.nn.utils.vector_to_parameters(theta - eps * g_ce, params)
    down = _flat_grad(model, total)
    torch.nn.utils.vector_to_parameters(theta, params)
    hv = (up - down) / (2 * eps)
    ctx = StepContext(model=model, epoch=0)
    h = reg.hypergradient(ctx)
    assert h == pytest.approx(float(hv.mean()), rel=1e-4, abs=1e-9)
    first = md.LFM(schedule="learnable", val_loader=val, held_out=1.0)  # h over the first tensor
    n0 = params[0].numel()
    assert first.hypergradient(ctx) == pytest.approx(float(hv[:n0].mean()), rel=1e-4, abs=1e-9)
    # the update: alpha_a <- clip(alpha_a - eta h, 0.05, 0.95); eta halves at epochs 20, 40, ...
    reg.on_train_epoch_start(StepContext(model=model, epoch=0))
    assert 1 - reg.alpha_c == pytest.approx(min(0.95, max(0.05, 0.95 - 50.0 * h)), rel=1e-6)
    assert reg.lr_alpha == 50.0
    reg.on_train_epoch_start(StepContext(model=model, epoch=20))
    assert reg.lr_alpha == 25.0
    # a pure measurement: no parameter, gradient or buffer changed
    assert all(p.grad is None for p in params)


def test_lfm_learnable_needs_validation_data(tiny3):
    torch.manual_seed(0)
    model = md.models.default_model(tiny3, fusion="gated", feature_dim=4)
    with pytest.raises(ValueError, match="val_loader"):
        md.fit(model, tiny3.train.loader(32), epochs=1, regulator=md.LFM(schedule="learnable"),
               progress=False)
    # given explicitly, it works without md.fit's val_loader (e.g. under Lightning)
    reg = md.LFM(schedule="learnable", val_loader=tiny3.val.loader(16))
    hist = md.fit(model, tiny3.train.loader(32), epochs=2, regulator=reg, progress=False)
    rec = hist.epochs[-1]["regulator"]
    assert {"alpha_c", "alpha_a", "h", "lr_alpha", "alignment", "ce"} <= set(rec)


def test_lfm_fit_gated_three_modalities_defaults(tiny3):
    _, hist = _fit(tiny3, md.LFM())
    rec = hist.epochs[-1]["regulator"]
    assert rec["alpha_c"] == pytest.approx(lfm_fitted_alpha(1))


def test_lfm_released_logits_and_refusal(tiny3):
    model = make_model(2, "late")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    ctx = _ctx(model, x, y)
    reg = md.LFM(variant="released")
    reg.on_train_epoch_start(ctx)
    reg.on_after_forward(ctx)
    heads = model.fusion.heads
    a = lfm_alignment(heads["m0"](ctx.features["m0"]), heads["m1"](ctx.features["m1"]))
    torch.testing.assert_close(ctx.losses["lfm/alignment"], 2 * (1 - reg.alpha_c) * a)
    with pytest.raises(ValueError, match="LFM"):
        _fit(tiny3, md.LFM(variant="released"), fusion="gated", epochs=1)


# ================================================================ all three
MAKERS = {
    "mmcosine": (lambda: md.MMCosine(), "cosine"),
    "mbsd": (lambda: md.MBSD(), "gated"),
    "lfm-learnable": (lambda: md.LFM(schedule="learnable", lr_alpha=1e3, h_over="all"), "gated"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_resumed_run_ends_with_identical_weights(tiny3, tmp_path, name):
    make, fusion = MAKERS[name]

    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(tiny3, fusion=fusion, feature_dim=4)
        reg = make()
        hist = md.fit(model, tiny3.train.loader(32, shuffle=True), tiny3.val.loader(64),
                      epochs=epochs, regulator=reg, checkpoint_dir=ckpt, resume=resume,
                      restore_best=False, progress=False, seed=3)
        return model, reg, hist

    full, reg_full, _ = run(4, tmp_path / "full", False)
    run(2, tmp_path / "split", False)
    resumed, reg_res, _ = run(4, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert reg_full.state_dict() == reg_res.state_dict()


def test_lightning_smoke(tiny3):
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    for make, fusion in ((lambda: md.MMCosine(), "cosine"), (lambda: md.MBSD(), "gated"),
                         (lambda: md.LFM(schedule="learnable", val_loader=tiny3.val.loader(16)),
                          "gated")):
        torch.manual_seed(0)
        model = md.models.default_model(tiny3, fusion=fusion, feature_dim=4)
        cb = ModalDiagCallback(make(), monitor=False)
        trainer = pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(ModalDiagModule(model), tiny3.train.loader(32))
        assert len(cb.logs) == 2 and cb.logs[-1]["regulator"]


@pytest.mark.parametrize("make, arg", [
    (lambda: md.MMCosine(lam=-1.0), "lam"),
    (lambda: md.MMCosine(temperature=0.0), "temperature"),
    (lambda: md.MMCosine(form="gated"), "form"),
    (lambda: md.MMCosine(scale=0.0), "scale"),
    (lambda: md.MMCosine(weight=-1.0), "weight"),
    (lambda: md.MMCosine(seed=-1), "seed"),
    (lambda: md.MBSD(start_epoch=-1), "start_epoch"),
    (lambda: md.MBSD(start_epoch=3, end_epoch=3), "end_epoch"),
    (lambda: md.MBSD(variant="bb"), "variant"),
    (lambda: md.LFM(schedule="heuristic"), "schedule"),
    (lambda: md.LFM(alignment="kl"), "alignment"),
    (lambda: md.LFM(alpha_init=1.0), "alpha_init"),
    (lambda: md.LFM(lr_alpha=0.0), "lr_alpha"),
    (lambda: md.LFM(halve_every=0), "halve_every"),
    (lambda: md.LFM(held_out=0.0), "held_out"),
    (lambda: md.LFM(h_over="last"), "h_over"),
    (lambda: md.LFM(val_loader=3), "val_loader"),
])
def test_bad_arguments_are_rejected(make, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        make()


@pytest.mark.parametrize("name", list(MAKERS))
def test_plain_loop_equals_fit(tiny3, name):
    """md.Regulation's four-line loop trains exactly as md.fit (the learnable LFM gets its
    held-out data from ``run.start(val_loader=...)``)."""
    make, fusion = MAKERS[name]

    def model():
        torch.manual_seed(0)
        return md.models.default_model(tiny3, fusion=fusion, feature_dim=4)

    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    md.fit(ref, tiny3.train.loader(32), tiny3.val.loader(16), epochs=2, optimizer=opt,
           regulator=make(), seed=None, progress=False, restore_best=False)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run = md.Regulation(net, opt, make(), monitor=True)
    run.start(val_loader=tiny3.val.loader(16))
    for epoch in range(2):
        for inputs, labels in run.epoch_start(epoch, tiny3.train.loader(32)):
            opt.zero_grad()
            run.backward(inputs, labels)
            opt.step()
        run.epoch_end()
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
