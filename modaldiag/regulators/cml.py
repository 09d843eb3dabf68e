"""R11: CML (Ma et al., ICML 2023) — calibrating multimodal learning.

Principle: removing modalities must not raise the prediction's confidence,
``Conf(z_S') <= Conf(z_S)`` for ``S' subset S``, with ``Conf = max_c softmax(z)_c`` and
``z_S = h(f, present=S)`` (the model contract's absence: features at their baseline).

Per step a random order ``pi`` of the modalities gives the chain ``S_0 = N``,
``S_k = S_{k-1} minus {pi_k}`` (k = 1..M-1, down to one modality), and the loss is::

    L = 1/M sum_{k=0}^{M-1} CE(z_{S_k}) + lam * sum_{k=1}^{M-1} mean_i relu(Conf_i(S_k) - Conf_i(S_{k-1}))

M = 2: one link, the full set against one random modality. ``all_pairs=True`` replaces the random
chain by its expectation over all ``M!`` orders::

    L = 1/M sum_{s=1}^{M} mean_{|S|=s} CE(z_S) + lam * sum_{s=2}^{M} mean_{|S|=s, m in S} hinge(S, S minus m)

(every non-empty subset and every pair ``(S, S minus m)``; equal to the mean of the chain loss over
the M! orders, tested). The order is drawn per batch from a generator seeded by (seed, optimizer
step): identical on every DDP rank and in ``md.fit``, a plain loop and Lightning. The loss enters
the step as the term ``losses["cml"] = L - CE(z)``, so the step's total is ``L`` while the
History's training loss stays the full-set cross-entropy.

``variant="released"`` (BalanceBenchmark's ``CMLTrainer``): one order per epoch, and the hinge of
the batch *sum*, ``relu(sum_i (Conf_i(S_k) - Conf_i(S_{k-1})))`` (not divided by B); the window is
inclusive. BalanceBenchmark removes a modality by subtracting its concat slice (bias kept), which
is the zero-baseline absence of a linear concat head — what the contract does for every head.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..utils.validation import BOOL, NON_NEGATIVE, NON_NEGATIVE_INT, Options, as_plain_int
from .base import (
    EPOCH_END,
    SEED,
    Regulator,
    all_reduce_sum,
    check_epoch_range,
    head_dtype,
    masks_tensor,
)

__all__ = ["CML", "cml_chain_loss", "cml_all_pairs_loss", "confidence"]

VARIANT = Options("paper", "released")


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the largest softmax probability per sample (differentiable)."""
    return F.softmax(logits, dim=1).max(dim=1).values


def _hinge(larger: torch.Tensor, smaller: torch.Tensor, hinge: str):
    """(hinge value, per-sample rise ``Conf(smaller) - Conf(larger)``)."""
    rise = confidence(smaller) - confidence(larger)
    value = F.relu(rise).mean() if hinge == "mean" else F.relu(rise.sum())
    return value, rise


def cml_chain_loss(chain: list[torch.Tensor], labels: torch.Tensor, lam: float,
                   hinge: str = "mean") -> torch.Tensor:
    """The chain loss: ``chain[k]`` are the logits of ``S_k`` (``chain[0]`` the full set).

    ``1/M sum_k CE(chain[k]) + lam * sum_{k>=1} hinge(chain[k-1], chain[k])`` with M = len(chain);
    ``hinge="mean"``: ``mean_i relu(rise_i)``, ``"sum"``: ``relu(sum_i rise_i)`` (released)."""
    ce, pen = _chain_parts(chain, labels, hinge)
    return ce + lam * pen


def _chain_parts(chain, labels, hinge):
    ce = sum(F.cross_entropy(z, labels) for z in chain) / len(chain)
    pen = sum(_hinge(a, b, hinge)[0] for a, b in itertools.pairwise(chain))
    return ce, pen


def cml_all_pairs_loss(values: dict[int, torch.Tensor], m: int, labels: torch.Tensor,
                       lam: float, hinge: str = "mean") -> torch.Tensor:
    """The all-pairs loss from the logits of every non-empty coalition ``{bit mask: (B, C)}``."""
    ce, pen = _all_pairs_parts(values, m, labels, hinge)
    return ce + lam * pen


def _all_pairs_parts(values, m, labels, hinge):
    ce = 0.0
    pen = 0.0
    for s in range(1, m + 1):
        masks = [k for k in values if bin(k).count("1") == s]
        ce = ce + sum(F.cross_entropy(values[k], labels) for k in masks) / len(masks)
        if s >= 2:
            pairs = [(k, k & ~(1 << i)) for k in masks for i in range(m) if k >> i & 1]
            pen = pen + sum(_hinge(values[a], values[b], hinge)[0] for a, b in pairs) / len(pairs)
    return ce / m, pen


class CML(Regulator):
    """CML regulator: a confidence hinge along a chain of nested modality subsets.

    Parameters
    ----------
    lam : float >= 0, default 0.1
        Weight of the confidence hinge (BalanceBenchmark's 0.1 = the authors' ``beta / 100`` with
        ``beta = 10``); the paper's per-dataset values are unverified.
    all_pairs : bool, default False
        Use every non-empty subset and every pair ``(S, S minus m)`` — the expectation of the
        random chain over all orders — instead of one random chain (``2^M - 1`` head evaluations
        instead of M).
    permute : {None, "batch", "epoch"}, default None
        When the chain's order is drawn: per batch (paper form; seeded by (seed, step)) or per
        epoch (released; seeded by (seed, epoch)). None: from ``variant``.
    hinge : {None, "mean", "sum"}, default None
        ``"mean"``: ``mean_i relu(rise_i)`` per link (paper form); ``"sum"``: ``relu(sum_i
        rise_i)`` (released). None: from ``variant``.
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch or None, default None
        Active during ``[start_epoch, end_epoch)`` (released: ``[start_epoch, end_epoch]``);
        outside it the step is the plain cross-entropy.
    seed : int >= 0, default 0
    variant : {"paper", "released"}, default "paper"
        "released": BalanceBenchmark's trainer — one order per epoch, batch-sum hinge, inclusive
        window.
    """

    _parameter_constraints = {
        "lam": [NON_NEGATIVE], "all_pairs": [BOOL], "permute": [None, Options("batch", "epoch")],
        "hinge": [None, Options("mean", "sum")], "start_epoch": [NON_NEGATIVE_INT],
        "end_epoch": EPOCH_END, "seed": [SEED], "variant": [VARIANT]}

    def __init__(self, lam: float = 0.1, *, all_pairs: bool = False, permute: str | None = None,
                 hinge: str | None = None, start_epoch: int = 0, end_epoch: int | None = None,
                 seed: int = 0, variant: str = "paper"):
        start_epoch, end_epoch, seed = (as_plain_int(v) for v in (start_epoch, end_epoch, seed))
        self._validate(lam=lam, all_pairs=all_pairs, permute=permute, hinge=hinge,
                       start_epoch=start_epoch, end_epoch=end_epoch, seed=seed, variant=variant)
        released = variant == "released"
        if released:
            if end_epoch is not None and end_epoch < start_epoch:
                raise ValueError(f"CML: end_epoch must be >= start_epoch for variant='released' "
                                 f"(the window is [start_epoch, end_epoch], end included); got "
                                 f"start_epoch={start_epoch}, end_epoch={end_epoch}.")
        else:
            check_epoch_range("CML", start_epoch, end_epoch)
        self.variant = variant
        super().__init__()
        self.lam, self.all_pairs = float(lam), all_pairs
        self.permute = permute or ("epoch" if released else "batch")
        self.hinge = hinge or ("sum" if released else "mean")
        self.start_epoch, self.end_epoch, self.seed = start_epoch, end_epoch, seed

    def config(self) -> dict:
        return {"lam": self.lam, "all_pairs": self.all_pairs, "permute": self.permute,
                "hinge": self.hinge, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                "seed": self.seed, "variant": self.variant}

    def reset(self) -> None:
        """Forget the epoch's log accumulators (CML keeps no other run state)."""
        super().reset()
        self._acc: dict = {}
        self.last_order: list[str] | None = None

    def active(self, epoch: int) -> bool:
        if epoch < self.start_epoch:
            return False
        if self.end_epoch is None:
            return True
        return epoch <= self.end_epoch if self.variant == "released" else epoch < self.end_epoch

    def order(self, ctx) -> list[int]:
        """The chain's removal order (modality indices) for this step."""
        m = len(ctx.model.modalities)
        if self.permute == "epoch":
            key = self.seed * 1_000_003 + 500_009 + int(ctx.epoch)
        else:
            key = self.seed * 1_000_003 + int(ctx.step)
        return torch.randperm(m, generator=torch.Generator().manual_seed(key)).tolist()

    # ------------------------------------------------------------ the loss
    def on_after_forward(self, ctx) -> None:
        if not self.active(ctx.epoch):
            return
        model = ctx.model
        mods = model.modalities
        m = len(mods)
        full = (1 << m) - 1
        if self.all_pairs:
            masks = list(range(1, full))
            links = None
        else:
            order = self.order(ctx)
            self.last_order = [mods[i] for i in order]
            chain = [full]
            for i in order[:-1]:
                chain.append(chain[-1] & ~(1 << i))
            masks = chain[1:]
            links = [(chain[k - 1], chain[k], order[k - 1]) for k in range(1, m)]
        first = ctx.features[mods[0]]
        dtype = head_dtype(model, first)
        feats = {k: (f if f.dtype == dtype else f.to(dtype)) for k, f in ctx.features.items()}
        out = model.head_coalitions(feats, masks_tensor(masks, m, first.device))
        values = {full: ctx.logits.to(dtype)}
        values.update({k: out[j] for j, k in enumerate(masks)})
        labels = ctx.labels
        if links is None:
            ce, pen = _all_pairs_parts(values, m, labels, self.hinge)
            links = [(k, k & ~(1 << i), i) for k in values if bin(k).count("1") >= 2
                     for i in range(m) if k >> i & 1]
        else:
            ce, pen = _chain_parts([values[k] for k in chain], labels, self.hinge)
        loss = ce + self.lam * pen
        ctx.losses["cml"] = loss - F.cross_entropy(values[full], labels)
        self._log(values, links, labels, mods, loss, pen)

    @torch.no_grad()
    def _log(self, values, links, labels, mods, loss, pen) -> None:
        acc = self._acc
        if not acc:
            acc.update(steps=0, loss=0.0, ce_full=0.0, ce_subsets=0.0, hinge=0.0,
                       rate={k: 0.0 for k in mods}, rise={k: 0.0 for k in mods},
                       links={k: 0 for k in mods})
        full = max(values)
        subsets = [k for k in values if k != full]
        acc["steps"] += 1
        acc["loss"] += float(loss)
        acc["hinge"] += float(pen)
        acc["ce_full"] += float(F.cross_entropy(values[full], labels))
        acc["ce_subsets"] += sum(float(F.cross_entropy(values[k], labels))
                                 for k in subsets) / len(subsets)
        per = {k: [] for k in mods}
        for a, b, i in links:
            rise = confidence(values[b]) - confidence(values[a])
            per[mods[i]].append((float((rise > 0).float().mean()), float(F.relu(rise).mean())))
        for k, rows in per.items():
            if rows:
                acc["rate"][k] += sum(r for r, _ in rows) / len(rows)
                acc["rise"][k] += sum(v for _, v in rows) / len(rows)
                acc["links"][k] += 1

    def on_train_epoch_end(self, ctx) -> None:
        """Epoch means: per modality, the violation rate and mean violation of the links that
        removed it (and the fraction of steps that removed it); the loss parts as scalars. The
        sums are all-reduced first, so every DDP rank logs the same numbers."""
        mods = list(ctx.model.modalities)
        active = self.active(ctx.epoch)
        self.record_epoch("lam", self.lam if active else 0.0)
        acc, self._acc = self._acc, {}
        if not active:
            return
        scalars = ("steps", "loss", "ce_full", "ce_subsets", "hinge")
        flat = [float(acc.get(k, 0.0)) for k in scalars]
        for part in ("rate", "rise", "links"):
            flat += [float(acc.get(part, {}).get(k, 0.0)) for k in mods]
        device = next((p.device for p in ctx.model.parameters()), None)  # NCCL: not on the CPU
        total = all_reduce_sum(torch.tensor(flat, dtype=torch.float64, device=device)).tolist()
        n = total[0]
        if n == 0:
            return
        m = len(mods)
        rate, rise, links = (total[5 + i * m:5 + (i + 1) * m] for i in range(3))
        self.record_epoch("violation_rate", {k: rate[i] / max(links[i], 1) for i, k in enumerate(mods)})
        self.record_epoch("violation", {k: rise[i] / max(links[i], 1) for i, k in enumerate(mods)})
        self.record_epoch("removed", {k: links[i] / n for i, k in enumerate(mods)})
        for i, key in enumerate(scalars[1:], start=1):
            self.record_epoch(key, total[i] / n)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)

