"""AGM (R7) and CML (R11): closed forms on hand-made batches, logging, resume, loops."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import modaldiag as md
from modaldiag.regulators import (
    agm_coefficients,
    cml_all_pairs_loss,
    cml_chain_loss,
    shapley_matrix,
    shapley_outputs,
)
from modaldiag.training.callbacks import StepContext

RTOL, ATOL = 1e-4, 1e-5
NAN, INF = float("nan"), float("inf")


def _ctx(model, x, y, epoch=0, step=0):
    ctx = StepContext(model=model, epoch=epoch, step=step, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    ctx.losses = {"multimodal": F.cross_entropy(ctx.logits, y)}
    return ctx


def _hand_concat(bias=(1.0, -1.0)):
    """Two modalities a, v with 2-d features, a concat-linear head with hand-set weights."""
    enc = {"a": torch.nn.Identity(), "v": torch.nn.Identity()}
    model = md.MultimodalClassifier(enc, {"a": 2, "v": 2}, 2, fusion="concat")
    with torch.no_grad():
        model.fusion.fc.weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, -1.0, 2.0, 1.0]]))
        model.fusion.fc.bias.copy_(torch.tensor(bias))
    return model


# ====================================================================== AGM
def test_agm_coefficients_match_the_r7_numbers_in_both_signs():
    s, run = {"a": 0.5, "v": 1.0}, {"a": 1.0, "v": 1.0}
    out = agm_coefficients(s, run, alpha=1.0, cap=10.0)
    assert out["ratio"]["a"] == pytest.approx(1.6487, abs=1e-4)
    assert out["coefficient"]["a"] == pytest.approx(0.5227, abs=1e-4)
    assert out["ratio"]["v"] == pytest.approx(0.6065, abs=1e-4)
    assert out["coefficient"]["v"] == pytest.approx(1.4821, abs=1e-4)
    bb = agm_coefficients(s, run, alpha=1.0, cap=10.0, variant="released")
    assert bb["coefficient"]["a"] == pytest.approx(1.4821, abs=1e-4)
    assert bb["coefficient"]["v"] == pytest.approx(0.5227, abs=1e-4)
    # M = 2 is the authors' exp(s_v - s_a) for any scores; the cap bounds the exponent
    for sa, sv in [(0.1, 2.3), (1.7, 0.2)]:
        r = agm_coefficients({"a": sa, "v": sv}, {"a": 0.0, "v": 0.0}, 0.5, 10.0)
        assert r["ratio"]["a"] == pytest.approx(math.exp(sv - sa))
        assert r["coefficient"]["a"] == pytest.approx(math.exp(0.5 * min(1 - math.exp(sv - sa), 10)))
    capped = agm_coefficients({"a": 3.0, "v": 3.0}, {"a": 0.0, "v": 8.0}, 1.0, 2.0)
    assert capped["coefficient"]["a"] == pytest.approx(math.exp(2.0)) and capped["capped"]["a"] == 1.0


def test_agm_coefficients_three_modalities_by_hand_and_continuity():
    s, run = {"a": 0.2, "b": 0.5, "c": 1.1}, {"a": 0.4, "b": 0.4, "c": 1.0}
    out = agm_coefficients(s, run, alpha=0.7, cap=10.0)
    kappa, mean_s, mean_run = 1.5, 0.6, 0.6
    for m in s:
        r = math.exp(kappa * (mean_s - s[m]))
        ropt = math.exp(kappa * (mean_run - run[m]))
        assert out["coefficient"][m] == pytest.approx(math.exp(0.7 * (ropt - r)))
    # continuous in the scores: a tiny change gives a tiny change (no argmax/selection)
    near = agm_coefficients({**s, "c": 1.1 + 1e-7}, run, alpha=0.7, cap=10.0)
    assert all(abs(near["coefficient"][m] - out["coefficient"][m]) < 1e-5 for m in s)
    # balanced scores equal to their running means: every coefficient 1
    even = agm_coefficients({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 2.0, "b": 2.0, "c": 2.0}, 1.0, 10.0)
    assert all(v == pytest.approx(1.0) for v in even["coefficient"].values())


def test_shapley_outputs_of_a_concat_linear_head_are_the_blocks_plus_b_over_m():
    model = _hand_concat(bias=(1.0, -1.0))
    f = {"a": torch.tensor([[0.3, -1.2], [2.0, 0.5]]), "v": torch.tensor([[1.0, 0.4], [-0.7, 0.1]])}
    ctx = StepContext(model=model, features=f, logits=model.head(f), labels=torch.tensor([0, 1]))
    phi = md.AGM().shapley(ctx)
    w = model.fusion.fc.weight
    torch.testing.assert_close(phi["a"], f["a"] @ w[:, :2].T + torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(phi["v"], f["v"] @ w[:, 2:].T + torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(phi["a"] + phi["v"], ctx.logits)
    # BalanceBenchmark's form drops the empty coalition: phi_a = (v(av) - v(v)) / 2
    bb = md.AGM(variant="released").shapley(ctx)
    torch.testing.assert_close(bb["a"], 0.5 * (ctx.logits - model.head(f, present=("v",))))


def test_shapley_three_modalities_efficiency_and_sampling_on_additive_head():
    torch.manual_seed(0)
    model = make_model(3, "gated")
    x, y = make_inputs(model, batch=5), torch.arange(5) % 3
    ctx = _ctx(model, x, y)
    phi = md.AGM().shapley(ctx)
    torch.testing.assert_close(sum(phi.values()), ctx.logits, rtol=RTOL, atol=ATOL)
    # by hand for modality m0 (weights 1/3, 1/6, 1/6, 1/3), v({}) = 0
    h = {S: model.head(ctx.features, present=S) for S in [("m0",), ("m1",), ("m2",), ("m0", "m1"),
                                                         ("m0", "m2"), ("m1", "m2")]}
    by_hand = (h[("m0",)] / 3 + (h[("m0", "m1")] - h[("m1",)]) / 6
               + (h[("m0", "m2")] - h[("m2",)]) / 6 + (ctx.logits - h[("m1", "m2")]) / 3)
    torch.testing.assert_close(phi["m0"], by_hand, rtol=RTOL, atol=ATOL)
    # permutation sampling: still efficient on any head; exact for an additive game (late head
    # with v({}) = the all-baseline logits; with v({}) = 0 the bias makes it non-additive)
    sampled = md.AGM(max_exact=2, permutations=3).shapley(ctx)
    torch.testing.assert_close(sum(sampled.values()), ctx.logits, rtol=RTOL, atol=ATOL)
    late = make_model(3, "late")
    lctx = _ctx(late, make_inputs(late, batch=4), torch.arange(4) % 3)
    exact = md.AGM(empty="baseline").shapley(lctx)
    approx = md.AGM(empty="baseline", max_exact=2, permutations=2).shapley(lctx)
    for m in late.modalities:
        torch.testing.assert_close(approx[m], exact[m], rtol=RTOL, atol=ATOL)
    perms = torch.tensor([[0, 1, 2], [2, 1, 0]])
    a = shapley_matrix(3, permutations=perms)
    assert a[0, 0b001] == pytest.approx(0.5) and a[0, 0b110] == pytest.approx(-0.5)
    v = {k: torch.full((1, 1), float(k)) for k in range(1, 8)}
    assert float(sum(shapley_outputs(v, shapley_matrix(3), "abc").values())) == pytest.approx(7.0)


def test_agm_loss_keeps_the_value_and_scales_the_gradients_by_c():
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    ctx = _ctx(model, x, y)
    plain = torch.autograd.grad(ctx.losses["multimodal"], list(model.parameters()), retain_graph=True)
    plain = dict(zip([n for n, _ in model.named_parameters()], plain, strict=True))
    reg = md.AGM(alpha=0.5)
    reg.running, reg.count = {"m0": 0.8, "m1": 1.4}, 5  # away from balance: c away from 1
    reg.on_after_forward(ctx)
    c = reg.coefficients
    assert abs(c["m0"] - 1) > 0.1 and abs(c["m1"] - 1) > 0.1
    assert float(ctx.losses["multimodal"].detach()) == pytest.approx(float(F.cross_entropy(ctx.logits, y).detach()),
                                                            rel=1e-5)
    ctx.losses["multimodal"].backward()
    d0 = model.feature_dims["m0"]
    for m in model.modalities:
        for n, p in model.encoders[m].named_parameters():
            torch.testing.assert_close(p.grad, c[m] * plain[f"encoders.{m}.{n}"], rtol=RTOL, atol=ATOL)
    w = model.fusion.fc.weight.grad
    torch.testing.assert_close(w[:, :d0], c["m0"] * plain["fusion.fc.weight"][:, :d0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(w[:, d0:], c["m1"] * plain["fusion.fc.weight"][:, d0:], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.fusion.fc.bias.grad, (c["m0"] + c["m1"]) / 2 * plain["fusion.fc.bias"],
                               rtol=RTOL, atol=ATOL)


def test_agm_running_mean_order_window_and_logging():
    model = _hand_concat()
    reg = md.AGM(start_epoch=1)
    reg.running, reg.count = {"a": 1.0, "v": 1.0}, 1
    # one sample: s_a = 0.5, s_v = 1.0 -> the R7 numbers (sums of -log p, then the count)
    c = reg._update(torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64), model.modalities, epoch=1)
    assert c["a"] == pytest.approx(0.5227, abs=1e-4) and c["v"] == pytest.approx(1.4821, abs=1e-4)
    assert reg.running == pytest.approx({"a": 0.75, "v": 1.0})  # (1 * 1 + 0.5) / 2
    assert reg.count == 2
    c0 = reg._update(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), model.modalities, epoch=0)
    assert c0 == {"a": 1.0, "v": 1.0}  # before start_epoch: no modulation ...
    assert reg.running == pytest.approx({"a": (0.75 * 2 + 0.5) / 3, "v": (1.0 * 2 + 1.5) / 3})  # ... but updated
    logs = reg.collect_logs()
    assert set(logs) >= {"score", "running_score", "ratio", "optimal_ratio", "coefficient", "capped"}
    assert logs["coefficient"]["a"] == pytest.approx((0.5227 + 1.0) / 2, abs=1e-4)
    assert logs["running_score"]["a"] == pytest.approx((1.0 + 0.75) / 2)
    assert md.AGM().end_epoch == 20 and md.AGM(variant="released").end_epoch is None
    assert not md.AGM(end_epoch=3).active(3) and md.AGM(end_epoch=3, variant="released").active(3)


def test_agm_released_multiplies_non_1d_encoder_grads_and_clips():
    torch.manual_seed(0)
    model = make_model(2, "concat")
    x, y = make_inputs(model, batch=8), torch.arange(8) % 3
    ctx = _ctx(model, x, y)
    reg = md.AGM(variant="released", alpha=1.0, clip=None)
    reg.running, reg.count = {"m0": 0.3, "m1": 1.9}, 5
    reg.on_after_forward(ctx)
    assert torch.equal(ctx.losses["multimodal"], F.cross_entropy(ctx.logits, y))  # loss untouched
    with torch.no_grad():
        phi = reg.shapley(ctx)
    s = {m: float(-F.log_softmax(phi[m], 1).gather(1, y[:, None]).mean()) for m in model.modalities}
    expected = agm_coefficients(s, {"m0": 0.3, "m1": 1.9}, 1.0, 7.0, "released")["coefficient"]
    ctx.losses["multimodal"].backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    for m in model.modalities:
        assert reg.coefficients[m] == pytest.approx(expected[m], rel=1e-5)
        for n, p in model.encoders[m].named_parameters():
            k = expected[m] if p.dim() != 1 else 1.0  # biases untouched, as released
            torch.testing.assert_close(p.grad, k * before[f"encoders.{m}.{n}"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.fusion.fc.weight.grad, before["fusion.fc.weight"])  # head untouched
    # clipping: a head-weight gradient entry beyond +-clip clips the total norm to clip
    clip = md.AGM(variant="released", clip=0.01)
    clip.on_after_forward(ctx)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert float(model.fusion.fc.weight.grad.abs().max()) > 0.01 and float(total) > 0.01
    clip.on_before_optimizer_step(ctx)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert float(total) == pytest.approx(0.01, rel=1e-3)


# ====================================================================== CML
def test_cml_chain_loss_matches_the_r11_numbers():
    y = torch.tensor([0])
    z_n, z_a = torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    assert float(md.regulators.cml.confidence(z_n)) == pytest.approx(0.8808, abs=1e-4)
    assert float(md.regulators.cml.confidence(z_a)) == pytest.approx(0.9526, abs=1e-4)
    assert float(cml_chain_loss([z_n, z_a], y, 0.0)) == pytest.approx(0.0877, abs=1e-4)
    assert float(cml_chain_loss([z_n, z_a], y, 0.1)) == pytest.approx(0.0949, abs=1e-4)
    assert float(cml_chain_loss([z_a, z_n], y, 0.1)) == pytest.approx(0.0877, abs=1e-4)  # no rise


def test_cml_regulator_on_a_hand_made_head_gives_the_r11_loss():
    # z_N = (2, 0), z_{a} = (3, 0): W_a f_a + b = (3, 0), W_v f_v = (-1, 0)
    enc = {"a": torch.nn.Identity(), "v": torch.nn.Identity()}
    model = md.MultimodalClassifier(enc, {"a": 1, "v": 1}, 2, fusion="concat")
    with torch.no_grad():
        model.fusion.fc.weight.copy_(torch.tensor([[3.0, -1.0], [0.0, 0.0]]))
        model.fusion.fc.bias.zero_()
    x, y = {"a": torch.ones(1, 1), "v": torch.ones(1, 1)}, torch.tensor([0])
    reg = md.CML(lam=0.1)
    step = next(t for t in range(50) if reg.order(StepContext(model=model, step=t))[0] == 1)
    ctx = _ctx(model, x, y, step=step)  # this step removes v first: the chain N -> {a}
    reg.on_after_forward(ctx)
    assert reg.last_order == ["v", "a"]
    assert float(ctx.losses["multimodal"] + ctx.losses["cml"]) == pytest.approx(0.0949, abs=1e-4)
    other = next(t for t in range(50) if reg.order(StepContext(model=model, step=t))[0] == 0)
    ctx = _ctx(model, x, y, step=other)  # removes a: z_{v} = (-1, 0) is less confident, no hinge
    reg.on_after_forward(ctx)
    ce_v = float(F.cross_entropy(torch.tensor([[-1.0, 0.0]]), y))
    assert float(ctx.losses["multimodal"] + ctx.losses["cml"]) == pytest.approx((0.1269 + ce_v) / 2, abs=1e-4)
    reg.on_train_epoch_end(ctx)
    logs = reg.collect_logs()
    assert logs["violation_rate"] == {"a": 0.0, "v": 1.0}
    assert logs["violation"]["v"] == pytest.approx(0.0718, abs=1e-4)
    assert logs["removed"] == {"a": 0.5, "v": 0.5} and logs["lam"] == 0.1


def test_cml_three_modality_chain_and_all_pairs_is_the_mean_over_orders():
    torch.manual_seed(0)
    model = make_model(3, "gated")
    x, y = make_inputs(model, batch=6), torch.arange(6) % 3
    ctx = _ctx(model, x, y)
    masks = list(range(1, 8))
    vals = {k: model.head(ctx.features, present=[m for i, m in enumerate(model.modalities) if k >> i & 1])
            for k in masks}
    chains = []
    for order in itertools.permutations(range(3)):
        chain = [7]
        for i in order[:-1]:
            chain.append(chain[-1] & ~(1 << i))
        chains.append(cml_chain_loss([vals[k] for k in chain], y, 0.3))
    mean_chain = sum(chains) / len(chains)
    torch.testing.assert_close(cml_all_pairs_loss(vals, 3, y, 0.3), mean_chain, rtol=RTOL, atol=ATOL)
    reg = md.CML(lam=0.3, all_pairs=True)
    reg.on_after_forward(ctx)
    torch.testing.assert_close(ctx.losses["multimodal"] + ctx.losses["cml"], mean_chain, rtol=RTOL, atol=ATOL)
    # the random chain of the regulator is one of the six, chosen by (seed, step)
    chain_reg = md.CML(lam=0.3)
    ctx2 = _ctx(model, x, y, step=4)
    chain_reg.on_after_forward(ctx2)
    order = [model.modalities.index(m) for m in chain_reg.last_order]
    idx = list(itertools.permutations(range(3))).index(tuple(order))
    torch.testing.assert_close(ctx2.losses["multimodal"] + ctx2.losses["cml"], chains[idx],
                               rtol=RTOL, atol=ATOL)


def test_cml_orders_per_step_or_per_epoch_and_released_batch_sum_hinge():
    model = make_model(3, "concat")
    orders = {tuple(md.CML().order(StepContext(model=model, step=t))) for t in range(30)}
    assert len(orders) > 3  # a new order per step ...
    assert md.CML(seed=5).order(StepContext(model=model, step=7)) == \
        md.CML(seed=5).order(StepContext(model=model, step=7))  # ... the same for the same (seed, step)
    rel = md.CML(variant="released")
    assert rel.permute == "epoch" and rel.hinge == "sum"
    per_epoch = {tuple(rel.order(StepContext(model=model, step=t, epoch=2))) for t in range(30)}
    assert len(per_epoch) == 1
    # rises +0.3 and -0.5 (two samples): mean of relu = 0.15, relu of the sum = 0
    big = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    small = torch.tensor([[math.log(0.8 / 0.2), 0.0], [0.0, 0.0]])
    conf_big = md.regulators.cml.confidence(big)
    rise = md.regulators.cml.confidence(small) - conf_big
    y = torch.tensor([0, 0])
    ce = (F.cross_entropy(big, y) + F.cross_entropy(small, y)) / 2
    assert float(cml_chain_loss([big, small], y, 1.0, "mean")) == pytest.approx(
        float(ce + F.relu(rise).mean()), abs=1e-6)
    assert float(cml_chain_loss([big, small], y, 1.0, "sum")) == pytest.approx(
        float(ce + F.relu(rise.sum())), abs=1e-6)
    assert float(rise[0]) > 0 > float(rise.sum())


# ====================================================================== loops, logs, resume
def _three():
    return md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.0, "b": 1.0, "c": 0.3},
                                 dims=6, seed=1)


KEYS = {"AGM": {"score", "running_score", "ratio", "optimal_ratio", "coefficient", "capped"},
        "CML": {"violation_rate", "violation", "removed"}}


@pytest.mark.parametrize("make", [lambda: md.AGM(), lambda: md.AGM(variant="released"),
                                  lambda: md.CML(), lambda: md.CML(variant="released")],
                         ids=["AGM", "AGM-released", "CML", "CML-released"])
def test_fit_gated_three_modalities_default_arguments(make):
    data = _three()

    def train(reg):
        torch.manual_seed(0)
        model = md.models.default_model(data, fusion="gated", feature_dim=6)
        hist = md.fit(model, data.train.loader(32, shuffle=True), epochs=2, regulator=reg,
                      progress=False, seed=0)
        return model, hist

    reg = make()
    model, hist = train(reg)
    joint, _ = train(None)
    diff = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), joint.parameters(), strict=True))
    assert diff > 0  # the regulator acted (released AGM: alpha 0.1 moves little in 2 epochs)
    logs = hist[-1]["regulator"]
    assert KEYS[type(reg).__name__] <= set(logs)
    for key in KEYS[type(reg).__name__]:
        assert set(logs[key]) == {"a", "b", "c"} and all(math.isfinite(v) for v in logs[key].values())


@pytest.mark.parametrize("make", [lambda: md.AGM(alpha=2.0), lambda: md.AGM(variant="released", alpha=1.0),
                                  lambda: md.CML(lam=1.0)], ids=["AGM", "AGM-released", "CML"])
def test_resumed_run_ends_with_identical_weights(synth, tmp_path, make):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(synth, feature_dim=6)
        md.fit(model, synth.train.loader(128, shuffle=True), epochs=epochs, regulator=make(),
               checkpoint_dir=ckpt, resume=resume, restore_best=False, progress=False, seed=3)
        return model

    full = run(3, tmp_path / "full", False)
    run(1, tmp_path / "split", False)
    resumed = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_agm_state_dict_round_trip_and_fresh_run_resets():
    reg = md.AGM()
    reg.running, reg.count = {"a": 0.4, "b": 1.2}, 7
    other = md.AGM()
    other.load_state_dict(reg.state_dict())
    assert other.running == {"a": 0.4, "b": 1.2} and other.count == 7
    other.on_fit_start(None)  # a restored state survives the next run start ...
    assert other.count == 7
    other.on_fit_start(None)  # ... a fresh run forgets it
    assert other.count == 0 and other.running == {}


@pytest.mark.parametrize("make", [lambda: md.AGM(alpha=2.0), lambda: md.AGM(alpha=2.0, variant="released"),
                                  lambda: md.CML(lam=1.0)], ids=["AGM", "AGM-released", "CML"])
def test_plain_loop_and_lightning_equal_fit(synth, make):
    def model():
        torch.manual_seed(0)
        return md.models.default_model(synth, feature_dim=6)

    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    md.fit(ref, synth.train.loader(128), epochs=2, optimizer=opt, regulator=make(), seed=None,
           progress=False)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run = md.Regulation(net, opt, make())
    for epoch in range(2):
        for inputs, labels in run.epoch_start(epoch, synth.train.loader(128)):
            opt.zero_grad()
            run.backward(inputs, labels)
            opt.step()
        run.epoch_end()
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    lit = ModalDiagModule(model(), lr=0.05, weight_decay=0.0)
    cb = ModalDiagCallback(make(), monitor=False)
    pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(lit, synth.train.loader(128))
    for a, b in zip(ref.parameters(), lit.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert "regulator" in cb.logs[-1]


def test_composition_refuses_agm_with_other_gradient_rewriters():
    with pytest.raises(ValueError, match="AGM cannot be combined"):
        md.training.loop.as_callbacks([md.AGM(), md.OGM()])
    with pytest.raises(ValueError, match="AGM cannot be combined"):
        md.training.loop.as_callbacks([md.AGM(), md.MMPareto()])
    md.training.loop.as_callbacks([md.CML(), md.OGM()])  # a loss term: combines


BAD = [
    (md.AGM, {"alpha": -1.0}, "alpha"), (md.AGM, {"alpha": NAN}, "alpha"), (md.AGM, {"cap": 0.0}, "cap"),
    (md.AGM, {"cap": INF}, "cap"), (md.AGM, {"start_epoch": -1}, "start_epoch"),
    (md.AGM, {"start_epoch": 5, "end_epoch": 3}, "end_epoch"), (md.AGM, {"end_epoch": "late"}, "end_epoch"),
    (md.AGM, {"empty": "mean"}, "empty"), (md.AGM, {"empty": "baseline", "variant": "released"}, "empty"),
    (md.AGM, {"clip": 0.0}, "clip"), (md.AGM, {"max_exact": 1}, "max_exact"),
    (md.AGM, {"permutations": 0}, "permutations"), (md.AGM, {"seed": -1}, "seed"),
    (md.AGM, {"variant": "bb"}, "variant"),
    (md.CML, {"lam": -0.1}, "lam"), (md.CML, {"lam": NAN}, "lam"), (md.CML, {"all_pairs": 1}, "all_pairs"),
    (md.CML, {"permute": "step"}, "permute"), (md.CML, {"hinge": "max"}, "hinge"),
    (md.CML, {"start_epoch": 1.5}, "start_epoch"), (md.CML, {"start_epoch": 2, "end_epoch": 2}, "end_epoch"),
    (md.CML, {"seed": 0.5}, "seed"), (md.CML, {"variant": "authors"}, "variant"),
]


@pytest.mark.parametrize("cls, kwargs, arg", BAD, ids=[f"{c.__name__}-{a}-{k[a]!r}" for c, k, a in BAD])
def test_bad_arguments_are_refused_naming_the_argument(cls, kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=rf"{cls.__name__}: .*\b{arg}\b"):
        cls(**kwargs)


def test_constraints_are_declared_for_every_argument():
    import inspect

    for cls in (md.AGM, md.CML):
        assert set(inspect.signature(cls).parameters) <= set(cls._parameter_constraints), cls.__name__
    md.AGM(alpha=0.0, end_epoch=None, empty="baseline", clip=1.0, max_exact=2)
    md.CML(lam=0.0, all_pairs=True, permute="epoch", hinge="sum", end_epoch=1)


def test_cml_all_pairs_logs_every_link_of_the_lattice():
    """all_pairs at M = 3: the logged violation rate of modality i is the mean, over every link
    (S, S minus i) with |S| >= 2 (pairs -> singletons included), of the share of samples whose
    confidence rises."""
    from modaldiag.regulators.cml import confidence

    model = make_model(3, "film", seed=4)  # a head whose links violate at different rates
    x, y = make_inputs(model, batch=16, seed=7), torch.arange(16) % 3
    ctx = _ctx(model, x, y)
    reg = md.CML(lam=0.3, all_pairs=True)
    reg.on_after_forward(ctx)
    reg.on_train_epoch_end(ctx)
    logs = reg.collect_logs()
    mods = model.modalities
    values = {k: model.head(ctx.features, present=[m for i, m in enumerate(mods) if k >> i & 1])
              for k in range(1, 8)}
    seen = []
    for i, m in enumerate(mods):
        rates = [float((confidence(values[k & ~(1 << i)]) > confidence(values[k])).float().mean())
                 for k in range(1, 8) if bin(k).count("1") >= 2 and k >> i & 1]
        assert len(rates) == 3  # the full set and the two pairs that contain m
        assert logs["violation_rate"][m] == pytest.approx(sum(rates) / len(rates), abs=1e-6)
        seen.append(len(set(rates)) > 1)
    assert any(seen)  # the links' rates differ, so dropping any link changes a logged rate
