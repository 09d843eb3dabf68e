"""Folder loader for the layout of the audio-visual papers (CREMA-D / Kinetics-Sounds style).

Layout (names configurable)::

    root/
      train.csv            # one row per clip: "<clip id>,<label>" (a header row is optional)
      test.csv
      audio/<clip id>.npy  # a spectrogram array (F, T), float
      visual/<clip id>/    # extracted frames, *.jpg / *.png, sorted by name

Each sample is ``({"audio": (1, F, T), "visual": (num_frames, 3, H, W)}, label)``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .base import DatasetSplits

__all__ = ["AVFolderDataset", "av_folder"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]


def _inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing anything that resolves outside ``root``."""
    if not relative or "\x00" in relative:
        raise ValueError(f"invalid {what} {relative!r}.")
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{what} {relative!r} escapes the dataset root {str(root)!r}; refused.")
    return path


def _read_csv(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ValueError(f"clip list {str(path)!r} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"clip list {path.name!r} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); save it as a UTF-8 CSV.") from None
    try:
        parsed = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ValueError(f"clip list {path.name!r} is not a valid CSV: {exc}.") from None
    rows = []
    for lineno, row in enumerate(parsed, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2:
            raise ValueError(f"{path.name}:{lineno}: expected '<clip id>,<label>'; got {row!r}.")
        clip, label = row[0].strip(), row[1].strip()
        if lineno == 1 and label.lower() in ("label", "class", "y"):
            continue
        if not clip or not label:
            raise ValueError(f"{path.name}:{lineno}: empty clip id or label in {row!r}.")
        rows.append((clip, label))
    if not rows:
        raise ValueError(f"clip list {str(path)!r} lists no clips.")
    return rows


class AVFolderDataset(Dataset):
    """Audio spectrograms + video frames listed in a CSV.

    Parameters
    ----------
    root : path
        Dataset root; every file read must lie inside it.
    csv_file : str, default "train.csv"
        Clip list, relative to ``root``.
    audio_dir, visual_dir : str
        Sub-folders holding ``<clip>.npy`` and ``<clip>/`` frames.
    num_frames : int, default 3
        Frames per clip, evenly spaced over the clip's frames (deterministic).
    image_size : int, default 112
        Frames are resized to ``image_size x image_size`` and ImageNet-normalised.
    audio_length : int, optional
        Crop/zero-pad spectrograms to this many time steps (needed when clips differ in length).
    class_names : sequence of str, optional
        Label order; defaults to the sorted labels of this CSV. Pass the training set's
        ``class_names`` to the test set.
    """

    modalities = ("audio", "visual")

    def __init__(self, root, csv_file: str = "train.csv", *, audio_dir: str = "audio",
                 visual_dir: str = "visual", num_frames: int = 3, image_size: int = 112,
                 audio_length: int | None = None, class_names: Sequence[str] | None = None,
                 _rows: list[tuple[str, str]] | None = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"dataset root {str(root)!r} is not a directory.")
        self.audio_root = _inside(self.root, audio_dir, "audio_dir")
        self.visual_root = _inside(self.root, visual_dir, "visual_dir")
        self.csv_file, self.audio_dir, self.visual_dir = csv_file, audio_dir, visual_dir
        self.rows = _rows if _rows is not None else _read_csv(_inside(self.root, csv_file, "csv_file"))
        labels = sorted({label for _, label in self.rows})
        self.class_names = list(class_names) if class_names is not None else labels
        unknown = [lb for lb in labels if lb not in self.class_names]
        if unknown:
            raise ValueError(f"labels {unknown} in {csv_file} are not in class_names {self.class_names}.")
        self.num_classes = len(self.class_names)
        self.num_frames, self.image_size, self.audio_length = num_frames, image_size, audio_length
        self.labels = torch.tensor([self.class_names.index(lb) for _, lb in self.rows], dtype=torch.long)
        self.name = self.root.name

    def __len__(self) -> int:
        return len(self.rows)

    def _audio(self, clip: str) -> torch.Tensor:
        path = _inside(self.audio_root, f"{clip}.npy", "clip id")
        if not path.is_file():
            raise ValueError(f"missing spectrogram for clip {clip!r}: {str(path)!r}.")
        spec = np.load(path, allow_pickle=False).astype(np.float32)
        if spec.ndim != 2:
            raise ValueError(f"spectrogram of clip {clip!r} has shape {spec.shape}; expected (F, T).")
        if self.audio_length is not None:
            t = spec.shape[1]
            if t >= self.audio_length:
                spec = spec[:, : self.audio_length]
            else:
                spec = np.pad(spec, ((0, 0), (0, self.audio_length - t)))
        return torch.from_numpy(spec).unsqueeze(0)

    def _frames(self, clip: str) -> torch.Tensor:
        from PIL import Image

        folder = _inside(self.visual_root, clip, "clip id")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        if not files:
            raise ValueError(f"no frames for clip {clip!r} in {str(folder)!r}.")
        picks = np.linspace(0, len(files) - 1, self.num_frames).round().astype(int)
        frames = []
        for i in picks:
            with Image.open(files[i]) as img:
                img = img.convert("RGB").resize((self.image_size, self.image_size))
                arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            frames.append((arr - _MEAN) / _STD)
        return torch.from_numpy(np.stack(frames))

    def __getitem__(self, index):
        clip, _ = self.rows[index]
        return {"audio": self._audio(clip), "visual": self._frames(clip)}, self.labels[index]

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        inputs, _ = self[0]
        return {m: tuple(x.shape) for m, x in inputs.items()}

    def subset(self, indices) -> AVFolderDataset:
        return AVFolderDataset(self.root, self.csv_file, audio_dir=self.audio_dir,
                               visual_dir=self.visual_dir, num_frames=self.num_frames,
                               image_size=self.image_size, audio_length=self.audio_length,
                               class_names=self.class_names,
                               _rows=[self.rows[int(i)] for i in indices])

    def loader(self, batch_size: int = 16, shuffle: bool = False, num_workers: int = 0) -> DataLoader:
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)


def av_folder(root, *, train_csv: str = "train.csv", test_csv: str = "test.csv",
              val_fraction: float = 0.1, seed: int = 0, **kwargs) -> DatasetSplits:
    """Train/val/test splits of an audio-visual folder; val is carved from train, never test."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}.")
    full = AVFolderDataset(root, train_csv, **kwargs)
    test = AVFolderDataset(root, test_csv, class_names=full.class_names, **kwargs)
    order = np.random.default_rng(seed).permutation(len(full))
    n_val = max(1, int(round(val_fraction * len(full))))
    return DatasetSplits(full.name, full.subset(np.sort(order[n_val:])),
                         full.subset(np.sort(order[:n_val])), test,
                         description="audio-visual folder dataset", license="the user's")
