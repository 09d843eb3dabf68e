"""MLA (R15): closed forms, the M optimizer steps per batch against a brute-force replay (head
updated by the earlier modality, projection of the head-weight gradient, a = 0.1^(1 + t/T)),
the caller's optimizer.step() as a no-op, the test-time fusion used by md.fit's validation,
exact resume, M = 3, the shared head, the non-shared fallback, refusals."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.models.fusion import SharedFusion
from modaldiag.regulators.mla import (
    MLA,
    mla_fusion_weights,
    mla_project_gradient,
    mla_projector_update,
    mla_step_size,
)

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tiny():
    return md.datasets.synthetic(n_samples=240, num_classes=3, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 6, "b": 6}, seed=0)


@pytest.fixture(scope="module")
def tiny3():
    return md.datasets.synthetic(n_samples=240, num_classes=3,
                                 strength={"a": 2.5, "b": 0.6, "c": 1.0},
                                 dims={"a": 6, "b": 6, "c": 6}, seed=0)


class CountingSGD(torch.optim.SGD):
    """SGD that counts its steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure)


def linear_model(mods=("a", "b"), d_in=4, d=3, num_classes=2, fusion="shared", seed=0):
    torch.manual_seed(seed)
    return md.MultimodalClassifier({m: nn.Linear(d_in, d) for m in mods}, {m: d for m in mods},
                                   num_classes, fusion=fusion)


# ====================================================================== closed forms
def test_r15_projector_and_projection_closed_form():
    """R15: d = 2, P = I, r = (1, 0), a = 0.1 -> P = diag(0.09054, 0.99589);
    grad W = [1, 1] -> [0.0905, 0.9959] (BB's additive form: [1.0905, 1.9959])."""
    P = mla_projector_update(torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.0]), 0.1)
    # hand: I - e1 e1^T / 1.1 = diag(1/11, 1), divided by sqrt(1/121 + 1)
    expected = torch.diag(torch.tensor([1 / 11, 1.0], dtype=torch.float64)) / math.sqrt(1 / 121 + 1)
    torch.testing.assert_close(P, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.diagonal(P), torch.tensor([0.09054, 0.99589], dtype=torch.float64),
                               rtol=0, atol=1e-5)
    g = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(mla_project_gradient(g, P), torch.tensor([[0.090536, 0.995893]]),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(mla_project_gradient(g, P, additive=True),
                               torch.tensor([[1.090536, 1.995893]]), rtol=0, atol=1e-5)
    # a non-axis r: P r^T shrinks along r, the orthogonal direction is kept (before normalising)
    r = torch.tensor([0.6, 0.8], dtype=torch.float64)
    P2 = mla_projector_update(torch.eye(2, dtype=torch.float64), r, 0.01)
    ortho = torch.tensor([0.8, -0.6], dtype=torch.float64)
    ratio = (P2 @ r).norm() / (P2 @ ortho).norm()
    assert float(ratio) == pytest.approx(0.01 / 1.01, rel=1e-6)  # 1 - 1/(a + 1) along r
    assert float(torch.linalg.matrix_norm(P2)) == pytest.approx(1.0, rel=1e-12)


def test_r15_fusion_weights_closed_form():
    """p_a = (0.5, 0.5) (e = ln 2), p_v = (1, 0) (e = 0) -> lambda = (1/3, 2/3)."""
    z_a = torch.tensor([[0.0, 0.0]])
    z_v = torch.tensor([[60.0, -60.0]])  # p = (1, 0) to float precision
    lam = mla_fusion_weights({"a": z_a, "v": z_v})
    torch.testing.assert_close(lam, torch.tensor([[1 / 3, 2 / 3]]), rtol=RTOL, atol=ATOL)
    # written as exp(max e - e_m) / sum_j exp(max e - e_j): the same numbers
    e = torch.tensor([math.log(2), 0.0])
    alt = torch.exp(e.max() - e) / torch.exp(e.max() - e).sum()
    torch.testing.assert_close(lam[0], alt, rtol=RTOL, atol=ATOL)


def test_batch_entropy_weights_are_one_number_per_modality():
    """Released code: softmax over the batch, entropy summed over the batch."""
    z_a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    z_b = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]])

    def ent(z):
        p = torch.softmax(z, dim=0)
        return float(-(p * p.log()).sum())

    e = torch.tensor([ent(z_a), ent(z_b)])
    expected = torch.softmax(-e, 0)
    lam = mla_fusion_weights([z_a, z_b], entropy="batch")
    assert lam.shape == (3, 2)
    for row in lam:
        torch.testing.assert_close(row, expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="entropy"):
        mla_fusion_weights([z_a, z_b], entropy="row")


def test_step_size_schedule():
    assert mla_step_size(0, 10) == pytest.approx(0.1)
    assert mla_step_size(5, 10) == pytest.approx(0.1 ** 1.5)
    assert mla_step_size(3, None) == pytest.approx(0.1)


def test_shared_head_sum_unimodal_logits_coalitions_and_unequal_dims():
    model = linear_model(("a", "b", "c"), d=3, num_classes=4, fusion="shared")
    assert isinstance(model.fusion, SharedFusion)
    f = {m: torch.randn(5, 3) for m in model.modalities}
    fc = model.fusion.fc
    torch.testing.assert_close(model.head(f), fc(f["a"] + f["b"] + f["c"]), rtol=RTOL, atol=ATOL)
    uni = model.unimodal_logits(f)  # the coalition fast path
    for m in model.modalities:
        torch.testing.assert_close(uni[m], fc(f[m]), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(model.head(f, present=(m,)), fc(f[m]), rtol=RTOL, atol=ATOL)
    masks = torch.tensor([[True, True, False], [False, False, False]])
    got = model.head_coalitions(f, masks)
    torch.testing.assert_close(got[0], fc(f["a"] + f["b"]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], fc.bias.expand(5, -1), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"'a': 3, 'b': 2"):
        md.MultimodalClassifier({"a": nn.Identity(), "b": nn.Identity()}, {"a": 3, "b": 2}, 2,
                                fusion="shared")


# ====================================================================== the M steps
def _replay(model, batches, lr, projection, T):
    """Brute force: per batch, per modality: z_m with the current head, CE, plain autograd,
    projection of the head-weight gradient, an SGD step by hand."""
    net = copy.deepcopy(model)
    P, updates = torch.eye(net.fusion.fc.in_features, dtype=torch.float64), 0
    enc_sq = {m: [] for m in net.modalities}
    for t, (x, y) in enumerate(batches):
        feats = {m: net.encoders[m](x[m]) for m in net.modalities}
        for m in net.modalities:
            enc = list(net.encoders[m].parameters())
            head = [net.fusion.fc.weight, net.fusion.fc.bias]
            loss = F.cross_entropy(net.fusion.fc(feats[m]), y)
            grads = torch.autograd.grad(loss, enc + head, retain_graph=True)
            g_w = grads[len(enc)]
            enc_sq[m].append(sum(float(g.pow(2).sum()) for g in grads[:len(enc)]))
            if projection != "off" and updates > 0:
                r = feats[m].detach().double().mean(0, keepdim=True)
                a = 0.1 ** (1 + t / T)
                k = P @ r.T
                P = P - k @ k.T / (a + float(r @ k))
                P = P / P.norm()
                proj = g_w @ P.float().T
                g_w = g_w + proj if projection == "additive" else proj
            grads = list(grads)
            grads[len(enc)] = g_w
            with torch.no_grad():
                for p, g in zip(enc + head, grads, strict=True):
                    p -= lr * g
            updates += 1
    return net, P, {m: sum(v) / len(v) for m, v in enc_sq.items()}


@pytest.mark.parametrize("projection", ["paper", "additive", "off"])
def test_steps_match_a_brute_force_replay(projection):
    """Two batches, M = 2: four SGD steps; modality b's loss uses the head a's step produced;
    the projector is updated and applied from the second update on, with a = 0.1^(1 + t/T)."""
    model = linear_model()
    gen = torch.Generator().manual_seed(1)
    batches = [({m: torch.randn(8, 4, generator=gen) for m in ("a", "b")},
                torch.randint(0, 2, (8,), generator=gen)) for _ in range(2)]
    expected, P, enc_sq = _replay(model, batches, lr=0.5, projection=projection, T=len(batches))
    opt = CountingSGD(model.parameters(), lr=0.5)
    reg = MLA(projection=projection)
    run = md.Regulation(model, opt, reg)
    loader = run.epoch_start(0, batches)
    for x, y in loader:
        run.backward(x, y)
        assert all(p.grad is None for p in model.parameters())
        opt.step()  # the caller's step: nothing to do
    logs = run.epoch_end()["regulator"]
    assert logs["encoder_grad_sq"] == pytest.approx(enc_sq, rel=1e-5)  # what FisherMonitor sums
    assert opt.calls == 2 * 2 + 2  # M per batch by MLA, plus the caller's no-op steps
    for (n, a), (_, b) in zip(model.state_dict().items(), expected.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=n)
    if projection == "off":
        assert reg.projector is None
    else:
        torch.testing.assert_close(reg.projector, P, rtol=RTOL, atol=ATOL)
    assert reg.updates == 4


def test_projection_changes_the_head_and_only_the_head_weight():
    """Against projection='off' from the same start: the same first update, then only the head
    weight differs after the second (the bias and encoder b are not projected)."""
    gen = torch.Generator().manual_seed(2)
    x = {m: torch.randn(8, 4, generator=gen) for m in ("a", "b")}
    y = torch.randint(0, 2, (8,), generator=gen)
    out = {}
    for projection in ("paper", "off"):
        model = linear_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        run = md.Regulation(model, opt, MLA(projection=projection))
        run.epoch_start(0, [(x, y)])
        run.backward(x, y)
        out[projection] = model.state_dict()
    differs = {k for k in out["paper"] if not torch.equal(out["paper"][k], out["off"][k])}
    assert differs == {"fusion.fc.weight"}


def test_callers_step_is_a_no_op_with_momentum_and_weight_decay():
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    run = md.Regulation(model, opt, MLA())
    x = {m: torch.randn(6, 4) for m in ("a", "b")}
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    run.epoch_start(0, [(x, y)])
    run.backward(x, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stale_gradients_are_not_stepped():
    """A gradient left on encoder b before backward must not move b during a's step."""
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = {m: torch.randn(6, 4) for m in ("a", "b")}
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for p in model.encoders["b"].parameters():
        p.grad = torch.full_like(p, 100.0)
    for net, o in ((model, opt), (ref, ref_opt)):
        run = md.Regulation(net, o, MLA())
        run.epoch_start(0, [(x, y)])
        run.backward(x, y)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


# ====================================================================== md.fit
def test_fit_validates_with_mla_predict_and_logs(tiny):
    model = md.models.default_model(tiny, feature_dim=4, fusion="shared")
    reg = MLA()
    val = tiny.val.loader(64)
    hist = md.fit(model, tiny.train.loader(32, shuffle=True), val_loader=val, epochs=2,
                  regulator=reg, seed=0, progress=False, restore_best=False)
    rec = hist[-1]
    res = md.probes.evaluate(model, val, predict=lambda f: reg.predict(model, f))
    assert rec["val"]["acc"] == pytest.approx(res.accuracy, abs=1e-12)
    head_only = md.probes.evaluate(model, val)
    assert res.accuracy != head_only.accuracy or res.loss != pytest.approx(head_only.loss)
    weights = rec["val"]["fusion_weight"]
    assert set(weights) == {"a", "b"} and sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
    assert weights["a"] > weights["b"]  # a is the strong modality: more certain
    logs = rec["regulator"]
    assert set(logs["ce"]) == {"a", "b"} and set(logs["projector_norm"]) == {"a", "b"}
    assert all(v > 0 for v in logs["encoder_grad_sq"].values())
    assert all(0 < v <= 1.0 + 1e-9 for v in logs["grad_kept"].values())
    assert math.isfinite(logs["ce"]["b"])
    assert hist[0]["regulator"]["ce"]["a"] > logs["ce"]["a"]  # a's unimodal loss falls
    # the Fisher monitor (on by default) reads the gradients MLA measured before its own steps
    for m in ("a", "b"):
        assert rec["fisher"][m] == pytest.approx(logs["encoder_grad_sq"][m], rel=1e-5)
    # the evaluation weights are the mean of the per-sample lambda over the validation set
    lam = []
    with torch.no_grad():
        model.eval()
        for x, _ in val:
            lam.append(reg.fusion_weights(model, reg.unimodal_logits(model, model.encode(x))))
    lam = torch.cat(lam).double().mean(0)
    assert weights["a"] == pytest.approx(float(lam[0]), rel=1e-5)


def test_fit_counts_m_steps_per_batch_with_three_modalities(tiny3):
    model = md.models.default_model(tiny3, feature_dim=4, fusion="shared")
    opt = CountingSGD(model.parameters(), lr=0.05)
    loader = tiny3.train.loader(64)
    hist = md.fit(model, loader, val_loader=tiny3.val.loader(64), epochs=2, optimizer=opt,
                  regulator=MLA(fusion="fixed", weights={"a": 0.35, "b": 0.25, "c": 0.4}),
                  seed=0, progress=False, restore_best=False)
    assert opt.calls == 2 * len(loader) * (3 + 1)  # 3 MLA steps + the caller's no-op per batch
    assert set(hist[-1]["regulator"]["ce"]) == {"a", "b", "c"}
    assert hist[-1]["val"]["fusion_weight"] == pytest.approx({"a": 0.35, "b": 0.25, "c": 0.4})


def test_fixed_fusion_default_equal_and_dynamic_predict_by_hand():
    model = linear_model(num_classes=3)
    f = {m: torch.randn(5, 3) for m in model.modalities}
    z = {m: model.fusion.fc(f[m]) for m in model.modalities}
    torch.testing.assert_close(MLA(fusion="fixed").predict(model, f), (z["a"] + z["b"]) / 2,
                               rtol=RTOL, atol=ATOL)
    ent = {m: -(F.softmax(z[m], 1) * F.log_softmax(z[m], 1)).sum(1) for m in z}
    lam_a = torch.exp(-ent["a"]) / (torch.exp(-ent["a"]) + torch.exp(-ent["b"]))
    expected = lam_a[:, None] * z["a"] + (1 - lam_a)[:, None] * z["b"]
    torch.testing.assert_close(MLA().predict(model, f), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("make", [lambda: MLA(), lambda: MLA(variant="released")])
def test_resumed_run_ends_with_identical_weights_and_projector(tiny, tmp_path, make):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(tiny, feature_dim=4, fusion="shared")
        reg = make()
        md.fit(model, tiny.train.loader(32, shuffle=True), epochs=epochs, regulator=reg,
               checkpoint_dir=ckpt, resume=resume, restore_best=False, progress=False, seed=3,
               optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        return model, reg

    full, reg_full = run(3, tmp_path / "full", False)
    run(2, tmp_path / "split", False)
    resumed, reg_res = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    s_full, s_res = reg_full.state_dict(), reg_res.state_dict()
    assert s_full["updates"] == s_res["updates"] == 3 * len(tiny.train.loader(32)) * 2
    if s_full["projector"] is None:
        assert s_res["projector"] is None  # the released code never updates P
    else:
        assert torch.equal(s_full["projector"], s_res["projector"])


def test_state_round_trip_and_reset():
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = MLA()
    run = md.Regulation(model, opt, reg)
    x = {m: torch.randn(6, 4) for m in ("a", "b")}
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    run.epoch_start(0, [(x, y)])
    run.backward(x, y)
    run.epoch_end()
    fresh = MLA()
    fresh.load_state_dict(reg.state_dict())
    assert torch.equal(fresh.projector, reg.projector) and fresh.updates == reg.updates == 2
    fresh.reset()
    assert fresh.projector is None and fresh.updates == 0
    with pytest.raises(ValueError, match="unknown state keys"):
        MLA().load_state_dict({"P": torch.eye(2)})
    # one object, two runs: the second starts afresh (first update unprojected again)
    run2 = md.Regulation(model, opt, reg)
    run2.epoch_start(0, [(x, y)])
    assert reg.projector is None and reg.updates == 0


# ====================================================================== other heads, refusals
def test_non_shared_head_trains_without_projection(tiny):
    model = md.models.default_model(tiny, feature_dim=4, fusion="concat")
    reg = MLA()
    with pytest.warns(UserWarning, match="WITHOUT the head-gradient projection"):
        hist = md.fit(model, tiny.train.loader(32, shuffle=True), val_loader=tiny.val.loader(64),
                      epochs=3, regulator=reg, seed=0, progress=False, restore_best=False)
    assert reg.projector is None and "projector_norm" not in hist[-1]["regulator"]
    assert hist[-1]["regulator"]["ce"]["a"] < hist[0]["regulator"]["ce"]["a"]
    assert hist[-1]["val"]["acc"] > 0.6  # 3 classes: chance is 1/3
    f = {m: torch.randn(4, 4) for m in model.modalities}
    uni = reg.unimodal_logits(model, f)
    for m in model.modalities:  # h(f, present={m})
        torch.testing.assert_close(uni[m], model.head(f, present=(m,)), rtol=RTOL, atol=ATOL)


def test_refusals():
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulate_grad_batches=1 and amp=False"):
        md.Regulation(model, opt, MLA(), amp=True)
    with pytest.raises(ValueError, match="accumulate_grad_batches=1 and amp=False"):
        md.Regulation(model, opt, MLA(), accumulate_grad_batches=2)
    x = {m: torch.randn(6, 4) for m in ("a", "b")}
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    run = md.Regulation(model, opt, MLA(), unimodal_loss_weight=0.5)
    run.epoch_start(0, [(x, y)])
    with pytest.raises(ValueError, match="unimodal_loss_weight=0"):
        run.backward(x, y)
    run = md.Regulation(model, opt, MLA(fusion="fixed", weights={"a": 1.0, "c": 1.0}))
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        run.epoch_start(0, [(x, y)])
    with pytest.raises(ValueError, match="max_grad_norm"):
        md.fit(model, [(x, y)], epochs=1, regulator=MLA(), max_grad_norm=1.0, progress=False)
    shared_enc = nn.Linear(4, 3)
    twin = md.MultimodalClassifier({"a": shared_enc, "b": shared_enc}, {"a": 3, "b": 3}, 2,
                                   fusion="shared")
    run = md.Regulation(twin, torch.optim.SGD(twin.parameters(), lr=0.1), MLA())
    with pytest.raises(ValueError, match="must not share parameters"):
        run.epoch_start(0, [(x, y)])


@pytest.mark.parametrize("kwargs,name", [
    ({"fusion": "mean"}, "fusion"), ({"projection": "orthogonal"}, "projection"),
    ({"entropy": "token"}, "entropy"), ({"variant": "bb"}, "variant"),
    ({"weights": {"a": 1.0}}, "fusion='fixed'"),
    ({"fusion": "fixed", "weights": {"a": -1.0, "b": 1.0}}, "weights"),
    ({"fusion": "fixed", "weights": {"a": 0.0, "b": 0.0}}, "positive"),
    ({"fusion": "fixed", "weights": {"a": float("nan"), "b": 1.0}}, "finite"),
    ({"fusion": "fixed", "weights": [0.5, 0.5]}, "weights")])
def test_bad_arguments_are_refused(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        MLA(**kwargs)


def test_released_variant_settings_and_config():
    reg = MLA(variant="released")
    assert (reg.projection, reg.entropy) == ("off", "batch")
    assert MLA(variant="released", projection="additive").projection == "additive"
    assert MLA().config() == {"fusion": "dynamic", "weights": None, "projection": "paper",
                              "entropy": "sample", "variant": "paper"}
    assert MLA.owns_optimizer_step is True


def test_non_finite_unimodal_loss_is_refused_before_its_step():
    model = linear_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = md.Regulation(model, opt, MLA())
    x = {m: torch.randn(6, 4) for m in ("a", "b")}
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    run.epoch_start(0, [(x, y)])
    x = {"a": x["a"].abs(), "b": x["a"].abs()}  # the same input for both
    with torch.no_grad():  # f_b = -f_a (huge): the fused z = W (f_a + f_b) + b is finite,
        for m, sign in (("a", 1.0), ("b", -1.0)):  # z_a = W f_a overflows
            model.encoders[m].weight.fill_(sign * 1e37)
            model.encoders[m].bias.zero_()
        model.fusion.fc.weight.fill_(10.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"modality 'a' is non-finite .* after 0 of"):
        run.backward(x, y)
    for k, v in model.state_dict().items():  # refused before a's step
        assert torch.equal(v, before[k]), k
