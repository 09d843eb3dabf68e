"""Side-by-side comparison of runs (joint vs regulators): figures, tables, CSV, an honest summary.

Every number names its split: the accuracies compared are the runs' **test** accuracies (fused,
and each modality's unimodal accuracy through the joint head), the curves are **validation**
accuracy per epoch, and a run's saved diagnosis is shown with the split it was measured on.
Every modality's change against the baseline (the first run) is reported, not only the weakest
modality's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..probes.diagnose import Diagnosis
from ..probes.robustness import RobustnessResult
from ..probes.window import learning_window as detect_window
from ..utils.io import atomic_write_json, atomic_write_text, refuse_foreign_overwrite
from . import plots
from .html import Section, Table, figure_to_data_uri, render_page

__all__ = ["write_comparison", "comparison_summary", "comparison_frame", "saved_diagnosis",
           "run_labels", "regulator_text", "NOISE_POINTS", "SPLIT"]

NOISE_POINTS = 1.0  # differences below this many points are called within seed-to-seed noise
SPLIT = "test"  # the split of every accuracy compared
#: the files write_comparison writes (it refuses to replace them in a folder it did not create)
COMPARISON_FILES = ("report.html", "comparison.json", "comparison.csv",
                    *(f"{stem}.{ext}" for stem in ("compare", "learning_windows", "robustness",
                                                    "conditional_speed")
                      for ext in ("png", "svg")))

def _open_epochs(history) -> dict[str, list[int]]:
    try:
        return detect_window(history).open_epochs()
    except ValueError:
        return {}


def _test_n(run) -> int | None:
    """Number of test samples behind a run's test accuracies (None when not recorded)."""
    n = run.config.get("test_n") or ((run.history.meta or {}).get("test") or {}).get("n")
    return int(n) if n else None


def run_labels(runs) -> list[str]:
    """Unique display names: a run's name, followed by its folder when two runs share a name."""
    names = [r.name for r in runs]
    return [f"{n} [{r.path.name}]" if names.count(n) > 1 else n
            for n, r in zip(names, runs, strict=True)]


def _noise_points(n: int | None) -> float:
    """The smallest difference called meaningful: :data:`NOISE_POINTS`, or one test sample
    (``100 / n`` points) when that is coarser."""
    return max(NOISE_POINTS, 100.0 / n) if n else NOISE_POINTS


def _describe(delta: float, n: int | None) -> str:
    """A difference of accuracies in points: "higher", "lower" or "within noise" (under
    :func:`_noise_points`)."""
    points = round(100 * delta, 6)  # as in comparison.csv
    if abs(points) < _noise_points(n) - 1e-9:
        return f"{points:+.1f} points (within noise)"
    return f"{points:+.1f} points ({'higher' if points > 0 else 'lower'})"


def comparison_summary(runs) -> tuple[str, str]:
    """A plain statement of every run's test-accuracy change against the first run, fused and
    for every modality; returns ``(text, weakest)`` where ``weakest`` is the baseline's modality
    of lowest unimodal test accuracy."""
    base, labels = runs[0], run_labels(runs)
    uni = base.config["test_unimodal_acc"]
    weakest = min(uni, key=uni.get)
    n = _test_n(base)
    size = f" ({n} test samples)" if n else ""
    per_mod = ", ".join(f"{m} {a:.3f}{' (weakest)' if m == weakest else ''}" for m, a in uni.items())
    lines = [f"Baseline: {labels[0]} — fused {SPLIT} accuracy {base.config['test_acc']:.3f}{size}; "
             f"unimodal {SPLIT} accuracy through the joint head: {per_mod}."]
    for run, label in zip(runs[1:], labels[1:], strict=True):
        d_fused = run.config["test_acc"] - base.config["test_acc"]
        parts = [f"fused {SPLIT} accuracy {_describe(d_fused, n)}"]
        for m in uni:
            d = run.config["test_unimodal_acc"][m] - uni[m]
            parts.append(f"{m!r} unimodal {SPLIT} accuracy {_describe(d, n)}")
        lines.append(f"{label} vs {labels[0]}: " + "; ".join(parts) + ".")
    noise = _noise_points(n)
    why = (f" (one of the {n} test samples)" if n and 100.0 / n > NOISE_POINTS else "")
    lines.append(f"'Within noise': a change under {noise:.1f} points{why}. Single seed each: see "
                 "docs/benchmarks.md for means over 5 seeds with paired tests.")
    return "\n".join(lines), weakest


def saved_diagnosis(run) -> dict | None:
    """The diagnosis saved in ``RUN/diagnosis/diagnosis.json`` (by ``modaldiag diagnose``), read
    back without recomputing: ``{"split", "verdict", "dominant", "weakest", "summary",
    "fused_accuracy", "unimodal_acc", "report"}``; None when the run has none."""
    path = Path(run.path) / "diagnosis" / "diagnosis.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    from_dict = getattr(Diagnosis, "from_dict", None)
    rep = None
    if from_dict is not None:
        try:
            rep = from_dict(record)
        except (KeyError, TypeError, ValueError):
            rep = None
    return _diagnosis_record(rep if rep is not None else record, path.parent / "report.html")


def _diagnosis_record(rep, report: Path | None) -> dict:
    """The comparison's view of one diagnosis (a :class:`Diagnosis` or its ``to_dict()``)."""
    get = (lambda k, d=None: rep.get(k, d)) if isinstance(rep, Mapping) else (
        lambda k, d=None: getattr(rep, k, d))
    unimodal = get("unimodal")
    if isinstance(unimodal, Mapping):
        uni = dict(unimodal.get("unimodal_acc") or {})
    else:
        uni = {m: s.accuracy for m, s in unimodal.unimodal.items()} if unimodal is not None else {}
    # diagnoses written before the split was recorded were measured on the training data
    split = get("split") or "train (older diagnosis)"
    verdict = get("verdict") or ("imbalanced" if get("dominant") else "unknown")
    rob = get("robustness")
    return {"split": split, "verdict": verdict, "dominant": get("dominant"),
            "weakest": get("weakest"), "summary": get("summary") or "",
            "fused_accuracy": get("fused_accuracy"), "unimodal_acc": uni,
            "report": str(report) if report is not None else None,
            "robustness": rob.to_dict() if isinstance(rob, RobustnessResult) else rob}


def regulator_text(recorded) -> str:
    """The readable regulator of a ``run.json``: the ``text`` of the record written at train
    time (``{"label", "class", "config", "text"}``), or the raw ``repr`` string older runs
    stored."""
    if isinstance(recorded, Mapping):
        return str(recorded.get("text") or recorded.get("label") or "—")
    if recorded in (None, "None", ""):
        return "none (joint training)"
    return str(recorded)


def _window_text(windows: dict[str, list[int]]) -> str:
    return "; ".join(f"{m}: {w[0]}–{w[-1]}" if w else f"{m}: never"
                     for m, w in windows.items()) or "not monitored"


def comparison_frame(runs, *, paths: Sequence | None = None,
                     diagnoses: Mapping[str, dict] | None = None) -> pd.DataFrame:
    """One row per run: identity, test accuracies (fused and per modality) and their change in
    points against the first run, best epoch, learning window, regulator, saved diagnosis."""
    labels = run_labels(runs)
    base = runs[0].config
    mods = list(base["test_unimodal_acc"])
    rows = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        c = run.config
        uni = c["test_unimodal_acc"]
        row = {"run": label, "path": str(paths[i] if paths is not None else run.path),
               "method": c.get("method"), "dataset": c.get("dataset"), "data": c.get("data"),
               "model": c.get("model"), "epochs": c.get("epochs"), "seed": c.get("seed"),
               "regulator": regulator_text(c.get("regulator")), "split": SPLIT,
               "test_n": _test_n(run), "test_acc": c["test_acc"],
               "test_acc_change_points": round(100 * (c["test_acc"] - base["test_acc"]), 6)}
        for m in mods:
            row[f"test_unimodal_acc.{m}"] = uni.get(m)
            row[f"test_unimodal_acc_change_points.{m}"] = round(
                100 * (uni[m] - base["test_unimodal_acc"][m]), 6)
        row["best_epoch_val"] = c.get("best_epoch")
        row["window_open_epochs"] = _window_text(_open_epochs(run.history))
        diag = (diagnoses or {}).get(label)
        row["diagnosis_split"] = diag["split"] if diag else None
        row["diagnosis_verdict"] = diag["verdict"] if diag else None
        row["diagnosis_dominant"] = diag["dominant"] if diag else None
        row["diagnosis_weakest"] = diag["weakest"] if diag else None
        rows.append(row)
    return pd.DataFrame(rows)


def _points(value: float) -> str:
    return f"{value:+.1f}"


def _tables(frame: pd.DataFrame, mods: list[str]) -> list[Table]:
    acc_cols = ["run", f"fused accuracy ({SPLIT})", f"Δ fused ({SPLIT}, points)"]
    for m in mods:
        acc_cols += [f"{m} unimodal accuracy ({SPLIT})", f"Δ {m} ({SPLIT}, points)"]
    acc_rows = []
    for _, r in frame.iterrows():
        row = [r["run"], float(r["test_acc"]), _points(r["test_acc_change_points"])]
        for m in mods:
            row += [float(r[f"test_unimodal_acc.{m}"]),
                    _points(r[f"test_unimodal_acc_change_points.{m}"])]
        acc_rows.append(row)
    n = frame["test_n"].iloc[0]
    caption = (f"Test accuracy of each run (n = {int(n)} test samples) and its change against "
               f"the first run, fused and for every modality." if pd.notna(n) else
               "Test accuracy of each run and its change against the first run.")
    training = Table(["run", "regulator", "epochs", "seed", "best epoch (val accuracy)",
                      "learning window open (epochs)"],
                     [[r["run"], r["regulator"], int(r["epochs"]), int(r["seed"]),
                       "—" if pd.isna(r["best_epoch_val"]) else int(r["best_epoch_val"]),
                       r["window_open_epochs"]] for _, r in frame.iterrows()],
                     caption="How each run was trained.")
    return [Table(acc_cols, acc_rows, caption=caption), training]


#: the figures of a saved diagnosis shown in a comparison (file stem -> caption)
DIAGNOSIS_FIGURES = {"unimodal": "unimodal accuracy through the joint head",
                     "shapley": "sample-level Shapley contributions"}


def _saved_figures(run, label: str, split: str) -> list[tuple[str, str]]:
    """The PNGs a saved diagnosis already holds, embedded as they are (not redrawn)."""
    out = []
    for stem, caption in DIAGNOSIS_FIGURES.items():
        path = Path(run.path) / "diagnosis" / f"{stem}.png"
        if path.is_file():
            uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
            out.append((uri, f"{label}: {caption} ({split} split)"))
    return out


def _diagnosis_sections(labels, runs, diagnoses: dict, paths) -> list[Section]:
    """A table of every run's saved diagnosis, then one section per run: its summary (as written
    by ``modaldiag diagnose``) and its saved figures."""
    mods = list(runs[0].config["test_unimodal_acc"])
    rows, missing, per_run = [], [], []
    for label, run, path in zip(labels, runs, paths, strict=True):
        d = diagnoses.get(label)
        if d is None:
            missing.append(f"{label}: no saved diagnosis; run `modaldiag diagnose --run {path}` "
                           "and compare again.")
            continue
        fused = d["fused_accuracy"]
        rows.append([label, d["split"], d["verdict"], d["dominant"] or "—", d["weakest"] or "—",
                     float(fused) if fused is not None else "—",
                     *[float(d["unimodal_acc"][m]) if m in d["unimodal_acc"] else "—"
                       for m in mods]])
        per_run.append(Section(
            f"Diagnosis — {label} ({d['split']} split)", verdict=d["summary"] or None,
            paragraphs=[f"Full report: {d['report']}"] if d["report"] else [],
            figures=_saved_figures(run, label, d["split"])))
    tables = [Table(["run", "split", "verdict", "dominant", "weakest", "fused accuracy",
                     *[f"{m} unimodal accuracy" for m in mods]], rows,
                    caption="Each run's saved diagnosis (read from RUN/diagnosis/diagnosis.json, "
                            "not recomputed), with the split it was measured on.")] if rows else []
    return [Section("Diagnoses", paragraphs=missing, tables=tables), *per_run]


def _without_summary(record: dict) -> dict:
    """A run record for the page's configuration block: its diagnosis summary and robustness
    curves are already shown above, so they are not repeated there."""
    diag = record.get("diagnosis")
    if not diag:
        return record
    return {**record, "diagnosis": {k: v for k, v in diag.items()
                                    if k not in ("summary", "robustness")}}


def _robustness_results(labels, found: dict) -> dict[str, RobustnessResult]:
    """``{run label: RobustnessResult}`` of the runs whose saved diagnosis holds robustness
    curves (``modaldiag diagnose`` computes them)."""
    out = {}
    for label in labels:
        rob = (found.get(label) or {}).get("robustness")
        if rob:
            try:
                out[label] = RobustnessResult.from_dict(rob)
            except (KeyError, TypeError, ValueError):
                continue
    return out


def _robustness_section(results: dict[str, RobustnessResult], out: Path,
                        files: list[str]) -> Section | None:
    """The robustness curves of every run on shared axes and a table of their AUCs."""
    if not results:
        return None
    fig = plots.robustness_compare(results)
    figure = (figure_to_data_uri(fig, close=False),
              "Fused accuracy with one modality corrupted (colour = modality, line style = run), "
              "from each run's saved diagnosis; "
              + "; ".join(sorted({r.noise_definition for r in results.values()})))
    files += [p.name for p in plots.save_figure(fig, out / "robustness")]
    first = next(iter(results.values()))
    level = f"{100 * first.level:g} %"
    rows = [[label, r.split, r.n, c, m, r.auc[c][m], r.auc_low[c][m], r.auc_high[c][m]]
            for label, r in results.items() for c in r.corruptions for m in r.modalities]
    table = Table(["run", "split", "n", "corruption", "modality", "AUC", f"{level} CI low",
                   f"{level} CI high"], rows,
                  caption="Robustness AUC (area under fused accuracy over severities, "
                          "normalised) of each run's saved diagnosis, with the split it was "
                          "measured on. Overlapping intervals: no difference shown.")
    return Section("Robustness", tables=[table], figures=[figure])


def write_comparison(runs, out, *, diagnoses: dict | None = None,
                     title: str = "modaldiag comparison", paths: Sequence | None = None) -> str:
    """Write ``report.html``, ``comparison.json``, ``comparison.csv`` and figures into ``out``.

    Parameters
    ----------
    runs : list of Run
        The first run is the baseline every change is measured against.
    out : path
        The output folder (created if missing).
    diagnoses : dict {run name: Diagnosis}, optional
        Diagnoses to show; by default each run's saved ``RUN/diagnosis/diagnosis.json`` is read
        (never recomputed).
    title : str
    paths : list of path, optional
        The runs' final locations, recorded instead of ``run.path`` (when the runs were written
        into a temporary folder that is moved into place afterwards, as ``modaldiag demo`` does).

    Returns
    -------
    str
        The summary (every modality's change in test accuracy against the first run).
    """
    out = Path(out)
    refuse_foreign_overwrite(out, COMPARISON_FILES)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths] if paths is not None else [Path(r.path) for r in runs]
    if len(paths) != len(runs):
        raise ValueError(f"paths has {len(paths)} entries for {len(runs)} runs.")
    labels = run_labels(runs)
    summary, weakest = comparison_summary(runs)
    given = diagnoses or {}
    found = {}
    for label, run in zip(labels, runs, strict=True):
        if run.name in given:
            found[label] = _diagnosis_record(given[run.name], None)
        else:
            record = saved_diagnosis(run)
            if record is not None:
                found[label] = record
    for label, run, path in zip(labels, runs, paths, strict=True):  # final, not temporary, paths
        if label in found:
            saved = (Path(run.path) / "diagnosis" / "report.html").is_file()
            found[label]["report"] = str(path / "diagnosis" / "report.html") if saved else None
    frame = comparison_frame(runs, paths=paths, diagnoses=found)
    mods = list(runs[0].config["test_unimodal_acc"])
    histories = dict(zip(labels, (r.history for r in runs), strict=True))

    figures = []
    fig = plots.compare(histories)
    figures.append((figure_to_data_uri(fig, close=False), "Validation accuracy per epoch: fused "
                    "and each modality through the joint head (line style = run). The test "
                    "accuracies are in the table above."))
    files = ["report.html", "comparison.json", "comparison.csv"]
    files += [p.name for p in plots.save_figure(fig, out / "compare")]
    try:
        fig = plots.learning_windows(histories)
    except ValueError:
        pass
    else:
        figures.append((figure_to_data_uri(fig, close=False), "Prime learning windows of every "
                        "run on shared axes: Fisher trace per modality (line style = run), bars "
                        "under the curves = epochs the window was open."))
        files += [p.name for p in plots.save_figure(fig, out / "learning_windows")]
    try:
        fig = plots.conditional_speed(histories)
    except ValueError:  # no run logged Greedy's conditional learning speed
        pass
    else:
        figures.append((figure_to_data_uri(fig, close=False), "Conditional learning speed "
                        "(Greedy's BDR per modality and d_speed per epoch, line style = run) of "
                        "the runs that logged it."))
        files += [p.name for p in plots.save_figure(fig, out / "conditional_speed")]
    robust = _robustness_section(_robustness_results(labels, found), out, files)

    record = []
    for label, run, path in zip(labels, runs, paths, strict=True):
        record.append({**run.config, "name": label, "path": str(path),
                       "regulator_text": regulator_text(run.config.get("regulator")),
                       "window_open_epochs": _open_epochs(run.history),
                       "diagnosis": found.get(label)})
    sections = [Section("Result", verdict=summary, tables=_tables(frame, mods), figures=figures),
                *([robust] if robust is not None else []),
                *_diagnosis_sections(labels, runs, found, paths),
                Section("Runs", config={"runs": [_without_summary(r) for r in record]})]
    atomic_write_text(out / "comparison.csv", frame.to_csv(index=False))
    atomic_write_json(out / "comparison.json", {"summary": summary, "weakest": weakest,
                                                "split": SPLIT, "runs": record, "files": files})
    subtitle = (f"dataset {runs[0].config['dataset']}; modalities {', '.join(mods)}; accuracies "
                f"on the {SPLIT} split unless labelled otherwise")
    atomic_write_text(out / "report.html", render_page(title, sections, subtitle=subtitle))
    return summary
