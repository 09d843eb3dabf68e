"""``md.wrap``: give an existing model the modaldiag contract without touching its weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .contract import MultimodalModel

__all__ = ["wrap", "WrappedModel"]


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
        super().__init__(encoders.keys(), num_classes)
        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap() needs an nn.Module; got {type(model).__name__}.")
        if not callable(head):
            raise TypeError("head must be callable: head(features: dict[str, Tensor]) -> logits.")
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
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self._head_fn = head
        self.fusion_type = "wrapped"

    def fuse(self, features):
        logits = self._head_fn(dict(features))
        if isinstance(logits, (tuple, list)):
            raise TypeError(
                "the wrapped head returned a tuple; return only the logits (B, C), e.g. "
                "head=lambda f: model.fusion_module(f['audio'], f['visual'])[-1]."
            )
        if self.num_classes is None:
            self.num_classes = int(logits.shape[-1])
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
        Inferred from the first head call when omitted.

    Example
    -------
    >>> wrapped = md.wrap(net, encoders={"audio": net.audio_net, "visual": net.visual_net},
    ...                   head=lambda f: net.fusion_module(f["audio"], f["visual"]))
    """
    return WrappedModel(model, encoders, head, num_classes)
