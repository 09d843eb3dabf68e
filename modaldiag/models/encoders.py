"""Small default encoders for the embedded datasets and the folder loader."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..utils.validation import (
    POSITIVE_INT,
    Interval,
    Satisfies,
    as_plain_int,
    validate_params,
)

__all__ = ["MLPEncoder", "Conv1dEncoder", "Conv2dEncoder", "FrameEncoder", "encoder_for_shape"]

_WIDTHS = Satisfies(lambda v: not isinstance(v, (str, bytes)) and all(
    isinstance(as_plain_int(w), int) and not isinstance(w, bool) and as_plain_int(w) >= 1 for w in v),
    "a sequence of positive integers (layer widths)")
_parameter_constraints = {
    "in_dim": [POSITIVE_INT],
    "in_channels": [POSITIVE_INT],
    "feature_dim": [POSITIVE_INT],
    "hidden": [_WIDTHS],
    "channels": [_WIDTHS],
    "kernel_size": [POSITIVE_INT],
    "dropout": [Interval(0, 1, closed="left")],
    "shape": [Satisfies(lambda v: not isinstance(v, (str, bytes)) and len(v) >= 1 and all(
        isinstance(as_plain_int(d), int) and not isinstance(d, bool) and as_plain_int(d) >= 1
        for d in v), "a non-empty sequence of positive integers (one sample's input shape)")],
}


def _check(owner: str, **params) -> dict:
    params = {k: as_plain_int(v) for k, v in params.items()}
    validate_params(_parameter_constraints, params, owner)
    return params


class MLPEncoder(nn.Module):
    """``(B, in_dim) -> (B, feature_dim)``: Linear-ReLU blocks (for feature views)."""

    def __init__(self, in_dim: int, feature_dim: int = 64, hidden: Sequence[int] = (128,),
                 dropout: float = 0.0):
        super().__init__()
        _check("MLPEncoder", in_dim=in_dim, feature_dim=feature_dim, hidden=hidden, dropout=dropout)
        in_dim, feature_dim = int(in_dim), int(feature_dim)
        layers: list[nn.Module] = []
        last = in_dim
        for width in hidden:
            layers += [nn.Linear(last, width), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            last = width
        layers += [nn.Linear(last, feature_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class Conv1dEncoder(nn.Module):
    """``(B, C_in, T) -> (B, feature_dim)``: a small 1-D CNN with global average pooling."""

    def __init__(self, in_channels: int, feature_dim: int = 64, channels: Sequence[int] = (32, 64),
                 kernel_size: int = 5):
        super().__init__()
        _check("Conv1dEncoder", in_channels=in_channels, feature_dim=feature_dim,
               channels=channels, kernel_size=kernel_size)
        layers: list[nn.Module] = []
        last = in_channels
        for width in channels:
            layers += [nn.Conv1d(last, width, kernel_size, padding=kernel_size // 2),
                       nn.BatchNorm1d(width), nn.ReLU(), nn.MaxPool1d(2)]
            last = width
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(last, feature_dim)

    def forward(self, x):
        return torch.relu(self.fc(self.conv(x).mean(-1)))


class Conv2dEncoder(nn.Module):
    """``(B, C_in, H, W) -> (B, feature_dim)``: a small 2-D CNN (spectrograms, images)."""

    def __init__(self, in_channels: int, feature_dim: int = 64, channels: Sequence[int] = (16, 32)):
        super().__init__()
        _check("Conv2dEncoder", in_channels=in_channels, feature_dim=feature_dim, channels=channels)
        layers: list[nn.Module] = []
        last = in_channels
        for width in channels:
            layers += [nn.Conv2d(last, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       nn.MaxPool2d(2)]
            last = width
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(last, feature_dim)

    def forward(self, x):
        return torch.relu(self.fc(self.conv(x).mean(dim=(-2, -1))))


class FrameEncoder(nn.Module):
    """``(B, T, C, H, W) -> (B, feature_dim)``: a 2-D CNN per frame, averaged over frames."""

    def __init__(self, in_channels: int = 3, feature_dim: int = 64, channels: Sequence[int] = (16, 32)):
        super().__init__()
        _check("FrameEncoder", in_channels=in_channels, feature_dim=feature_dim, channels=channels)
        self.frame = Conv2dEncoder(in_channels, feature_dim, channels)

    def forward(self, x):
        b, t = x.shape[:2]
        return self.frame(x.flatten(0, 1)).view(b, t, -1).mean(1)


def encoder_for_shape(shape: Sequence[int], feature_dim: int = 64) -> nn.Module:
    """A sensible encoder for one sample's input shape (without the batch dimension).

    ``shape`` is ``(D,)`` (MLP), ``(C, T)`` (1-D CNN), ``(C, H, W)`` (2-D CNN) or
    ``(T, C, H, W)`` (per-frame CNN); ``feature_dim`` (default 64) is the output width.
    """
    _check("encoder_for_shape", shape=shape, feature_dim=feature_dim)
    shape = tuple(int(as_plain_int(d)) for d in shape)
    if len(shape) == 1:
        return MLPEncoder(shape[0], feature_dim, hidden=(max(64, min(256, 2 * shape[0])),))
    if len(shape) == 2:
        return Conv1dEncoder(shape[0], feature_dim)
    if len(shape) == 3:
        return Conv2dEncoder(shape[0], feature_dim)
    if len(shape) == 4:
        return FrameEncoder(shape[1], feature_dim)
    raise ValueError(f"no default encoder for input shape {shape}; pass your own encoders.")
