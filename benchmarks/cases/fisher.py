"""Per-sample Fisher on every kind of encoder: each trace must equal a loop of per-sample backward
passes (float32, relative error <= 1e-4), whichever engine ``engine="auto"`` picked, and a forced
engine that cannot be exact must say why, naming the module."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md

from . import Case

AREA = "fisher"
_TESTS = Path(__file__).resolve().parents[2] / "tests"


def _models_av():
    spec = importlib.util.spec_from_file_location("modaldiag_tests_models_av", _TESTS / "models_av.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loop(model, x, y) -> dict[str, float]:
    """One forward and backward per sample; ``sum ||grad||^2`` over each encoder's parameters."""
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


def _equals_loop(build, engine: str):
    """A case body: (trace, loop reference, expected engine) for the model ``build()`` returns."""

    def run():
        model, x, y = build()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        ref = _loop(model, x, y)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        return md.fisher_trace(model, [(x, y)], chunk_size=4), ref, engine

    return run


def _check_equals_loop(result) -> tuple[bool, str]:
    tr, ref, engine = result
    errs = {m: abs(tr[m] - ref[m]) / max(abs(ref[m]), 1e-30) for m in ref}
    parts = ", ".join(f"{m} {tr[m]:.6g} vs loop {ref[m]:.6g} (rel. err {errs[m]:.1e})" for m in ref)
    ok = tr.engine == engine and all(e <= 1e-4 for e in errs.values()) and all(
        v > 0 for v in ref.values())
    return ok, f"engine={tr.engine}: {parts}"


def _vec(enc_a: nn.Module, enc_b: nn.Module, dims=(4, 4), shape_a=(5,), n: int = 6):
    model = md.MultimodalClassifier({"a": enc_a, "b": enc_b}, {"a": dims[0], "b": dims[1]}, 3)
    g = torch.Generator().manual_seed(3)
    x = {"a": torch.randn(n, *shape_a, generator=g), "b": torch.randn(n, 5, generator=g)}
    return model, x, torch.arange(n) % 3


class _Shared(nn.Module):
    def __init__(self, shared: nn.Module):
        super().__init__()
        self.shared, self.out = shared, nn.Linear(5, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(x)))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 4)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(5, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class _TrainModeBN(nn.BatchNorm1d):
    def train(self, mode: bool = True):
        return super().train(True)


class _TrainBN(nn.Module):
    """BatchNorm kept in training mode (``model.eval()`` does not reach it): samples interact."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.out = nn.Linear(5, 6), _TrainModeBN(6), nn.Linear(6, 4)

    def forward(self, x):  # (B, 3, 5)
        return self.out(torch.relu(self.bn(self.lin(x).transpose(1, 2))).mean(2))


def _av():
    av = _models_av()
    _, wrapped = av.make_av_model()
    x, y = av.make_av_batch(6)
    return wrapped, x, y


def _shared():
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    return _vec(nn.Sequential(shared, nn.Tanh(), nn.Linear(5, 4)), _Shared(shared))


def _tied():
    torch.manual_seed(0)
    return _vec(_Tied(), nn.Linear(5, 4))


def _twice():
    torch.manual_seed(0)
    return _vec(_Twice(), nn.Linear(5, 4))


def _compiled():
    torch.manual_seed(0)
    enc = torch.compile(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)), backend="eager")
    return _vec(enc, nn.Linear(5, 4))


def _bn_eval():
    torch.manual_seed(0)
    enc = md.models.Conv2dEncoder(2, 4, channels=(3,))
    model = md.MultimodalClassifier({"a": enc, "b": nn.Linear(5, 4)}, {"a": 4, "b": 4}, 3)
    g = torch.Generator().manual_seed(3)
    x = {"a": torch.randn(6, 2, 6, 6, generator=g), "b": torch.randn(6, 5, generator=g)}
    model.train()
    with torch.no_grad():
        model({"a": x["a"] * 2 + 1, "b": x["b"]})  # non-default running statistics
    return model, x, torch.arange(6) % 3


def _bn_train():
    torch.manual_seed(0)
    return _vec(_TrainBN(), nn.Linear(5, 4), shape_a=(3, 5))


def _untouched():
    model, x, y = _bn_eval()
    model.eval()
    model.encoders["b"].train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    modes = [mod.training for mod in model.modules()]
    grads = [p.grad for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    md.fisher_trace(model, [(x, y)])
    drawn = (float(torch.rand(())), random.random(), float(np.random.rand()))
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    same_rng = drawn == (float(torch.rand(())), random.random(), float(np.random.rand()))
    changed = {
        "modes": sum(a != mod.training for a, mod in zip(modes, model.modules(), strict=True)),
        "grads": sum(g is not p.grad or not torch.equal(p.grad, torch.full_like(p, 0.5))
                     for g, p in zip(grads, model.parameters(), strict=True)),
        "buffers": sum(not torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True)),
        "rng": int(not same_rng),
    }
    return changed


def _warm_up_torch_func() -> None:
    """Pay torch.func's one-time initialisation (seconds) here rather than in the first case."""
    from torch.func import grad, vmap

    vmap(grad(lambda w, v: (w * v).sum()), in_dims=(None, 0))(torch.ones(2), torch.ones(3, 2))


def cases(tmp: Path) -> list[Case]:
    _warm_up_torch_func()
    def equal(name, build, engine):
        return Case(AREA, name, _equals_loop(build, engine), check=_check_equals_loop)

    def forced_hooks(build):
        def run():
            model, x, y = build()
            return md.fisher_trace(model, [(x, y)], engine="hooks")

        return run

    dynamo = getattr(torch, "_dynamo", None)
    compiled_ok = dynamo is not None and dynamo.is_dynamo_supported()
    model, x, y = _bn_eval()

    out = [
        equal("published-style AV model (ResNet blocks, in-place ReLU, out += identity, frames "
              "folded into the batch): equals the per-sample loop", _av, "vmap"),
        equal("a module shared by two modalities' encoders (counts for both)", _shared, "vmap"),
        equal("a weight tied between two layers of one encoder", _tied, "vmap"),
        equal("a module called twice in one forward", _twice, "vmap"),
        equal("eval-mode BatchNorm in a conv encoder (hook engine)", _bn_eval, "hooks"),
        equal("a BatchNorm kept in training mode (vmap cannot run it: per-sample loop)", _bn_train,
              "loop"),
        Case(AREA, "forced engine='hooks' on the AV model names the folded frames, not the input",
             forced_hooks(_av), raises=ValueError,
             match=r"engine='hooks' cannot .*'visual\.conv1' \(Conv2d\) receives 12 rows for 6 samples"),
        Case(AREA, "forced engine='hooks' on a module shared by two modalities", forced_hooks(_shared),
             raises=ValueError, match=r"shared by the encoders of 'a' and 'b'"),
        Case(AREA, "fisher_trace leaves modes, grads, buffers and the global RNG untouched",
             _untouched, check=lambda c: (not any(c.values()),
                                          "changed: " + ", ".join(f"{k} {v}" for k, v in c.items()))),
        Case(AREA, "chunk_size=0", lambda: md.fisher_trace(model, [(x, y)], chunk_size=0),
             raises=ValueError, match=r"chunk_size must be an integer in \[1, inf\); got 0"),
        Case(AREA, "engine='fast'", lambda: md.fisher_trace(model, [(x, y)], engine="fast"),
             raises=ValueError, match="engine must be one of 'auto', 'hooks', 'vmap', 'loop'"),
    ]
    if compiled_ok:
        out.insert(4, Case(AREA, "a torch.compile'd encoder (backend='eager')",
                           _equals_loop(_compiled, "vmap"), check=_check_equals_loop))
    return out
