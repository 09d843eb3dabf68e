"""``md.benchmark``: methods × datasets × seeds under an equal budget, resumable, tuned, parallel."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import datasets
from ..datasets import DatasetSplits
from ..runs import METHODS, NEEDS_MID_FUSION, normalize_spec
from ..utils.io import (
    DirectoryLock,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    folder_state,
    read_marker,
    write_marker,
)
from ..utils.progress import progress_bar
from ..utils.threads import available_cores
from ..utils.validation import (
    BOOL,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    InstanceOf,
    Options,
    closest_match,
    validate_params,
)
from .backends import BACKENDS, execute, require_ray
from .cells import (
    EVAL_BATCH_SIZE,
    SYNTHETIC_NAME,
    TUNE_SEED,
    CellTask,
    DataSource,
    check_picklable,
    config_hash,
    forget_data,
    load_source,
    make_model,
    model_record,
    register_data,
    run_cell,
)
from .result import BenchmarkResult
from .tuning import SAMPLER_SEED, require_optuna, run_tuning, search_space

__all__ = ["benchmark", "resolve_methods", "resolve_data", "DEFAULT_CORRUPTIONS",
           "DEFAULT_SEVERITIES", "MARKER_KIND"]

#: the ``.modaldiag`` marker kind of a benchmark folder
MARKER_KIND = "benchmark"
DEFAULT_CORRUPTIONS = ("missing", "gaussian", "shuffle")
DEFAULT_SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
CELL_FORMAT = "modaldiag.benchmark.cell"
TUNING_FORMAT = "modaldiag.benchmark.tuning"

_CONSTRAINTS = {
    "epochs": [POSITIVE_INT],
    "jobs": [POSITIVE_INT],
    "backend": [Options(*BACKENDS)],
    "tune_trials": [NON_NEGATIVE_INT],
    "robustness": [BOOL],
    "batch_size": [POSITIVE_INT],
    "lr": [POSITIVE],
    "weight_decay": [InstanceOf(int, float, what="a number >= 0")],
    "monitor": [BOOL],
    "threads": [POSITIVE_INT, None],
    "ray_address": [str, None],
    "baseline": [str],
    "progress": [bool],
}


# ---------------------------------------------------------------- arguments
def resolve_methods(methods, baseline: str = "joint") -> list[str]:
    """``"all"`` -> every CLI method that trains the benchmark's model as it is (Greedy, which
    needs a mid-fusion model, is left out: name it with a ``model_fn`` that returns a
    :class:`~modaldiag.models.MidFusionClassifier`); a name or list of names, checked
    (did-you-mean); the baseline is put first (added when missing: every comparison is
    against it)."""
    if isinstance(methods, str):
        names = ([m for m in METHODS if m not in NEEDS_MID_FUSION] if methods == "all"
                 else [m.strip() for m in methods.split(",")])
    else:
        names = list(methods)
    for name in [*names, baseline]:
        if not isinstance(name, str) or name not in METHODS:
            close = closest_match(str(name), METHODS)
            hint = f"; did you mean {close!r}?" if close else ""
            raise ValueError(f"unknown method {name!r}{hint} (choose from {', '.join(METHODS)}, "
                             "or 'all').")
    if len(set(names)) != len(names):
        raise ValueError(f"methods lists a method twice: {names}.")
    return [baseline] + [m for m in names if m != baseline]


def _fingerprint_splits(data: DatasetSplits) -> str:
    digest = hashlib.sha256(repr(data).encode())
    for split in (data.train, data.val, data.test):
        inputs = getattr(split, "inputs", None)
        labels = getattr(split, "labels", None)
        if not isinstance(inputs, dict) or not isinstance(labels, torch.Tensor):
            continue  # a lazily loaded split (av_folder): its repr stands for it
        for m in sorted(inputs):
            digest.update(m.encode())
            digest.update(inputs[m].detach().cpu().contiguous().numpy().tobytes())
        digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def _one_source(item) -> tuple[DataSource, DatasetSplits | None]:
    if isinstance(item, DatasetSplits):
        name = item.name or "data"
        return DataSource("object", name, fingerprint=_fingerprint_splits(item)), item
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(f"data must be a dataset name, a --data spec ('pkg.mod:func', "
                        f"'file.py:func'), an av_folder root or md.datasets.DatasetSplits "
                        f"(or a list of them); got {type(item).__name__}.")
    text = os.fspath(item)
    if text == SYNTHETIC_NAME:
        return DataSource("synthetic", SYNTHETIC_NAME, fingerprint="synthetic(seed=0)"), None
    if os.path.isdir(text) or ":" in text:
        spec = normalize_spec(text, "--data")
        name = Path(spec).name if os.path.isdir(spec) else spec.rpartition(":")[2]
        return DataSource("spec", name, spec=spec, workdir=os.getcwd(),
                          fingerprint=f"spec:{spec}"), None
    try:
        datasets.load(text)  # fail now, with did-you-mean, not in a worker
    except ValueError as exc:
        raise ValueError(f"{exc} (or 'synthetic', a --data spec pkg.mod:func / file.py:func, or "
                         "an av_folder root)") from None
    return DataSource("embedded", text, fingerprint=f"embedded:{text}:split_seed=0"), None


def resolve_data(data) -> list[tuple[DataSource, DatasetSplits | None]]:
    """The benchmark's datasets: ``[(DataSource, in-memory DatasetSplits or None)]``."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise ValueError("data is empty; give at least one dataset.")
    out = [_one_source(item) for item in items]
    names = [s.name for s, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two datasets are named {dupes}; give each a distinct name "
                         "(DatasetSplits.name).")
    return out


def _seeds(seeds) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of integers; got {seeds!r}.")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1; got {seeds}.")
        return list(range(seeds))
    values = list(seeds)
    if not values or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                             for s in values):
        raise ValueError(f"seeds must be a count or a list of integers >= 0; got {seeds!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds repeat a value: {values}.")
    return values


# ---------------------------------------------------------------- the output folder
def _prepare_out(out, command: str | None) -> Path:
    """Check ``out`` (before any work) and make it a modaldiag benchmark folder."""
    path = check_output_dir(out, existing_ok=True, option="out")
    state = folder_state(path)
    if state == "modaldiag":
        kind = (read_marker(path) or {}).get("kind")
        if kind != MARKER_KIND:
            raise ValueError(f"out {os.fspath(out)!r} holds a modaldiag {kind}, not a benchmark; "
                             "choose another folder.")
    return path


def _mark(path: Path, command: str | None) -> None:
    if folder_state(path) in ("missing", "empty"):
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, MARKER_KIND, command=command)
    (path / "cells").mkdir(exist_ok=True)


def _read_cached(path: Path, fmt: str, config: dict) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != fmt:
        return None
    if record.get("key") != config_hash(config):
        return None
    if json.dumps(record.get("config"), sort_keys=True) != json.dumps(
            json.loads(json.dumps(config, default=repr)), sort_keys=True):
        return None
    return record


def _shown(out, sub: str) -> str:
    return os.path.join(os.fspath(out), sub)


# ---------------------------------------------------------------- the benchmark
def benchmark(data, model_fn: Callable | str | None = None, methods="all", seeds=5,
              epochs: int = 30, out: str | os.PathLike | None = "bench", *, jobs: int = 1,
              backend: str = "local", tune_trials: int = 0, robustness: bool = False,
              batch_size: int = 64, lr: float = 0.01, weight_decay: float = 1e-4,
              monitor: bool = True, device=None, threads: int | None = None,
              ray_address: str | None = None, baseline: str = "joint", progress: bool = True,
              log: Callable[[str], None] | None = None, command: str | None = None,
              corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
              severities: Sequence[float] = DEFAULT_SEVERITIES) -> BenchmarkResult:
    """Compare methods on datasets over seeds, every method under the same budget.

    Each (method, dataset, seed) is one *cell*: the model (``model_fn(splits)``, or the default
    model of the data) is built after seeding with the seed, trained with ``md.fit`` for
    ``epochs`` epochs with SGD (``lr``, momentum 0.9, ``weight_decay``) and ``batch_size``, the
    epoch of best validation accuracy is selected (``restore_best``), and the test split is
    evaluated once on that model. Every method of a seed shares the initialisation, the batch
    order and the split; only the method differs.

    Parameters
    ----------
    data : str, DatasetSplits, or a list of them
        An embedded dataset name (``md.datasets.available()``), ``"synthetic"``
        (``md.datasets.synthetic(seed=0)``), a ``--data`` spec (``"pkg.mod:func"``,
        ``"path/file.py:func"``), an av_folder root, or ``DatasetSplits``.
    model_fn : callable(splits) -> model, or "pkg.mod:func", optional
        Default: :func:`modaldiag.models.default_model` (concat fusion), as on the CLI. With
        ``jobs > 1`` it must be importable (a module-level function or a spec).
    methods : "all", a name, or a list of names
        CLI method names (:data:`modaldiag.runs.METHODS`); ``baseline`` is added when missing.
    seeds : int or list of int, default 5
        A count (seeds 0..n-1) or the seeds.
    epochs : int, default 30
    out : path or None, default "bench"
        Output folder, checked before any work: a new, empty or earlier benchmark folder (a
        folder modaldiag did not create is refused and never touched). Holds ``cells/`` (one
        JSON per finished cell, written atomically as it finishes), ``tuning/``,
        ``leaderboard.html``, ``leaderboard.csv``, ``cells.csv`` and ``benchmark.json``. A
        re-run computes only the cells that are missing (a cell of another configuration is
        never reused). None: nothing is cached or written.
    jobs : int, default 1
        Local worker processes (``backend="local"``), each with ``threads`` torch threads
        (default: the cores divided by ``jobs``).
    backend : {"local", "ray"}, default "local"
        ``"ray"``: every cell is a Ray task (``pip install modaldiag[ray]``); ``ray.init()``
        with ``ray_address`` (else ``$RAY_ADDRESS``, else a local instance) when Ray is not
        initialised yet.
    tune_trials : int, default 0
        > 0: per method and dataset, an Optuna study of this many trials over
        :data:`~modaldiag.benchmark.SEARCH_SPACES` on the validation split only (``pip
        install modaldiag[tune]``); the chosen parameters are used for every seed.
    robustness : bool, default False
        Also measure ``md.robustness`` on the test split (AUC per modality and corruption,
        ``corruptions`` × ``severities``).
    batch_size, lr, weight_decay, monitor, device
        The shared budget: training batch size, SGD learning rate (the untuned one) and weight
        decay, Fisher monitoring (learning windows), device.
    threads : int, optional
        Torch threads per cell (recorded with each cell).
    baseline : str, default "joint"
        What every method is compared with (paired by seed).
    progress : bool, default True
        A progress bar over the cells and notes ("12 of 20 cells cached ...").
    log : callable(str), optional
        Receives the notes (default: printed to stderr when ``progress``).
    command : str, optional
        Recorded in the folder's marker.

    Returns
    -------
    BenchmarkResult
        ``.to_dataframe()`` (leaderboard), ``.cells`` (one row per cell), ``.comparisons()``,
        ``.save_html()``, ``.save_csv()``.
    """
    validate_params(_CONSTRAINTS, {"epochs": epochs, "jobs": jobs, "backend": backend,
                                   "tune_trials": tune_trials, "robustness": robustness,
                                   "batch_size": batch_size, "lr": lr,
                                   "weight_decay": weight_decay, "monitor": monitor,
                                   "threads": threads, "ray_address": ray_address,
                                   "baseline": baseline, "progress": progress}, "benchmark")
    say = log or (_stderr if progress else (lambda text: None))
    methods = resolve_methods(methods, baseline)
    mid = [m for m in methods if m in NEEDS_MID_FUSION]
    if mid and model_fn is None:
        raise ValueError(f"{mid} need a mid-fusion model (cross-modal connections between encoder "
                         "stages to re-balance), but the default model fuses late; pass "
                         "model_fn=lambda data: md.models.mid_fusion_model(data) (then every "
                         "method trains that model) or drop them.")
    seeds = _seeds(seeds)
    if backend == "ray":
        require_ray()
    if tune_trials:
        require_optuna()
    if isinstance(model_fn, str):
        model_fn = normalize_spec(model_fn, "--model")
    elif model_fn is not None and not callable(model_fn):
        raise TypeError(f"model_fn must be a function of the splits or a 'pkg.mod:func' spec; "
                        f"got {type(model_fn).__name__}.")
    path = _prepare_out(out, command) if out is not None else None
    sources = resolve_data(data)
    if backend == "local" and jobs > 1:
        check_picklable(model_fn, "worker processes")
    if threads is None and (backend == "ray" or jobs > 1):
        threads = 1 if backend == "ray" else max(1, available_cores() // jobs)
    elif threads is not None and backend == "local" and jobs * threads > available_cores():
        say(f"benchmark: note: {jobs} jobs × {threads} threads exceed the {available_cores()} "
            "cores; they will compete for them (slower, same numbers).")
    device = None if device is None else str(torch.device(device))
    objects = {s.fingerprint: obj for s, obj in sources if obj is not None}
    lock = DirectoryLock(path) if path is not None else None
    if lock is not None:
        lock.acquire()
    try:
        register_data(objects)

        # the budget of every dataset (the same for every method and seed)
        budgets = {source.name: _budget(source, model_fn, seeds[0], epochs=epochs,
                                        batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                        monitor=monitor, tune_trials=tune_trials,
                                        robustness=robustness, corruptions=corruptions,
                                        severities=severities, device=device)
                   for source, _ in sources}
        run_config = {"datasets": [s.name for s, _ in sources], "methods": methods, "seeds": seeds,
                      "baseline": baseline, "budgets": budgets, "backend": backend, "jobs": jobs,
                      "threads": threads,
                      "data": {s.name: s.describe() for s, _ in sources}}
        if path is not None:
            _mark(path, command)
        tunings = _tune(sources, methods, budgets, model_fn, device, threads, objects, path, out,
                        backend, jobs, ray_address, say, progress) if tune_trials else {}
        tasks = []
        for source, _ in sources:
            for method in methods:
                params = dict(tunings[(source.name, method)]["best_params"]) if tune_trials else {}
                for seed in seeds:
                    config = {"dataset": source.name, "data": source.describe(), "method": method,
                              "seed": seed, "budget": budgets[source.name], "params": params}
                    tasks.append(CellTask(method, seed, source, config, params, model_fn, device,
                                          threads))
        records = _run_cells(tasks, path, out, backend, jobs, threads, objects, ray_address, say,
                             progress)
        result = BenchmarkResult(records, config=run_config, tunings=tunings, out=path,
                                 baseline=baseline)
        if path is not None:
            result.save_csv()
            result.save_html()
            atomic_write_text(path / "cells.csv",
                              result.cells.to_csv(index=False))
            atomic_write_json(path / "benchmark.json", json.loads(json.dumps(
                run_config, default=repr)))
        return result
    finally:
        forget_data(objects)
        if lock is not None:
            lock.release()


def _budget(source, model_fn, seed, *, epochs, batch_size, lr, weight_decay, monitor,
            tune_trials, robustness, corruptions, severities, device) -> dict:
    """The budget every cell of ``source`` shares (recorded in each cell, part of its key)."""
    model = make_model(model_fn, load_source(source), seed)
    return {
        "epochs": epochs, "batch_size": batch_size, "eval_batch_size": EVAL_BATCH_SIZE,
        "optimizer": {"class": "SGD", "lr": float(lr), "momentum": 0.9,
                      "weight_decay": float(weight_decay)},
        "model": model_record(model_fn, model),
        "selection": "epoch of best validation accuracy (md.fit restore_best=True)",
        "test": "evaluated once, on the selected model, after training",
        "monitor": monitor,
        "tuning": ({"trials": tune_trials, "sampler": "optuna TPESampler",
                    "sampler_seed": SAMPLER_SEED, "training_seed": TUNE_SEED,
                    "objective": "validation accuracy of the selected epoch"}
                   if tune_trials else None),
        "robustness": ({"corruptions": list(corruptions), "severities": list(severities),
                        "split": "test"} if robustness else None),
        "device": device, "modaldiag": _version(), "torch": torch.__version__,
    }


def _version() -> str:
    return str(getattr(sys.modules.get("modaldiag"), "__version__", "unknown"))


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _run_cells(tasks, path, out, backend, jobs, threads, objects, ray_address, say,
               progress) -> list[dict]:
    records: dict[int, dict] = {}
    missing = []
    for i, task in enumerate(tasks):
        cached = (_read_cached(path / "cells" / task.filename, CELL_FORMAT, task.config)
                  if path is not None else None)
        if cached is not None:
            records[i] = cached
        else:
            missing.append((i, task))
    if path is not None:
        wanted = {t.filename for t in tasks}
        stale = [p.name for p in (path / "cells").glob("*.json") if p.name not in wanted]
        note = (f" ({len(stale)} cached cell(s) of another configuration left unused)"
                if stale else "")
        say(f"benchmark: {len(records)} of {len(tasks)} cells cached in {_shown(out, 'cells')}; "
            f"computing {len(missing)}{note}")
    index = {id(task): i for i, task in missing}
    bar = progress_bar(total=len(missing), enabled=progress and bool(missing), desc="benchmark",
                       unit="cell")

    def done(task, record):
        if path is not None:
            atomic_write_json(path / "cells" / task.filename, record)
        records[index[id(task)]] = record
        bar.update(1)

    try:
        execute(run_cell, [t for _, t in missing], on_done=done, backend=backend, jobs=jobs,
                threads=threads, objects=objects, ray_address=ray_address)
    except BaseException:
        if path is not None:
            say(f"benchmark: stopped with {len(records)} of {len(tasks)} cells finished; they are "
                f"cached in {_shown(out, 'cells')} and a re-run computes only the rest.")
        raise
    finally:
        bar.close()
    return [records[i] for i in range(len(tasks))]


def _tune(sources, methods, budgets, model_fn, device, threads, objects, path, out, backend,
          jobs, ray_address, say, progress) -> dict:
    if path is not None:
        (path / "tuning").mkdir(exist_ok=True)
    tasks = []
    for source, _ in sources:
        for method in methods:
            space = {k: list(v) for k, v in search_space(method).items()}
            config = {"dataset": source.name, "data": source.describe(), "method": method,
                      "budget": budgets[source.name],
                      "tuning": {**budgets[source.name]["tuning"], "space": space}}
            tasks.append(CellTask(method, TUNE_SEED, source, config, {}, model_fn, device,
                                  threads))
    results: dict[tuple, dict] = {}
    missing = []
    for task in tasks:
        file = (path / "tuning" / task.filename) if path is not None else None
        cached = _read_cached(file, TUNING_FORMAT, task.config) if file is not None else None
        if cached is not None:
            results[(task.source.name, task.method)] = cached
        else:
            missing.append(task)
    if path is not None:
        say(f"benchmark: tuning: {len(results)} of {len(tasks)} studies cached in "
            f"{_shown(out, 'tuning')}; running {len(missing)} "
            f"({budgets[tasks[0].source.name]['tuning']['trials']} trials each, validation only)")
    bar = progress_bar(total=len(missing), enabled=progress and bool(missing),
                       desc="benchmark tuning", unit="study")

    def done(task, record):
        if path is not None:
            atomic_write_json(path / "tuning" / task.filename, record)
        results[(task.source.name, task.method)] = record
        bar.update(1)

    try:
        execute(run_tuning, missing, on_done=done, backend=backend, jobs=jobs, threads=threads,
                objects=objects, ray_address=ray_address)
    finally:
        bar.close()
    return results
