"""R1: InfoReg (CVPR 2025) — slow the dominant modality down inside its prime learning window.

Per epoch: the anchor of every encoder is a copy of its parameters at the end of the previous
epoch; the window (P2) is decided from the per-epoch Fisher traces (P1, online batch form by
default). Per optimizer step: ``Delta_m`` from the unimodal scores of the batch (P5); for every
modality whose window is open and that is ahead of another (``Delta_m > 0``), the gradient gets
``alpha_m * (theta_m - anchor_m)`` — the gradient of the proximal penalty
``(alpha_m / 2) * ||theta_m - anchor_m||^2`` — with ``alpha_m = exp(beta * tanh(Delta_m))``.
Only encoder parameters; never the head or the other encoders.

M > 2 (``multi="continuous"``, default): the lead of m is the mean positive part of its score
differences to every other modality, ``D_m = 1/(M-1) sum_{k != m} max(0, s_m - s_k)``, and each
leader's paper coefficient is weighted by ``D_m / max_k D_k``:
``alpha_m = (D_m / max_k D_k) * exp(beta * tanh(D_m))`` (0 when ``D_m = 0``). At M = 2 this is
exactly the paper (``D`` is the paper's ``Delta``, the leader's weight is 1, the other's 0); for
M > 2 every coefficient is continuous in the scores away from the all-tied point, so a near-tie
between two trailing modalities no longer switches a full-strength regulation on and off.
``multi="leaders"`` keeps the earlier rule (P5's mean lead over the worse modalities, weight 1).

``variant="released"`` reproduces the authors' public code (GeWu-Lab/InfoReg_CVPR2025): it sets
``score="code"`` (batch *sum* of true-class probabilities, which saturates tanh),
``coefficient="code"`` (``c_m * exp(tanh(Delta))``, c = 0.95 for the first modality and 0.1 for
the others), ``rule="code"`` (10-epoch moving averages of the first modality's trace, re-evaluated
every epoch), ``trace="code"`` (squared batch gradients of the encoders' Conv/Linear *weights*,
summed over the epoch's batches, element mean per layer, summed over layers; the gradient is that
of the whole training loss including the unimodal cross-entropies and the proximal term),
``unimodal_loss=True`` (the released loss is always multimodal + unimodal CE, i.e. InfoReg*),
``accumulation="last"`` (with gradient accumulation, Delta from the last micro-batch of the step)
and ``logits="released"`` (unimodal logits ``W_m f_m + b/M`` of a concat head, ``fc_m(f_m)`` of a
``late`` head, for both the scores and the unimodal cross-entropies, whose gradient reaches the
head's weight slice and its bias share; other heads are refused).
Any finer option passed explicitly overrides the variant's choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..probes.fisher import _code_compat_layers, fisher_trace
from ..probes.unimodal import inforeg_gap
from ..probes.window import window_state
from ..utils.validation import BOOL, NON_NEGATIVE, POSITIVE, Interval, Options, Satisfies
from .base import (
    Regulator,
    all_reduce_sum,
    check_released_head,
    encoder_parameters,
    released_unimodal_logits,
    squared_norm,
    true_class_prob_sums,
)

__all__ = ["InfoReg", "lead_gap", "inforeg_coefficients", "VARIANTS"]

#: the finer options each variant sets (an explicit argument overrides them)
VARIANTS = {
    "paper": {"rule": "paper", "trace": "online", "score": "prob", "coefficient": "paper",
              "unimodal_loss": False, "accumulation": "step", "logits": "baseline"},
    "released": {"rule": "code", "trace": "code", "score": "code", "coefficient": "code",
                 "unimodal_loss": True, "accumulation": "last", "logits": "released"},
}


def lead_gap(scores: Mapping[str, float]) -> dict[str, float]:
    """Continuous lead ``D_m = 1/(M-1) * sum_{k != m} max(0, s_m - s_k)`` (0 for M = 1).

    At M = 2 it equals :func:`modaldiag.probes.inforeg_gap`; for M > 2 it is 1-Lipschitz in every
    score, where P5's mean over the *worse* modalities jumps when a modality crosses m's score."""
    names = list(scores)
    n = len(names) - 1
    return {m: (sum(max(0.0, float(scores[m]) - float(scores[k])) for k in names if k != m) / n
                if n > 0 else 0.0) for m in names}


def inforeg_coefficients(scores: Mapping[str, float], *, beta: float = 0.9,
                         coefficient: str = "paper", code_scale: tuple[float, float] = (0.95, 0.1),
                         multi: str = "continuous", window: Mapping[str, bool] | None = None
                         ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """``(delta, weight, alpha)`` per modality for one step's unimodal scores.

    ``alpha_m = weight_m * a(delta_m)`` where ``a = exp(beta * tanh(.))`` (paper) or
    ``c_m * exp(tanh(.))`` (code; ``c`` = ``code_scale[0]`` for the first modality, ``[1]`` for
    the others); ``alpha_m = 0`` when ``delta_m <= 0`` or m's window (if given) is closed.
    ``multi="continuous"``: ``delta = lead_gap(scores)``, ``weight_m = delta_m / max_k delta_k``;
    ``multi="leaders"``: ``delta = inforeg_gap(scores)`` (P5), ``weight_m = 1``. Both are the
    paper at M = 2.
    """
    if multi == "leaders":
        delta = inforeg_gap(scores)
        weight = {m: 1.0 if d > 0 else 0.0 for m, d in delta.items()}
    else:
        delta = lead_gap(scores)
        top = max(delta.values(), default=0.0)
        weight = {m: (d / top if top > 0 else 0.0) for m, d in delta.items()}
    alpha = {}
    for i, (m, d) in enumerate(delta.items()):
        is_open = True if window is None else window.get(m, True)
        if not (is_open and d > 0 and weight[m] > 0):
            alpha[m] = 0.0
        elif coefficient == "code":
            scale = code_scale[0] if i == 0 else code_scale[1]
            alpha[m] = weight[m] * (scale * math.exp(math.tanh(d)))
        else:
            alpha[m] = weight[m] * math.exp(beta * math.tanh(d))
    return delta, weight, alpha


class InfoReg(Regulator):
    """InfoReg regulator.

    Parameters
    ----------
    beta : float >= 0, default 0.9
        ``alpha_m = exp(beta * tanh(Delta_m))``.
    K : float in [0, 1), optional
        Window threshold on the relative trace growth (default 0.04 paper rule, 0.05 code rule).
    variant : {"paper", "released"}, default "paper"
        ``"released"``: the authors' public code; sets ``rule="code"``, ``trace="code"``,
        ``score="code"``, ``coefficient="code"``, ``unimodal_loss=True``,
        ``accumulation="last"``, ``logits="released"``. The finer options below override it when given explicitly.
    rule : {"paper", "code", "robust"}, default from ``variant`` ("paper")
        Window rule (see :func:`modaldiag.learning_window`). The paper rule is one interval (once
        closed, it stays closed); the code rule is re-evaluated every epoch, as released; the
        robust rule (ours) smooths the log-trace growth and reopens only above ``2K``.
    trace : {"online", "per_sample", "code"}, default from ``variant`` ("online")
        ``online``: squared mini-batch gradient norms of every encoder parameter, averaged over
        the epoch's steps (free); ``per_sample``: :func:`modaldiag.fisher_trace` over the training
        loader at each epoch end (exact, costs one extra pass with per-sample gradients);
        ``code``: the released code's trace, read online from the final gradient of each step
        (after the proximal term is added): per Conv/Linear *weight* of the encoder the element
        mean of the squared gradient, summed over layers and over the epoch's steps (not
        averaged).
    score : {"prob", "neg_ce", "code"}, default from ``variant`` ("prob")
        Per-step unimodal score: mean true-class probability, minus the mean cross-entropy, or the
        released code's batch sum of true-class probabilities.
    coefficient : {"paper", "code"}, default from ``variant`` ("paper")
    unimodal_loss : bool, default from ``variant`` (False)
        InfoReg*: add ``CE(head(present=(m,)), y)`` per modality to the loss.
    accumulation : {"step", "last"}, default from ``variant`` ("step")
        With gradient accumulation, compute the scores (hence Delta and alpha) over every
        micro-batch of the optimizer step (``step``), or from the last micro-batch only (``last``,
        the released code's behaviour under a naive accumulation). Identical without accumulation.
    logits : {"baseline", "released"}, default from ``variant`` ("baseline")
        Unimodal logits for the scores and the InfoReg* losses: ``head(present=(m,))`` (the other
        modalities at their baseline; every head), or the released code's ``W_m f_m + b/M``
        (concat) / ``fc_m(f_m)`` (late) — see :func:`modaldiag.released_unimodal_logits`.
    multi : {"continuous", "leaders"}, default "continuous"
        The rule for M > 2 (identical at M = 2): see the module docstring.
    regulate_always : bool, default False
        Ablation: ignore the window (regulate throughout training).
    code_scale : pair of positive floats, default (0.95, 0.1)
        ``coefficient="code"``: the scale ``c_m`` of the first modality and of the others.

    Traces, window and anchors are run state: a fresh run (``on_fit_start``) starts them anew;
    ``load_state_dict`` (resume) keeps them.
    """

    needs_unimodal_logits = True
    _parameter_constraints = {
        "beta": [NON_NEGATIVE],
        "K": [Interval(0, 1, closed="left"), None],
        "variant": [Options("paper", "released")],
        "rule": [Options("paper", "code", "robust"), None],
        "trace": [Options("online", "per_sample", "code"), None],
        "score": [Options("prob", "neg_ce", "code"), None],
        "coefficient": [Options("paper", "code"), None],
        "unimodal_loss": [BOOL, None],
        "accumulation": [Options("step", "last"), None],
        "logits": [Options("baseline", "released"), None],
        "multi": [Options("continuous", "leaders")],
        "regulate_always": [BOOL],
        "code_scale": [Satisfies(lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                                 and all(POSITIVE.accepts(x) for x in v),
                                 "a pair of positive finite numbers (first modality, others)")],
    }

    def __init__(self, beta: float = 0.9, K: float | None = None, *, variant: str = "paper",
                 rule: str | None = None, trace: str | None = None, score: str | None = None,
                 coefficient: str | None = None, unimodal_loss: bool | None = None,
                 accumulation: str | None = None, logits: str | None = None,
                 multi: str = "continuous",
                 regulate_always: bool = False, code_scale: tuple[float, float] = (0.95, 0.1)):
        self._validate(beta=beta, K=K, variant=variant, rule=rule, trace=trace, score=score,
                       coefficient=coefficient, unimodal_loss=unimodal_loss,
                       accumulation=accumulation, logits=logits, multi=multi, regulate_always=regulate_always,
                       code_scale=code_scale)
        given = {"rule": rule, "trace": trace, "score": score, "coefficient": coefficient,
                 "unimodal_loss": unimodal_loss, "accumulation": accumulation, "logits": logits}
        opts = {k: (VARIANTS[variant][k] if v is None else v) for k, v in given.items()}
        super().__init__()
        self.beta, self.K, self.variant = float(beta), K, variant
        self.rule, self.trace = opts["rule"], opts["trace"]
        self.score, self.coefficient = opts["score"], opts["coefficient"]
        self.unimodal_loss, self.accumulation = opts["unimodal_loss"], opts["accumulation"]
        self.logits = opts["logits"]
        self.needs_unimodal_logits = self.logits == "baseline"
        self.multi = multi
        self.regulate_always = regulate_always
        self.code_scale = tuple(float(c) for c in code_scale)

    def reset(self) -> None:
        """Forget traces, window, anchors and step accumulators (a fresh run)."""
        super().reset()
        self.traces: dict[str, list[float]] = {}
        self.window: dict[str, bool] = {}
        self.anchors: dict[str, list[torch.Tensor]] = {}
        self._sq: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._alpha: dict[str, float] = {}
        self._pending: torch.Tensor | None = None  # this micro-batch's score statistics
        self._stats: torch.Tensor | None = None  # this step's (summed or last) statistics

    def config(self) -> dict:
        return {"beta": self.beta, "K": self.K, "variant": self.variant, "rule": self.rule,
                "trace": self.trace, "score": self.score, "coefficient": self.coefficient,
                "unimodal_loss": self.unimodal_loss, "accumulation": self.accumulation,
                "logits": self.logits,
                "multi": self.multi, "regulate_always": self.regulate_always,
                "code_scale": self.code_scale}

    # ------------------------------------------------------------------ epoch
    def on_train_epoch_start(self, ctx) -> None:
        model = ctx.model
        self.anchors = {m: [p.detach().clone() for p in encoder_parameters(model, m)]
                        for m in model.modalities}
        traces = {m: self.traces.get(m, []) for m in model.modalities}
        # the paper's window is one interval (sticky); the released code re-evaluates its
        # moving-average rule every epoch, so a closed window can reopen (issue 12)
        state, rho = window_state(traces, len(traces[model.modalities[0]]), rule=self.rule,
                                  K=self.K, previous=self.window or None,
                                  sticky=self.rule == "paper")
        self.window = state
        self._sq, self._steps = {}, 0
        self._pending = self._stats = None
        self.record_epoch("window_open", dict(state))
        self.record_epoch("window_rho", rho)

    def on_train_epoch_end(self, ctx) -> None:
        model = ctx.model
        if self.trace == "per_sample":
            epoch_trace = fisher_trace(model, ctx.train_loader, per_sample=True)
        elif self.trace == "code":  # released: summed over the epoch's steps, not averaged
            epoch_trace = {m: float(self._sq[m]) if m in self._sq else 0.0 for m in model.modalities}
        else:
            n = max(self._steps, 1)
            epoch_trace = {m: float(self._sq[m]) / n if m in self._sq else 0.0 for m in model.modalities}
        for m, v in epoch_trace.items():
            self.traces.setdefault(m, []).append(v)
        self.record_epoch("trace", dict(epoch_trace))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _batch_stats(self, unimodal_logits, labels, modalities) -> torch.Tensor:
        """``(M + 1,)``: per modality the batch sum of the score statistic, then the batch size."""
        if self.score == "neg_ce":
            stats = torch.stack([-F.cross_entropy(unimodal_logits[m].detach().float(), labels,
                                                  reduction="sum") for m in modalities])
        else:
            stats = true_class_prob_sums(unimodal_logits, labels, modalities)
        return torch.cat([stats, stats.new_tensor([float(labels.shape[0])])])

    def _fold_pending(self) -> None:
        if self._pending is None:
            return
        if self.accumulation == "last" or self._stats is None:
            self._stats = self._pending
        else:
            self._stats = self._stats + self._pending
        self._pending = None

    def _scores(self, model) -> dict[str, float]:
        totals = all_reduce_sum(self._stats)
        count = 1.0 if self.score == "code" else float(totals[-1])  # code: the batch sum
        return {m: float(totals[i]) / count for i, m in enumerate(model.modalities)}

    def alpha(self, delta: float, index: int = 0) -> float:
        """The unweighted coefficient for a gap ``delta`` (modality ``index`` for the code form)."""
        if self.coefficient == "code":
            scale = self.code_scale[0] if index == 0 else self.code_scale[1]
            return scale * math.exp(math.tanh(delta))
        return math.exp(self.beta * math.tanh(delta))

    def coefficients(self, scores: Mapping[str, float], window: Mapping[str, bool] | None = None):
        """``(delta, weight, alpha)`` for the given scores (see :func:`inforeg_coefficients`)."""
        return inforeg_coefficients(scores, beta=self.beta, coefficient=self.coefficient,
                                    code_scale=self.code_scale, multi=self.multi, window=window)

    def on_fit_start(self, ctx) -> None:
        if self.logits == "released":
            check_released_head(ctx.model, "InfoReg")
        super().on_fit_start(ctx)

    def _unimodal_logits(self, ctx) -> dict[str, torch.Tensor]:
        if self.logits == "released":
            return released_unimodal_logits(ctx.model, ctx.features, grad=self.unimodal_loss)
        return ctx.unimodal_logits

    def on_after_forward(self, ctx) -> None:
        uni = self._unimodal_logits(ctx)
        if self.unimodal_loss:
            for m, lg in uni.items():
                ctx.losses[f"unimodal/{m}"] = F.cross_entropy(lg, ctx.labels)
        # a skipped (non-finite) batch is replaced by the next forward and never counted
        self._pending = self._batch_stats(uni, ctx.labels, ctx.model.modalities)

    def on_after_backward(self, ctx) -> None:
        self._fold_pending()

    def _decide(self, model) -> None:
        """Scores of the step -> delta, weight, alpha (all-reduced: the same on every rank)."""
        self._fold_pending()
        self._alpha = {}
        if self._stats is None:
            return
        scores = self._scores(model)
        window = None if self.regulate_always else {m: self.window.get(m, True)
                                                    for m in model.modalities}
        delta, weight, alpha = self.coefficients(scores, window)
        self._alpha = {m: a for m, a in alpha.items() if a > 0}
        self._stats = None
        self.record("score", scores)
        self.record("delta", delta)
        self.record("weight", weight)
        self.record("alpha", alpha)

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx) -> None:
        model = ctx.model
        groups = self.groups(model)
        self._decide(model)
        if self.trace == "online":  # the task gradient, before the proximal term
            for m in model.modalities:
                s = squared_norm([p.grad for p in groups[m] if p.grad is not None])
                if s is not None:
                    self._sq[m] = s if m not in self._sq else self._sq[m] + s
        for m, a in self._alpha.items():
            params = groups[m]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diff = torch._foreach_sub([p.detach() for p in params], self.anchors[m])
            torch._foreach_add_([p.grad for p in params], diff, alpha=a)
        if self.trace == "code":  # released: the final gradient, proximal term included
            for m in model.modalities:
                grads = [w.grad for w in _code_compat_layers(model.encoders[m]) if w.grad is not None]
                if grads:
                    s = torch.stack([g.detach().float().pow(2).mean() for g in grads]).sum()
                    self._sq[m] = s if m not in self._sq else self._sq[m] + s
        self._steps += 1

    def penalty(self, model) -> torch.Tensor:
        """The proximal penalty ``sum_m (alpha_m / 2) ||theta_m - anchor_m||^2`` of the last step
        (for inspection; the regulator applies its gradient directly)."""
        total = torch.zeros(())
        for m, a in self._alpha.items():
            for p, anchor in zip(encoder_parameters(model, m), self.anchors[m], strict=True):
                total = total + a / 2 * (p - anchor).pow(2).sum()
        return total

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"traces": {m: list(v) for m, v in self.traces.items()}, "window": dict(self.window),
                "anchors": {m: [t.clone() for t in ts] for m, ts in self.anchors.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.traces = {m: list(v) for m, v in state.get("traces", {}).items()}
        self.window = dict(state.get("window", {}))
        self.anchors = {m: list(ts) for m, ts in state.get("anchors", {}).items()}
        super().load_state_dict(state)
