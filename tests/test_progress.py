"""Progress output of fit / shapley / fisher_trace (quiet when asked), ShapleyValues.to_dataframe,
and the thread settings."""

import importlib
import re

import numpy as np
import pytest
import torch
from conftest import make_model
from tqdm import tqdm

import modaldiag as md
from modaldiag.utils import progress as progress_module
from modaldiag.utils import threads
from modaldiag.utils.progress import length_or_none, progress_bar

fit_module = importlib.import_module("modaldiag.training.fit")


@pytest.fixture(scope="module")
def small():
    """70 training samples (m0: 5 features, m1: 6), 3 classes: 3 batches of 32 per epoch."""
    return md.datasets.synthetic(n_samples=100, num_classes=3, strength={"m0": 2.0, "m1": 0.6},
                                 dims={"m0": 5, "m1": 6}, seed=0)


def _fit(small, **kw):
    model = make_model()
    return md.fit(model, small.train.loader(32, shuffle=True), small.val.loader(64), epochs=2,
                  monitor=False, seed=0, **kw)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def every_phase_prints(monkeypatch):
    """These tests check the plain lines of fast phases: print them whatever their length."""
    monkeypatch.setattr(progress_module, "PLAIN_MIN_SECONDS", 0.0)


def test_plain_lines_skip_phases_shorter_than_a_second(monkeypatch, capfd):
    monkeypatch.setattr(progress_module, "PLAIN_MIN_SECONDS", 1.0)
    clock = iter([0.0, 0.2, 10.0, 12.5])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    for _ in progress_bar(range(3), enabled=True, desc="fast"):
        pass
    for _ in progress_bar(range(2), enabled=True, desc="slow"):
        pass
    assert _lines(capfd.readouterr().err) == ["modaldiag: slow: 2 batches in 2.5 s"]


# ---------------------------------------------------------------- quiet
def test_quiet_fit_shapley_and_fisher_write_nothing(small, capfd):
    model = make_model()
    _fit(small, progress=False)
    md.shapley(model, small.test.loader(8), progress=False)
    md.fisher_trace(model, small.test.loader(8), progress=False)
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


# ---------------------------------------------------------------- not a terminal: plain lines
def test_fit_prints_one_plain_line_per_epoch_and_one_for_the_run(small, capfd):
    assert len(small.train.loader(32)) == 3
    _fit(small, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    lines = _lines(err)
    assert len(lines) == 3, lines
    assert re.fullmatch(r"modaldiag: fit epoch 1/2: 3 batches in \d+\.\d s", lines[0])
    assert re.fullmatch(r"modaldiag: fit epoch 2/2: 3 batches in \d+\.\d s", lines[1])
    assert re.fullmatch(r"modaldiag: fit: 2 epochs in \d+\.\d s", lines[2])
    assert "\r" not in err  # no carriage-return bar in a log


def test_shapley_and_fisher_print_one_plain_line_each(small, capfd):
    model = make_model()
    n_batches = len(small.test.loader(8))
    assert n_batches >= 2
    md.shapley(model, small.test.loader(8), progress=True)
    md.fisher_trace(model, small.test.loader(8), progress=True)
    _, err = capfd.readouterr()
    lines = _lines(err)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"modaldiag: shapley: {n_batches} batches in ")
    assert lines[1].startswith(f"modaldiag: fisher (per_sample): {n_batches} batches in ")


def test_fit_draws_nothing_on_a_rank_other_than_0(small, capfd, monkeypatch):
    monkeypatch.setattr(fit_module, "is_main_process", lambda: False)
    _fit(small, progress=True)
    assert capfd.readouterr().err == ""


def test_resumed_fit_counts_only_the_remaining_epochs_per_epoch(small, tmp_path, capfd):
    model = make_model()
    loader = small.train.loader(32, shuffle=True)
    md.fit(model, loader, epochs=1, monitor=False, seed=0, progress=False, checkpoint_dir=tmp_path)
    md.fit(model, loader, epochs=3, monitor=False, seed=0, progress=True, checkpoint_dir=tmp_path,
           resume=True)
    lines = _lines(capfd.readouterr().err)
    assert [line.split(":")[1].strip() for line in lines] == [
        "fit epoch 2/3", "fit epoch 3/3", "fit"]
    assert lines[-1].startswith("modaldiag: fit: 3 epochs in ")  # 1 resumed + 2 run


# ---------------------------------------------------------------- progress_bar itself
def test_progress_bar_on_a_terminal_is_tqdm_and_counts(monkeypatch, capfd):
    monkeypatch.setattr(progress_module, "is_interactive", lambda: True)
    bar = progress_bar(iter(range(4)), enabled=True, desc="x", total=4)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2, 3]
    assert bar.n == 4


def test_progress_bar_disabled_passes_items_and_counts(capfd):
    bar = progress_bar((i * i for i in range(3)), enabled=False, desc="x")
    assert list(bar) == [0, 1, 4]
    assert bar.n == 3
    assert capfd.readouterr().err == ""


def test_plain_line_names_phase_count_and_unit(capfd):
    list(progress_bar(range(1), enabled=True, desc="separability", unit="modality"))
    list(progress_bar(range(2), enabled=True, desc="probe", unit="batch"))
    lines = _lines(capfd.readouterr().err)
    assert lines[0].startswith("modaldiag: separability: 1 modality in ")
    assert lines[1].startswith("modaldiag: probe: 2 batches in ")


def test_length_or_none():
    assert length_or_none([1, 2, 3]) == 3
    assert length_or_none(x for x in range(3)) is None


# ---------------------------------------------------------------- ShapleyValues.to_dataframe
def test_shapley_to_dataframe_one_row_per_sample_matches_values(small):
    model = make_model()
    loader = small.test.loader(8)
    sv = md.shapley(model, loader)
    frame = sv.to_dataframe()
    n = len(small.test)
    assert len(frame) == n == len(sv)
    assert list(frame.columns) == ["sample", "label", "prediction", "m0", "m1", "full_value",
                                   "empty_value"]
    np.testing.assert_array_equal(frame["sample"].to_numpy(), np.arange(n))
    np.testing.assert_array_equal(frame["label"].to_numpy(), small.test.labels.numpy())
    np.testing.assert_array_equal(frame["prediction"].to_numpy(), sv.predictions.numpy())
    for j, m in enumerate(sv.modalities):  # column j is modality j, not swapped
        np.testing.assert_allclose(frame[m].to_numpy(), sv.values[:, j].numpy(), rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(frame["full_value"].to_numpy(), sv.full_value.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(frame["empty_value"].to_numpy(), sv.empty_value.numpy(),
                               rtol=1e-5, atol=1e-6)
    # efficiency read from the table: the modalities' values sum to full - empty per sample
    np.testing.assert_allclose(frame[["m0", "m1"]].sum(axis=1), frame.full_value - frame.empty_value,
                               rtol=1e-5, atol=1e-6)
    # the dataset-level mean is the column mean
    for m, mean in sv.mean().items():
        assert frame[m].mean() == pytest.approx(mean, rel=1e-5, abs=1e-6)


def test_shapley_to_dataframe_rows_follow_a_subset(small):
    sv = md.shapley(make_model(), small.test.loader(8))
    sub = sv[sv.labels == 1]
    frame = sub.to_dataframe()
    assert len(frame) == int((sv.labels == 1).sum()) > 0
    assert (frame["label"] == 1).all()


def test_shapley_to_dataframe_has_stderr_in_permutation_mode(small):
    sv = md.shapley(make_model(m=3), _three(small), method="permutation",
                    n_permutations=4)
    frame = sv.to_dataframe()
    assert [c for c in frame.columns if c.startswith("stderr ")] == [
        "stderr m0", "stderr m1", "stderr m2"]
    np.testing.assert_allclose(frame["stderr m2"].to_numpy(), sv.stderr[:, 2].numpy(), rtol=1e-5,
                               atol=1e-6)


def _three(small):
    g = torch.Generator().manual_seed(0)
    x = {f"m{i}": torch.randn(10, 5 + i, generator=g) for i in range(3)}
    y = torch.randint(0, 3, (10,), generator=g)
    return [(x, y)]


def test_shapley_to_dataframe_refuses_a_modality_named_like_a_column(small):
    sv = md.shapley(make_model(), small.test.loader(8))
    sv.modalities = ("label", "m1")
    with pytest.raises(ValueError, match="named like a fixed column"):
        sv.to_dataframe()


# ---------------------------------------------------------------- threads
@pytest.fixture
def restore_threads(monkeypatch):
    """Whatever a test sets (torch, BLAS pools, the variables set_threads writes) is undone."""
    before = torch.get_num_threads()
    for var in threads._POOL_VARS:
        if var in threads.os.environ:
            monkeypatch.setenv(var, threads.os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    yield
    threads.set_threads(before)


def test_set_threads_sets_torch_blas_and_reads_the_environment(monkeypatch, restore_threads):
    from threadpoolctl import threadpool_info

    assert md.set_threads(2) == 2 == torch.get_num_threads()
    assert threads.os.environ["OMP_NUM_THREADS"] == "2"
    assert md.set_threads(1) == 1 == torch.get_num_threads()
    assert {p["num_threads"] for p in threadpool_info()} == {1}  # numpy/scipy BLAS, OpenMP
    assert threads.os.environ["OPENBLAS_NUM_THREADS"] == "1"
    # the user's own OMP_NUM_THREADS (not the value set_threads wrote) is honoured...
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert md.set_threads() == 2
    # ...after MODALDIAG_THREADS
    monkeypatch.setenv(threads.ENV_VAR, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert md.set_threads() == 1
    # the value set_threads wrote itself is not mistaken for a user's choice
    monkeypatch.delenv(threads.ENV_VAR)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.os.environ["OMP_NUM_THREADS"] == "1"
    assert md.set_threads() == 2


def test_set_threads_sets_torch_and_reads_the_environment(monkeypatch, restore_threads):
    before = torch.get_num_threads()
    try:
        assert md.set_threads(2) == 2 == torch.get_num_threads()
        monkeypatch.setenv(threads.ENV_VAR, "1")
        assert md.set_threads() == 1
        monkeypatch.setenv(threads.ENV_VAR, "zero")
        with pytest.raises(ValueError, match="MODALDIAG_THREADS"):
            md.set_threads()
        with pytest.raises(ValueError, match="positive integer"):
            md.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_default_threads_is_at_least_one_and_at_most_the_cores():
    n = threads.default_threads()
    assert 1 <= n <= max(1, threads.available_cores())


@pytest.mark.parametrize(("load", "cores", "expected"), [
    (0.0, 2, 2),    # quiet 2-core machine: both cores
    (0.4, 2, 2),
    (0.6, 2, 1),    # one core mostly busy
    (2.5, 2, 1),    # the measured contention case: one thread
    (5.0, 2, 1),    # load 5 (the report): still one, never 0 or negative
    (1.0, 4, 3),
    (0.0, 16, 16),
    (3.0, 1, 1),
])
def test_default_threads_uses_the_idle_cores(load, cores, expected):
    assert threads.default_threads(load=load, cores=cores) == expected


def test_default_threads_without_a_load_average_uses_every_core(monkeypatch):
    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr(threads.os, "getloadavg", no_load)
    assert threads.load_average() is None
    assert threads.default_threads(cores=3) == 3


def test_set_threads_without_argument_applies_the_load_aware_default(monkeypatch,
                                                                     restore_threads):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    try:
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (4.0, 4.0, 4.0))
        assert md.set_threads() == 1
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert md.set_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the README's numbers
def test_readme_python_quick_start_prints_the_documented_numbers(capsys, restore_threads):
    """The README's seeded example prints exactly what the README says it prints."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"## In Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    promised = re.search(r"# (\{'fou': [0-9.]+, 'pix': [0-9.]+\})", block).group(1)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    plt.close("all")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == promised == "{'fou': 0.312, 'pix': 0.948}"
    assert f"exactly `{promised}`" in readme
