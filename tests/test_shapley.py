import functools
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import FUSIONS, make_inputs, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

import modaldiag as md
from modaldiag.probes import coalition_masks, shapley_weights
from modaldiag.probes.shapley import value_of_logits

F32_RTOL, F32_ATOL = 1e-5, 1e-6  # values derived from float32 logits
F64_SUM_ATOL = 1e-9  # float64 sums of a few float64 terms


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
    # v(S) comes from float32 logits (stacked vs one head call per coalition): float32 tolerance
    torch.testing.assert_close(sv.values, ref, rtol=F32_RTOL, atol=F32_ATOL)
    torch.testing.assert_close(sv.full_value, v[frozenset(range(m))], rtol=F32_RTOL, atol=F32_ATOL)
    # efficiency is a float64 sum of 2^M weighted values
    torch.testing.assert_close(sv.values.sum(1), sv.full_value - sv.empty_value, rtol=0,
                               atol=F64_SUM_ATOL)


@pytest.mark.parametrize("value", ["logit", "neg_loss", "correct"])
def test_other_value_functions_match_enumeration(value):
    model = make_model(3, "gated")
    loader, x, y = _loader(model)
    ref, _ = _explicit_shapley(model, x, y, value)
    torch.testing.assert_close(md.shapley(model, loader, value=value).values, ref,
                               rtol=F32_RTOL, atol=F32_ATOL)


def test_paper_value_sums_to_m_for_correct_samples():
    model = make_model(3, "concat")
    loader, _, _ = _loader(model, n=30)
    sv = md.shapley(model, loader)
    correct = sv.predictions == sv.labels
    assert torch.all(sv.empty_value == 0)
    torch.testing.assert_close(sv.values[correct].sum(1), torch.full((int(correct.sum()),), 3.0,
                                                                      dtype=torch.float64),
                               rtol=0, atol=F64_SUM_ATOL)
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
        # one sample per head call here vs a batch of 5 in md.shapley: float32 matmuls of
        # different shapes differ by ~1 ulp, i.e. ~3e-7 relative (2.9e-10 absolute was seen)
        np.testing.assert_allclose(expl.values[0], sv.values[i].numpy(), rtol=F32_RTOL,
                                   atol=F32_ATOL)


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
    torch.testing.assert_close((a * v + b * v2) @ w, a * phi + b * (v2 @ w), rtol=1e-9,
                               atol=F64_SUM_ATOL)
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
    assert sv.values[:, 1].abs().max() < F32_ATOL  # dummy, up to float32 rounding of the logits
    assert sv.values[:, 0].abs().sum() > 0 and sv.values[:, 2].abs().sum() > 0


def test_permutation_mode_converges_within_reported_error():
    model = make_model(6, "sum", num_classes=4)
    loader, _, _ = _loader(model, n=40)
    exact = md.shapley(model, loader, value="prob", method="exact")
    approx = md.shapley(model, loader, value="prob", method="permutation", n_permutations=100, seed=0)
    assert approx.method == "permutation" and approx.stderr is not None
    err = (approx.values - exact.values).abs()
    assert float((err <= 4 * approx.stderr + F32_ATOL).double().mean()) > 0.97
    # efficiency holds per permutation, so the estimate is efficient too (a float64 sum)
    torch.testing.assert_close(approx.values.sum(1), approx.full_value - approx.empty_value,
                               rtol=0, atol=F64_SUM_ATOL)
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
    torch.testing.assert_close(sv.values, ref.values, rtol=F32_RTOL, atol=F32_ATOL)
    assert sv.baseline == ref.baseline == "mean"
    zero = md.shapley(model, loader, baseline="zero")
    assert zero.baseline == "zero" and model.baseline_kind == "mean"
    assert not torch.allclose(sv.values, zero.values)


def test_stored_mean_baseline_is_the_default(synth):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=8)
    md.fit(model, synth.train.loader(64, shuffle=True), epochs=2, progress=False)
    loader = synth.val.loader(128)
    before = md.shapley(model, loader, value="prob")
    assert before.baseline == "zero"
    model.set_baseline("mean", synth.train.loader(256))
    stored = md.shapley(model, loader, value="prob")
    explicit = md.shapley(model, loader, value="prob", baseline="mean")
    zero = md.shapley(model, loader, value="prob", baseline="zero")
    assert stored.baseline == explicit.baseline == "mean" and zero.baseline == "zero"
    assert stored.to_dict()["baseline"] == "mean"
    torch.testing.assert_close(stored.values, explicit.values, rtol=0, atol=0)
    torch.testing.assert_close(zero.values, before.values, rtol=0, atol=0)
    # the stored mean baseline changes the game: v(no modality) and the contributions move
    gap = (stored.values - zero.values).abs().mean().item()
    empty_gap = (stored.empty_value - zero.empty_value).abs().mean().item()
    assert gap > 5e-3 and empty_gap > 1e-2, (gap, empty_gap)
    # efficiency under each baseline
    torch.testing.assert_close(stored.values.sum(1), stored.full_value - stored.empty_value,
                               rtol=0, atol=F64_SUM_ATOL)


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
    pa, pb = float(sv.values[:, 0].mean()), float(sv.values[:, 1].mean())
    assert sv.imbalance_degree() == pytest.approx(abs(pa - pb) / (abs(pa) + abs(pb)), rel=1e-12)
    full = sv.full_value.unsqueeze(1) / 2
    assert share == pytest.approx({m: float((sv.values[:, j] < full[:, 0]).double().mean())
                                   for j, m in enumerate(("a", "b"))}, rel=1e-12)
    per_class = sv.per_class()
    assert per_class[0]["a"] == pytest.approx(float(sv.values[sv.labels == 0, 0].mean()), rel=1e-12)
    sub = sv[sv.labels == 0]
    assert len(sub) == int((sv.labels == 0).sum())
    expl = sv.to_shap()
    assert expl.values.shape == (len(sv), 2) and list(expl.feature_names) == ["a", "b"]
    plt.figure()  # shap draws on the current axes: a fresh figure, whatever ran before
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
    torch.testing.assert_close(loaded.values, ref.values, rtol=0, atol=0)  # same batches, same bits
    # an interrupted run: one chunk missing, another tampered to prove it is not recomputed
    (tmp_path / "chunk-000002.npz").unlink()
    mtime = (tmp_path / "chunk-000000.npz").stat().st_mtime_ns
    again = md.probes.shapley_to_disk(model, loader, tmp_path, value="prob")
    assert again == summary
    assert (tmp_path / "chunk-000000.npz").stat().st_mtime_ns == mtime
    assert (tmp_path / "chunk-000002.npz").exists()


def test_bad_probe_arguments_are_refused_with_their_name():
    model = make_model(2)
    loader, _, _ = _loader(model)
    for kwargs, exc, match in [
        ({"n_permutations": 0}, ValueError, r"shapley: n_permutations must be an integer in \[1, inf[])]"),
        ({"seed": -1}, ValueError, r"seed must be an integer in \[0, inf[])]; got -1"),
        ({"baseline": "median"}, ValueError, r"baseline must be one of None, 'zero', 'mean'; got 'median'"),
        ({"max_rows": 0}, ValueError, r"max_rows must be an integer"),
        ({"autocast": "yes"}, TypeError, r"autocast must be True or False"),
        ({"n_permutations": 2.5}, ValueError, r"n_permutations must be an integer"),
    ]:
        with pytest.raises(exc, match=match):
            md.shapley(model, loader, **kwargs)
    with pytest.raises(ValueError, match="loader must be an iterable"):
        md.shapley(model, 5)
    with pytest.raises(ValueError, match="baseline_loader is only used with baseline='mean'"):
        md.shapley(model, loader, baseline_loader=loader)


def test_nan_features_from_finite_inputs_name_the_encoder():
    model = make_model(3)
    loader, x, y = _loader(model)
    with torch.no_grad():
        model.encoders["m1"].net[0].weight[0, 0] = float("nan")
    assert all(torch.isfinite(t).all() for t in x.values())
    expected = (r"the encoder of modality 'm1' produced NaN/inf features from finite inputs "
                r"\(batch 0, 12 of 12 samples\)")
    for probe in (lambda: md.shapley(model, loader), lambda: md.unimodal_scores(model, loader),
                  lambda: md.probes.collect_features(model, loader)):
        with pytest.raises(ValueError, match=expected) as info:
            probe()
        assert "ignores present" not in str(info.value)
    # an encoder that turns some finite inputs into NaN (log of a negative number): located
    class Log(torch.nn.Module):
        def forward(self, x):
            return torch.log(x)

    torch.manual_seed(0)
    model2 = md.MultimodalClassifier({"a": md.models.MLPEncoder(3, 4), "b": Log()},
                                     {"a": 4, "b": 2}, 3)
    xa = torch.randn(8, 3)
    xb = torch.rand(8, 2) + 0.5
    xb[6, 1] = -1.0
    y2 = torch.arange(8) % 3
    two = [({"a": xa[:4], "b": xb[:4]}, y2[:4]), ({"a": xa[4:], "b": xb[4:]}, y2[4:])]
    with pytest.raises(ValueError, match=r"the encoder of modality 'b' produced NaN/inf features "
                                         r"from finite inputs \(batch 1, 1 of 4 samples\)"):
        md.shapley(model2, two)


def test_tuple_loader_is_refused_with_the_adapter_recipe():
    model = make_model(2)
    x = make_inputs(model, batch=6)
    y = torch.arange(6) % 3
    tuples = [(x["m0"], x["m1"], y)]
    for probe in (md.shapley, md.unimodal_scores, md.probes.collect_features,
                  lambda mdl, ld: md.probes.shapley_to_disk(mdl, ld, "/nonexistent-unused")):
        with pytest.raises(ValueError, match=r"yielded a tuple of 3 items .*adapt_loader"):
            probe(model, tuples)


class _SqueezedHead(torch.nn.Module):
    def __init__(self, dims, columns):
        super().__init__()
        self.fc = torch.nn.Linear(sum(dims.values()), max(columns, 1))
        self.columns = columns

    def forward(self, features):
        out = self.fc(torch.cat([features[m] for m in sorted(features)], 1))
        return out[:, 0] if self.columns == 0 else out


@pytest.mark.parametrize("columns, match", [(0, r"shape \(12,\)"), (2, r"shape \(12, 2\)")])
def test_head_with_wrong_logit_shape_is_refused_by_every_probe(columns, match):
    base = make_model(2)
    model = md.MultimodalClassifier(dict(base.encoders), base.feature_dims, 3,
                                    fusion=_SqueezedHead(base.feature_dims, columns))
    loader, _, _ = _loader(model)
    for probe in (md.shapley, md.unimodal_scores,
                  lambda mdl, ld: md.shapley(mdl, ld, method="permutation", n_permutations=2)):
        with pytest.raises(ValueError, match=match):
            probe(model, loader)


def _chunked(model, n=30, size=10, seed=1):
    x = make_inputs(model, batch=n, seed=seed)
    y = torch.arange(n) % 3
    return [({k: v[i:i + size] for k, v in x.items()}, y[i:i + size]) for i in range(0, n, size)]


def test_shapley_to_disk_refuses_chunks_of_another_job(tmp_path):
    model = make_model(3, "gated")
    loader = _chunked(model)
    md.probes.shapley_to_disk(model, loader, tmp_path, value="prob")
    job = json.loads((tmp_path / "shapley-job.json").read_text())
    assert job["value"] == "prob" and job["baseline"] == "zero" and job["loader"]["batches"] == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("chunk-*.npz")}
    assert len(stamps) == 3

    other = make_model(3, "gated", seed=7)  # same architecture, other weights
    cases = [
        (dict(model=other, loader=loader, value="prob"), r"the model's weights or buffers"),
        (dict(model=model, loader=loader, value="paper"), r"value: 'prob' then, 'paper' now"),
        (dict(model=model, loader=_chunked(model, seed=5), value="prob"),
         r"the loader's first batch \(inputs/labels hash\) differs"),
        (dict(model=model, loader=_chunked(model, n=40), value="prob"),
         r"the loader's batches: 3 then, 4 now"),
        (dict(model=model, loader=loader, value="prob", method="permutation"),
         r"method: 'exact' then, 'permutation' now"),
        (dict(model=model, loader=loader, value="prob", seed=3), r"seed: 0 then, 3 now"),
        (dict(model=model, loader=loader, value="prob", baseline="mean", baseline_loader=loader),
         r"baseline: 'zero' then, 'mean' now"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=r"holds 3 Shapley chunks of a different job") as info:
            md.probes.shapley_to_disk(directory=tmp_path, **kwargs)
        assert re.search(match, str(info.value)), str(info.value)
        assert "resume=False" in str(info.value)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("chunk-*.npz")} == stamps

    # resume=False starts over for the new job; the user's own file is left alone
    (tmp_path / "notes.txt").write_text("mine")
    summary = md.probes.shapley_to_disk(other, loader, tmp_path, value="prob", resume=False)
    ref = md.shapley(other, loader, value="prob")
    for m, v in ref.mean().items():
        assert summary["mean"][m] == pytest.approx(v, rel=1e-9, abs=1e-12)
    loaded = md.probes.ShapleyValues.load(tmp_path)
    torch.testing.assert_close(loaded.values, ref.values, rtol=0, atol=0)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # the folder now belongs to the new job: resuming it works and recomputes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("chunk-*.npz")}
    assert md.probes.shapley_to_disk(other, loader, tmp_path, value="prob") == summary
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("chunk-*.npz")} == stamps


def test_shapley_to_disk_resume_false_drops_stale_chunks_of_a_longer_job(tmp_path):
    model = make_model(2)
    md.probes.shapley_to_disk(model, _chunked(model, n=50), tmp_path)
    assert len(list(tmp_path.glob("chunk-*.npz"))) == 5
    short = _chunked(model, n=20)
    md.probes.shapley_to_disk(model, short, tmp_path, resume=False)
    assert sorted(p.name for p in tmp_path.glob("chunk-*.npz")) == ["chunk-000000.npz",
                                                                  "chunk-000001.npz"]
    assert len(md.probes.ShapleyValues.load(tmp_path)) == 20


def test_shapley_to_disk_never_touches_chunks_it_cannot_recognise(tmp_path):
    model = make_model(2)
    loader = _chunked(model)
    np.savez(tmp_path / "chunk-000000.npz", something=np.arange(3))  # not modaldiag's
    for resume in (True, False):
        with pytest.raises(ValueError, match="modaldiag did not write .*chunk-000000.npz"):
            md.probes.shapley_to_disk(model, loader, tmp_path, resume=resume)
    with np.load(tmp_path / "chunk-000000.npz") as data:
        assert list(data.files) == ["something"]
    # chunks without a job fingerprint (e.g. an older modaldiag): refused, unless resume=False
    legacy = tmp_path / "legacy"
    md.probes.shapley_to_disk(model, loader, legacy)
    (legacy / "shapley-job.json").unlink()
    with pytest.raises(ValueError, match=r"without a readable job fingerprint"):
        md.probes.shapley_to_disk(model, loader, legacy)
    summary = md.probes.shapley_to_disk(model, loader, legacy, resume=False)
    assert summary["n"] == 30 and (legacy / "shapley-job.json").exists()


def test_in_memory_and_on_disk_permutation_estimates_agree(tmp_path):
    model = make_model(3, "sum")
    loader = _chunked(model)
    mem = md.shapley(model, loader, value="prob", method="permutation", n_permutations=4, seed=2)
    md.probes.shapley_to_disk(model, loader, tmp_path, value="prob", method="permutation",
                              n_permutations=4, seed=2)
    disk = md.probes.ShapleyValues.load(tmp_path)
    torch.testing.assert_close(disk.values, mem.values, rtol=0, atol=0)


def test_load_an_interrupted_job_without_summary(tmp_path):
    model = make_model(2)
    loader = _chunked(model)
    md.probes.shapley_to_disk(model, loader, tmp_path, value="prob")
    (tmp_path / "summary.json").unlink()
    loaded = md.probes.ShapleyValues.load(tmp_path)
    assert len(loaded) == 30 and loaded.value == "prob" and loaded.baseline == "zero"
    with pytest.raises(ValueError, match="no summary.json or shapley-job.json"):
        md.probes.ShapleyValues.load(tmp_path / "missing")


def test_callable_value_identity_in_the_job_fingerprint():
    from modaldiag.probes.shapley import _value_id

    def make(scale):
        return lambda logits, labels, sizes: scale * logits.sum(-1)

    assert _value_id(make(1.0)) == _value_id(make(2.0))  # same code: closures are not hashed
    assert _value_id(lambda lg, y, s: lg.sum(-1)) != _value_id(lambda lg, y, s: lg.mean(-1))
    assert _value_id("prob") == "prob"


# ------------------------------------------------------------------ independent value references
def _hand_value(row: list[float], label: int, size: int, value: str) -> float:
    """v(S) for ONE sample from its logit row, written out by hand (no library code, no torch)."""
    best = max(range(len(row)), key=lambda c: row[c])  # argmax (first maximum)
    correct = 1.0 if best == label else 0.0
    top = max(row)
    log_z = top + math.log(sum(math.exp(z - top) for z in row))
    if value == "paper":
        return size * correct
    if value == "correct":
        return correct
    if value == "prob":
        return math.exp(row[label] - log_z)
    if value == "logit":
        return row[label]
    if value == "neg_loss":
        return row[label] - log_z  # -CE = log softmax of the true class
    raise AssertionError(value)


def _hand_shapley(model, x, y, value):
    """Per-sample loop over every coalition; phi_m = sum_{S not containing m}
    |S|!(M-|S|-1)!/M! * (v(S + m) - v(S)), with v from :func:`_hand_value`."""
    mods = model.modalities
    m = len(mods)
    model.eval()
    n = len(y)
    phi = [[0.0] * m for _ in range(n)]
    full, empty = [0.0] * n, [0.0] * n
    with torch.no_grad():
        feats = model.encode(x)
        for i in range(n):
            one = {k: f[i:i + 1] for k, f in feats.items()}
            v = {}
            for r in range(m + 1):
                for s in itertools.combinations(range(m), r):
                    row = model.head(one, present=[mods[j] for j in s])[0].double().tolist()
                    v[frozenset(s)] = _hand_value(row, int(y[i]), r, value)
            full[i], empty[i] = v[frozenset(range(m))], v[frozenset()]
            for j in range(m):
                others = [k for k in range(m) if k != j]
                for r in range(m):
                    w = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
                    for s in itertools.combinations(others, r):
                        phi[i][j] += w * (v[frozenset(s) | {j}] - v[frozenset(s)])
    t = functools.partial(torch.tensor, dtype=torch.float64)
    return t(phi), t(full), t(empty), v



def _interacting_case(m=3, n=24, seed=3):
    """A gated head (modalities interact) on linear encoders with unit-scale weights, so the
    argmax changes between coalitions, and labels that mix the predicted and other classes:
    correctness, class index and coalition all matter."""
    torch.manual_seed(seed)
    mods = [f"m{i}" for i in range(m)]
    model = md.MultimodalClassifier({k: torch.nn.Linear(5, 4) for k in mods}, {k: 4 for k in mods},
                                    4, fusion="gated")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randn(n, 5, generator=g) for k in mods}
    y = torch.tensor([(0, 3, 1, 3, 0, 2)[i % 6] for i in range(n)])
    return model.eval(), x, y


@pytest.mark.parametrize("value", ["paper", "correct", "prob", "logit", "neg_loss"])
def test_value_functions_match_an_independent_hand_reference(value):
    model, x, y = _interacting_case()
    sv = md.shapley(model, [(x, y)], value=value)
    phi, full, empty, _ = _hand_shapley(model, x, y, value)
    torch.testing.assert_close(sv.full_value, full, rtol=F32_RTOL, atol=F32_ATOL)
    torch.testing.assert_close(sv.empty_value, empty, rtol=F32_RTOL, atol=F32_ATOL)
    torch.testing.assert_close(sv.values, phi, rtol=F32_RTOL, atol=F32_ATOL)
    # the case is not degenerate: values differ between samples and modalities
    assert sv.values.std() > 0.05
    if value in ("paper", "correct"):
        right = (sv.predictions == sv.labels)
        assert 0 < int(right.sum()) < len(y)  # both correct and wrong fused predictions


def test_value_of_logits_on_a_hand_computed_example():
    # one coalition of size 2, three samples, classes chosen so argmax != label for sample 1
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 3.0], [0.0, 0.0, 4.0]]])
    labels = torch.tensor([0, 1, 2])
    sizes = torch.tensor([2])
    for value in VALUE_FUNCTIONS_ALL:
        got = value_of_logits(logits, labels, sizes, value)[0].tolist()
        want = [_hand_value(logits[0, i].tolist(), int(labels[i]), 2, value) for i in range(3)]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), value
    assert value_of_logits(logits, labels, sizes, "paper")[0].tolist() == [2.0, 0.0, 2.0]
    assert value_of_logits(logits, labels, sizes, "logit")[0].tolist() == [2.0, 1.5, 4.0]


VALUE_FUNCTIONS_ALL = ("paper", "correct", "prob", "logit", "neg_loss")


def test_paper_value_of_the_full_coalition_is_m_times_correctness():
    model, x, y = _interacting_case(m=4, n=16)
    sv = md.shapley(model, [(x, y)], value="paper")
    right = (sv.predictions == sv.labels).double()
    torch.testing.assert_close(sv.full_value, 4.0 * right, rtol=0, atol=0)
    torch.testing.assert_close(sv.empty_value, torch.zeros(16, dtype=torch.float64), rtol=0, atol=0)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    assert torch.equal(sv.predictions, pred) and torch.equal(sv.labels, y)


def test_autocast_uses_bfloat16_on_cpu():
    """``autocast=True`` on CPU runs in bfloat16 (float16 is for CUDA), as documented."""
    from modaldiag.probes._common import autocast_context

    ctx = autocast_context(True, {"a": torch.zeros(2, 3)})
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    with ctx:
        out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert out.dtype == torch.bfloat16
    with autocast_context(False, {"a": torch.zeros(2, 3)}):
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float32
