"""Your own data and model on the command line: a published-style audio-visual classifier.

The model is shaped like the AVClassifier of the OGM-GE / PMR / AGM repositories: ResNet-style
conv encoders (BasicBlocks with in-place ReLU and ``out += identity``) for the audio spectrogram
and for the video frames (the T frames are folded into the batch dimension, encoded, pooled and
averaged back), and a fusion module returning ``(a, v, out)``. ``make_model`` wraps it with
``md.wrap`` so every probe and regulator reaches its encoders; ``make_data`` generates a small
seeded dataset (400 clips, 12x12 spectrograms, 2 frames of 12x12 RGB) where the audio carries
more class signal than the video, so joint training favours it.

From the repository root (each command takes a few seconds on a laptop CPU)::

    modaldiag train --data examples/custom_av.py:make_data --model examples/custom_av.py:make_model \\
        --method joint --epochs 10 --out runs/av-joint
    modaldiag train --data examples/custom_av.py:make_data --model examples/custom_av.py:make_model \\
        --method mmpareto --epochs 10 --out runs/av-mmpareto
    modaldiag diagnose --run runs/av-joint
    modaldiag diagnose --run runs/av-mmpareto
    modaldiag compare runs/av-joint runs/av-mmpareto --out runs/av-comparison

Re-running a ``train`` command resumes an interrupted run (or reports it complete). From Python:
``python examples/custom_av.py OUT_FOLDER`` runs the same commands into ``OUT_FOLDER``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import modaldiag as md

NUM_CLASSES = 4
AUDIO_SHAPE = (1, 12, 12)  # (channels, frequency, time) of one spectrogram
FRAMES = 2
FRAME_SHAPE = (3, 12, 12)  # one RGB frame


# ---------------------------------------------------------------- the published-style model
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
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetEncoder(nn.Module):
    """Stem + two BasicBlocks + global average pooling -> ``(B, 2 * width)``.

    ``modality="visual"`` takes ``(B, T, C, H, W)``: the frames are folded into the batch
    (``(B*T, C, H, W)``), encoded, and averaged back over T. ``"audio"`` takes ``(B, C, H, W)``.
    """

    def __init__(self, modality: str, in_channels: int, width: int = 8):
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
            b, t = x.shape[:2]
            x = x.reshape(b * t, *x.shape[2:])
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        x = x.mean(dim=(2, 3))
        if self.modality == "visual":
            x = x.reshape(b, t, -1).mean(1)
        return x


class ConcatFusion(nn.Module):
    """``fc_out(cat(a, v))``; returns ``(a, v, out)`` as the published repositories do."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.fc_out = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return x, y, self.fc_out(torch.cat((x, y), dim=1))


class AVClassifier(nn.Module):
    """``forward(audio (B, 1, F, T), visual (B, T, 3, H, W)) -> (a, v, logits)``."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        self.audio_net = ResNetEncoder("audio", AUDIO_SHAPE[0], width)
        self.visual_net = ResNetEncoder("visual", FRAME_SHAPE[0], width)
        self.fusion_module = ConcatFusion(4 * width, num_classes)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        return self.fusion_module(self.audio_net(audio), self.visual_net(visual))


# ---------------------------------------------------------------- what the CLI calls
def make_data(seed: int = 0, n: int = 400) -> md.datasets.DatasetSplits:
    """A seeded synthetic audio-visual dataset: 60/20/20 % train/val/test of ``n`` clips.

    Each class has a fixed spectrogram pattern and a fixed frame pattern; a clip is its class
    pattern (audio at strength 1.0, video at 0.35) plus unit Gaussian noise. Returns
    ``DatasetSplits`` with inputs ``{"audio": (n, 1, 12, 12), "visual": (n, 2, 3, 12, 12)}``.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    audio_patterns = torch.randn(NUM_CLASSES, *AUDIO_SHAPE, generator=g)
    frame_patterns = torch.randn(NUM_CLASSES, 1, *FRAME_SHAPE, generator=g)
    audio = 1.0 * audio_patterns[labels] + torch.randn(n, *AUDIO_SHAPE, generator=g)
    visual = 0.35 * frame_patterns[labels] + torch.randn(n, FRAMES, *FRAME_SHAPE, generator=g)
    names = ["class-a", "class-b", "class-c", "class-d"]
    parts = (slice(0, int(0.6 * n)), slice(int(0.6 * n), int(0.8 * n)), slice(int(0.8 * n), n))
    sets = [md.datasets.MultimodalDataset({"audio": audio[p], "visual": visual[p]}, labels[p],
                                          num_classes=NUM_CLASSES, class_names=names,
                                          name="custom-av") for p in parts]
    return md.datasets.DatasetSplits("custom-av", *sets,
                                     description="synthetic audio-visual clips (examples/custom_av.py)")


def make_model(splits) -> md.models.MultimodalModel:
    """The AVClassifier, wrapped: encoders are the model's own ``audio_net`` / ``visual_net``,
    the head is its fusion module's logits (``[-1]`` of ``(a, v, out)``)."""
    net = AVClassifier(num_classes=splits.num_classes)
    return md.wrap(net, encoders={"audio": net.audio_net, "visual": net.visual_net},
                   head=lambda f: net.fusion_module(f["audio"], f["visual"])[-1],
                   num_classes=splits.num_classes)


def main(out: str = "custom-av-out", epochs: int = 10) -> int:
    """Run the commands of the module docstring into ``out`` (returns the last exit code)."""
    from modaldiag.cli import main as cli

    here = Path(__file__).resolve()
    spec = ["--data", f"{here}:make_data", "--model", f"{here}:make_model"]
    out = Path(out)
    for method in ("joint", "mmpareto"):
        code = cli(["train", *spec, "--method", method, "--epochs", str(epochs),
                    "--out", str(out / method)])
        code = code or cli(["diagnose", "--run", str(out / method)])
        if code:
            return code
    return cli(["compare", str(out / "joint"), str(out / "mmpareto"), "--out",
                str(out / "comparison")])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
