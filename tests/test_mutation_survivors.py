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


def test_probes_print_no_progress_bar_unless_asked(tmp_path, capfd, monkeypatch):
    from conftest import make_inputs, make_model

    monkeypatch.setattr(md.utils.progress, "PLAIN_MIN_SECONDS", 0.0)  # print even fast phases

    from modaldiag.probes.shapley import shapley_to_disk

    model = make_model(2, "concat")
    x = make_inputs(model, batch=6)
    loader = [(x, torch.arange(6) % 3)] * 2
    capfd.readouterr()
    md.shapley(model, loader, progress=False)
    shapley_to_disk(model, loader, tmp_path / "sv", progress=False)
    md.fisher_trace(model, loader)
    out, err = capfd.readouterr()
    assert "shapley" not in err and "batch" not in err and out == ""
    shapley_to_disk(model, loader, tmp_path / "sv2", progress=True)
    assert "shapley" in capfd.readouterr().err  # the bar exists when asked for


def test_theil_sen_slope_is_the_median_of_pairwise_slopes():
    from modaldiag.probes.window import _theil_sen

    # 3 points -> 3 slopes (odd count): (1-0)/1, (5-0)/2, (5-1)/1 = 1, 2.5, 4 -> median 2.5
    assert _theil_sen([0.0, 1.0, 5.0]) == 2.5
    # 4 points -> 6 slopes (even count): mean of the two middle ones
    y = [0.0, 1.0, 5.0, 6.0]
    slopes = sorted((y[j] - y[i]) / (j - i) for i in range(4) for j in range(i + 1, 4))
    assert _theil_sen(y) == 0.5 * (slopes[2] + slopes[3])
    assert _theil_sen([3.0, 1.0, -1.0, -3.0, -5.0]) == -2.0  # a line: its slope exactly


def test_per_class_unimodal_accuracy_is_each_modalitys_own():
    from conftest import make_inputs, make_model

    model = make_model(3, "gated", num_classes=3, seed=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p, generator=None))
    x = make_inputs(model, batch=30, seed=5)
    y = torch.arange(30) % 3
    res = md.probes.evaluate(model, [(x, y)])
    with torch.no_grad():
        feats = model.encode(x)
        preds = {m: model.head(feats, present=[m]).argmax(1) for m in model.modalities}
        fused = model.head(feats).argmax(1)
    distinct = set()
    for c in range(3):
        sel = y == c
        assert res.per_class[c]["n"] == int(sel.sum())
        assert res.per_class[c]["acc"] == pytest.approx(float((fused[sel] == c).double().mean()))
        for m in model.modalities:
            want = float((preds[m][sel] == c).double().mean())
            assert res.per_class[c]["unimodal_acc"][m] == pytest.approx(want), (c, m)
            distinct.add(round(want, 6))
    assert len(distinct) > 2  # the modalities' accuracies differ, so a swapped index shows


class _Centering(nn.Module):
    """An encoder whose samples interact: it subtracts the batch mean (like batch statistics)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_hook_engine_refuses_interacting_samples_at_every_batch_size(n):
    """The interaction check runs a sub-batch alone; it must be a strict subset even at n = 2."""
    torch.manual_seed(0)
    encs = {"a": _Centering(), "b": md.models.MLPEncoder(5, 4, hidden=(6,))}
    model = md.MultimodalClassifier(encs, {"a": 4, "b": 4}, 3)
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(n, 5, generator=g) * 3, "b": torch.randn(n, 5, generator=g)}
    with pytest.raises(ValueError, match="samples interact"):
        md.fisher_trace(model, [(x, torch.arange(n) % 3)], engine="hooks")
