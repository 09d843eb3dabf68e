"""``MultimodalClassifier``: encoders + one of the built-in fusion heads."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..utils.validation import (
    POSITIVE_INT,
    InstanceOf,
    Interval,
    Options,
    as_plain_int,
    validate_params,
)
from .contract import MultimodalModel
from .fusion import FUSIONS, build_fusion
from .names import ModalityDict

__all__ = ["MultimodalClassifier"]


class MultimodalClassifier(MultimodalModel):
    """A multimodal classifier for any number M >= 2 of modalities.

    Parameters
    ----------
    encoders : dict[str, nn.Module]
        One encoder per modality; ``encoders[m](x_m)`` must return ``(B, feature_dims[m])``.
        Modality order is the dict's order.
    feature_dims : dict[str, int]
        Output dimension of each encoder (same keys as ``encoders``).
    num_classes : int
        Number of classes C (at least 2).
    fusion : {"concat", "sum", "film", "gated", "late", "cosine", "shared"} or nn.Module, default "concat"
        The head. A custom ``nn.Module`` must map the complete feature dict to ``(B, C)``.
        ``"shared"`` (one ``nn.Linear`` on the sum of the features, MLA's head) needs equal
        ``feature_dims``.
    hidden_dim : int, optional
        Width of the fused space for ``sum``, ``film`` and ``gated``.
    film_target : str, optional
        The modulated modality of the ``film`` head (default: the first modality).
    """

    _parameter_constraints = {
        "encoders": [InstanceOf(Mapping, what="a dict {modality name: nn.Module}")],
        "feature_dims": [InstanceOf(Mapping, what="a dict {modality name: int}")],
        "num_classes": [Interval(2, None, integer=True)],
        "fusion": [Options(*FUSIONS), InstanceOf(nn.Module)],
        "hidden_dim": [None, POSITIVE_INT],
        "film_target": [None, str],
    }

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        feature_dims: Mapping[str, int],
        num_classes: int,
        fusion: str | nn.Module = "concat",
        *,
        hidden_dim: int | None = None,
        film_target: str | None = None,
    ):
        num_classes = as_plain_int(num_classes)
        validate_params(self._parameter_constraints, {
            "encoders": encoders, "feature_dims": feature_dims, "num_classes": num_classes,
            "fusion": fusion, "hidden_dim": as_plain_int(hidden_dim), "film_target": film_target,
        }, "MultimodalClassifier")
        super().__init__(encoders.keys(), num_classes)
        if set(feature_dims) != set(encoders):
            raise ValueError(
                f"feature_dims keys {sorted(feature_dims)} must equal encoders keys {sorted(encoders)}."
            )
        for m, enc in encoders.items():
            if not isinstance(enc, nn.Module):
                raise TypeError(f"encoder for {m!r} must be an nn.Module; got {type(enc).__name__}.")
            validate_params({f"feature_dims[{m!r}]": [POSITIVE_INT]},
                            {f"feature_dims[{m!r}]": as_plain_int(feature_dims[m])},
                            "MultimodalClassifier")
        self.feature_dims = {m: int(as_plain_int(feature_dims[m])) for m in self.modalities}
        self.encoders = ModalityDict({m: encoders[m] for m in self.modalities})
        if isinstance(fusion, nn.Module):
            self.fusion_type = type(fusion).__name__
            self.fusion = fusion
        else:
            kwargs = {"hidden_dim": hidden_dim}
            if fusion == "film":
                kwargs["film_target"] = film_target
            self.fusion_type = fusion
            self.fusion = build_fusion(fusion, self.feature_dims, num_classes, **kwargs)

    def fuse(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(features)

    def _check_feature_shapes(self, features):
        for m, f in features.items():
            if f.dim() != 2 or f.shape[1] != self.feature_dims[m]:
                raise ValueError(
                    f"encoder for modality {m!r} returned shape {tuple(f.shape)}; expected "
                    f"(B, {self.feature_dims[m]}) as declared in feature_dims."
                )

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, fusion={self.fusion_type!r}, num_classes={self.num_classes}"
