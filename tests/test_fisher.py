import pytest
import torch
import torch.nn.functional as F
from conftest import FUSIONS, make_inputs, make_model
from torch import nn

import modaldiag as md
from modaldiag.probes import FisherMonitor


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
    with pytest.raises(ValueError, match="engine='hooks' supports"):
        md.fisher_trace(model, [(x, y)], engine="hooks")
