"""R1: InfoReg (CVPR 2025) — slow the dominant modality down inside its prime learning window.

Per epoch: the anchor of every encoder is a copy of its parameters at the end of the previous
epoch; the window (P2) is decided from the per-epoch Fisher traces (P1, online batch form by
default). Per step: ``Delta_m`` from the unimodal scores of the batch (P5); for every modality whose
window is open and that is ahead of another (``Delta_m > 0``), the gradient gets
``alpha_m * (theta_m - anchor_m)`` — the gradient of the proximal penalty
``(alpha_m / 2) * ||theta_m - anchor_m||^2`` — with ``alpha_m = exp(beta * tanh(Delta_m))``.
Only encoder parameters; never the head or the other encoders.

M > 2: ``Delta_m`` is the mean lead of m over every modality scoring below it (METHODS.md P5), so
several modalities can be regulated at once, each by its own amount.

Released-code differences (options): ``score="code"`` (batch *sum* of true-class probabilities,
which saturates tanh), ``coefficient="code"`` (``c_m * exp(tanh(Delta))``, c = 0.95 for the first
modality and 0.1 for the others), ``rule="code"`` (moving-average window on the first modality).
``unimodal_loss=True`` is InfoReg* (adds the unimodal cross-entropies to the loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..probes.fisher import fisher_trace
from ..probes.unimodal import inforeg_gap
from ..probes.window import window_state
from ..utils.validation import BOOL, NON_NEGATIVE, POSITIVE, Interval, Options, Satisfies
from .base import Regulator, all_reduce_sum, encoder_parameters, squared_norm, true_class_prob_sums

__all__ = ["InfoReg"]


class InfoReg(Regulator):
    """InfoReg regulator.

    Parameters
    ----------
    beta : float >= 0, default 0.9
        ``alpha_m = exp(beta * tanh(Delta_m))``.
    K : float in [0, 1), optional
        Window threshold on the relative trace growth (default 0.04 paper rule, 0.05 code rule).
    rule : {"paper", "code"}, default "paper"
        Window rule (see :func:`modaldiag.learning_window`).
    trace : {"online", "per_sample"}, default "online"
        ``online``: squared mini-batch gradient norms accumulated during the epoch (free);
        ``per_sample``: :func:`modaldiag.fisher_trace` over the training loader at each epoch end
        (exact, costs one extra pass with per-sample gradients).
    score : {"prob", "neg_ce", "code"}, default "prob"
        Per-batch unimodal score: mean true-class probability, minus the cross-entropy, or the
        released code's batch sum of true-class probabilities.
    coefficient : {"paper", "code"}, default "paper"
    unimodal_loss : bool, default False
        InfoReg*: add ``CE(head(present=(m,)), y)`` per modality to the loss.
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
        "rule": [Options("paper", "code")],
        "trace": [Options("online", "per_sample")],
        "score": [Options("prob", "neg_ce", "code")],
        "coefficient": [Options("paper", "code")],
        "unimodal_loss": [BOOL],
        "regulate_always": [BOOL],
        "code_scale": [Satisfies(lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                                 and all(POSITIVE.accepts(x) for x in v),
                                 "a pair of positive finite numbers (first modality, others)")],
    }

    def __init__(self, beta: float = 0.9, K: float | None = None, *, rule: str = "paper",
                 trace: str = "online", score: str = "prob", coefficient: str = "paper",
                 unimodal_loss: bool = False, regulate_always: bool = False,
                 code_scale: tuple[float, float] = (0.95, 0.1)):
        self._validate(beta=beta, K=K, rule=rule, trace=trace, score=score,
                       coefficient=coefficient, unimodal_loss=unimodal_loss,
                       regulate_always=regulate_always, code_scale=code_scale)
        super().__init__()
        self.beta, self.K = float(beta), K
        self.rule, self.trace, self.score, self.coefficient = rule, trace, score, coefficient
        self.unimodal_loss = unimodal_loss
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

    def config(self) -> dict:
        return {"beta": self.beta, "K": self.K, "rule": self.rule, "trace": self.trace,
                "score": self.score, "coefficient": self.coefficient,
                "unimodal_loss": self.unimodal_loss, "regulate_always": self.regulate_always}

    # ------------------------------------------------------------------ epoch
    def on_train_epoch_start(self, ctx) -> None:
        model = ctx.model
        self.anchors = {m: [p.detach().clone() for p in encoder_parameters(model, m)]
                        for m in model.modalities}
        traces = {m: self.traces.get(m, []) for m in model.modalities}
        state, rho = window_state(traces, len(traces[model.modalities[0]]), rule=self.rule,
                                  K=self.K, previous=self.window or None)
        self.window = state
        self._sq, self._steps = {}, 0
        self.record_epoch("window_open", dict(state))
        self.record_epoch("window_rho", rho)

    def on_train_epoch_end(self, ctx) -> None:
        model = ctx.model
        if self.trace == "per_sample":
            epoch_trace = fisher_trace(model, ctx.train_loader, per_sample=True)
        else:
            n = max(self._steps, 1)
            epoch_trace = {m: float(self._sq[m]) / n if m in self._sq else 0.0 for m in model.modalities}
        for m, v in epoch_trace.items():
            self.traces.setdefault(m, []).append(v)
        self.record_epoch("trace", epoch_trace)

    # ------------------------------------------------------------------ step
    def _scores(self, ctx) -> dict[str, float]:
        labels = ctx.labels
        if self.score == "neg_ce":
            stats = torch.stack([-F.cross_entropy(ctx.unimodal_logits[m].detach().float(), labels,
                                                  reduction="sum") for m in ctx.model.modalities])
        else:
            stats = true_class_prob_sums(ctx.unimodal_logits, labels, ctx.model.modalities)
        totals = all_reduce_sum(torch.cat([stats, stats.new_tensor([float(labels.shape[0])])]))
        count = 1.0 if self.score == "code" else float(totals[-1])  # code: the batch sum
        return {m: float(totals[i]) / count for i, m in enumerate(ctx.model.modalities)}

    def alpha(self, delta: float, index: int = 0) -> float:
        """The regulation coefficient for a gap ``delta`` (modality ``index`` for the code form)."""
        if self.coefficient == "code":
            scale = self.code_scale[0] if index == 0 else self.code_scale[1]
            return scale * math.exp(math.tanh(delta))
        return math.exp(self.beta * math.tanh(delta))

    def on_after_forward(self, ctx) -> None:
        if self.unimodal_loss:
            for m, lg in ctx.unimodal_logits.items():
                ctx.losses[f"unimodal/{m}"] = F.cross_entropy(lg, ctx.labels)
        scores = self._scores(ctx)
        delta = inforeg_gap(scores)
        self._alpha = {}
        for i, m in enumerate(ctx.model.modalities):
            is_open = self.regulate_always or self.window.get(m, True)
            if is_open and delta[m] > 0:
                self._alpha[m] = self.alpha(delta[m], i)
        self.record("score", scores)
        self.record("delta", delta)
        self.record("alpha", {m: self._alpha.get(m, 0.0) for m in ctx.model.modalities})

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx) -> None:
        model = ctx.model
        groups = self.groups(model)
        if self.trace == "online":
            for m in model.modalities:
                s = squared_norm([p.grad for p in groups[m] if p.grad is not None])
                if s is not None:
                    self._sq[m] = s if m not in self._sq else self._sq[m] + s
            self._steps += 1
        for m, a in self._alpha.items():
            params = groups[m]
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            diff = torch._foreach_sub([p.detach() for p in params], self.anchors[m])
            torch._foreach_add_([p.grad for p in params], diff, alpha=a)

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
