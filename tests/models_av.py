"""A tiny published-style audio-visual model, shaped like the AVClassifier of the OGM-GE / PMR /
AGM repositories, for tests.

- audio: a ResNet-ish 2-D conv encoder on spectrograms ``(B, 1, 8, 8)``: a stem and BasicBlocks
  with ``nn.ReLU(inplace=True)`` and ``out += identity``, BatchNorm everywhere, a strided block
  with a 1x1 downsample; pooled to ``(B, d)``;
- visual: the same encoder on video ``(B, T, 3, 8, 8)``; the T frames are folded into the batch
  inside ``forward`` (``(B*T, 3, 8, 8)``), encoded, pooled, and averaged back to ``(B, d)``;
- fusion: a concat module returning ``(a, v, out)`` like the published repos.

``make_av_model`` returns the raw network and its ``md.wrap`` view; ``make_av_batch`` a batch.
"""

from __future__ import annotations

import torch
from torch import nn

import modaldiag as md

__all__ = ["BasicBlock", "TinyResNet", "ConcatFusion", "AVClassifier", "make_av_model",
           "make_av_batch", "AUDIO_SHAPE", "FRAMES", "FRAME_SHAPE"]

AUDIO_SHAPE = (1, 8, 8)
FRAMES = 2
FRAME_SHAPE = (3, 8, 8)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu(inplace)-conv-bn, ``out += identity``, relu."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem + two BasicBlocks + global average pooling. ``modality="visual"`` takes
    ``(B, T, C, H, W)`` and folds the frames into the batch; ``"audio"`` takes ``(B, C, H, W)``.
    Returns ``(B, 2 * width)``."""

    def __init__(self, modality: str, in_channels: int, width: int = 4):
        super().__init__()
        self.modality = modality
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "visual":
            b, t, c, h, w = x.shape
            x = x.reshape(b * t, c, h, w)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = x.mean(dim=(2, 3))
        if self.modality == "visual":
            x = x.reshape(b, t, -1).mean(1)
        return x


class ConcatFusion(nn.Module):
    """``fc_out(cat(a, v))``; returns ``(a, v, out)`` as the published repos do."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.fc_out = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return x, y, self.fc_out(torch.cat((x, y), dim=1))


class AVClassifier(nn.Module):
    def __init__(self, num_classes: int = 4, width: int = 4):
        super().__init__()
        self.audio_net = TinyResNet("audio", AUDIO_SHAPE[0], width)
        self.visual_net = TinyResNet("visual", FRAME_SHAPE[0], width)
        self.fusion_module = ConcatFusion(4 * width, num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        return self.fusion_module(self.audio_net(audio), self.visual_net(visual))


def make_av_batch(n: int = 6, seed: int = 1, num_classes: int = 4
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"audio": (n, 1, 8, 8), "visual": (n, FRAMES, 3, 8, 8)}, labels (n,))``."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"audio": torch.randn(n, *AUDIO_SHAPE, generator=g),
              "visual": torch.randn(n, FRAMES, *FRAME_SHAPE, generator=g)}
    return inputs, torch.arange(n) % num_classes


def make_av_model(seed: int = 0, num_classes: int = 4, width: int = 4):
    """``(net, wrapped)``: the raw AVClassifier and ``md.wrap`` of it. The BatchNorm running
    statistics are moved away from their defaults by a few training-mode forwards."""
    torch.manual_seed(seed)
    net = AVClassifier(num_classes, width)
    with torch.no_grad():
        for s in range(2):
            x, _ = make_av_batch(8, seed=100 + s, num_classes=num_classes)
            net(x["audio"] * 2 + 0.5, x["visual"] * 1.5 - 0.3)
    net.eval()
    wrapped = md.wrap(net, encoders={"audio": net.audio_net, "visual": net.visual_net},
                      head=lambda f: net.fusion_module(f["audio"], f["visual"])[-1],
                      num_classes=num_classes)
    return net, wrapped
