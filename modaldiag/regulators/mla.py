"""R15: MLA (Zhang, Yoon, Bansal, Yao, CVPR 2024) — multimodal learning by alternating unimodal
adaptation.

Training. The encoders run once per batch. Then, for every modality m in ``model.modalities``
order, MLA trains the *unimodal* loss only (the fused loss ``CE(h(f))`` is not trained):

1. ``z_m = W f_m + b`` with the model's CURRENT head (the head already stepped by the modalities
   before m in this batch); ``L_m = CE(z_m, y)``; gradients of ``L_m`` reach encoder m and the head;
2. head-weight gradient projection (not on the very first update of the run): with
   ``r = mean_i sg(f_{i,m})`` (1 x d, summed and counted over DDP ranks),
   ``a = 0.1 ** (1 + t / T)`` (t: batch index in the epoch, T: batches per epoch)::

       k = P r^T,   P <- P - k k^T / (a + r k),   P <- P / ||P||_F,   grad W <- grad W P^T

   ``P`` (d x d) starts as the identity and is never reset during a run (it accumulates every
   modality's mean-feature direction, orthogonal-weight-modification style), so each modality's
   head update avoids the feature directions the earlier updates were fitted on;
3. one optimizer step; gradients cleared.

So a batch takes M optimizer steps, and MLA takes them itself (``owns_optimizer_step``): after
``Regulation.backward`` every ``.grad`` is None and the caller's ``optimizer.step()`` is a no-op.

Test time (``predict``): per sample, ``e_m = -sum_c p_{m,c} log p_{m,c}`` with ``p_m = softmax(z_m)``,
``lambda = softmax_m(-e)`` (equal to ``exp(max e - e_m) / sum_j exp(max e - e_j)``), and
``z = sum_m lambda_m z_m``: the more certain modality gets the larger weight. ``fusion="fixed"``: the
authors' non-dynamic option, ``z = sum_m w_m z_m`` with user weights (default equal).

Head. The paper's head is one linear classifier shared by all modalities: ``fusion="shared"``
(:class:`~modaldiag.models.fusion.SharedFusion`, equal ``d_m``), where ``W`` is ``fusion.fc.weight``.
Any other head: MLA without the projection (there is no single ``W`` acting on every ``f_m``), with
``z_m = h(f, present={m})`` (the other modalities at their baseline); a warning says so once per run.

Paper vs released code (``variant``):

- ``"paper"`` (default): per-sample entropy weights, projection ``grad W <- grad W P^T``.
- ``"released"`` (Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, ``main.py``
  and ``utils.GSPlugin``): the projection is guarded by the parameter name ``"module.weight"`` but
  receives a plain ``nn.Linear`` (names ``weight``/``bias``), so the released code never updates P
  and never projects (static reading): ``projection="off"``. Its dynamic-fusion entropy applies the
  softmax over the BATCH dimension and sums over the whole batch (``entropy="batch"``): one weight
  per modality per evaluation batch, which depends on the batch's size and composition. (Its
  default evaluation is the fixed 0.5/0.5 average, ``--dynamic`` off; use ``fusion="fixed"``.)
- ``projection="additive"``: BalanceBenchmark's ``MLATrainer`` ADDS the projected gradient,
  ``grad W <- grad W + grad W P^T`` (offered as an option; BB also fixes d = 512 and references an
  undefined ``self.alpha``, not reproduced).

The released projector formula divides by ``a + k r`` (a d x d matrix, an elementwise division);
the paper's and this implementation's is the scalar ``a + r k``; they agree when ``r`` has one
non-zero coordinate (the R15 test) and the released code never executes it anyway.

DDP: the gradients are computed with ``torch.autograd.grad`` (DDP's hooks do not fire) and averaged
over ranks before each step; ``r``'s feature sum and count and the logged CE are summed over ranks,
so every rank holds the same ``P`` and takes the same steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..models.fusion import SharedFusion
from ..utils.validation import InstanceOf, Options
from .base import Regulator, all_reduce_sum, average_over_ranks, squared_norm, wide

__all__ = ["MLA", "mla_projector_update", "mla_project_gradient", "mla_fusion_weights",
           "mla_step_size"]


def mla_step_size(t: int, T: int | None) -> float:
    """``a = 0.1 ** (1 + t / T)`` (t: batch index in the epoch, T: batches per epoch; ``T=None``:
    ``a = 0.1``)."""
    return 0.1 ** (1.0 + (t / T if T else 0.0))


def mla_projector_update(P: torch.Tensor, r: torch.Tensor, a: float) -> torch.Tensor:
    """One projector update (returns a new tensor): ``k = P r^T``,
    ``P <- P - k k^T / (a + r k)``, ``P <- P / ||P||_F``. ``r``: ``(d,)`` or ``(1, d)``."""
    return _projector_step(P, r, a)[0]


def _projector_step(P: torch.Tensor, r: torch.Tensor, a: float) -> tuple[torch.Tensor, float]:
    """``(normalised P, ||P||_F before the normalisation)``."""
    r = r.reshape(1, -1).to(P.dtype)
    k = P @ r.T  # (d, 1)
    P = P - (k @ k.T) / (a + (r @ k))
    fro = torch.linalg.matrix_norm(P, ord="fro")
    return P / fro, float(fro)


def mla_project_gradient(grad: torch.Tensor, P: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """``grad P^T`` (paper), or ``grad + grad P^T`` (BalanceBenchmark, ``additive=True``);
    ``grad`` is the head weight's ``(C, d)`` gradient."""
    projected = grad @ P.to(grad.dtype).T
    return grad + projected if additive else projected


def mla_fusion_weights(logits_per_modality: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                       entropy: str = "sample") -> torch.Tensor:
    """MLA's uncertainty weights ``lambda`` ``(B, M)`` (columns in the given order).

    ``entropy="sample"`` (paper): ``e_{i,m} = -sum_c p log p`` of ``softmax(z_{i,m})`` per sample,
    ``lambda_i = softmax_m(-e_i)``. ``entropy="batch"`` (released code): ``p = softmax(z_m)`` over
    the BATCH dimension, ``e_m = -sum_{i,c} p log p`` (one number per modality), the same
    ``lambda = softmax(-e)`` for every row.
    """
    logits = list(logits_per_modality.values()) if isinstance(logits_per_modality, Mapping) \
        else list(logits_per_modality)
    if entropy not in ("sample", "batch"):
        raise ValueError(f"mla_fusion_weights: entropy must be 'sample' or 'batch'; got {entropy!r}.")
    dim = 1 if entropy == "sample" else 0
    ents = []
    for z in logits:
        logp = F.log_softmax(wide(z), dim=dim)
        h = -(logp.exp() * logp)  # finite logits: 0 * log 0 does not occur (log p > -inf)
        ents.append(h.sum(1) if entropy == "sample" else h.sum().expand(z.shape[0]))
    e = torch.stack(ents, dim=1)  # (B, M)
    return torch.softmax(-e, dim=1)


class MLA(Regulator):
    """MLA regulator: alternating unimodal training with a shared head, gradient projection, and an
    uncertainty-weighted test-time fusion. Takes M optimizer steps per batch itself.

    Parameters
    ----------
    fusion : {"dynamic", "fixed"}, default "dynamic"
        Test-time combination of the unimodal logits: entropy weights (paper) or fixed weights (the
        authors' default evaluation without ``--dynamic``).
    weights : dict {modality: float >= 0}, optional
        The fixed weights (``fusion="fixed"`` only; default equal, 1/M). Used as given (the
        authors' 0.5/0.5 and 0.35/0.25/0.4 sum to 1). Not allowed with ``fusion="dynamic"``.
    projection : {None, "paper", "additive", "off"}, default None
        Head-weight gradient projection: ``grad W P^T`` (paper), ``grad W + grad W P^T``
        (BalanceBenchmark), or none (the released code, which never projects). None: from
        ``variant``. Only a ``fusion="shared"`` head is projected.
    entropy : {None, "sample", "batch"}, default None
        Entropy of the dynamic fusion per sample (paper) or over the batch (released). None: from
        ``variant``.
    variant : {"paper", "released"}, default "paper"
        ``"released"`` sets ``projection="off"``, ``entropy="batch"`` unless given.

    Needs ``accumulate_grad_batches=1``, no amp/GradScaler, no ``max_grad_norm`` and no callback
    that edits gradients after backward (``Regulation``/``md.fit`` refuse them). Encoders must not
    share parameters (each modality's step would change the other's graph).
    """

    owns_optimizer_step = True
    _parameter_constraints = {
        "fusion": [Options("dynamic", "fixed")],
        "weights": [None, InstanceOf(Mapping, what="a dict {modality name: weight >= 0}")],
        "projection": [None, Options("paper", "additive", "off")],
        "entropy": [None, Options("sample", "batch")],
        "variant": [Options("paper", "released")],
    }

    def __init__(self, *, fusion: str = "dynamic", weights: Mapping[str, float] | None = None,
                 projection: str | None = None, entropy: str | None = None,
                 variant: str = "paper"):
        self._validate(fusion=fusion, weights=weights, projection=projection, entropy=entropy,
                       variant=variant)
        if weights is not None:
            if fusion != "fixed":
                raise ValueError("MLA: weights are the fixed fusion weights; pass fusion='fixed' "
                                 "with them, or drop weights for the dynamic (entropy) fusion.")
            clean = {}
            for m, w in weights.items():
                try:
                    w = float(w)
                except (TypeError, ValueError):
                    raise ValueError(f"MLA: weights[{m!r}] must be a number >= 0; got {w!r}.") from None
                if not (math.isfinite(w) and w >= 0):
                    raise ValueError(f"MLA: weights[{m!r}] must be a finite number >= 0; got {w!r}.")
                clean[str(m)] = w
            if not clean or sum(clean.values()) <= 0:
                raise ValueError(f"MLA: weights must hold at least one positive weight; got {weights!r}.")
            weights = clean
        released = variant == "released"
        super().__init__()
        self.fusion, self.weights, self.variant = fusion, weights, variant
        self.projection = projection or ("off" if released else "paper")
        self.entropy = entropy or ("batch" if released else "sample")

    def reset(self) -> None:
        """Forget the projector, the update counter and the evaluation accumulators."""
        super().reset()
        self.projector: torch.Tensor | None = None
        self.updates = 0
        self.batches_per_epoch: int | None = None
        self._epoch_batches = 0
        self._T: int | None = None
        self._warned = False
        self._params_key = None
        self._params: list[torch.nn.Parameter] = []
        self._lam_sum: torch.Tensor | None = None
        self._lam_n = 0
        self.evaluation_weights: dict[str, float] = {}

    def config(self) -> dict:
        return {"fusion": self.fusion, "weights": self.weights, "projection": self.projection,
                "entropy": self.entropy, "variant": self.variant}

    # ------------------------------------------------------------------ head
    @staticmethod
    def shared_head(model) -> SharedFusion | None:
        """The model's shared linear head (``fusion="shared"``), or None."""
        fusion = getattr(model, "fusion", None)
        return fusion if isinstance(fusion, SharedFusion) else None

    def unimodal_logits(self, model, features, modality: str | None = None):
        """``z_m = W f_m + b`` on a shared head, else ``h(f, present={m})``: a dict for all
        modalities, or one tensor when ``modality`` is given."""
        shared = self.shared_head(model)
        if modality is not None:
            if shared is not None:
                return shared.fc(features[modality].to(shared.fc.weight.dtype))
            return model.head(features, present=(modality,))
        if shared is not None:
            return {m: shared.fc(features[m].to(shared.fc.weight.dtype)) for m in model.modalities}
        return model.unimodal_logits(features)

    # ------------------------------------------------------------------ run
    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        model = ctx.model
        self._check_weights(model.modalities)
        groups = self.groups(model)
        seen: dict[int, str] = {}
        for m in model.modalities:
            for p in groups[m]:
                if id(p) in seen and seen[id(p)] != m:
                    raise ValueError(
                        f"MLA steps the optimizer once per modality, so the encoders of "
                        f"{seen[id(p)]!r} and {m!r} must not share parameters (the first step "
                        "would change the weights the second modality's gradient was computed "
                        "with). Give each modality its own encoder.")
                seen[id(p)] = m
        if self.shared_head(model) is None and self.projection != "off" and not self._warned:
            self._warned = True
            kind = getattr(model, "fusion_type", type(getattr(model, "fusion", model)).__name__)
            warnings.warn(
                f"MLA: the model's head is {kind!r}, not one linear layer shared by every "
                "modality (fusion='shared'); training MLA WITHOUT the head-gradient projection, "
                "with unimodal logits z_m = h(f, present={m}).", stacklevel=2)

    def on_train_epoch_start(self, ctx) -> None:
        if self._epoch_batches:
            self.batches_per_epoch = self._epoch_batches
        self._epoch_batches = 0
        try:
            self._T = len(ctx.train_loader) if ctx.train_loader is not None else None
        except TypeError:  # a loader without len(): the previous epoch's count (first epoch: a = 0.1)
            self._T = None
        if not self._T:
            self._T = self.batches_per_epoch
        self._lam_sum, self._lam_n = None, 0

    def _check_weights(self, modalities) -> None:
        if self.weights is None:
            return
        missing = [m for m in modalities if m not in self.weights]
        extra = [m for m in self.weights if m not in modalities]
        if missing or extra:
            raise ValueError(f"MLA: weights must name every modality {list(modalities)} once; "
                             f"missing {missing}, unknown {extra}.")

    def _trainable(self, model) -> list[torch.nn.Parameter]:
        key = (id(model), sum(1 for _ in model.parameters()))
        if key != self._params_key:
            self._params = [p for p in model.parameters() if p.requires_grad]
            self._params_key = key
        return self._params

    # ------------------------------------------------------------------ the M steps
    def backward(self, ctx) -> bool:
        model, opt = ctx.model, ctx.optimizer
        if opt is None:
            raise ValueError("MLA takes one optimizer step per modality inside backward and needs "
                             "the optimizer: md.Regulation(model, optimizer, MLA()).")
        extra = sorted(k for k in ctx.losses if k != "multimodal")
        if extra:
            raise ValueError(
                f"MLA trains only its unimodal losses CE(z_m), one optimizer step each; the loss "
                f"terms {extra} (unimodal_loss_weight > 0 or another regulator's terms) would be "
                "ignored. Train MLA with unimodal_loss_weight=0 and without loss-adding regulators.")
        shared = self.shared_head(model)
        project = shared is not None and self.projection != "off"
        weight = shared.fc.weight if shared is not None else None
        params = self._trainable(model)
        groups = self.groups(model)
        mods = model.modalities
        t = max(0, int(ctx.batch_index) - 1)  # forward_loss has already counted this batch
        a = mla_step_size(t, self._T)
        self._epoch_batches += 1
        opt.zero_grad(set_to_none=True)  # MLA's steps use its own gradients only
        ce, norms, kept, enc_sq = {}, {}, {}, {}
        for i, m in enumerate(mods):
            logits = self.unimodal_logits(model, ctx.features, m)
            loss = F.cross_entropy(logits, ctx.labels)
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(mods) - 1,
                                        allow_unused=True)
            pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
            n = ctx.labels.shape[0]
            f = ctx.features[m].detach().flatten(1)
            head = [loss.detach().double() * n, torch.tensor(float(n), dtype=torch.float64,
                                                            device=loss.device)]
            stats = torch.cat([torch.stack(head)] + ([f.double().sum(0)] if project else []))
            stats = all_reduce_sum(stats)
            ce[m] = float(stats[0] / stats[1])
            if not math.isfinite(ce[m]):  # summed over ranks: every rank raises together
                raise ValueError(
                    f"MLA: the unimodal loss CE(z_m) of modality {m!r} is non-finite (epoch "
                    f"{ctx.epoch}, batch {t}) after {i} of this batch's {len(mods)} steps; lower "
                    "the learning rate (each batch takes one optimizer step per modality).")
            average_over_ranks([g for _, g in pairs])
            own = {id(p) for p in groups[m]}
            sq = squared_norm([g for p, g in pairs if id(p) in own])
            enc_sq[m] = float(sq) if sq is not None else 0.0
            for p, g in pairs:
                p.grad = g.detach()
            if project and self.updates > 0 and weight.grad is not None:
                r = stats[2:] / stats[1]
                self.projector, fro = _projector_step(self._projector(weight), r, a)
                g0 = weight.grad
                weight.grad = mla_project_gradient(g0, self.projector,
                                                   additive=self.projection == "additive")
                g_norm = float(g0.norm())
                norms[m] = fro
                kept[m] = float(weight.grad.norm()) / g_norm if g_norm > 0 else 1.0
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.updates += 1
        self.record("ce", ce)
        self.record("encoder_grad_sq", enc_sq)
        ctx.encoder_grad_sq = dict(enc_sq)  # the Fisher monitor reads them (no .grad is left)
        if norms:
            self.record("projector_norm", norms)
            self.record("grad_kept", kept)
        return True

    def _projector(self, weight: torch.Tensor) -> torch.Tensor:
        d = weight.shape[1]
        if self.projector is None:
            self.projector = torch.eye(d, dtype=torch.float64, device=weight.device)
        elif self.projector.shape != (d, d):
            raise ValueError(f"MLA: the saved projector is {tuple(self.projector.shape)} but the "
                             f"head's feature dimension is {d}; resume with the same model.")
        elif self.projector.device != weight.device:
            self.projector = self.projector.to(weight.device)
        return self.projector

    # ------------------------------------------------------------------ test time
    def fusion_weights(self, model, unimodal: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``lambda`` ``(B, M)`` in ``model.modalities`` order for the given unimodal logits."""
        mods = model.modalities
        if self.fusion == "fixed":
            self._check_weights(mods)
            ref = unimodal[mods[0]]
            w = [self.weights[m] if self.weights is not None else 1.0 / len(mods) for m in mods]
            return torch.tensor(w, dtype=wide(ref).dtype, device=ref.device).expand(ref.shape[0], -1)
        return mla_fusion_weights([unimodal[m] for m in mods], entropy=self.entropy)

    def predict(self, model, features) -> torch.Tensor:
        """``z = sum_m lambda_m z_m`` (see the module notes); accumulates the mean ``lambda`` for
        :meth:`fusion_weight_means` (``md.fit`` logs it as ``val.fusion_weight.<m>``)."""
        uni = self.unimodal_logits(model, features)
        lam = self.fusion_weights(model, uni)
        out = None
        for j, m in enumerate(model.modalities):
            part = lam[:, j:j + 1].to(uni[m].dtype) * uni[m]
            out = part if out is None else out + part
        batch_sum = lam.detach().double().sum(0)
        self._lam_sum = batch_sum if self._lam_sum is None else self._lam_sum + batch_sum.to(
            self._lam_sum.device)
        self._lam_n += lam.shape[0]
        return out

    def fusion_weight_means(self, modalities: Sequence[str], reset: bool = True,
                            device=None) -> dict[str, float]:
        """Mean ``lambda_m`` over the samples :meth:`predict` has seen since the last reset (summed
        over DDP ranks; every rank must call it)."""
        mods = list(modalities)
        local = torch.zeros(len(mods) + 1, dtype=torch.float64, device=device)
        if self._lam_sum is not None:
            local[:-1] = self._lam_sum.to(local.device)
        local[-1] = float(self._lam_n)
        total = all_reduce_sum(local)
        if reset:
            self._lam_sum, self._lam_n = None, 0
        n = float(total[-1])
        return {m: float(total[j]) / n for j, m in enumerate(mods)} if n else {}

    def on_validation_end(self, ctx, metrics: dict) -> None:
        self.evaluation_weights = self.fusion_weight_means(ctx.model.modalities, device=ctx.device)
        if self.evaluation_weights:
            metrics["fusion_weight"] = dict(self.evaluation_weights)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"projector": None if self.projector is None else self.projector.detach().clone(),
                "updates": int(self.updates), "batches_per_epoch": self.batches_per_epoch,
                "epoch_batches": int(self._epoch_batches)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the projector and counters (the next ``on_fit_start`` keeps them)."""
        state = state or {}
        unknown = sorted(set(state) - {"projector", "updates", "batches_per_epoch", "epoch_batches"})
        if unknown:
            raise ValueError(f"MLA: unknown state keys {unknown}.")
        proj = state.get("projector")
        super().load_state_dict(state)
        self.projector = proj.detach().clone() if proj is not None else None
        self.updates = int(state.get("updates", 0))
        self.batches_per_epoch = state.get("batches_per_epoch")
        self._epoch_batches = int(state.get("epoch_batches", 0))
