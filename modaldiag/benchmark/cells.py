"""One benchmark cell: one (method, dataset, seed) run under the benchmark's shared budget.

A cell is described by a plain, picklable :class:`CellTask` (what to train and the full
configuration), so it runs the same in this process, in a spawned worker process or in a Ray
task, and gives the same numbers for the same seed. :func:`run_cell` trains the model with
``md.fit`` (the shared optimizer, epochs and batch size; model selection on the validation split
with ``restore_best``), then evaluates the selected model ONCE on the test split: fused accuracy
(through the regulator's test-time rule when it defines one), each modality's unimodal accuracy
through the head, and optionally the robustness AUC per (modality, corruption).

Data travel as a :class:`DataSource` (an embedded name, ``"synthetic"``, a ``--data`` spec or an
av_folder root, reloaded in the worker; or an in-memory ``DatasetSplits`` sent once per worker).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import pickle
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import datasets
from ..datasets import DatasetSplits
from ..models import MultimodalModel
from ..probes import evaluate
from ..probes.robustness import robustness
from ..runs import (
    LoaderSplits,
    build_model,
    describe_regulator,
    load_data,
    make_regulator,
)
from ..training import fit
from ..training.callbacks import prediction_rule
from ..utils.threads import set_threads
from ..utils.torch_utils import seed_everything

__all__ = ["DataSource", "CellTask", "run_cell", "train_selected", "build_regulator",
           "config_hash", "cell_filename", "load_source",
           "SYNTHETIC_NAME", "EVAL_BATCH_SIZE", "TUNE_SEED", "torch_threads", "register_data", "forget_data",
           "init_worker", "check_picklable", "make_model", "model_record", "loaders"]

#: the embedded-style name of ``md.datasets.synthetic(seed=0)`` (default arguments)
SYNTHETIC_NAME = "synthetic"
#: batch size of the validation and test loaders (evaluation only; no effect on training)
EVAL_BATCH_SIZE = 512
#: training seed of every tuning trial (the evaluation seeds are separate runs)
TUNE_SEED = 0



@dataclass(frozen=True)
class DataSource:
    """Where a dataset of the benchmark comes from.

    ``kind``: ``"embedded"`` (``md.datasets.load(name)``), ``"synthetic"``
    (``md.datasets.synthetic(seed=0)``), ``"spec"`` (a ``--data`` spec or av_folder root, loaded
    with :func:`modaldiag.runs.load_data`, importable from ``workdir``) or ``"object"`` (a
    ``DatasetSplits`` given in memory; shipped to workers separately). ``fingerprint``
    identifies the data in the cache key.
    """

    kind: str
    name: str
    spec: str | None = None
    workdir: str | None = None
    fingerprint: str = ""

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "spec": self.spec,
                "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class CellTask:
    """Everything one cell needs: picklable, so it runs in any process."""

    method: str
    seed: int
    source: DataSource
    config: dict  # the full JSON configuration (recorded in the cell file, hashed into its key)
    params: dict = field(default_factory=dict)  # lr and the regulator's tuned arguments
    model_fn: Callable | str | None = None
    device: str | None = None
    threads: int | None = None

    @property
    def key(self) -> str:
        return config_hash(self.config)

    @property
    def filename(self) -> str:
        return cell_filename(self.source.name, self.method, self.seed, self.key)


def config_hash(config: Mapping) -> str:
    """12 hex digits of sha256 over the canonical JSON of ``config``."""
    text = json.dumps(config, sort_keys=True, default=repr, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))[:60]


def cell_filename(dataset: str, method: str, seed: int, key: str) -> str:
    return f"{_slug(dataset)}__{_slug(method)}__seed{int(seed)}__{key}.json"


# ---------------------------------------------------------------- data and model
_IN_MEMORY: dict[str, DatasetSplits] = {}  # fingerprint -> data sent to this worker
_LOADED: dict[tuple, DatasetSplits] = {}   # per-process cache of data loaded from a source


def register_data(objects: Mapping[str, DatasetSplits]) -> None:
    """Make in-memory datasets (``{fingerprint: DatasetSplits}``) available to this process."""
    _IN_MEMORY.update(objects)


def forget_data(objects: Mapping[str, DatasetSplits]) -> None:
    """Drop in-memory datasets registered by :func:`register_data` (the caller's are done)."""
    for key in objects:
        _IN_MEMORY.pop(key, None)


def load_source(source: DataSource):
    """The data of ``source``: ``DatasetSplits`` (cached in this process) or ``LoaderSplits``
    (the user's loaders, rebuilt for every cell so no loader state carries over)."""
    if source.kind == "object":
        try:
            return _IN_MEMORY[source.fingerprint]
        except KeyError:
            raise RuntimeError(f"dataset {source.name!r} was not sent to this worker process; "
                               "this is a bug in modaldiag.benchmark.") from None
    key = (source.kind, source.name, source.spec, source.workdir)
    if key in _LOADED:
        return _LOADED[key]
    if source.kind == "embedded":
        data = datasets.load(source.name)
    elif source.kind == "synthetic":
        data = datasets.synthetic(seed=0)
    else:
        data = load_data(source.spec, search=[source.workdir] if source.workdir else [])
    if isinstance(data, DatasetSplits):
        _LOADED[key] = data
    return data


def make_model(model_fn, data, seed: int):
    """The cell's model, built right after seeding with the cell's seed (the same encoders and
    initialisation for every method of a seed)."""
    seed_everything(seed)
    if model_fn is None or isinstance(model_fn, str):
        return build_model(model_fn, data)
    model = model_fn(data)
    if not isinstance(model, MultimodalModel):
        raise ValueError(f"model_fn returned a {type(model).__name__}; it must return a modaldiag "
                         "model (md.MultimodalClassifier(...) or md.wrap(your_model, ...)).")
    return model


def model_record(model_fn, model) -> dict:
    """How the model is built, for the budget record (same for every method)."""
    if model_fn is None:
        builder = "modaldiag.models.default_model(data, fusion='concat', feature_dim=64)"
    elif isinstance(model_fn, str):
        builder = model_fn
    else:
        builder = f"{getattr(model_fn, '__module__', '?')}.{getattr(model_fn, '__qualname__', repr(model_fn))}"
    return {"builder": builder, "architecture": repr(model),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def loaders(data, batch_size: int):
    """``(train, val, test_factory)``; the test loader is only built when the test split is
    evaluated (never while tuning)."""
    if isinstance(data, LoaderSplits):
        return data.train, data.val, lambda: data.test
    return (data.train.loader(batch_size, shuffle=True), data.val.loader(EVAL_BATCH_SIZE),
            lambda: data.test.loader(EVAL_BATCH_SIZE))


# ---------------------------------------------------------------- regulators
def build_regulator(method: str, epochs: int, params: Mapping | None = None):
    """The method's regulator (:func:`modaldiag.runs.make_regulator`), with the tuned constructor
    arguments in ``params`` applied (``lr`` is the optimizer's, not the regulator's)."""
    regulator = make_regulator(method, epochs)
    extra = {k: v for k, v in (params or {}).items() if k != "lr"}
    if not extra:
        return regulator
    if regulator is None:
        raise ValueError(f"method {method!r} has no regulator arguments to tune; got {sorted(extra)}.")
    accepted = inspect.signature(type(regulator)).parameters
    unknown = sorted(k for k in extra if k not in accepted)
    if unknown:
        raise ValueError(f"{type(regulator).__name__} has no argument(s) {unknown}; fix "
                         f"SEARCH_SPACES[{method!r}].")
    base = {k: (tuple(v) if isinstance(v, list) else v) for k, v in regulator.config().items()
            if k in accepted and k != "val_loader"}  # val_loader: the run's, set by fit
    return type(regulator)(**{**base, **extra})


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch threads (restored afterwards); None leaves the count alone."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _val_at(history, epoch: int | None) -> float:
    if epoch is None:
        return math.nan
    for rec in history.epochs:
        if rec.get("epoch") == epoch:
            return float(rec.get("val", {}).get("acc", math.nan))
    return math.nan


def train_selected(task: CellTask, data=None):
    """Train the cell's model under the budget and select it on validation (no test data read).

    Returns ``(model, regulator, history, train_time_s, test_factory)``."""
    data = load_source(task.source) if data is None else data
    budget = task.config["budget"]
    model = make_model(task.model_fn, data, task.seed)
    regulator = build_regulator(task.method, budget["epochs"], task.params)
    train_loader, val_loader, test_factory = loaders(data, budget["batch_size"])
    opt = budget["optimizer"]
    lr = float(task.params.get("lr", opt["lr"]))
    start = time.perf_counter()
    history = fit(model, train_loader, val_loader, epochs=budget["epochs"], regulator=regulator,
                  monitor=budget["monitor"], seed=task.seed, lr=lr,
                  weight_decay=opt["weight_decay"], restore_best=True, progress=False,
                  device=task.device)
    return model, regulator, history, time.perf_counter() - start, test_factory


def run_cell(task: CellTask) -> dict:
    """Run one cell; returns its JSON-safe record (configuration, test/val numbers, history)."""
    with torch_threads(task.threads):
        model, regulator, history, seconds, test_factory = train_selected(task)
        best = history.best_epoch
        predict = prediction_rule(regulator, model)
        test = evaluate(model, test_factory(), predict=predict)
        record = {
            "format": "modaldiag.benchmark.cell", "key": task.key,
            "dataset": task.source.name, "method": task.method, "seed": task.seed,
            "config": task.config,
            "regulator": describe_regulator(regulator),
            "test_acc": float(test.accuracy), "test_n": int(test.n),
            "test_unimodal_acc": {m: float(s.accuracy) for m, s in test.unimodal.items()},
            "val_acc": _val_at(history, best), "best_epoch": best,
            "epochs_trained": len(history.epochs), "train_time_s": float(seconds),
            "environment": {"torch_threads": torch.get_num_threads(), "pid": os.getpid(),
                            "device": str(next(model.parameters()).device)},
            "history": history.to_dict(),
        }
        rob = task.config["budget"].get("robustness")
        if rob:
            result = robustness(model, test_factory(), corruptions=tuple(rob["corruptions"]),
                                severities=tuple(rob["severities"]), seed=task.seed,
                                split="test", predict=predict)
            frame = result.auc_frame()
            record["robustness_auc"] = [
                {k: (row[k] if isinstance(row[k], str) else float(row[k]))
                 for k in ("modality", "corruption", "auc", "auc_low", "auc_high") if k in row}
                for row in frame.to_dict("records")]
    return record


# ---------------------------------------------------------------- worker processes
def init_worker(threads: int | None, objects: Mapping[str, DatasetSplits]) -> None:
    """ProcessPoolExecutor initializer: thread count and in-memory data of this worker."""
    if threads is not None:
        set_threads(int(threads))
    register_data(objects)


def check_picklable(model_fn, what: str) -> None:
    """ValueError when ``model_fn`` cannot travel to another process (a lambda, a closure)."""
    if model_fn is None or isinstance(model_fn, str):
        return
    try:
        pickle.dumps(model_fn)
    except Exception as exc:  # PicklingError, AttributeError, TypeError...
        raise ValueError(f"model_fn {model_fn!r} cannot be sent to {what} ({exc}); define it at "
                         "module level (def make_model(splits): ...) or pass a 'pkg.mod:func' "
                         "spec.") from None
