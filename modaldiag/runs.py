"""Training runs on disk: what ``modaldiag train`` writes and ``diagnose``/``compare`` read.

A run folder holds ``run.json`` (configuration and test scores), ``history.json``, ``model.pt``
(weights only; loads with ``torch.load(weights_only=True)``) and figures. It is written
atomically: a crash leaves no half-written run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import datasets
from .models import default_model
from .probes import evaluate
from .regulators import OGM, OPM, InfoReg, MMPareto, Relearning, ValuationResampling
from .report.plots import learning_window, save_figure, unimodal_accuracy
from .training import History, fit
from .utils.io import atomic_directory, atomic_write_json, safe_torch_load

__all__ = ["METHODS", "make_regulator", "train_run", "load_run", "Run"]

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

    def __init__(self, path: Path, config: dict, history: History):
        self.path, self.config, self.history = path, config, history

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


def train_run(data, method: str, epochs: int, out, *, seed: int = 0, fusion: str = "concat",
              batch_size: int = 64, lr: float = 0.01, device=None, progress: bool = True,
              name: str | None = None) -> Run:
    """Train one run and write it (atomically) into ``out``."""
    regulator = make_regulator(method, epochs)
    torch.manual_seed(seed)
    model = default_model(data, fusion=fusion)
    history = fit(model, data.train.loader(batch_size, shuffle=True), data.val.loader(512),
                  epochs=epochs, regulator=regulator, seed=seed, lr=lr, device=device,
                  progress=progress)
    test = evaluate(model, data.test.loader(512))
    history.meta.update({"dataset": data.name, "method": method, "test": test.to_dict()})
    config = {"name": name or METHOD_LABELS[method], "dataset": data.name, "method": method,
              "epochs": epochs, "seed": seed, "fusion": fusion, "batch_size": batch_size, "lr": lr,
              "feature_dim": 64, "split_seed": 0, "regulator": repr(regulator),
              "test_acc": test.accuracy,
              "test_unimodal_acc": {m: s.accuracy for m, s in test.unimodal.items()},
              "best_epoch": history.best_epoch}
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "run.json", config)
        history.save(tmp / "history.json")
        torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}},
                   tmp / "model.pt")
        save_figure(unimodal_accuracy(history), tmp / "unimodal_accuracy")
        save_figure(learning_window(history), tmp / "learning_window")
    return load_run(out)
