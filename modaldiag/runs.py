"""Training runs on disk: what ``modaldiag train`` writes and ``diagnose``/``compare`` read.

A run folder holds ``run.json`` (configuration and test scores), ``history.json``, ``model.pt``
(weights only; loads with ``torch.load(weights_only=True)``), figures and the ``.modaldiag``
marker. It is written atomically once training is complete: a crash leaves no half-written run.
While training, checkpoints go every epoch into ``.OUT.work`` beside the run folder (marker kind
``"train-work"`` with the run's configuration); the same command resumes from there.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import datasets
from .models import default_model
from .probes import evaluate
from .regulators import OGM, OPM, InfoReg, MMPareto, Relearning, ValuationResampling
from .report.plots import learning_window, save_figure, unimodal_accuracy
from .training import History, fit
from .utils.io import (
    DirectoryLock,
    atomic_directory,
    atomic_write_json,
    check_output_dir,
    discard_folder,
    folder_state,
    read_marker,
    recover,
    safe_torch_load,
    write_marker,
)
from .utils.validation import POSITIVE, POSITIVE_INT, InstanceOf, Options, validate_params

__all__ = ["METHODS", "RUN_KEYS", "make_regulator", "train_run", "load_run", "work_dir", "Run"]

#: the configuration that identifies a run: re-running with all of them equal resumes
RUN_KEYS = ("dataset", "method", "epochs", "seed", "fusion", "batch_size", "lr")
FUSIONS = ("concat", "sum", "film", "gated", "late")

METHODS = ("joint", "inforeg", "inforeg-star", "relearning", "ogm", "ogm-ge", "opm", "mmpareto",
           "valuation", "valuation-modality")
METHOD_LABELS = {"joint": "joint training", "inforeg": "InfoReg", "inforeg-star": "InfoReg*",
                 "relearning": "Re-learning", "ogm": "OGM", "ogm-ge": "OGM-GE", "opm": "OPM",
                 "mmpareto": "MMPareto", "valuation": "valuation re-sampling (sample)",
                 "valuation-modality": "valuation re-sampling (modality)"}


def make_regulator(method: str, epochs: int):
    """The regulator for a CLI method name (paper defaults; schedules scaled to short runs)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}.")
    warmup = min(5, max(1, epochs // 4))
    return {
        "joint": lambda: None,
        "inforeg": lambda: InfoReg(),
        "inforeg-star": lambda: InfoReg(unimodal_loss=True),
        "relearning": lambda: Relearning(every=min(20, max(1, epochs // 3))),
        "ogm": lambda: OGM(alpha=0.8),
        "ogm-ge": lambda: OGM(alpha=0.8, noise=True),
        "opm": lambda: OPM(),
        "mmpareto": lambda: MMPareto(),
        "valuation": lambda: ValuationResampling("sample", warmup=warmup),
        "valuation-modality": lambda: ValuationResampling("modality", warmup=warmup),
    }[method]()


class Run:
    """A run read back from disk: its configuration, History, rebuilt model and data."""

    def __init__(self, path: Path, config: dict, history: History, *, status: str = "loaded",
                 resumed_from: int = 0):
        self.path, self.config, self.history = path, config, history
        #: "loaded", "trained", "resumed" or "already complete" (what :func:`train_run` did)
        self.status = status
        #: epochs that were already complete when :func:`train_run` resumed (0: none)
        self.resumed_from = resumed_from

    @property
    def name(self) -> str:
        return self.config.get("name") or self.path.name

    def data(self):
        return datasets.load(self.config["dataset"], seed=self.config.get("split_seed", 0))

    def model(self, data=None, device="cpu"):
        data = data or self.data()
        model = default_model(data, fusion=self.config["fusion"],
                              feature_dim=self.config.get("feature_dim", 64))
        state = safe_torch_load(self.path / "model.pt", map_location=device)
        model.load_state_dict(state["model"])
        return model.to(device)


def load_run(path) -> Run:
    path = Path(path)
    if not (path / "run.json").is_file():
        raise ValueError(f"{str(path)!r} is not a modaldiag run folder (no run.json); create one "
                         "with `modaldiag train`.")
    try:
        config = json.loads((path / "run.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path / 'run.json')!r} is not valid JSON: {exc}") from None
    return Run(path, config, History.load(path / "history.json"))


_TRAIN_CONSTRAINTS = {
    "method": [Options(*METHODS)],
    "epochs": [POSITIVE_INT],
    "seed": [InstanceOf(int, what="an integer")],
    "fusion": [Options(*FUSIONS)],
    "batch_size": [POSITIVE_INT],
    "lr": [POSITIVE],
    "progress": [bool],
    "overwrite": [bool],
    "restart": [bool],
    "name": [str, None],
    "command": [str, None],
}


def work_dir(out: str | os.PathLike) -> Path:
    """Where :func:`train_run` keeps the checkpoints of the unfinished run ``out``: the
    modaldiag-owned folder ``.NAME.work`` beside it (removed once the run is complete)."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.work"


def _differences(old: dict, new: dict) -> str:
    return "; ".join(f"{key} {old.get(key)!r} -> {new[key]!r}" for key in RUN_KEYS
                     if old.get(key) != new[key])


def _finished_config(path: Path) -> dict | None:
    try:
        config = json.loads((path / "run.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _completed_epochs(work: Path) -> int:
    if not (work / "last.pt").is_file():
        return 0
    try:
        return int(safe_torch_load(work / "last.pt")["epoch"])
    except (ValueError, KeyError, TypeError):
        return 0  # fit() reports the unreadable checkpoint


def _check_finite_weights(model: torch.nn.Module, lr: float) -> None:
    bad = [key for key, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(f"training diverged: {len(bad)} weight tensor(s) hold NaN or inf (first: "
                         f"{bad[0]}); lower the learning rate (lr={lr:g}).")


def _prepare_work(out: Path, work: Path, config: dict, *, overwrite: bool, restart: bool,
                  command: str | None) -> None:
    if os.path.lexists(work):
        marker = read_marker(work) if not work.is_symlink() else None
        if marker is None or marker.get("kind") != "train-work":
            raise ValueError(f"{work} exists but modaldiag did not create it, so it was not "
                             f"touched; move it away to train into {out}.")
        differs = _differences(marker.get("config") or {}, config)
        if restart or (differs and overwrite):
            discard_folder(work)
        elif differs:
            raise ValueError(f"an interrupted run with a different command is waiting to be resumed "
                             f"in {out} (what differs: {differs}); refusing to mix them. Re-run "
                             "its command to finish it, pass --restart to discard its checkpoints, "
                             "or choose another --out.")
    if not work.exists():  # marked before it gets its name: a crash leaves a stale .partial
        fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=".partial",
                                      dir=out.parent))
        write_marker(fresh, "train-work", command=command, config=config)
        os.rename(fresh, work)


def train_run(data, method: str, epochs: int, out, *, seed: int = 0, fusion: str = "concat",
              batch_size: int = 64, lr: float = 0.01, device=None, progress: bool = True,
              name: str | None = None, overwrite: bool = False, restart: bool = False,
              command: str | None = None, log: Callable[[str], None] | None = None) -> Run:
    """Train one run into ``out``, checkpointing every epoch; the same call resumes.

    Parameters
    ----------
    data : DatasetSplits
        ``datasets.load(name)``.
    method : str
        One of :data:`METHODS`.
    epochs : int
    out : path
        The run folder, checked before any work
        (:func:`~modaldiag.utils.io.check_output_dir`): a foreign non-empty folder, ``.``, the
        home folder... are refused and never touched.
    seed, fusion, batch_size, lr, device, progress, name
        As on the command line; ``name`` labels the run in reports.
    overwrite : bool, default False
        Replace a modaldiag folder at ``out`` (a finished run of another configuration, or train
        a finished run of the same configuration again).
    restart : bool, default False
        Discard the checkpoints of an interrupted run and train from epoch 0 (a finished run is
        trained again and replaced).
    command : str, optional
        Recorded in the ``.modaldiag`` markers.
    log : callable(str), optional
        Receives notes such as ``"resuming from epoch k of N"``.

    Under an exclusive lock held for the whole job (a second process writing ``out`` gets a
    ValueError naming this one's pid):

    * ``out`` missing or empty: trained from scratch, or resumed bit-exactly from the checkpoints
      that an interrupted run of the same configuration (:data:`RUN_KEYS`) left in
      :func:`work_dir`;
    * ``out`` holds a finished run of the same configuration: returned as it is
      (``status == "already complete"``) unless ``overwrite``/``restart``;
    * another configuration (finished, or interrupted checkpoints): ValueError naming what
      differs, unless ``overwrite``/``restart``;
    * training that fails (non-finite loss or weights): ValueError; its checkpoints are removed
      and nothing is written at ``out``.

    Returns
    -------
    Run
        ``run.status`` is ``"trained"``, ``"resumed"`` or ``"already complete"``;
        ``run.resumed_from`` the epochs that were already done.
    """
    validate_params(_TRAIN_CONSTRAINTS, {"method": method, "epochs": epochs, "seed": seed,
                                         "fusion": fusion, "batch_size": batch_size, "lr": lr,
                                         "progress": progress, "overwrite": overwrite,
                                         "restart": restart, "name": name, "command": command},
                    "train_run")
    say = log or (lambda text: None)
    config = {"dataset": data.name, "method": method, "epochs": epochs, "seed": seed,
              "fusion": fusion, "batch_size": batch_size, "lr": float(lr)}
    out = check_output_dir(out, existing_ok=True, option="out")
    work = work_dir(out)
    with DirectoryLock(out):
        recover(out)
        out = check_output_dir(out, existing_ok=True, option="out")
        marker = read_marker(out) if folder_state(out) == "modaldiag" else None
        if marker is not None and not (overwrite or restart):
            done = _finished_config(out) if marker["kind"] == "run" else None
            if done is None:
                raise ValueError(f"{out} already holds a modaldiag {marker['kind']}; pass "
                                 "--overwrite to replace it, or choose another --out.")
            differs = _differences(done, config)
            if differs:
                raise ValueError(f"{out} holds a finished run of a different command (what "
                                 f"differs: {differs}); refusing to mix them. Choose another "
                                 "--out, or pass --overwrite to replace it.")
            if (read_marker(work) or {}).get("config") == config:
                discard_folder(work)
            say(f"{out} is already complete: it holds this finished run ({epochs} epochs); "
                "nothing was retrained (pass --restart to train it again).")
            run = load_run(out)
            run.status = "already complete"
            return run
        _prepare_work(out, work, config, overwrite=overwrite, restart=restart, command=command)
        resumed_from = _completed_epochs(work)
        if resumed_from:
            say(f"resuming from epoch {resumed_from} of {epochs} (checkpoints in {work})")
        regulator = make_regulator(method, epochs)
        try:
            torch.manual_seed(seed)
            model = default_model(data, fusion=fusion)
            history = fit(model, data.train.loader(batch_size, shuffle=True),
                          data.val.loader(512), epochs=epochs, regulator=regulator, seed=seed,
                          lr=lr, device=device, progress=progress, checkpoint_dir=work,
                          resume=True)
            _check_finite_weights(model, lr)
        except ValueError as exc:
            discard_folder(work)
            raise ValueError(f"{exc} Nothing was saved to {out} and the run's checkpoints were "
                             "removed.") from None
        test = evaluate(model, data.test.loader(512))
        history.meta.update({"dataset": data.name, "method": method, "test": test.to_dict()})
        record = {"name": name or METHOD_LABELS[method], **config, "feature_dim": 64,
                  "split_seed": 0, "regulator": repr(regulator), "test_acc": test.accuracy,
                  "test_unimodal_acc": {m: s.accuracy for m, s in test.unimodal.items()},
                  "best_epoch": history.best_epoch}
        with atomic_directory(out, kind="run", command=command, overwrite=True) as tmp:
            atomic_write_json(tmp / "run.json", record)
            history.save(tmp / "history.json")
            torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}},
                       tmp / "model.pt")
            save_figure(unimodal_accuracy(history), tmp / "unimodal_accuracy")
            save_figure(learning_window(history), tmp / "learning_window")
        discard_folder(work)
    run = load_run(out)
    run.status, run.resumed_from = ("resumed" if resumed_from else "trained"), resumed_from
    return run
