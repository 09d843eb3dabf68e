"""Figures (matplotlib + seaborn). Every function returns a ``matplotlib.figure.Figure``.

Colours are per modality and consistent across figures (seaborn's colour-blind palette, in the
order of ``history.modalities``); fused results are drawn in black.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["modality_colors", "unimodal_accuracy", "save_figure"]

FUSED_COLOR = "#222222"


def modality_colors(modalities: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour-blind-safe colour per modality (by position)."""
    palette = sns.color_palette("colorblind", max(len(modalities), 3))
    return {m: palette[i % len(palette)] for i, m in enumerate(modalities)}


def _style():
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def unimodal_accuracy(history, split: str = "val"):
    """Fused and per-modality (unimodal-head) accuracy per epoch."""
    _style()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    epochs = history.series("epoch")
    if split not in (history.epochs[0] if history.epochs else {}):
        split = "train"
    colors = modality_colors(history.modalities)
    ax.plot(epochs, history.series(f"{split}.acc"), color=FUSED_COLOR, lw=2.2, label="fused")
    for m in history.modalities:
        series = history.series(f"{split}.unimodal_acc.{m}")
        ax.plot(epochs, series, color=colors[m], lw=1.8, label=m)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Fused vs unimodal accuracy (absent modalities at baseline)")
    ax.legend(frameon=False, ncol=min(4, len(history.modalities) + 1))
    return fig


def save_figure(fig, path_stem: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (atomically) and close it."""
    import io

    from ..utils.io import atomic_write_bytes

    out = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
        out.append(atomic_write_bytes(Path(f"{path_stem}.{fmt}"), buf.getvalue()))
    plt.close(fig)
    return out
