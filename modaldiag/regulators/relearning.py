"""R2: Diagnosing & Re-learning (ECCV 2024) — soft re-initialisation by learning state.

At the start of training the initial encoder weights are kept (in the regulator's state, not a
file). Every ``every`` epochs (after epochs H, 2H, ..., at most ``max_resets`` times) the
separability probe (P3) measures each modality's learning-state gap ``g_m`` on the training
loader vs the validation loader; then ``alpha_m = tanh(lam * g_m)`` and every learnable encoder
parameter moves to ``(1 - alpha_m) * theta_m + alpha_m * theta_init_m``. The head, BatchNorm
running statistics and optimizer state are left alone unless ``reset_bn`` / ``reset_optimizer``.

M > 2: each modality is re-initialised by its own amount; nothing is pairwise.

Schedule (``schedule``): the paper form (``"paper"``) re-initialises after H, 2H, ... completed
epochs, i.e. at the end of 0-based epochs H-1, 2H-1, ...; the authors' released code tests
``epoch % H == 0 and epoch > 0`` on the 0-based epoch index *after* training that epoch, i.e. at the
end of 0-based epochs H, 2H, ... (20/40/60 for H = 20) — ``schedule="released"``, set by
``variant="released"``.
"""

from __future__ import annotations

import math

import torch

from ..probes.separability import separability
from ..utils.validation import (
    BOOL,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Options,
    Satisfies,
    as_plain_int,
)
from .base import SEED, Regulator, encoder_parameters

__all__ = ["Relearning"]


class Relearning(Regulator):
    """Diagnosing & Re-learning regulator.

    Parameters
    ----------
    lam : float > 0, default 3.0
        ``alpha_m = tanh(lam * gap_m)`` (the paper uses 7 for Kinetics-Sounds, 8 for MOSI).
    every : int >= 1, default 20
        H: re-initialise after every H epochs.
    max_resets : int >= 0, default 3
        R: at most this many re-initialisations.
    val_loader : iterable, optional
        Held-out data for the gap; default: the validation loader given to ``fit``. Carve it from
        the training data; never use the test set.
    reset_bn : bool, default False
        Also move BatchNorm running statistics of the encoders towards their initial values.
    reset_optimizer : bool, default False
        Also drop the optimizer state (e.g. momentum) of the re-initialised parameters.
    seed : int >= 0, default 0
        k-means seed of the separability probe.
    variant : {"paper", "released"}, default "paper"
        ``"released"`` sets ``schedule="released"`` unless ``schedule`` is given explicitly.
    schedule : {None, "paper", "released"}, default None
        ``"paper"``: re-initialise at the end of 0-based epochs H-1, 2H-1, ...; ``"released"``:
        at the end of 0-based epochs H, 2H, ... (the authors' code). None: from ``variant``.

    The initial weights, the reset count and the reset history are run state: every fresh run
    (``on_fit_start``) remembers *its* model's initial weights and starts counting from zero;
    ``load_state_dict`` (resume) keeps the restored ones.
    """

    _parameter_constraints = {
        "lam": [POSITIVE], "every": [POSITIVE_INT], "max_resets": [NON_NEGATIVE_INT],
        "val_loader": [None, Satisfies(lambda v: hasattr(v, "__iter__") and not isinstance(v, str),
                                       "an iterable of (inputs, labels) batches")],
        "reset_bn": [BOOL], "reset_optimizer": [BOOL], "seed": [SEED],
        "variant": [Options("paper", "released")], "schedule": [None, Options("paper", "released")],
    }

    def __init__(self, lam: float = 3.0, every: int = 20, max_resets: int = 3, *,
                 val_loader=None, reset_bn: bool = False, reset_optimizer: bool = False,
                 seed: int = 0, variant: str = "paper", schedule: str | None = None):
        every, max_resets, seed = (as_plain_int(v) for v in (every, max_resets, seed))
        self._validate(lam=lam, every=every, max_resets=max_resets, val_loader=val_loader,
                       reset_bn=reset_bn, reset_optimizer=reset_optimizer, seed=seed,
                       variant=variant, schedule=schedule)
        super().__init__()
        self.lam, self.every, self.max_resets = float(lam), every, max_resets
        self.val_loader, self.reset_bn, self.reset_optimizer = val_loader, reset_bn, reset_optimizer
        self.seed = seed
        self.variant = variant
        self.schedule = schedule if schedule is not None else variant

    def reset(self) -> None:
        """Forget the initial weights, the reset count and the history (a fresh run)."""
        super().reset()
        self.init_params: dict[str, list[torch.Tensor]] = {}
        self.init_buffers: dict[str, dict[str, torch.Tensor]] = {}
        self.resets = 0
        self.history: list[dict] = []

    def config(self) -> dict:
        return {"lam": self.lam, "every": self.every, "max_resets": self.max_resets,
                "reset_bn": self.reset_bn, "reset_optimizer": self.reset_optimizer,
                "variant": self.variant, "schedule": self.schedule}

    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        if not self.init_params:
            self.remember_init(ctx.model)

    def remember_init(self, model) -> None:
        """Keep a copy of the encoders' current (initial) parameters and BN statistics."""
        self.init_params = {m: [p.detach().clone() for p in encoder_parameters(model, m)]
                            for m in model.modalities}
        self.init_buffers = {m: {n: b.detach().clone() for n, b in model.encoders[m].named_buffers()}
                             for m in model.modalities}

    def alphas(self, gaps: dict[str, float]) -> dict[str, float]:
        return {m: math.tanh(self.lam * g) for m, g in gaps.items()}

    @torch.no_grad()
    def reinitialise(self, model, alphas: dict[str, float], optimizer=None) -> None:
        """``theta_m <- (1 - alpha_m) * theta_m + alpha_m * theta_init_m`` for each modality."""
        for m, a in alphas.items():
            params = encoder_parameters(model, m)
            for p, p0 in zip(params, self.init_params[m], strict=True):
                p.mul_(1 - a).add_(p0.to(p.device), alpha=a)
            if self.reset_bn:
                for name, buf in model.encoders[m].named_buffers():
                    init = self.init_buffers[m].get(name)
                    if init is None:
                        continue
                    if buf.is_floating_point():
                        buf.mul_(1 - a).add_(init.to(buf.device), alpha=a)
                    else:
                        buf.copy_(init)
            if self.reset_optimizer and optimizer is not None:
                for p in params:
                    optimizer.state.pop(p, None)

    def is_reset_epoch(self, epoch: int) -> bool:
        """Whether the schedule re-initialises at the end of 0-based ``epoch`` (ignoring R)."""
        if self.schedule == "released":
            return epoch > 0 and epoch % self.every == 0
        return (epoch + 1) % self.every == 0

    def on_train_epoch_end(self, ctx) -> None:
        if not self.is_reset_epoch(ctx.epoch) or self.resets >= self.max_resets:
            return
        val = self.val_loader if self.val_loader is not None else ctx.val_loader
        if val is None:
            raise ValueError("Relearning needs held-out data: pass val_loader to md.fit or to "
                             "Relearning(val_loader=...) (carved from train, never the test set).")
        sep = separability(ctx.model, ctx.train_loader, val, seed=self.seed, linear_probe=False,
                           silhouette=False)
        gaps = {m: s.gap for m, s in sep.items()}
        alphas = self.alphas(gaps)
        self.reinitialise(ctx.model, alphas, ctx.optimizer)
        self.resets += 1
        self.history.append({"epoch": ctx.epoch, "gap": gaps, "alpha": alphas})
        self.record_epoch("gap", gaps)
        self.record_epoch("alpha", alphas)
        self.record_epoch("resets", self.resets)

    def state_dict(self) -> dict:
        return {"init_params": self.init_params, "init_buffers": self.init_buffers,
                "resets": self.resets, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.init_params = {m: list(v) for m, v in state["init_params"].items()}
        self.init_buffers = {m: dict(v) for m, v in state.get("init_buffers", {}).items()}
        self.resets = int(state["resets"])
        self.history = list(state.get("history", []))
        super().load_state_dict(state)
