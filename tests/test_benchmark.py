"""md.benchmark: equal budgets, resuming, paired statistics, outputs, tuning, processes, CLI."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import modaldiag as md
from modaldiag.benchmark import (
    SEARCH_SPACES,
    backends,
    benchmark,
    cells,
    holm,
    paired_test,
    resolve_methods,
    runner,
    tuning,
)
from modaldiag.cli import main

METHODS3 = ["joint", "ogm", "pmr"]
KW = {"seeds": 3, "epochs": 2, "threads": 1, "progress": False}


def tiny(seed=0, n=240):
    return md.datasets.synthetic(n_samples=n, num_classes=3, strength={"a": 2.0, "b": 0.6},
                                 dims={"a": 8, "b": 6}, seed=seed)


@pytest.fixture(scope="module")
def data():
    return tiny()


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench"
    return benchmark(data, methods=METHODS3, out=out, **KW), out


def _cell_files(out):
    return sorted((out / "cells").glob("*.json"))


def _counting(monkeypatch, fail_at=None, exc=KeyboardInterrupt):
    """Replace the cell runner by one that counts calls (and raises at call ``fail_at``)."""
    calls = []
    real = runner.run_cell

    def counted(task):
        calls.append((task.method, task.seed))
        if fail_at is not None and len(calls) == fail_at:
            raise exc()
        return real(task)

    monkeypatch.setattr(runner, "run_cell", counted)
    return calls


# ---------------------------------------------------------------- budget and cache
def test_every_cell_saved_with_the_same_budget(run):
    res, out = run
    files = _cell_files(out)
    assert len(files) == 3 * 3
    records = [json.loads(p.read_text()) for p in files]
    budgets = [r["config"]["budget"] for r in records]
    assert all(b == budgets[0] for b in budgets)  # equal budget, read from what was saved
    b = budgets[0]
    assert b["epochs"] == 2 and b["batch_size"] == 64
    assert b["optimizer"] == {"class": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    assert "restore_best" in b["selection"] and b["tuning"] is None
    for r in records:
        assert r["config"]["params"] == {}  # untuned: nobody gets other hyper-parameters
        # what was actually trained matches the budget: epochs run, lr used, selected epoch
        hist = r["history"]
        assert r["epochs_trained"] == len(hist["epochs"]) == 2
        assert all(e["lr"] == pytest.approx(0.01) for e in hist["epochs"])
        vals = [e["val"]["acc"] for e in hist["epochs"]]
        assert r["best_epoch"] == vals.index(max(vals)) and r["val_acc"] == max(vals)
        assert r["key"] in p_names(files)
    assert {(r["method"], r["seed"]) for r in records} == {(m, s) for m in METHODS3
                                                           for s in range(3)}
    # one seed: the same initial encoders for every method (the model is built after seeding)
    assert len({r["config"]["budget"]["model"]["architecture"] for r in records}) == 1
    regs = {r["method"]: r["regulator"]["label"] for r in records}
    assert regs == {"joint": "none (joint training)", "ogm": "OGM", "pmr": "PMR"}


def p_names(files):
    return " ".join(p.name for p in files)


def test_test_numbers_are_those_of_the_selected_model(run, data):
    """A cell re-trained by hand (same seed, budget) gives the recorded numbers."""
    res, _ = run
    rec = next(r for r in res.records if r["method"] == "ogm" and r["seed"] == 1)
    md.utils.torch_utils.seed_everything(1)
    model = md.models.default_model(data)
    md.fit(model, data.train.loader(64, shuffle=True), data.val.loader(512), epochs=2,
           regulator=md.OGM(alpha=0.8), seed=1, progress=False)
    test = md.probes.evaluate(model, data.test.loader(512))
    assert rec["test_acc"] == pytest.approx(test.accuracy, abs=1e-12)
    assert rec["test_unimodal_acc"] == pytest.approx(
        {m: s.accuracy for m, s in test.unimodal.items()}, abs=1e-12)


def test_interrupted_run_resumes_without_recomputing(run, data, tmp_path, monkeypatch):
    res, _ = run
    out = tmp_path / "b"
    calls = _counting(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        benchmark(data, methods=METHODS3, out=out, **KW)
    assert len(calls) == 4 and len(_cell_files(out)) == 3  # the 3 finished cells are kept
    notes = []
    calls = _counting(monkeypatch)
    again = benchmark(data, methods=METHODS3, out=out, log=notes.append, **KW)
    assert len(calls) == 6  # only the missing ones
    assert f"3 of 9 cells cached in {out / 'cells'}; computing 6" in notes[0]
    # the resumed benchmark equals the uninterrupted one, number for number
    cols = ["dataset", "method", "seed", "test_acc", "val_acc", "best_epoch",
            "test_unimodal_acc.a", "test_unimodal_acc.b", "key"]
    pd.testing.assert_frame_equal(again.cells[cols], res.cells[cols])
    calls = _counting(monkeypatch)
    benchmark(data, methods=METHODS3, out=out, log=notes.append, **KW)
    assert calls == [] and "9 of 9 cells cached" in notes[-1] and "computing 0" in notes[-1]


def test_a_crashing_cell_keeps_the_finished_ones(data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    calls = _counting(monkeypatch, fail_at=2, exc=RuntimeError)
    with pytest.raises(RuntimeError):
        benchmark(data, methods=["joint"], out=out, seeds=2, epochs=1, threads=1, progress=False)
    assert len(calls) == 2 and len(_cell_files(out)) == 1


def test_changed_configuration_does_not_reuse_cells(data, tmp_path, monkeypatch):
    out = tmp_path / "b"
    small = {"methods": ["joint"], "seeds": 2, "threads": 1, "progress": False}
    benchmark(data, out=out, epochs=1, **small)
    notes = []
    calls = _counting(monkeypatch)
    res = benchmark(data, out=out, epochs=2, log=notes.append, **small)
    assert len(calls) == 2  # another epoch budget: both cells recomputed
    assert "0 of 2 cells cached" in notes[0] and "2 cached cell(s) of another configuration" in notes[0]
    assert all(r["config"]["budget"]["epochs"] == 2 for r in res.records)
    calls = _counting(monkeypatch)
    benchmark(data, out=out, epochs=2, lr=0.02, **small)
    assert len(calls) == 2  # another learning rate too


# ---------------------------------------------------------------- statistics
def test_paired_test_matches_scipy_and_holm_by_hand():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        a, b = rng.normal(0.7, 0.05, n), rng.normal(0.68, 0.05, n)
        got = paired_test(a, b)
        ref = scipy_stats.ttest_rel(a, b)
        assert got.t == pytest.approx(ref.statistic, rel=1e-6)
        assert got.p == pytest.approx(ref.pvalue, rel=1e-6)
        d = a - b
        half = scipy_stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        assert (got.ci_low, got.ci_high) == pytest.approx((d.mean() - half, d.mean() + half),
                                                          rel=1e-6)
    # a value known by hand: d = (1, 2, 3): mean 2, sd 1, t = 2 / (1/sqrt 3) = 3.4641, df 2
    got = paired_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert got.t == pytest.approx(2 * math.sqrt(3), rel=1e-6)
    assert got.p == pytest.approx(0.0741799, rel=1e-5)
    assert paired_test([0.5, 0.6], [0.5, 0.6]).p == 1.0  # identical results
    assert math.isnan(paired_test([0.5], [0.4]).p)  # one seed: no test
    # Holm: sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, 3*0.03, max(2*0.04, .09), max(.5, .09)
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    adj = holm([math.nan, 0.2, 0.01])
    assert math.isnan(adj[0]) and adj[1:] == pytest.approx([0.2, 0.02])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_comparisons_are_paired_by_seed_with_holm_across_methods(run):
    res, _ = run
    cells = res.cells
    comps = res.comparisons()
    assert len(comps) == 2 * 3  # (ogm, pmr) x (fused, a, b)
    for metric in ("test_acc", "test_unimodal_acc.a", "test_unimodal_acc.b"):
        fam = comps[comps.metric == metric].set_index("method")
        base = cells[cells.method == "joint"].set_index("seed")[metric]
        ps = {}
        for method in ("ogm", "pmr"):
            vals = cells[cells.method == method].set_index("seed")[metric]
            d = (vals - base).to_numpy()
            row = fam.loc[method]
            assert row.n == 3 and row.mean_diff == pytest.approx(d.mean(), abs=1e-12)
            if d.std(ddof=1) > 1e-9:
                ref = scipy_stats.ttest_rel(vals.to_numpy(), base.to_numpy())
                assert row.p == pytest.approx(ref.pvalue, rel=1e-6)
            ps[method] = row.p
        lo, hi = sorted(ps, key=ps.get)
        want_lo = min(1.0, 2 * ps[lo])
        assert fam.loc[lo].p_holm == pytest.approx(want_lo)
        assert fam.loc[hi].p_holm == pytest.approx(max(want_lo, min(1.0, ps[hi])))
    frame = res.to_dataframe()
    assert list(frame.method) == METHODS3 and set(frame.n_seeds) == {3}
    row = frame.set_index("method").loc["pmr"]
    fused = comps[(comps.method == "pmr") & (comps.metric == "test_acc")].iloc[0]
    assert row["test_acc_diff"] == pytest.approx(fused.mean_diff)
    assert row["test_acc_p_holm"] == pytest.approx(fused.p_holm)
    assert row["test_acc_mean"] == pytest.approx(cells[cells.method == "pmr"].test_acc.mean())
    assert (row["epochs"], row["batch_size"], row["optimizer"], row["tune_trials"]) == (2, 64, "SGD", 0)
    assert math.isnan(frame.set_index("method").loc["joint", "test_acc_p"])


# ---------------------------------------------------------------- files
def test_leaderboard_html_and_csv(run, tmp_path):
    res, out = run
    names = {p.name for p in out.iterdir()}
    assert {"leaderboard.html", "leaderboard.csv", "cells.csv", "benchmark.json", "cells",
            ".modaldiag"} <= names
    assert json.loads((out / ".modaldiag").read_text())["kind"] == "benchmark"
    page = (out / "leaderboard.html").read_text()
    assert 'class="sortable"' in page and "<script>" in page
    assert page.count("data:image/png;base64,") >= 2  # effect plot + learning windows
    assert "equal budget for every method: 2 epochs" in page and "TEST split" in page
    assert "http" not in page.split("Generated by")[0].replace("http-equiv", "")  # self-contained
    csv = pd.read_csv(out / "leaderboard.csv")
    assert list(csv.method) == METHODS3
    assert csv.test_acc_mean.tolist() == pytest.approx(res.to_dataframe().test_acc_mean.tolist())
    assert len(pd.read_csv(out / "cells.csv")) == 9
    # save_* elsewhere: a file in a folder modaldiag did not create is never replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "leaderboard.html").write_text("my notes")
    with pytest.raises(ValueError, match="did not create"):
        res.save_html(foreign / "leaderboard.html")
    assert (foreign / "leaderboard.html").read_text() == "my notes"
    assert res.save_csv(foreign / "board.csv").is_file()  # a new file there is fine


def test_foreign_output_folder_refused_before_any_work(data, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="foreign folder"):
        benchmark(data, methods=["joint"], out=foreign, seeds=1, epochs=1, progress=False)
    assert calls == [] and [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    # a modaldiag folder of another kind (a run) is not a benchmark: refused too
    other = tmp_path / "run"
    other.mkdir()
    md.utils.io.write_marker(other, "run")
    with pytest.raises(ValueError, match="not a benchmark"):
        benchmark(data, methods=["joint"], out=other, seeds=1, epochs=1, progress=False)
    assert calls == []


def test_bad_arguments_name_the_problem(data):
    with pytest.raises(ValueError, match="did you mean 'ogm'"):
        resolve_methods(["ogmm"])
    assert resolve_methods(["ogm"]) == ["joint", "ogm"]  # the baseline is always compared with
    every = resolve_methods("all")  # every method that trains the default (late-fusion) model
    assert every[0] == "joint" and set(every) == set(md.runs.METHODS) - {"greedy"}
    with pytest.raises(ValueError, match="need a mid-fusion model"):
        benchmark(data, methods=["greedy"], out=None, progress=False)
    with pytest.raises(ValueError, match="did you mean"):
        benchmark("mfeat-fou-pxi", methods=["joint"], out=None, progress=False)
    with pytest.raises(ValueError, match="seeds"):
        benchmark(data, methods=["joint"], seeds=0, out=None, progress=False)


def test_missing_optional_extras_say_what_to_install(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install modaldiag\[ray\]"):
        benchmark(data, methods=["joint"], backend="ray", out=None, progress=False)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"pip install modaldiag\[tune\]"):
        benchmark(data, methods=["joint"], tune_trials=2, out=None, progress=False)


# ---------------------------------------------------------------- tuning
def test_tuned_arguments_reach_the_regulator():
    for method, space in SEARCH_SPACES.items():
        assert method in md.runs.METHODS, f"SEARCH_SPACES names an unknown method {method!r}"
        assert "lr" in space  # every method tunes lr: the shared dimension is the same for all
        for end in (0, 1):  # both bounds are valid arguments of the regulator
            params = {k: v[end] for k, v in space.items()}
            reg = cells.build_regulator(method, 4, params)
            for name, value in params.items():
                if name != "lr":
                    assert reg.config()[name] == pytest.approx(value), (method, name)


def test_tuning_reads_validation_only_with_equal_trials(tmp_path, monkeypatch):
    data = tiny(n=180)
    test_reads = []
    real_loader = data.test.loader
    monkeypatch.setattr(data.test, "loader",
                        lambda *a, **k: test_reads.append(1) or real_loader(*a, **k))
    real_tuning = runner.run_tuning

    def spy(task):
        before = len(test_reads)
        record = real_tuning(task)
        assert len(test_reads) == before, "the test split was read while tuning"
        return record

    monkeypatch.setattr(runner, "run_tuning", spy)
    out = tmp_path / "tuned"
    res = benchmark(data, methods=["joint", "ogm"], out=out, seeds=2, epochs=1, tune_trials=3,
                    threads=1, progress=False)
    assert len(test_reads) == 4  # afterwards: the test split read ONCE per cell
    assert {k: len(t["trials"]) for k, t in res.tunings.items()} == {
        (data.name, "joint"): 3, (data.name, "ogm"): 3}
    assert set(res.tunings[(data.name, "joint")]["best_params"]) == {"lr"}
    assert set(res.tunings[(data.name, "ogm")]["best_params"]) == {"lr", "alpha"}
    for r in res.records:  # the chosen parameters are used for every seed
        assert r["config"]["params"] == res.tunings[(data.name, r["method"])]["best_params"]
        assert r["history"]["epochs"][0]["lr"] == pytest.approx(r["config"]["params"]["lr"])
    budgets = {json.dumps(r["config"]["budget"], sort_keys=True) for r in res.records}
    assert len(budgets) == 1 and res.records[0]["config"]["budget"]["tuning"]["trials"] == 3
    assert "tuned: 3 trials per method on validation" in (out / "leaderboard.html").read_text()
    monkeypatch.setattr(runner, "run_tuning", lambda task: pytest.fail("tuning not cached"))
    calls = _counting(monkeypatch)
    benchmark(data, methods=["joint", "ogm"], out=out, seeds=2, epochs=1, tune_trials=3,
              threads=1, progress=False)
    assert calls == []


# ---------------------------------------------------------------- processes and CLI
def test_two_processes_give_the_same_numbers(run, data):
    res, _ = run
    par = benchmark(data, methods=["joint", "ogm"], seeds=[0, 1], epochs=2, out=None, jobs=2,
                    threads=1, progress=False)
    cols = ["method", "seed", "test_acc", "val_acc", "best_epoch", "test_unimodal_acc.a",
            "test_unimodal_acc.b", "key"]
    ref = res.cells[res.cells.method.isin(["joint", "ogm"]) & (res.cells.seed < 2)]
    pd.testing.assert_frame_equal(par.cells[cols].reset_index(drop=True),
                                  ref[cols].reset_index(drop=True))
    assert len({r["environment"]["pid"] for r in par.records}) >= 1


def test_unpicklable_model_fn_refused_for_processes(data):
    with pytest.raises(ValueError, match="module level"):
        benchmark(data, lambda s: md.models.default_model(s), methods=["joint"], jobs=2,
                  out=None, progress=False)


def test_cli_benchmark(tmp_path, capsys):
    spec = tmp_path / "mydata.py"
    spec.write_text("import modaldiag as md\n\ndef make():\n    return md.datasets.synthetic("
                    "n_samples=150, num_classes=3, dims=6, seed=0)\n")
    out = tmp_path / "bench"
    argv = ["benchmark", "--data", f"{spec}:make", "--methods", "ogm", "--seeds", "2",
            "--epochs", "1", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "test fused acc" in captured.out and "OGM" in captured.out
    assert "equal budget for every method: 1 epochs" in captured.out
    assert f"leaderboard written to {out / 'leaderboard.html'}" in captured.out
    assert "0 of 4 cells cached" in captured.err
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "4 of 4 cells cached" in captured.err
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", "--data", "synthetic", "--methods", "joint,ogmge", "--out", str(out)])
    assert exc.value.code == 2 and "did you mean 'ogm-ge'" in capsys.readouterr().err


def test_robustness_auc_per_cell(data):
    res = benchmark(data, methods=["joint"], seeds=1, epochs=1, out=None, robustness=True,
                    threads=1, progress=False)
    rob = res.records[0]["robustness_auc"]
    assert {(r["modality"]) for r in rob} == {"a", "b"}
    assert all(0.0 <= r["auc"] <= 1.0 for r in rob)
    assert any(c.startswith("robustness_auc.a.") for c in res.cells.columns)


def test_backends_module_declares_both():
    assert backends.BACKENDS == ("local", "ray") and tuning.LR_SPACE[2] is True


def test_hostile_names_are_escaped_on_the_leaderboard(tmp_path):
    data = md.datasets.synthetic(n_samples=120, num_classes=3,
                                 strength={"<script>x</script>": 2.0, "über b": 0.5}, dims=4, seed=0)
    data.name = "my <data>"
    res = benchmark(data, methods=["joint", "ogm"], seeds=2, epochs=1, out=tmp_path / "b",
                    threads=1, progress=False)
    page = (tmp_path / "b" / "leaderboard.html").read_text()
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "my &lt;data&gt;" in page and "<data>" not in page
    assert set(res.cells.columns) >= {"test_unimodal_acc.<script>x</script>",
                                      "test_unimodal_acc.über b"}
    assert res.to_dataframe()["test_unimodal_acc.über b_diff"].notna().tolist() == [False, True]
