import itertools
import math

import numpy as np
import pytest
import torch
from conftest import FUSIONS, make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

import modaldiag as md
from modaldiag.probes import coalition_masks, shapley_weights
from modaldiag.probes.shapley import value_of_logits


def _loader(model, n=12, seed=1):
    x = make_inputs(model, batch=n, seed=seed)
    y = torch.arange(n) % model.num_classes
    return [(x, y)], x, y


def _explicit_shapley(model, x, y, value):
    """Enumerate every permutation; v(S) from one head call per coalition (independent path)."""
    model.eval()
    mods = model.modalities
    m = len(mods)
    with torch.no_grad():
        feats = model.encode(x)
        v = {}
        for r in range(m + 1):
            for s in itertools.combinations(range(m), r):
                logits = model.head(feats, present=[mods[i] for i in s])
                v[frozenset(s)] = value_of_logits(logits.unsqueeze(0), y, torch.tensor([r]), value)[0]
    phi = torch.zeros(len(y), m, dtype=torch.float64)
    for perm in itertools.permutations(range(m)):
        seen: set[int] = set()
        for i in perm:
            phi[:, i] += v[frozenset(seen | {i})] - v[frozenset(seen)]
            seen.add(i)
    return phi / math.factorial(m), v


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("value", ["paper", "prob"])
def test_exact_equals_explicit_enumeration(fusion, m, value):
    model = make_model(m, fusion, num_classes=3)
    loader, x, y = _loader(model)
    sv = md.shapley(model, loader, value=value)
    ref, v = _explicit_shapley(model, x, y, value)
    torch.testing.assert_close(sv.values, ref, rtol=1e-6, atol=1e-7)  # float32 logits
    torch.testing.assert_close(sv.full_value, v[frozenset(range(m))])
    # efficiency, exactly
    torch.testing.assert_close(sv.values.sum(1), sv.full_value - sv.empty_value, rtol=0, atol=1e-12)


@pytest.mark.parametrize("value", ["logit", "neg_loss", "correct"])
def test_other_value_functions_match_enumeration(value):
    model = make_model(3, "gated")
    loader, x, y = _loader(model)
    ref, _ = _explicit_shapley(model, x, y, value)
    torch.testing.assert_close(md.shapley(model, loader, value=value).values, ref)


def test_paper_value_sums_to_m_for_correct_samples():
    model = make_model(3, "concat")
    loader, _, _ = _loader(model, n=30)
    sv = md.shapley(model, loader)
    correct = sv.predictions == sv.labels
    assert torch.all(sv.empty_value == 0)
    torch.testing.assert_close(sv.values[correct].sum(1), torch.full((int(correct.sum()),), 3.0,
                                                                      dtype=torch.float64))
    assert torch.all(sv.values[~correct].sum(1) == 0)


def test_equals_shap_exact_explainer_on_the_same_game():
    import shap

    model = make_model(4, "film").eval()
    loader, x, y = _loader(model, n=5)
    sv = md.shapley(model, loader, value="prob")
    feats = model.encode(x)
    mods = model.modalities
    for i in range(5):
        def game(masks, i=i):
            masks = torch.as_tensor(np.asarray(masks) > 0.5)
            with torch.no_grad():
                one = {m: f[i:i + 1] for m, f in feats.items()}
                logits = model.head_coalitions(one, masks)
            return value_of_logits(logits, y[i:i + 1], masks.sum(1), "prob")[:, 0].numpy()

        explainer = shap.explainers.Exact(game, shap.maskers.Independent(np.zeros((1, len(mods)))))
        expl = explainer(np.ones((1, len(mods))))
        np.testing.assert_allclose(expl.values[0], sv.values[i].numpy(), atol=1e-10)


@st.composite
def games(draw):
    m = draw(st.integers(2, 6))
    vals = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2 ** m, max_size=2 ** m))
    return m, torch.tensor(vals, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(games(), st.floats(-3, 3), st.floats(-3, 3))
def test_shapley_axioms_on_random_games(game, a, b):
    m, v = game
    masks = coalition_masks(m)
    w = shapley_weights(masks)
    phi = v @ w
    # efficiency
    assert math.isclose(float(phi.sum()), float(v[-1] - v[0]), abs_tol=1e-9)
    # linearity
    v2 = torch.roll(v, 1)
    torch.testing.assert_close((a * v + b * v2) @ w, a * phi + b * (v2 @ w))
    # dummy: make player 0 a dummy (v(S + 0) = v(S))
    index = {tuple(row.tolist()): k for k, row in enumerate(masks)}
    vd = v.clone()
    for k, row in enumerate(masks):
        if row[0]:
            without = row.clone()
            without[0] = False
            vd[k] = v[index[tuple(without.tolist())]]
    assert abs(float((vd @ w)[0])) < 1e-9
    # symmetry: symmetrise players 0 and 1
    vs = v.clone()
    for k, row in enumerate(masks):
        swapped = row.clone()
        swapped[0], swapped[1] = row[1], row[0]
        vs[k] = (v[k] + v[index[tuple(swapped.tolist())]]) / 2
    ps = vs @ w
    assert math.isclose(float(ps[0]), float(ps[1]), abs_tol=1e-9)


def test_dummy_modality_through_a_real_model():
    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 4)

    torch.manual_seed(0)
    encoders = {"m0": md.models.MLPEncoder(5, 4), "m1": Zero(), "m2": md.models.MLPEncoder(3, 4)}
    model = md.MultimodalClassifier(encoders, {"m0": 4, "m1": 4, "m2": 4}, 3, fusion="film",
                                    film_target="m1")
    x = {"m0": torch.randn(10, 5), "m1": torch.randn(10, 2), "m2": torch.randn(10, 3)}
    sv = md.shapley(model, [(x, torch.arange(10) % 3)], value="logit")
    assert sv.values[:, 1].abs().max() < 1e-12  # dummy, up to float64 rounding
    assert sv.values[:, 0].abs().sum() > 0 and sv.values[:, 2].abs().sum() > 0


def test_permutation_mode_converges_within_reported_error():
    model = make_model(6, "sum", num_classes=4)
    loader, _, _ = _loader(model, n=40)
    exact = md.shapley(model, loader, value="prob", method="exact")
    approx = md.shapley(model, loader, value="prob", method="permutation", n_permutations=100, seed=0)
    assert approx.method == "permutation" and approx.stderr is not None
    err = (approx.values - exact.values).abs()
    assert float((err <= 4 * approx.stderr + 1e-12).double().mean()) > 0.97
    # efficiency holds per permutation, so the estimate is efficient too
    torch.testing.assert_close(approx.values.sum(1), approx.full_value - approx.empty_value)
    coarse = md.shapley(model, loader, value="prob", method="permutation", n_permutations=5, seed=0)
    assert err.mean() < (coarse.values - exact.values).abs().mean()
    assert md.shapley(model, loader, method="auto").method == "exact"


def test_mean_baseline_requires_training_features(synth):
    model = md.models.default_model(synth, feature_dim=8)
    loader = synth.val.loader(128)
    with pytest.raises(ValueError, match="baseline='mean' needs"):
        md.shapley(model, loader, baseline="mean")
    sv = md.shapley(model, loader, baseline="mean", baseline_loader=synth.train.loader(256))
    assert model.baseline_kind == "zero"  # restored
    model.set_baseline("mean", synth.train.loader(256))
    ref = md.shapley(model, loader, baseline="mean")
    torch.testing.assert_close(sv.values, ref.values)
    assert not torch.allclose(sv.values, md.shapley(model, loader).values)


def test_result_object_and_shap_plots(synth):
    import matplotlib.pyplot as plt
    import shap

    model = md.models.default_model(synth, feature_dim=8)
    md.fit(model, synth.train.loader(64, shuffle=True), epochs=3, progress=False)
    sv = md.shapley(model, synth.test.loader(50))
    assert sv.values.shape == (len(synth.test), 2) and sv.modalities == ("a", "b")
    assert set(sv.mean()) == {"a", "b"} and sv.dominant == "a"
    share = sv.low_contribution_share()
    assert share["b"] > share["a"]
    assert 0 <= sv.imbalance_degree() <= 1
    sub = sv[sv.labels == 0]
    assert len(sub) == int((sv.labels == 0).sum())
    expl = sv.to_shap()
    assert expl.values.shape == (len(sv), 2) and list(expl.feature_names) == ["a", "b"]
    shap.plots.bar(expl, show=False)
    plt.close("all")
    shap.plots.beeswarm(expl, show=False)
    plt.close("all")
    assert sv.to_dict()["mean"] == sv.mean()


def test_bad_arguments():
    model = make_model(2)
    loader, _, _ = _loader(model)
    with pytest.raises(ValueError, match="value must be one of"):
        md.shapley(model, loader, value="accuracy")
    with pytest.raises(ValueError, match="method must be one of"):
        md.shapley(model, loader, method="kernel")
    with pytest.raises(ValueError, match="empty"):
        md.shapley(model, [])


def test_shapley_to_disk_matches_memory_and_resumes(tmp_path):
    model = make_model(3, "gated")
    x = make_inputs(model, batch=50)
    y = torch.arange(50) % 3
    loader = [({k: v[i:i + 10] for k, v in x.items()}, y[i:i + 10]) for i in range(0, 50, 10)]
    summary = md.probes.shapley_to_disk(model, loader, tmp_path, value="prob")
    ref = md.shapley(model, loader, value="prob")
    assert summary["n"] == 50
    for m, v in ref.mean().items():
        assert summary["mean"][m] == pytest.approx(v)
        assert summary["low_contribution_share"][m] == pytest.approx(ref.low_contribution_share()[m])
    loaded = md.probes.ShapleyValues.load(tmp_path)
    torch.testing.assert_close(loaded.values, ref.values)
    # an interrupted run: one chunk missing, another tampered to prove it is not recomputed
    (tmp_path / "chunk-000002.npz").unlink()
    mtime = (tmp_path / "chunk-000000.npz").stat().st_mtime_ns
    again = md.probes.shapley_to_disk(model, loader, tmp_path, value="prob")
    assert again == summary
    assert (tmp_path / "chunk-000000.npz").stat().st_mtime_ns == mtime
    assert (tmp_path / "chunk-000002.npz").exists()
