"""R9: MMCosine (Xu, Feng, Zhang, Hu, ICASSP 2023) — cosine-normalised, scaled per-modality logits.

MMCosine's logits

    z_c = s * sum_m cos(f_m, W_{m,c}),   cos(u, w) = <u, w> / (max(|u|, eps) max(|w|, eps))

(one bias-free weight ``W_m`` (C x d_m) per modality) bound every modality's contribution by
``s`` whatever the norms of its features and weights. ``md.MMCosine()`` works on every head, in
one of two forms (``form="auto"`` picks the first on a cosine head, the second otherwise):

- ``form="head"`` (the paper): the model's head IS the cosine head, ``fusion="cosine"``
  (:class:`~modaldiag.models.fusion.CosineFusion`), so ``z`` is the loss AND the prediction at
  test time::

      model = md.MultimodalClassifier(encoders, dims, num_classes, fusion="cosine")
      md.fit(model, train, val, regulator=md.MMCosine())

  The regulator logs what the head does and adds the optional contrastive term; with ``lam = 0``
  the run is exactly the cosine head's. Any other head is refused in this form.
- ``form="auxiliary"`` (modaldiag's extension for heads the paper does not cover: concat, sum,
  FiLM, gated, late, ``md.wrap`` models): the regulator owns its own ``W_m`` (a parameter, like
  MMPareto's separate heads: seeded init, added to the run's optimizer as one parameter group,
  saved in ``state_dict``, gradients averaged over DDP ranks) and adds

      L = CE(h(f)) + weight * CE(s * sum_m cos(f_m, W_m), y)

  so the encoders receive MMCosine's norm-balanced gradient while the model's own head keeps
  predicting (evaluation is ``h(f)``, unchanged). The authors' gated/FiLM variant instead
  normalises the gated head's per-modality mixed outputs against its final layer and predicts
  with those cosine logits; this form does not touch the head.

Optional supervised contrastive term (the authors' supplement), in both forms:

    L += lam * mean_{pairs m<k} NCE(f_m, f_k, y)

NCE on L2-normalised features with temperature ``tau``: for anchor i of modality m, ``q_ij =
softmax_j(cos(f_{m,i}, f_{k,j}) / tau)``; ``NCE_i = mean_{j: y_j = y_i} -log(q_ij + 1e-10) +
mean_{j: y_j != y_i} -log(1 - q_ij + 1e-10)`` (a sample without negatives in the batch has
no negative part; the released code divides by zero there), averaged over i. It needs equal
feature widths. M = 2 is the authors' single pair (audio as anchor); M > 2 the mean over pairs.

Differences from the released code (GeWu-Lab/MMCosine_ICASSP23, ``main_CD.py``): the authors
reuse the column blocks of a concat head's linear layer and ignore its bias (the same function of
the features as ``CosineFusion`` with ``W_m`` = block m); for their ``gated``/``film`` heads they
normalise the head's per-modality mixed representations against the final layer's blocks — in
modaldiag, build the cosine head over whatever per-modality representation the encoders return,
or use the auxiliary form. BalanceBenchmark (``MMCosine_trainer.py``) hard-codes M in {2, 3}, uses
s = 15 and, outside its epoch window, trains the biased linear logits while validating with cosine
logits; modaldiag has no window.

Logged per epoch (sample means over all DDP ranks): ``scale`` (s), ``true_cosine`` per modality
(mean cosine between a sample's feature and its true class's weight row), ``weight_norm`` per
modality (mean row norm of ``W_m``: MMCosine's argument is that these drift apart under joint
training of a linear head), ``nce`` per pair when ``lam > 0``; in the auxiliary form also
``weight`` and ``auxiliary_ce`` (the unweighted auxiliary cross-entropy).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fusion import CosineFusion
from ..utils.distributed import world_size
from ..utils.validation import NON_NEGATIVE, POSITIVE, Options, as_plain_int
from .base import (
    SEED,
    EpochMeans,
    Regulator,
    all_reduce_sum,
    wide,
)

__all__ = ["MMCosine", "nce_loss", "cosine_head", "cosine_logits"]

#: marks the optimizer parameter group that holds MMCosine's auxiliary cosine weights
WEIGHTS_GROUP_KEY = "modaldiag_mmcosine_weights"
#: ``eps`` of the normalisation (as ``F.normalize`` and :class:`CosineFusion`)
EPS = 1e-12
#: the authors' default scale, used by the auxiliary form when ``scale`` is not given
DEFAULT_SCALE = 10.0


def cosine_head(model, owner: str = "MMCosine") -> CosineFusion:
    """The model's :class:`CosineFusion` head, or a ValueError that says how to get one."""
    fusion = getattr(model, "fusion", None)
    if isinstance(fusion, CosineFusion):
        return fusion
    kind = getattr(model, "fusion_type", type(fusion).__name__ if fusion is not None else "custom")
    raise ValueError(
        f"{owner}(form='head') uses the model's head as the cosine classifier, whose logits "
        f"s * sum_m cos(f_m, W_m) are the prediction at training AND test time; this model's "
        f"head is {kind!r}. Build the model with fusion='cosine', e.g. "
        "md.MultimodalClassifier(encoders, feature_dims, num_classes, fusion='cosine') "
        "(scale s: model.fusion.scale, default 10), or keep this head and use "
        f"md.{owner}(form='auxiliary') (the default form='auto' picks it for non-cosine heads): "
        "a regulator-owned cosine classifier adds its loss while the head keeps predicting.")


def cosine_logits(features: dict, weights: dict, scale: float, eps: float = EPS) -> torch.Tensor:
    """``s * sum_m cos(f_m, W_m)``: ``(B, C)`` logits of per-modality cosine classifiers
    (features flattened to ``(B, d_m)``; weights ``(C, d_m)``; computed in the weights' dtype)."""
    total = None
    for m, w in weights.items():
        f = features[m].reshape(features[m].shape[0], -1).to(w.dtype)
        cos = F.normalize(f, dim=1, eps=eps) @ F.normalize(w, dim=1, eps=eps).T
        total = cos if total is None else total + cos
    return scale * total


def nce_loss(f1: torch.Tensor, f2: torch.Tensor, labels: torch.Tensor,
             temperature: float = 0.1, eps: float = 1e-10) -> torch.Tensor:
    """The authors' supervised contrastive term between two modalities' features (scalar)."""
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"MMCosine: the contrastive term (lam > 0) compares features of equal "
                         f"width; got {f1.shape[1]} and {f2.shape[1]}.")
    a = F.normalize(wide(f1), dim=1)
    b = F.normalize(wide(f2), dim=1)
    q = torch.softmax(a @ b.T / temperature, dim=1)
    pos = (labels[:, None] == labels[None, :]).to(q.dtype)
    neg = 1.0 - pos
    pos_part = (-(q + eps).log() * pos).sum(1) / pos.sum(1)
    n_neg = neg.sum(1)
    neg_part = (-(1 - q + eps).log() * neg).sum(1) / n_neg.clamp(min=1.0)
    return (pos_part + neg_part).mean()


class MMCosine(Regulator):
    """MMCosine on any head: the ``fusion="cosine"`` head itself, or an auxiliary cosine loss.

    Parameters
    ----------
    lam : float >= 0, default 0.0
        Weight of the supervised contrastive term between modality pairs (the authors' supplement;
        their default 0). ``lam > 0`` needs equal feature widths across modalities.
    temperature : float > 0, default 0.1
        Temperature of the contrastive term (the authors' value).
    form : {"auto", "head", "auxiliary"}, default "auto"
        ``"head"`` (the paper): the model's ``fusion="cosine"`` head is the method (any other head
        is refused); ``"auxiliary"`` (modaldiag's extension): a regulator-owned cosine classifier
        ``W_m`` (C x d_m, no bias) adds ``weight * CE(s * sum_m cos(f_m, W_m), y)`` to the
        model's own loss, and the model's head keeps predicting. ``"auto"``: ``"head"`` on a
        cosine head, ``"auxiliary"`` on every other head.
    scale : float > 0, optional
        ``s`` of the auxiliary form (None: 10, the authors' default; BalanceBenchmark 15). In the
        head form ``s`` is the head's (``model.fusion.scale``); a different value is refused.
    weight : float > 0, optional
        Weight of the auxiliary cross-entropy (None: 1). Refused in the head form unless 1.
    seed : int >= 0, default 0
        Seed of the auxiliary ``W_m``'s initialisation (``nn.Linear``'s law, uniform in
        ``+-1/sqrt(d_m)``; identical on every DDP rank).

    The auxiliary ``W_m`` are created at the start of a fresh run (or at the first batch, sized
    from its features, when the model does not declare ``feature_dims``/``num_classes``), added
    to the run's optimizer as one parameter group with the first group's hyperparameters (see
    :meth:`register_parameters`) and saved in ``state_dict``. Works for any M >= 2, in
    ``md.fit``, ``md.Regulation`` and the Lightning callback (which steps its own optimizer; the
    group joins it at ``on_fit_start``).
    """

    owned_group_key = WEIGHTS_GROUP_KEY
    _parameter_constraints = {"lam": [NON_NEGATIVE], "temperature": [POSITIVE],
                              "form": [Options("auto", "head", "auxiliary")],
                              "scale": [None, POSITIVE], "weight": [None, POSITIVE],
                              "seed": [SEED]}

    def __init__(self, lam: float = 0.0, *, temperature: float = 0.1, form: str = "auto",
                 scale: float | None = None, weight: float | None = None, seed: int = 0):
        seed = as_plain_int(seed)
        self._validate(lam=lam, temperature=temperature, form=form, scale=scale, weight=weight,
                       seed=seed)
        super().__init__()
        self.lam, self.temperature = float(lam), float(temperature)
        self.form = form
        self.scale = None if scale is None else float(scale)
        self.weight = None if weight is None else float(weight)
        self.seed = seed

    def reset(self) -> None:
        """Forget the epoch statistics and the auxiliary weights (a fresh run creates new ones)."""
        super().reset()
        self._means = EpochMeans()
        self.weights: dict[str, nn.Parameter] | None = None

    def config(self) -> dict:
        return {"lam": self.lam, "temperature": self.temperature, "form": self.form,
                "scale": self.scale, "weight": self.weight, "seed": self.seed}

    # ------------------------------------------------------------ which form
    def resolved_form(self, model) -> str:
        """``"head"`` or ``"auxiliary"`` for ``model`` (``form="auto"``: by its head)."""
        if self.form != "auto":
            return self.form
        return "head" if isinstance(getattr(model, "fusion", None), CosineFusion) else "auxiliary"

    @property
    def aux_scale(self) -> float:
        """``s`` of the auxiliary form."""
        return DEFAULT_SCALE if self.scale is None else self.scale

    @property
    def aux_weight(self) -> float:
        """Weight of the auxiliary cross-entropy."""
        return 1.0 if self.weight is None else self.weight

    def _check(self, model) -> str:
        form = self.resolved_form(model)
        if form == "head":
            head = cosine_head(model)
            if self.scale is not None and self.scale != head.scale:
                raise ValueError(
                    f"MMCosine(scale={self.scale}): with the cosine head (form='head') the scale "
                    f"is the head's, model.fusion.scale = {head.scale}; set model.fusion.scale = "
                    f"{self.scale} instead (or leave scale=None).")
            if self.weight is not None and self.weight != 1.0:
                raise ValueError(
                    f"MMCosine(weight={self.weight}) weights the auxiliary cosine loss, which "
                    "the cosine head (form='head') does not add: its cosine cross-entropy is the "
                    "model's own loss. Leave weight=None, or use form='auxiliary'.")
            if self.weights is not None:
                raise ValueError("MMCosine: the state holds auxiliary cosine weights (a run with "
                                 "form='auxiliary'), but this model has the cosine head "
                                 "(form='head'). Resume with form='auxiliary'.")
            widths = dict(head.feature_dims)
        else:
            dims = getattr(model, "feature_dims", None)
            widths = dict(dims) if isinstance(dims, dict) else {}
        if self.lam > 0 and len(set(widths.values())) > 1:
            raise ValueError(f"MMCosine(lam={self.lam}): the contrastive term compares "
                             f"features of equal width across modalities; got {widths}. "
                             "Use lam=0 or encoders with one output width.")
        return form

    # ------------------------------------------------------------ auxiliary weights
    def owned_parameters(self) -> list[nn.Parameter]:
        """The auxiliary ``W_m`` (empty in the head form or before creation)."""
        return [] if not self.weights else list(self.weights.values())

    def _create_weights(self, model, dims: dict[str, int], num_classes: int) -> None:
        ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = ref.device if ref is not None else None
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        gen = torch.Generator().manual_seed(self.seed)
        weights = {}
        for m in model.modalities:  # nn.Linear's law, drawn in float64 on the CPU
            d = int(dims[m])
            w = (torch.rand(int(num_classes), d, generator=gen, dtype=torch.float64) * 2 - 1)
            weights[m] = nn.Parameter((w / math.sqrt(d)).to(device=device, dtype=dtype))
        self.weights = weights

    # ------------------------------------------------------------ hooks
    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        if self._check(ctx.model) != "auxiliary":
            return
        dims = getattr(ctx.model, "feature_dims", None)
        classes = getattr(ctx.model, "num_classes", None)
        if self.weights is None and isinstance(dims, dict) and classes:
            self._create_weights(ctx.model, dims, int(classes))
        self.register_parameters(ctx.optimizer)

    def on_train_epoch_start(self, ctx) -> None:
        self._means = EpochMeans()

    def on_after_forward(self, ctx) -> None:
        form = self._check(ctx.model)
        labels, feats = ctx.labels, ctx.features
        batch = labels.shape[0]
        mods = list(ctx.model.modalities)
        if form == "head":
            head = cosine_head(ctx.model)
            with torch.no_grad():
                cos = head.cosines({m: f.detach() for m, f in feats.items()})
                for m in head.modalities:
                    self._means.add("true_cosine", m,
                                    float(cos[m].gather(1, labels[:, None]).sum()), batch)
        else:
            if self.weights is None:  # the model declares no sizes: take them from this batch
                classes = getattr(ctx.model, "num_classes", None) or ctx.logits.shape[1]
                self._create_weights(ctx.model, {m: feats[m][0].numel() for m in mods},
                                     int(classes))
                self.register_parameters(ctx.optimizer)
            w = self.weights
            device_type = w[mods[0]].device.type
            with torch.autocast(device_type=device_type, enabled=False):  # cosines in full width
                z = cosine_logits({m: feats[m] for m in mods}, w, self.aux_scale)
                ce = F.cross_entropy(z, labels)
            ctx.losses["mmcosine/auxiliary"] = self.aux_weight * ce
            self._means.add("auxiliary_ce", "value", float(ce.detach()) * batch, batch)
            with torch.no_grad():
                for m in mods:
                    f = feats[m].detach().reshape(batch, -1).to(w[m].dtype)
                    cos = F.normalize(f, dim=1, eps=EPS) @ F.normalize(w[m], dim=1, eps=EPS).T
                    self._means.add("true_cosine", m,
                                    float(cos.gather(1, labels[:, None]).sum()), batch)
        if self.lam > 0:
            total = None
            for a, b in combinations(mods, 2):
                term = nce_loss(feats[a].reshape(batch, -1), feats[b].reshape(batch, -1), labels,
                                self.temperature)
                self._means.add("nce", f"{a}|{b}", float(term.detach()) * batch, batch)
                total = term if total is None else total + term
            pairs = len(mods) * (len(mods) - 1) // 2
            ctx.losses["mmcosine/nce"] = self.lam * total / pairs

    def on_before_optimizer_step(self, ctx) -> None:
        """Average the auxiliary ``W_m``'s gradients over DDP ranks (DDP syncs only the model's
        parameters). Every rank computes the auxiliary loss at every step, so every rank joins
        the all-reduce (a rank whose batch was skipped contributes zeros)."""
        params = self.owned_parameters()
        world = world_size()
        if world == 1 or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad).div_(world)

    def on_train_epoch_end(self, ctx) -> None:
        form = self._check(ctx.model)
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values["value"] if key == "auxiliary_ce" else values)
        with torch.no_grad():
            if form == "head":
                head = cosine_head(ctx.model)
                norms = {m: float(head.weights[m].weight.norm(dim=1).mean())
                         for m in head.modalities}
                scale = float(head.scale)
            else:
                norms = {m: float(w.norm(dim=1).mean()) for m, w in (self.weights or {}).items()}
                scale = self.aux_scale
                self.record_epoch("weight", self.aux_weight)
        if norms:
            self.record_epoch("weight_norm", norms)
        self.record_epoch("scale", scale)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if not self.weights:
            return {}
        return {"weights": {m: w.detach().clone() for m, w in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the auxiliary ``W_m`` (created here, on the saved tensors' device and dtype);
        the next ``on_fit_start`` keeps them and registers them with the run's optimizer."""
        saved = (state or {}).get("weights")
        if saved and self.form == "head":
            raise ValueError("MMCosine: the state holds auxiliary cosine weights but this "
                             "regulator uses form='head'.")
        weights = None
        if saved:
            weights = {m: nn.Parameter(t.detach().clone()) for m, t in saved.items()}
        super().load_state_dict(state)
        self.weights = weights
