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

__all__ = ["modality_colors", "unimodal_accuracy", "learning_window", "shapley", "separability",
           "unimodal_bars", "compare", "save_figure"]

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


def learning_window(history, *, rule: str = "paper", K: float | None = None):
    """Per-modality Fisher-trace curves with the detected prime learning window shaded.

    ``history`` is a :class:`~modaldiag.History` recorded with ``monitor=True`` (or a
    :class:`~modaldiag.probes.LearningWindow`). When a regulator logged per-modality strength
    (``regulator.alpha``), it is drawn on a second axis.
    """
    from ..probes.window import LearningWindow
    from ..probes.window import learning_window as detect

    _style()
    win = history if isinstance(history, LearningWindow) else detect(history, rule=rule, K=K)
    mods = win.modalities
    colors = modality_colors(mods)
    fig, axes = plt.subplots(len(mods), 1, figsize=(5.5, 1.9 * len(mods) + 0.6), sharex=True,
                             constrained_layout=True, squeeze=False)
    alpha_series = None
    if not isinstance(history, LearningWindow):
        alpha_series = {m: history.series(f"regulator.alpha.{m}") for m in mods}
        if all(v != v for vals in alpha_series.values() for v in vals):
            alpha_series = None
    for ax, m in zip(axes[:, 0], mods, strict=True):
        tr = win.traces[m]
        epochs = list(range(len(tr)))
        for t, is_open in enumerate(win.open[m]):
            if is_open:
                ax.axvspan(t - 0.5, t + 0.5, color=colors[m], alpha=0.12, lw=0)
        ax.plot(epochs, tr, color=colors[m], lw=2, marker="o", ms=3, label=f"Tr F ({m})")
        peak = win.peak_growth_epoch[m]
        if peak is not None:
            ax.axvline(peak, color=colors[m], ls=":", lw=1)
        ax.set_ylabel(f"{m}\nFisher trace")
        if alpha_series is not None:
            ax2 = ax.twinx()
            ax2.plot(epochs, alpha_series[m][: len(epochs)], color="0.4", ls="--", lw=1.2)
            ax2.set_ylabel("regulation", color="0.4")
            ax2.grid(False)
    axes[-1, 0].set_xlabel("epoch (shaded: prime learning window open; dotted: peak growth)")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title(f"Prime learning window (rule '{win.rule}', K = {win.K:g})")
    return fig


def shapley(sv):
    """Per-modality distributions of sample-level Shapley values and low-contribution shares."""
    import numpy as np

    _style()
    mods = list(sv.modalities)
    colors = modality_colors(mods)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.4), width_ratios=[2.2, 1],
                                   constrained_layout=True)
    vals = sv.values.numpy()
    parts = ax1.violinplot([vals[:, i] for i in range(len(mods))], showmeans=True,
                           showextrema=False)
    for body, m in zip(parts["bodies"], mods, strict=True):
        body.set_facecolor(colors[m])
        body.set_alpha(0.6)
    ax1.set_xticks(np.arange(1, len(mods) + 1), mods)
    fair = float(sv.full_value.mean()) / len(mods)
    ax1.axhline(fair, color=FUSED_COLOR, ls="--", lw=1, label=f"fair share {fair:.2f}")
    ax1.set_ylabel(f"Shapley value ({sv.value})")
    ax1.set_title("Sample-level contribution")
    ax1.legend(frameon=False, loc="best")
    low = sv.low_contribution_share()
    ax2.bar(mods, [low[m] for m in mods], color=[colors[m] for m in mods])
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share of samples")
    ax2.set_title("Low-contributing")
    return fig


def separability(sep):
    """Train/val k-means purity and the gap per modality (and linear-probe accuracy if present)."""
    import numpy as np

    _style()
    mods = list(sep)
    colors = modality_colors(mods)
    x = np.arange(len(mods))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(mods) + 2), 3.4), constrained_layout=True)
    w = 0.26
    ax.bar(x - w, [sep[m].train_purity for m in mods], w, color=[colors[m] for m in mods],
           label="train purity")
    ax.bar(x, [sep[m].val_purity for m in mods], w, color=[colors[m] for m in mods], alpha=0.55,
           hatch="//", label="val purity")
    probe = [sep[m].linear_probe for m in mods]
    if all(p is not None for p in probe):
        ax.bar(x + w, probe, w, color="0.75", label="linear probe (val)")
    for i, m in enumerate(mods):
        ax.text(i - w / 2, max(sep[m].train_purity, sep[m].val_purity) + 0.03,
                f"gap {sep[m].gap:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, mods)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.set_title("Representation separability")
    ax.legend(frameon=False, fontsize=8, ncol=3, loc="upper center")
    return fig


def unimodal_bars(diagnosis):
    """Unimodal accuracy through the joint head vs fused accuracy, per modality."""
    _style()
    mods = list(diagnosis.modalities)
    colors = modality_colors(mods)
    acc = {m: diagnosis.unimodal.unimodal[m].accuracy for m in mods}
    fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(mods) + 2), 3.2), constrained_layout=True)
    ax.bar(mods, [acc[m] for m in mods], color=[colors[m] for m in mods])
    ax.axhline(diagnosis.fused_accuracy, color=FUSED_COLOR, ls="--", lw=1.2,
               label=f"fused {diagnosis.fused_accuracy:.3f}")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("Unimodal accuracy through the joint head")
    ax.legend(frameon=False)
    return fig


def compare(histories, *, split: str = "val"):
    """Several runs side by side: fused accuracy and each modality's unimodal accuracy per epoch.

    ``histories`` is a dict ``{run name: History}`` (or a list, named by position). Line style per
    run, colour per modality (fused in black), one panel per quantity.
    """
    _style()
    if not isinstance(histories, dict):
        histories = {f"run {i}": h for i, h in enumerate(histories)}
    if not histories:
        raise ValueError("compare() needs at least one History.")
    first = next(iter(histories.values()))
    mods = list(first.modalities)
    colors = modality_colors(mods)
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    panels = ["fused", *mods]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True,
                             constrained_layout=True, squeeze=False)
    for i, (name, h) in enumerate(histories.items()):
        sp = split if h.epochs and split in h.epochs[0] else "train"
        epochs = h.series("epoch")
        ls = styles[i % len(styles)]
        axes[0, 0].plot(epochs, h.series(f"{sp}.acc"), color=FUSED_COLOR, ls=ls, lw=1.8, label=name)
        for j, m in enumerate(mods, start=1):
            axes[0, j].plot(epochs, h.series(f"{sp}.unimodal_acc.{m}"), color=colors[m], ls=ls,
                            lw=1.8, label=name)
    for ax, title in zip(axes[0], panels, strict=True):
        ax.set_title(title if title == "fused" else f"{title} (unimodal)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel(f"{split} accuracy")
    axes[0, 0].legend(frameon=False, fontsize=8)
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
