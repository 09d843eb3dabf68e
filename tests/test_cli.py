import json
import subprocess
import sys

import pytest

from modaldiag.cli import main
from modaldiag.runs import METHODS


def _no_partial(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_demo_writes_comparison_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--quiet"]) == 0
    assert {"report.html", "comparison.json", "compare.png", "compare.svg", "joint", "inforeg"} <= {
        p.name for p in out.iterdir()}
    for run in ("joint", "inforeg"):
        assert (out / run / "diagnosis" / "report.html").exists()
        assert (out / run / "learning_window.png").exists()
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["weakest"] == "fou" and "InfoReg vs joint training" in summary["summary"]
    page = (out / "report.html").read_text()
    assert "joint training vs InfoReg" in page and page.count("data:image/png;base64,") >= 6
    assert _no_partial(tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_train_every_method(tmp_path, method):
    out = tmp_path / method
    assert main(["train", "--dataset", "mfeat-fou-pix", "--method", method, "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and 0 < run["test_acc"] <= 1
    assert {"history.json", "model.pt", "unimodal_accuracy.png", "learning_window.svg"} <= {
        p.name for p in out.iterdir()}


def test_diagnose_and_compare_runs(tmp_path, capsys):
    for method in ("joint", "ogm-ge"):
        assert main(["train", "--dataset", "mfeat-zer-fac", "--method", method, "--epochs", "2",
                     "--out", str(tmp_path / method), "--quiet"]) == 0
    assert main(["diagnose", "--run", str(tmp_path / "joint")]) == 0
    out = capsys.readouterr().out
    assert "dominates" in out and (tmp_path / "joint" / "diagnosis" / "report.html").exists()
    assert main(["compare", str(tmp_path / "joint"), str(tmp_path / "ogm-ge"),
                 "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    assert "OGM-GE vs joint training" in (tmp_path / "cmp" / "report.html").read_text()


def test_bad_arguments_exit_2_with_clear_messages(tmp_path, capsys):
    def err(argv):
        code = main(argv)
        return code, capsys.readouterr().err

    code, msg = err(["train", "--dataset", "nope", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "unknown dataset 'nope'" in msg and not (tmp_path / "x").exists()
    code, msg = err(["train", "--dataset", "hapt", "--device", "cuda:7", "--epochs", "1",
                     "--out", str(tmp_path / "y")])
    assert code == 2 and ("CUDA is not available" in msg or "cuda" in msg)
    code, msg = err(["diagnose", "--run", str(tmp_path)])
    assert code == 2 and "not a modaldiag run folder" in msg
    code, msg = err(["compare", str(tmp_path)])
    assert code == 2 and "at least two run folders" in msg
    assert _no_partial(tmp_path)
    for argv in (["train", "--dataset", "hapt", "--epochs", "0", "--out", "z"],
                 ["train", "--dataset", "hapt", "--method", "magic", "--out", "z"],
                 ["train", "--dataset", "hapt", "--lr", "-1", "--out", "z"],
                 ["frobnicate"]):
        proc = subprocess.run([sys.executable, "-m", "modaldiag.cli", *argv], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 2, argv
        assert "error" in proc.stderr and "Traceback" not in proc.stderr


def test_datasets_command_lists_names(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "mfeat-fou-pix" in out and "hapt" in out
