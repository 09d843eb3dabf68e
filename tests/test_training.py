import warnings

import pytest
import torch
from conftest import make_inputs, make_model
from torch import nn

import modaldiag as md
from modaldiag.datasets import MultimodalDataset
from modaldiag.models import Conv1dEncoder, encoder_for_shape
from modaldiag.utils.io import safe_torch_load


def _loaders(data, bs=64):
    return data.train.loader(bs, shuffle=True), data.val.loader(256)


def test_fit_records_history_and_roundtrips(synth, tmp_path):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=16)
    train, val = _loaders(synth)
    hist = md.fit(model, train, val, epochs=3, lr=0.05, progress=False)
    assert len(hist) == 3
    rec = hist[-1]
    assert set(rec["val"]["unimodal_acc"]) == {"a", "b"}
    assert set(rec["fisher"]) == {"a", "b"} and rec["fisher"]["a"] > 0
    assert 0 <= rec["train"]["acc"] <= 1 and rec["val"]["acc"] > 0.5
    assert hist.best_epoch in (0, 1, 2)
    path = hist.save(tmp_path / "h.json")
    loaded = md.History.load(path)
    assert loaded.epochs == hist.epochs and loaded.modalities == ("a", "b")
    assert loaded.series("val.unimodal_acc.a") == hist.series("val.unimodal_acc.a")


def test_strong_modality_dominates_on_synthetic(synth):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=16)
    hist = md.fit(model, *_loaders(synth), epochs=8, progress=False)
    uni = hist[-1]["val"]["unimodal_acc"]
    assert uni["a"] > uni["b"] + 0.2


def test_motivating_phenomenon_weak_view_starved_in_joint_training(fou_pix):
    """fou inside the jointly trained fou+pix model is far below fou's encoder trained alone."""
    data = fou_pix
    epochs = 20
    model = md.models.default_model(data)
    md.fit(model, *_loaders(data), epochs=epochs, progress=False, seed=0)
    joint = md.probes.evaluate(model, data.test.loader(400)).unimodal

    torch.manual_seed(0)
    alone = nn.Sequential(encoder_for_shape(data.input_shapes["fou"], 64), nn.Linear(64, 10))
    opt = torch.optim.SGD(alone.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(epochs):
        for x, y in data.train.loader(64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(alone(x["fou"]), y).backward()
            opt.step()
    alone.eval()
    with torch.no_grad():
        alone_acc = (alone(data.test.inputs["fou"]).argmax(1) == data.test.labels).float().mean().item()
    # measured: joint fou ~0.29, alone ~0.82 (see issue note); pix keeps ~0.95
    assert alone_acc > 0.75
    assert joint["fou"].accuracy < alone_acc - 0.3
    assert joint["pix"].accuracy > 0.9


class Recorder(md.Callback):
    def __init__(self):
        self.calls = []

    def _rec(self, name):
        if not self.calls or self.calls[-1] != name:
            self.calls.append(name)

    def on_fit_start(self, ctx): self._rec("fit_start")
    def on_train_epoch_start(self, ctx): self._rec("epoch_start")
    def transform_features(self, features, ctx):
        self._rec("transform")
        return {m: f * 0 if m == "b" else f for m, f in features.items()}
    def on_after_forward(self, ctx):
        self._rec("after_forward")
        ctx.losses["extra"] = ctx.logits.sum() * 0
    def on_after_backward(self, ctx):
        self._rec("after_backward")
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in ctx.model.encoders["b"].parameters())
    def on_before_optimizer_step(self, ctx): self._rec("before_step")
    def on_train_batch_end(self, ctx): self._rec("batch_end")
    def on_train_epoch_end(self, ctx):
        self._rec("epoch_end")
        ctx.log("recorder", {"epoch": ctx.epoch})
    def on_fit_end(self, ctx): self._rec("fit_end")


def test_hooks_run_in_documented_order(synth):
    rec = Recorder()
    model = md.models.default_model(synth, feature_dim=8)
    hist = md.fit(model, synth.train.loader(200), epochs=1, regulator=rec, progress=False, monitor=False)
    assert rec.calls[:8] == ["fit_start", "epoch_start", "transform", "after_forward",
                             "after_backward", "before_step", "batch_end", "transform"]
    assert rec.calls[-2:] == ["epoch_end", "fit_end"]
    assert hist[0]["recorder"] == {"epoch": 0}


def test_two_backward_owners_refused(synth):
    class Owner(md.Callback):
        def backward(self, ctx):
            ctx.loss.backward()
            return True

    model = md.models.default_model(synth, feature_dim=8)
    with pytest.raises(ValueError, match="cannot be combined"):
        md.fit(model, synth.train.loader(64), epochs=1, regulator=[Owner(), Owner()], progress=False)


def _dataset(x_a, x_b, y):
    return MultimodalDataset({"a": x_a, "b": x_b}, y, num_classes=3)


def test_bad_training_input_errors():
    torch.manual_seed(0)
    x = torch.randn(20, 4)
    model = md.MultimodalClassifier({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, {"a": 3, "b": 3}, 3)
    y = torch.arange(20) % 3
    # labels outside [0, num_classes)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\).*from 0 to 5"):
        md.fit(model, _dataset(x, x, torch.arange(20) % 6).loader(10), epochs=1, progress=False)
    # float labels
    with pytest.raises(ValueError, match="integer class indices"):
        md.fit(model, [({"a": x, "b": x}, y.float())], epochs=1, progress=False)
    # wrong modality names
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        md.fit(model, [({"a": x, "video": x}, y)], epochs=1, progress=False)
    # batch mismatch
    with pytest.raises(ValueError, match="batch sizes differ"):
        md.fit(model, [({"a": x, "b": x[:5]}, y)], epochs=1, progress=False)
    # empty loader
    with pytest.raises(ValueError, match="empty loader"):
        md.fit(model, [], epochs=1, progress=False)
    # single class
    with pytest.raises(ValueError, match="single class"):
        md.fit(model, _dataset(x, x, torch.zeros(20, dtype=torch.long)).loader(10), epochs=1,
               progress=False)
    # NaN in one modality's inputs -> names it
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*input of modality 'b'"):
        md.fit(model, _dataset(x, bad, y).loader(10), epochs=1, progress=False)
    with pytest.warns(UserWarning, match="skipping a batch"):
        hist = md.fit(model, _dataset(x, bad, y).loader(10), epochs=1, progress=False,
                      on_nonfinite="skip")
    assert hist[0]["train"]["skipped"] == 1
    with pytest.raises(TypeError, match="needs a modaldiag model"):
        md.fit(nn.Linear(2, 2), [], epochs=1)


def test_unimodal_auxiliary_loss_is_added(synth):
    class Check(md.Callback):
        def on_after_forward(self, ctx):
            assert set(ctx.losses) == {"multimodal", "unimodal/a", "unimodal/b"}

    model = md.models.default_model(synth, feature_dim=8)
    md.fit(model, synth.train.loader(200), epochs=1, unimodal_loss_weight=1.0, regulator=Check(),
           progress=False)


# ---------------------------------------------------------------- issue 11: fail loudly, refuse


@pytest.fixture(scope="module")
def small():
    """96 training samples for make_model() (m0: 5 features, m1: 6), 3 classes."""
    return md.datasets.synthetic(n_samples=160, num_classes=3, strength={"m0": 2.0, "m1": 0.6},
                                 dims={"m0": 5, "m1": 6}, seed=0)


def _fit(model, loader, val=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("monitor", False)
    return md.fit(model, loader, val, **kw)


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_lr_inf_raises_naming_epoch_parameter_and_encoder_and_saves_nothing(small, tmp_path):
    model = make_model()
    one_batch = small.train.loader(len(small.train.labels))  # the NaN step is the epoch's last
    opt = torch.optim.SGD(model.parameters(), lr=float("inf"))
    with pytest.raises(ValueError, match=(
            r"weights became non-finite .* by the end of epoch 0: parameter "
            r"'encoders\.m0\.net\.0\.weight' of the encoder of modality 'm0' holds \d+ NaN and "
            r"\d+ inf of its 40 values .*lower learning rate.*max_grad_norm=1\.0")):
        _fit(model, one_batch, epochs=2, optimizer=opt, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck" / "last.pt").exists() and not (tmp_path / "ck" / "best.pt").exists()
    assert not (tmp_path / "ck" / "history.json").exists()
    # several batches: found before the next batch's forward, still naming the parameter
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=float("inf"))
    with pytest.raises(ValueError, match=r"during epoch 0 \(found at batch 1, whose loss was "
                                         r"non-finite\): parameter 'encoders\.m0\.net\.0\.weight'"), \
            pytest.warns(UserWarning, match="skipping a batch"):
        _fit(model, small.train.loader(16), epochs=1, optimizer=opt, on_nonfinite="skip")


def test_nonfinite_weights_in_the_head_are_named_as_head(small):
    model = make_model()
    enc = [p for name, p in model.named_parameters() if name.startswith("encoders.")]
    head = [p for name, p in model.named_parameters() if not name.startswith("encoders.")]
    opt = torch.optim.SGD([{"params": enc}, {"params": head, "lr": float("inf")}], lr=0.01)
    with pytest.raises(ValueError, match=r"of the fusion head \(outside every encoder\)"):
        _fit(model, small.train.loader(len(small.train.labels)), epochs=1, optimizer=opt)


def test_model_with_nan_weights_is_refused_before_training(small):
    model = make_model()
    with torch.no_grad():
        model.encoders["m1"].net[2].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"weights are non-finite .* before training \(epoch 0\): "
                                         r"parameter 'encoders\.m1\.net\.2\.bias' of the encoder "
                                         r"of modality 'm1' holds 1 NaN and 0 inf of its 5 values"):
        _fit(model, small.train.loader(16), epochs=1)


def test_huge_finite_lr_overflow_fails_loudly_in_both_modes_and_keeps_last_good_epoch(small, tmp_path):
    ck = tmp_path / "ck"
    model = make_model()
    hist = _fit(model, small.train.loader(16, shuffle=True), small.val.loader(64), epochs=1,
                lr=0.05, checkpoint_dir=ck)
    assert len(hist) == 1
    # lr=1e30 (finite, accepted) overflows at the second step; raise mode names the overflow
    with pytest.raises(ValueError, match=r"non-finite.*features from finite inputs"), \
            pytest.warns(UserWarning, match=r"resuming with lr=\[1e\+30\]"):
        _fit(model, small.train.loader(16, shuffle=True), small.val.loader(64), epochs=3,
             lr=1e30, checkpoint_dir=ck, resume=True)
    last = safe_torch_load(ck / "last.pt")
    assert last["epoch"] == 1 and _all_finite(last["model"])
    assert _all_finite(safe_torch_load(ck / "best.pt")["model"])
    assert len(md.History.load(ck / "history.json")) == 1
    # skip mode skips bad *batches*; a model that overflows on every finite batch still raises
    with pytest.raises(ValueError, match=r"diverged in epoch 1: .* every remaining batch \(6: "
                                         r"\[1, 2, 3, 4, 5\]\.\.\.\) was non-finite although their "
                                         r"inputs are finite.*last good epoch \(0\)"), \
            pytest.warns(UserWarning):
        _fit(model, small.train.loader(16, shuffle=True), small.val.loader(64), epochs=3,
             lr=1e30, checkpoint_dir=ck, resume=True, on_nonfinite="skip")
    assert safe_torch_load(ck / "last.pt")["epoch"] == 1
    # ...and resuming the last good epoch with a lower lr finishes, at that lr
    with pytest.warns(UserWarning, match=r"resuming with lr=\[0\.02\] where the checkpoint was "
                                         r"trained with lr=\[0\.05\]"):
        hist = _fit(model, small.train.loader(16, shuffle=True), small.val.loader(64), epochs=3,
                    lr=0.02, checkpoint_dir=ck, resume=True, restore_best=False)
    assert [r["epoch"] for r in hist.epochs] == [0, 1, 2]
    assert [r["lr"] for r in hist.epochs] == [0.05, 0.02, 0.02]
    assert _all_finite(model.state_dict())


def _bn_model(seed=0):
    torch.manual_seed(seed)

    def enc(d):
        return nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU())

    return md.MultimodalClassifier({"a": enc(4), "b": enc(4)}, {"a": 8, "b": 8}, 3)


def _bn_data(n=32, huge=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    xa = x.clone()
    if huge:
        xa[0] = 1e20  # finite, but its variance overflows float32
    return MultimodalDataset({"a": xa, "b": x}, torch.arange(n) % 3, num_classes=3)


def test_batchnorm_running_var_going_inf_raises_naming_the_buffer(tmp_path):
    model = _bn_model()
    with pytest.raises(ValueError, match=r"by the end of epoch 0: buffer 'encoders\.a\.1\."
                                         r"running_var' of the encoder of modality 'a' holds 0 NaN "
                                         r"and [1-8] inf of its 8 values.*clean and normalise the "
                                         r"inputs"):
        _fit(model, _bn_data(huge=True).loader(32), epochs=2, checkpoint_dir=tmp_path / "ck")
    # the loss itself stayed finite: only the running statistics overflowed
    assert torch.isinf(model.encoders["a"][1].running_var).any()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not (tmp_path / "ck" / "last.pt").exists()


def test_batch_of_one_with_batchnorm_is_skipped_with_a_warning_and_counted():
    model = _bn_model()
    with pytest.warns(UserWarning, match=r"epoch \d, batch 2 holds ONE sample and BatchNorm layer "
                                         r"'encoders\.a\.1'.*drop_last=True"):
        hist = _fit(model, _bn_data(n=33).loader(16), epochs=2)
    assert [r["train"]["n"] for r in hist.epochs] == [32, 32]
    assert [r["train"]["skipped_batch_of_one"] for r in hist.epochs] == [1, 1]
    # the skipped batch left no trace in the running statistics: 2 updates per epoch, not 3
    assert int(model.encoders["a"][1].num_batches_tracked) == 4
    assert int(model.encoders["b"][1].num_batches_tracked) == 4
    with pytest.raises(ValueError, match=r"every training batch of epoch 0 held ONE sample.*"
                                         r"'encoders\.a\.1'.*batch size of at least 2"), \
            pytest.warns(UserWarning):
        _fit(_bn_model(), _bn_data(n=6).loader(1), epochs=1)


def test_batch_of_one_is_trained_when_batchnorm_can_normalise_it():
    """BatchNorm over (1, C, T) with T > 1 is valid in torch: nothing is skipped."""
    torch.manual_seed(0)
    model = md.MultimodalClassifier({"a": Conv1dEncoder(2, 4, channels=(4,)),
                                     "b": Conv1dEncoder(2, 4, channels=(4,))}, {"a": 4, "b": 4}, 3)
    x = torch.randn(9, 2, 8)
    data = MultimodalDataset({"a": x, "b": x.clone()}, torch.arange(9) % 3, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hist = _fit(model, data.loader(4), epochs=1)
    assert hist[0]["train"]["n"] == 9 and hist[0]["train"]["skipped_batch_of_one"] == 0


def test_optimizer_over_another_models_parameters_is_refused(small):
    model, other = make_model(), make_model(seed=1)
    n = sum(p.requires_grad for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"optimizer holds {n} parameter tensors, none of which "
                                         rf".*covers 0 of the model's {n} trainable parameter "
                                         rf"tensors.*model\.parameters\(\)"):
        _fit(model, small.train.loader(16), epochs=1,
             optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _fit(model, small.train.loader(16), epochs=1)


def test_tuple_loader_gets_the_adapter_recipe():
    x = torch.randn(8, 5)
    loader = [(x, torch.randn(8, 6), torch.arange(8) % 3)]
    with pytest.raises(ValueError, match=r"yielded a tuple of 3 items \(Tensor, Tensor, Tensor\)"
                                         r".*md\.datasets\.adapt_loader\(loader, lambda b: "
                                         r"\(\{'m0': b\[0\], 'm1': b\[1\]\}, b\[2\]\)\)"):
        _fit(make_model(), loader, epochs=1)


def _checkpointed(small, ck, **kw):
    model = make_model()
    _fit(model, small.train.loader(32), epochs=1, checkpoint_dir=ck, **kw)
    return model


def test_resume_with_another_model_is_refused_naming_the_key(small, tmp_path):
    ck = tmp_path / "ck"
    _checkpointed(small, ck)
    other = make_model(in_dim=7)
    with pytest.raises(ValueError, match=(
            r"checkpoint in '.*ck' was written for another model: 'encoders\.m0\.net\.0\.weight' "
            r"has shape \(8, 5\) in the checkpoint but \(8, 7\) in this model.*resume=False")):
        _fit(other, small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True)
    with pytest.raises(ValueError, match=r"another model: this model's 'encoders\.m2\.net\.0\."
                                         r"weight' is not in it \(4 keys missing\)"):
        _fit(make_model(m=3), small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True)


def test_resume_with_another_optimizer_is_refused(small, tmp_path):
    ck = tmp_path / "ck"
    _checkpointed(small, ck)
    model = make_model()
    with pytest.raises(ValueError, match=r"written for another optimizer: SGD, but this call "
                                         r"uses Adam.*start over"):
        _fit(model, small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True,
             optimizer=torch.optim.Adam(model.parameters()))
    enc = [p for name, p in model.named_parameters() if name.startswith("encoders.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("encoders.")]
    two_groups = torch.optim.SGD([{"params": enc}, {"params": rest}], lr=0.01, momentum=0.9)
    with pytest.raises(ValueError, match=rf"parameter groups hold \[{len(enc) + len(rest)}\] "
                                         rf"tensors, this optimizer's hold \[{len(enc)}, "
                                         rf"{len(rest)}\]"):
        _fit(model, small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True,
             optimizer=two_groups)


def test_resume_without_its_regulator_or_with_another_config_is_refused(small, tmp_path):
    ck = tmp_path / "ck"
    _checkpointed(small, ck, regulator=md.OGM(alpha=0.8))
    saved = safe_torch_load(ck / "last.pt")["fit"]
    assert saved["regulators"] == [repr(md.OGM(alpha=0.8))] and saved["optimizer"] == "SGD"
    with pytest.raises(ValueError, match=r"regulated by \[.OGM\(alpha=0\.8.*but this call passes "
                                         r"no regulator.*Pass the same regulator"):
        _fit(make_model(), small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True)
    with pytest.raises(ValueError, match=r"regulated by \[.OGM\(alpha=0\.8.*but this call passes "
                                         r"\[.OGM\(alpha=0\.5"):
        _fit(make_model(), small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True,
             regulator=md.OGM(alpha=0.5))
    with pytest.raises(ValueError, match=r"written with the callbacks \['0:OGM'\], but this call "
                                         r"has \['0:FisherMonitor', '1:OGM'\]"):
        _fit(make_model(), small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True,
             regulator=md.OGM(alpha=0.8), monitor=True)
    # the same regulator resumes
    hist = _fit(make_model(), small.train.loader(32), epochs=2, checkpoint_dir=ck, resume=True,
                regulator=md.OGM(alpha=0.8))
    assert len(hist) == 2


_GOOD = dict(epochs=1, lr=0.01)


@pytest.mark.parametrize("name, value, exc", [
    ("epochs", 0, ValueError), ("epochs", 2.5, ValueError), ("epochs", True, ValueError),
    ("lr", 0.0, ValueError), ("lr", -0.1, ValueError), ("lr", float("inf"), ValueError),
    ("lr", float("nan"), ValueError), ("lr", "0.1", ValueError),
    ("weight_decay", -1e-4, ValueError), ("weight_decay", float("nan"), ValueError),
    ("max_grad_norm", 0.0, ValueError), ("max_grad_norm", -1.0, ValueError),
    ("max_grad_norm", float("inf"), ValueError),
    ("unimodal_loss_weight", float("nan"), ValueError), ("unimodal_loss_weight", -0.5, ValueError),
    ("unimodal_loss_weight", float("inf"), ValueError),
    ("batch_size", 0, ValueError), ("batch_size", 8.0, ValueError),
    ("on_nonfinite", "ignore", ValueError), ("seed", -1, ValueError), ("seed", 1.5, ValueError),
    ("seed", 2**64, ValueError), ("amp", "yes", TypeError), ("monitor", 1, TypeError),
    ("restore_best", None, TypeError), ("resume", "True", TypeError), ("progress", 0, TypeError),
    ("device", "gpu", ValueError), ("device", 1.5, ValueError),
    # None is admissible for these: validate_params reports the wrong kind as a ValueError
    ("checkpoint_dir", 3, (TypeError, ValueError)), ("optimizer", "sgd", (TypeError, ValueError)),
    ("regulator", "ogm", (TypeError, ValueError)), ("val_loader", "val/", (TypeError, ValueError)),
    ("callbacks", md.OGM(), TypeError), ("scheduler", 3, ValueError),
])
def test_every_argument_is_validated(small, name, value, exc):
    kwargs = {"progress": False, **_GOOD, name: value}
    with pytest.raises(exc, match=rf"fit: {name} must be .*; got "):
        md.fit(make_model(), small.train.loader(32), **kwargs)


def test_train_loader_of_the_wrong_type_and_checkpoint_dir_that_is_a_file(small, tmp_path):
    with pytest.raises(TypeError, match=r"fit: train_loader must be a DataLoader"):
        md.fit(make_model(), 5, epochs=1, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*file' exists and is not a folder"):
        _fit(make_model(), small.train.loader(32), epochs=1, checkpoint_dir=tmp_path / "file")
    with pytest.raises(ValueError, match=r"resume=True needs checkpoint_dir"):
        _fit(make_model(), small.train.loader(32), epochs=1, resume=True)


def test_resume_with_a_lower_lr_continues_the_schedule_at_the_new_scale(small, tmp_path):
    ck = tmp_path / "ck"

    def halve(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    model = make_model()
    _fit(model, small.train.loader(32), epochs=1, lr=0.1, scheduler=halve, checkpoint_dir=ck)
    assert safe_torch_load(ck / "last.pt")["fit"]["lrs"] == [0.1]
    with pytest.warns(UserWarning, match=r"resuming with lr=\[0\.01\] where the checkpoint was "
                                         r"trained with lr=\[0\.1\]"):
        hist = _fit(model, small.train.loader(32), epochs=3, lr=0.01, scheduler=halve,
                    checkpoint_dir=ck, resume=True)
    assert hist.series("lr") == pytest.approx([0.1, 0.005, 0.0025], rel=1e-6)
    with pytest.raises(ValueError, match=r"written with scheduler StepLR, but this call has None"):
        _fit(model, small.train.loader(32), epochs=4, lr=0.01, checkpoint_dir=ck, resume=True)


def test_nan_inputs_poisoning_batchnorm_statistics_raise_even_in_skip_mode():
    data = _bn_data(32)
    data.inputs["a"][20, 2] = float("nan")  # batch 1 of 2
    with pytest.raises(ValueError, match=r"non-finite \(NaN or inf\) during epoch 0 at batch 1, "
                                         r"whose input of modality 'a' contains NaN/inf: .*buffer "
                                         r"'encoders\.a\.1\.running_mean' of the encoder of "
                                         r"modality 'a' holds 8 NaN"), \
            pytest.warns(UserWarning, match="skipping a batch"):
        _fit(_bn_model(), data.loader(16), epochs=1, on_nonfinite="skip")


@pytest.mark.parametrize("make_regulator", [
    lambda: None,
    lambda: md.InfoReg(trace="per_sample"),
    lambda: md.Relearning(every=1),
    lambda: md.ValuationResampling("sample", warmup=0),
], ids=["joint", "inforeg-per-sample", "relearning", "valuation"])
def test_fit_keeps_a_frozen_batchnorm_frozen(make_regulator):
    """A BatchNorm the user froze (eval mode) inside a train-mode model keeps its running stats
    through fit, even with regulators that run probes between epochs."""
    torch.manual_seed(0)
    enc_a = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    enc_b = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU())
    model = md.MultimodalClassifier({"a": enc_a, "b": enc_b}, {"a": 4, "b": 4}, 3)
    with torch.no_grad():
        enc_a[1].running_mean.fill_(0.25)
        enc_a[1].running_var.fill_(2.0)
    enc_a[1].eval()
    g = torch.Generator().manual_seed(1)
    data = md.datasets.MultimodalDataset(
        {"a": torch.randn(24, 5, generator=g), "b": torch.randn(24, 6, generator=g)},
        torch.arange(24) % 3, num_classes=3)
    md.fit(model, data.loader(8, shuffle=True), val_loader=data.loader(8), epochs=2,
           regulator=make_regulator(), progress=False, monitor=False)
    bn = enc_a[1]
    assert not bn.training and model.training
    assert torch.equal(bn.running_mean, torch.full((4,), 0.25))
    assert torch.equal(bn.running_var, torch.full((4,), 2.0))
    assert int(bn.num_batches_tracked) == 0


def test_divergence_seen_only_by_validation_is_named_as_divergence(tmp_path):
    """One step per epoch with lr=1e30: the weights stay finite (~1e30) but validation overflows.
    fit must say the run diverged (not blame the data) and save nothing of that epoch."""
    model = make_model(m=2)
    x = make_inputs(model, batch=12)
    batches = [(x, torch.arange(12) % 3)]
    with pytest.raises(ValueError, match=r"diverged during epoch 0: .*Lower the learning rate "
                                         r"\(lr=1e\+30\)") as info:
        md.fit(model, batches, val_loader=batches, epochs=2, lr=1e30, progress=False,
               checkpoint_dir=tmp_path / "ckpt")
    assert "nothing of epoch 0 was saved" in str(info.value)
    assert not (tmp_path / "ckpt" / "best.pt").exists()
    assert not (tmp_path / "ckpt" / "last.pt").exists()


def test_max_grad_norm_clips_regulator_owned_heads_too(synth):
    """Plain SGD, one step: every stepped parameter (the model's and MMPareto's separate unimodal
    heads) moves by at most lr * max_grad_norm in total; the heads alone would exceed it."""
    def one_step(max_grad_norm):
        torch.manual_seed(0)
        model = md.models.default_model(synth, feature_dim=16)
        reg = md.MMPareto(unimodal_heads="separate")
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        md.fit(model, synth.train.loader(10_000), optimizer=opt, regulator=reg, epochs=1,
               max_grad_norm=max_grad_norm, progress=False)
        return model, reg

    _, unclipped_reg = one_step(None)
    torch.manual_seed(0)
    start = md.models.default_model(synth, feature_dim=16)
    clipped_model, clipped_reg = one_step(1e-3)
    moved = [(a - b).detach() for a, b in zip(clipped_model.parameters(), start.parameters(),
                                                 strict=True)]
    head_init = md.MMPareto(unimodal_heads="separate")
    head_init._create_heads(start, start.feature_dims)
    for m, lin in clipped_reg.heads.items():
        init = head_init.heads[m]
        moved += [lin.weight.detach() - init.weight, lin.bias.detach() - init.bias]
    total = torch.cat([t.flatten() for t in moved]).norm()
    assert total <= 1e-3 * (1 + 1e-4)
    assert total > 0.5e-3  # the step was taken (clipped, not skipped)
    unclipped_heads = torch.cat([(lin.weight - head_init.heads[m].weight).flatten()
                                 for m, lin in unclipped_reg.heads.items()]).norm()
    assert unclipped_heads > 1e-2  # without clipping the heads alone move far more


def test_recorded_train_loss_and_accuracy_are_the_sample_weighted_epoch_means(synth):
    """The epoch's loss/accuracy are summed once at epoch end from per-batch device scalars:
    they must equal the per-sample mean over batches of unequal size (a short last batch)."""
    seen = []

    class Record(md.Callback):
        def on_after_forward(self, ctx):
            seen.append((ctx.losses["multimodal"].item(), len(ctx.labels),
                         int((ctx.logits.argmax(1) == ctx.labels).sum())))

    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=16)
    train = synth.train.loader(32, shuffle=True)
    hist = md.fit(model, train, synth.val.loader(256), epochs=2, callbacks=[Record()],
                  monitor=False, progress=False)
    n_batches = len(seen) // 2
    assert len({b[1] for b in seen}) == 2  # a short last batch: the weighting matters
    for epoch, rec in enumerate(hist.epochs):
        batches = seen[epoch * n_batches:(epoch + 1) * n_batches]
        n = sum(b[1] for b in batches)
        assert rec["train"]["n"] == n == len(synth.train)
        assert rec["train"]["loss"] == pytest.approx(sum(b[0] * b[1] for b in batches) / n, rel=1e-6)
        assert rec["train"]["acc"] == pytest.approx(sum(b[2] for b in batches) / n, rel=1e-9)
