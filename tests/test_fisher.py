import re

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSIONS, make_inputs, make_model
from torch import nn

import modaldiag as md
from modaldiag.training import FisherMonitor


def _loop_reference(model, x, y):
    """Per-sample backward passes, one at a time."""
    model.eval()
    ref = {m: 0.0 for m in model.modalities}
    n = len(y)
    for i in range(n):
        model.zero_grad()
        F.cross_entropy(model({m: t[i:i + 1] for m, t in x.items()}), y[i:i + 1]).backward()
        for m in model.modalities:
            ref[m] += sum(float(p.grad.pow(2).sum()) for p in model.encoders[m].parameters()
                          if p.grad is not None) / n
    return ref


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("m", [2, 3])
def test_per_sample_equals_loop_of_backward_passes(fusion, m):
    model = make_model(m, fusion)
    x = make_inputs(model, batch=23)
    y = torch.arange(23) % 3
    loader = [({k: v[:10] for k, v in x.items()}, y[:10]), ({k: v[10:] for k, v in x.items()}, y[10:])]
    tr = md.fisher_trace(model, loader, per_sample=True, chunk_size=4)
    ref = _loop_reference(model, x, y)
    for mod in model.modalities:
        assert tr[mod] == pytest.approx(ref[mod], rel=1e-4)
        assert tr[mod] > 0


def test_per_sample_on_wrapped_conv_model_with_batchnorm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(),
                                           nn.AdaptiveAvgPool1d(1), nn.Flatten())
            self.visual_net = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
            self.fc = nn.Linear(9, 4)

    torch.manual_seed(0)
    net = Net()
    wrapped = md.wrap(net, {"audio": net.audio_net, "visual": net.visual_net},
                      head=lambda f: net.fc(torch.cat([f["audio"], f["visual"]], 1)))
    x = {"audio": torch.randn(9, 2, 8), "visual": torch.randn(9, 6)}
    y = torch.arange(9) % 4
    wrapped(x)  # infer num_classes
    tr = md.fisher_trace(wrapped, [(x, y)], chunk_size=5)
    ref = _loop_reference(wrapped, x, y)
    for m in ("audio", "visual"):
        assert tr[m] == pytest.approx(ref[m], rel=1e-4)


def test_batch_and_code_forms_match_manual_computation():
    model = make_model(2, "concat").eval()
    x = make_inputs(model, batch=16)
    y = torch.arange(16) % 3
    loader = [({k: v[:8] for k, v in x.items()}, y[:8]), ({k: v[8:] for k, v in x.items()}, y[8:])]
    batch_ref = {m: 0.0 for m in model.modalities}
    code_ref = {m: 0.0 for m in model.modalities}
    for xb, yb in loader:
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        for m in model.modalities:
            batch_ref[m] += sum(float(p.grad.pow(2).sum()) for p in model.encoders[m].parameters()) / 2
            weights = [mod.weight for mod in model.encoders[m].modules() if isinstance(mod, nn.Linear)]
            code_ref[m] += sum(float(w.grad.pow(2).mean()) for w in weights) / 2
    batch = md.fisher_trace(model, loader, per_sample=False)
    code = md.fisher_trace(model, loader, form="code")
    per_sample = md.fisher_trace(model, loader)
    for m in model.modalities:
        assert batch[m] == pytest.approx(batch_ref[m], rel=1e-5)
        assert code[m] == pytest.approx(code_ref[m], rel=1e-5)
        assert batch[m] < per_sample[m]  # the batch form underestimates (gradient noise)


def test_parameters_without_gradient_are_skipped():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(5, 4)
            self.unused = nn.Linear(5, 4)  # never called: grad is None

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = md.MultimodalClassifier({"a": Enc(), "b": nn.Linear(6, 4)}, {"a": 4, "b": 4}, 3)
    x = {"a": torch.randn(8, 5), "b": torch.randn(8, 6)}
    y = torch.arange(8) % 3
    for form in ("per_sample", "batch", "code"):
        tr = md.fisher_trace(model, [(x, y)], form=form)
        assert tr["a"] > 0 and tr["b"] > 0


def test_online_monitor_equals_batch_form_when_weights_do_not_move(synth):
    model = md.models.default_model(synth, feature_dim=8)
    loader = synth.train.loader(100)
    mon = FisherMonitor()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hist = md.fit(model, loader, epochs=1, optimizer=opt, regulator=mon, monitor=False,
                  progress=False)
    batch = md.fisher_trace(model, loader, per_sample=False)
    for m in ("a", "b"):
        assert hist[0]["fisher"][m] == pytest.approx(batch[m], rel=1e-5)
    assert mon.state_dict()["traces"]["a"] == [hist[0]["fisher"]["a"]]


def test_bad_form():
    model = make_model(2)
    with pytest.raises(ValueError, match="form must be one of"):
        md.fisher_trace(model, [], form="diag")


def test_fisher_trace_leaves_wrapped_model_parameters_intact():
    net = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4), "fc": nn.Linear(8, 2)})
    wrapped = md.wrap(net, {"a": net["a"], "b": net["b"]},
                      head=lambda f: net["fc"](torch.cat([f["a"], f["b"]], 1)), num_classes=2)
    before = {n: p for n, p in net.named_parameters()}
    md.fisher_trace(wrapped, [({"a": torch.randn(4, 3), "b": torch.randn(4, 2)}, torch.tensor([0, 1, 0, 1]))])
    for n, p in net.named_parameters():
        assert isinstance(p, nn.Parameter) and p is before[n]


class _Custom(nn.Module):
    """An encoder with a parameter the hook engine does not know (forces the vmap fallback)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return torch.relu(self.fc(x * self.scale))


def test_hook_and_vmap_engines_agree_with_the_loop():
    torch.manual_seed(0)
    encs = {"img": md.models.Conv2dEncoder(2, 6, channels=(3, 4)),
            "seq": md.models.Conv1dEncoder(3, 5, channels=(4,)),
            "vec": md.models.MLPEncoder(7, 4, hidden=(6,))}
    model = md.MultimodalClassifier(encs, {"img": 6, "seq": 5, "vec": 4}, 3, fusion="gated")
    x = {"img": torch.randn(10, 2, 8, 8), "seq": torch.randn(10, 3, 12), "vec": torch.randn(10, 7)}
    y = torch.arange(10) % 3
    model.train()
    model(x)  # move BatchNorm running statistics away from their defaults
    hooks = md.fisher_trace(model, [(x, y)], engine="hooks")
    vmap = md.fisher_trace(model, [(x, y)], engine="vmap")
    ref = _loop_reference(model, x, y)
    for m in model.modalities:
        assert hooks[m] == pytest.approx(ref[m], rel=1e-4)
        assert vmap[m] == pytest.approx(ref[m], rel=1e-4)


def test_unsupported_encoder_falls_back_to_vmap():
    torch.manual_seed(0)
    model = md.MultimodalClassifier({"a": _Custom(), "b": nn.Linear(3, 4)}, {"a": 4, "b": 4}, 3)
    x, y = {"a": torch.randn(6, 5), "b": torch.randn(6, 3)}, torch.arange(6) % 3
    ref = _loop_reference(model, x, y)
    auto = md.fisher_trace(model, [(x, y)])
    assert auto["a"] == pytest.approx(ref["a"], rel=1e-4)
    assert auto.engine == "vmap" and "'a' (_Custom) owns parameters" in auto.reason
    with pytest.raises(ValueError, match=r"engine='hooks' cannot compute .*module 'a' \(_Custom\)"):
        md.fisher_trace(model, [(x, y)], engine="hooks")


# ------------------------------------------------------------ any encoder: engines and fallbacks
def _loop(model, x, y):
    """Reference: one forward and backward per sample, ``sum ||grad||^2`` over each encoder's
    parameters (a shared parameter counts for every encoder that reaches it)."""
    model.eval()
    ref = {m: 0.0 for m in model.modalities}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model({m: t[i:i + 1] for m, t in x.items()}), y[i:i + 1]).backward()
        for m in model.modalities:
            ref[m] += sum(float(p.grad.pow(2).sum()) for p in model.encoders[m].parameters()
                          if p.grad is not None) / len(y)
    model.zero_grad(set_to_none=True)
    return ref


def _assert_equals_loop(tr, ref):
    for m, v in ref.items():
        assert v > 0
        assert tr[m] == pytest.approx(v, rel=1e-4), (m, tr[m], v)


def _vec_model(enc_a, enc_b, dims=(4, 4), num_classes=3, seed=0):
    torch.manual_seed(seed)
    return md.MultimodalClassifier({"a": enc_a, "b": enc_b}, {"a": dims[0], "b": dims[1]}, num_classes)


def _vec_batch(n=7, da=5, db=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, da, generator=g), "b": torch.randn(n, db, generator=g)}, torch.arange(n) % 3


def test_published_style_av_model_auto_falls_back_to_vmap_and_equals_the_loop():
    from models_av import make_av_batch, make_av_model

    _, wrapped = make_av_model()
    x, y = make_av_batch(6)
    ref = _loop(wrapped, x, y)
    auto = md.fisher_trace(wrapped, [({m: t[:4] for m, t in x.items()}, y[:4]),
                                     ({m: t[4:] for m, t in x.items()}, y[4:])], chunk_size=3)
    assert isinstance(auto, dict) and auto.engine == "vmap" and auto.n_samples == 6
    assert "'visual.conv1' (Conv2d) receives 8 rows for 4 samples" in auto.reason
    _assert_equals_loop(auto, ref)
    _assert_equals_loop(md.fisher_trace(wrapped, [(x, y)], engine="loop"), ref)
    _assert_equals_loop(md.fisher_trace(wrapped, [(x, y)], engine="vmap"), ref)


def test_forced_hooks_on_folded_frames_names_the_module_not_the_input():
    from models_av import make_av_batch, make_av_model

    _, wrapped = make_av_model()
    x, y = make_av_batch(6)
    with pytest.raises(ValueError, match=r"engine='hooks' cannot .*'visual\.conv1' \(Conv2d\) "
                                         r"receives 12 rows for 6 samples.*video frames") as info:
        md.fisher_trace(wrapped, [(x, y)], engine="hooks")
    assert "input of shape" not in str(info.value)


def test_resnet_blocks_with_inplace_relu_and_residual_add_use_hooks_exactly():
    from models_av import TinyResNet, make_av_batch

    torch.manual_seed(0)
    audio = TinyResNet("audio", 1)
    model = md.MultimodalClassifier({"audio": audio, "vec": nn.Linear(3, 4)},
                                    {"audio": audio.out_dim, "vec": 4}, 4)
    x, y = make_av_batch(6)
    x = {"audio": x["audio"], "vec": torch.randn(6, 3)}
    model.train()
    with torch.no_grad():
        model({m: t * 2 + 0.3 for m, t in x.items()})  # non-default running statistics
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "hooks" and tr.reason is None
    _assert_equals_loop(tr, ref)


class _SharedTwice(nn.Module):
    def __init__(self, shared, out):
        super().__init__()
        self.shared, self.out = shared, nn.Linear(5, out)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(x)))


def test_module_shared_by_two_modalities_counts_for_both():
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    model = _vec_model(shared, _SharedTwice(shared, 4), dims=(5, 4))
    x, y = _vec_batch()
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "vmap" and "shared by the encoders of 'a' and 'b'" in tr.reason
    _assert_equals_loop(tr, ref)  # 'a' is the shared module alone: the old code returned 0.0
    with pytest.raises(ValueError, match="'b.shared' is shared by the encoders of 'a' and 'b'"):
        md.fisher_trace(model, [(x, y)], engine="hooks")


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 5), nn.Linear(5, 4)
        self.l3 = nn.Linear(5, 5)
        self.l3.weight = self.l1.weight  # tied inside one encoder

    def forward(self, x):
        return self.l2(torch.tanh(self.l3(torch.tanh(self.l1(x)))))


def test_weight_tied_inside_one_encoder():
    model = _vec_model(_Tied(), nn.Linear(5, 4))
    x, y = _vec_batch()
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "vmap" and "a.l3.weight is shared with a.l1.weight (tied" in tr.reason
    _assert_equals_loop(tr, ref)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Functional(nn.Module):
    """The layer runs once, and its weight is also used directly (invisible to hooks)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(x) + 0.5 * F.linear(torch.tanh(x), self.lin.weight)


@pytest.mark.parametrize("enc,why", [(_Twice, "'a.lin' (Linear) runs 2 times in one forward"),
                                     (_Functional, "a.lin.weight gets gradient from outside")])
def test_parameter_used_more_than_once_falls_back(enc, why):
    model = _vec_model(enc(), nn.Linear(5, 4), dims=(5, 4))
    x, y = _vec_batch()
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "vmap" and why in tr.reason
    _assert_equals_loop(tr, ref)
    with pytest.raises(ValueError, match=re.escape(why)):
        md.fisher_trace(model, [(x, y)], engine="hooks")


class _BatchCentred(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        h = self.lin(x)
        return h - 0.5 * h.mean(0, keepdim=True)


def test_samples_interacting_in_the_forward_are_detected():
    model = _vec_model(_BatchCentred(), nn.Linear(5, 4))
    x, y = _vec_batch()
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "vmap" and "samples interact" in tr.reason
    _assert_equals_loop(tr, ref)


def test_compiled_encoder():
    torch.manual_seed(0)
    try:
        enc = torch.compile(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)),
                            backend="eager")
        enc(torch.randn(2, 5))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch.compile cannot run on this build: {exc}")
    model = _vec_model(enc, nn.Linear(5, 4))
    x, y = _vec_batch()
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine in ("vmap", "loop") and "compiled or scripted" in tr.reason
    _assert_equals_loop(tr, ref)  # the old hook engine returned 0.0 for 'a'
    with pytest.raises(ValueError, match="module 'a' \\(OptimizedModule\\) is compiled"):
        md.fisher_trace(model, [(x, y)], engine="hooks")


class _TrainModeBN(nn.BatchNorm1d):
    """A BatchNorm that stays in training mode (model.eval() does not reach it)."""

    def train(self, mode=True):
        return super().train(True)


class _TrainBNEncoder(nn.Module):
    """(B, 3, 5) -> Linear -> BatchNorm over (B, 6, 3) kept in training mode -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(5, 6), _TrainModeBN(6), nn.Linear(6, 4)

    def forward(self, x):
        h = self.bn(self.lin(x).transpose(1, 2))
        return self.out(torch.relu(h).mean(2))


def test_batchnorm_in_training_mode_uses_the_loop_and_keeps_its_statistics():
    model = _vec_model(_TrainBNEncoder(), nn.Linear(5, 4))
    x, y = _vec_batch()
    x["a"] = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(4))
    before = {n: b.clone() for n, b in model.named_buffers()}
    ref = _loop(model, x, y)
    with torch.no_grad():  # undo the reference loop's running-statistics updates
        for n, b in model.named_buffers():
            b.copy_(before[n])
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "loop"
    assert "BatchNorm 'a.bn' normalises with batch statistics" in tr.reason
    assert "vmap cannot run the model" in tr.reason
    _assert_equals_loop(tr, ref)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert model.encoders["a"].bn.training and not model.training


class _Branchy(nn.Module):
    """Data-dependent control flow (vmap cannot trace it) and a parameter hooks do not know."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((5,), 1.5))
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        h = self.lin(x * self.scale)
        return torch.tanh(h) if float(h.detach().sum()) > 0 else h


def test_data_dependent_control_flow_uses_the_loop():
    model = _vec_model(_Branchy(), nn.Linear(5, 4))
    x, y = _vec_batch()
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)])
    assert tr.engine == "loop"
    _assert_equals_loop(tr, ref)
    with pytest.raises(ValueError, match="engine='vmap' could not run this model"):
        md.fisher_trace(model, [(x, y)], engine="vmap")


@pytest.mark.parametrize("engine", ["auto", "hooks", "vmap", "loop"])
def test_plain_conv_and_linear_encoders_all_engines_agree(engine):
    torch.manual_seed(0)
    encs = {"img": md.models.Conv2dEncoder(2, 6, channels=(3, 4)),
            "vec": md.models.MLPEncoder(7, 4, hidden=(6,))}
    model = md.MultimodalClassifier(encs, {"img": 6, "vec": 4}, 3, fusion="concat")
    x = {"img": torch.randn(8, 2, 8, 8), "vec": torch.randn(8, 7)}
    y = torch.arange(8) % 3
    model.train()
    with torch.no_grad():
        model(x)
    ref = _loop(model, x, y)
    tr = md.fisher_trace(model, [(x, y)], engine=engine, chunk_size=3)
    assert tr.engine == ("hooks" if engine == "auto" else engine)
    _assert_equals_loop(tr, ref)


@pytest.mark.parametrize("engine", ["auto", "hooks", "vmap", "loop"])
def test_fisher_leaves_modes_grads_buffers_and_rng_untouched(engine):
    import random

    import numpy as np

    torch.manual_seed(0)
    encs = {"img": md.models.Conv2dEncoder(2, 6, channels=(3, 4)),
            "vec": md.models.MLPEncoder(7, 4, hidden=(6,))}
    model = md.MultimodalClassifier(encs, {"img": 6, "vec": 4}, 3)
    x = {"img": torch.randn(6, 2, 8, 8), "vec": torch.randn(6, 7)}
    y = torch.arange(6) % 3
    model.train()
    model(x)
    model.eval()
    model.encoders["vec"].train()  # a mix of modes, as a user may leave it
    frozen = next(model.encoders["img"].parameters())
    frozen.requires_grad_(False)
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.25)
            grads[n] = p.grad
    modes = {n: mod.training for n, mod in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    md.fisher_trace(model, [(x, y)], engine=engine)
    assert {n: mod.training for n, mod in model.named_modules()} == modes
    assert not frozen.requires_grad
    for n, p in model.named_parameters():
        assert (p.grad is grads[n]) if n in grads else p.grad is None, n
        if n in grads:
            assert torch.equal(p.grad, torch.full_like(p, 0.25))
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    assert torch.equal(after[0], torch.rand(3))
    assert after[1] == random.random() and after[2] == np.random.rand()


def test_result_is_a_dict_that_says_how_it_was_computed():
    import json
    import pickle

    model = make_model(2)
    x = make_inputs(model, batch=5)
    y = torch.arange(5) % 3
    tr = md.fisher_trace(model, [(x, y)])
    assert type(tr).__name__ == "FisherTrace" and isinstance(tr, dict)
    assert list(tr) == list(model.modalities) and all(isinstance(v, float) for v in tr.values())
    assert (tr.form, tr.engine, tr.reason, tr.n_samples) == ("per_sample", "hooks", None, 5)
    assert json.loads(json.dumps(tr)) == dict(tr)
    back = pickle.loads(pickle.dumps(tr))
    assert back == tr and back.engine == "hooks"
    batch = md.fisher_trace(model, [(x, y)], per_sample=False)
    assert batch.form == "batch" and batch.engine is None and batch.n_samples == 1


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"chunk_size": 0}, ValueError, r"fisher_trace: chunk_size must be an integer in \[1, inf\); got 0"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size must be an integer"),
    ({"engine": "fast"}, ValueError, r"engine must be one of 'auto', 'hooks', 'vmap', 'loop'; got 'fast'"),
    ({"form": "diag"}, ValueError, "form must be one of 'per_sample', 'batch', 'code'"),
    ({"per_sample": "yes"}, TypeError, "per_sample must be True or False; got 'yes'"),
    ({"progress": 1}, TypeError, "progress must be True or False"),
    ({"device": 3}, TypeError, "device must be None or a device such as 'cpu'"),
])
def test_arguments_are_validated(kwargs, exc, match):
    model = make_model(2)
    x = make_inputs(model, batch=4)
    with pytest.raises(exc, match=match):
        md.fisher_trace(model, [(x, torch.arange(4) % 3)], **kwargs)


def test_fisher_monitor_lives_in_training():
    import modaldiag.training as training

    assert training.FisherMonitor is FisherMonitor
    assert FisherMonitor.__module__ == "modaldiag.training.monitor"
