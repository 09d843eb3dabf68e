"""R18: Greedy (Wu, Jastrzębski, Cho, Geras, ICML 2022) — balanced multimodal learning by
re-balancing the conditional learning speeds of the branches of a mid-fusion network.

Needs a model with mid fusion that exposes the X6 protocol (``main_params``, ``bypass_params``,
``rebalance``, ``branch_logits``): :class:`~modaldiag.models.midfusion.MidFusionClassifier`. A
late-fusion model (``md.MultimodalClassifier``: concat, sum, late, ...) is refused with a
ValueError — it has no cross-modal connections inside the network to re-balance. The other
diagnostic of the paper, the conditional utilisation rate, works for any model
(``md.probes.conditional_utilization``).

Loss (replaces ``CE(z)`` under the key ``"multimodal"``): ``L = sum_m CE(z_m)``, ``z_m`` the
logits of branch m's classifier; the prediction is ``z = (1/M) sum_m z_m``, the model's head.

Per optimizer step (the gradients read at ``on_before_optimizer_step``, see
:mod:`modaldiag.training.speed`)::

    regular step:        A^byp_m += mu(psi_m);  A^main_m += mu(phi_m)
                         BDR_m = log10(A^byp_m / A^main_m)
                         if epoch >= warmup and max_m BDR_m - min_m BDR_m > epsilon:
                             the next Q steps re-balance m_c = argmax_m BDR_m
    re-balancing step:   runs its forward inside model.rebalance(m_c); nothing is accumulated

``mu(theta) = sum_t ||grad theta_t||^2 / sum_t ||theta_t||^2``. At M = 2, ``m_c = 0`` iff
``d_speed = BDR_0 - BDR_1 > 0`` (the authors' ``caring_modality``). ``mode="random"`` (the
authors' ``Bias_Mitigation_Random``): after the warm-up, every step draws the next step's mode
uniformly among "none" and the M modalities (a seeded generator, identical on every DDP rank).

Defaults (the authors' ``training_guided.gin``): ``epsilon = 0.01``, ``Q = 5``, warm-up 2 epochs
(their ``starting_epoch = 2`` counts epochs from 1, so their run had ONE warm-up epoch: pass
``warmup=1`` to match it). ``variant="bb"``: BalanceBenchmark's hyperparameters (its
``alpha = 0.001`` as ``epsilon``, ``Q = 5``, no warm-up); BB's Greedy trainer itself does not run
(its MMTM resets the running-mean dict at every forward and then reads it: KeyError, static
reading), so only its numbers are offered. BB also calls an undefined
``model.Unimodality_Calculate()``.

DDP: the ``mu`` sums are averaged over ranks before they are accumulated, so ``BDR`` and every
decision are the same on every rank (DDP's averaged gradients make them equal anyway).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.midfusion import MID_FUSION_PROTOCOL
from ..training.speed import ConditionalSpeedMonitor, bdr, check_mid_fusion, speed_gap
from ..utils.validation import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, Options, as_plain_int
from .base import SEED, EpochMeans, Regulator

__all__ = ["Greedy", "rebalance_decision", "bdr", "speed_gap"]


def rebalance_decision(bdr_values, epsilon: float, steps: int):
    """``(m_c, Q)``: re-balance ``m_c = argmax_m BDR_m`` for ``Q = steps`` steps when
    ``max BDR - min BDR > epsilon``, else ``(None, 0)`` (also when any BDR is NaN).

    ``bdr_values``: a dict (``m_c`` is a key) or a sequence (``m_c`` is an index). Ties go to the
    first modality (only possible when the spread is 0, i.e. no decision)."""
    keys = list(bdr_values) if isinstance(bdr_values, dict) else list(range(len(bdr_values)))
    vals = [float(bdr_values[k]) for k in keys]
    if not vals or any(math.isnan(v) for v in vals) or max(vals) - min(vals) <= epsilon:
        return None, 0
    return keys[vals.index(max(vals))], int(steps)


class Greedy(Regulator):
    """Greedy regulator: conditional learning speeds and re-balancing steps (mid fusion only).

    Parameters
    ----------
    epsilon : float >= 0, optional
        Threshold on ``max BDR - min BDR``. Default 0.01 (authors), 0.001 (``variant="bb"``).
    steps : int >= 1, default 5
        ``Q``: re-balancing steps per decision (authors' ``curation_windowsize``; BB 5).
    warmup : int >= 0, optional
        Epochs ``[0, warmup)`` only accumulate. Default 2 (the spec; the authors' run had 1, see
        the module notes), 0 for ``variant="bb"``.
    mode : {"guided", "random"}, default "guided"
        "random": after the warm-up, each step picks the next step's re-balanced modality (or
        none) uniformly.
    seed : int >= 0, default 0
        Seed of the random mode's generator.
    variant : {"paper", "bb"}, default "paper"
        "bb": BalanceBenchmark's ``epsilon`` and warm-up as defaults.
    """

    _parameter_constraints = {"epsilon": [NON_NEGATIVE, None], "steps": [POSITIVE_INT],
                              "warmup": [NON_NEGATIVE_INT, None],
                              "mode": [Options("guided", "random")], "seed": [SEED],
                              "variant": [Options("paper", "bb")]}

    def __init__(self, epsilon: float | None = None, steps: int = 5, *, warmup: int | None = None,
                 mode: str = "guided", seed: int = 0, variant: str = "paper"):
        steps, warmup, seed = (as_plain_int(v) for v in (steps, warmup, seed))
        self._validate(epsilon=epsilon, steps=steps, warmup=warmup, mode=mode, seed=seed,
                       variant=variant)
        bb = variant == "bb"
        self.epsilon = float(epsilon if epsilon is not None else (0.001 if bb else 0.01))
        self.steps = int(steps)
        self.warmup = int(warmup if warmup is not None else (0 if bb else 2))
        self.mode, self.seed, self.variant = mode, int(seed), variant
        super().__init__()

    def config(self) -> dict:
        return {"epsilon": self.epsilon, "steps": self.steps, "warmup": self.warmup,
                "mode": self.mode, "seed": self.seed, "variant": self.variant}

    def reset(self) -> None:
        """Forget the accumulators, the pending re-balancing steps and the generator's draws."""
        super().reset()
        self.speed = ConditionalSpeedMonitor()
        self.pending: str | None = None  # modality the next `remaining` steps re-balance
        self.remaining = 0
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_bdr: dict[str, float] = {}
        self._current: str | None = None  # modality the running step re-balances
        self._context = None
        self._epoch = 0
        self._rebalanced: dict[str, int] = {}
        self._means = EpochMeans()

    @staticmethod
    def check_model(model) -> None:
        """Raise a ValueError unless ``model`` has mid fusion with the X6 protocol."""
        check_mid_fusion(model, MID_FUSION_PROTOCOL, "Greedy")

    def on_fit_start(self, ctx) -> None:
        self.check_model(ctx.model)
        super().on_fit_start(ctx)

    # ------------------------------------------------------------------ step
    def on_train_epoch_start(self, ctx) -> None:
        self._leave()
        self._epoch = ctx.epoch
        self._rebalanced = {m: 0 for m in ctx.model.modalities}

    def on_train_batch_start(self, ctx) -> None:
        self._leave()
        self._current = self.pending if self.remaining > 0 else None
        if self._current is not None:
            self._context = ctx.model.rebalance(self._current)
            self._context.__enter__()

    def _leave(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def on_after_forward(self, ctx) -> None:
        branch = ctx.model.branch_logits(ctx.features)
        ces = {m: F.cross_entropy(z, ctx.labels) for m, z in branch.items()}
        ctx.losses["multimodal"] = sum(ces.values())
        batch = ctx.labels.shape[0]
        for m, ce in ces.items():
            self._means.add("branch_ce", m, float(ce.detach()) * batch, batch)

    def on_before_optimizer_step(self, ctx) -> None:
        model = ctx.model
        mods = model.modalities
        current = self._current
        if current is not None:  # a re-balancing step: counted, not accumulated
            self._rebalanced[current] = self._rebalanced.get(current, 0) + 1
            self.remaining -= 1
            if self.remaining <= 0:
                self.pending, self.remaining = None, 0
        else:
            self.last_bdr = self.speed.accumulate(model)
        self.record("rebalanced", {m: float(current == m) for m in mods})
        if self._epoch < self.warmup:
            return
        if self.mode == "random":
            k = int(torch.randint(len(mods) + 1, (1,), generator=self.generator))
            self.pending, self.remaining = (None, 0) if k == 0 else (mods[k - 1], 1)
        elif current is None:
            target, q = rebalance_decision(self.last_bdr, self.epsilon, self.steps)
            if target is not None:
                self.pending, self.remaining = target, q

    def on_train_batch_end(self, ctx) -> None:
        self._leave()

    def on_train_epoch_end(self, ctx) -> None:
        self._leave()
        mods = ctx.model.modalities
        values = self.speed.bdr() if self.speed.a_main else {m: math.nan for m in mods}
        self.record_epoch("bdr", values)
        self.record_epoch("d_speed", speed_gap(values))
        self.record_epoch("rebalance_steps", {m: self._rebalanced.get(m, 0) for m in mods})
        self.record_epoch("rebalance_steps_total", sum(self._rebalanced.values()))
        self.record_epoch("pending", {"modality": self.pending or "", "steps": self.remaining})
        self.record_epoch("active", float(self._epoch >= self.warmup))
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, vals in self._means.reduce(device).items():
            self.record_epoch(key, vals)

    def on_fit_end(self, ctx) -> None:
        self._leave()
        super().on_fit_end(ctx)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"speed": self.speed.state_dict(), "pending": self.pending,
                "remaining": self.remaining, "generator": self.generator.get_state(),
                "last_bdr": dict(self.last_bdr)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the accumulators, pending steps and generator (the next ``on_fit_start``
        keeps them)."""
        state = state or {}
        super().load_state_dict(state)
        if not state:
            return
        self.speed.load_state_dict(state["speed"])
        self.pending, self.remaining = state["pending"], int(state["remaining"])
        self.generator.set_state(state["generator"])
        self.last_bdr = {m: float(v) for m, v in state.get("last_bdr", {}).items()}
