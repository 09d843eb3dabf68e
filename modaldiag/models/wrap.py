"""``md.wrap``: give an existing model the modaldiag contract without touching its weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..utils.validation import InstanceOf, Interval, as_plain_int, validate_params
from .contract import MultimodalModel
from .names import ModalityDict

__all__ = ["wrap", "WrappedModel"]


_parameter_constraints = {
    "model": [InstanceOf(nn.Module, what="an nn.Module (the model to wrap)")],
    "encoders": [InstanceOf(Mapping, what="a dict {modality name: the model's encoder submodule}")],
    "head": [InstanceOf(Callable, what="a callable head(features: dict[str, Tensor]) -> logits (B, C)")],
    "num_classes": [None, Interval(2, None, integer=True)],
}


class WrappedModel(MultimodalModel):
    """A user model seen through the contract. Built by :func:`wrap`.

    The user model is kept as the submodule ``model``; ``encoders`` holds the *same* module
    objects, so their parameters are shared, not copied.
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: Mapping[str, nn.Module],
        head: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
        num_classes: int | None = None,
    ):
        num_classes = as_plain_int(num_classes)
        validate_params(_parameter_constraints, {"model": model, "encoders": encoders,
                                                 "head": head, "num_classes": num_classes}, "wrap")
        super().__init__(encoders.keys(), num_classes)
        owned = {id(p) for p in model.parameters()}
        for m, enc in encoders.items():
            if not isinstance(enc, nn.Module):
                raise TypeError(f"encoder for {m!r} must be an nn.Module; got {type(enc).__name__}.")
            foreign = [n for n, p in enc.named_parameters() if id(p) not in owned]
            if foreign:
                raise ValueError(
                    f"encoder for {m!r} has parameters that are not the wrapped model's "
                    f"(e.g. {foreign[0]!r}); pass the model's own submodules, e.g. "
                    "encoders={'audio': model.audio_net}."
                )
        self.model = model
        self.encoders = ModalityDict({m: encoders[m] for m in self.modalities})
        self._head_fn = head
        self.fusion_type = "wrapped"

    def fuse(self, features):
        logits = self._head_fn(dict(features))
        if isinstance(logits, (tuple, list)):
            raise TypeError(
                "the wrapped head returned a tuple; return only the logits (B, C), e.g. "
                "head=lambda f: model.fusion_module(f['audio'], f['visual'])[-1]."
            )
        return logits


def wrap(
    model: nn.Module,
    encoders: Mapping[str, nn.Module],
    head: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    num_classes: int | None = None,
) -> WrappedModel:
    """Wrap an existing multimodal model into the modaldiag contract.

    Parameters
    ----------
    model : nn.Module
        The user's model (its weights are used as they are).
    encoders : dict[str, nn.Module]
        The model's own encoder submodules, one per modality, each mapping its input to a feature
        ``(B, d_m)``. If an encoder returns feature maps, compose it with the pooling the model
        applies, e.g. ``nn.Sequential(model.visual_net, nn.AdaptiveAvgPool2d(1), nn.Flatten())``;
        the parameters stay the model's own.
    head : callable
        ``head(features: dict[str, Tensor]) -> logits (B, C)``: the model's fusion part.
    num_classes : int, optional
        At least 2. Inferred from the first head call when omitted; every later head output must
        then have that many columns (a ValueError names the shape otherwise).

    Example
    -------
    >>> wrapped = md.wrap(net, encoders={"audio": net.audio_net, "visual": net.visual_net},
    ...                   head=lambda f: net.fusion_module(f["audio"], f["visual"]))
    """
    return WrappedModel(model, encoders, head, num_classes)
