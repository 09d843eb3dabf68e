"""R17: ReconBoost (Hua, Xu, Bao, Yang, Huang, ICML 2024) — alternating modality boosting with
reconcilement regularisation.

Learner m is encoder m with the model's head: ``z_m = h(f, present={m})`` (the other modalities at
their baseline). The ensemble is ``F = rho * sum_m z_m`` with ``rho`` a learnable scalar owned by
the regulator (registered with the optimizer as one extra parameter group and saved in
``state_dict``); ``F`` is also the test-time prediction (:meth:`ReconBoost.predict`, which
``md.fit`` validates with).

Training runs in stages of ``E_b + E_c`` epochs. Stage ``s`` trains modality ``m = order[s mod M]``
(the cyclic order is ``model.modalities``):

- phase 1 (``E_b`` epochs, "boost"): only encoder m and the head train, on ::

      q      = softmax(sg(rho * sum_{k != m} z_k))                 (the other learners' ensemble)
      L_boost = mean_i (1/C) (w1 - w2 q_{i,y_i}) CE_i(z_m)
              = -w1 mean_c y log p_m + w2 mean_c y q log p_m      (the released form)
      L      = L_boost + alpha * GA,   GA = MSE(softmax(z_m), softmax(z_prev))

  with ``prev = order[(s - 1) mod M]`` (no GA in stage 0). Both released codes detach both sides
  of GA, so it adds no gradient (``ga_grad=False``, the default); ``ga_grad=True`` lets the
  gradient through ``z_m`` (``z_prev`` stays detached), the paper's memory-consolidation intent
  **[unverified]**.
- phase 2 (``E_c`` epochs, "global rectification"): every parameter and ``rho`` train on
  ``CE(F)``.

Frozen parameters: the regulator runs the backward itself (``torch.autograd.grad`` over the
phase's trainable parameters only) and leaves ``.grad = None`` on every other parameter of the
model and of the optimizer. ``torch.optim`` optimizers (SGD, Adam, AdamW, RMSprop, Adagrad, ...)
skip a parameter whose ``.grad`` is None entirely — no weight decay, no momentum or moment update —
so a frozen parameter does not move even when its optimizer state holds momentum (a zero gradient
would still move it through momentum and weight decay). The caller's ``optimizer.step()`` is an
ordinary step; the regulator does not step the optimizer itself.

``reset_momentum`` (default on, as the authors rebuild ``SGD(lr 0.01, momentum 0.9, wd 5e-4)`` at
each phase): at the first epoch of each phase the optimizer state (momentum buffer, Adam moments
and step count) of that phase's trainable parameters is cleared, so each phase starts like a new
optimizer over its parameters.

DDP: a regulator that owns the backward runs its forward under ``no_sync``, so the gradients of the
phase's parameters — ``rho`` included, which lives outside the DDP module — are averaged over ranks
here (one flat all-reduce). Logged statistics are sums and counts all-reduced once per epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.validation import (
    BOOL,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Options,
    as_plain_int,
)
from .base import EpochMeans, Regulator, average_over_ranks, wide

__all__ = ["ReconBoost", "reconboost_boost_loss", "reconboost_ga", "reconboost_schedule"]

#: marks the optimizer parameter group that holds ReconBoost's boost rate rho
RHO_GROUP_KEY = "modaldiag_reconboost_rho"
#: loss keys of this regulator (the backward sums every term except the fused head's CE)
BOOST, GA, ENSEMBLE = "reconboost/boost", "reconboost/ga", "reconboost/ensemble"
#: the defaults of each variant for the arguments left as None
_VARIANT_DEFAULTS = {
    "paper": {"boost_epochs": 4, "rectify_epochs": 4, "rho_init": 1.0, "reset_momentum": True},
    "released": {"boost_epochs": 1, "rectify_epochs": 1, "rho_init": 0.01, "reset_momentum": False},
}


def _boost_terms(logits_m: torch.Tensor, ensemble_others: torch.Tensor, labels: torch.Tensor,
                 w1: float, w2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_boost, q_y)``: the boosting loss and the per-sample ensemble true-class probability."""
    logits_m = wide(logits_m)
    q_y = F.softmax(wide(ensemble_others.detach()), dim=1).gather(1, labels[:, None])[:, 0]
    ce = F.cross_entropy(logits_m, labels, reduction="none")
    loss = ((w1 - w2 * q_y) * ce).mean() / logits_m.shape[1]
    return loss, q_y


def reconboost_boost_loss(logits_m: torch.Tensor, ensemble_others: torch.Tensor,
                          labels: torch.Tensor, w1: float = 5.0, w2: float = 1.0) -> torch.Tensor:
    """ReconBoost's boosting loss of learner m.

    ``mean_i (1/C) (w1 - w2 q_{i,y_i}) CE_i(z_m)`` with ``q = softmax(sg(ensemble_others))``:
    ``logits_m`` is ``z_m`` ``(B, C)``, ``ensemble_others`` the other learners' ensemble logits
    ``rho * sum_{k != m} z_k`` ``(B, C)`` (no gradient flows into them), ``labels`` ``(B,)``.
    Equal to the released ``-w1 mean_c(y log p_m) + w2 mean_c(y q log p_m)`` averaged over the
    batch. R17: ``C = 2``, ``w1 = 5``, ``w2 = 1``, ``q_y = p_{m,y} = 0.5`` gives
    ``(1/2)(4.5) ln 2 = 1.5596``.
    """
    return _boost_terms(logits_m, ensemble_others, labels, w1, w2)[0]


def reconboost_ga(logits_m: torch.Tensor, logits_prev: torch.Tensor, *,
                  grad: bool = False) -> torch.Tensor:
    """``GA = MSE(softmax(z_m), softmax(z_prev))`` (mean over samples and classes).

    ``grad=False`` (both releases): both sides detached, so the term adds no gradient.
    ``grad=True``: the gradient flows through ``z_m``; ``z_prev`` stays detached."""
    p_m = F.softmax(wide(logits_m if grad else logits_m.detach()), dim=1)
    p_prev = F.softmax(wide(logits_prev.detach()), dim=1)
    return F.mse_loss(p_m, p_prev)


def reconboost_schedule(epoch: int, modalities, boost_epochs: int, rectify_epochs: int
                        ) -> dict:
    """Where epoch ``epoch`` falls in the stage schedule.

    Returns ``{"stage", "modality", "prev", "phase", "phase_start"}``: stage
    ``s = epoch // (E_b + E_c)``, ``modality = modalities[s mod M]``, ``prev =
    modalities[(s - 1) mod M]`` (None in stage 0), ``phase`` 1 for the first ``E_b`` epochs of a
    stage and 2 for the next ``E_c``, ``phase_start`` True at the first epoch of a phase."""
    mods = list(modalities)
    length = boost_epochs + rectify_epochs
    stage, within = divmod(int(epoch), length)
    phase = 1 if within < boost_epochs else 2
    return {"stage": stage, "modality": mods[stage % len(mods)],
            "prev": mods[(stage - 1) % len(mods)] if stage > 0 else None,
            "phase": phase, "phase_start": within in (0, boost_epochs)}


class ReconBoost(Regulator):
    """ReconBoost regulator: alternating per-modality boosting and global rectification.

    Parameters
    ----------
    boost_epochs : int >= 1, optional
        ``E_b``: phase-1 epochs per stage (only encoder m and the head train on the boosting
        loss). None: 4 (authors, CREMA-D) or 1 (``variant="released"``).
    rectify_epochs : int >= 0, optional
        ``E_c``: phase-2 epochs per stage (everything and ``rho`` train on ``CE(F)``); 0 skips the
        rectification (``rho`` then never trains). None: 4 (authors) or 1 (released).
    w1, w2 : float, default 5.0 and 1.0
        Weights of the boosting loss ``(1/C)(w1 - w2 q_y) CE``; ``w1 > 0``, ``0 <= w2 <= w1`` (so
        every sample's weight is >= 0). The authors use ``w1 = 4`` on AVE / ModelNet40.
    alpha : float >= 0, default 0.5
        Weight of the GA term (from stage 1 on; released: from stage M on).
    rho_init : float > 0, optional
        Initial boost rate ``rho``. None: 1.0 (authors' ``boost_rate``) or 0.01 (released).
    ga_grad : bool, default False
        False: GA detached on both sides as in both releases (logged, no gradient). True:
        gradient through ``z_m`` **[unverified]** (the paper's memory-consolidation intent).
    reset_momentum : bool, optional
        Clear the optimizer state of the phase's trainable parameters at the first epoch of every
        phase (the authors rebuild SGD each phase). None: True (paper) or False (released: one
        optimizer for the whole run).
    variant : {"paper", "released"}, default "paper"
        ``"released"``: BalanceBenchmark's ReconBoost trainer, where one BB epoch runs all M
        stages with ``E_b = E_c = 1`` (here: 2M epochs of this run per BB epoch), ``rho_0 = 0.01``,
        one optimizer (no momentum reset) and no GA during the whole first BB epoch (stages
        ``0 .. M-1``). Arguments given explicitly override the variant's defaults.

    Owns the backward pass (not combinable with another regulator that does).
    ``md.fit`` validates with :meth:`predict`; report with
    ``md.probes.evaluate(model, loader, predict=lambda f: rb.predict(model, f))``.
    """

    needs_unimodal_logits = True
    owned_group_key = RHO_GROUP_KEY
    _parameter_constraints = {
        "boost_epochs": [None, POSITIVE_INT],
        "rectify_epochs": [None, NON_NEGATIVE_INT],
        "w1": [POSITIVE],
        "w2": [NON_NEGATIVE],
        "alpha": [NON_NEGATIVE],
        "rho_init": [None, POSITIVE],
        "ga_grad": [BOOL],
        "reset_momentum": [None, BOOL],
        "variant": [Options("paper", "released")],
    }

    def __init__(self, boost_epochs: int | None = None, rectify_epochs: int | None = None, *,
                 w1: float = 5.0, w2: float = 1.0, alpha: float = 0.5,
                 rho_init: float | None = None, ga_grad: bool = False,
                 reset_momentum: bool | None = None, variant: str = "paper"):
        boost_epochs, rectify_epochs = as_plain_int(boost_epochs), as_plain_int(rectify_epochs)
        self._validate(boost_epochs=boost_epochs, rectify_epochs=rectify_epochs, w1=w1, w2=w2,
                       alpha=alpha, rho_init=rho_init, ga_grad=ga_grad,
                       reset_momentum=reset_momentum, variant=variant)
        if float(w2) > float(w1):
            raise ValueError(f"ReconBoost: w2 must not exceed w1 (the boosting weight "
                             f"w1 - w2 q_y must stay >= 0 for every q_y in [0, 1]); got w1={w1}, "
                             f"w2={w2}. The authors use w1 = 5 (CREMA-D) or 4 (AVE), w2 = 1.")
        given = {"boost_epochs": boost_epochs, "rectify_epochs": rectify_epochs,
                 "rho_init": rho_init, "reset_momentum": reset_momentum}
        resolved = {k: (v if v is not None else _VARIANT_DEFAULTS[variant][k])
                    for k, v in given.items()}
        self.variant = variant
        self.boost_epochs = int(resolved["boost_epochs"])
        self.rectify_epochs = int(resolved["rectify_epochs"])
        self.rho_init = float(resolved["rho_init"])
        self.reset_momentum = bool(resolved["reset_momentum"])
        self.w1, self.w2, self.alpha = float(w1), float(w2), float(alpha)
        self.ga_grad = bool(ga_grad)
        super().__init__()

    def config(self) -> dict:
        return {"boost_epochs": self.boost_epochs, "rectify_epochs": self.rectify_epochs,
                "w1": self.w1, "w2": self.w2, "alpha": self.alpha, "rho_init": self.rho_init,
                "ga_grad": self.ga_grad, "reset_momentum": self.reset_momentum,
                "variant": self.variant}

    def reset(self) -> None:
        """Forget rho and the schedule position (a fresh run starts at stage 0 with ``rho_init``)."""
        super().reset()
        self.rho: nn.Parameter | None = None
        self.epoch: int | None = None
        self.stage: int | None = None
        self.phase: int | None = None
        self.modality: str | None = None
        self.prev: str | None = None
        self._means = EpochMeans()

    # ------------------------------------------------------------ rho (regulator-owned)
    def owned_parameters(self) -> list[nn.Parameter]:
        """``[rho]`` once created (at the start of a run or by :meth:`load_state_dict`)."""
        return [self.rho] if self.rho is not None else []

    def _create_rho(self, model) -> None:
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        self.rho = nn.Parameter(torch.tensor(self.rho_init, device=device, dtype=dtype))

    def _ga_start(self, m_count: int) -> int:
        """First stage with a GA term: 1 (authors), M (released: not in the first BB epoch)."""
        return m_count if self.variant == "released" else 1

    def schedule(self, epoch: int, modalities) -> dict:
        """:func:`reconboost_schedule` with this regulator's ``E_b``, ``E_c``."""
        return reconboost_schedule(epoch, modalities, self.boost_epochs, self.rectify_epochs)

    def trainable(self, model) -> list[nn.Parameter]:
        """The current phase's trainable parameters: encoder m and the head (phase 1), or every
        trainable model parameter and ``rho`` (phase 2)."""
        groups = self.groups(model)
        if self.phase == 1:
            return list(groups[self.modality]) + list(self.head_parameters(model))
        params = [p for m in model.modalities for p in groups[m]] + list(self.head_parameters(model))
        return params + self.owned_parameters()

    # ------------------------------------------------------------ run hooks
    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        if self.rho is None:
            self._create_rho(ctx.model)
        self.register_parameters(ctx.optimizer)

    def on_train_epoch_start(self, ctx) -> None:
        model = ctx.model
        self._means = EpochMeans()
        if self.rho is None:  # a plain loop whose start() ran before the model had parameters
            self._create_rho(model)
            self.register_parameters(ctx.optimizer)
        where = self.schedule(ctx.epoch, model.modalities)
        self.epoch, self.stage, self.phase = int(ctx.epoch), where["stage"], where["phase"]
        self.modality, self.prev = where["modality"], where["prev"]
        if self.reset_momentum and where["phase_start"] and ctx.optimizer is not None:
            for p in self.trainable(model):
                ctx.optimizer.state.pop(p, None)
        self.record_epoch("stage", self.stage)
        self.record_epoch("phase", self.phase)
        self.record_epoch("modality", self.modality)

    def _ga_active(self, model) -> bool:
        return self.prev is not None and self.stage >= self._ga_start(len(model.modalities))

    def on_after_forward(self, ctx) -> None:
        if self.phase is None:
            raise RuntimeError("ReconBoost: no stage yet; every epoch must start with "
                               "run.epoch_start (it sets the stage and phase).")
        model, labels = ctx.model, ctx.labels
        uni = ctx.compute_unimodal_logits()
        z = {m: wide(uni[m]) for m in model.modalities}
        rho = self.rho
        batch = labels.shape[0]
        means = self._means
        if self.phase == 1:
            m = self.modality
            others = sum(z[k].detach() for k in model.modalities if k != m)
            boost, q_y = _boost_terms(z[m], rho.detach() * others, labels, self.w1, self.w2)
            ctx.losses[BOOST] = boost
            means.add("boost_loss", m, float(boost.detach()) * batch, batch)
            means.add("q_y", m, float(q_y.sum()), batch)
            if self._ga_active(model):
                ga = reconboost_ga(z[m], z[self.prev], grad=self.ga_grad)
                ctx.losses[GA] = self.alpha * ga
                means.add("ga", m, float(ga.detach()) * batch, batch)
            ensemble = rho.detach() * sum(v.detach() for v in z.values())
        else:
            ensemble = rho * sum(z.values())
            ctx.losses[ENSEMBLE] = F.cross_entropy(ensemble, labels)
        with torch.no_grad():
            ce = F.cross_entropy(ensemble.detach(), labels, reduction="sum")
            correct = (ensemble.detach().argmax(1) == labels).sum()
        means.add("ensemble_ce", "train", float(ce), batch)
        means.add("ensemble_acc", "train", float(correct), batch)

    def backward(self, ctx) -> bool:
        """Gradients of the step's terms (every term except the fused head's cross-entropy) for
        the phase's trainable parameters, averaged over DDP ranks and added to ``.grad``;
        ``.grad = None`` on every other parameter of the model and the optimizer."""
        model = ctx.model
        train = self.trainable(model)
        loss = sum(v for k, v in ctx.losses.items() if k != "multimodal")
        grads = torch.autograd.grad(loss, train, allow_unused=True)
        got = [(p, g) for p, g in zip(train, grads, strict=True) if g is not None]
        average_over_ranks([g for _, g in got])
        for p, g in got:
            if p.grad is None:
                p.grad = g.detach()
            else:
                p.grad.add_(g.detach())
        keep = {id(p) for p in train}
        frozen = list(model.parameters())
        if ctx.optimizer is not None:
            frozen += [p for group in ctx.optimizer.param_groups for p in group["params"]]
        frozen += self.owned_parameters()
        for p in frozen:
            if id(p) not in keep:
                p.grad = None
        return True

    def on_train_epoch_end(self, ctx) -> None:
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values)
        if self.rho is not None:
            self.record_epoch("rho", float(self.rho.detach()))

    # ------------------------------------------------------------ prediction
    def predict(self, model, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ensemble ``F = rho * sum_m h(f, present={m})`` ``(B, C)`` (``rho_init`` before
        the first run starts)."""
        uni = model.unimodal_logits(features)
        total = sum(wide(uni[m]) for m in model.modalities)
        rho = self.rho.detach() if self.rho is not None else self.rho_init
        return rho * total

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict = {"epoch": self.epoch, "stage": self.stage, "phase": self.phase,
                       "modality": self.modality, "prev": self.prev}
        if self.rho is not None:
            state["rho"] = self.rho.detach().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore ``rho`` (into the existing parameter when there is one, so the optimizer keeps
        holding it) and the schedule position; the next ``on_fit_start`` keeps them and registers
        ``rho`` with the run's optimizer."""
        state = state or {}
        saved = state.get("rho")
        if saved is not None:
            saved = torch.as_tensor(saved)
            if not math.isfinite(float(saved)):
                raise ValueError(f"ReconBoost: the saved rho is not finite ({float(saved)}).")
        super().load_state_dict(state)
        if saved is not None:
            if self.rho is not None:
                with torch.no_grad():
                    self.rho.copy_(saved.to(self.rho.device, self.rho.dtype))
            else:
                self.rho = nn.Parameter(saved.detach().clone().reshape(()))
        self.epoch, self.stage, self.phase = state.get("epoch"), state.get("stage"), state.get("phase")
        self.modality, self.prev = state.get("modality"), state.get("prev")
