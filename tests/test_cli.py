import json
import subprocess
import sys

from modaldiag.cli import main


def test_demo_writes_history_and_figure(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    files = {p.name for p in (out / "joint").iterdir()}
    assert {"history.json", "model.pt", "unimodal_accuracy.png", "unimodal_accuracy.svg",
            "summary.json"} <= files
    summary = json.loads((out / "joint" / "summary.json").read_text())
    assert summary["dataset"] == "mfeat-fou-pix" and 0 < summary["test_acc"] <= 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["train", "--dataset", "nope", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    proc = subprocess.run([sys.executable, "-m", "modaldiag.cli", "train", "--dataset", "hapt",
                           "--epochs", "0", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "positive integer" in proc.stderr


def test_datasets_command_lists_names(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "mfeat-fou-pix" in out and "hapt" in out
