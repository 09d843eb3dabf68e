"""``report.compare`` on constructed runs: every modality's change with the right sign, the split
named, the noise rule tied to the test size, saved diagnoses reused, final paths recorded, CSV."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pandas as pd
import pytest

import modaldiag as md
from modaldiag.report import plots
from modaldiag.report.compare import (
    comparison_frame,
    comparison_summary,
    regulator_text,
    run_labels,
    saved_diagnosis,
    write_comparison,
)
from modaldiag.runs import describe_regulator


def _history(fisher: dict[str, list[float]] | None, acc=(0.5, 0.7, 0.75)):
    epochs = []
    for t, a in enumerate(acc):
        rec = {"epoch": t, "val": {"acc": a, "unimodal_acc": {"a": a / 2, "b": a / 3}}}
        if fisher:
            rec["fisher"] = {m: v[t] for m, v in fisher.items()}
        epochs.append(rec)
    return md.History(("a", "b"), {}, epochs, {"test": {"n": 200}})


def _run(tmp_path, name, fused, a, b, *, method="joint", fisher=None, regulator=None):
    path = tmp_path / name.replace(" ", "-")
    path.mkdir(exist_ok=True)
    config = {"name": name, "dataset": "toy", "method": method, "epochs": 2, "seed": 0,
              "test_acc": fused, "test_unimodal_acc": {"a": a, "b": b}, "best_epoch": 1,
              "regulator": regulator}
    return SimpleNamespace(name=name, path=path, config=config, history=_history(fisher))


def test_summary_reports_every_modality_with_its_sign(tmp_path):
    base = _run(tmp_path, "joint training", 0.90, 0.30, 0.85)
    other = _run(tmp_path, "InfoReg", 0.905, 0.40, 0.72, method="inforeg")
    text, weakest = comparison_summary([base, other])
    assert weakest == "a"
    line = text.splitlines()[1]
    assert line.startswith("InfoReg vs joint training: fused test accuracy +0.5 points (within noise)")
    assert "'a' unimodal test accuracy +10.0 points (higher)" in line
    assert "'b' unimodal test accuracy -13.0 points (lower)" in line  # the cost is not hidden
    assert "(200 test samples)" in text.splitlines()[0]


def test_noise_rule_follows_the_test_size(tmp_path):
    base = _run(tmp_path, "joint training", 0.500, 0.5, 0.5)
    other = _run(tmp_path, "OGM", 0.625, 0.5, 0.5 + 1 / 8 * 0.5, method="ogm")
    for r in (base, other):
        r.config["test_n"] = 8  # one sample = 12.5 points
    text, _ = comparison_summary([base, other])
    assert "fused test accuracy +12.5 points (higher)" in text  # one whole sample
    assert "'b' unimodal test accuracy +6.2 points (within noise)" in text
    assert "a change under 12.5 points (one of the 8 test samples)" in text


def test_frame_and_files(tmp_path):
    traces = {"a": [1.0, 2.0, 2.1], "b": [1.0, 1.5, 1.6]}
    base = _run(tmp_path, "joint training", 0.9, 0.3, 0.85, fisher=traces)
    other = _run(tmp_path, "InfoReg", 0.8, 0.5, 0.8, method="inforeg", fisher=traces,
                 regulator=describe_regulator(md.InfoReg(unimodal_loss=True)))
    # a saved diagnosis of the first run, as `modaldiag diagnose` leaves it
    (base.path / "diagnosis").mkdir()
    (base.path / "diagnosis" / "report.html").write_text("<html></html>")
    (base.path / "diagnosis" / "diagnosis.json").write_text(json.dumps({
        "modalities": ["a", "b"], "split": "test", "verdict": "balanced", "dominant": None,
        "weakest": None, "summary": "balanced on test", "fused_accuracy": 0.9,
        "unimodal": {"unimodal_acc": {"a": 0.3, "b": 0.85}}}))
    out = tmp_path / "cmp"
    final = [Path("/final/joint"), Path("/final/inforeg")]
    summary = write_comparison([base, other], out, paths=final)
    assert "InfoReg vs joint training" in summary
    frame = pd.read_csv(out / "comparison.csv")
    assert list(frame["path"]) == [str(p) for p in final]
    assert frame["test_acc_change_points"].tolist() == pytest.approx([0.0, -10.0], abs=1e-6)
    assert frame["test_unimodal_acc_change_points.a"].tolist() == pytest.approx([0.0, 20.0], abs=1e-6)
    assert frame["test_unimodal_acc_change_points.b"].tolist() == pytest.approx([0.0, -5.0], abs=1e-6)
    assert frame["regulator"].tolist() == ["none (joint training)", "InfoReg(unimodal_loss=True)"]
    assert frame["diagnosis_verdict"][0] == "balanced" and pd.isna(frame["diagnosis_verdict"][1])
    record = json.loads((out / "comparison.json").read_text())
    assert record["split"] == "test"
    assert [r["path"] for r in record["runs"]] == [str(p) for p in final]
    assert record["runs"][0]["diagnosis"]["report"] == "/final/joint/diagnosis/report.html"
    assert str(tmp_path) not in json.dumps(record)  # nothing of the temporary location leaks
    assert {"compare.png", "learning_windows.png", "comparison.csv"} <= set(record["files"])
    page = (out / "report.html").read_text()
    assert page.count("balanced on test") == 1  # each summary once
    assert "InfoReg(unimodal_loss=True)" in page and "InfoReg(beta=" not in page


def test_older_runs_and_diagnoses_still_load(tmp_path):
    assert regulator_text("OGM(alpha=0.8, noise=True)") == "OGM(alpha=0.8, noise=True)"
    assert regulator_text("None") == "none (joint training)"
    run = _run(tmp_path, "joint training", 0.9, 0.3, 0.85)
    (run.path / "diagnosis").mkdir()
    (run.path / "diagnosis" / "diagnosis.json").write_text(json.dumps({
        "modalities": ["a", "b"], "dominant": "b", "weakest": "a", "summary": "old",
        "fused_accuracy": 0.99, "unimodal": {"unimodal_acc": {"a": 0.3, "b": 0.9}}}))
    d = saved_diagnosis(run)
    # diagnoses written before the split was recorded were measured on the training data
    assert d["split"] == "train (older diagnosis)" and d["verdict"] == "imbalanced"


def test_same_names_get_their_folder(tmp_path):
    a = _run(tmp_path, "joint training", 0.9, 0.3, 0.8)
    b = _run(tmp_path, "joint training", 0.9, 0.3, 0.8)
    b.path = tmp_path / "seed1"
    assert run_labels([a, b]) == ["joint training [joint-training]", "joint training [seed1]"]
    assert comparison_frame([a, b])["run"].is_unique


def test_learning_windows_share_axes_one_line_per_run():
    runs = {"joint": _history({"a": [1.0, 2.0, 2.1], "b": [1.0, 1.5, 1.6]}),
            "inforeg": _history({"a": [1.0, 3.0, 3.2], "b": [2.0, 1.0, 0.5]}),
            "unmonitored": _history(None)}
    fig = plots.learning_windows(runs)
    axes = fig.axes
    assert len(axes) == 2  # one panel per modality, every run in it
    traced = [line for line in axes[0].lines if len(line.get_xdata()) == 3]
    assert [list(line.get_ydata()) for line in traced] == [[1.0, 2.0, 2.1], [1.0, 3.0, 3.2]]
    assert "no traces: unmonitored" in axes[0].get_title()
    plt.close(fig)
    with pytest.raises(ValueError, match="monitor=True"):
        plots.learning_windows({"x": _history(None)})


def test_never_replaces_files_in_a_folder_modaldiag_did_not_create(tmp_path):
    base = _run(tmp_path, "joint training", 0.9, 0.3, 0.85)
    other = _run(tmp_path, "InfoReg", 0.8, 0.5, 0.8, method="inforeg")
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    with pytest.raises(ValueError, match=r"already holds \['report.html'\].*nothing was overwritten"):
        write_comparison([base, other], mine)
    assert (mine / "report.html").read_text() == "my own report"
    assert sorted(p.name for p in mine.iterdir()) == ["report.html"]
    (mine / "report.html").unlink()  # an empty foreign folder is fine: nothing to replace
    write_comparison([base, other], mine)
    assert (mine / "comparison.csv").is_file()
