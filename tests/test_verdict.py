"""Honest verdicts: split labels, intervals, the decision rule, recommendations, tables."""

import copy
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import modaldiag as md
from modaldiag.datasets.base import MultimodalDataset
from modaldiag.models import MLPEncoder
from modaldiag.probes.verdict import (
    ACCURACY,
    ACCURACY_MARGIN,
    SHAPLEY,
    bootstrap_intervals,
    decide,
    seed_intervals,
    shapley_margin,
)

ROOT = Path(__file__).resolve().parents[1]
FRAME_COLUMNS = ["probe", "modality", "value", "ci_low", "ci_high", "split", "n"]


@pytest.fixture(scope="module")
def strong_weak():
    """a carries the labels (strength 3.0), b almost nothing (0.2): a clear imbalance."""
    data = md.datasets.synthetic(n_samples=1200, num_classes=4, strength={"a": 3.0, "b": 0.2},
                                 dims={"a": 8, "b": 8}, seed=0)
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=8)
    md.fit(model, data.train.loader(64, shuffle=True), epochs=4, progress=False, seed=0)
    return data, model


@pytest.fixture(scope="module")
def held_out(strong_weak):
    data, model = strong_weak
    return md.diagnose(model, data.test.loader(256), data.val.loader(256),
                       train_loader=data.train.loader(256), fisher="batch")


def test_every_number_names_its_split(strong_weak, held_out, tmp_path):
    data, _ = strong_weak
    rep = held_out
    n_test = len(data.test)
    assert rep.split == "test" and rep.n == n_test == 180
    assert rep.summary.splitlines()[0].startswith(f"Diagnosis on the test split (n = {n_test})")
    assert "Fused accuracy (test)" in rep.summary
    assert "fit on train, scored on val" in rep.summary and "purity train/val" in rep.summary
    d = rep.to_dict()
    assert d["split"] == d["config"]["split"] == "test" and d["n"] == n_test
    assert d["config"]["separability_splits"] == {"fit": "train", "score": "val"}
    assert [e.split for e in rep.evidence] == ["test", "test", "val"]
    frame = rep.to_frame()
    by_probe = frame.groupby("probe")["split"].agg(set).to_dict()
    assert by_probe[ACCURACY] == by_probe[SHAPLEY] == {"test"}
    assert by_probe["purity"] == {"train", "val"} and by_probe["linear probe"] == {"val"}
    purity = frame[frame.probe == "purity"]
    assert set(purity[purity.split == "train"].n) == {len(data.train)}
    assert set(purity[purity.split == "val"].n) == {len(data.val)}
    page = rep.to_html()
    for label in ("verdict measured on the test split", "unimodal acc (test", "purity train",
                  "purity val", "linear probe (fit on train, scored on val)",
                  "fused acc (test)", f"on the test split (n = {n_test})"):
        assert label in page, label
    # diagnosing the training split says so (the old silent default)
    on_train = md.diagnose(strong_weak[1], data.train.loader(256), fisher=None)
    assert on_train.split == "train" and on_train.summary.startswith("Diagnosis on the train split")
    # an explicit name wins; an unnamed dataset is called so
    plain = MultimodalDataset(dict(data.test.inputs), data.test.labels)
    assert plain.split is None
    assert md.diagnose(strong_weak[1], plain.loader(64), fisher=None).split == "unnamed"
    assert md.diagnose(strong_weak[1], plain.loader(64), fisher=None, split="val").split == "val"


def test_dataset_splits_name_their_parts():
    data = md.datasets.load("nutrimouse")
    assert (data.train.split, data.val.split, data.test.split) == ("train", "val", "test")
    assert md.probes.split_of(data.test.loader(8)) == "test"


def test_clear_imbalance_is_imbalanced_with_intervals_and_recommendations(held_out):
    rep = held_out
    assert rep.verdict == "imbalanced", rep.summary
    assert (rep.dominant, rep.weakest) == ("a", "b") and rep.ranking == ["a", "b"]
    for probe in (ACCURACY, SHAPLEY):
        iv = rep.intervals[probe]
        est, lo, hi = iv.difference("a", "b")
        assert 0 < lo <= est <= hi and est >= iv.margin
        assert iv.difference("b", "a") == (-est, -hi, -lo)
        # the point estimate is the plain mean of the per-sample values
        assert iv.mean["a"] == pytest.approx(
            rep.unimodal.unimodal["a"].accuracy if probe == ACCURACY else rep.shapley.mean()["a"],
            rel=1e-6)
    assert rep.unimodal.unimodal_correct.shape == (rep.n, 2)
    assert rep.recommendations and all(set(r) == {"method", "why", "page"}
                                       for r in rep.recommendations)
    for r in rep.recommendations:
        assert (ROOT / r["page"]).is_file(), r["page"]
        assert "'b'" in r["why"]
    assert "Recommendation: try " + rep.recommendations[0]["method"] in rep.summary
    page = rep.to_html()
    assert f'<a href="{rep.recommendations[0]["page"]}">' in page


def _copies(ds):
    x = ds.inputs["a"]
    return MultimodalDataset({"a": x, "b": x.clone()}, ds.labels)


def test_two_identical_copies_of_one_view_are_never_imbalanced():
    data = md.datasets.synthetic(n_samples=1200, num_classes=4, strength={"a": 1.5, "b": 0.2},
                                 dims={"a": 8, "b": 8}, seed=0)
    train, test = _copies(data.train), _copies(data.test)
    torch.manual_seed(1)
    enc = MLPEncoder(8, 8, hidden=(16,))
    model = md.MultimodalClassifier({"a": enc, "b": copy.deepcopy(enc)}, {"a": 8, "b": 8}, 4,
                                    fusion="late")
    for p in model.encoders.parameters():
        p.requires_grad_(False)
    md.fit(model, train.loader(64, shuffle=True), epochs=3, progress=False, seed=0)
    rep = md.diagnose(model, test.loader(256), fisher=None, split="test")
    # measured: the two late heads differ by initialisation, so the head prefers one copy
    # significantly (interval of the lead excludes 0 on both probes)...
    for probe in (ACCURACY, SHAPLEY):
        _, lo, hi = rep.intervals[probe].difference("a", "b")
        assert lo > 0 or hi < 0, (probe, lo, hi)
    # ...which is still not a modality imbalance: one view counted twice
    assert rep.copies == (("a", "b"),)
    assert rep.verdict == "balanced" and rep.dominant is None and rep.weakest is None
    assert "copies of one view" in rep.reason and rep.recommendations == []
    assert "No recommendation: the modalities are balanced" in rep.summary


def test_too_few_samples_is_inconclusive_nutrimouse():
    data = md.datasets.load("nutrimouse")
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=8)
    rep = md.diagnose(model, data.test.loader(64), fisher=None)
    n = len(data.test)
    assert rep.split == "test" and rep.n == n and 1 / n >= ACCURACY_MARGIN
    assert rep.verdict == "inconclusive" and rep.dominant is None and rep.weakest is None
    assert rep.reason.startswith(f"too few samples (n = {n}: accuracy moves in {100 / n:.3g}-point "
                                 "steps")
    assert sorted(rep.ranking) == sorted(data.modalities)  # the point estimates stay available
    assert rep.recommendations == []
    assert f"No recommendation: the evidence is inconclusive (too few samples (n = {n}" in rep.summary
    page = rep.to_html()
    assert "No recommendation: the evidence is inconclusive" in page
    assert page.count("No recommendation") == 2  # the summary line and the section


def _intervals(hits, phi, n_resamples=1000, seed=0):
    mods = ("a", "b")
    margins = {ACCURACY: ACCURACY_MARGIN, SHAPLEY: shapley_margin(phi)}
    return bootstrap_intervals({ACCURACY: hits, SHAPLEY: phi}, mods, split="test",
                               margins=margins, n_resamples=n_resamples, seed=seed)


def _case(n, acc_a, acc_b, seed=0):
    """Per-sample hits with exact rates and the paper-value Shapley values of M = 2."""
    rng = np.random.default_rng(seed)
    hits = np.zeros((n, 2))
    hits[rng.permutation(n)[: round(acc_a * n)], 0] = 1
    hits[rng.permutation(n)[: round(acc_b * n)], 1] = 1
    fused = np.maximum(hits[:, 0], hits[:, 1])
    # paper value, M = 2: phi_a = (v(a) - 0)/2 + (v(ab) - v(b))/2, v(S) = |S| * correct
    phi = np.stack([hits[:, 0] / 2 + (2 * fused - hits[:, 1]) / 2,
                    hits[:, 1] / 2 + (2 * fused - hits[:, 0]) / 2], 1)
    return hits, phi


def test_imbalance_degree_001_never_declares_a_dominant():
    for n in (400, 4000, 20000):
        hits, phi = _case(n, 0.709, 0.691)
        sv_means = phi.mean(0)
        degree = abs(sv_means[0] - sv_means[1]) / sv_means.sum()  # md's imbalance degree, M = 2
        assert degree == pytest.approx(0.01, abs=0.002)
        v = decide(_intervals(hits, phi), ["a", "b"], n=n)
        assert v.verdict != "imbalanced" and v.dominant is None and v.weakest is None, v
    # M = 5, degree 0.01: means (1.025, 1, 1, 1, 0.975), a lead of 0.05 that is significant on
    # both probes (accuracy lead 10 points) yet below the Shapley margin 0.02 * gain = 0.1
    rng = np.random.default_rng(0)
    mods = ["m0", "m1", "m2", "m3", "m4"]
    phi = np.array([1.025, 1, 1, 1, 0.975]) + rng.normal(0, 0.1, (4000, 5))
    phi -= phi.mean(0) - np.array([1.025, 1, 1, 1, 0.975])
    degree = sum(abs(a - b) for i, a in enumerate(phi.mean(0)) for b in phi.mean(0)[i + 1:]) \
        / (4 * np.abs(phi.mean(0)).sum())
    assert degree == pytest.approx(0.01, rel=1e-6)
    hits = (rng.random((4000, 5)) < np.array([0.8, 0.75, 0.75, 0.75, 0.7])).astype(float)
    margins = {ACCURACY: ACCURACY_MARGIN, SHAPLEY: shapley_margin(phi)}
    assert margins[SHAPLEY] == pytest.approx(0.02 * 5, rel=1e-6)
    iv = bootstrap_intervals({ACCURACY: hits, SHAPLEY: phi}, mods, split="test", margins=margins)
    assert iv[SHAPLEY].difference("m0", "m4")[1] > 0  # significant...
    v = decide(iv, mods, n=4000)
    assert v.verdict != "imbalanced" and v.dominant is None, v  # ...but not practical
    # the same rule does declare a real lead (so the test above can fail)
    hits, phi = _case(4000, 0.75, 0.65)
    v = decide(_intervals(hits, phi), ["a", "b"], n=4000)
    assert (v.verdict, v.dominant, v.weakest) == ("imbalanced", "a", "b")


def test_balanced_and_inconclusive_reasons():
    hits, phi = _case(20000, 0.70, 0.70)
    v = decide(_intervals(hits, phi), ["a", "b"], n=20000)
    assert v.verdict == "balanced" and "inside the practical margin" in v.reason
    hits, phi = _case(200, 0.70, 0.66)  # a 4-point lead on 200 samples: interval too wide
    v = decide(_intervals(hits, phi), ["a", "b"], n=200)
    assert v.verdict == "inconclusive" and v.reason.startswith("too few samples (n = 200: the 95 %")


def test_bootstrap_is_vectorised_seeded_and_paired():
    rng = np.random.default_rng(0)
    n = 2000
    x = (rng.random((n, 3)) < np.array([0.7, 0.5, 0.7])).astype(float)
    x[:, 2] = x[:, 0]  # a column identical to the first: the paired difference is exactly 0
    took = []
    for _ in range(3):  # best of 3: the suite shares its cores with other jobs
        start = time.perf_counter()
        out = bootstrap_intervals({ACCURACY: x}, ("a", "b", "c"), split="test",
                                  margins={ACCURACY: 0.02}, seed=3)
        took.append(time.perf_counter() - start)
    assert min(took) < 0.2, took  # measured: 0.05 s on a quiet 2-core machine
    iv = out[ACCURACY]
    assert iv.n == n and iv.n_resamples == 1000 and iv.split == "test"
    half = 1.96 * np.sqrt(0.7 * 0.3 / n)  # normal approximation of a proportion's interval
    assert (iv.high["a"] - iv.low["a"]) / 2 == pytest.approx(half, rel=0.15)
    assert iv.mean["a"] == pytest.approx(x[:, 0].mean(), rel=1e-12)
    assert iv.low["a"] < iv.mean["a"] < iv.high["a"]
    assert iv.difference("a", "c") == (0.0, 0.0, 0.0)
    again = bootstrap_intervals({ACCURACY: x}, ("a", "b", "c"), split="test",
                                margins={ACCURACY: 0.02}, seed=3)[ACCURACY]
    assert again == iv
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        bootstrap_intervals({ACCURACY: x[:, :2]}, ("a", "b", "c"), split="test",
                            margins={ACCURACY: 0.02})


def test_recommendations_follow_the_evidence():
    sep = {m: md.probes.Separability(m, tp, vp, abs(tp - vp), lp, None, 100, 50)
           for m, tp, vp, lp in (("a", 0.95, 0.70, 0.90), ("b", 0.50, 0.48, 0.80))}
    acc = {"a": 0.9, "b": 0.3}
    for verdict in ("balanced", "inconclusive"):
        assert md.probes.recommend(verdict, None, None, unimodal_accuracy=acc, split="test",
                                   separability=sep) == []
    recs = md.probes.recommend("imbalanced", "a", "b", unimodal_accuracy=acc, split="test",
                               separability=sep)
    methods = [r["method"] for r in recs]
    # b's encoder knows (probe .80) what the head ignores (.30): starvation at the head first
    assert methods[:3] == ["MMPareto", "Valuation re-sampling", "InfoReg"]
    assert "starvation at the head" in recs[0]["why"]
    assert "Re-learning" in methods  # a over-fits: purity .95 on train vs .70 on val
    # no separability: the generic remedy, and it says the cause is unknown
    generic = md.probes.recommend("imbalanced", "a", "b", unimodal_accuracy=acc, split="test")
    assert [r["method"] for r in generic] == ["OGM-GE", "InfoReg"]
    assert "unknown" in generic[0]["why"]
    for r in recs + generic:
        assert (ROOT / r["page"]).is_file()


def test_to_frame_from_dict_and_csv_files(held_out, tmp_path):
    rep = held_out
    frame = rep.to_frame()
    assert list(frame.columns) == FRAME_COLUMNS
    m = len(rep.modalities)
    # fused + (accuracy, Shapley, low share, Fisher) per modality + (2 purities, probe) per
    # modality + robustness AUC (3 corruptions) per modality + conditional utilisation per modality
    assert frame.shape == (1 + 4 * m + 3 * m + 3 * m + m, 7)
    acc = frame[frame.probe == ACCURACY].set_index("modality")
    assert acc.loc["a", "ci_low"] < acc.loc["a", "value"] < acc.loc["a", "ci_high"]
    assert frame[frame.probe == "purity"][["ci_low", "ci_high"]].isna().all().all()
    out = rep.save(tmp_path / "diag")
    saved = pd.read_csv(out / "diagnosis.csv")
    assert list(saved.columns) == FRAME_COLUMNS and len(saved) == len(frame)
    per_class = pd.read_csv(out / "per_class.csv")
    assert len(per_class) == 4 and set(per_class.split) == {"test"}
    assert per_class.n.sum() == rep.n
    back = md.Diagnosis.from_dict(json.loads((out / "diagnosis.json").read_text()))
    pd.testing.assert_frame_equal(back.to_frame(), frame)
    assert (back.verdict, back.dominant, back.weakest, back.split, back.n) == \
        (rep.verdict, rep.dominant, rep.weakest, rep.split, rep.n)
    assert back.recommendations == rep.recommendations and back.ranking == rep.ranking
    assert back.per_class == rep.per_class
    assert "Verdict: imbalanced" in back.to_html()  # renders without per-sample values
    back.save(tmp_path / "again")
    assert not (tmp_path / "again" / "shapley.png").exists()


def test_report_shows_disagreements_once_and_no_empty_columns(held_out):
    note = "linear probe (val) ranks 'b' first and 'a' last (made up)."
    rep = dataclasses.replace(held_out, agree=False, disagreements=[note],
                              summary=held_out.summary + "\nThe probes disagree: " + note)
    page = rep.to_html()
    assert page.count("ranks &#x27;b&#x27; first and &#x27;a&#x27; last (made up)") == 1
    assert rep.under_optimisation is None
    for empty in ("probe joint", "probe alone", "starvation gap"):
        assert empty not in page


def test_progress_is_silent_when_disabled_and_names_every_probe(strong_weak, capsys,
                                                               monkeypatch):
    monkeypatch.setattr(md.utils.progress, "PLAIN_MIN_SECONDS", 0.0)  # print even fast phases
    data, model = strong_weak
    loader, val = data.test.loader(256), data.val.loader(256)
    md.diagnose(model, loader, val, fisher="batch", progress=False)
    md.probes.evaluate(model, loader, progress=False)
    md.probes.separability(model, loader, val, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    md.diagnose(model, loader, val, fisher="batch", progress=True, reference_epochs=1)
    err = capsys.readouterr().err
    for probe in ("evaluate", "shapley", "fisher", "separability", "under_optimisation"):
        assert f"diagnose: {probe}" in err, (probe, err)
    md.probes.evaluate(model, loader, progress=True)
    md.probes.separability(model, loader, val, progress=True)
    err = capsys.readouterr().err
    assert "evaluate" in err and "separability" in err


def test_combine_over_seeds_covers_training_randomness(strong_weak, held_out):
    a_leads = _case(4000, 0.75, 0.65, seed=0)  # one seed: a leads b by 10 points
    b_leads = _case(4000, 0.65, 0.75, seed=1)  # another seed: b leads a by 10 points
    for (hits, phi), ranking in ((a_leads, ["a", "b"]), (b_leads, ["b", "a"])):
        assert decide(_intervals(hits, phi), ranking, n=4000).verdict == "imbalanced"
    runs = [{ACCURACY: h, SHAPLEY: p} for h, p in (a_leads, b_leads)]
    margins = {ACCURACY: ACCURACY_MARGIN, SHAPLEY: shapley_margin(a_leads[1])}
    iv = seed_intervals(runs, ("a", "b"), split="test", margins=margins)
    est, lo, hi = iv[ACCURACY].difference("a", "b")
    assert est == pytest.approx(0.0, abs=1e-12) and lo < -0.05 and hi > 0.05
    assert decide(iv, ["a", "b"], n=4000).verdict != "imbalanced"
    # live diagnoses of the same evaluation data combine; other data is refused
    data, model = strong_weak
    v = md.probes.combine([held_out, held_out])
    assert (v.verdict, v.dominant, v.weakest) == ("imbalanced", "a", "b")
    on_val = md.diagnose(model, data.val.loader(256), fisher=None)
    with pytest.raises(ValueError, match="share modalities, split and n"):
        md.probes.combine([held_out, on_val])
    saved = md.Diagnosis.from_dict(held_out.to_dict())
    with pytest.raises(ValueError, match="per-sample values"):
        md.probes.combine([held_out, saved])


def test_window_timing_is_evidence_only_for_an_imbalanced_verdict():
    from modaldiag.probes.recommend import recommend

    acc = {"a": 0.9, "b": 0.5}
    early = {"a": {"open_epochs": [0, 1, 2], "closed_at": 3, "epochs": 30}}
    late = {"a": {"open_epochs": list(range(20)), "closed_at": 20, "epochs": 30}}
    still_open = {"a": {"open_epochs": list(range(30)), "closed_at": None, "epochs": 30}}
    recs = recommend("imbalanced", "a", "b", unimodal_accuracy=acc, split="test", window=early)
    assert [r["method"] for r in recs] == ["InfoReg", "OGM-GE"]
    assert "closed at epoch 3 of 30" in recs[0]["why"]
    recs = recommend("imbalanced", "a", "b", unimodal_accuracy=acc, split="test", window=late)
    assert all("window" not in r["why"] for r in recs)  # closed late: not early-set evidence
    recs = recommend("imbalanced", "a", "b", unimodal_accuracy=acc, split="test",
                     window=still_open)
    assert recs[0]["method"] == "InfoReg" and "still open at the last of 30" in recs[0]["why"]
    for verdict in ("balanced", "inconclusive"):
        assert recommend(verdict, None, None, unimodal_accuracy=acc, split="test",
                         window=early) == []


def test_diagnose_reads_the_window_from_the_training_history(strong_weak):
    data, model = strong_weak
    hist = md.History(("a", "b"), epochs=[
        {"epoch": t, "fisher": {"a": v, "b": v}} for t, v in enumerate([1.0, 2.0, 3.0, 3.0, 3.0,
                                                                          3.0, 3.0, 3.0, 3.0])])
    rep = md.diagnose(model, data.test.loader(256), fisher=None, history=hist)
    window = rep.config["window"]
    assert window["a"]["open_epochs"] == md.learning_window(hist).open_epochs()["a"]
    assert window["a"]["epochs"] == 9 and window["a"]["closed_at"] is not None
    assert md.diagnose(model, data.test.loader(256), fisher=None).config["window"] is None
    with pytest.raises(ValueError, match="history"):
        md.diagnose(model, data.test.loader(256), history={"epochs": []})


def test_too_few_samples_reason_states_the_interval_half_width():
    hits, phi = _case(200, 0.70, 0.66)  # a 4-point lead on 200 samples: interval too wide
    intervals = _intervals(hits, phi)
    v = decide(intervals, ["a", "b"], n=200)
    shown = float(re.search(r"is ±(\d+\.\d+)", v.reason).group(1))
    probe = next(p for p in intervals.values()
                 if f"the {p.probe} lead" in v.reason)
    _, low, high = probe.difference("a", "b")
    assert shown == pytest.approx((high - low) / 2, abs=6e-4) and shown > probe.margin
