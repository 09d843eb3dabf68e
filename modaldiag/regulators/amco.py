"""R14: AMCo (Zhou, Liang, Zheng, Xuan, Kumada, ICASSP 2023) — adaptive mask co-optimisation.

"Adaptive Mask Co-Optimization for Modal Dependence in Multimodal Learning". No paper text or
authors' code was reachable: everything here follows BalanceBenchmark's trainer and model
(``AMCo_trainer.py``, ``BaseClassifierAMCoModel``) **[unverified]** against the paper.

Per step t (inside ``[start_epoch, end_epoch)``), with unimodal logits ``z_m`` (the head with the
other modalities at their baseline; ``variant="released"``: ``W_m f_m + b/M``):

- **dependence** (decided after step t, used at t + 1): the joint softmax over the concatenation
  ``[z_1, ..., z_M]`` (M*C entries); ``mass_m`` = batch mean of the probability on ``z_m``'s
  entries (summed over DDP ranks before the mean). m is dependent if ``mass_m > 2 sigma / M``
  (M = 2: ``mass_m > sigma``, BB's rule; M > 2: the threshold scales with the fair share ``1/M``,
  so the default ``sigma = 0.5`` flags a modality above its fair share for every M).
  ``variant="released"`` keeps ``mass_m > sigma`` for every M, and measures the mass on the
  *masked* logits (BB), which feeds the mask back into its own trigger; the paper form measures
  the unmasked logits.
- **mask schedule**: ``p_t = sin(pi/2 * min(eps, l_t) / eps)``, ``l_t = b * e / 10`` for batch b of
  epoch e (BB: restarts every epoch; epoch 0 never masks; epoch e reaches ``p = 1`` after
  ``ceil(10 eps / e)`` batches). ``n_t = floor(p_t C)`` random class logits of each dependent
  ``z_m`` are set to 0 (``mask_target="features"``: ``floor(p_t d_m)`` random feature units of
  ``f_m`` are set to the baseline before the head). Masks come from a generator seeded by
  ``(seed, optimizer step)``: new at every step, identical on every DDP rank; one mask per
  dependent modality (``variant="released"``: one mask shared by all of them, as BB).
  BB builds the mask as shape ``(2, C)`` and multiplies it into ``(B, C)`` logits, which only
  broadcasts for B = 2 (static reading); here the ``(C,)`` mask applies to every sample.
- **co-optimisation**: a learnable ``C x C`` linear map A (owned by the regulator, like
  MMPareto's separate heads: seeded init, added to the run's optimizer as one parameter group,
  saved in ``state_dict``, gradients averaged over DDP ranks) fuses the masked unimodal logits:
  ``z_A = A(sum_m z~_m)``; loss terms ``CE(z_A) + sum_m CE(z~_m)``.

**Evaluation uses the model's own head unchanged.** A, the masks and the extra losses act only in
training; validation and test logits are ``h(f)``. So that the head that predicts is also the head
that is trained, the paper form keeps the model's multimodal ``CE(h(f))`` and adds the AMCo terms
(``head_loss=True``). ``variant="released"`` (``head_loss=False``) replaces ``CE(h(f))`` by
``CE(A(sum_m z~_m))`` as BB does — for a linear concat head ``sum_m (W_m f_m + b/M) = h(f)``, so
unmasked this is ``CE(A(h(f)))``. BB, by static reading, also evaluates without A (its
``validation_step`` recomputes the output as ``sum_m z_m`` after the forward), so there too the
evaluated ``h(f)`` is trained only through A.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.distributed import world_size
from ..utils.validation import (
    BOOL,
    NON_NEGATIVE_INT,
    POSITIVE,
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
    check_released_head,
    released_unimodal_logits,
    seeded_linear,
)

__all__ = ["AMCo", "amco_schedule", "joint_softmax_mass"]

#: marks the optimizer parameter group that holds AMCo's fusion map A
A_GROUP_KEY = "modaldiag_amco_fusion"


def amco_schedule(batch_index: int, epoch: int, eps: float, num: int) -> tuple[float, int]:
    """``(p_t, n_t)``: ``p_t = sin(pi/2 * min(eps, l)/eps)`` with ``l = batch_index * epoch / 10``
    (BB's schedule), ``n_t = floor(p_t * num)``."""
    level = batch_index * epoch / 10.0
    p = math.sin(math.pi / 2 * min(eps, level) / eps)
    return p, int(math.floor(p * num + 1e-9))


@torch.no_grad()
def joint_softmax_mass(logits: list[torch.Tensor]) -> torch.Tensor:
    """``(B, M)``: per sample, the probability mass the joint softmax over ``[z_1, ..., z_M]``
    puts on each ``z_m``'s entries (rows sum to 1)."""
    joint = F.softmax(torch.cat([z.detach().float() for z in logits], dim=1), dim=1)
    sizes = [z.shape[1] for z in logits]
    return torch.stack([part.sum(1) for part in joint.split(sizes, dim=1)], dim=1)


class AMCo(Regulator):
    """AMCo regulator (masks the class logits, or features, of dependent modalities).

    Parameters
    ----------
    sigma : float in (0, 1), default 0.5
        Dependence threshold: m is dependent if ``mass_m > 2 sigma / M`` (``variant="released"``:
        ``mass_m > sigma``).
    eps : float > 0, default 0.3
        Level at which the mask rate ``p_t`` reaches 1.
    mask_target : {"logits", "features"}, default "logits"
        Mask ``floor(p_t C)`` class logits of ``z_m`` (BB) or ``floor(p_t d_m)`` feature units of
        ``f_m`` (set to the baseline before the head; BB's unused ``U`` suggests the paper masks
        feature units).
    head_loss : bool, optional
        Keep the model's multimodal ``CE(h(f))`` (the head evaluation uses). Default True for
        ``variant="paper"``, False for ``variant="released"`` (BB: ``CE(A(sum z~_m))`` instead).
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch, optional
        Active during ``[start_epoch, end_epoch)`` (``variant="released"``: end included, BB's
        ``0..80``); None: to the end. Outside it the regulator does nothing.
    seed : int >= 0, default 0
        Seed of A's initialisation and of the masks (step t draws from ``(seed, t)``).
    variant : {"paper", "released"}, default "paper"
        "released": BB's unimodal logits ``W_m f_m + b/M`` (concat or late heads only), threshold
        ``sigma`` for every M, mass from the masked logits, one shared mask, inclusive window,
        ``head_loss=False``.
    """

    owned_group_key = A_GROUP_KEY
    _parameter_constraints = {"sigma": [Interval(0, 1, closed="neither")], "eps": [POSITIVE],
                              "mask_target": [Options("logits", "features")],
                              "head_loss": [BOOL, None], "start_epoch": [NON_NEGATIVE_INT],
                              "end_epoch": EPOCH_END, "seed": [SEED],
                              "variant": [Options("paper", "released")]}

    def __init__(self, sigma: float = 0.5, eps: float = 0.3, *, mask_target: str = "logits",
                 head_loss: bool | None = None, start_epoch: int = 0, end_epoch: int | None = None,
                 seed: int = 0, variant: str = "paper"):
        start_epoch, end_epoch, seed = (as_plain_int(v) for v in (start_epoch, end_epoch, seed))
        self._validate(sigma=sigma, eps=eps, mask_target=mask_target, head_loss=head_loss,
                       start_epoch=start_epoch, end_epoch=end_epoch, seed=seed, variant=variant)
        if variant == "released":
            if end_epoch is not None and end_epoch < start_epoch:
                raise ValueError(f"AMCo: end_epoch must be >= start_epoch for variant='released' "
                                 f"(the window is [start_epoch, end_epoch], end included); got "
                                 f"start_epoch={start_epoch}, end_epoch={end_epoch}.")
        else:
            check_epoch_range("AMCo", start_epoch, end_epoch)
        self.variant = variant
        super().__init__()
        self.sigma, self.eps, self.mask_target = float(sigma), float(eps), mask_target
        self.head_loss = (variant == "paper") if head_loss is None else head_loss
        self.start_epoch, self.end_epoch, self.seed = start_epoch, end_epoch, seed
        # the released logits come from the features; the paper's from the head
        self.needs_unimodal_logits = variant == "paper"

    def reset(self) -> None:
        """Forget A, the dependence flags and the last masks (a fresh run)."""
        super().reset()
        self.fusion: nn.Linear | None = None
        self.dependent: dict[str, bool] = {}
        self.last_masks: dict[str, torch.Tensor] = {}
        #: unimodal logits of the unmasked features (feature masking, paper form), for the mass
        self._unmasked: dict[str, torch.Tensor] | None = None

    def config(self) -> dict:
        return {"sigma": self.sigma, "eps": self.eps, "mask_target": self.mask_target,
                "head_loss": self.head_loss, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch, "seed": self.seed, "variant": self.variant}

    def active(self, epoch: int) -> bool:
        """Whether AMCo acts in ``epoch``."""
        if epoch < self.start_epoch:
            return False
        if self.end_epoch is None:
            return True
        return epoch <= self.end_epoch if self.variant == "released" else epoch < self.end_epoch

    def threshold(self, num_modalities: int) -> float:
        """The mass above which a modality is dependent: ``2 sigma / M`` (released: ``sigma``)."""
        return self.sigma if self.variant == "released" else 2.0 * self.sigma / num_modalities

    # ------------------------------------------------------------ the fusion map A
    def owned_parameters(self) -> list[nn.Parameter]:
        """A's weight and bias (empty before creation)."""
        return [] if self.fusion is None else [self.fusion.weight, self.fusion.bias]

    def _create_fusion(self, model) -> None:
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        c = int(model.num_classes)
        self.fusion = seeded_linear(c, c, torch.Generator().manual_seed(self.seed), device, dtype)

    def on_fit_start(self, ctx) -> None:
        if self.variant == "released":
            check_released_head(ctx.model, "AMCo")
        super().on_fit_start(ctx)
        if self.fusion is None:
            self._create_fusion(ctx.model)
        self.register_parameters(ctx.optimizer)

    # ------------------------------------------------------------ masks
    def _masks(self, ctx, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        """Keep-masks ``{m: (size_m,) bool}`` for the dependent modalities of this step
        (``floor(p_t size_m)`` entries False), drawn from a generator seeded by (seed, step)."""
        dep = [m for m in ctx.model.modalities if self.dependent.get(m, False)]
        p, _ = amco_schedule(ctx.batch_index, ctx.epoch, self.eps, 1)
        masks: dict[str, torch.Tensor] = {}
        if not dep or p <= 0:
            return masks
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        shared = None
        for m in dep:
            size = sizes[m]
            if self.variant == "released" and shared is not None and shared.numel() == size:
                masks[m] = shared  # BB: one mask for every dependent modality
                continue
            keep = torch.ones(size, dtype=torch.bool)
            keep[torch.randperm(size, generator=gen)[:int(math.floor(p * size + 1e-9))]] = False
            masks[m] = shared = keep
        return masks

    def transform_features(self, features, ctx):
        self.last_masks = {}
        self._unmasked = None
        if self.mask_target != "features" or not self.active(ctx.epoch):
            return features
        masks = self._masks(ctx, {m: features[m][0].numel() for m in features})
        if not masks:
            return features
        if self.variant == "paper":  # the mass is measured on the unmasked features' logits;
            # computed here, inside the forward (and its autocast), without gradient
            with torch.no_grad():
                self._unmasked = ctx.model.unimodal_logits(
                    {m: f.detach() for m, f in features.items()})
        out = dict(features)
        for m, keep in masks.items():
            f = features[m]
            base = ctx.model.absent_feature(m, f)
            k = keep.to(f.device).view((1,) + tuple(f.shape[1:]))
            out[m] = torch.where(k, f, base)
        self.last_masks = masks
        return out

    # ------------------------------------------------------------ per step
    def on_after_forward(self, ctx) -> None:
        if not self.active(ctx.epoch):
            return
        model, labels = ctx.model, ctx.labels
        mods = model.modalities
        num_classes = int(model.num_classes)
        if self.fusion is None:  # a run started without on_fit_start (defensive)
            self._create_fusion(model)
            self.register_parameters(ctx.optimizer)
        if self.variant == "released":
            uni = released_unimodal_logits(model, ctx.features, grad=True)
        else:
            uni = ctx.compute_unimodal_logits()
        p, n = amco_schedule(ctx.batch_index, ctx.epoch, self.eps, num_classes)
        applied = {m: 0 for m in mods}
        masked = dict(uni)
        if self.mask_target == "logits":
            masks = self._masks(ctx, {m: num_classes for m in mods})
            for m, keep in masks.items():
                masked[m] = uni[m] * keep.to(uni[m].device, uni[m].dtype)[None, :]
                applied[m] = int((~keep).sum())
            self.last_masks = masks
        else:
            for m, keep in self.last_masks.items():
                applied[m] = int((~keep).sum())
        dep_used = {m: float(self.dependent.get(m, False)) for m in mods}
        # co-optimisation: A(sum of the masked unimodal logits) and the unimodal CEs
        lin = self.fusion
        fused = lin(sum(masked[m].to(lin.weight.dtype) for m in mods))
        fused_ce = F.cross_entropy(fused, labels)
        if self.head_loss:
            ctx.losses["amco/fused"] = fused_ce
        else:
            ctx.losses["multimodal"] = fused_ce
        for m in mods:
            ctx.losses[f"amco/unimodal/{m}"] = F.cross_entropy(masked[m].float(), labels)
        # dependence for the next step, from rank-summed masses
        if self.variant == "released":
            source = [masked[m] for m in mods]
        elif self._unmasked is not None:  # features were masked: unimodal logits of the originals
            source = [self._unmasked[m] for m in mods]
        else:
            source = [uni[m] for m in mods]
        mass = joint_softmax_mass(source)
        stats = torch.cat([mass.sum(0).double(),
                           torch.tensor([mass.shape[0]], dtype=torch.float64, device=mass.device)])
        all_reduce_sum(stats)
        mean_mass = {m: float(stats[i] / stats[-1]) for i, m in enumerate(mods)}
        limit = self.threshold(len(mods))
        self.dependent = {m: mean_mass[m] > limit for m in mods}
        self._unmasked = None
        self.record("mass", mean_mass)
        self.record("dependent", dep_used)
        self.record("masked", applied)
        self.record("schedule", {"p": p, "n": n})

    def on_before_optimizer_step(self, ctx) -> None:
        """Average A's gradient over DDP ranks (DDP syncs only the model's parameters). Inside
        the window every rank holds a gradient (zeros if its batch was skipped), so every rank
        joins the all-reduce; outside it no rank does."""
        world = world_size()
        if world == 1 or not self.active(ctx.epoch):
            return
        for p in self.owned_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad).div_(world)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if self.fusion is None:
            return {}
        return {"fusion": {"weight": self.fusion.weight.detach().clone(),
                           "bias": self.fusion.bias.detach().clone()},
                "dependent": dict(self.dependent)}

    def load_state_dict(self, state: dict) -> None:
        """Restore A (created here, on the saved tensors' device and dtype) and the dependence
        flags; the next ``on_fit_start`` keeps them and registers A with the run's optimizer."""
        state = state or {}
        saved = state.get("fusion")
        fusion = None
        if saved:
            w, b = saved["weight"], saved["bias"]
            fusion = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], device=w.device,
                                        dtype=w.dtype)
            with torch.no_grad():
                fusion.weight.copy_(w)
                fusion.bias.copy_(b)
        super().load_state_dict(state)
        self.fusion = fusion
        self.dependent = dict(state.get("dependent", {}))
