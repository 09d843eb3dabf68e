"""Folder loader for the layout of the audio-visual papers (CREMA-D / Kinetics-Sounds style).

Layout (names configurable)::

    root/
      train.csv            # one row per clip: "<clip id>,<label>" (a header row is optional)
      test.csv
      audio/<clip id>.npy  # a spectrogram array (F, T), float
      visual/<clip id>/    # extracted frames, *.jpg / *.png, sorted by name

Each sample is ``({"audio": (1, F, T), "visual": (num_frames, 3, H, W)}, label)``.

Missing modalities: a header row naming ``audio_present`` and/or ``visual_present`` columns
(``clip,label,audio_present,visual_present``, values 0/1) marks per clip which modalities it has.
A clip's absent modality needs no file: its input is a zero placeholder (zeros of the
spectrogram's shape; for frames, zeros after ImageNet normalisation, i.e. the mean image) and
every sample is then ``(inputs, label, {"audio": bool, "visual": bool})``, so training and probes
replace its features by the model's baseline.

Safety: every path is resolved (symlinks followed) and anything that lands outside ``root`` (the
CSV, the sub-folders, a clip folder, a spectrogram or a frame file) is refused. ``.npy`` files are
read with ``allow_pickle=False`` after their header has been checked against the file size, so a
hostile header never makes modaldiag allocate memory.

Header row: ``header=True`` drops the first CSV row, ``header=False`` keeps it. The default
(``None``) drops it only when it cannot be a clip: there are other rows, its label is not a known class (a
name in ``class_names``, or a label of another row) *and* no spectrogram
``<audio_dir>/<clip id>.npy`` exists for its clip id. A first row ``clip_007,label`` whose clip
exists is therefore data; a CSV of one row is always data.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.validation import (
    BOOL,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    Interval,
    Satisfies,
    as_plain_int,
    closest_match,
    validate_params,
)
from .base import DatasetSplits

__all__ = ["AVFolderDataset", "av_folder"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
_MAX_IMAGE_PIXELS = 64_000_000

_STRINGS = Satisfies(lambda v: not isinstance(v, str) and all(isinstance(c, str) for c in v),
                     "a sequence of strings")
_parameter_constraints = {
    "csv_file": [str],
    "audio_dir": [str],
    "visual_dir": [str],
    "num_frames": [POSITIVE_INT],
    "image_size": [POSITIVE_INT],
    "audio_length": [None, POSITIVE_INT],
    "class_names": [None, _STRINGS],
    "header": [None, bool],
    "train_csv": [str],
    "test_csv": [str],
    "val_fraction": [Interval(0, 1, closed="neither")],
    "seed": [NON_NEGATIVE_INT],
}


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _inside(root: Path, relative: str, what: str, *, base: Path | None = None) -> Path:
    """``base / relative`` (``base`` defaults to ``root``) with symlinks resolved.

    Refuses a path that names a place outside ``base`` (``..``, absolute paths) or whose real
    location (after following symlinks) lies outside ``root``.
    """
    base = root if base is None else base
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise ValueError(f"invalid {what} {relative!r}.")
    lexical = Path(os.path.normpath(base / relative))
    if not _within(lexical, base):
        where = f"{str(root)!r}" if base == root else f"(it points outside {str(base)!r})"
        raise ValueError(f"{what} {relative!r} escapes the dataset root {where}; refused.")
    path = lexical.resolve()
    if not _within(path, root):
        raise ValueError(
            f"{what} {relative!r} escapes the dataset root {str(root)!r}: it is a symlink that "
            f"resolves to {str(path)!r}; refused (copy the data into the root instead).")
    return path


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """``(clip id, label)`` rows of a clip list, the first row included (see ``header``)."""
    rows = []
    for lineno, row in _csv_rows(path):
        if len(row) < 2:
            raise ValueError(f"{path.name}:{lineno}: expected '<clip id>,<label>'; got {row!r}.")
        clip, label = row[0].strip(), row[1].strip()
        if not clip or not label:
            raise ValueError(f"{path.name}:{lineno}: empty clip id or label in {row!r}.")
        rows.append((clip, label))
    return rows


def _presence_columns(path: Path, modalities: Sequence[str]) -> dict[str, list[bool]] | None:
    """Per-row presence flags from the ``<modality>_present`` columns named in the CSV's first
    row (the header), or None when the first row names no such column."""
    table = _csv_rows(path)
    if not table:
        return None
    head_line, head = table[0]
    names = [f"{m}_present" for m in modalities]
    columns = {i: c.strip() for i, c in enumerate(head) if c.strip().lower().endswith("_present")}
    if not columns:
        typo = next((c.strip() for c in head[2:] if closest_match(c.strip(), names)), None)
        if typo is not None:
            raise ValueError(f"{path.name}:{head_line}: column {typo!r} is not a presence column; "
                             f"did you mean {closest_match(typo, names)!r}? Presence columns are "
                             f"named {names}.")
        return None
    out: dict[str, list[bool]] = {}
    for i, name in columns.items():
        if name not in names:
            close = closest_match(name, names)
            hint = f" Did you mean {close!r}?" if close else ""
            raise ValueError(f"{path.name}:{head_line}: column {name!r} names no modality; the "
                             f"presence columns are {names}.{hint}")
        flags = []
        for lineno, row in table[1:]:
            value = row[i].strip() if i < len(row) else ""
            if value not in ("0", "1"):
                raise ValueError(
                    f"{path.name}:{lineno}: column {name!r} must be 0 or 1 (1 = the clip has this "
                    f"modality, 0 = it is missing); got {value!r}.")
            flags.append(value == "1")
        out[name[: -len("_present")]] = flags
    return out


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every non-empty row of a CSV file."""
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
    return [(lineno, row) for lineno, row in enumerate(parsed, start=1)
            if row and any(c.strip() for c in row)]


def _npy_header(path: Path, clip: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a spectrogram ``.npy`` file, checked against the file's size.

    Nothing is allocated from the header: a header that claims more (or fewer) bytes than the
    file holds, an object/structured dtype or a non-2-D shape is refused with a ValueError.
    """
    where = f"spectrogram {str(path)!r} of clip {clip!r}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise ValueError(f"{where} is not a readable .npy array: {exc}. Save it with "
                         "np.save(path, array.astype(np.float32)).") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"{where} has dtype {dtype}; expected a numeric (float or integer) array "
                         "(object and structured arrays are refused, never unpickled).")
    if len(shape) != 2:
        raise ValueError(f"{where} has shape {shape}; expected a 2-D spectrogram (F, T).")
    claimed = math.prod(shape) * dtype.itemsize
    if offset + claimed != size:
        raise ValueError(
            f"{where}: its header claims shape {shape} of {dtype} ({claimed} bytes of data) but "
            f"the file holds {size - offset} bytes after the header; the file is truncated or "
            "corrupt. Re-create it with np.save.")
    return tuple(int(d) for d in shape), dtype


class AVFolderDataset(Dataset):
    """Audio spectrograms + video frames listed in a CSV.

    Parameters
    ----------
    root : path
        Dataset root; every file read must lie inside it (symlinks are resolved first).
    csv_file : str, default "train.csv"
        Clip list, relative to ``root``: one ``<clip id>,<label>`` row per clip.
    audio_dir, visual_dir : str
        Sub-folders holding ``<clip>.npy`` and ``<clip>/`` frames.
    num_frames : int, default 3
        Frames per clip (>= 1), evenly spaced over the clip's frames (deterministic; a clip with
        fewer frames repeats some). Clips may have different frame counts and frame sizes.
    image_size : int, default 112
        Frames are resized to ``image_size x image_size`` (>= 1) and ImageNet-normalised.
    audio_length : int, optional
        Crop/zero-pad spectrograms to this many time steps. Needed when clips differ in length:
        without it, clips of different lengths are refused at construction (the message names
        two of them).
    class_names : sequence of str, optional
        Label order; defaults to the sorted labels of this CSV. Pass the training set's
        ``class_names`` to the test set.
    header : bool, optional
        Whether the CSV's first row is a header: True drops it, False keeps it, None (default)
        drops it only when its label is not a known class and its clip has no spectrogram.

    Raises
    ------
    ValueError
        For paths outside ``root``, a CSV without clips, missing or malformed spectrograms, and
        spectrograms of different shapes (all naming the file).
    """

    modalities = ("audio", "visual")

    def __init__(self, root, csv_file: str = "train.csv", *, audio_dir: str = "audio",
                 visual_dir: str = "visual", num_frames: int = 3, image_size: int = 112,
                 audio_length: int | None = None, class_names: Sequence[str] | None = None,
                 header: bool | None = None, _rows: list[tuple[str, str]] | None = None,
                 _present: dict[str, list[bool]] | None = None):
        num_frames, image_size, audio_length = (
            as_plain_int(v) for v in (num_frames, image_size, audio_length))
        validate_params(_parameter_constraints, {
            "csv_file": csv_file, "audio_dir": audio_dir, "visual_dir": visual_dir,
            "num_frames": num_frames, "image_size": image_size, "audio_length": audio_length,
            "class_names": class_names, "header": header}, "AVFolderDataset")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"dataset root {str(root)!r} is not a directory.")
        self.audio_root = _inside(self.root, audio_dir, "audio_dir")
        self.visual_root = _inside(self.root, visual_dir, "visual_dir")
        self.csv_file, self.audio_dir, self.visual_dir = csv_file, audio_dir, visual_dir
        self.num_frames, self.image_size, self.audio_length = num_frames, image_size, audio_length
        self._audio_shape: tuple[int, ...] | None = None
        if _rows is None:
            path = _inside(self.root, csv_file, "csv_file")
            rows = _read_csv(path)
            present = _presence_columns(path, self.modalities)
            if present is None:
                rows = self._drop_header(rows, header, class_names)
            elif header is False:
                raise ValueError(
                    f"clip list {csv_file!r}: header=False but its first row names presence "
                    f"columns {[f'{m}_present' for m in present]}; drop header=False (a CSV with "
                    "presence columns starts with its header row).")
            else:
                rows = rows[1:]
            if not rows:
                raise ValueError(f"clip list {csv_file!r} lists no clips.")
            self.present = present
            self._check_spectrograms(rows, first_may_be_header=header is None and present is None)
        else:
            rows, self.present = _rows, _present
        self.rows = rows
        labels = sorted({label for _, label in self.rows})
        self.class_names = list(class_names) if class_names is not None else labels
        unknown = [lb for lb in labels if lb not in self.class_names]
        if unknown:
            raise ValueError(f"labels {unknown} in {csv_file} are not in class_names {self.class_names}.")
        self.num_classes = len(self.class_names)
        self.labels = torch.tensor([self.class_names.index(lb) for _, lb in self.rows], dtype=torch.long)
        self.name = self.root.name

    def _drop_header(self, rows, header, class_names):
        if not rows or header is False:
            return rows
        if header:
            return rows[1:]
        if len(rows) < 2:
            return rows
        clip, label = rows[0]
        known = set(class_names) if class_names is not None else {lb for _, lb in rows[1:]}
        if label in known:
            return rows
        try:
            has_clip = (self.audio_root / f"{clip}.npy").is_file()
        except (OSError, ValueError):
            has_clip = False
        return rows if has_clip else rows[1:]

    def _spectrogram_path(self, clip: str) -> Path:
        path = _inside(self.root, f"{clip}.npy", "spectrogram file", base=self.audio_root)
        if not path.is_file():
            raise ValueError(f"missing spectrogram for clip {clip!r}: {str(path)!r}.")
        return path

    def _check_spectrograms(self, rows, *, first_may_be_header: bool = False) -> None:
        """Read every spectrogram's header (not its data): valid, and shapes that can batch."""
        first: tuple[str, tuple[int, ...]] | None = None
        for i, (clip, _) in enumerate(rows):
            if not self._has(i, "audio"):
                continue
            try:
                path = self._spectrogram_path(clip)
            except ValueError as exc:
                if i == 0 and first_may_be_header and "missing" in str(exc):
                    raise ValueError(f"{exc} If the first row of {self.csv_file!r} is a header, "
                                     "pass header=True.") from None
                raise
            shape, _ = _npy_header(path, clip)
            if first is None:
                first = (clip, shape)
                self._audio_shape = shape
                continue
            ref_clip, ref = first
            if shape[0] != ref[0]:
                raise ValueError(
                    f"spectrograms differ in frequency bins: clip {ref_clip!r} has shape {ref}, "
                    f"clip {clip!r} has {shape}; every spectrogram must have the same F.")
            if self.audio_length is None and shape[1] != ref[1]:
                raise ValueError(
                    f"clips differ in length: the spectrogram of clip {ref_clip!r} has shape {ref}, "
                    f"that of clip {clip!r} has {shape}. Pass audio_length=T to crop/zero-pad "
                    "every spectrogram to T time steps.")

    def __len__(self) -> int:
        return len(self.rows)

    def _audio(self, clip: str) -> torch.Tensor:
        path = self._spectrogram_path(clip)
        _npy_header(path, clip)
        try:
            spec = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(f"spectrogram {str(path)!r} of clip {clip!r} cannot be read: {exc}.") from None
        if self.audio_length is not None:
            t = spec.shape[1]
            if t >= self.audio_length:
                spec = spec[:, : self.audio_length]
            else:
                spec = np.pad(spec, ((0, 0), (0, self.audio_length - t)))
        return torch.from_numpy(np.ascontiguousarray(spec)).unsqueeze(0)

    def _frames(self, clip: str) -> torch.Tensor:
        from PIL import Image

        folder = _inside(self.root, clip, "frame folder of clip", base=self.visual_root)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        if not files:
            raise ValueError(f"no frames for clip {clip!r} in {str(folder)!r}.")
        picks = np.linspace(0, len(files) - 1, self.num_frames).round().astype(int)
        frames = []
        for i in picks:
            path = files[i]
            real = path.resolve()
            if not _within(real, self.root):
                raise ValueError(
                    f"frame file {str(path)!r} of clip {clip!r} escapes the dataset root "
                    f"{str(self.root)!r}: it is a symlink that resolves to {str(real)!r}; refused.")
            try:
                with Image.open(real) as img:
                    if img.width * img.height > _MAX_IMAGE_PIXELS:
                        raise ValueError(f"{img.width}x{img.height} pixels is too large a frame")
                    img = img.convert("RGB").resize((self.image_size, self.image_size))
                    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"frame file {str(path)!r} of clip {clip!r} cannot be read as an "
                                 f"image: {exc}.") from None
            frames.append((arr - _MEAN) / _STD)
        return torch.from_numpy(np.stack(frames))

    def _has(self, index: int, modality: str) -> bool:
        """Whether clip ``index`` has ``modality`` (always, without presence columns)."""
        present = getattr(self, "present", None)
        return present is None or modality not in present or present[modality][index]

    def _placeholder(self, modality: str) -> torch.Tensor:
        """Zeros shaped like the modality's input: the input of a clip where it is absent."""
        if modality == "visual":
            return torch.zeros(self.num_frames, 3, self.image_size, self.image_size)
        if self._audio_shape is None:
            clip = next((c for i, (c, _) in enumerate(self.rows) if self._has(i, "audio")), None)
            if clip is None:
                raise ValueError("every clip has audio_present=0: there is no spectrogram to take "
                                 "the placeholder's shape from.")
            self._audio_shape = _npy_header(self._spectrogram_path(clip), clip)[0]
        f, t = self._audio_shape
        return torch.zeros(1, f, self.audio_length or t)

    def __getitem__(self, index):
        clip, _ = self.rows[index]
        inputs = {"audio": self._audio(clip) if self._has(index, "audio") else self._placeholder("audio"),
                  "visual": self._frames(clip) if self._has(index, "visual")
                  else self._placeholder("visual")}
        if getattr(self, "present", None) is None:
            return inputs, self.labels[index]
        return inputs, self.labels[index], {m: torch.tensor(flags[index])
                                            for m, flags in self.present.items()}

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        inputs = self[0][0]
        return {m: tuple(x.shape) for m, x in inputs.items()}

    def subset(self, indices) -> AVFolderDataset:
        return AVFolderDataset(self.root, self.csv_file, audio_dir=self.audio_dir,
                               visual_dir=self.visual_dir, num_frames=self.num_frames,
                               image_size=self.image_size, audio_length=self.audio_length,
                               class_names=self.class_names,
                               _rows=[self.rows[int(i)] for i in indices],
                               _present=None if self.present is None else
                               {m: [f[int(i)] for i in indices] for m, f in self.present.items()})

    def loader(self, batch_size: int = 16, shuffle: bool = False, num_workers: int = 0) -> DataLoader:
        """A DataLoader over the clips (``batch_size`` >= 1, ``num_workers`` >= 0)."""
        batch_size, num_workers = as_plain_int(batch_size), as_plain_int(num_workers)
        validate_params({"batch_size": [POSITIVE_INT], "shuffle": [BOOL],
                         "num_workers": [NON_NEGATIVE_INT]},
                        {"batch_size": batch_size, "shuffle": shuffle, "num_workers": num_workers},
                        "AVFolderDataset.loader")
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers)


def av_folder(root, *, train_csv: str = "train.csv", test_csv: str = "test.csv",
              val_fraction: float = 0.1, seed: int = 0, **kwargs) -> DatasetSplits:
    """Train/val/test splits of an audio-visual folder; val is carved from train, never test.

    Parameters
    ----------
    root : path
        The dataset root (layout in the module docstring).
    train_csv, test_csv : str
        Clip lists relative to ``root``. The training list needs at least 2 clips (one or more
        go to validation, the rest to training).
    val_fraction : float, default 0.1
        Share of the training clips held out for validation, in (0, 1); at least one clip.
    seed : int, default 0
        Seed of the train/val split.
    **kwargs
        Passed to :class:`AVFolderDataset` (``num_frames``, ``image_size``, ``audio_length``,
        ``header``, ...).
    """
    seed = as_plain_int(seed)
    validate_params(_parameter_constraints, {"train_csv": train_csv, "test_csv": test_csv,
                                             "val_fraction": val_fraction, "seed": seed},
                    "av_folder")
    full = AVFolderDataset(root, train_csv, **kwargs)
    if len(full) < 2:
        raise ValueError(
            f"{train_csv} lists {len(full)} clip; av_folder needs at least 2 training clips "
            "(validation is carved from the training list).")
    test = AVFolderDataset(root, test_csv, class_names=full.class_names, **kwargs)
    order = np.random.default_rng(seed).permutation(len(full))
    n_val = min(len(full) - 1, max(1, int(round(val_fraction * len(full)))))
    return DatasetSplits(full.name, full.subset(np.sort(order[n_val:])),
                         full.subset(np.sort(order[:n_val])), test,
                         description="audio-visual folder dataset", license="the user's")
