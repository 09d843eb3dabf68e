"""Fusion heads. Each maps a complete feature dict ``{m: (B, d_m)}`` to logits ``(B, C)``.

What "absent" means is the same for every head: the absent modality's feature is replaced by its
baseline *before* the head runs (see :mod:`modaldiag.models.contract`). Consequences per head,
with the default zero baseline:

- ``concat``: ``W [f_1; ...; f_M] + b``; an absent modality contributes nothing but the bias is
  kept (OGM-GE's shortcut ``W_m f_m + b/M`` differs from this only by ``(M-1)/M * b``).
- ``sum``: ``W_out relu(sum_m P_m f_m + c) + b``; an absent modality's projection is zero.
- ``late``: ``sum_m (W_m f_m + b_m)``; an absent modality contributes its bias ``b_m`` only.
- ``film``: the first modality (``film_target``) is modulated by the others:
  ``h = P f_target``, ``[gamma, beta] = G [f_others] + g``, logits ``W ((1 + gamma) * h + beta) + b``.
  An absent conditioner leaves the modulation at its bias; an absent target leaves ``beta`` only.
- ``gated``: gated multimodal unit, ``h_m = tanh(P_m f_m)``, ``z = softmax(G [f_1; ...; f_M])``,
  logits ``W sum_m z_m h_m + b``. An absent modality has ``h_m = tanh(bias_m)`` and still takes
  part in the gate through its zero input.
- ``cosine`` (MMCosine, Xu et al., ICASSP 2023): one bias-free weight ``W_m`` (C x d_m) per modality,
  ``z_c = s * sum_m cos(f_m, W_{m,c})``; an absent modality with the zero baseline contributes 0.
- ``shared`` (MLA's head, Zhang et al., CVPR 2024): ONE linear layer applied to the sum of the
  features (all ``d_m`` equal), ``z = W sum_m f_m + b``; with the zero baseline the unimodal logits
  are ``z_m = W f_m + b``, the same classifier for every modality.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .names import ModalityDict

__all__ = ["FUSIONS", "build_fusion", "ConcatFusion", "SumFusion", "LateFusion", "FiLMFusion",
           "GatedFusion", "CosineFusion", "SharedFusion"]


class _Fusion(nn.Module):
    def __init__(self, feature_dims: Mapping[str, int], num_classes: int):
        super().__init__()
        self.modalities = tuple(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.num_classes = num_classes

    def _cat(self, features: Mapping[str, torch.Tensor], names=None) -> torch.Tensor:
        names = self.modalities if names is None else names
        return torch.cat([features[m] for m in names], dim=-1)


def _additive_coalitions(terms, absent_terms, bias, masks):
    """Logits ``(K, B, C)`` of an additive head: ``bias + sum_m (present ? t_m : absent_m)``."""
    out = None
    for i, (t, a) in enumerate(zip(terms, absent_terms, strict=True)):
        keep = masks[:, i].view(-1, 1, 1)
        part = torch.where(keep, t.unsqueeze(0), a.unsqueeze(0))
        out = part if out is None else out + part
    return out + bias if bias is not None else out


class ConcatFusion(_Fusion):
    """Concatenate features, one linear layer (the published audio-visual baseline)."""

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None):
        super().__init__(feature_dims, num_classes)
        self.fc = nn.Linear(sum(self.feature_dims.values()), num_classes)

    def forward(self, features):
        return self.fc(self._cat(features))

    def coalitions(self, features, absent, masks):
        """Fast exact path for many coalitions: the head is additive over modalities."""
        weights = self.fc.weight.split([self.feature_dims[m] for m in self.modalities], dim=1)
        terms = [features[m] @ w.T for m, w in zip(self.modalities, weights, strict=True)]
        absent_terms = [absent[m] @ w.T for m, w in zip(self.modalities, weights, strict=True)]
        return _additive_coalitions(terms, absent_terms, self.fc.bias, masks)


class SumFusion(_Fusion):
    """Project every modality to a shared space, sum, then a small classifier."""

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None):
        super().__init__(feature_dims, num_classes)
        hidden = hidden_dim or max(self.feature_dims.values())
        self.proj = ModalityDict({m: nn.Linear(d, hidden, bias=False)
                                   for m, d in self.feature_dims.items()})
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features):
        h = sum(self.proj[m](features[m]) for m in self.modalities) + self.bias
        return self.fc(torch.relu(h))


class LateFusion(_Fusion):
    """Per-modality linear heads whose logits are summed."""

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None):
        super().__init__(feature_dims, num_classes)
        self.heads = ModalityDict({m: nn.Linear(d, num_classes)
                                    for m, d in self.feature_dims.items()})

    def forward(self, features):
        return sum(self.heads[m](features[m]) for m in self.modalities)

    def coalitions(self, features, absent, masks):
        """Fast exact path for many coalitions: per-modality logits, combined per coalition."""
        terms = [self.heads[m](features[m]) for m in self.modalities]
        absent_terms = [self.heads[m](absent[m]) for m in self.modalities]
        return _additive_coalitions(terms, absent_terms, None, masks)


class FiLMFusion(_Fusion):
    """Feature-wise linear modulation of ``film_target`` by the other modalities."""

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None,
                 film_target: str | None = None):
        super().__init__(feature_dims, num_classes)
        self.target = film_target or self.modalities[0]
        if self.target not in self.feature_dims:
            raise ValueError(f"film_target {self.target!r} is not a modality: {list(self.modalities)}.")
        self.conditioners = tuple(m for m in self.modalities if m != self.target)
        hidden = hidden_dim or self.feature_dims[self.target]
        self.proj = nn.Linear(self.feature_dims[self.target], hidden)
        self.film = nn.Linear(sum(self.feature_dims[m] for m in self.conditioners), 2 * hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features):
        h = self.proj(features[self.target])
        gamma, beta = self.film(self._cat(features, self.conditioners)).chunk(2, dim=-1)
        return self.fc((1 + gamma) * h + beta)


class GatedFusion(_Fusion):
    """Gated multimodal unit: a softmax gate over modalities weighs tanh projections."""

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None):
        super().__init__(feature_dims, num_classes)
        hidden = hidden_dim or max(self.feature_dims.values())
        self.proj = ModalityDict({m: nn.Linear(d, hidden) for m, d in self.feature_dims.items()})
        self.gate = nn.Linear(sum(self.feature_dims.values()), len(self.modalities))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, features):
        z = torch.softmax(self.gate(self._cat(features)), dim=-1)
        h = torch.stack([torch.tanh(self.proj[m](features[m])) for m in self.modalities], dim=-2)
        return self.fc((z.unsqueeze(-1) * h).sum(dim=-2))


class CosineFusion(_Fusion):
    """MMCosine's head: cosine-normalised, scaled per-modality logits summed over modalities.

    ``z_c = s * sum_m cos(f_m, W_{m,c})`` with one bias-free weight ``W_m`` (C x d_m) per modality
    and ``cos(u, w) = <u, w> / (max(|u|, eps) * max(|w|, eps))`` (``eps = 1e-12``, as
    ``F.normalize``). Every modality's contribution is bounded by ``s`` whatever the norms of its
    features and weights, which is how MMCosine balances the modalities. The unimodal logits of m
    (others at the zero baseline) are ``s * cos(f_m, W_m)``: a zero feature contributes 0.

    Parameters
    ----------
    feature_dims, num_classes : as every head.
    hidden_dim : ignored (accepted for a uniform constructor).
    scale : float > 0, default 10.0
        ``s`` (the authors' default; BalanceBenchmark uses 15). A hyperparameter, not trained:
        ``head.scale`` reads or sets it; it is saved in the model's ``state_dict`` (buffer ``s``).
    eps : float > 0, default 1e-12
    """

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None,
                 scale: float = 10.0, eps: float = 1e-12):
        super().__init__(feature_dims, num_classes)
        scale, eps = float(scale), float(eps)
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"CosineFusion: scale must be a finite number > 0; got {scale!r}.")
        if not (eps > 0 and eps < float("inf")):
            raise ValueError(f"CosineFusion: eps must be a finite number > 0; got {eps!r}.")
        self.eps = eps
        # a buffer, so the scale travels with the model's state_dict (checkpoints, resume)
        self.register_buffer("s", torch.tensor(scale))
        # nn.Linear without bias: its default init (Kaiming-uniform) for each W_m
        self.weights = ModalityDict({m: nn.Linear(d, num_classes, bias=False)
                                     for m, d in self.feature_dims.items()})

    @property
    def scale(self) -> float:
        """``s`` as a float; assigning a number sets it (kept in ``state_dict`` as ``s``)."""
        return float(self.s)

    @scale.setter
    def scale(self, value: float) -> None:
        value = float(value)
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"CosineFusion: scale must be a finite number > 0; got {value!r}.")
        with torch.no_grad():
            self.s.fill_(value)

    def cosines(self, features) -> dict[str, torch.Tensor]:
        """``{m: (B, C)}`` cosines between each sample's feature and each class weight row."""
        out = {}
        for m in self.modalities:
            w = self.weights[m].weight
            f = features[m].to(w.dtype)
            out[m] = torch.nn.functional.normalize(f, dim=-1, eps=self.eps) @ \
                torch.nn.functional.normalize(w, dim=-1, eps=self.eps).T
        return out

    def forward(self, features):
        cos = self.cosines(features)
        return self.s.to(next(iter(cos.values())).dtype) * sum(cos.values())

    def coalitions(self, features, absent, masks):
        """Fast exact path for many coalitions: the head is additive over modalities."""
        cos, cos_absent = self.cosines(features), self.cosines(absent)
        s = self.s.to(next(iter(cos.values())).dtype)
        terms = [s * c for c in cos.values()]
        absent_terms = [s * c for c in cos_absent.values()]
        return _additive_coalitions(terms, absent_terms, None, masks)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SharedFusion(_Fusion):
    """One linear classifier shared by every modality, applied to the sum of the features.

    ``z = W (sum_m f_m) + b`` with a single ``nn.Linear(d, C)`` (``self.fc``); every modality must
    have the same feature dimension ``d``. With the zero baseline the unimodal logits are
    ``z_m = h(f, present={m}) = W f_m + b``: the head MLA (Zhang et al., CVPR 2024) trains
    alternately on each modality, and whose weight gradient it projects.

    Parameters
    ----------
    feature_dims, num_classes : as every head (all ``feature_dims`` values equal).
    hidden_dim : ignored (accepted for a uniform constructor).
    """

    def __init__(self, feature_dims, num_classes, hidden_dim: int | None = None):
        super().__init__(feature_dims, num_classes)
        dims = set(self.feature_dims.values())
        if len(dims) != 1:
            raise ValueError(
                f"fusion='shared' applies one linear layer to every modality's feature, so all "
                f"feature dimensions must be equal; got {self.feature_dims}. Give every encoder "
                "the same output width (e.g. md.models.default_model(data, feature_dim=d)) or "
                "add a linear projection to d inside each encoder.")
        self.fc = nn.Linear(dims.pop(), num_classes)

    def forward(self, features):
        total = None
        for m in self.modalities:
            total = features[m] if total is None else total + features[m]
        return self.fc(total)

    def coalitions(self, features, absent, masks):
        """Fast exact path for many coalitions: the head is additive over modalities."""
        w = self.fc.weight
        terms = [features[m] @ w.T for m in self.modalities]
        absent_terms = [absent[m] @ w.T for m in self.modalities]
        return _additive_coalitions(terms, absent_terms, self.fc.bias, masks)


FUSIONS = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "late": LateFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
    "cosine": CosineFusion,
    "shared": SharedFusion,
}


def build_fusion(fusion: str, feature_dims: Mapping[str, int], num_classes: int, **kwargs) -> nn.Module:
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {list(FUSIONS)}; got {fusion!r}.")
    return FUSIONS[fusion](feature_dims, num_classes, **kwargs)
