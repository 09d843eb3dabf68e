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
           "unimodal_bars", "compare", "learning_windows", "save_figure", "robustness",
           "robustness_compare", "conditional_speed", "speed_series"]

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


#: x-axis label of each built-in corruption (custom ones: "severity (<name>)")
_SEVERITY_LABELS = {"missing": "fraction of samples with the modality absent ({baseline} baseline)",
                    "gaussian": "noise std / sigma_m ({space} space)",
                    "shuffle": "fraction of samples with the modality from another sample"}


def _severity_label(rob, corruption: str) -> str:
    label = _SEVERITY_LABELS.get(corruption, f"severity ({corruption})")
    return label.format(baseline=rob.baseline, space=rob.noise_space)


def _robustness_axes(n_panels: int, ax):
    if ax is None:
        fig, axes = plt.subplots(1, n_panels, figsize=(3.6 * n_panels + 1.2, 3.4), sharey=True,
                                 constrained_layout=True, squeeze=False)
        return fig, list(axes[0])
    axes = [ax] if not isinstance(ax, (list, tuple, np.ndarray)) else list(np.ravel(ax))
    if len(axes) != n_panels:
        raise ValueError(f"robustness plot: ax must hold one Axes per corruption ({n_panels}); "
                         f"got {len(axes)}.")
    return axes[0].figure, axes


def robustness(rob, ax=None):
    """Fused accuracy against severity: one panel per corruption, one curve per modality with
    its bootstrap band, the clean accuracy dashed (``rob``: a RobustnessResult)."""
    _style()
    mods = list(rob.modalities)
    colors = modality_colors(mods)
    fig, axes = _robustness_axes(len(rob.corruptions), ax)
    handles = []
    for a, c in zip(axes, rob.corruptions, strict=True):
        for m in mods:
            line = a.plot(rob.severities, rob.accuracy[c][m], color=colors[m], lw=1.8,
                          marker="o", ms=3)[0]
            a.fill_between(rob.severities, rob.accuracy_low[c][m], rob.accuracy_high[c][m],
                           color=colors[m], alpha=0.18, lw=0)
            if c == rob.corruptions[0]:
                handles.append(line)
        clean = a.axhline(rob.clean_accuracy, color=FUSED_COLOR, ls="--", lw=1)
        a.set_title(c)
        a.set_xlabel(_severity_label(rob, c), fontsize=8)
        a.set_ylim(0, 1.02)
    axes[0].set_ylabel(f"fused accuracy ({rob.split}, n = {rob.n})")
    # below the panels: long or many modality names never squeeze the axes
    fig.legend([*handles, clean],
               [*(f"{m} corrupted" for m in mods), f"clean {rob.clean_accuracy:.3f}"],
               loc="outside lower center", ncol=min(4, len(mods) + 1), frameon=False,
               fontsize=8)
    fig.suptitle(f"Robustness on {rob.split}: bands = {100 * rob.level:g} % bootstrap CI; "
                 f"sigma_m = std of all {rob.noise_space} entries of modality m", fontsize=9)
    return _literal(fig)


def robustness_compare(results):
    """The robustness curves of several runs on shared axes: one panel per corruption, colour =
    modality, line style = run (``results``: ``{run name: RobustnessResult}``)."""
    _style()
    if not results:
        raise ValueError("robustness_compare() needs at least one RobustnessResult.")
    first = next(iter(results.values()))
    corruptions = list(dict.fromkeys(c for r in results.values() for c in r.corruptions))
    mods = list(first.modalities)
    colors = modality_colors(mods)
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    fig, axes = _robustness_axes(len(corruptions), None)
    run_handles, mod_handles = [], []
    for i, rob in enumerate(results.values()):
        ls = styles[i % len(styles)]
        for a, c in zip(axes, corruptions, strict=True):
            if c not in rob.corruptions:
                continue
            for m in rob.modalities:
                a.plot(rob.severities, rob.accuracy[c][m], color=colors.get(m, "0.5"), ls=ls,
                       lw=1.6)
        run_handles += axes[0].plot([], [], color=FUSED_COLOR, ls=ls, lw=1.6)
    for m in mods:
        mod_handles += axes[0].plot([], [], color=colors[m], lw=4)
    for a, c in zip(axes, corruptions, strict=True):
        a.set_title(c)
        a.set_xlabel(_severity_label(first, c), fontsize=8)
        a.set_ylim(0, 1.02)
    splits = sorted({f"{r.split}, n = {r.n}" for r in results.values()})
    axes[0].set_ylabel(f"fused accuracy ({'; '.join(splits)})")
    fig.legend([*run_handles, *mod_handles], [*(str(n) for n in results),
                                              *(f"{m} corrupted" for m in mods)],
               loc="outside lower center", ncol=min(4, len(results) + len(mods)), frameon=False,
               fontsize=8)
    return _literal(fig)


def speed_series(history, modalities) -> dict[str, list[float]] | None:
    """Greedy's conditional learning speed logged in a History: ``{"bdr.<m>": [...],
    "d_speed": [...]}`` from keys ``speed.bdr.<m>`` / ``speed.d_speed`` (also under a prefix such
    as ``regulator.``); None when not logged."""
    frame = history.to_dataframe()
    out = {}
    for key in [f"bdr.{m}" for m in modalities] + ["d_speed"]:
        cols = [c for c in frame.columns if c == f"speed.{key}" or c.endswith(f".speed.{key}")]
        if cols:
            out[key] = [float(v) for v in frame[cols[0]]]
    return out or None


def conditional_speed(histories):
    """Greedy's conditional learning speed per epoch (BDR per modality, and d_speed) for one or
    several runs: ``{run name: History}`` (keys ``speed.bdr.<m>``, ``speed.d_speed``) or
    ``{run name: {"bdr.<m>": [...], "d_speed": [...]}}`` (a diagnosis' ``config["speed"]``).
    ValueError when no run logged it."""
    _style()
    if not isinstance(histories, dict) or "d_speed" in histories or any(
            str(k).startswith("bdr.") for k in histories):
        histories = {"run": histories}
    series = {}
    for name, h in histories.items():
        if hasattr(h, "to_dataframe"):
            s = speed_series(h, h.modalities)
            if s is not None:
                series[name] = (h.series("epoch"), s)
        elif h:
            series[name] = (list(range(len(next(iter(h.values()))))), dict(h))
    if not series:
        raise ValueError("conditional_speed() needs a History with speed.bdr.<m> keys "
                         "(logged by Greedy's monitor).")
    mods = list(dict.fromkeys(k[4:] for _, s in series.values() for k in s if k.startswith("bdr.")))
    colors = modality_colors(mods)
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6.4, 2.5), constrained_layout=True)
    handles = []
    for i, (epochs, s) in enumerate(series.values()):
        ls = styles[i % len(styles)]
        for m in mods:
            if f"bdr.{m}" in s:
                ax1.plot(epochs, s[f"bdr.{m}"], color=colors[m], ls=ls, lw=1.6)
        if "d_speed" in s:
            ax2.plot(epochs, s["d_speed"], color=FUSED_COLOR, ls=ls, lw=1.6)
        handles += ax1.plot([], [], color=FUSED_COLOR, ls=ls, lw=1.6)
    mod_handles = [ax1.plot([], [], color=colors[m], lw=4)[0] for m in mods]
    ax1.set_title("BDR_m = log10(A_byp / A_main) (train steps)", fontsize=9)
    ax2.set_title("d_speed = BDR_0 - BDR_1 (train steps)", fontsize=9)
    ax2.axhline(0, color="0.6", lw=0.8)
    for a in (ax1, ax2):
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    several = len(series) > 1
    _legend(ax1, [*mod_handles, *(handles if several else [])],
            [*mods, *(list(series) if several else [])], frameon=False, fontsize=8)
    return _literal(fig)
