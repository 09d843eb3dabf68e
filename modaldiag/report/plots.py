"""Figures (matplotlib + seaborn). Every function returns a ``matplotlib.figure.Figure``.

Colours are per modality and consistent across figures (seaborn's colour-blind palette, in the
order of ``history.modalities``); fused results are drawn in black.

Modality and run names are user strings and are drawn literally: every text of a figure has
mathtext parsing switched off (``$x^$`` is shown as typed, never parsed), and legends are built
from explicit handles so a name with a leading underscore (``_aux``) is not dropped.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..probes.window import LearningWindow  # noqa: E402
from ..probes.window import learning_window as detect  # noqa: E402
from ..utils.io import atomic_write_bytes  # noqa: E402

__all__ = ["modality_colors", "unimodal_accuracy", "learning_window", "shapley", "separability",
           "unimodal_bars", "compare", "learning_windows", "save_figure"]

FUSED_COLOR = "#222222"


def modality_colors(modalities: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour-blind-safe colour per modality (by position)."""
    palette = sns.color_palette("colorblind", max(len(modalities), 3))
    return {m: palette[i % len(palette)] for i, m in enumerate(modalities)}


def _style():
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def _legend(ax, handles, labels, **kwargs):
    """A legend with exactly these entries (no leading-underscore filtering)."""
    return ax.legend(list(handles), [str(lb) for lb in labels], **kwargs)


def _literal(fig):
    """Switch mathtext off for every text of ``fig`` (user names are shown exactly as given)."""
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    return fig


def unimodal_accuracy(history, split: str = "val"):
    """Fused and per-modality (unimodal-head) accuracy per epoch."""
    _style()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    epochs = history.series("epoch")
    if split not in (history.epochs[0] if history.epochs else {}):
        split = "train"
    colors = modality_colors(history.modalities)
    handles = ax.plot(epochs, history.series(f"{split}.acc"), color=FUSED_COLOR, lw=2.2)
    for m in history.modalities:
        series = history.series(f"{split}.unimodal_acc.{m}")
        handles += ax.plot(epochs, series, color=colors[m], lw=1.8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{split} accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Fused vs unimodal accuracy on {split} (absent modalities at baseline)")
    # outside the axes, right of the plot: never over the fused line
    _legend(ax, handles, ["fused", *history.modalities], frameon=False, loc="upper left",
            bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _literal(fig)


def learning_window(history, *, rule: str = "paper", K: float | None = None):
    """Per-modality Fisher-trace curves with the detected prime learning window shaded.

    ``history`` is a :class:`~modaldiag.History` recorded with ``monitor=True`` (or a
    :class:`~modaldiag.probes.LearningWindow`). When a regulator logged per-modality strength
    (``regulator.alpha``), it is drawn on a second axis.
    """
    _style()
    win = history if isinstance(history, LearningWindow) else detect(history, rule=rule, K=K)
    mods = win.modalities
    colors = modality_colors(mods)
    fig, axes = plt.subplots(len(mods), 1, figsize=(5.5, 1.9 * len(mods) + 0.6), sharex=True,
                             constrained_layout=True, squeeze=False)
    alpha_series = None
    handles, labels = [], []
    if not isinstance(history, LearningWindow):
        alpha_series = {m: history.series(f"regulator.alpha.{m}") for m in mods}
        if all(v != v for vals in alpha_series.values() for v in vals):
            alpha_series = None
    for ax, m in zip(axes[:, 0], mods, strict=True):
        tr = win.traces[m]
        epochs = list(range(len(tr)))
        for t, is_open in enumerate(win.open[m]):
            if is_open:
                shade = ax.axvspan(t - 0.5, t + 0.5, color=colors[m], alpha=0.12, lw=0)
                if "window open" not in labels:
                    handles.append(shade)
                    labels.append("window open")
        line = ax.plot(epochs, tr, color=colors[m], lw=2, marker="o", ms=3)[0]
        if "Fisher trace" not in labels:
            handles.insert(0, line)
            labels.insert(0, "Fisher trace")
        peak = win.peak_growth_epoch[m]
        # a peak of growth only where the trace really grew (a trace that only falls has none)
        if peak is not None and tr[peak] - tr[peak - 1] > 0:
            mark = ax.axvline(peak, color=colors[m], ls=":", lw=1)
            if "peak growth" not in labels:
                handles.append(mark)
                labels.append("peak growth")
        ax.set_ylabel(f"{m}\nFisher trace")
        if alpha_series is not None:
            ax2 = ax.twinx()
            reg = ax2.plot(epochs, alpha_series[m][: len(epochs)], color="0.4", ls="--",
                           lw=1.2)[0]
            ax2.set_ylabel("regulation", color="0.4")
            ax2.grid(False)
            if "regulation strength" not in labels:
                handles.append(reg)
                labels.append("regulation strength")
    # below the panels (constrained layout makes room): clear of every trace
    fig.legend(handles, [str(lb) for lb in labels], loc="outside lower center", frameon=False,
               fontsize=8, ncol=max(1, len(labels)))
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_title(f"Prime learning window (rule '{win.rule}', K = {win.K:g})")
    return _literal(fig)


def shapley(sv, split: str | None = None):
    """Per-modality distributions of sample-level Shapley values and low-contribution shares
    (``split``, when given, names the data in the titles)."""
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
    fair_line = ax1.axhline(fair, color=FUSED_COLOR, ls="--", lw=1)
    ax1.set_ylabel(f"Shapley value ({sv.value})")
    on = f" ({split}, n = {len(sv)})" if split else ""
    ax1.set_title(f"Sample-level contribution{on}")
    _legend(ax1, [fair_line], [f"fair share {fair:.2f}"], frameon=False, loc="lower left",
            bbox_to_anchor=(0.0, 1.08), borderaxespad=0.0)
    low = sv.low_contribution_share()
    x = np.arange(len(mods))
    ax2.bar(x, [low[m] for m in mods], color=[colors[m] for m in mods])
    ax2.set_xticks(x, mods)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share of samples")
    ax2.set_title(f"Low-contributing{' (' + split + ')' if split else ''}")
    return _literal(fig)


def separability(sep):
    """Train/val k-means purity and the gap per modality (and linear-probe accuracy if present)."""
    _style()
    mods = list(sep)
    colors = modality_colors(mods)
    x = np.arange(len(mods))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(mods) + 2) + 2.6, 3.4),
                           constrained_layout=True)
    w = 0.26
    handles = [ax.bar(x - w, [sep[m].train_purity for m in mods], w,
                      color=[colors[m] for m in mods]),
               ax.bar(x, [sep[m].val_purity for m in mods], w, color=[colors[m] for m in mods],
                      alpha=0.55, hatch="//")]
    first = sep[mods[0]]
    fit_on = getattr(first, "train_split", "train")
    scored_on = getattr(first, "val_split", "val")
    labels = [f"purity {fit_on}", f"purity {scored_on}"]
    probe = [sep[m].linear_probe for m in mods]
    if all(p is not None for p in probe):
        handles.append(ax.bar(x + w, probe, w, color="0.75"))
        labels.append(f"linear probe (fit on {fit_on}, scored on {scored_on})")
    for i, m in enumerate(mods):
        ax.text(i - w / 2, max(sep[m].train_purity, sep[m].val_purity) + 0.03,
                f"gap {sep[m].gap:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, mods)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("score")
    ax.set_title("Representation separability")
    _legend(ax, handles, labels, frameon=False, fontsize=8, loc="upper left",
            bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _literal(fig)


def unimodal_bars(diagnosis):
    """Unimodal accuracy through the joint head vs fused accuracy, per modality, on the
    diagnosis' split, with the bootstrap interval as an error bar when available."""
    _style()
    mods = list(diagnosis.modalities)
    colors = modality_colors(mods)
    acc = {m: diagnosis.unimodal.unimodal[m].accuracy for m in mods}
    fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(mods) + 2), 3.2), constrained_layout=True)
    x = list(range(len(mods)))
    ax.bar(x, [acc[m] for m in mods], color=[colors[m] for m in mods])
    handles, labels = [], []
    iv = (getattr(diagnosis, "intervals", None) or {}).get("unimodal accuracy")
    if iv is not None:
        err = np.array([[acc[m] - iv.low[m] for m in mods], [iv.high[m] - acc[m] for m in mods]])
        handles.append(ax.errorbar(x, [acc[m] for m in mods], yerr=np.clip(err, 0, None),
                                   fmt="none", ecolor="0.2", capsize=4, lw=1.2))
        labels.append(f"{100 * iv.level:g} % bootstrap CI")
    ax.set_xticks(x, mods)
    fused = ax.axhline(diagnosis.fused_accuracy, color=FUSED_COLOR, ls="--", lw=1.2)
    split = getattr(diagnosis, "split", None) or "unnamed"
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(f"Unimodal accuracy through the joint head ({split}, n = {diagnosis.unimodal.n})")
    _legend(ax, [fused, *handles], [f"fused {diagnosis.fused_accuracy:.3f}", *labels],
            frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return _literal(fig)


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
    run_handles = []
    for i, h in enumerate(histories.values()):
        sp = split if h.epochs and split in h.epochs[0] else "train"
        epochs = h.series("epoch")
        ls = styles[i % len(styles)]
        run_handles += axes[0, 0].plot(epochs, h.series(f"{sp}.acc"), color=FUSED_COLOR, ls=ls,
                                       lw=1.8)
        for j, m in enumerate(mods, start=1):
            axes[0, j].plot(epochs, h.series(f"{sp}.unimodal_acc.{m}"), color=colors[m], ls=ls,
                            lw=1.8)
    split_name = {"val": "validation"}.get(split, split)
    for ax, title in zip(axes[0], panels, strict=True):
        ax.set_title(f"fused ({split_name})" if title == "fused"
                     else f"{title} unimodal ({split_name})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
    axes[0, 0].set_ylabel(f"{split_name} accuracy")
    fig.legend(run_handles, [str(n) for n in histories], loc="outside lower center",
               ncol=min(4, len(histories)), frameon=False, fontsize=8)
    return _literal(fig)


def save_figure(fig, path_stem: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (atomically) and close it."""
    out = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
        out.append(atomic_write_bytes(Path(f"{path_stem}.{fmt}"), buf.getvalue()))
    plt.close(fig)
    return out


def _open_spans(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """Contiguous ``(first, last)`` epochs where ``flags`` is True."""
    spans, start = [], None
    for t, on in enumerate(list(flags) + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            spans.append((start, t - 1))
            start = None
    return spans


def learning_windows(histories, *, rule: str = "paper", K: float | None = None):
    """The prime learning windows of several runs on shared axes (one figure).

    One panel per modality (shared epoch axis); in each, every run's Fisher trace with its own
    line style (colour = modality), and under the curves one bar per run over the epochs its
    window was open. ``histories`` is ``{run name: History}`` (recorded with ``monitor=True``);
    runs without traces are left out (named in the title). ValueError when none has traces.
    """
    _style()
    if not isinstance(histories, dict):
        histories = {f"run {i}": h for i, h in enumerate(histories)}
    windows, missing = {}, []
    for name, h in histories.items():
        try:
            windows[name] = h if isinstance(h, LearningWindow) else detect(h, rule=rule, K=K)
        except ValueError:
            missing.append(str(name))
    if not windows:
        raise ValueError("learning_windows() needs at least one History with Fisher traces "
                         "(recorded with monitor=True).")
    mods = list(next(iter(windows.values())).modalities)
    colors = modality_colors(mods)
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    fig, axes = plt.subplots(len(mods), 1, figsize=(6.5, 1.9 * len(mods) + 1.2), sharex=True,
                             constrained_layout=True, squeeze=False)
    handles = []
    for ax, m in zip(axes[:, 0], mods, strict=True):
        bar_axis = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
        for i, win in enumerate(windows.values()):
            if m not in win.traces:
                continue
            ls = styles[i % len(styles)]
            tr = win.traces[m]
            line = ax.plot(range(len(tr)), tr, color=colors[m], ls=ls, lw=1.8)
            if m == mods[0]:
                handles.append(ax.plot([], [], color=FUSED_COLOR, ls=ls, lw=1.8)[0])
            y = 0.04 + 0.07 * i
            for first, last in _open_spans(win.open[m]):
                ax.plot([first - 0.4, last + 0.4], [y, y], transform=bar_axis,
                        color=line[0].get_color(), lw=4, solid_capstyle="butt", ls=ls)
        ax.set_ylabel(f"{m}\nFisher trace")
    axes[-1, 0].set_xlabel("epoch (bars under the curves: epochs the prime learning window "
                           "was open, one bar per run)")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    win0 = next(iter(windows.values()))
    title = f"Prime learning windows of every run (rule '{win0.rule}', K = {win0.K:g})"
    if missing:
        title += f"; no traces: {', '.join(missing)}"
    axes[0, 0].set_title(title, fontsize=9)
    fig.legend(handles, [str(n) for n in windows], loc="outside lower center",
               ncol=min(4, len(windows)), frameon=False, fontsize=8)
    return _literal(fig)
