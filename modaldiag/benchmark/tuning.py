"""Fair hyper-parameter tuning: the same trial budget for every method, on validation only.

For every (method, dataset) an Optuna study (TPE sampler seeded with :data:`SAMPLER_SEED`) runs
``trials`` trials. A trial trains the benchmark's model under the shared budget (epochs,
optimizer, batch size, encoders) with training seed :data:`~.cells.TUNE_SEED` and the sampled
parameters, and scores the validation accuracy of the selected epoch (``md.fit`` with
``restore_best``). The test split is never read: its loader is not even built. The best
parameters are then used for every evaluation seed.

:data:`SEARCH_SPACES` declares each method's space: ``{param: (low, high, log)}``; ``lr`` is the
optimizer's learning rate (every method tunes it, so no method gets a larger space for free on
the shared dimension), the other names are constructor arguments of the method's regulator.
Integer bounds give an integer parameter. A method without an entry tunes ``lr`` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .cells import TUNE_SEED, CellTask, torch_threads, train_selected

__all__ = ["SEARCH_SPACES", "LR_SPACE", "SAMPLER_SEED", "search_space", "require_optuna",
           "run_tuning"]

#: every method's learning-rate range (SGD, momentum 0.9)
LR_SPACE = (1e-3, 1e-1, True)
#: the sampler's seed (TPE): the same sequence of proposals on every run
SAMPLER_SEED = 0

#: method -> {parameter: (low, high, log scale)}; "lr" is the optimizer's learning rate
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "joint": {"lr": LR_SPACE},
    "inforeg": {"lr": LR_SPACE, "beta": (0.5, 0.99, False), "K": (0.01, 0.2, True)},
    "inforeg-star": {"lr": LR_SPACE, "beta": (0.5, 0.99, False), "K": (0.01, 0.2, True)},
    "relearning": {"lr": LR_SPACE, "lam": (0.5, 10.0, True)},
    "ogm": {"lr": LR_SPACE, "alpha": (0.1, 2.0, True)},
    "ogm-ge": {"lr": LR_SPACE, "alpha": (0.1, 2.0, True)},
    "opm": {"lr": LR_SPACE, "q_base": (0.2, 0.8, False), "lam": (0.1, 1.0, False)},
    "mmpareto": {"lr": LR_SPACE, "gamma": (1.0, 3.0, False)},
    "valuation": {"lr": LR_SPACE, "alpha": (0.5, 2.0, False)},
    "valuation-modality": {"lr": LR_SPACE, "alpha": (0.5, 2.0, False)},
    "agm": {"lr": LR_SPACE, "alpha": (0.1, 2.0, True)},
    "pmr": {"lr": LR_SPACE, "alpha": (0.1, 2.0, True)},
    "mmcosine": {"lr": LR_SPACE},
    "mbsd": {"lr": LR_SPACE},
    "cml": {"lr": LR_SPACE, "lam": (0.01, 1.0, True)},
    "lfm": {"lr": LR_SPACE, "alpha_init": (0.05, 0.5, True)},
    "gblending": {"lr": LR_SPACE},
    "amco": {"lr": LR_SPACE, "sigma": (0.1, 0.9, False)},
    "mla": {"lr": LR_SPACE},
    "umt": {"lr": LR_SPACE, "weight": (1.0, 20.0, True)},
    "ume": {"lr": LR_SPACE},
    "reconboost": {"lr": LR_SPACE, "alpha": (0.1, 1.0, False)},
    "greedy": {"lr": LR_SPACE, "epsilon": (1e-3, 1e-1, True)},
    "dropout": {"lr": LR_SPACE, "p": (0.1, 0.5, False)},
}


def search_space(method: str) -> dict[str, tuple]:
    """The declared space of ``method`` (``{"lr": LR_SPACE}`` when it has no entry)."""
    space = dict(SEARCH_SPACES.get(method, {"lr": LR_SPACE}))
    space.setdefault("lr", LR_SPACE)
    return space


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("tune_trials > 0 needs Optuna, which is not installed; install it with "
                          "`pip install modaldiag[tune]` (or `pip install optuna`).") from None
    return optuna


def _suggest(trial, name: str, bounds: tuple):
    low, high, log = bounds
    if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
        return trial.suggest_int(name, low, high, log=bool(log))
    return trial.suggest_float(name, float(low), float(high), log=bool(log))


def run_tuning(task: CellTask) -> dict:
    """Run the study of ``task`` (a :class:`~.cells.CellTask` whose config has ``"tuning"``);
    returns ``{"best_params", "best_value", "trials": [...]}`` (values: validation accuracy)."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuning: Mapping = task.config["tuning"]
    space = {k: tuple(v) for k, v in tuning["space"].items()}
    sampler = optuna.samplers.TPESampler(seed=int(tuning["sampler_seed"]))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    trials = []

    def objective(trial):
        params = {name: _suggest(trial, name, bounds) for name, bounds in space.items()}
        trial_task = CellTask(task.method, TUNE_SEED, task.source, task.config, params,
                              task.model_fn, task.device, task.threads)
        try:
            _, _, history, seconds, _ = train_selected(trial_task)
        except ValueError as exc:  # a diverging setting: the worst score, recorded
            trials.append({"number": trial.number, "params": params, "value": None,
                           "error": str(exc).splitlines()[0]})
            return 0.0
        best = history.best_epoch
        value = max((float(r["val"]["acc"]) for r in history.epochs if "val" in r),
                    default=math.nan)
        trials.append({"number": trial.number, "params": params, "value": value,
                       "best_epoch": best, "train_time_s": seconds})
        return value

    with torch_threads(task.threads):
        study.optimize(objective, n_trials=int(tuning["trials"]))
    return {"format": "modaldiag.benchmark.tuning", "key": task.key,
            "dataset": task.source.name, "method": task.method, "config": task.config,
            "best_params": dict(study.best_params), "best_value": float(study.best_value),
            "objective": "validation accuracy of the selected epoch", "trials": trials}
