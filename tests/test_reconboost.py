"""ReconBoost (R17): the boosting loss, the stage/phase schedule, frozen parameters under momentum
and weight decay, rho, the ensemble prediction, GA's gradient, resume, refusals."""

import math

import pytest
import torch
import torch.nn.functional as F

import modaldiag as md
from modaldiag.regulators.reconboost import (
    ReconBoost,
    reconboost_boost_loss,
    reconboost_ga,
    reconboost_schedule,
)


@pytest.fixture(scope="module")
def duo():
    return md.datasets.synthetic(n_samples=96, num_classes=3, strength={"a": 2.0, "b": 0.6},
                                 dims={"a": 6, "b": 5}, seed=2)


@pytest.fixture(scope="module")
def tri():
    return md.datasets.synthetic(n_samples=72, num_classes=3,
                                 strength={"a": 2.0, "b": 1.0, "c": 0.3}, dims=5, seed=1)


def _model(data, fusion="concat", seed=0):
    torch.manual_seed(seed)
    return md.models.default_model(data, fusion=fusion, feature_dim=6)


def _epoch(run, opt, loader, epoch):
    """One plain-loop epoch; returns the logs."""
    for inputs, labels in run.epoch_start(epoch, loader):
        opt.zero_grad(set_to_none=True)
        run.backward(inputs, labels)
        opt.step()
    return run.epoch_end()


def _snapshot(params):
    return [p.detach().clone() for p in params]


# ---------------------------------------------------------------- the boosting loss
def test_r17_closed_form():
    """C = 2, w1 = 5, w2 = 1, q_y = 0.5, p_{m,y} = 0.5 -> (1/2) 4.5 ln 2 = 1.5596."""
    loss = reconboost_boost_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), 5.0, 1.0)
    assert loss.item() == pytest.approx(0.5 * 4.5 * math.log(2), rel=1e-6)
    assert loss.item() == pytest.approx(1.5596, abs=1e-4)


def test_boost_loss_equals_brute_force_and_released_form():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 4, generator=gen, requires_grad=True)
    ens = torch.randn(7, 4, generator=gen, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    w1, w2 = 4.0, 1.5
    loss = reconboost_boost_loss(z, ens, y, w1, w2)
    brute = 0.0
    for i in range(7):
        p = torch.softmax(z[i].detach().double(), 0)
        q = torch.softmax(ens[i].detach().double(), 0)
        brute += float(w1 - w2 * q[y[i]]) * -math.log(float(p[y[i]])) / 4
    assert loss.item() == pytest.approx(float(brute) / 7, rel=1e-5)
    # the released form: -w1 mean_c(y log p) + w2 mean_c(y q log p), batch mean
    target = F.one_hot(y, 4).float()
    released = (-w1 * (target * z.log_softmax(1)).mean(-1)
                + w2 * (target * ens.detach().softmax(1) * z.log_softmax(1)).mean(-1)).mean()
    torch.testing.assert_close(loss, released, rtol=1e-5, atol=1e-6)
    # no gradient flows into the other learners' ensemble (sg)
    g_z, g_ens = torch.autograd.grad(loss, [z, ens], allow_unused=True)
    assert g_ens is None and g_z.abs().sum() > 0


def test_ga_gradient_only_with_ga_grad():
    z = torch.randn(5, 3, requires_grad=True)
    prev = torch.randn(5, 3, requires_grad=True)
    off = reconboost_ga(z, prev, grad=False)
    assert not off.requires_grad
    on = reconboost_ga(z, prev, grad=True)
    torch.testing.assert_close(on.detach(), off)
    torch.testing.assert_close(off, F.mse_loss(z.softmax(1), prev.softmax(1)).detach())
    g_z, g_prev = torch.autograd.grad(on, [z, prev], allow_unused=True)
    assert g_prev is None and g_z.abs().sum() > 0


# ---------------------------------------------------------------- the schedule
def test_schedule_m2_and_m3():
    seq2 = [(w["stage"], w["modality"], w["phase"], w["prev"])
            for w in (reconboost_schedule(e, ("a", "v"), 2, 1) for e in range(9))]
    assert seq2 == [(0, "a", 1, None), (0, "a", 1, None), (0, "a", 2, None),
                    (1, "v", 1, "a"), (1, "v", 1, "a"), (1, "v", 2, "a"),
                    (2, "a", 1, "v"), (2, "a", 1, "v"), (2, "a", 2, "v")]
    starts = [reconboost_schedule(e, ("a", "v"), 2, 1)["phase_start"] for e in range(6)]
    assert starts == [True, False, True, True, False, True]
    seq3 = [(w["modality"], w["phase"], w["prev"])
            for w in (reconboost_schedule(e, "abc", 1, 1) for e in range(8))]
    assert seq3 == [("a", 1, None), ("a", 2, None), ("b", 1, "a"), ("b", 2, "a"),
                    ("c", 1, "b"), ("c", 2, "b"), ("a", 1, "c"), ("a", 2, "c")]
    # no rectification: every epoch starts a new stage
    assert [reconboost_schedule(e, "ab", 1, 0)["modality"] for e in range(3)] == ["a", "b", "a"]


def test_fit_logs_the_schedule_for_three_modalities(tri):
    model = _model(tri, fusion="gated")
    h = md.fit(model, tri.train.loader(24), epochs=6, regulator=ReconBoost(1, 1), progress=False,
               monitor=False)
    got = [(r["regulator"]["stage"], r["regulator"]["modality"], r["regulator"]["phase"])
           for r in h.epochs]
    assert got == [(0, "a", 1), (0, "a", 2), (1, "b", 1), (1, "b", 2), (2, "c", 1), (2, "c", 2)]
    logs = [r["regulator"] for r in h.epochs]
    assert "ga" not in logs[0] and logs[2]["ga"].keys() == {"b"}  # GA from stage 1 on
    assert set(logs[0]["boost_loss"]) == {"a"} and "boost_loss" not in logs[1]
    assert all(0 < v["q_y"][k] < 1 for v in logs[::2] for k in v["q_y"])


# ---------------------------------------------------------------- frozen and trained parameters
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05)], ids=["sgd", "adam"])
def test_phase_one_leaves_other_encoder_and_rho_exactly_unchanged(duo, make_opt):
    """Epoch 1 (phase 2) gives every parameter optimizer state; in epoch 2 (stage 1, phase 1,
    modality b) encoder a and rho must not move at all, and keep grad None after backward."""
    model = _model(duo)
    opt = make_opt(model.parameters())
    rb = ReconBoost(1, 1, reset_momentum=False)
    run = md.Regulation(model, opt, rb)
    loader = duo.train.loader(32, shuffle=False)
    _epoch(run, opt, loader, 0)
    _epoch(run, opt, loader, 1)
    enc_a = list(model.encoders["a"].parameters())
    assert all(p in opt.state and len(opt.state[p]) > 0 for p in enc_a + [rb.rho])
    before_a, before_rho = _snapshot(enc_a), rb.rho.detach().clone()
    before_b = _snapshot(model.encoders["b"].parameters())
    before_head = _snapshot(model.head_parameters())
    for i, (inputs, labels) in enumerate(run.epoch_start(2, loader)):
        opt.zero_grad(set_to_none=True)
        run.backward(inputs, labels)
        if i == 0:
            assert all(p.grad is None for p in enc_a) and rb.rho.grad is None
            assert all(p.grad is not None for p in model.encoders["b"].parameters())
        opt.step()
    run.epoch_end()
    for a, b in zip(before_a, enc_a, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(before_rho, rb.rho.detach())
    assert all(not torch.equal(a, b) for a, b in
               zip(before_b, model.encoders["b"].parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in
               zip(before_head, model.head_parameters(), strict=True))


def test_phase_two_trains_everything_including_rho(duo):
    model = _model(duo)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rb = ReconBoost(1, 1)
    run = md.Regulation(model, opt, rb)
    loader = duo.train.loader(32)
    _epoch(run, opt, loader, 0)
    before, rho0 = _snapshot(model.parameters()), float(rb.rho.detach())
    assert rho0 == 1.0  # phase 1 does not train rho
    logs = _epoch(run, opt, loader, 1)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert float(rb.rho.detach()) != rho0 and logs["regulator"]["rho"] == pytest.approx(float(rb.rho.detach()))
    assert any(g.get("modaldiag_reconboost_rho") for g in opt.param_groups)


def test_phase_one_gradient_is_the_boosting_loss(duo):
    """Encoder a's gradient in phase 1 equals the gradient of the hand-computed L_boost."""
    model = _model(duo)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rb = ReconBoost(1, 1, w1=4.0, w2=2.0)
    run = md.Regulation(model, opt, rb)
    inputs, labels = next(iter(duo.train.loader(32)))
    run.epoch_start(0, duo.train.loader(32))
    run.backward(inputs, labels)
    got = [p.grad.clone() for p in model.encoders["a"].parameters()]
    feats = model.encode(inputs)
    uni = model.unimodal_logits(feats)
    q = torch.softmax(uni["b"].detach(), 1).gather(1, labels[:, None])[:, 0]
    ce = F.cross_entropy(uni["a"], labels, reduction="none")
    ref = torch.autograd.grad(((4.0 - 2.0 * q) * ce).mean() / 3,
                              list(model.encoders["a"].parameters()))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reset_momentum_clears_the_phase_parameters_state(duo):
    def state_after(reset):
        model = _model(duo)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        rb = ReconBoost(1, 1, reset_momentum=reset)
        run = md.Regulation(model, opt, rb)
        loader = duo.train.loader(32)
        _epoch(run, opt, loader, 0)
        _epoch(run, opt, loader, 1)
        run.epoch_start(2, loader)  # phase 1 of b: b and the head start afresh
        return model, opt
    model, opt = state_after(True)
    assert all(p not in opt.state for p in model.encoders["b"].parameters())
    assert all(p not in opt.state for p in model.head_parameters())
    assert all("momentum_buffer" in opt.state[p] for p in model.encoders["a"].parameters())
    model, opt = state_after(False)
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())


def test_ga_grad_changes_the_gradient_only_when_on(duo):
    """Stage 1 phase 1 (epoch 2 with E_b = E_c = 1): alpha changes encoder b's gradient only
    with ga_grad=True."""
    inputs, labels = next(iter(duo.train.loader(32)))

    def grads(alpha, ga_grad):
        model = _model(duo)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = md.Regulation(model, opt, ReconBoost(1, 1, alpha=alpha, ga_grad=ga_grad))
        run.epoch_start(2, duo.train.loader(32))
        run.backward(inputs, labels)
        return torch.cat([p.grad.flatten() for p in model.encoders["b"].parameters()])

    torch.testing.assert_close(grads(0.0, False), grads(5.0, False), rtol=0, atol=0)
    assert (grads(0.0, True) - grads(5.0, True)).abs().max() > 1e-6


# ---------------------------------------------------------------- prediction
def test_predict_is_rho_times_sum_and_fit_validates_with_it(duo):
    model = _model(duo)
    rb = ReconBoost(1, 1, rho_init=0.5)
    val = duo.val.loader(64)
    h = md.fit(model, duo.train.loader(32), val, epochs=2, regulator=rb, progress=False,
               restore_best=False, monitor=False)
    inputs, _ = next(iter(val))
    model.eval()
    with torch.no_grad():
        feats = model.encode(inputs)
        uni = model.unimodal_logits(feats)
        expected = rb.rho * (uni["a"] + uni["b"])
        torch.testing.assert_close(rb.predict(model, feats), expected)
    assert float(rb.rho.detach()) != 0.5  # trained in phase 2
    ev = md.probes.evaluate(model, val, predict=lambda f: rb.predict(model, f))
    assert h.epochs[-1]["val"]["acc"] == pytest.approx(ev.accuracy)
    # the loss tells the two rules apart: fit's validation used F, not the head
    head = md.probes.evaluate(model, val)
    assert h.epochs[-1]["val"]["loss"] == pytest.approx(ev.loss, rel=1e-5)
    assert abs(head.loss - ev.loss) > 1e-3


# ---------------------------------------------------------------- variant, state, resume
def test_released_variant_defaults_and_ga_start(duo):
    rb = ReconBoost(variant="released")
    assert (rb.boost_epochs, rb.rectify_epochs, rb.rho_init, rb.reset_momentum) == (1, 1, 0.01, False)
    assert ReconBoost(variant="released", boost_epochs=3).boost_epochs == 3
    paper = ReconBoost()
    assert (paper.boost_epochs, paper.rectify_epochs, paper.rho_init, paper.reset_momentum) == \
        (4, 4, 1.0, True)
    h = md.fit(_model(duo), duo.train.loader(48), epochs=5, regulator=rb, progress=False,
               monitor=False)
    # BB: no GA in the first BB epoch (stages 0 .. M-1 = epochs 0..3 here); from stage 2 on
    assert ["ga" in r["regulator"] for r in h.epochs] == [False] * 4 + [True]
    assert h.epochs[0]["regulator"]["rho"] == pytest.approx(0.01)


def test_state_round_trip_and_reset(duo):
    model = _model(duo)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rb = ReconBoost(1, 1)
    run = md.Regulation(model, opt, rb)
    for e in range(2):
        _epoch(run, opt, duo.train.loader(32), e)
    state = rb.state_dict()
    assert (state["epoch"], state["stage"], state["phase"], state["modality"]) == (1, 0, 2, "a")
    other = ReconBoost(1, 1)
    other.load_state_dict(state)
    assert torch.equal(other.rho.detach(), rb.rho.detach()) and other.phase == 2
    rb.reset()
    assert rb.rho is None and rb.stage is None and rb.owned_parameters() == []


def test_resumed_run_continues_identically(duo, tmp_path):
    def run(epochs, ckpt, resume):
        model = _model(duo)
        rb = ReconBoost(1, 1)
        h = md.fit(model, duo.train.loader(32, shuffle=True), duo.val.loader(64), epochs=epochs,
                   regulator=rb, checkpoint_dir=ckpt, resume=resume, restore_best=False,
                   progress=False, seed=3, monitor=False)
        return model, rb, h

    full, rb_full, h_full = run(4, tmp_path / "full", False)
    run(3, tmp_path / "split", False)  # stops after phase 1 of stage 1; resumes into phase 2
    resumed, rb_res, h_res = run(4, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert torch.equal(rb_full.rho.detach(), rb_res.rho.detach())
    assert h_full.epochs[-1]["regulator"] == h_res.epochs[-1]["regulator"]
    assert h_full.epochs[-1]["val"]["acc"] == h_res.epochs[-1]["val"]["acc"]


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, match", [
    ({"boost_epochs": 0}, "boost_epochs"), ({"rectify_epochs": -1}, "rectify_epochs"),
    ({"w1": 0.0}, "w1"), ({"w1": 1.0, "w2": 2.0}, "w2 must not exceed w1"),
    ({"w2": -1.0}, "w2"), ({"alpha": -0.1}, "alpha"), ({"rho_init": 0.0}, "rho_init"),
    ({"rho_init": float("nan")}, "rho_init"), ({"variant": "bb"}, "variant")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconBoost(**kwargs)


def test_bad_flags_are_refused():
    with pytest.raises(TypeError, match="ga_grad"):
        ReconBoost(ga_grad=1)
    with pytest.raises(TypeError, match="reset_momentum"):
        ReconBoost(reset_momentum="yes")
