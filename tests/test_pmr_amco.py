"""PMR (R8) and AMCo (R14): closed forms on fixed batches, the M = 2 reduction and M > 2 rules,
prototype bookkeeping, masks, the regulator-owned fusion map, exact resume, logging, md.fit /
md.Regulation / Lightning, argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.regulators.amco import AMCo, amco_schedule, joint_softmax_mass
from modaldiag.regulators.pmr import PMR, pmr_coefficients, prototype_log_probs
from modaldiag.training.callbacks import StepContext

RTOL, ATOL = 1e-4, 1e-5


def identity_model(dims=(1, 1), num_classes=2, fusion="concat"):
    """Encoders are identities: features = inputs (so prototypes are plain class means)."""
    names = [f"m{i}" for i in range(len(dims))]
    torch.manual_seed(0)
    return md.MultimodalClassifier({n: nn.Identity() for n in names},
                                   {n: d for n, d in zip(names, dims, strict=True)},
                                   num_classes, fusion=fusion)


@pytest.fixture(scope="module")
def tiny():
    return md.datasets.synthetic(n_samples=240, num_classes=3, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 6, "b": 6}, seed=0)


@pytest.fixture(scope="module")
def tiny3():
    return md.datasets.synthetic(n_samples=240, num_classes=3,
                                 strength={"a": 2.5, "b": 0.6, "c": 1.0},
                                 dims={"a": 6, "b": 6, "c": 6}, seed=0)


# ====================================================================== PMR
def _pmr_ctx(features, labels, model, epoch=0):
    return StepContext(model=model, epoch=epoch, features=features, labels=labels, losses={})


def test_pmr_r8_closed_form_through_the_regulator():
    """METHODS-2 R8: d = 1, C = 2, c_0 = 0, c_1 = 2; f_a = 0, f_v = 1, y = 0 -> q_a = (0.8808,
    0.1192), q_v = (0.5, 0.5), rho_a = 1.7616 -> beta_a = 0, beta_v = alpha; added loss alpha ln 2."""
    protos = torch.tensor([[0.0], [2.0]])
    lq_a = prototype_log_probs(torch.tensor([[0.0]]), protos)
    lq_v = prototype_log_probs(torch.tensor([[1.0]]), protos)
    torch.testing.assert_close(lq_a.exp(), torch.tensor([[0.8808, 0.1192]]), rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(lq_v.exp(), torch.tensor([[0.5, 0.5]]), rtol=RTOL, atol=ATOL)

    model = identity_model()
    reg = PMR(alpha=1.5)
    reg.prototypes = {"m0": protos.clone(), "m1": protos.clone()}
    reg.seen = torch.tensor([True, True])
    f_v = torch.tensor([[1.0]], requires_grad=True)
    ctx = _pmr_ctx({"m0": torch.tensor([[0.0]]), "m1": f_v}, torch.tensor([0]), model)
    reg.on_after_forward(ctx)
    assert set(ctx.losses) == {"pmr/m1"}  # only the slow modality is accelerated
    torch.testing.assert_close(ctx.losses["pmr/m1"], torch.tensor(1.5 * math.log(2)),
                               rtol=RTOL, atol=ATOL)
    logs = reg.collect_logs()
    assert logs["rho"]["m0"] == pytest.approx(1.7616, rel=1e-4)
    assert logs["beta"] == {"m0": 0.0, "m1": 1.5}
    assert logs["pce"]["m1"] == pytest.approx(math.log(2), rel=1e-5)
    # the gradient reaches the feature (prototypes are constants): d/df -log q_0 at f = 1
    ctx.losses["pmr/m1"].backward()
    # q_0 = q_1 = 1/2, d_0 = f, d_1 = 2 - f: d(-log q_0)/df = (1 - q_0) * 1 + q_1 * 1 = 1 -> * 1.5
    torch.testing.assert_close(f_v.grad, torch.tensor([[1.5]]), rtol=RTOL, atol=ATOL)


def test_pmr_m2_is_the_released_step_and_m3_adds_no_selection():
    for s_a, s_v in [(0.9, 0.4), (0.4, 0.9), (0.5, 0.5), (3.0, 2.99)]:
        beta, rho = pmr_coefficients({"a": s_a, "v": s_v}, alpha=2.0)
        ratio = s_a / s_v  # released: ratio > 1 -> visual term, < 1 -> audio term, = 1 -> none
        assert beta == {"a": 2.0 if ratio < 1 else 0.0, "v": 2.0 if ratio > 1 else 0.0}
    # M = 3: every modality below the mean of the others gets alpha (no argmax selection), so
    # swapping two near-equal leaders changes nothing
    beta, rho = pmr_coefficients({"a": 0.60, "b": 0.59, "c": 0.10}, alpha=1.0)
    assert beta == {"a": 0.0, "b": 0.0, "c": 1.0}
    beta2, _ = pmr_coefficients({"a": 0.59, "b": 0.60, "c": 0.10}, alpha=1.0)
    assert beta2 == beta
    beta, rho = pmr_coefficients({"a": 0.6, "b": 0.3, "c": 0.3}, alpha=1.0)
    assert beta == {"a": 0.0, "b": 1.0, "c": 1.0}
    assert rho["b"] == pytest.approx(0.3 / 0.45)


def _loader(xs, ys, batch):
    return [({"m0": xs[i:i + batch], "m1": 10 * xs[i:i + batch]}, ys[i:i + batch])
            for i in range(0, len(ys), batch)]


def test_pmr_prototypes_class_means_momentum_and_absent_classes():
    """Prototypes = class means over the first floor(n/10) batches; momentum mu on the second
    computation; a class absent from the batches read keeps its old prototype; a class never
    seen makes the reader go on."""
    model = identity_model(num_classes=3)
    xs = torch.arange(40, dtype=torch.float32)[:, None]
    # 20 batches of 2 -> 2 batches read; class 2 first appears in batch 3 (samples 6, 7)
    ys = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2] + [0, 1] * 16)
    reg = PMR(momentum=0.25)
    reg.update_prototypes(model, _loader(xs, ys, 2), use_momentum=False)
    # class 2 unseen after 2 batches: read on in chunks of 2 batches until seen (4 batches)
    logs = reg.collect_logs()
    assert logs["prototype_batches"] == 4
    assert logs["prototype_samples"] == {"0": 3, "1": 3, "2": 2}
    torch.testing.assert_close(reg.prototypes["m0"][:, 0], torch.tensor([2.0, 3.0, 6.5]))
    torch.testing.assert_close(reg.prototypes["m1"][:, 0], torch.tensor([20.0, 30.0, 65.0]))
    assert reg.seen.tolist() == [True, True, True]
    # second computation: new means over 2 batches (classes 0, 1 only) mixed with momentum
    xs2 = xs + 100
    reg.update_prototypes(model, _loader(xs2, ys, 2), use_momentum=True)
    new0, new1 = (100 + 102) / 2, (101 + 103) / 2
    torch.testing.assert_close(reg.prototypes["m0"][:, 0],
                               torch.tensor([0.75 * new0 + 0.25 * 2.0, 0.75 * new1 + 0.25 * 3.0,
                                             6.5]))  # class 2 absent now: kept
    assert reg.collect_logs()["prototype_batches"] == 2


def test_pmr_epoch_start_changes_nothing_the_training_sees(tiny):
    """Eval mode inside, modes / RNGs / the loader's own generator restored: the epoch trains on
    the same shuffle it would without PMR, and the prototypes come from its first batches."""
    torch.manual_seed(0)
    model = md.models.default_model(tiny, feature_dim=4)
    model.encoders["a"] = nn.Sequential(model.encoders["a"], nn.Dropout(0.5))
    model.train()
    gen = torch.Generator().manual_seed(5)
    loader = tiny.train.loader(16, shuffle=True, generator=gen)
    reg = PMR()
    before = torch.get_rng_state()
    gen_before = gen.get_state()
    ctx = StepContext(model=model, epoch=0, train_loader=loader)
    reg.on_train_epoch_start(ctx)
    assert torch.equal(torch.get_rng_state(), before) and torch.equal(gen.get_state(), gen_before)
    assert all(mod.training for mod in model.modules())
    # the prototypes are the eval-mode class means of the epoch's first floor(n/10) batches
    n_read = max(1, len(loader) // 10)
    with torch.no_grad():
        model.eval()
        batches = [b for _, b in zip(range(n_read), loader, strict=False)]
        model.train()
        feats = [model.encoders["a"].eval()(x["a"]) for x, _ in batches]
        ys = torch.cat([y for _, y in batches])
        f = torch.cat(feats)
    for k in range(3):
        if (ys == k).any():
            torch.testing.assert_close(reg.prototypes["a"][k], f[ys == k].mean(0),
                                       rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("make,keys", [
    (lambda: md.PMR(per_weight=0.1), ("score", "rho", "beta", "pce", "per")),
    (lambda: md.AMCo(), ("mass", "dependent", "masked"))])
def test_md_fit_m3_gated_default_args_logs_every_coefficient(tiny3, make, keys):
    torch.manual_seed(0)
    model = md.models.default_model(tiny3, feature_dim=4, fusion="gated")
    reg = make()
    hist = md.fit(model, tiny3.train.loader(32, shuffle=True), tiny3.val.loader(128), epochs=2,
                  regulator=reg, progress=False, seed=0)
    rec = hist.epochs[-1]["regulator"]
    for key in keys:
        assert set(rec[key]) == {"a", "b", "c"}, key
    assert hist.epochs[-1]["val"]["acc"] >= 0
    if isinstance(reg, PMR):
        assert set(rec["prototype_samples"]) == {"0", "1", "2"}
        # beta logged = alpha on the modalities below the mean of the others (epoch mean)
        assert all(0.0 <= v <= 1.0 for v in rec["beta"].values())
        assert any(v > 0 for v in rec["beta"].values())
    else:
        assert set(rec["schedule"]) == {"p", "n"} and rec["schedule"]["p"] > 0
        assert sum(rec["mass"].values()) == pytest.approx(1.0)


def test_pmr_released_window_and_momentum_timing():
    reg = PMR(variant="released", start_epoch=1, end_epoch=3)
    assert [reg.active(e) for e in range(5)] == [False, True, True, True, False]
    paper = PMR(start_epoch=1, end_epoch=3)
    assert [paper.active(e) for e in range(5)] == [False, True, True, False, False]
    # momentum: paper from the second computation, released from epoch 2
    model = identity_model(num_classes=2)
    xs = torch.arange(8, dtype=torch.float32)[:, None]
    ys = torch.tensor([0, 1] * 4)
    calls = []
    for variant in ("paper", "released"):
        r = PMR(variant=variant, momentum=0.5)
        seq = []
        for epoch in range(3):
            r.on_train_epoch_start(StepContext(model=model, epoch=epoch,
                                               train_loader=_loader(xs + 10 * epoch, ys, 2)))
            seq.append(float(r.prototypes["m0"][0, 0]))
        calls.append(seq)
    assert calls[0] == [0.0, 0.5 * 10 + 0.5 * 0.0, 0.5 * 20 + 0.5 * 5.0]
    assert calls[1] == [0.0, 10.0, 0.5 * 20 + 0.5 * 10.0]


# ====================================================================== AMCo
def test_amco_r14_closed_form():
    """METHODS-2 R14: z_a = (2, 0), z_v = (0, 0): mass_a = (e^2 + 1)/(e^2 + 3) = 0.8075 > 0.5 ->
    a dependent; eps = 0.3, l = 0.15 -> p = 0.7071, C = 6 -> n = 4."""
    mass = joint_softmax_mass([torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])])
    expected = (math.e ** 2 + 1) / (math.e ** 2 + 3)
    torch.testing.assert_close(mass, torch.tensor([[expected, 1 - expected]]), rtol=RTOL, atol=ATOL)
    assert expected == pytest.approx(0.8075, abs=1e-4)
    # l = b * e / 10 = 0.15 with b = 3, e = 0.5 (the formula; real epochs are integers)
    p, n = amco_schedule(3, 0.5, 0.3, 6)
    assert p == pytest.approx(0.70711, abs=1e-5) and n == 4
    # BB's schedule: epoch 0 never masks; epoch 1 reaches p = 1 at batch 3 (l = 0.3)
    assert amco_schedule(50, 0, 0.3, 6) == (0.0, 0)
    assert amco_schedule(3, 1, 0.3, 6) == (1.0, 6)
    # p = sin(pi/6) = 1/2 exactly -> n = 3 (the float sin is 0.49999999999999994: a plain floor,
    # as BB's int(p * C), would lose one logit to rounding)
    assert amco_schedule(1, 1, 0.3, 6) == (pytest.approx(0.5), 3)
    # threshold: M = 2 -> sigma (BB), M = 3 -> 2 sigma / 3 (fair-share scaling), released sigma
    reg = AMCo()
    assert reg.threshold(2) == 0.5 and reg.threshold(3) == pytest.approx(1 / 3)
    assert AMCo(variant="released").threshold(3) == 0.5


def _amco_ctx(model, epoch=1, batch_index=1, step=7, feats=None, labels=None):
    feats = feats if feats is not None else {"m0": torch.tensor([[2.0, 0.0], [1.0, 1.0]]),
                                             "m1": torch.tensor([[0.0, 0.0], [0.5, -0.5]])}
    ctx = StepContext(model=model, epoch=epoch, step=step, batch_index=batch_index,
                      features=feats, labels=labels if labels is not None else torch.tensor([0, 1]),
                      losses={})
    return ctx


def test_amco_masks_dependent_logits_and_co_optimises_through_a():
    model = identity_model(dims=(2, 2), num_classes=6)
    reg = AMCo(seed=3)
    reg.on_fit_start(StepContext(model=model))
    reg.dependent = {"m0": True, "m1": False}
    feats = {"m0": torch.randn(4, 2), "m1": torch.randn(4, 2)}
    ctx = _amco_ctx(model, epoch=1, batch_index=2, step=11, feats=feats,
                    labels=torch.tensor([0, 1, 2, 3]))
    uni = ctx.compute_unimodal_logits()
    reg.on_after_forward(ctx)
    p, n = amco_schedule(2, 1, 0.3, 6)  # l = 0.2 -> p = 0.866, n = 5
    assert n == 5
    keep = reg.last_masks["m0"]
    assert int((~keep).sum()) == n and "m1" not in reg.last_masks
    masked_a = uni["m0"] * keep.float()
    # the same columns are zeroed in every row; z_v untouched
    assert torch.equal((masked_a == 0).all(0), ~keep) or n == 6
    torch.testing.assert_close(ctx.losses["amco/unimodal/m0"], F.cross_entropy(masked_a, ctx.labels))
    torch.testing.assert_close(ctx.losses["amco/unimodal/m1"], F.cross_entropy(uni["m1"], ctx.labels))
    fused = reg.fusion(masked_a + uni["m1"])
    torch.testing.assert_close(ctx.losses["amco/fused"], F.cross_entropy(fused, ctx.labels))
    assert "multimodal" not in ctx.losses  # the model's own CE(h(f)) is kept by the loop
    # the mask is a function of (seed, step): the same again, another at the next step
    again = _amco_ctx(model, epoch=1, batch_index=2, step=11, feats=feats,
                      labels=torch.tensor([0, 1, 2, 3]))
    reg.dependent = {"m0": True, "m1": False}
    reg.on_after_forward(again)
    assert torch.equal(reg.last_masks["m0"], keep)
    masks = set()
    for step in range(12, 20):
        reg.dependent = {"m0": True, "m1": False}
        reg.on_after_forward(_amco_ctx(model, epoch=1, batch_index=2, step=step, feats=feats,
                                       labels=torch.tensor([0, 1, 2, 3])))
        masks.add(tuple(reg.last_masks["m0"].tolist()))
    assert len(masks) > 1
    logs = reg.collect_logs()
    assert set(logs) == {"mass", "dependent", "masked", "schedule"}
    assert logs["schedule"]["n"] == 5 and logs["masked"]["m0"] == 5 and logs["masked"]["m1"] == 0


def test_amco_dependence_is_decided_after_the_step_from_the_mass():
    model = identity_model(dims=(2, 2), num_classes=2, fusion="late")
    reg = AMCo()
    reg.on_fit_start(StepContext(model=model))
    with torch.no_grad():  # make the unimodal logits exactly z_a = (2, 0), z_v = (0, 0)
        for m, w in (("m0", [[1.0, 0.0], [0.0, 1.0]]), ("m1", [[0.0, 0.0], [0.0, 0.0]])):
            model.fusion.heads[m].weight.copy_(torch.tensor(w))
            model.fusion.heads[m].bias.zero_()
    feats = {"m0": torch.tensor([[2.0, 0.0]]), "m1": torch.tensor([[1.0, 1.0]])}
    uni = model.unimodal_logits(feats)
    torch.testing.assert_close(uni["m0"], torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(uni["m1"], torch.tensor([[0.0, 0.0]]))
    ctx = _amco_ctx(model, epoch=1, batch_index=1, feats=feats, labels=torch.tensor([0]))
    reg.on_after_forward(ctx)
    assert reg.dependent == {"m0": True, "m1": False}
    logs = reg.collect_logs()
    assert logs["mass"]["m0"] == pytest.approx(0.8075, abs=1e-4)
    assert logs["dependent"] == {"m0": 0.0, "m1": 0.0}  # nothing was dependent at this step
    # sigma above the mass: not dependent
    reg2 = AMCo(sigma=0.85)
    reg2.on_fit_start(StepContext(model=model))
    reg2.on_after_forward(_amco_ctx(model, epoch=1, batch_index=1, feats=feats,
                                    labels=torch.tensor([0])))
    assert reg2.dependent == {"m0": False, "m1": False}


def test_amco_feature_masking_sets_units_to_the_baseline():
    model = identity_model(dims=(4, 4), num_classes=3)
    reg = AMCo(mask_target="features")
    reg.on_fit_start(StepContext(model=model))
    reg.dependent = {"m0": True}
    feats = {"m0": torch.ones(3, 4), "m1": torch.ones(3, 4)}
    ctx = _amco_ctx(model, epoch=1, batch_index=1, feats=feats, labels=torch.tensor([0, 1, 2]))
    out = reg.transform_features(feats, ctx)
    _, n_units = amco_schedule(1, 1, 0.3, 4)  # p = 0.5 -> 2 of 4 units
    assert n_units == 2
    assert int((out["m0"][0] == 0).sum()) == 2 and (out["m0"] == out["m0"][0]).all()
    assert torch.equal(out["m1"], feats["m1"])


def test_amco_fit_trains_a_evaluates_the_models_own_head(tiny):
    torch.manual_seed(0)
    model = md.models.default_model(tiny, feature_dim=4)
    reg = md.AMCo()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hist = md.fit(model, tiny.train.loader(32, shuffle=True), tiny.val.loader(512), epochs=3,
                  optimizer=opt, regulator=reg, progress=False, seed=0, restore_best=False)
    # A joined the optimizer as one extra group and trained
    assert any(g.get("modaldiag_amco_fusion") for g in opt.param_groups)
    a0 = AMCo()
    a0._create_fusion(model)
    assert not torch.equal(a0.fusion.weight, reg.fusion.weight)
    rec = hist.epochs[-1]
    assert set(rec["regulator"]["mass"]) == {"a", "b"}
    assert sum(rec["regulator"]["dependent"].values()) > 0  # something was masked in epoch 2
    # evaluation used h(f), not A: the logged val accuracy is the model's own head's
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in tiny.val.loader(512))
    assert rec["val"]["acc"] == pytest.approx(right / len(tiny.val))


def test_amco_released_replaces_the_fused_loss_and_refuses_other_heads(tiny):
    model = identity_model(dims=(2, 2), num_classes=3)
    reg = AMCo(variant="released")
    reg.on_fit_start(StepContext(model=model))
    assert reg.head_loss is False and not reg.needs_unimodal_logits
    feats = {"m0": torch.randn(4, 2), "m1": torch.randn(4, 2)}
    labels = torch.tensor([0, 1, 2, 0])
    ctx = _amco_ctx(model, epoch=0, batch_index=0, feats=feats, labels=labels)
    reg.on_after_forward(ctx)
    # unmasked (epoch 0): BB's logits W_m f_m + b/2 sum to h(f), so the fused loss is CE(A(h(f)))
    expected = F.cross_entropy(reg.fusion(model.head(feats)), labels)
    torch.testing.assert_close(ctx.losses["multimodal"], expected, rtol=RTOL, atol=ATOL)
    gated = md.models.default_model(tiny, feature_dim=4, fusion="gated")
    with pytest.raises(ValueError, match="variant='paper'"):
        md.fit(gated, tiny.train.loader(64), epochs=1, regulator=AMCo(variant="released"),
               progress=False)


# ====================================================================== both
@pytest.mark.parametrize("make", [lambda: md.PMR(), lambda: md.AMCo(),
                                  lambda: md.AMCo(mask_target="features")])
def test_resumed_run_ends_with_identical_weights(tiny, tmp_path, make):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(tiny, feature_dim=4)
        reg = make()
        md.fit(model, tiny.train.loader(32, shuffle=True), epochs=epochs, regulator=reg,
               checkpoint_dir=ckpt, resume=resume, restore_best=False, progress=False, seed=3)
        return model, reg

    full, reg_full = run(3, tmp_path / "full", False)
    run(2, tmp_path / "split", False)
    resumed, reg_res = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    for (k, a), (_, b) in zip(_flat(reg_full.state_dict()), _flat(reg_res.state_dict()), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k


def _flat(state, prefix=""):
    for k, v in sorted(state.items()):
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_plain_loop_and_state_round_trip(tiny):
    torch.manual_seed(0)
    model = md.models.default_model(tiny, feature_dim=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = md.Regulation(model, opt, [md.PMR(), md.AMCo()])
    for epoch in range(2):
        loader = run.epoch_start(epoch, tiny.train.loader(64, shuffle=True))
        for x, y in loader:
            opt.zero_grad()
            run.backward(x, y)
            opt.step()
        logs = run.epoch_end()
    assert {"PMR", "AMCo"} <= set(logs["regulator"])
    pmr, amco = run.callbacks
    assert len(opt.param_groups) == 2  # A joined the plain loop's optimizer
    fresh_p, fresh_a = md.PMR(), md.AMCo()
    fresh_p.load_state_dict(pmr.state_dict())
    fresh_a.load_state_dict(amco.state_dict())
    for m in model.modalities:
        assert torch.equal(fresh_p.prototypes[m], pmr.prototypes[m])
    assert torch.equal(fresh_a.fusion.weight, amco.fusion.weight)
    fresh_a.on_fit_start(StepContext(model=model, optimizer=opt))  # restored: kept, registered
    assert fresh_a.fusion is not None and any(fresh_a.fusion.weight is p
                                              for g in opt.param_groups for p in g["params"])
    assert len(opt.param_groups) == 2  # the old run's group was replaced, not added to


@pytest.mark.parametrize("cls,kwargs,name", [
    (PMR, {"alpha": 0}, "alpha"), (PMR, {"momentum": 1.0}, "momentum"),
    (PMR, {"fraction": 0}, "fraction"), (PMR, {"per_weight": -1}, "per_weight"),
    (PMR, {"start_epoch": 3, "end_epoch": 3}, "end_epoch"), (PMR, {"variant": "bb"}, "variant"),
    (AMCo, {"sigma": 1.0}, "sigma"), (AMCo, {"eps": 0}, "eps"),
    (AMCo, {"mask_target": "units"}, "mask_target"), (AMCo, {"seed": -1}, "seed"),
    (AMCo, {"start_epoch": 2, "end_epoch": 1, "variant": "released"}, "end_epoch")])
def test_bad_arguments_are_refused(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_pmr_refuses_a_loader_without_length():
    model = identity_model()
    reg = PMR()
    gen = (b for b in _loader(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1]), 2))
    with pytest.raises(ValueError, match="len"):
        reg.on_train_epoch_start(StepContext(model=model, epoch=0, train_loader=gen))


def test_lightning_smoke(tiny):
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    for reg in (md.PMR(), md.AMCo()):
        torch.manual_seed(0)
        lit = ModalDiagModule(md.models.default_model(tiny, feature_dim=4), lr=0.05)
        cb = ModalDiagCallback(reg, monitor=False)
        trainer = pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(lit, tiny.train.loader(64, shuffle=True))
        assert len(cb.logs) == 2 and cb.logs[-1]["regulator"]
        if isinstance(reg, AMCo):
            held = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
            assert any(p is reg.fusion.weight for p in held)
        else:
            assert "beta" in cb.logs[-1]["regulator"]


def test_lightning_checkpoint_resume_restores_a_exactly(tiny, tmp_path):
    """A joins Lightning's optimizer at on_fit_start, before Lightning restores the checkpoint's
    optimizer state: resuming from a checkpoint ends like the uninterrupted run."""
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    def run(epochs, root, ckpt=None):
        torch.manual_seed(0)
        lit = ModalDiagModule(md.models.default_model(tiny, feature_dim=4), lr=0.05)
        reg = md.AMCo()
        trainer = pl.Trainer(max_epochs=epochs, callbacks=[ModalDiagCallback(reg, monitor=False)],
                             accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=root)
        trainer.fit(lit, tiny.train.loader(64), ckpt_path=ckpt)
        return lit.model, reg

    full, reg_full = run(3, tmp_path / "full")
    run(2, tmp_path / "split")
    ckpt = next((tmp_path / "split").rglob("*.ckpt"))
    resumed, reg_res = run(3, tmp_path / "split", ckpt)
    assert torch.equal(reg_full.fusion.weight, reg_res.fusion.weight)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_amco_mass_on_unmasked_logits_paper_masked_released():
    """Paper: the dependence is measured on the unmasked logits; released (BB): on the masked
    ones, so a fully masked modality (p = 1) looks independent at the next step."""
    model = identity_model(dims=(2, 2), num_classes=2, fusion="late")
    with torch.no_grad():
        for m in ("m0", "m1"):
            model.fusion.heads[m].weight.copy_(torch.eye(2))
            model.fusion.heads[m].bias.zero_()
    feats = {"m0": torch.tensor([[3.0, 0.0]]), "m1": torch.tensor([[0.0, 0.0]])}
    for variant, expect_dep in (("paper", True), ("released", False)):
        reg = AMCo(variant=variant)
        reg.on_fit_start(StepContext(model=model))
        reg.dependent = {"m0": True, "m1": False}
        ctx = _amco_ctx(model, epoch=1, batch_index=3, feats=feats, labels=torch.tensor([0]))
        reg.on_after_forward(ctx)  # l = 0.3 -> p = 1: every logit of m0 is zeroed
        assert int((~reg.last_masks["m0"]).sum()) == 2
        logs = reg.collect_logs()
        source = ([feats["m0"], feats["m1"]] if variant == "paper"
                  else [torch.zeros(1, 2), feats["m1"]])
        assert logs["mass"]["m0"] == pytest.approx(float(joint_softmax_mass(source)[0, 0]), rel=1e-5)
        assert reg.dependent["m0"] is expect_dep


def test_pmr_entropy_term_and_unseen_classes_stay_finite():
    """PER on the faster modality: -per_weight * mean entropy of q; a class without a prototype
    gets probability 0 and no NaN reaches the gradient."""
    model = identity_model(num_classes=3)
    reg = PMR(per_weight=0.5)
    reg.prototypes = {"m0": torch.tensor([[0.0], [2.0], [9.0]]),
                      "m1": torch.tensor([[0.0], [2.0], [9.0]])}
    reg.seen = torch.tensor([True, True, False])
    f0 = torch.tensor([[0.0], [2.0]], requires_grad=True)
    f1 = torch.tensor([[1.0], [1.0]], requires_grad=True)
    ctx = _pmr_ctx({"m0": f0, "m1": f1}, torch.tensor([0, 1]), model, epoch=0)
    reg.on_after_forward(ctx)
    q0 = torch.tensor([1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))])
    h0 = float(-(q0 * q0.log()).sum())
    torch.testing.assert_close(ctx.losses["pmr/entropy/m0"], torch.tensor(-0.5 * h0),
                               rtol=RTOL, atol=ATOL)
    assert "pmr/entropy/m1" not in ctx.losses and "pmr/m1" in ctx.losses
    sum(ctx.losses.values()).backward()
    assert torch.isfinite(f0.grad).all() and torch.isfinite(f1.grad).all()
    assert reg.collect_logs()["per"] == {"m0": 0.5, "m1": 0.0}
    ctx = _pmr_ctx({"m0": f0, "m1": f1}, torch.tensor([0, 1]), model, epoch=10)
    reg.on_after_forward(ctx)  # per_end_epoch = 10: off
    assert not any(k.startswith("pmr/entropy") for k in ctx.losses)


def test_released_window_may_be_a_single_inclusive_epoch():
    """Released: the window [start_epoch, end_epoch] includes its end, so start == end is one
    regulated epoch (accepted); end < start is refused."""
    md.PMR(variant="released", start_epoch=3, end_epoch=3)
    with pytest.raises(ValueError, match="end_epoch"):
        md.PMR(variant="released", start_epoch=3, end_epoch=2)
