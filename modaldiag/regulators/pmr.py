"""R8: PMR (Fan et al., CVPR 2023) — prototypical modal rebalance.

State: one prototype per class and modality, ``c_{m,k} in R^{d_m}``. At the start of every epoch
the model runs in eval mode, without gradients, over the first ``floor(fraction * n_batches)``
batches of the training loader (at least one; ``fraction = 0.1`` as released):
``c_{m,k}`` = mean of ``f_m`` over the class-k samples read, summed over DDP ranks before the
division. When earlier prototypes exist: ``c <- (1 - mu) c_new + mu c_old``. A class absent from
the batches read keeps ``c_old``; a class that never had a prototype makes the reader go on
through the epoch's batches until it is seen (both released codes divide by zero there).
Reading the loader changes nothing the training sees: modes, buffers and the global RNGs are
restored (:class:`~modaldiag.utils.torch_utils.preserved_state`), and so is the state of a
``torch.Generator`` attached to the loader's sampler; the prototypes are therefore computed from
the first batches of the same order the epoch then trains on.

Per step (inside ``[start_epoch, end_epoch)``)::

    d_{i,m,k} = ||f_{i,m} - c_{m,k}||_2            (torch.cdist, not squared)
    q_{i,m}   = softmax_k(-d_{i,m,.})
    s_m       = sum_i q_{i,m,y_i}                  (summed over DDP ranks)
    rho_m     = s_m / mean_{k != m} s_k
    beta_m    = alpha * 1[rho_m < 1]
    L         = CE(z) + sum_m beta_m * PCE_m,      PCE_m = mean_i -log q_{i,m,y_i}

Prototypes are constants; the gradient reaches encoder m through ``f_m`` only. M = 2 is exactly
the released rule (``rho_a > 1``: visual term, ``rho_a < 1``: audio term, ``= 1``: none).

The step in ``rho`` is kept for M > 2 (the paper's closed form for the coefficient was not
retrievable; the released code is a step): every modality with ``rho_m < 1`` gets ``alpha``. No
modality is *selected* by an argmax, so M > 2 adds no jump beyond the released rule's own jump at
``rho_m = 1``, and at M = 2 exactly one modality (the slower) is accelerated.

Optional prototype entropy regularisation (PER, ``per_weight > 0``, **[unverified]**: the paper's
form, weight and epochs were not retrievable and the released scripts lack it): for epochs
``< per_end_epoch``, every modality with ``rho_m > 1`` adds ``-per_weight * mean_i H(q_{i,m})``
(raising the entropy of the fast modality's prototype distribution, against premature
convergence).

Missing modalities (batches ``(inputs, labels, present)``): a prototype characterises modality m,
so ``c_{m,k}`` is the mean over the class-k samples *where m is present* (per-modality class
counts, summed over ranks); a class with no present sample of m keeps its old ``c_{m,k}``, and a
class is *seen* (usable in the softmax and as a target) once it has a prototype in every modality
(the reader goes on until then, as for an unseen class). Per step, m's prototype cross-entropy,
its entropy term and its score leave out the samples where m is absent (their features are the
baseline, not m's data). As the modalities then count different samples, ``s_m`` becomes the mean
over m's present samples times the number of samples with a prototype (the sum's scale; without
a mask it is the sum above, bit for bit); a step where m has no present sample leaves m neutral
(``rho_m = 1``, ``beta_m = 0``) and compares the others among themselves.

``variant="released"`` (authors' public code, fanyunfeng-bit/Modal-Imbalance-PMR,
``main_Prototype_grad.py``): the window is inclusive ``[start_epoch, end_epoch]``, and the momentum
is first applied at epoch 2 (the released code computes the prototypes after each epoch and skips
the momentum after epoch 0, so epochs 0 and 1 both start from fresh prototypes). BalanceBenchmark's
PMR (alpha 0.6, mu 0.5, window 0..80) replaces the prototype losses by OGM-style gradient
modulation for M > 2 — not PMR, not offered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..probes.unimodal import ogm_ratio
from ..utils.distributed import world_size
from ..utils.torch_utils import preserved_state, to_device
from ..utils.validation import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    Interval,
    Options,
    as_plain_int,
    unpack_batch_present,
)
from .base import EPOCH_END, Regulator, all_reduce_sum, check_epoch_range

__all__ = ["PMR", "pmr_coefficients", "prototype_log_probs"]


def pmr_coefficients(scores: dict[str, float], alpha: float) -> tuple[dict[str, float], dict[str, float]]:
    """``(beta, rho)``: ``beta_m = alpha`` where ``rho_m < 1`` (the slower modalities), else 0."""
    rho = ogm_ratio(scores)
    return {m: (alpha if r < 1 else 0.0) for m, r in rho.items()}, rho


def prototype_log_probs(features: torch.Tensor, prototypes: torch.Tensor,
                        seen: torch.Tensor | None = None) -> torch.Tensor:
    """``log softmax_k(-||f_i - c_k||_2)``, ``(B, C)``; classes with ``seen[k] = False`` (no
    prototype yet) get probability 0."""
    f = features.flatten(1).float()
    d = torch.cdist(f, prototypes.to(f.device, torch.float32),
                    compute_mode="donot_use_mm_for_euclid_dist")
    logits = -d
    if seen is not None and not bool(seen.all()):
        logits = logits.masked_fill(~seen.to(f.device)[None, :], float("-inf"))
    return F.log_softmax(logits, dim=1)


def _loader_generators(loader) -> list[torch.Generator]:
    """``torch.Generator`` objects a loader's shuffling draws from: on the loader, its sampler,
    its batch sampler, and samplers nested in those (e.g. a BatchSampler's RandomSampler)."""
    found, seen, todo = [], set(), [(loader, 0)]
    while todo:
        obj, depth = todo.pop()
        if obj is None or depth > 3:
            continue
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            seen.add(id(gen))
            found.append(gen)
        todo.extend((getattr(obj, name, None), depth + 1) for name in ("sampler", "batch_sampler"))
    return found


class PMR(Regulator):
    """PMR regulator (prototype cross-entropy for the slower modalities).

    Parameters
    ----------
    alpha : float > 0, default 1.0
        Weight of the prototype cross-entropy of each slower modality (authors' argument default;
        their CREMA-D runs mostly 2.0; BalanceBenchmark 0.6).
    momentum : float in [0, 1), default 0.2
        Prototype momentum ``mu``: ``c <- (1 - mu) c_new + mu c_old`` (authors 0.2; BB 0.5).
    fraction : float in (0, 1], default 0.1
        Share of the training loader's batches read for the prototypes at each epoch start
        (``floor(fraction * len(loader))``, at least 1; the released 1/10).
    per_weight : float >= 0, default 0.0
        Weight of the prototype entropy regulariser of the faster modalities (0: off)
        **[unverified]** form.
    per_end_epoch : int >= 0, default 10
        The entropy regulariser acts in epochs ``< per_end_epoch`` **[unverified]**.
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch, optional
        Regulate during ``[start_epoch, end_epoch)`` (``variant="released"``: end included);
        None: to the end. Prototypes are refreshed every epoch up to the window's end.
    variant : {"paper", "released"}, default "paper"
        "released": inclusive window, momentum first applied at epoch 2 (see the module notes).
    """

    _parameter_constraints = {"alpha": [POSITIVE], "momentum": [Interval(0, 1, closed="left")],
                              "fraction": [Interval(0, 1, closed="right")],
                              "per_weight": [NON_NEGATIVE], "per_end_epoch": [NON_NEGATIVE_INT],
                              "start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END,
                              "variant": [Options("paper", "released")]}

    def __init__(self, alpha: float = 1.0, momentum: float = 0.2, *, fraction: float = 0.1,
                 per_weight: float = 0.0, per_end_epoch: int = 10, start_epoch: int = 0,
                 end_epoch: int | None = None, variant: str = "paper"):
        per_end_epoch, start_epoch, end_epoch = (as_plain_int(v) for v in
                                                 (per_end_epoch, start_epoch, end_epoch))
        self._validate(alpha=alpha, momentum=momentum, fraction=fraction, per_weight=per_weight,
                       per_end_epoch=per_end_epoch, start_epoch=start_epoch, end_epoch=end_epoch,
                       variant=variant)
        if variant == "released":
            if end_epoch is not None and end_epoch < start_epoch:
                raise ValueError(f"PMR: end_epoch must be >= start_epoch for variant='released' "
                                 f"(the window is [start_epoch, end_epoch], end included); got "
                                 f"start_epoch={start_epoch}, end_epoch={end_epoch}.")
        else:
            check_epoch_range("PMR", start_epoch, end_epoch)
        super().__init__()
        self.alpha, self.momentum, self.fraction = float(alpha), float(momentum), float(fraction)
        self.per_weight, self.per_end_epoch = float(per_weight), per_end_epoch
        self.start_epoch, self.end_epoch, self.variant = start_epoch, end_epoch, variant

    def reset(self) -> None:
        """Forget the prototypes (a fresh run)."""
        super().reset()
        self.prototypes: dict[str, torch.Tensor] | None = None
        self.seen: torch.Tensor | None = None
        self.coefficients: dict[str, float] = {}

    def config(self) -> dict:
        return {"alpha": self.alpha, "momentum": self.momentum, "fraction": self.fraction,
                "per_weight": self.per_weight, "per_end_epoch": self.per_end_epoch,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                "variant": self.variant}

    # ------------------------------------------------------------------ window
    def _before_end(self, epoch: int) -> bool:
        if self.end_epoch is None:
            return True
        return epoch <= self.end_epoch if self.variant == "released" else epoch < self.end_epoch

    def active(self, epoch: int) -> bool:
        """Whether the prototype losses act in ``epoch``."""
        return epoch >= self.start_epoch and self._before_end(epoch)

    # ------------------------------------------------------------------ prototypes
    def on_train_epoch_start(self, ctx) -> None:
        if not self._before_end(ctx.epoch):
            return
        if ctx.train_loader is None:
            raise ValueError("PMR computes class prototypes from the training loader at every "
                             "epoch start; pass it to Regulation.epoch_start(epoch, train_loader).")
        use_momentum = self.prototypes is not None and (self.variant == "paper" or ctx.epoch >= 2)
        self.update_prototypes(ctx.model, ctx.train_loader, device=ctx.device,
                               use_momentum=use_momentum)

    @torch.no_grad()
    def update_prototypes(self, model, loader, *, device=None, use_momentum: bool = True) -> None:
        """Read the first ``floor(fraction * len(loader))`` batches (eval mode, no grad, model
        and RNG states restored), all-reduce per-class feature sums and counts, and update the
        prototypes (momentum with earlier ones when ``use_momentum``)."""
        try:
            n_batches = len(loader)
        except TypeError:
            raise ValueError("PMR reads the first tenth of the training loader's batches at every "
                             "epoch start and needs its length; pass a loader with len() (a "
                             "DataLoader), not a generator.") from None
        budget = max(1, math.floor(self.fraction * n_batches))
        mods = model.modalities
        num_classes = int(model.num_classes)
        gens = _loader_generators(loader)
        dev = device if device is not None else next(
            (p.device for p in model.parameters()), torch.device("cpu"))
        gen_states = [g.get_state() for g in gens]
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}  # per modality: class counts of present samples
        labels_read = None  # class counts of every sample read
        read = 0
        try:
            with preserved_state(model):
                model.eval()
                it = iter(loader)
                exhausted = False
                while True:
                    local = {m: None for m in mods}
                    zeros = torch.zeros(num_classes, dtype=torch.float64, device=dev)
                    local_counts = {m: zeros.clone() for m in mods}
                    local_labels = zeros.clone()
                    for _ in range(budget):
                        try:
                            batch = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        inputs, labels, present = unpack_batch_present(batch, mods,
                                                                       batch_index=read)
                        feats = model.encode(to_device(inputs, dev))
                        labels = labels.to(dev).long()
                        ones = torch.ones_like(labels, dtype=torch.float64)
                        for m in mods:
                            f = feats[m].detach().flatten(1).double()
                            if local[m] is None:
                                local[m] = torch.zeros(num_classes, f.shape[1], dtype=torch.float64,
                                                       device=f.device)
                            keep = (present or {}).get(m)
                            if keep is None:
                                local[m].index_add_(0, labels, f)
                                local_counts[m].index_add_(0, labels, ones)
                            else:  # an absent sample's placeholder is not m's data: skipped
                                keep = keep.to(f.device)
                                local[m].index_add_(0, labels[keep], f[keep])
                                local_counts[m].index_add_(0, labels[keep], ones[keep])
                        local_labels.index_add_(0, labels, ones)
                        read += 1
                    for m in mods:
                        if local[m] is None:  # this rank read nothing: size from the model
                            d = self._feature_dim(model, m, sums)
                            local[m] = torch.zeros(num_classes, d, dtype=torch.float64, device=dev)
                    flat = torch.cat([local[m].flatten() for m in mods]
                                     + [local_counts[m] for m in mods]
                                     + [local_labels, torch.tensor([float(exhausted)],
                                                                   dtype=torch.float64, device=dev)])
                    all_reduce_sum(flat)
                    offset = 0
                    for m in mods:
                        n = local[m].numel()
                        part = flat[offset:offset + n].view_as(local[m])
                        sums[m] = part if m not in sums else sums[m] + part
                        offset += n
                    for m in mods:
                        part = flat[offset:offset + num_classes]
                        counts[m] = part if m not in counts else counts[m] + part
                        offset += num_classes
                    part = flat[offset:offset + num_classes]
                    labels_read = part if labels_read is None else labels_read + part
                    all_exhausted = int(round(float(flat[-1]))) >= world_size()
                    known = self.seen.to(dev) if self.seen is not None else torch.zeros(
                        num_classes, dtype=torch.bool, device=dev)
                    # a class still without a prototype in some modality: read on
                    missing = torch.stack([counts[m] == 0 for m in mods]).any(0) & ~known
                    if not bool(missing.any()) or all_exhausted:
                        break
        finally:
            for g, s in zip(gens, gen_states, strict=True):
                g.set_state(s)
        self._apply(sums, counts, use_momentum)
        self.record_epoch("prototype_samples",
                          {str(k): int(labels_read[k]) for k in range(num_classes)})
        self.record_epoch("prototype_batches", read)
        absent = {m: int(labels_read.sum() - counts[m].sum()) for m in mods}
        if any(absent.values()):  # samples read whose modality m was absent (not in c_m)
            self.record_epoch("prototype_absent", absent)

    @staticmethod
    def _feature_dim(model, m, sums) -> int:
        if m in sums:
            return sums[m].shape[1]
        dims = getattr(model, "feature_dims", None)
        if isinstance(dims, dict) and m in dims:
            return int(dims[m])
        raise ValueError(f"PMR: this rank read no training batch and the model declares no "
                         f"feature dimension for {m!r}; give every rank at least one batch.")

    def _apply(self, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
               use_momentum: bool) -> None:
        """Prototypes from per-class feature sums and per-modality class counts of the samples
        where the modality is present. A class is *seen* once it has a prototype in every
        modality; a class not read (for m) keeps its old prototype of m."""
        first = next(iter(counts.values()))
        old_seen = self.seen.to(first.device) if self.seen is not None else torch.zeros(
            first.shape, dtype=torch.bool, device=first.device)
        new_protos = {}
        everywhere = None
        for m, s in sums.items():
            present = counts[m] > 0
            everywhere = present if everywhere is None else everywhere & present
            new = (s / counts[m].clamp_min(1)[:, None]).float()
            old = self.prototypes[m].to(new.device) if self.prototypes is not None else None
            if old is None:
                c = torch.where(present[:, None], new, torch.zeros_like(new))
            else:
                mixed = (1 - self.momentum) * new + self.momentum * old if use_momentum else new
                # seen now: mix with the old one if it existed; unseen now: keep the old one
                c = torch.where(present[:, None], torch.where(old_seen[:, None], mixed, new), old)
            new_protos[m] = c
        self.prototypes = new_protos
        self.seen = old_seen | everywhere

    # ------------------------------------------------------------------ per step
    def on_after_forward(self, ctx) -> None:
        if not self.active(ctx.epoch) or self.prototypes is None:
            return
        model, labels = ctx.model, ctx.labels
        mods = model.modalities
        seen = self.seen
        log_q = {m: prototype_log_probs(ctx.features[m], self.prototypes[m], seen) for m in mods}
        valid = seen.to(labels.device)[labels]  # samples whose class has a prototype
        present = ctx.present
        keep = {m: None if present is None or m not in present else present[m].to(labels.device)
                for m in mods}
        nll, probs, nlls, counts = {}, [], [], []
        for m in mods:
            ok = valid if keep[m] is None else valid & keep[m]  # absent rows: not m's data
            n_m = ok.sum()
            lq_y = log_q[m].gather(1, labels[:, None]).squeeze(1)
            lq_y = torch.where(ok, lq_y, torch.zeros_like(lq_y))  # 0 for excluded samples
            nll[m] = -lq_y.sum() / n_m.clamp_min(1)
            probs.append(torch.where(ok, lq_y.detach().exp(), torch.zeros_like(lq_y)).sum())
            nlls.append(-lq_y.detach().sum())
            counts.append(n_m.to(probs[0].dtype))
        stats = probs + nlls + counts + [valid.sum().to(probs[0].dtype)]
        total = all_reduce_sum(torch.stack(stats).double())
        k = len(mods)
        n_m = {m: float(total[2 * k + i]) for i, m in enumerate(mods)}
        pce_logged = {m: float(total[k + i]) / max(n_m[m], 1.0) for i, m in enumerate(mods)}
        n_valid = float(total[-1])
        # decided on all-reduced counts, so every DDP rank takes the same branch
        uniform = all(n_m[m] == n_valid for m in mods)
        if uniform:  # nothing absent among the samples with a prototype: the sums, as released
            scores = {m: float(total[i]) for i, m in enumerate(mods)}
        else:  # a sum over unequal counts is no score: the mean, on the all-present sum's scale
            scores = {m: float(total[i]) * n_valid / n_m[m] if n_m[m] > 0 else 0.0
                      for i, m in enumerate(mods)}
        scored = [m for m in mods if n_m[m] > 0]
        if uniform or len(scored) == len(mods):
            beta, rho = pmr_coefficients(scores, self.alpha)
        else:  # no sample of m to score: m is neutral (rho 1, no term), the rest compare
            beta, rho = {m: 0.0 for m in mods}, {m: 1.0 for m in mods}
            if len(scored) > 1:
                part_beta, part_rho = pmr_coefficients({m: scores[m] for m in scored}, self.alpha)
                beta.update(part_beta)
                rho.update(part_rho)
        self.coefficients = beta
        for m in mods:
            if beta[m] > 0:
                ctx.losses[f"pmr/{m}"] = beta[m] * nll[m]
        per = {m: 0.0 for m in mods}
        if self.per_weight > 0 and ctx.epoch < self.per_end_epoch:
            for m in mods:
                if rho[m] > 1:
                    lq = log_q[m]  # -inf for classes without a prototype: 0 log 0 = 0
                    finite = torch.where(torch.isfinite(lq), lq, torch.zeros_like(lq))
                    ent = -(lq.exp() * finite).sum(1)
                    ent = ent.mean() if keep[m] is None else (  # over the present rows only
                        ent[keep[m]].sum() / keep[m].sum().clamp_min(1))
                    ctx.losses[f"pmr/entropy/{m}"] = -self.per_weight * ent
                    per[m] = self.per_weight
        self.record("score", scores)
        self.record("rho", rho)
        self.record("beta", beta)
        self.record("pce", pce_logged)
        self.record("per", per)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if self.prototypes is None:
            return {}
        return {"prototypes": {m: c.detach().clone() for m, c in self.prototypes.items()},
                "seen": self.seen.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the prototypes (the next ``on_fit_start`` keeps them)."""
        state = state or {}
        protos = state.get("prototypes")
        super().load_state_dict(state)
        self.prototypes = ({m: c.detach().clone() for m, c in protos.items()}
                           if protos is not None else None)
        self.seen = state["seen"].detach().clone() if protos is not None else None

