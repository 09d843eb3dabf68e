"""Side-by-side comparison of runs (joint vs regulators): figures, table, an honest summary."""

from __future__ import annotations

from pathlib import Path

from ..probes.window import learning_window as detect_window
from ..utils.io import atomic_write_json, atomic_write_text
from . import plots
from .diagnosis import diagnosis_sections
from .html import Section, Table, figure_to_data_uri, render_page

__all__ = ["write_comparison", "comparison_summary"]

NOISE_POINTS = 1.0  # differences below this many points are called within seed-to-seed noise


def _open_epochs(history) -> dict[str, list[int]]:
    try:
        return detect_window(history).open_epochs()
    except ValueError:
        return {}


def _describe(delta: float) -> str:
    points = 100 * delta
    if abs(points) < NOISE_POINTS:
        return f"{points:+.1f} points (no meaningful difference: under {NOISE_POINTS:g} point)"
    return f"{points:+.1f} points ({'higher' if points > 0 else 'lower'})"


def comparison_summary(runs) -> tuple[str, str]:
    """A plain statement of each run's difference to the first one; returns (text, weakest)."""
    base = runs[0]
    uni = base.config["test_unimodal_acc"]
    weakest = min(uni, key=uni.get)
    lines = [f"Baseline: {base.name} — test accuracy {base.config['test_acc']:.3f}; weakest "
             f"modality {weakest!r} reaches {uni[weakest]:.3f} through the joint head."]
    for run in runs[1:]:
        d_fused = run.config["test_acc"] - base.config["test_acc"]
        d_weak = run.config["test_unimodal_acc"][weakest] - uni[weakest]
        lines.append(f"{run.name} vs {base.name}: fused test accuracy {_describe(d_fused)}; "
                     f"{weakest!r} unimodal accuracy {_describe(d_weak)}.")
    lines.append("Single seed each: see docs/benchmarks.md for means over 5 seeds with paired tests.")
    return "\n".join(lines), weakest


def write_comparison(runs, out, *, diagnoses: dict | None = None,
                     title: str = "modaldiag comparison") -> str:
    """Write ``report.html``, ``comparison.json`` and figures comparing ``runs`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary, weakest = comparison_summary(runs)
    histories = {r.name: r.history for r in runs}
    mods = list(runs[0].history.modalities)
    rows, record = [], []
    for r in runs:
        uni = r.config["test_unimodal_acc"]
        windows = _open_epochs(r.history)
        window_text = "; ".join(f"{m}: {w[0]}–{w[-1]}" if w else f"{m}: never"
                                for m, w in windows.items()) or "not monitored"
        rows.append([r.name, r.config["test_acc"], *[uni[m] for m in mods],
                     r.config.get("best_epoch", "—"), window_text, r.config.get("regulator", "")])
        record.append({"name": r.name, "path": str(r.path), **r.config, "window_open_epochs": windows})
    table = Table(["run", "fused test acc", *[f"{m} unimodal" for m in mods], "best epoch (val)",
                   "learning window open (epochs)", "regulator"], rows)
    fig = plots.compare(histories)
    figures = [(figure_to_data_uri(fig, close=False), "Validation accuracy per epoch: fused and "
                "each modality through the joint head (line style = run)")]
    plots.save_figure(fig, out / "compare")
    for r in runs:
        try:
            figures.append((figure_to_data_uri(plots.learning_window(r.history)),
                            f"Prime learning window — {r.name}"))
        except ValueError:
            pass
    sections = [Section("Result", verdict=summary, tables=[table], figures=figures)]
    for name, rep in (diagnoses or {}).items():
        sections += diagnosis_sections(rep, name=name)
    sections.append(Section("Runs", config={"runs": record}))
    atomic_write_json(out / "comparison.json", {"summary": summary, "weakest": weakest, "runs": record})
    atomic_write_text(out / "report.html", render_page(
        title, sections, subtitle=f"dataset {runs[0].config['dataset']}; modalities {', '.join(mods)}"))
    return summary
