"""UMT and UME (R16): closed form, teacher training on copies, frozen teachers, distillation term,
resume without retraining, teacher files, UME's loss and prediction, refusals."""

import inspect
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.regulators.umt import (
    UME,
    UMT,
    choose_umt_or_ume,
    train_unimodal_models,
    ume_combine,
    umt_distillation_loss,
)
from modaldiag.training.callbacks import Callback, StepContext


@pytest.fixture(scope="module")
def duo():
    return md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 6, "b": 5}, seed=2)


@pytest.fixture(scope="module")
def tri():
    return md.datasets.synthetic(n_samples=90, num_classes=3,
                                 strength={"a": 2.0, "b": 1.0, "c": 0.3}, dims=4, seed=1)


def _model(data, seed=0, feat=6, fusion="concat"):
    torch.manual_seed(seed)
    return md.models.default_model(data, fusion=fusion, feature_dim=feat)


def _noisy_model(seed=0):
    """Encoders with BatchNorm and dropout: training them moves buffers and draws from the RNG."""
    torch.manual_seed(seed)
    enc = {m: nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
           for m, d in (("a", 6), ("b", 5))}
    return md.MultimodalClassifier(enc, {"a": 8, "b": 8}, 3)


def _fit(model, data, reg, epochs=2, **kw):
    kw.setdefault("restore_best", False)
    return md.fit(model, data.train.loader(32, shuffle=True), data.val.loader(64), epochs=epochs,
                  regulator=reg, progress=False, seed=0, **kw)


def _rng():
    return (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())


def _same_rng(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class _AtFirstEpoch(Callback):
    """Snapshot of the regulator's teachers after on_fit_start (at the first epoch start)."""

    def __init__(self, reg):
        self.reg, self.snap = reg, None

    def on_train_epoch_start(self, ctx):
        if self.snap is None:
            self.snap = {m: {k: v.clone() for k, v in t.state_dict().items()}
                         for m, t in self.reg.teachers.items()}


# ---------------------------------------------------------------- the closed forms
def test_r16_closed_form():
    f = {"a": torch.tensor([[1.0, 2.0]], requires_grad=True)}
    t = {"a": torch.zeros(1, 2, requires_grad=True)}
    loss, mse = umt_distillation_loss(f, t, 10.0)
    assert mse == {"a": 2.5}
    torch.testing.assert_close(loss, torch.tensor(25.0))
    loss.backward()
    torch.testing.assert_close(f["a"].grad, 10 * 2 * torch.tensor([[1.0, 2.0]]) / 2)
    assert t["a"].grad is None  # sg(T): the teacher gets no gradient
    # two modalities add; the mean runs over B * d_m entries of each
    loss2, mse2 = umt_distillation_loss({"a": torch.tensor([[1.0, 2.0]]), "b": torch.ones(2, 3)},
                                        {"a": torch.zeros(1, 2), "b": torch.zeros(2, 3)}, 10.0)
    assert mse2 == {"a": 2.5, "b": 1.0}
    torch.testing.assert_close(loss2, torch.tensor(35.0))
    with pytest.raises(ValueError, match="projection=True"):
        umt_distillation_loss({"a": torch.ones(1, 2)}, {"a": torch.ones(1, 3)}, 1.0)


def test_choice_rule_and_ensemble_combination():
    assert choose_umt_or_ume(0.71, 0.70) == "UMT"
    assert choose_umt_or_ume(0.70, 0.71) == "UME"
    assert choose_umt_or_ume(0.7, 0.7) == "UME"  # a tie goes to the cheaper ensemble
    with pytest.raises(ValueError, match="val_accuracy_umt"):
        choose_umt_or_ume(71.0, 0.7)
    z = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 0.0]])}
    torch.testing.assert_close(ume_combine(z), torch.tensor([[1.0, 0.0]]))
    p = F.softmax(ume_combine(z, "mean_probs"), 1)
    e2 = float(np.exp(2.0))
    torch.testing.assert_close(p, torch.tensor([[(e2 / (e2 + 1) + 0.5) / 2,
                                                 (1 / (e2 + 1) + 0.5) / 2]]))


# ---------------------------------------------------------------- teacher training
def test_teacher_training_leaves_model_rng_and_loader_untouched(duo):
    model = _noisy_model()
    gen = torch.Generator().manual_seed(3)
    loader = duo.train.loader(32, shuffle=True, generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [mod.training for mod in model.modules()]
    rng, gstate = _rng(), gen.get_state().clone()
    made = train_unimodal_models(model, loader, epochs=2, lr=0.05)
    assert _same_rng(rng, _rng()) and torch.equal(gstate, gen.get_state())
    assert [mod.training for mod in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    # ... while the copies did train (weights and BatchNorm statistics moved)
    enc_a = made["a"]["encoder"]
    assert not torch.equal(enc_a[0].weight, model.encoders["a"][0].weight)
    assert not torch.equal(enc_a[1].running_mean, model.encoders["a"][1].running_mean)
    assert made["a"]["split"] == "train" and not enc_a.training
    assert all(not p.requires_grad for p in enc_a.parameters())


def test_teacher_training_is_deterministic_and_its_accuracy_is_right(duo):
    model = _model(duo)
    val = duo.val.loader(64)
    one = train_unimodal_models(model, duo.train.loader(32, shuffle=True), epochs=2,
                                val_loader=val, seed=4)
    two = train_unimodal_models(model, duo.train.loader(32, shuffle=True), epochs=2,
                                val_loader=val, seed=4)
    for m in ("a", "b"):
        for (n, x), (_, y) in zip(one[m]["encoder"].state_dict().items(),
                                  two[m]["encoder"].state_dict().items(), strict=True):
            assert torch.equal(x, y), (m, n)
        enc, head = one[m]["encoder"], one[m]["head"]
        correct = n = 0
        with torch.no_grad():
            for inputs, y in val:
                correct += int((head(enc(inputs[m])).argmax(1) == y).sum())
                n += len(y)
        assert one[m]["split"] == "val" and one[m]["accuracy"] == pytest.approx(correct / n)


def test_fit_with_defaults_trains_teachers_at_the_start_and_logs(duo):
    model, reg = _model(duo), UMT()
    hist = _fit(model, duo, reg, epochs=2)
    assert reg.teachers_trained == 2 and set(reg.teachers) == {"a", "b"}
    rec = hist[-1]["regulator"]
    assert rec["variant"] == "UMT" and rec["active"] is True
    assert set(rec["distill_mse"]) == {"a", "b"} and all(v >= 0 for v in rec["distill_mse"].values())
    assert rec["teacher_val_accuracy"] == reg.teacher_accuracy
    assert all(0 <= v <= 1 for v in reg.teacher_accuracy.values())


def test_three_modalities(tri):
    model, reg = _model(tri, fusion="gated"), UMT(teacher_epochs=1, weight=1.0)
    hist = _fit(model, tri, reg, epochs=1)
    assert set(hist[-1]["regulator"]["distill_mse"]) == {"a", "b", "c"}


def test_inactive_umt_trains_exactly_like_no_regulator(duo):
    """Teacher training at fit start changes nothing the run sees: with the term outside the
    window, the run equals a plain one (dropout RNG, BatchNorm, loader order included)."""
    plain, with_umt = _noisy_model(), _noisy_model()
    _fit(plain, duo, None, epochs=1)
    reg = UMT(teacher_epochs=2, start_epoch=5)
    _fit(with_umt, duo, reg, epochs=1)
    assert reg.teachers_trained == 2
    for (n, a), (_, b) in zip(plain.state_dict().items(), with_umt.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n


def test_teachers_are_frozen_and_get_no_gradient(duo):
    model, reg = _model(duo), UMT(teacher_epochs=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    snap = _AtFirstEpoch(reg)
    _fit(model, duo, reg, epochs=2, callbacks=[snap])
    for m, t in reg.teachers.items():
        assert not t.training
        for k, v in t.state_dict().items():
            assert torch.equal(v, snap.snap[m][k]), (m, k)
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
    assert not torch.equal(model.state_dict()["encoders.a.net.0.weight"],
                           start["encoders.a.net.0.weight"])  # the student did train
    held = {id(p) for g in torch.optim.SGD(model.parameters(), lr=1).param_groups
            for p in g["params"]}
    assert not held & {id(p) for t in reg.teachers.values() for p in t.parameters()}


def test_distillation_term_equals_brute_force_mse(duo):
    torch.manual_seed(5)
    teachers = {"a": nn.Sequential(nn.Linear(6, 6), nn.Tanh()), "b": nn.Linear(5, 6)}
    model = _model(duo)
    reg = UMT(teachers=teachers, weight=3.0)
    loader = duo.train.loader(16)
    reg.on_fit_start(StepContext(model=model, train_loader=loader))
    assert reg.teachers_trained == 0
    inputs, y = next(iter(loader))
    ctx = StepContext(model=model, inputs=inputs, labels=y, features=model.encode(inputs))
    reg.on_after_forward(ctx)
    with torch.no_grad():
        ref = sum(((ctx.features[m] - teachers[m](inputs[m])) ** 2).mean() for m in "ab")
    torch.testing.assert_close(ctx.losses["umt/distill"], 3.0 * ref, rtol=1e-5, atol=1e-6)
    ctx.losses["umt/distill"].backward()
    assert all(p.grad is None for t in reg.teachers.values() for p in t.parameters())
    assert model.encoders["a"].net[0].weight.grad is not None
    # outside the window nothing is added
    late = UMT(teachers=teachers, end_epoch=1)
    late.on_fit_start(StepContext(model=model, train_loader=loader))
    ctx2 = StepContext(model=model, inputs=inputs, labels=y, features=model.encode(inputs),
                       epoch=1)
    late.on_after_forward(ctx2)
    assert "umt/distill" not in ctx2.losses


# ---------------------------------------------------------------- state, resume, files
@pytest.mark.parametrize("kind", ["trained", "projection", "ume-separate"])
def test_resume_does_not_retrain_teachers_and_ends_identical(duo, tmp_path, kind):
    torch.manual_seed(9)
    narrow = {"a": nn.Linear(6, 4)}

    def run(epochs, ckpt, resume):
        model = _model(duo)
        reg = {"trained": lambda: UMT(teacher_epochs=1),
               "projection": lambda: UMT(teachers=narrow, projection=True, teacher_epochs=1),
               "ume-separate": lambda: UME(heads="separate")}[kind]()
        _fit(model, duo, reg, epochs=epochs, checkpoint_dir=ckpt, resume=resume)
        return model, reg

    full, full_reg = run(3, tmp_path / "full", False)
    _, first = run(2, tmp_path / "split", False)
    resumed, reg = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    for a, b in zip(full_reg.owned_parameters(), reg.owned_parameters(), strict=True):
        assert torch.equal(a, b)
    if kind == "ume-separate":
        return
    assert reg.teachers_trained == first.teachers_trained  # carried over, not retrained
    assert reg.teacher_accuracy == first.teacher_accuracy
    for m in ("a", "b"):
        for k, v in reg.teachers[m].state_dict().items():
            assert torch.equal(v, first.teachers[m].state_dict()[k]), (m, k)


def test_reused_regulator_trains_like_a_new_one(duo):
    reused = UMT(teacher_epochs=1)
    _fit(_model(duo), duo, reused, epochs=1)
    second, fresh = _model(duo), _model(duo)
    _fit(second, duo, reused, epochs=1)
    _fit(fresh, duo, UMT(teacher_epochs=1), epochs=1)
    assert reused.teachers_trained == 4  # two runs, two teachers each
    for (n, a), (_, b) in zip(second.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_plain_loop_without_epochs_needs_teacher_epochs(duo):
    model = _model(duo)
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), UMT())
    with pytest.raises(ValueError, match=r"UMT\(teacher_epochs=...\)"):
        run.start(duo.train.loader(32))
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        UMT(teacher_epochs=1))
    run.start(duo.train.loader(32))
    assert run.callbacks[0].teachers_trained == 2


def test_state_round_trip_and_reset(duo):
    model, reg = _model(duo), UMT(teacher_epochs=1)
    _fit(model, duo, reg, epochs=1)
    state = reg.state_dict()
    other = UMT(teacher_epochs=1)
    other.load_state_dict(state)
    other.on_fit_start(StepContext(model=model, train_loader=duo.train.loader(32)))
    assert other.teachers_trained == 2 and other.teacher_accuracy == reg.teacher_accuracy
    x = next(iter(duo.val.loader(8)))[0]
    for m in ("a", "b"):
        torch.testing.assert_close(other.teachers[m](x[m]), reg.teachers[m](x[m]))
    other.reset()
    assert other.teachers is None and other.state_dict() == {}


def test_teacher_file_round_trip_and_refusals(duo, tmp_path):
    model, reg = _model(duo), UMT(teacher_epochs=1)
    _fit(model, duo, reg, epochs=1)
    path = tmp_path / "teachers.pt"
    reg.save_teachers(path)
    reg.save_teachers(path)  # its own file may be replaced
    loaded = UMT(teachers=path)
    hist = _fit(_model(duo, seed=1), duo, loaded, epochs=1)
    assert loaded.teachers_trained == 0 and loaded.teacher_accuracy == reg.teacher_accuracy
    assert hist[-1]["regulator"]["teacher_val_accuracy"] == reg.teacher_accuracy
    x = next(iter(duo.val.loader(8)))[0]
    torch.testing.assert_close(loaded.teachers["b"](x["b"]), reg.teachers["b"](x["b"]))
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoders": {}}, foreign)
    with pytest.raises(ValueError, match="not written by UMT.save_teachers"):
        _fit(_model(duo), duo, UMT(teachers=foreign), epochs=1)
    text = tmp_path / "notes.txt"
    text.write_text("mine")
    with pytest.raises(ValueError, match="not a teacher file written by modaldiag"):
        _fit(_model(duo), duo, UMT(teachers=text), epochs=1)
    with pytest.raises(ValueError, match="nothing was overwritten"):
        reg.save_teachers(text)
    assert text.read_text() == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        _fit(_model(duo), duo, UMT(teachers=tmp_path / "missing.pt"), epochs=1)
    wide = md.models.default_model(duo, feature_dim=7)
    with pytest.raises(ValueError, match="does not fit this model's encoder"):
        _fit(wide, duo, UMT(teachers=path), epochs=1)


# ---------------------------------------------------------------- given teachers, projection
def test_given_teachers_names_and_widths_are_checked(duo):
    with pytest.raises(ValueError, match="did you mean 'a'"):
        _fit(_model(duo), duo, UMT(teachers={"aa": nn.Linear(6, 6)}), epochs=1)
    narrow = {"a": nn.Linear(6, 4), "b": nn.Linear(5, 6)}
    with pytest.raises(ValueError, match=r"width 4 .*projection=True"):
        _fit(_model(duo), duo, UMT(teachers=narrow), epochs=1)
    with pytest.raises(ValueError, match=r"teachers must be .*nn.Module"):
        UMT(teachers={"a": "not a module"})
    with pytest.raises(ValueError, match="weight"):
        UMT(weight=0)
    with pytest.raises(ValueError, match="teacher_epochs"):
        UMT(teacher_epochs=0)
    with pytest.raises(ValueError, match="end_epoch"):
        UMT(start_epoch=3, end_epoch=2)
    with pytest.raises(ValueError, match="combine"):
        UME(combine="vote")


def test_partial_teachers_with_projection_train_the_projection(duo):
    torch.manual_seed(1)
    given = {"a": nn.Linear(6, 4)}  # b's teacher is trained
    model, reg = _model(duo), UMT(teachers=given, projection=True, teacher_epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    md.fit(model, duo.train.loader(32), duo.val.loader(64), epochs=1, optimizer=opt,
           regulator=reg, progress=False, restore_best=False)
    assert reg.teachers_trained == 1 and set(reg.projections) == {"a"}
    assert set(reg.teacher_accuracy) == {"b"}
    lin = reg.projections["a"]
    assert tuple(lin.weight.shape) == (4, 6)
    assert any(g.get("modaldiag_umt_projections") for g in opt.param_groups)
    fresh = UMT(teachers=given, projection=True, teacher_epochs=1)
    fresh.on_fit_start(StepContext(model=_model(duo), train_loader=duo.train.loader(32)))
    assert not torch.equal(fresh.projections["a"].weight, lin.weight)  # it trained
    assert torch.equal(given["a"].weight, reg.teachers["a"].weight)  # the given one: frozen copy
    assert given["a"].weight.requires_grad  # the user's module itself is not touched


# ---------------------------------------------------------------- UME
def test_ume_replaces_the_multimodal_term_and_predicts_the_mean(duo):
    model, reg = _model(duo), UME()
    inputs, y = next(iter(duo.train.loader(16)))
    feats = model.encode(inputs)
    ctx = StepContext(model=model, inputs=inputs, labels=y, features=feats,
                      logits=model.head(feats))
    ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, y)
    reg.on_after_forward(ctx)
    z = {m: model.head(feats, present=(m,)) for m in ("a", "b")}
    expected = sum(F.cross_entropy(z[m], y) for m in ("a", "b"))
    assert set(ctx.losses) == {"multimodal"}
    torch.testing.assert_close(ctx.losses["multimodal"], expected)
    assert abs(float(ctx.losses["multimodal"].detach() - F.cross_entropy(model.head(feats), y).detach())) > 1e-3
    torch.testing.assert_close(reg.predict(model, feats), (z["a"] + z["b"]) / 2)
    p = F.softmax(UME(combine="mean_probs").predict(model, feats), 1)
    torch.testing.assert_close(p, (F.softmax(z["a"], 1) + F.softmax(z["b"], 1)) / 2)


@pytest.mark.parametrize("heads", ["shared", "separate"])
def test_fit_validates_ume_with_its_prediction(duo, heads):
    model, reg = _model(duo), UME(heads=heads)
    hist = _fit(model, duo, reg, epochs=2)
    val = md.probes.evaluate(model, duo.val.loader(64), predict=lambda f: reg.predict(model, f))
    assert hist[-1]["val"]["acc"] == pytest.approx(val.accuracy)
    head_only = md.probes.evaluate(model, duo.val.loader(64))
    rec = hist[-1]["regulator"]
    assert rec["variant"] == "UME" and set(rec["unimodal_ce"]) == {"a", "b"}
    if heads == "separate":
        assert set(reg.heads) == {"a", "b"} and "heads" in reg.state_dict()
        # the model's own head was never trained: its fused output differs from the ensemble
        assert head_only.loss != pytest.approx(val.loss)


# ---------------------------------------------------------------- missing modalities
def test_absent_samples_are_left_out_of_every_term(duo):
    f = {"a": torch.tensor([[1.0, 2.0], [5.0, 5.0]])}
    loss, mse = umt_distillation_loss(f, {"a": torch.zeros(2, 2)}, 10.0,
                                      present={"a": torch.tensor([True, False])})
    assert mse == {"a": 2.5} and float(loss) == 25.0
    # teacher training: a modality absent from every sample gets no gradient at all
    model = _model(duo)
    batches = [(x, y, {"b": torch.zeros(len(y), dtype=torch.bool)})
               for x, y in duo.train.loader(32)]
    made = train_unimodal_models(model, batches, epochs=1, lr=0.1)
    for k, v in made["b"]["encoder"].state_dict().items():
        assert torch.equal(v, model.encoders["b"].state_dict()[k]), k
    assert not torch.equal(made["a"]["encoder"].net[0].weight, model.encoders["a"].net[0].weight)
    assert np.isnan(made["b"]["accuracy"])  # no sample to measure it on
    # UME: the CE of modality m averages over the samples where m is present
    inputs, y = next(iter(duo.train.loader(8)))
    feats = model.encode(inputs)
    ctx = StepContext(model=model, inputs=inputs, labels=y, features=feats,
                      logits=model.head(feats))
    rows = torch.arange(len(y)) < 3
    ctx.present = {"a": rows}
    UME().on_after_forward(ctx)
    z = {m: model.head(feats, present=(m,)) for m in ("a", "b")}
    expected = F.cross_entropy(z["a"][rows], y[rows]) + F.cross_entropy(z["b"], y)
    torch.testing.assert_close(ctx.losses["multimodal"], expected)


@pytest.mark.parametrize("cls", [UMT, UME])
def test_constraints_cover_every_constructor_argument(cls):

    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert names == set(cls._parameter_constraints)
    assert repr(cls()).startswith(cls.__name__ + "(")
