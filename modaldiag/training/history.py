"""``History``: per-epoch records of a training run, saved and loaded as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..utils.io import atomic_write_json

__all__ = ["History"]

FORMAT_VERSION = 1


def _jsonable(value: Any) -> Any:
    """Plain JSON types; tensors/arrays become lists, non-finite floats stay floats."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value
    return str(value)


def _flatten(node: dict, prefix: str, out: dict) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if name == "epoch":
            continue
        if isinstance(value, dict):
            _flatten(value, f"{name}.", out)
        else:
            out[name] = value


class History:
    """Records of a run: ``epochs`` is a list of dicts (one per epoch, nested by topic).

    A record looks like ``{"epoch": 3, "train": {"loss", "acc"}, "val": {"loss", "acc",
    "unimodal_acc": {m: ...}, ...}, "fisher": {m: ...}, "regulator": {...}, "time_s": ...}``.
    """

    def __init__(self, modalities: Sequence[str] = (), config: dict | None = None,
                 epochs: list[dict] | None = None, meta: dict | None = None):
        self.modalities = tuple(modalities)
        self.config = dict(config or {})
        self.epochs: list[dict] = list(epochs or [])
        self.meta: dict = dict(meta or {})

    def append(self, record: dict) -> None:
        self.epochs.append(_jsonable(record))

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i):
        return self.epochs[i]

    def series(self, key: str, default: float = math.nan) -> list:
        """Values of a dotted key across epochs, e.g. ``series("val.unimodal_acc.audio")``."""
        out = []
        for rec in self.epochs:
            node: Any = rec
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
                if node is None:
                    break
            out.append(default if node is None else node)
        return out

    @property
    def best_epoch(self) -> int | None:
        return self.meta.get("best_epoch")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per epoch: column ``epoch``, then every metric flattened to a dotted column
        name (``train.loss``, ``val.unimodal_acc.audio``, ``regulator.alpha.video``...), in the
        order first seen. Lists (e.g. per-class values) stay as one cell each; a metric missing
        from an epoch is NaN."""
        rows = []
        for i, rec in enumerate(self.epochs):
            row: dict[str, Any] = {"epoch": rec.get("epoch", i)}
            _flatten(rec, "", row)
            rows.append(row)
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame({"epoch": pd.Series([], dtype="int64")})
        return frame

    def to_dict(self) -> dict:
        return {"format": "modaldiag.History", "version": FORMAT_VERSION,
                "modalities": list(self.modalities), "config": _jsonable(self.config),
                "meta": _jsonable(self.meta), "epochs": self.epochs}

    @classmethod
    def from_dict(cls, data: dict) -> History:
        if not isinstance(data, dict) or data.get("format") != "modaldiag.History":
            raise ValueError("not a modaldiag History (missing format tag 'modaldiag.History').")
        return cls(data.get("modalities", ()), data.get("config"), data.get("epochs"), data.get("meta"))

    def save(self, path) -> Path:
        """Write JSON atomically (a crash leaves the previous file intact)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> History:
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"History(modalities={self.modalities}, epochs={len(self.epochs)})"
