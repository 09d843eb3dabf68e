"""The HTML leaderboard of a benchmark: one self-contained page (figures embedded as PNG).

Per dataset: the budget in words, a sortable table (click a header; a small inline script, no
network) of every method's test fused and unimodal accuracy with its paired difference to the
baseline, p and Holm-adjusted p; the per-modality effect plot (mean paired difference with 95%
CI on the test split); the learning windows of every method (first seed). Every number names its
split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import matplotlib.pyplot as plt

from ..report.html import Section, Table, esc, figure_to_data_uri, render_page
from ..report.plots import FUSED_COLOR, _literal, _style, learning_windows, modality_colors
from ..runs import METHOD_LABELS
from .stats import FUSED, fmt_number, unimodal_metric

__all__ = ["render_leaderboard", "effect_plot", "SortableTable"]

_SCRIPT = """<script>
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){
  th.style.cursor='pointer';th.title='click to sort';
  th.addEventListener('click',function(){
   var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
   var asc=th.getAttribute('data-dir')!=='asc';
   t.querySelectorAll('th').forEach(function(h){h.removeAttribute('data-dir');});
   th.setAttribute('data-dir',asc?'asc':'desc');
   rows.sort(function(a,b){
    var x=a.cells[i].getAttribute('data-v'),y=b.cells[i].getAttribute('data-v');
    var nx=parseFloat(x),ny=parseFloat(y);
    if(!isNaN(nx)&&!isNaN(ny)){return asc?nx-ny:ny-nx;}
    if(isNaN(nx)!==isNaN(ny)){return isNaN(nx)?1:-1;}
    return asc?String(x).localeCompare(y):String(y).localeCompare(x);});
   rows.forEach(function(r){body.appendChild(r);});});});});
</script>"""


@dataclass
class SortableTable:
    """A table whose columns sort on click; each cell is ``(shown text, sort value)``."""

    columns: list[str]
    rows: list[list[tuple[str, float | str]]]
    caption: str = ""

    def render(self) -> str:
        def cell(shown, value):
            v = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            cls = ' class="num"' if isinstance(value, (int, float)) else ""
            return f'<td{cls} data-v="{esc(v)}">{esc(shown)}</td>'

        head = "".join(f"<th>{esc(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(cell(*c) for c in row) + "</tr>" for row in self.rows)
        cap = f"<caption>{esc(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="sortable">{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")


def _pm(mean: float, std: float) -> str:
    return f"{fmt_number(mean)} ± {fmt_number(std)}"


def _diff(row: dict, metric: str) -> tuple[str, float]:
    d = row[f"{metric}_diff"]
    if d != d:
        return "(baseline)", math.nan
    return (f"{d:+.3f} [{row[f'{metric}_diff_ci_low']:+.3f}, "
            f"{row[f'{metric}_diff_ci_high']:+.3f}]"), d


def _table(result, dataset: str, frame) -> SortableTable:
    mods = result.modalities(dataset)
    base = result.baseline
    columns = ["method", "seeds", "test fused acc (mean ± std)", f"test fused acc Δ vs {base} "
               "[95% CI]", "p (paired t, test fused)", "p Holm (test fused)"]
    for m in mods:
        columns += [f"test {m} acc via head (mean)", f"test {m} acc Δ vs {base} [95% CI]",
                    f"p Holm (test {m})"]
    columns += ["val acc at selected epoch (mean)", "train time s (mean)", "lr"]
    rows = []
    for r in frame[frame.dataset == dataset].to_dict("records"):
        row = [(r["label"], r["label"]), (str(r["n_seeds"]), r["n_seeds"]),
               (_pm(r[f"{FUSED}_mean"], r[f"{FUSED}_std"]), r[f"{FUSED}_mean"]),
               _diff(r, FUSED), (fmt_number(r[f"{FUSED}_p"]), r[f"{FUSED}_p"]),
               (fmt_number(r[f"{FUSED}_p_holm"]), r[f"{FUSED}_p_holm"])]
        for m in mods:
            metric = unimodal_metric(m)
            row += [(fmt_number(r[f"{metric}_mean"]), r[f"{metric}_mean"]), _diff(r, metric),
                    (fmt_number(r[f"{metric}_p_holm"]), r[f"{metric}_p_holm"])]
        row += [(fmt_number(r["val_acc_mean"]), r["val_acc_mean"]),
                (f"{r['train_time_s_mean']:.1f}", r["train_time_s_mean"]),
                (f"{r['lr']:.3g}", r["lr"])]
        rows.append(row)
    return SortableTable(columns, rows, caption=(
        f"{dataset}: accuracy on the TEST split (evaluated once per cell, on the model selected "
        f"on validation); Δ = method − {base}, paired by seed; p: paired t-test over seeds, Holm: "
        "adjusted across the methods compared with the baseline. Click a header to sort."))


def effect_plot(result, dataset: str):
    """Mean paired difference (method − baseline) on the test split, with 95% CI, of the fused
    accuracy and of each modality's unimodal accuracy, one group per method."""
    _style()
    comps = result.comparisons()
    comps = comps[comps.dataset == dataset]
    mods = result.modalities(dataset)
    metrics = [(FUSED, "fused", FUSED_COLOR)]
    colors = modality_colors(mods)
    metrics += [(unimodal_metric(m), m, colors[m]) for m in mods]
    methods = [m for m in result.methods if m != result.baseline
               and not comps[comps.method == m].empty]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(methods) + 2.5), 3.6),
                           constrained_layout=True)
    width = 0.8 / len(metrics)
    for k, (metric, name, color) in enumerate(metrics):
        xs, ys, lo, hi = [], [], [], []
        for i, method in enumerate(methods):
            hit = comps[(comps.method == method) & (comps.metric == metric)]
            if hit.empty:
                continue
            row = hit.iloc[0]
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(row.mean_diff)
            low = row.ci_low if row.ci_low == row.ci_low else row.mean_diff
            high = row.ci_high if row.ci_high == row.ci_high else row.mean_diff
            lo.append(row.mean_diff - low)
            hi.append(high - row.mean_diff)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=3, lw=1.4,
                    label="fused" if name == "fused" else f"{name} (unimodal, via head)")
    ax.axhline(0.0, color="#888888", lw=1, ls="--")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([METHOD_LABELS.get(m, m) for m in methods], rotation=30, ha="right")
    ax.set_ylabel(f"test acc Δ vs {result.baseline}\n(mean over seeds, 95% CI)")
    ax.set_title(f"{dataset}: effect of each method on the test split, per modality", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return _literal(fig)


def _robustness_table(result, dataset: str) -> Table | None:
    cells = result.cells
    cols = [c for c in cells.columns if c.startswith("robustness_auc.")]
    if not cols:
        return None
    sub = cells[cells.dataset == dataset]
    rows = []
    for method in result.methods:
        part = sub[sub.method == method]
        if part.empty:
            continue
        rows.append([METHOD_LABELS.get(method, method)] + [float(part[c].mean()) for c in cols])
    names = [f"test robustness AUC {c.split('.', 1)[1].replace('.', ' / ')} (mean)" for c in cols]
    return Table(["method"] + names, rows, caption=(
        f"{dataset}: robustness AUC on the TEST split per (modality, corruption), mean over seeds "
        "(area under accuracy vs corruption severity, md.robustness)."))


def render_leaderboard(result) -> str:
    """The whole page as a string."""
    frame = result.to_dataframe()
    seeds = sorted({r["seed"] for r in result.records})
    sections = [Section("How to read this page", paragraphs=[
        "Every method was trained under the same budget on every dataset (stated below per "
        "dataset), once per seed; each (method, dataset, seed) is one cell. The model of a cell "
        "is selected on the VALIDATION split and evaluated ONCE on the TEST split.",
        f"Differences are against {result.baseline}, paired by seed (same initialisation and "
        "batch order). p: two-sided paired t-test over seeds; Holm: p adjusted across the methods "
        "compared on a dataset (one family per dataset and metric). Unimodal accuracy is each "
        "modality alone through the fused head (the others absent).",
        f"Seeds: {seeds}. Cells: {len(result.records)}."])]
    for dataset in result.datasets:
        section = Section(f"Dataset {dataset}", verdict=result.budget_text(dataset),
                          tables=[_table(result, dataset, frame)])
        rob = _robustness_table(result, dataset)
        if rob is not None:
            section.tables.append(rob)
        if len(result.methods) > 1:
            section.figures.append((figure_to_data_uri(effect_plot(result, dataset)),
                                    f"{dataset}: mean paired difference vs {result.baseline} on "
                                    "the test split, fused and per modality (95% CI)."))
        histories = result.histories(dataset)
        try:
            fig = learning_windows(histories)
        except ValueError:
            fig = None
        if fig is not None:
            section.figures.append((figure_to_data_uri(fig), (
                f"{dataset}: prime learning windows of every method (training-set Fisher traces "
                f"per epoch, seed {seeds[0] if seeds else '?'}).")))
        tuning = {m: result.tunings[(dataset, m)] for m in result.methods
                  if (dataset, m) in result.tunings}
        if tuning:
            section.tables.append(Table(
                ["method", "trials", "best val acc (selected epoch)", "chosen parameters"],
                [[m, len(t["trials"]), float(t["best_value"]), json.dumps(t["best_params"])]
                 for m, t in tuning.items()],
                caption=f"{dataset}: tuning on the VALIDATION split only (test never read)."))
        section.config = result.budget(dataset)
        sections.append(section)
    title = "modaldiag benchmark leaderboard"
    page = render_page(title, sections, subtitle=(
        f"datasets: {', '.join(result.datasets)}; methods: {', '.join(result.methods)}; all "
        "accuracies on the test split unless labelled otherwise"))
    return page.replace("</body></html>", _SCRIPT + "</body></html>")
