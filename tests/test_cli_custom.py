"""The command line on the user's own data and model (``--data`` / ``--model``), end to end on
the published-style audio-visual example (examples/custom_av.py): train -> diagnose -> compare,
resume, the errors a user meets, "did you mean", help text and ``--threads``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from modaldiag.cli import build_parser, main
from modaldiag.probes import evaluate
from modaldiag.runs import load_run

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_av.py"
SPEC = ["--data", f"{EXAMPLE}:make_data", "--model", f"{EXAMPLE}:make_model"]


def _train(out, method="joint", *extra):
    return main(["train", *SPEC, "--method", method, "--epochs", "2", "--out", str(out),
                 "--quiet", *extra])


@pytest.fixture(scope="module")
def av_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("av")
    for method in ("joint", "ogm-ge"):
        assert _train(base / method, method) == 0
    return base


def test_train_records_the_specs_and_rebuilds_the_model(av_runs):
    run = load_run(av_runs / "joint")
    assert run.config["data"] == f"{EXAMPLE}:make_data"
    assert run.config["model"] == f"{EXAMPLE}:make_model"
    assert run.config["dataset"] == "custom-av" and run.config["fusion"] is None
    assert run.config["regulator"]["text"] == "none (joint training)"
    ogm = load_run(av_runs / "ogm-ge").config["regulator"]
    assert ogm["label"] == "OGM" and ogm["text"].startswith("OGM(noise=True")  # non-defaults only
    assert ogm["config"]["alpha"] == 0.8 and "alpha" not in ogm["text"]
    # the rebuilt model (the example's md.wrap of AVClassifier + saved weights) scores exactly
    # what was recorded, on the TEST split (80 of the 400 clips)
    data = run.data()
    model = run.model(data)
    assert type(model).__name__ == "WrappedModel" and type(model.model).__name__ == "AVClassifier"
    test = evaluate(model, data.test.loader(512))
    assert test.n == 80 == run.config["test_n"]
    assert run.config["test_acc"] == pytest.approx(test.accuracy, abs=1e-12)
    assert run.config["test_unimodal_acc"] == pytest.approx(
        {m: s.accuracy for m, s in test.unimodal.items()}, abs=1e-12)
    # history.csv: one row per epoch, the same numbers as history.json
    frame = pd.read_csv(av_runs / "joint" / "history.csv")
    assert list(frame["epoch"]) == [0, 1]
    val = [e["val"]["acc"] for e in json.loads((av_runs / "joint" / "history.json").read_text())["epochs"]]
    assert frame["val.acc"].tolist() == pytest.approx(val, rel=1e-5, abs=1e-6)


def test_same_command_resumes_and_a_different_one_is_refused(av_runs, capsys):
    before = (av_runs / "joint" / "run.json").read_bytes()
    assert main(["train", *SPEC, "--method", "joint", "--epochs", "2",
                 "--out", str(av_runs / "joint")]) == 0
    captured = capsys.readouterr()
    assert "already complete" in captured.out and "already complete" in captured.err
    assert (av_runs / "joint" / "run.json").read_bytes() == before
    # another --model spec into the same folder: refused, naming what differs
    assert main(["train", "--data", f"{EXAMPLE}:make_data", "--method", "joint", "--epochs", "2",
                 "--out", str(av_runs / "joint"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "what differs: model" in err and (av_runs / "joint" / "run.json").read_bytes() == before


def test_diagnose_then_compare_reuses_the_saved_diagnosis(av_runs, capsys, monkeypatch):
    assert main(["diagnose", "--run", str(av_runs / "joint")]) == 0
    out = capsys.readouterr().out
    assert "diagnosis measured on the test split" in out
    saved = json.loads((av_runs / "joint" / "diagnosis" / "diagnosis.json").read_text())
    assert saved["split"] == "test"

    import modaldiag.cli as cli
    import modaldiag.probes as probes

    def forbidden(*args, **kwargs):
        raise AssertionError("compare recomputed a diagnosis")

    monkeypatch.setattr(cli, "_diagnose_run", forbidden)
    monkeypatch.setattr(probes, "diagnose", forbidden)
    cmp = av_runs / "cmp"
    assert main(["compare", str(av_runs / "joint"), str(av_runs / "ogm-ge"), "--out", str(cmp),
                 "--quiet"]) == 0
    assert {"report.html", "comparison.json", "comparison.csv", "compare.png",
            "learning_windows.png"} <= {p.name for p in cmp.iterdir()}
    joint, ogm = (load_run(av_runs / m).config for m in ("joint", "ogm-ge"))
    frame = pd.read_csv(cmp / "comparison.csv")
    assert list(frame["run"]) == ["joint training", "OGM-GE"] and set(frame["split"]) == {"test"}
    for m in ("audio", "visual"):  # every modality's change, with the right sign and scale
        change = 100 * (ogm["test_unimodal_acc"][m] - joint["test_unimodal_acc"][m])
        assert frame[f"test_unimodal_acc_change_points.{m}"].tolist() == pytest.approx(
            [0.0, change], abs=1e-6)
    assert frame["test_acc_change_points"][1] == pytest.approx(
        100 * (ogm["test_acc"] - joint["test_acc"]), abs=1e-6)
    assert frame["diagnosis_verdict"][0] == saved["verdict"]
    assert frame["diagnosis_split"][0] == "test" and pd.isna(frame["diagnosis_verdict"][1])
    record = json.loads((cmp / "comparison.json").read_text())
    assert record["split"] == "test"
    assert "'audio' unimodal test accuracy" in record["summary"]
    assert "'visual' unimodal test accuracy" in record["summary"]
    assert [r["path"] for r in record["runs"]] == [str(av_runs / "joint"), str(av_runs / "ogm-ge")]
    page = (cmp / "report.html").read_text()
    assert "fused accuracy (test)" in page and "OGM(noise=True" in page
    assert "modaldiag diagnose --run" in page  # the run without a diagnosis says how to get one


# ---------------------------------------------------------------- the user's own module
USER_MODULE = '''
import torch
import modaldiag as md

def loaders(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(60) % 3
    x = {"a": torch.randn(60, 5, generator=g) + y[:, None], "b": torch.randn(60, 4, generator=g)}
    ds = md.datasets.MultimodalDataset(x, y)
    return ds.subset(range(0, 36)).loader(12, shuffle=True), ds.subset(range(36, 48)).loader(12), \\
        ds.subset(range(48, 60)).loader(12)

def datasets_only():
    return md.datasets.MultimodalDataset({"a": torch.zeros(4, 2), "b": torch.zeros(4, 2)},
                                         torch.tensor([0, 1, 0, 1]))

def needs_args(path):
    return None

def plain_net(splits):
    return torch.nn.Linear(5, 3)

def sum_fusion(splits):
    return md.models.default_model(splits, fusion="sum", feature_dim=8)

def wrong_names(splits):
    return md.MultimodalClassifier({"audio": torch.nn.Linear(5, 8), "video": torch.nn.Linear(4, 8)},
                                   {"audio": 8, "video": 8}, 3)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mydata.py").write_text(USER_MODULE)
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield project
    sys.modules.pop("mydata", None)


def test_module_spec_with_loader_tuple_and_default_model(user_module, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--data", "mydata:loaders", "--epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    run = load_run(out)
    assert run.config["data"] == "mydata:loaders" and run.config["model"] is None
    assert run.config["test_n"] == 12 and set(run.config["test_unimodal_acc"]) == {"a", "b"}
    # rebuilt from another folder: the recorded working folder makes the module importable
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("mydata", None)
    sys.path[:] = [p for p in sys.path if p not in ("", str(user_module))]
    data = run.data()
    model = run.model(data)
    assert model.num_classes == 3
    assert evaluate(model, data.test).accuracy == pytest.approx(run.config["test_acc"], abs=1e-12)


def test_model_spec_on_an_embedded_dataset(user_module, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "nutrimouse", "--model", "mydata:sum_fusion", "--epochs",
                 "1", "--out", str(out), "--quiet"]) == 0
    run = load_run(out)
    assert run.config["data"] is None and run.config["model"] == "mydata:sum_fusion"
    model = run.model()
    assert model.fusion_type == "sum" and model.feature_dims == {"gene": 8, "lipid": 8}


@pytest.mark.parametrize("argv, message", [
    (["--data", "nosuchmodule:make"], "no module named 'nosuchmodule'"),
    (["--data", "mydata:loadres"], "has no function 'loadres'; did you mean 'loaders'?"),
    (["--data", "missing/file.py:make"], "no such file"),
    (["--data", "mydata"], "expected MODULE:FUNCTION"),
    (["--data", "mydata:needs_args"], "must take no arguments (or only `seed`); it requires ['path']"),
    (["--data", "mydata:datasets_only"], "the function returned a MultimodalDataset; it must return"),
    (["--data", "mydata:loaders", "--model", "mydata:plain_net"],
     "returned a Linear; it must return a modaldiag model"),
    (["--data", "mydata:loaders", "--model", "mydata:wrong_names"],
     "the model's modalities ['audio', 'video'] do not match the data's ['a', 'b']"),
    (["--data", "mydata:loaders", "--model", "mydata:wrong_names", "--fusion", "sum"],
     "--fusion applies to the default model only"),
])
def test_clear_errors_for_bad_specs(user_module, tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", *argv, "--epochs", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modaldiag: error:") and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_dataset_and_data_are_mutually_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "hapt", "--data", "x:y", "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------- did you mean, help, threads
def test_did_you_mean_for_dataset_and_method_typos(tmp_path, capsys):
    assert main(["train", "--dataset", "mfeat-fou-pxi", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 2
    assert "unknown mfeat view 'pxi'; did you mean 'pix'?" in capsys.readouterr().err
    assert main(["train", "--dataset", "hpat", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "unknown dataset 'hpat'; did you mean 'hapt'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "hapt", "--method", "infreg", "--out", str(tmp_path / "r")])
    assert "unknown method 'infreg'; did you mean 'inforeg'?" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_every_option_of_every_command_has_help_and_its_default():
    sub = build_parser()._subparsers._group_actions[0].choices
    assert set(sub) == {"demo", "train", "diagnose", "compare", "datasets", "benchmark"}
    for name, parser in sub.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            assert "--threads" in text and "--quiet" in text, name
            if action.default is not None and action.default is not False and action.option_strings:
                assert f"(default: {action.default})" in text, (name, action.dest)
    train = " ".join(sub["train"].format_help().split())
    assert "(default: concat; shared for mla, mid for greedy; not with --model)" in train and "(default: joint)" in train


def test_threads_option_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["datasets", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["datasets", "--threads", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_quiet_silences_progress_and_summaries(av_runs, capsys):
    assert _train(av_runs / "joint") == 0  # already complete: the note only, no summary
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"{av_runs / 'joint'} is already complete")
    assert captured.err.count("\n") == 1


def test_data_accepts_an_av_folder_root(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("av_folder_example", EXAMPLE.parent / "av_folder.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    root = example.write_tiny_folder(tmp_path / "clips", clips_per_split=(6, 3))
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "1", "--batch-size", "4", "--out",
                 str(out), "--quiet"]) == 0
    run = load_run(out)
    assert run.config["data"] == str(root) and run.config["dataset"] == "clips"
    data = run.data()
    assert data.modalities == ("audio", "visual") and len(data.test) == 3
    assert run.config["test_n"] == 3
    assert evaluate(run.model(data), data.test.loader(4)).accuracy == pytest.approx(
        run.config["test_acc"], abs=1e-12)
