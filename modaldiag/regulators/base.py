"""The base class of every intervention, and what all of them share.

A regulator is a :class:`~modaldiag.training.Callback` with a few helpers:

- ``record(key, {m: value})`` accumulates per-step coefficients; their epoch means land in the
  History record under ``regulator.<key>.<m>`` (so every applied coefficient is logged);
- ``all_reduce_sum(t)`` sums a statistic over DDP ranks (a no-op without a process group), so
  every rank derives the same coefficient from the same numbers;
- ``conflicts``: names of regulators it cannot be combined with (checked by
  :func:`~modaldiag.training.callbacks.check_composition`, re-exported here);
- ``reset()``: forget run state; a fresh run calls it at ``on_fit_start`` (see below).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fusion import ConcatFusion, LateFusion
from ..training.callbacks import Callback, check_composition
from ..utils.distributed import all_reduce_sum, world_size
from ..utils.validation import NON_NEGATIVE_INT, POSITIVE_INT, validate_params

__all__ = ["Regulator", "all_reduce_sum", "check_composition", "encoder_parameters",
           "squared_norm", "true_class_prob_sums", "SEED", "EPOCH_END", "check_epoch_range",
           "check_released_head", "released_unimodal_logits", "released_score_sums",
           "seeded_linear", "seeded_unimodal_heads", "average_over_ranks", "wide", "EpochMeans", "masks_tensor",
           "head_dtype"]

#: a generator seed: a non-negative integer
SEED = NON_NEGATIVE_INT
#: an exclusive end epoch, or None for "to the end of training"
EPOCH_END = [POSITIVE_INT, None]


def check_epoch_range(owner: str, start_epoch: int, end_epoch: int | None) -> None:
    """Refuse an empty window ``[start_epoch, end_epoch)`` (it would regulate no epoch)."""
    if end_epoch is not None and end_epoch <= start_epoch:
        raise ValueError(f"{owner}: end_epoch must be greater than start_epoch (the window is "
                         f"[start_epoch, end_epoch)); got start_epoch={start_epoch}, "
                         f"end_epoch={end_epoch}. Use end_epoch=None to regulate to the end.")


@torch.no_grad()
def true_class_prob_sums(unimodal_logits, labels: torch.Tensor, modalities) -> torch.Tensor:
    """``(M,)``: per modality, the batch sum of the softmax probability of the true class."""
    return torch.stack([F.softmax(unimodal_logits[m].detach().float(), 1)
                        .gather(1, labels[:, None]).sum() for m in modalities])


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``sum_i ||t_i||^2`` in one fused call (None for an empty list)."""
    if not tensors:
        return None
    return torch.stack(torch._foreach_norm(tensors)).float().pow(2).sum()


def encoder_parameters(model, modality: str) -> list[torch.nn.Parameter]:
    """Trainable parameters of ``model.encoders[modality]`` (module identity)."""
    return [p for p in model.encoders[modality].parameters() if p.requires_grad]


def check_released_head(model, owner: str) -> None:
    """Raise unless the model's head has the released code's unimodal-logit definition."""
    fusion = getattr(model, "fusion", None)
    if isinstance(fusion, (ConcatFusion, LateFusion)):
        return
    kind = getattr(model, "fusion_type", type(fusion).__name__ if fusion is not None else "custom")
    raise ValueError(
        f"{owner}(variant='released') needs the released code's unimodal logits, which exist only "
        f"for a linear concat head (W_m f_m + b/M) and a per-modality linear head summed "
        f"(fc_m(f_m), fusion='late', the released SumFusion); this model's head is {kind!r}, "
        "where the released code defines none (its film/gated branches reuse the fused logits). "
        f"Use {owner}(variant='paper'), whose unimodal logits (other modalities at their baseline) "
        "exist for every head.")


def released_unimodal_logits(model, features, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """The released code's unimodal logits ``{m: (B, C)}``: ``W_m f_m + b/M`` (concat head),
    ``fc_m(f_m)`` (per-modality linear heads, ``late``). Raises ValueError for any other head.

    ``grad=False`` (default): detached, for scores. ``grad=True``: differentiable in the features,
    the head's weight slice and its bias share, as in the released unimodal cross-entropies
    (InfoReg's ``loss_out_a``/``loss_out_v``)."""
    check_released_head(model, "OGM/OPM/InfoReg")
    fusion = model.fusion
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        feats = {m: (f if grad else f.detach()) for m, f in features.items()}
        if isinstance(fusion, LateFusion):
            return {m: fusion.heads[m](feats[m]) for m in fusion.modalities}
        dims = [fusion.feature_dims[m] for m in fusion.modalities]
        weights = fusion.fc.weight.split(dims, dim=1)
        bias = fusion.fc.bias
        share = bias / len(dims) if bias is not None else 0.0
        return {m: feats[m].to(w.dtype) @ w.T + share
                for m, w in zip(fusion.modalities, weights, strict=True)}


def released_score_sums(model, features, labels) -> torch.Tensor:
    """``(M,)`` batch sums of the true-class softmax of the released unimodal logits."""
    uni = released_unimodal_logits(model, features)
    return torch.stack([F.softmax(uni[m].float(), 1).gather(1, labels[:, None]).sum()
                        for m in model.modalities])



def seeded_linear(d: int, c: int, gen: torch.Generator, device, dtype) -> nn.Linear:
    """``nn.Linear(d, c)`` with ``nn.Linear``'s default init law (weight and bias uniform in
    ``+-1/sqrt(d)``) drawn from ``gen`` in float64 on the CPU (device-independent), without
    touching the global RNG."""
    lin = nn.utils.skip_init(nn.Linear, d, c, device=device, dtype=dtype)
    bound = 1.0 / math.sqrt(d)
    with torch.no_grad():
        w = (torch.rand(c, d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        b = (torch.rand(c, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def seeded_unimodal_heads(model, dims, seed: int) -> dict[str, nn.Linear]:
    """One :func:`seeded_linear` head ``d_m -> C`` per modality of ``model`` (in its order, from
    one generator seeded with ``seed``), on the device and dtype of the model's parameters: the
    regulator-owned unimodal heads of MMPareto, G-Blending and UME (``heads="separate"``)."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    return {m: seeded_linear(int(dims[m]), int(model.num_classes), gen, device, dtype)
            for m in model.modalities}


def average_over_ranks(tensors: list[torch.Tensor]) -> None:
    """Average gradients over DDP ranks in one flat all-reduce (no-op in a single process)."""
    world = world_size()
    if world == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce_sum(flat).div_(world)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def masks_tensor(masks: list[int], m: int, device) -> torch.Tensor:
    """``(K, m)`` bool presence masks of coalitions given as bit sets (bit i: modality i)."""
    return torch.tensor([[(k >> i) & 1 for i in range(m)] for k in masks], dtype=torch.bool,
                        device=device)


def head_dtype(model, ref: torch.Tensor) -> torch.dtype:
    """The dtype the head computes in outside autocast (its first floating parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return ref.dtype


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (float64 stays float64; half/bfloat16 are widened)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class EpochMeans:
    """Per-epoch sample means of logged statistics, summed over DDP ranks once per epoch.

    ``add(key, name, total, count)`` accumulates a local sum and its sample count; ``reduce()``
    sums every accumulator over ranks in ONE all-reduce (keys are created in the same order on
    every rank, since every rank runs the same steps) and returns ``{key: {name: mean}}``.
    """

    def __init__(self):
        self.sums: dict[tuple[str, str], list[float]] = {}

    def add(self, key: str, name: str, total: float, count: float) -> None:
        acc = self.sums.setdefault((key, name), [0.0, 0.0])
        acc[0] += float(total)
        acc[1] += float(count)

    def reduce(self, device=None) -> dict[str, dict[str, float]]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        flat = torch.tensor([v for k in keys for v in self.sums[k]], dtype=torch.float64,
                            device=device)
        flat = all_reduce_sum(flat).cpu()
        out: dict[str, dict[str, float]] = defaultdict(dict)
        for i, (key, name) in enumerate(keys):
            total, count = float(flat[2 * i]), float(flat[2 * i + 1])
            out[key][name] = total / count if count else 0.0
        self.sums = {}
        return dict(out)



class Regulator(Callback):
    """Base class of InfoReg, Relearning, OGM, OPM, MMPareto and ValuationResampling.

    Run state (anchors, initial weights, traces, counters, cached parameter groups, pending
    masks) is created by :meth:`reset`, which ``__init__`` calls and which runs again at
    ``on_fit_start`` of every fresh run: one regulator object can drive any number of runs, each
    as if the object were new. State restored with :meth:`load_state_dict` (resuming a run) is
    kept by the next ``on_fit_start``. Constructor arguments are checked against the class's
    ``_parameter_constraints`` (see :func:`modaldiag.utils.validation.validate_params`).
    """

    single_instance = True
    #: declared constraints of the constructor arguments (name -> admissible constraints)
    _parameter_constraints: dict[str, list] = {}

    def __init__(self):
        self._restored = False
        self.reset()

    #: marks the optimizer parameter group of :meth:`owned_parameters` (one per regulator type)
    owned_group_key: str | None = None

    def owned_parameters(self) -> list[nn.Parameter]:
        """Parameters the regulator owns (separate heads, maps): none unless a subclass has them."""
        return []

    def register_parameters(self, optimizer) -> None:
        """Add :meth:`owned_parameters` to ``optimizer`` as one parameter group with the first
        group's hyperparameters, marked by :attr:`owned_group_key` (a no-op when they are already
        in it, or when there are none). A group left by an earlier run of this regulator type is
        removed first. Resuming a plain loop: :meth:`load_state_dict`, then this, then
        ``optimizer.load_state_dict``."""
        params = self.owned_parameters()
        if optimizer is None or not params:
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if all(id(p) in held for p in params):
            return
        key = self.owned_group_key or f"modaldiag_{type(self).__name__.lower()}"
        keep = []
        for g in optimizer.param_groups:
            if g.get(key):
                for p in g["params"]:
                    optimizer.state.pop(p, None)
            else:
                keep.append(g)
        optimizer.param_groups[:] = keep
        hyper = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                 for k, v in optimizer.param_groups[0].items() if k != "params"}
        optimizer.add_param_group({**hyper, "params": params, key: True})

    def _validate(self, **params) -> None:
        """Check constructor arguments against ``_parameter_constraints`` (ValueError/TypeError)."""
        validate_params(self._parameter_constraints, params, type(self).__name__)

    def reset(self) -> None:
        """Forget all run state (called at the start of every fresh run). Subclasses extend it."""
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[str, int] = defaultdict(int)
        self._last: dict[str, object] = {}
        self._groups_key = None
        self._groups: dict[str, list[torch.nn.Parameter]] = {}
        self._head: list[torch.nn.Parameter] = []

    def on_fit_start(self, ctx) -> None:
        """A fresh run resets the run state; a run resumed via ``load_state_dict`` keeps it."""
        if self._restored:
            self._restored = False
        else:
            self.reset()

    def on_fit_end(self, ctx) -> None:
        self._restored = False

    def _build_groups(self, model) -> None:
        key = (id(model), sum(1 for _ in model.parameters()))
        if key != self._groups_key:
            groups = {m: encoder_parameters(model, m) for m in model.modalities}
            enc_ids = {id(p) for ps in groups.values() for p in ps}
            self._head = [p for p in model.parameters() if p.requires_grad and id(p) not in enc_ids]
            self._groups, self._groups_key = groups, key

    def groups(self, model) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters per modality (module identity), keyed by modality name only;
        cached per model (rebuilt if the model or its parameter count changes). The head's
        parameters are :meth:`head_parameters`, never a key of this dict, so no modality name
        can collide with an internal key."""
        self._build_groups(model)
        return self._groups

    def head_parameters(self, model) -> list[torch.nn.Parameter]:
        """Trainable parameters outside every encoder (the fusion head), cached like :meth:`groups`."""
        self._build_groups(model)
        return self._head

    # ---------------------------------------------------------------- logging
    def record(self, key: str, values: dict[str, float]) -> None:
        """Accumulate per-step values; ``collect_logs`` returns their epoch means."""
        for m, v in values.items():
            self._sums[key][m] += float(v)
        self._counts[key] += 1

    def record_epoch(self, key: str, value) -> None:
        """Record one value for the whole epoch (e.g. the window state)."""
        self._last[key] = value

    def collect_logs(self) -> dict:
        """Epoch means of recorded values plus per-epoch values; resets the accumulators."""
        out: dict = {k: {m: s / self._counts[k] for m, s in sums.items()}
                     for k, sums in self._sums.items()}
        out.update(self._last)
        self._sums = defaultdict(lambda: defaultdict(float))
        self._counts = defaultdict(int)
        self._last = {}
        return out

    all_reduce_sum = staticmethod(all_reduce_sum)

    # ---------------------------------------------------------------- state
    def load_state_dict(self, state: dict) -> None:
        """Restore run state (subclasses load theirs, then call this); the next ``on_fit_start``
        keeps it instead of resetting."""
        if state and type(self).state_dict is Callback.state_dict:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}.")
        self._restored = True

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({params})"

    def config(self) -> dict:
        """Constructor arguments (for the run's configuration record)."""
        return {}
