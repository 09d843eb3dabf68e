"""Every public probe leaves the model and the global RNG states exactly as found.

The model is in train mode with a frozen (eval-mode) BatchNorm inside an encoder, a Dropout in
train mode, a parameter with ``requires_grad=False``, existing ``.grad`` tensors, and a stored
mean baseline (BaselineStore buffers). After each probe, every submodule's mode, every
``requires_grad``, every ``.grad`` (same object, same values), every buffer (same object, same
values), every parameter, and the next draws of torch / numpy / python RNGs must equal those of
a run without the probe.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import modaldiag as md
from modaldiag.utils.torch_utils import seed_everything


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.a = torch.randn(n, 6, generator=g) + self.y[:, None].float()
        self.b = torch.randn(n, 5, generator=g) + 0.3 * self.y[:, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"a": self.a[i], "b": self.b[i]}, self.y[i]


def _loader(shuffle: bool = True):
    # a shuffled DataLoader draws from the global torch RNG every time it is iterated
    return torch.utils.data.DataLoader(_Pairs(), batch_size=16, shuffle=shuffle)


def _model() -> md.MultimodalClassifier:
    torch.manual_seed(0)
    enc_a = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
    enc_b = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.3), nn.ReLU())
    model = md.MultimodalClassifier({"a": enc_a, "b": enc_b}, {"a": 8, "b": 8}, 3)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for inputs, _ in _loader(shuffle=False):
            model(inputs)
    model.set_baseline("mean", _loader(shuffle=False))
    model.train()
    enc_a[1].eval()  # the user's frozen BatchNorm inside a train-mode model
    enc_b[0].bias.requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.125)
    return model


def _snapshot(model: nn.Module) -> dict:
    return {
        "modes": {name: mod.training for name, mod in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {n: None if p.grad is None else p.grad.clone()
                        for n, p in model.named_parameters()},
        "buffers": dict(model.named_buffers()),
        "buffer_values": {n: b.clone() for n, b in model.named_buffers()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def _next_draws():
    return torch.rand(4), np.random.rand(4), random.random()


def _fisher(**kwargs):
    return lambda model, tmp: md.fisher_trace(model, _loader(), **kwargs)


PROBES = {
    "robustness": lambda model, tmp: md.robustness(model, _loader(), noise_space="input",
                                                   n_resamples=20),
    "robustness-mean-from-loader": lambda model, tmp: md.robustness(
        model, _loader(), baseline="mean", baseline_loader=_loader(), n_resamples=20),
    "conditional_utilization": lambda model, tmp: md.probes.conditional_utilization(
        model, _loader(), baseline_loader=_loader()),
    "conditional_utilization-stored": lambda model, tmp: md.probes.conditional_utilization(
        model, _loader()),
    "shapley": lambda model, tmp: md.shapley(model, _loader()),
    "shapley-zero-override": lambda model, tmp: md.shapley(model, _loader(), baseline="zero"),
    "shapley-mean-from-loader": lambda model, tmp: md.shapley(
        model, _loader(), baseline="mean", baseline_loader=_loader()),
    "shapley-permutation": lambda model, tmp: md.shapley(model, _loader(), method="permutation",
                                                         n_permutations=3),
    "shapley_to_disk": lambda model, tmp: md.probes.shapley_to_disk(model, _loader(), tmp / "sv"),
    "evaluate": lambda model, tmp: md.probes.evaluate(model, _loader()),
    "unimodal_scores": lambda model, tmp: md.unimodal_scores(model, _loader(), baseline="zero"),
    "collect_features": lambda model, tmp: md.probes.collect_features(model, _loader()),
    "separability": lambda model, tmp: md.separability(model, _loader(), _loader(), n_init=2),
    "under_optimisation": lambda model, tmp: md.probes.under_optimisation(
        model, _loader(), _loader(), epochs=1),
    "diagnose": lambda model, tmp: md.diagnose(model, _loader(), _loader(), fisher="batch",
                                               reference_epochs=1),
    "diagnose-held-out-with-history": lambda model, tmp: md.diagnose(
        model, _loader(), _loader(), split="test", train_loader=_loader(), fisher="batch",
        history=md.History(("a", "b"), epochs=[{"epoch": t, "fisher": {"a": v, "b": v}}
                                               for t, v in enumerate([1.0, 2.0, 2.1, 2.1])]),
        progress=True),
    "combine": lambda model, tmp: md.probes.combine(
        [md.diagnose(model, _loader(), fisher=None, seed=s) for s in (0, 1)]),
    "fisher-per_sample-auto": _fisher(),
    "fisher-per_sample-hooks": _fisher(engine="hooks"),
    "fisher-per_sample-vmap": _fisher(engine="vmap"),
    "fisher-per_sample-loop": _fisher(engine="loop"),
    "fisher-batch": _fisher(form="batch"),
    "fisher-code": _fisher(form="code"),
    "grad_sq_norms": lambda model, tmp: md.probes.grad_sq_norms(model),
    "learning_window": lambda model, tmp: md.learning_window({"a": [1.0, 2.0, 2.5],
                                                              "b": [1.0, 1.1, 1.2]}),
    "purity": lambda model, tmp: md.probes.purity(np.random.default_rng(0).normal(size=(30, 2)),
                                                  np.arange(30) % 3, 3, n_init=2),
    "linear_probe_accuracy": lambda model, tmp: md.probes.linear_probe_accuracy(
        np.random.default_rng(0).normal(size=(30, 2)), np.arange(30) % 3,
        np.random.default_rng(1).normal(size=(9, 2)), np.arange(9) % 3),
}


def _run(probe, tmp):
    model = _model()
    seed_everything(123)
    if probe is not None:
        probe(model, tmp)
    return model, _snapshot(model), _next_draws()


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_leaves_model_and_rng_as_found(name, tmp_path):
    _, ref, ref_draws = _run(None, tmp_path)
    model, got, draws = _run(PROBES[name], tmp_path)

    assert not ref["modes"]["encoders.a.1"] and ref["modes"][""]  # the setup itself
    assert got["modes"] == ref["modes"]
    assert got["requires_grad"] == ref["requires_grad"]
    for n, g in got["grads"].items():
        assert (g is None) == (ref["grads"][n] is None), n
        if g is not None:
            # the same tensor object the user had, with the same values
            assert g is dict(model.named_parameters())[n].grad
            assert torch.equal(g, ref["grad_values"][n]), n
    assert got["buffers"].keys() == ref["buffers"].keys()
    for n, b in got["buffers"].items():
        assert torch.equal(b, ref["buffer_values"][n]), n
        assert torch.equal(got["buffer_values"][n], ref["buffer_values"][n]), n
    assert int(got["buffer_values"]["encoders.a.1.num_batches_tracked"]) == 3
    for n, p in got["params"].items():
        assert torch.equal(p, ref["params"][n]), n
    assert torch.equal(draws[0], ref_draws[0])
    np.testing.assert_array_equal(draws[1], ref_draws[1])
    assert draws[2] == ref_draws[2]
    assert model.baseline_kind == "mean"


def test_buffers_are_the_same_objects_after_a_baseline_override():
    model = _model()
    before = dict(model.named_buffers())
    md.shapley(model, _loader(), baseline="zero")
    md.shapley(model, _loader(), baseline="mean", baseline_loader=_loader())
    after = dict(model.named_buffers())
    assert after.keys() == before.keys()
    assert all(after[n] is before[n] for n in before)


def test_eval_mode_helper_restores_every_submodule():
    from modaldiag.probes._common import eval_mode

    model = _model()
    modes = {n: m.training for n, m in model.named_modules()}
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.encoders["a"][1].training and model.encoders["b"][1].training


def test_frozen_batchnorm_statistics_do_not_drift_in_later_training():
    """The user-visible harm: after a probe, a frozen BatchNorm must stay frozen in training."""
    def train_one_epoch(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        for inputs, y in _loader(shuffle=False):
            opt.zero_grad()
            nn.functional.cross_entropy(model(inputs), y).backward()
            opt.step()

    model = _model()
    mean_before = model.encoders["a"][1].running_mean.clone()
    md.unimodal_scores(model, _loader())
    md.shapley(model, _loader())
    train_one_epoch(model)
    torch.testing.assert_close(model.encoders["a"][1].running_mean, mean_before, rtol=0, atol=0)
    assert int(model.encoders["a"][1].num_batches_tracked) == 3
