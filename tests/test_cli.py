import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from modaldiag.cli import main
from modaldiag.probes import evaluate
from modaldiag.runs import METHODS, load_run, make_regulator
from modaldiag.training.callbacks import prediction_rule


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
    assert "'pix' unimodal test accuracy" in summary["summary"]  # every modality, not the weakest only
    # the final paths are recorded, never the temporary .partial folder the demo was built in
    assert [r["path"] for r in summary["runs"]] == [str(out / "joint"), str(out / "inforeg")]
    assert ".partial" not in (out / "comparison.json").read_text()
    assert [r["diagnosis"]["split"] for r in summary["runs"]] == ["test", "test"]
    assert {"comparison.csv", "learning_windows.png"} <= {p.name for p in out.iterdir()}
    assert (out / "joint" / "history.csv").exists()
    page = (out / "report.html").read_text()
    assert "joint training vs InfoReg" in page and page.count("data:image/png;base64,") >= 6
    assert ".partial" not in page
    assert _no_partial(tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_train_every_method(tmp_path, method):
    out = tmp_path / method
    assert main(["train", "--dataset", "mfeat-fou-pix", "--method", method, "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method
    # the recorded scores are those of the saved model on the TEST split (not val, not train)
    loaded = load_run(out)
    data = loaded.data()
    model = loaded.model(data)
    # MLA / ReconBoost predict with their own test-time rule (ReconBoost's rho > 0 scales the
    # ensemble's logits, so a fresh regulator gives the same predictions)
    rule = prediction_rule(make_regulator(method, 2), model)
    assert (rule is None) == (run["prediction"] == "head")
    test = evaluate(model, data.test.loader(512), predict=rule)
    assert run["test_acc"] == pytest.approx(test.accuracy, abs=1e-12)
    assert run["test_unimodal_acc"] == pytest.approx({m: s.accuracy for m, s in test.unimodal.items()},
                                                     abs=1e-12)
    assert run["test_acc"] > 0.5  # 10 balanced classes: chance is 0.1
    # best_epoch is the first epoch of highest validation accuracy (restored before saving)
    val = [rec["val"]["acc"] for rec in json.loads((out / "history.json").read_text())["epochs"]]
    assert len(val) == 2 and run["best_epoch"] == val.index(max(val))
    assert {"history.json", "model.pt", "unimodal_accuracy.png", "learning_window.svg"} <= {
        p.name for p in out.iterdir()}


def test_diagnose_and_compare_runs(tmp_path, capsys):
    for method in ("joint", "ogm-ge"):
        assert main(["train", "--dataset", "mfeat-zer-fac", "--method", method, "--epochs", "2",
                     "--out", str(tmp_path / method), "--quiet"]) == 0
    assert main(["diagnose", "--run", str(tmp_path / "joint")]) == 0
    out = capsys.readouterr().out
    assert "measured on the test split" in out
    assert (tmp_path / "joint" / "diagnosis" / "report.html").exists()
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
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        assert "error" in capsys.readouterr().err
    # the installed entry point behaves the same in a fresh process
    proc = subprocess.run([sys.executable, "-m", "modaldiag.cli", "frobnicate"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "error" in proc.stderr and "Traceback" not in proc.stderr


def test_datasets_command_lists_names(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "mfeat-fou-pix" in out and "hapt" in out


# ---------------------------------------------------------------- never lose the user's files
def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    for method in ("joint", "ogm"):
        assert main(["train", "--dataset", "nutrimouse", "--method", method, "--epochs", "1",
                     "--out", str(base / method), "--quiet"]) == 0
    return base / "joint", base / "ogm"


@pytest.fixture
def no_work(monkeypatch):
    """Any training or diagnosing fails the test: refusals must come before any work."""
    import modaldiag.cli as cli
    import modaldiag.runs as runs

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(runs, "fit", forbidden)
    monkeypatch.setattr(runs, "train_run", forbidden)
    monkeypatch.setattr(cli, "_diagnose_run", forbidden)


def test_foreign_folder_refused_by_every_command_and_left_intact(tmp_path, two_runs, capsys,
                                                                 no_work):
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("three years")
    (project / "data").mkdir()
    (project / "data" / "x.csv").write_text("1,2")
    before = _snapshot(project)
    joint, ogm = map(str, two_runs)
    for argv in (["train", "--dataset", "nutrimouse", "--epochs", "1"], ["demo", "--epochs", "1"],
                 ["diagnose", "--run", joint], ["compare", joint, ogm]):
        for extra in ([], ["--overwrite"]):
            assert main([*argv, "--out", str(project), "--quiet", *extra]) == 2, argv
            err = capsys.readouterr().err
            assert "foreign folder" in err and "nothing in it was touched" in err, err
    assert _snapshot(project) == before and _no_partial(tmp_path)


@pytest.mark.parametrize("out", ["", ".", "..", "CWD", "/", "HOME"])
def test_dangerous_out_refused_before_any_work(tmp_path, monkeypatch, capsys, no_work, out):
    home, cwd = tmp_path / "home", tmp_path / "work" / "here"
    home.mkdir()
    cwd.mkdir(parents=True)
    (cwd / "mine.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    out = {"CWD": str(cwd), "HOME": str(home)}.get(out, out)
    for argv in (["train", "--dataset", "nutrimouse"], ["demo"]):
        assert main([*argv, "--out", out, "--quiet", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "modaldiag: error:" in err and (
            "is empty" in err or "refusing --out" in err), err
    assert (cwd / "mine.txt").read_text() == "keep" and os.listdir(home) == []


def test_out_equal_to_inside_or_containing_an_input_run_refused(tmp_path, two_runs, capsys,
                                                                monkeypatch, no_work):
    joint, ogm = two_runs
    before = {p: _snapshot(p) for p in two_runs}
    cases = [
        (["diagnose", "--run", str(joint), "--out", str(joint)], "is the input .* itself"),
        (["diagnose", "--run", str(joint), "--out", str(joint / "extra")], "inside the input"),
        (["diagnose", "--run", str(joint), "--out", str(joint.parent)], "contains the input"),
        (["compare", str(joint), str(ogm), "--out", str(joint)], "is the input .* itself"),
        (["compare", str(joint), str(ogm), "--out", str(ogm / "cmp")], "inside the input"),
        (["compare", str(joint), str(ogm), "--out", str(joint.parent)], "contains the input"),
    ]
    for argv, message in cases:
        assert main([*argv, "--quiet", "--overwrite"]) == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
    monkeypatch.chdir(joint)  # compare's default ./comparison would land inside the run
    assert main(["compare", ".", str(ogm), "--quiet"]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert {p: _snapshot(p) for p in two_runs} == before


def test_default_outputs_are_replaced_only_with_overwrite(tmp_path, two_runs, capsys,
                                                          monkeypatch):
    joint, ogm = two_runs
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(joint), str(ogm), "--quiet"]) == 0
    marker = json.loads((tmp_path / "comparison" / ".modaldiag").read_text())
    assert marker["kind"] == "comparison" and marker["command"].startswith("modaldiag compare")
    first = (tmp_path / "comparison" / "comparison.json").read_bytes()
    assert main(["compare", str(joint), str(ogm), "--quiet"]) == 2
    assert "already holds a modaldiag comparison" in capsys.readouterr().err
    assert main(["compare", str(ogm), str(joint), "--quiet", "--overwrite"]) == 0
    assert (tmp_path / "comparison" / "comparison.json").read_bytes() != first
    run_files = _snapshot(joint)
    assert main(["diagnose", "--run", str(joint), "--quiet"]) == 0
    assert json.loads((joint / "diagnosis" / ".modaldiag").read_text())["kind"] == "diagnosis"
    assert main(["diagnose", "--run", str(joint), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["diagnose", "--run", str(joint), "--quiet", "--overwrite"]) == 0
    assert {k: v for k, v in _snapshot(joint).items() if not k.startswith("diagnosis/")} == run_files
    shutil.rmtree(joint / "diagnosis")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison"]


def test_demo_into_an_existing_demo_needs_overwrite(tmp_path, capsys, no_work):
    from modaldiag.utils.io import write_marker

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.html").write_text("earlier demo")
    write_marker(out, "demo", command="modaldiag demo")
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "already holds a modaldiag demo (made by `modaldiag demo`" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "earlier demo"


def test_output_location_checked_before_training(tmp_path, capsys, monkeypatch, no_work):
    import modaldiag.utils.io as mio

    (tmp_path / "file").write_text("x")
    assert main(["train", "--dataset", "nutrimouse", "--out", str(tmp_path / "file" / "run"),
                 "--quiet"]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(mio.shutil, "disk_usage", lambda p: usage._replace(free=2**20))
    assert main(["train", "--dataset", "nutrimouse", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 2
    assert "only 1.0 MiB free" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("lr", ["inf", "-inf", "nan", "0", "-1", "1e400", "abc"])
def test_non_finite_or_non_positive_lr_refused_at_parse_time(tmp_path, capsys, no_work, lr):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "nutrimouse", f"--lr={lr}", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "argument --lr: expected a" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_help_documents_overwrite_and_restart():
    from modaldiag.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    train = " ".join(sub["train"].format_help().split())
    assert "--restart discard the checkpoints of an interrupted run" in train
    assert "re-running the same command resumes from the last completed epoch" in train
    for command in ("train", "diagnose", "compare", "demo"):
        text = " ".join(sub[command].format_help().split())
        assert "--overwrite replace --out when it already holds an earlier modaldiag output" in text
        assert "a folder modaldiag did not create is never replaced" in text


def test_existing_empty_folder_is_used(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert main(["train", "--dataset", "nutrimouse", "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads((out / ".modaldiag").read_text())["kind"] == "run"
    assert json.loads((out / "run.json").read_text())["epochs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
