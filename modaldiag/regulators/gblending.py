"""R13: G-Blending (Wang, Tran, Feiszli, CVPR 2020) — gradient blending by overfitting-to-
generalisation ratio.

Branches ``k in {1..M, fused}``: one classifier per modality plus the fused output ``z = h(f)``.
Training loss ``L = sum_k w_k CE(z^(k))`` with ``sum_k w_k = 1``. The modality branches are, by
default, one regulator-owned linear head per modality on its features (``heads="separate"``,
used only in training; prediction stays ``z``); ``heads="shared"`` uses the model's unimodal
logits ``z_m = h(f, present={m})``.

Weights (online G-Blend): at the start of every ``super_epoch``-th epoch (epochs 0, N, 2N, ...)
and for each branch k, a deep copy of the model (and of the owned heads) with a copy of the
optimizer (its state included) is trained on ``CE(z^(k))`` alone for N epochs of the training
loader. At both ends the mean per-sample cross-entropy of branch k is measured in eval mode on the
training set (``L^T``) and on the validation loader (``L^V``)::

    O = L^V - L^T,   dO_k = O_end - O_start,   dG_k = L^V_start - L^V_end,
    w~_k = max(dG_k, 0) / (dO_k^2 + 1e-12),    w = w~ / sum(w~)   (uniform when every w~_k = 0).

The live model, optimizer, owned heads, the global RNG streams and the loaders' generators end the
estimate exactly as they began (the trial works on copies inside ``preserved_state``).

Missing modalities (batches ``(inputs, labels, present)``): the fused branch sees the baseline for
an absent entry (``model.mask_features``, as in the step); modality m's branch (its CE in the step,
its trial training and its four loss measurements) uses only the samples where m is present: a
baseline row is not m's data, so counting it would measure the head's bias, not m's overfitting.
Trial training selects those rows before encoding (a BatchNorm never sees a placeholder); a trial
batch with no such row (on any rank), or one row under a BatchNorm in training mode, is skipped.

DDP: every loss sum and sample count is all-reduced before the weights are formed, and the trial
copies average their gradients over ranks at every step (as DDP would), so every rank derives the
same weights. The owned heads live outside the DDP module, so their gradients are averaged over
ranks before each optimizer step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.distributed import all_reduce_sum, world_size
from ..utils.torch_utils import module_device, preserved_state, to_device
from ..utils.validation import (
    POSITIVE_INT,
    Options,
    Satisfies,
    as_plain_int,
    unpack_batch,
    unpack_batch_present,
)
from .base import SEED, Regulator, average_over_ranks, seeded_unimodal_heads

__all__ = ["GBlending", "gblending_weights"]

#: marks the optimizer parameter group that holds G-Blending's per-modality heads
HEADS_GROUP_KEY = "modaldiag_gblending_heads"
#: the ``dO^2`` guard of the weight formula
EPS = 1e-12


def gblending_weights(lt_start, lv_start, lt_end, lv_end, *, variant: str = "paper",
                      eps: float = EPS) -> tuple[list[float], list[float], list[float]]:
    """``(w, dG, dO)`` from the four losses of each branch (sequences of equal length K).

    ``dG_k = L^V_start - L^V_end``; ``dO_k = (L^V_end - L^T_end) - (L^V_start - L^T_start)``;
    ``w~_k = max(dG_k, 0) / (dO_k^2 + eps)`` (``variant="paper"``) or ``|dG_k| / (dO_k^2 + eps)``
    (``"released"``: BalanceBenchmark's ``abs(g / o**2)``, which loses the sign of ``dG``);
    ``w = w~ / sum(w~)``, uniform when every ``w~_k`` is 0. Non-finite ``w~_k`` (a diverged trial)
    count as 0. Computed in float64.
    """
    lt_start, lv_start, lt_end, lv_end = ([float(v) for v in seq]
                                          for seq in (lt_start, lv_start, lt_end, lv_end))
    k = len(lt_start)
    if not (k == len(lv_start) == len(lt_end) == len(lv_end)) or k == 0:
        raise ValueError("gblending_weights: the four loss sequences must be non-empty and of "
                         "equal length (one entry per branch).")
    d_g = [vs - ve for vs, ve in zip(lv_start, lv_end, strict=True)]
    d_o = [(ve - te) - (vs - ts)
           for ts, vs, te, ve in zip(lt_start, lv_start, lt_end, lv_end, strict=True)]
    raw = []
    for g, o in zip(d_g, d_o, strict=True):
        num = abs(g) if variant == "released" else max(g, 0.0)
        r = num / (o * o + eps)
        raw.append(r if math.isfinite(r) else 0.0)
    total = sum(raw)
    w = [r / total for r in raw] if total > 0 else [1.0 / k] * k
    return w, d_g, d_o


def _loader_generators(loader) -> list[torch.Generator]:
    """The torch Generators a DataLoader draws its order from (its own, its samplers')."""
    found, seen = [], set()
    candidates = [getattr(loader, "generator", None)]
    for attr in ("sampler", "batch_sampler"):
        s = getattr(loader, attr, None)
        candidates += [getattr(s, "generator", None),
                       getattr(getattr(s, "sampler", None), "generator", None)]
    for g in candidates:
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen.add(id(g))
            found.append(g)
    return found


class _PreservedLoaders:
    """Restore the generator states of the given loaders on exit (shuffling order untouched)."""

    def __init__(self, *loaders):
        self.gens = [g for ld in loaders if ld is not None for g in _loader_generators(ld)]

    def __enter__(self):
        self.states = [g.get_state() for g in self.gens]

    def __exit__(self, *exc) -> bool:
        for g, s in zip(self.gens, self.states, strict=True):
            g.set_state(s)
        return False


class GBlending(Regulator):
    """G-Blending regulator (online mode): per-branch loss weights from trial training.

    Parameters
    ----------
    super_epoch : int >= 1, default 10
        N: the weights are re-estimated at the start of epochs 0, N, 2N, ... by N trial epochs per
        branch ((M + 1) * N extra training epochs per estimate). 10 is BalanceBenchmark's
        ``super_epoch``; the paper's value is not verified. ``variant="released"`` needs N >= 2
        (it measures after the first and after the last trial epoch).
    variant : {"paper", "released"}, default "paper"
        ``"released"`` reproduces BalanceBenchmark's estimate: ``|dG| / dO^2`` (sign of ``dG``
        lost); losses are sums of batch-mean losses, the training one accumulated during the trial
        epoch in train mode; the start is measured after the first trial epoch; a modality
        branch's trial trains the fused output with the other modalities' raw inputs set to zero;
        the trial optimizer restarts from empty state at the initial learning rate. Also sets
        ``heads="shared"`` unless given.
    heads : {None, "separate", "shared"}, default None
        Modality branches: one regulator-owned ``nn.Linear(d_m, C)`` per modality
        (``"separate"``, the paper's per-modality classifiers; registered with the optimizer as
        one extra parameter group and saved in ``state_dict``) or the model's unimodal logits
        ``z_m = h(f, present={m})`` (``"shared"``, BalanceBenchmark). None: ``"separate"`` for
        ``variant="paper"``, ``"shared"`` for ``"released"``.
    seed : int >= 0, default 0
        Seed of the separate heads' initialisation (identical on every DDP rank).
    val_loader : iterable, optional
        Held-out data for the weights' validation losses. None: the run's validation loader
        (``md.fit(..., val_loader=...)``, or ``run.start(train_loader, val_loader)`` in a plain
        loop). Give it under Lightning, whose callback passes no validation loader to
        regulators: ``ModalDiagCallback(md.GBlending(val_loader=val))``.

    Needs a validation loader (this argument or the run's); without one the run is refused at
    its start with a ValueError that says how to give one.
    """

    conflicts = ("MMPareto",)
    owned_group_key = HEADS_GROUP_KEY
    _parameter_constraints = {"super_epoch": [POSITIVE_INT],
                              "variant": [Options("paper", "released")],
                              "heads": [None, Options("separate", "shared")],
                              "seed": [SEED],
                              "val_loader": [None, Satisfies(lambda v: hasattr(v, "__iter__"),
                                                             "an iterable of (inputs, labels)")]}

    def __init__(self, super_epoch: int = 10, *, variant: str = "paper", heads: str | None = None,
                 seed: int = 0, val_loader: Iterable | None = None):
        super_epoch, seed = as_plain_int(super_epoch), as_plain_int(seed)
        self._validate(super_epoch=super_epoch, variant=variant, heads=heads, seed=seed,
                       val_loader=val_loader)
        if variant == "released" and super_epoch < 2:
            raise ValueError(f"GBlending: super_epoch must be >= 2 with variant='released' (it "
                             f"measures after the first and after the last trial epoch); got "
                             f"super_epoch={super_epoch}.")
        super().__init__()
        self.super_epoch = super_epoch
        self.variant = variant
        self.heads_mode = heads if heads is not None else (
            "shared" if variant == "released" else "separate")
        self.seed = seed
        self.val_loader = val_loader
        self.needs_unimodal_logits = self.heads_mode == "shared"

    def config(self) -> dict:
        return {"super_epoch": self.super_epoch, "variant": self.variant,
                "heads": self.heads_mode, "seed": self.seed,
                "val_loader": "own" if self.val_loader is not None else "the run's"}

    def reset(self) -> None:
        """Forget the weights, the estimates and the separate heads (a fresh run makes new ones)."""
        super().reset()
        self.weights: list[float] | None = None
        self.estimates: list[dict] = []
        self.heads: dict[str, nn.Linear] | None = None

    # ------------------------------------------------------------ separate heads
    def owned_parameters(self) -> list[nn.Parameter]:
        """The separate heads' parameters (empty with shared heads or before creation)."""
        if not self.heads:
            return []
        return [p for lin in self.heads.values() for p in (lin.weight, lin.bias)]

    def _create_heads(self, model, dims: dict[str, int]) -> None:
        self.heads = seeded_unimodal_heads(model, dims, self.seed)

    # ------------------------------------------------------------ run hooks
    def _val(self, ctx):
        """The validation loader of the weights: this regulator's own, else the run's."""
        return self.val_loader if self.val_loader is not None else ctx.val_loader

    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        if self._val(ctx) is None:
            raise ValueError(
                "GBlending needs a validation loader: its weights come from the validation loss of "
                "trial-trained copies (ctx.val_loader is None). Use md.fit(model, train_loader, "
                "val_loader, regulator=md.GBlending()), or in a plain loop call "
                "run.start(train_loader, val_loader) before the first run.epoch_start, or give "
                "md.GBlending(val_loader=...) (the way under the Lightning callback, which passes "
                "no validation loader to regulators).")
        if self.heads_mode == "separate":
            dims = getattr(ctx.model, "feature_dims", None)
            if self.heads is None and isinstance(dims, dict):
                self._create_heads(ctx.model, dims)
            self.register_parameters(ctx.optimizer)

    def on_train_epoch_start(self, ctx) -> None:
        if self.heads_mode == "separate" and self.heads is None:
            self._size_heads(ctx)
        if self.weights is None or ctx.epoch % self.super_epoch == 0:
            self._estimate(ctx)
        w = self.weights
        self.record_epoch("w_fused", w[-1])

    def on_after_forward(self, ctx) -> None:
        model, w = ctx.model, self.weights
        if w is None:
            raise RuntimeError("GBlending: no weights yet; every epoch must start with "
                               "run.epoch_start (it estimates them).")
        m_count = len(model.modalities)
        ctx.losses["gblending/fused"] = (w[m_count] - 1.0) * ctx.losses["multimodal"]
        for i, m in enumerate(model.modalities):
            if self.heads_mode == "shared":
                logits = ctx.unimodal_logits[m]
            else:
                lin = self.heads[m]
                logits = lin(ctx.features[m].to(lin.weight.dtype))
            keep = (ctx.present or {}).get(m)
            if keep is None:
                ce = F.cross_entropy(logits, ctx.labels)
            elif bool(keep.any()):  # branch m learns from the samples where m is present
                keep = keep.to(logits.device)
                ce = F.cross_entropy(logits[keep], ctx.labels[keep])
            else:
                ce = logits.sum() * 0.0  # no sample of m: a zero term, still in the graph
            ctx.losses[f"gblending/{m}"] = w[i] * ce
        self.record("w", {m: w[i] for i, m in enumerate(model.modalities)})

    def on_before_optimizer_step(self, ctx) -> None:
        """Average the separate heads' gradients over DDP ranks (they are outside the DDP module)."""
        params = self.owned_parameters()
        if not params or world_size() == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_over_ranks([p.grad for p in params])

    def _size_heads(self, ctx) -> None:
        """Create the separate heads from one training batch's feature sizes (a model without
        ``feature_dims``), before anything is trained, and register them."""
        device = ctx.device or module_device(ctx.model)
        with preserved_state(ctx.model), _PreservedLoaders(ctx.train_loader), torch.no_grad():
            inputs, _ = unpack_batch(next(iter(ctx.train_loader)), ctx.model.modalities)
            ctx.model.eval()
            feats = ctx.model.encode(to_device(inputs, device))
        self._create_heads(ctx.model, {m: f.shape[1] for m, f in feats.items()})
        self.register_parameters(ctx.optimizer)

    # ------------------------------------------------------------ the estimate
    def _estimate(self, ctx) -> None:
        model = ctx.model
        if ctx.optimizer is None:
            raise ValueError("GBlending needs the run's optimizer (its trial copies train with it).")
        val_loader = self._val(ctx)
        if ctx.train_loader is None or val_loader is None:
            raise ValueError("GBlending needs ctx.train_loader and a validation loader at epoch "
                             "start.")
        device = ctx.device or module_device(model)
        names = list(model.modalities) + ["fused"]
        branches = list(range(len(names)))
        with preserved_state(model), _PreservedLoaders(ctx.train_loader, val_loader), \
                torch.enable_grad():
            if self.variant == "paper":
                with preserved_state(model):  # eval mode only while measuring the start
                    lt0 = self._mean_losses(model, self.heads, ctx.train_loader, branches, device)
                    lv0 = self._mean_losses(model, self.heads, val_loader, branches, device)
            ends = [self._trial(ctx, k, device) for k in branches]
        if self.variant == "paper":
            lt_end = [e[0] for e in ends]
            lv_end = [e[1] for e in ends]
        else:
            lt0, lv0 = [e[0] for e in ends], [e[1] for e in ends]
            lt_end, lv_end = [e[2] for e in ends], [e[3] for e in ends]
        w, d_g, d_o = gblending_weights(lt0, lv0, lt_end, lv_end, variant=self.variant)
        self.weights = w
        mods = list(model.modalities)
        est = {"epoch": int(ctx.epoch), "w": w, "delta_G": d_g, "delta_O": d_o,
               "LT_start": list(map(float, lt0)), "LV_start": list(map(float, lv0)),
               "LT_end": list(map(float, lt_end)), "LV_end": list(map(float, lv_end))}
        self.estimates.append(est)
        for key in ("delta_G", "delta_O", "LT_start", "LV_start", "LT_end", "LV_end"):
            self.record_epoch(key, {m: est[key][i] for i, m in enumerate(mods)})
            self.record_epoch(f"{key}_fused", est[key][-1])
        self.record_epoch("estimated", 1.0)

    @staticmethod
    def _branch_batch(batch, mods, k: int, index: int, device):
        """``(inputs, labels, present)`` of one loader item on ``device``, as branch k learns
        from it: the whole batch with its presence mask (fused branch), else only the rows where
        modality ``mods[k]`` is present (selected before encoding; no mask left)."""
        inputs, labels, present = unpack_batch_present(batch, mods, batch_index=index)
        inputs, labels = to_device(inputs, device), labels.to(device)
        present = to_device(present, device) if present is not None else None
        if k == len(mods):
            return inputs, labels, present
        keep = (present or {}).get(mods[k])
        if keep is None:
            return inputs, labels, None
        return {o: x[keep] for o, x in inputs.items()}, labels[keep], None

    def _branch_logits(self, model, heads, inputs, k: int, *, released: bool,
                       present=None) -> torch.Tensor:
        """Branch k's logits on a batch from :meth:`_branch_rows` (``present``: the fused
        branch's mask; absent entries become the baseline)."""
        mods = model.modalities
        if k == len(mods):
            return model.head(model.mask_features(model.encode(inputs), present))
        m = mods[k]
        if released:  # BalanceBenchmark: the fused output with the other raw inputs zeroed
            zeroed = {o: x if o == m else torch.zeros_like(x) for o, x in inputs.items()}
            return model.head(model.encode(zeroed))
        if self.heads_mode == "separate":
            lin = heads[m]
            return lin(model.encoders[m](inputs[m]).to(lin.weight.dtype))
        return model.head(model.encode(inputs), present=(m,))

    @torch.no_grad()
    def _mean_losses(self, model, heads, loader, branches, device) -> list[float]:
        """Mean per-sample CE of each branch over ``loader`` in eval mode (paper form), summed
        and counted over DDP ranks. The fused branch counts every sample (absent entries at the
        baseline); modality m's branch only the samples where m is present (NaN when none is,
        which gives that branch ``w~ = 0``). The modes are the caller's to restore."""
        model.eval()
        mods = model.modalities
        sums = torch.zeros(2 * len(branches), dtype=torch.float64, device=device)  # sums, counts
        for i, batch in enumerate(loader):
            inputs, labels, present = unpack_batch_present(batch, mods, batch_index=i)
            inputs, labels = to_device(inputs, device), labels.to(device)
            present = to_device(present, device) if present is not None else None
            feats = model.mask_features(model.encode(inputs), present)
            for j, k in enumerate(branches):
                keep = (present or {}).get(mods[k]) if k < len(mods) else None
                rows = feats if keep is None else {m: f[keep] for m, f in feats.items()}
                y = labels if keep is None else labels[keep]
                if k == len(mods):
                    logits = model.head(rows)
                elif self.heads_mode == "separate":
                    lin = heads[mods[k]]
                    logits = lin(rows[mods[k]].to(lin.weight.dtype))
                else:
                    logits = model.head(rows, present=(mods[k],))
                sums[j] += F.cross_entropy(logits.float(), y, reduction="sum").double()
                sums[len(branches) + j] += y.shape[0]
        all_reduce_sum(sums)
        n = len(branches)
        return [float(sums[j]) / float(sums[n + j]) if float(sums[n + j]) > 0 else float("nan")
                for j in range(n)]

    @torch.no_grad()
    def _released_val_sum(self, model, heads, loader, k, device) -> float:
        """BalanceBenchmark's validation loss: the sum of batch-mean CEs (eval mode)."""
        model.eval()
        total = torch.zeros(1, dtype=torch.float64, device=device)
        for i, batch in enumerate(loader):
            inputs, labels, present = self._branch_batch(batch, model.modalities, k, i, device)
            if labels.shape[0] == 0:  # no sample where modality k is present
                continue
            total += F.cross_entropy(self._branch_logits(model, heads, inputs, k, released=True,
                                                         present=present).float(),
                                     labels).double()
        return float(all_reduce_sum(total))

    def _trial_optimizer(self, optimizer, memo: dict):
        """An optimizer of the live one's class over the copies (parameters it holds that are
        not copied get detached stand-ins that receive no gradient). Paper: the live state is
        deep-copied; released: empty state at each group's initial learning rate."""
        groups = []
        for g in optimizer.param_groups:
            params = []
            for p in g["params"]:
                q = memo.get(id(p))
                params.append(q if isinstance(q, torch.Tensor) else
                              nn.Parameter(p.detach().clone(), requires_grad=False))
            hyper = {key: copy.deepcopy(v) for key, v in g.items() if key != "params"}
            if self.variant == "released" and "initial_lr" in hyper:
                hyper["lr"] = hyper["initial_lr"]
            groups.append({**hyper, "params": params})
        trial = type(optimizer)(groups, **copy.deepcopy(optimizer.defaults))
        if self.variant == "paper":
            # a deep copy: load_state_dict would otherwise share the live state tensors
            trial.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        return trial

    def _trial(self, ctx, k: int, device) -> list[float]:
        """Train copies on branch k for N epochs; returns ``[L^T_end, L^V_end]`` (paper) or
        ``[L^T_start, L^V_start, L^T_end, L^V_end]`` (released)."""
        model = ctx.model
        memo: dict = {}
        trial_model = copy.deepcopy(model, memo)
        trial_heads = copy.deepcopy(self.heads, memo) if self.heads else None
        if not trial_model.training:  # mimic md.fit: a model handed over in eval trains whole
            trial_model.train()
        opt = self._trial_optimizer(ctx.optimizer, memo)
        modes = [(mod, mod.training) for mod in trial_model.modules()]
        released = self.variant == "released"
        params = [p for p in trial_model.parameters() if p.requires_grad]
        if trial_heads:
            params += [p for lin in trial_heads.values() for p in lin.parameters()]
        out: list[float] = []
        for epoch in range(self.super_epoch):
            for mod, training in modes:
                mod.training = training
            train_sum = self._trial_epoch(trial_model, trial_heads, opt, params, ctx.train_loader,
                                          k, device, released)
            if released and epoch in (0, self.super_epoch - 1):
                out += [train_sum, self._released_val_sum(trial_model, trial_heads,
                                                          self._val(ctx), k, device)]
        if not released:
            out = [self._mean_losses(trial_model, trial_heads, loader, [k], device)[0]
                   for loader in (ctx.train_loader, self._val(ctx))]
        del trial_model, trial_heads, opt
        return out

    def _trial_epoch(self, model, heads, opt, params, loader, k, device, released) -> float:
        """One trial epoch on branch k's CE; returns the all-reduced sum of batch losses."""
        total = torch.zeros(1, dtype=torch.float64, device=device)
        distributed = world_size() > 1
        batchnorm = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training
                        for mod in model.modules())
        for i, batch in enumerate(loader):
            inputs, labels, present = self._branch_batch(batch, model.modalities, k, i, device)
            opt.zero_grad(set_to_none=True)
            n = labels.shape[0]
            # no row of branch k (modality k absent from the whole batch), or one row that a
            # BatchNorm in training mode cannot normalise: skipped (on every rank alike)
            loss = None if n == 0 or (n == 1 and batchnorm) else F.cross_entropy(
                self._branch_logits(model, heads, inputs, k, released=released,
                                    present=present).float(), labels)
            bad = torch.zeros(1, device=device) + (
                0.0 if loss is not None and torch.isfinite(loss) else 1.0)
            if float(all_reduce_sum(bad)) > 0:  # skipped on every rank alike
                continue
            loss.backward()
            if distributed:  # the same parameters get gradients on every rank (same branch)
                average_over_ranks([p.grad for p in params if p.grad is not None])
            opt.step()
            total += loss.detach().double()
        return float(all_reduce_sum(total))

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict = {}
        if self.weights is not None:
            state["weights"] = list(self.weights)
            state["estimates"] = copy.deepcopy(self.estimates)
        if self.heads:
            state["heads"] = {m: {"weight": lin.weight.detach().clone(),
                                  "bias": lin.bias.detach().clone()}
                              for m, lin in self.heads.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the weights, the estimates and the separate heads; the next ``on_fit_start``
        keeps them and registers the heads with the run's optimizer."""
        state = state or {}
        saved = state.get("heads")
        if saved and self.heads_mode != "separate":
            raise ValueError("GBlending: the state holds separate heads but this regulator uses "
                             f"heads={self.heads_mode!r}.")
        heads = None
        if saved:
            heads = {}
            for m, t in saved.items():
                w, b = t["weight"], t["bias"]
                lin = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], device=w.device,
                                         dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                heads[m] = lin
        super().load_state_dict(state)
        self.heads = heads
        self.weights = [float(v) for v in state["weights"]] if "weights" in state else None
        self.estimates = copy.deepcopy(state.get("estimates", []))
