"""R7: AGM (Li et al., ICCV 2023) — adaptive gradient modulation with Shapley modality outputs.

Coalition values ``v(S) = h(f, present=S)`` for every non-empty ``S`` (encoders run once; the
head is evaluated on the coalitions through the model contract, ``head_coalitions``), and
``v({}) = 0`` (the authors' convention; ``empty="baseline"``: ``v({}) = h(f, present=())``).
Shapley output of modality m::

    phi_m = sum_{S in N minus m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S)),   sum_m phi_m = z - v({})

(exact, ``2^M - 1`` coalitions, for ``M <= max_exact``; above, the mean over ``permutations``
random orders drawn from a generator seeded by (seed, step, batch), identical on every rank —
every order still telescopes to ``z - v({})``).

Per step: ``s_m = mean_i -log max(softmax(phi_m)_{i, y_i}, 1e-8)`` (batch mean over all DDP
ranks); the running mean since the first step ``S_m <- S_m (n - 1)/n + s_m / n`` (S = 0 at the
start; the coefficients use S *before* this step's update). With ``kappa = M / (M - 1)``::

    r_m    = exp(kappa (mean_k s_k - s_m))        ropt_m = exp(kappa (mean_k S_k - S_m))
    c_m    = exp(alpha * min(ropt_m - r_m, cap))

M = 2 gives the authors' ``r_a = exp(s_v - s_a)``. A modality whose current advantage ``r_m``
exceeds its running one ``ropt_m`` (it is ahead of its usual share) gets ``c < 1``, one that lags
gets ``c > 1``.

Default (``variant="paper"``, the authors' code, lihong2303/AGM_ICCV2023 ``GradMod``): the loss is
``CE(v({}) + sum_m phi~_m, y)`` with ``phi~_m = c_m phi_m + (1 - c_m) sg(phi_m)``: its value is the
ordinary ``CE(z, y)``, its gradient through ``phi_m`` is scaled by ``c_m`` (the authors' backward
hook on each Shapley output). No own backward is needed, so it works in ``md.fit``,
``md.Regulation``, Lightning and DDP alike. For a linear concat head with the zero baseline
``phi_m = W_m f_m + b / M``: encoder m and head block m get ``c_m`` times their gradient, the bias
the mean of ``c``.

``variant="released"`` (BalanceBenchmark's ``AGMTrainer``): scores from a Shapley output that drops
the empty-coalition term (M = 2: ``phi_a = (v(av) - v(v)) / 2``), computed without gradient;
*opposite sign* ``r_m = exp(kappa (s_m - mean s))``, ``ropt_m = exp(kappa (S_m - mean S))`` (it
raises ``c`` for the modality that is currently ahead); the ordinary ``CE(z)`` backward, then the
gradient of every encoder-m tensor whose gradient is not 1-D is multiplied by ``c_m``; then, if any
entry of a head weight gradient exceeds ``+-clip`` (5), the total gradient norm is clipped to
``clip``. BB's defaults alpha 0.1, cap 7; BB stores a window (0..80) but never checks it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..utils.validation import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    as_plain_int,
)
from .base import (
    EPOCH_END,
    SEED,
    Regulator,
    all_reduce_sum,
    check_epoch_range,
    head_dtype,
    masks_tensor,
)

__all__ = ["AGM", "agm_coefficients", "shapley_matrix", "shapley_outputs"]

VARIANT = Options("paper", "released")
#: floor of the true-class probability in the score (the authors' ``1e-8``)
PROB_FLOOR = 1e-8
_MAX_LOSS = -math.log(PROB_FLOOR)
#: ``end_epoch`` default: 20 (paper; the authors' window 0..20 over 1-based epochs) or None (released)
AUTO = "auto"


def agm_coefficients(scores: dict[str, float], running: dict[str, float], alpha: float,
                     cap: float, variant: str = "paper") -> dict[str, dict[str, float]]:
    """AGM's coefficients from this step's scores ``s`` and the running means ``S`` (before update).

    Returns ``{"ratio": r, "optimal_ratio": ropt, "coefficient": c, "capped": 0/1}`` (each keyed by
    modality). ``variant="released"`` uses BalanceBenchmark's opposite sign (``s_m - mean s``).
    """
    mods = list(scores)
    m = len(mods)
    kappa = m / (m - 1)
    sign = -1.0 if variant == "released" else 1.0
    mean_s = sum(scores.values()) / m
    mean_run = sum(running.values()) / m
    out: dict[str, dict[str, float]] = {"ratio": {}, "optimal_ratio": {}, "coefficient": {},
                                        "capped": {}}
    for k in mods:
        r = math.exp(sign * kappa * (mean_s - scores[k]))
        ropt = math.exp(sign * kappa * (mean_run - running[k]))
        gap = ropt - r
        out["ratio"][k], out["optimal_ratio"][k] = r, ropt
        out["coefficient"][k] = math.exp(alpha * min(gap, cap))
        out["capped"][k] = float(gap > cap)
    return out


def _weight(size: int, m: int) -> float:
    return math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)


@lru_cache(maxsize=32)
def _exact_matrix(m: int, drop_empty: bool) -> torch.Tensor:
    a = torch.zeros(m, 2 ** m, dtype=torch.float64)
    for i in range(m):
        bit = 1 << i
        for mask in range(2 ** m):
            if mask & bit or (drop_empty and mask == 0):
                continue
            w = _weight(bin(mask).count("1"), m)
            a[i, mask | bit] += w
            a[i, mask] -= w
    return a


def shapley_matrix(m: int, *, permutations: torch.Tensor | None = None,
                   drop_empty: bool = False) -> torch.Tensor:
    """``A (M, 2^M)`` with ``phi = A @ v``, coalitions indexed by bit mask (bit i = modality i).

    Exact Shapley weights, or (``permutations``: ``(P, M)`` orders) the mean of the marginal
    contributions along each order. ``drop_empty``: leave out every term with ``S = {}``
    (BalanceBenchmark's form; exact only)."""
    if permutations is None:
        return _exact_matrix(m, drop_empty).clone()
    a = torch.zeros(m, 2 ** m, dtype=torch.float64)
    p = permutations.shape[0]
    for order in permutations.tolist():
        mask = 0
        for i in order:
            a[i, mask | (1 << i)] += 1.0 / p
            a[i, mask] -= 1.0 / p
            mask |= 1 << i
    return a


def shapley_outputs(values: dict[int, torch.Tensor], matrix: torch.Tensor,
                    modalities) -> dict[str, torch.Tensor]:
    """``{m: phi_m}`` from coalition values ``{mask: (B, C)}`` (a missing mask counts as 0)."""
    out = {}
    for i, name in enumerate(modalities):
        acc = None
        for mask in torch.nonzero(matrix[i]).flatten().tolist():
            if mask not in values:
                continue
            term = values[mask] * float(matrix[i, mask])
            acc = term if acc is None else acc + term
        out[name] = acc
    return out


class AGM(Regulator):
    """AGM regulator: Shapley modality outputs, coefficients from their running discrepancy.

    Parameters
    ----------
    alpha : float >= 0, optional
        Modulation strength. Default 1.0 (the authors' argument default; their README example
        uses 2.5) for ``variant="paper"``, 0.1 (BalanceBenchmark) for ``"released"``.
        Per-dataset values of the paper are unverified.
    cap : float > 0, optional
        Upper bound of ``ropt - r`` in the exponent. Default 10 (authors), 7 (released).
    start_epoch : int >= 0, default 0
    end_epoch : int, None or "auto", default "auto"
        Modulate during epochs ``[start_epoch, end_epoch)`` (paper) or ``[start_epoch, end_epoch]``
        (released, inclusive as BalanceBenchmark writes it). ``"auto"``: 20 for the paper form
        (the authors' window 0..20 over 1-based epochs is 20 epochs), None (to the end) for the
        released form (BalanceBenchmark stores 0..80 but never checks it). Outside the window the
        scores and running means are still updated (as the authors do) and ``c = 1``.
    empty : {"zero", "baseline"}, default "zero"
        ``v({})``: 0 (authors) or the head on all-baseline features (then the loss is
        ``CE(v({}) + sum phi~)``, still the value ``CE(z)``). Paper form only.
    clip : float > 0 or None, optional
        If any entry of a head weight gradient (head parameters with 2+ dimensions) exceeds
        ``+-clip``, clip the total gradient norm of the model to ``clip`` before the step.
        Default None (paper; the authors' CREMA-D script clips at 1.0), 5.0 (released).
    max_exact : int >= 2, default 6
        Exact Shapley values (``2^M - 1`` coalitions) up to this many modalities; above it,
        permutation sampling.
    permutations : int >= 1, default 16
        Number of random orders when sampling.
    seed : int >= 0, default 0
        Seed of the sampled orders: the orders of step t, micro-batch b are drawn from a generator
        seeded by (seed, t, b) — the same on every DDP rank and in every loop.
    variant : {"paper", "released"}, default "paper"
        "released": BalanceBenchmark's trainer (see the module docstring): opposite sign, scores
        from the empty-free Shapley output, gradient multiplication of non-1-D encoder
        gradients, head-gradient clipping at 5, no window.
    """

    conflicts = ("OGM", "MMPareto")
    _parameter_constraints = {
        "alpha": [NON_NEGATIVE, None], "cap": [POSITIVE, None],
        "start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END + [Options(AUTO)],
        "empty": [Options("zero", "baseline")], "clip": [POSITIVE, None],
        "max_exact": [Interval(2, 12, integer=True)], "permutations": [POSITIVE_INT],
        "seed": [SEED], "variant": [VARIANT]}

    def __init__(self, alpha: float | None = None, *, cap: float | None = None,
                 start_epoch: int = 0, end_epoch: int | None | str = AUTO, empty: str = "zero",
                 clip: float | None = None, max_exact: int = 6, permutations: int = 16,
                 seed: int = 0, variant: str = "paper"):
        start_epoch, seed, max_exact, permutations = (
            as_plain_int(v) for v in (start_epoch, seed, max_exact, permutations))
        if not isinstance(end_epoch, str):
            end_epoch = as_plain_int(end_epoch)
        self._validate(alpha=alpha, cap=cap, start_epoch=start_epoch, end_epoch=end_epoch,
                       empty=empty, clip=clip, max_exact=max_exact, permutations=permutations,
                       seed=seed, variant=variant)
        released = variant == "released"
        if released and empty != "zero":
            raise ValueError("AGM: empty='baseline' applies to the paper form only; "
                             "variant='released' drops the empty-coalition term altogether, as "
                             "BalanceBenchmark does.")
        if end_epoch == AUTO:
            end_epoch = None if released else 20
        if released:
            if end_epoch is not None and end_epoch < start_epoch:
                raise ValueError(f"AGM: end_epoch must be >= start_epoch for variant='released' "
                                 f"(the window is [start_epoch, end_epoch], end included); got "
                                 f"start_epoch={start_epoch}, end_epoch={end_epoch}.")
        else:
            check_epoch_range("AGM", start_epoch, end_epoch)
        self.variant = variant
        super().__init__()
        self.alpha = float(alpha if alpha is not None else (0.1 if released else 1.0))
        self.cap = float(cap if cap is not None else (7.0 if released else 10.0))
        self.clip = float(clip) if clip is not None else (5.0 if released else None)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.empty, self.max_exact, self.permutations = empty, max_exact, permutations
        self.seed = seed

    def config(self) -> dict:
        return {"alpha": self.alpha, "cap": self.cap, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch, "empty": self.empty, "clip": self.clip,
                "max_exact": self.max_exact, "permutations": self.permutations,
                "seed": self.seed, "variant": self.variant}

    def reset(self) -> None:
        """Forget the running scores, their count and any pending (released) score sums."""
        super().reset()
        self.running: dict[str, float] = {}
        self.count = 0
        self.coefficients: dict[str, float] = {}
        self._pending: torch.Tensor | None = None
        self._empty_value: torch.Tensor | None = None
        self._clipped = self._steps = 0

    def active(self, epoch: int) -> bool:
        if epoch < self.start_epoch:
            return False
        if self.end_epoch is None:
            return True
        return epoch <= self.end_epoch if self.variant == "released" else epoch < self.end_epoch

    # ------------------------------------------------------------ Shapley outputs
    def _matrix(self, m: int, ctx) -> torch.Tensor:
        if m <= self.max_exact:
            return shapley_matrix(m, drop_empty=self.variant == "released")
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + int(ctx.step)) * 10_007 + int(ctx.batch_index))
        perms = torch.stack([torch.randperm(m, generator=gen) for _ in range(self.permutations)])
        return shapley_matrix(m, permutations=perms)

    def shapley(self, ctx) -> dict[str, torch.Tensor]:
        """``{m: phi_m (B, C)}`` of this step (differentiable unless grad is disabled)."""
        model = ctx.model
        mods = model.modalities
        m = len(mods)
        full = (1 << m) - 1
        matrix = self._matrix(m, ctx)
        used = [k for k in range(1, full) if bool(matrix[:, k].ne(0).any())]
        first = ctx.features[mods[0]]
        dtype = head_dtype(model, first)
        feats = {k: (f if f.dtype == dtype else f.to(dtype)) for k, f in ctx.features.items()}
        values: dict[int, torch.Tensor] = {full: ctx.logits.to(dtype)}
        if used:
            out = model.head_coalitions(feats, masks_tensor(used, m, first.device))
            values.update({k: out[j] for j, k in enumerate(used)})
        self._empty_value = None
        if self.empty == "baseline" and self.variant == "paper":
            values[0] = self._empty_value = model.head(feats, present=())
        return shapley_outputs(values, matrix, mods)

    @staticmethod
    def _loss_sums(phi: dict[str, torch.Tensor], labels: torch.Tensor, mods) -> torch.Tensor:
        """``(M + 1,)``: per modality the batch sum of ``-log max(p_y, 1e-8)``, then the count."""
        with torch.no_grad():
            rows = [(-F.log_softmax(phi[k].detach().double(), 1).gather(1, labels[:, None]))
                    .clamp(max=_MAX_LOSS).sum() for k in mods]
            return torch.stack(rows + [rows[0].new_tensor(float(labels.shape[0]))])

    def _update(self, sums: torch.Tensor, mods, epoch: int) -> dict[str, float]:
        """Scores -> coefficients (using the running means before this update) -> update."""
        total = all_reduce_sum(sums.clone())
        n = float(total[-1])
        scores = {k: float(total[i]) / n for i, k in enumerate(mods)}
        running = {k: self.running.get(k, 0.0) for k in mods}
        out = agm_coefficients(scores, running, self.alpha, self.cap, self.variant)
        self.count += 1
        self.running = {k: running[k] * (self.count - 1) / self.count + scores[k] / self.count
                        for k in mods}
        c = out["coefficient"] if self.active(epoch) else {k: 1.0 for k in mods}
        self.coefficients = dict(c)
        self.record("score", scores)
        self.record("running_score", running)
        self.record("ratio", out["ratio"])
        self.record("optimal_ratio", out["optimal_ratio"])
        self.record("coefficient", c)
        self.record("capped", out["capped"])
        return c

    # ------------------------------------------------------------ hooks
    def on_after_forward(self, ctx) -> None:
        mods = ctx.model.modalities
        if self.variant == "released":
            with torch.no_grad():
                phi = self.shapley(ctx)
            sums = self._loss_sums(phi, ctx.labels, mods)
            self._pending = sums if self._pending is None else self._pending + sums
            return
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.active(ctx.epoch)):
            phi = self.shapley(ctx)
        c = self._update(self._loss_sums(phi, ctx.labels, mods), mods, ctx.epoch)
        if all(v == 1.0 for v in c.values()):
            return  # the ordinary CE(z) already in ctx.losses
        mixed = None
        for k in mods:
            p = phi[k]
            term = c[k] * p + (1.0 - c[k]) * p.detach()
            mixed = term if mixed is None else mixed + term
        if self._empty_value is not None:  # sum_m phi_m = z - v({}): add v({}) back
            mixed = mixed + self._empty_value
        ctx.losses["multimodal"] = F.cross_entropy(mixed, ctx.labels)

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx) -> None:
        model = ctx.model
        if self.variant == "released" and self._pending is not None:
            sums, self._pending = self._pending, None
            c = self._update(sums, model.modalities, ctx.epoch)
            for k in model.modalities:
                if c[k] == 1.0:
                    continue
                grads = [p.grad for p in self.groups(model)[k]
                         if p.grad is not None and p.grad.dim() != 1]
                if grads:
                    torch._foreach_mul_(grads, c[k])
        if self.clip is not None:
            heads = [p.grad for p in self.head_parameters(model)
                     if p.grad is not None and p.grad.dim() >= 2]
            if heads and max(float(g.abs().max()) for g in heads) > self.clip:
                params = [p for p in model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, max_norm=self.clip)
                self._clipped += 1
            self._steps += 1

    def on_train_epoch_end(self, ctx) -> None:
        if self.clip is not None:  # fraction of this epoch's optimizer steps that were clipped
            self.record_epoch("clipped", self._clipped / max(self._steps, 1))
        self._clipped = self._steps = 0

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"running": dict(self.running), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        running, count = state.get("running", {}), int(state.get("count", 0))
        super().load_state_dict(state)
        self.running = {k: float(v) for k, v in running.items()}
        self.count = count
        self._pending = None
