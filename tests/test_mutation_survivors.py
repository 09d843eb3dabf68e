"""Tests added for mutants that survived benchmarks/mutation.py (see docs/testing.md)."""

import pytest
import torch
from torch import nn

import modaldiag as md


class _SeqEncoder(nn.Module):
    """A Linear applied to every step of a (B, T, D) sequence, then a mean over T: the per-sample
    gradient of that Linear sums over T (the hook engine's 3-D branch)."""

    def __init__(self, d_in=3, d_out=4):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.proj(x)).mean(1)


def test_hook_engine_per_sample_fisher_of_a_linear_over_sequences_equals_the_loop():
    torch.manual_seed(0)
    encs = {"seq": _SeqEncoder(), "flat": md.models.MLPEncoder(5, 4, hidden=(6,))}
    model = md.MultimodalClassifier(encs, {"seq": 4, "flat": 4}, 3)
    g = torch.Generator().manual_seed(1)
    x = {"seq": torch.randn(7, 5, 3, generator=g), "flat": torch.randn(7, 5, generator=g)}
    loader = [(x, torch.arange(7) % 3)]
    hooks = md.fisher_trace(model, loader, engine="hooks")
    loop = md.fisher_trace(model, loader, engine="loop")
    assert hooks["seq"] > 0
    for m in loop:
        assert hooks[m] == pytest.approx(loop[m], rel=1e-5), m


@pytest.mark.parametrize("labels, why", [
    (lambda n: torch.arange(n).double().numpy() % 2, "float labels"),          # not integer
    (lambda n: (torch.arange(n) % 2 - 1).numpy(), "negative labels"),           # integer, < 0
    (lambda n: (torch.arange(n) % 2 - 0.5).numpy(), "float and negative"),
])
def test_purity_refuses_labels_that_are_not_non_negative_integers(labels, why):
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)).numpy()
    with pytest.raises(ValueError, match="non-negative integer class indices"):
        md.probes.purity(x, labels(10), 2)


def test_purity_of_separated_clusters_is_one_and_of_shuffled_labels_is_lower():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 2, generator=g) * 0.05 + c for c in (0.0, 5.0)]).numpy()
    y = (torch.arange(40) >= 20).long().numpy()
    assert md.probes.purity(x, y, 2) == 1.0
    mixed = (torch.arange(40) % 2).numpy()  # each cluster holds 10 of each label
    assert md.probes.purity(x, mixed, 2) == 0.5


def test_probes_print_no_progress_bar_unless_asked(tmp_path, capfd):
    from conftest import make_inputs, make_model

    from modaldiag.probes.shapley import shapley_to_disk

    model = make_model(2, "concat")
    x = make_inputs(model, batch=6)
    loader = [(x, torch.arange(6) % 3)] * 2
    capfd.readouterr()
    md.shapley(model, loader, progress=False)
    shapley_to_disk(model, loader, tmp_path / "sv", progress=False)
    md.fisher_trace(model, loader)
    out, err = capfd.readouterr()
    assert "shapley" not in err and "%|" not in err and out == ""
    shapley_to_disk(model, loader, tmp_path / "sv2", progress=True)
    assert "%|" in capfd.readouterr().err  # the bar exists when asked for
