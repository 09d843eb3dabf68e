"""The diagnosis as HTML sections (used by ``Diagnosis.save`` and the CLI).

Every table and figure names the split its numbers come from: the verdict's split for unimodal
accuracy, Shapley and Fisher; D/V (``fit on train, scored on val``) for separability and the
linear probe. Columns that would be empty (no Fisher trace, no separability, no
``reference_epochs``) are left out.
"""

from __future__ import annotations

from pathlib import Path

from ..probes.diagnose import register_renderers
from ..probes.robustness import register_plot
from ..utils.io import atomic_write_text
from . import plots
from .html import Link, Section, Table, figure_to_data_uri, render_page

__all__ = ["diagnosis_sections", "diagnosis_html", "diagnosis_figures", "write_diagnosis"]


def _sep_splits(rep) -> tuple[str, str]:
    s = next(iter(rep.separability.values()))
    return s.train_split, s.val_split


def diagnosis_figures(rep) -> dict:
    """The diagnosis figures by file stem: ``{stem: (Figure, caption)}``."""
    split, n = rep.split, rep.n or rep.unimodal.n
    figures = {"unimodal": (plots.unimodal_bars(rep),
                            f"Unimodal accuracy through the joint head on the {split} split "
                            f"(n = {n}), with {_level(rep)} bootstrap intervals")}
    if getattr(rep.shapley, "values", None) is not None:  # not kept by a diagnosis read back
        figures["shapley"] = (plots.shapley(rep.shapley, split=split),
                              f"Sample-level Shapley contributions on the {split} split (n = {n})")
    if rep.separability:
        fit_on, scored_on = _sep_splits(rep)
        figures["separability"] = (plots.separability(rep.separability),
                                   f"Representation separability: k-means purity {fit_on}/"
                                   f"{scored_on}; linear probe fit on {fit_on}, scored on "
                                   f"{scored_on}")
    rob = getattr(rep, "robustness", None)
    if rob is not None:
        figures["robustness"] = (plots.robustness(rob),
                                 f"Fused accuracy on the {rob.split} split (n = {rob.n}) with one "
                                 f"modality corrupted at a time; bands: {100 * rob.level:g} % "
                                 f"bootstrap intervals; {rob.noise_definition}")
    speed = (rep.config or {}).get("speed")
    if speed:
        figures["conditional_speed"] = (plots.conditional_speed(speed),
                                        "Conditional learning speed logged during training "
                                        "(Greedy's BDR per modality and d_speed, per epoch)")
    return figures


#: figures shown in the Robustness section (the others are evidence)
_ROBUSTNESS_FIGURES = ("robustness", "conditional_speed")


def _robustness_section(rep, label: str, figures: list[tuple[str, str]]) -> Section | None:
    rob, cu = getattr(rep, "robustness", None), getattr(rep, "conditional_utilization", None)
    if rob is None and cu is None:
        return None
    tables, paragraphs = [], []
    if rob is not None:
        level = f"{100 * rob.level:g} %"
        tables.append(Table(
            ["corruption", "modality", "split", "n", "AUC", f"{level} CI low", f"{level} CI high",
             "accuracy at the highest severity"],
            [[c, m, rob.split, rob.n, rob.auc[c][m], rob.auc_low[c][m], rob.auc_high[c][m],
              rob.accuracy[c][m][-1]] for c in rob.corruptions for m in rob.modalities],
            caption=f"Area under the fused-accuracy curve over severities "
                    f"{rob.severities[0]:g}-{rob.severities[-1]:g} (normalised: a flat curve "
                    f"has AUC = the clean accuracy {rob.clean_accuracy:.3f}), {rob.split} split"))
        paragraphs.append(
            f"missing: a fraction of samples has the modality replaced by its '{rob.baseline}' "
            "baseline; shuffle: a fraction takes the modality from another sample; "
            f"{rob.noise_definition}. A flat curve means the fused model does not use that "
            "modality; see docs/robustness.md.")
    if cu is not None:
        mods = list(cu)
        tables.append(Table(
            ["modality", "split", "n", "u_m = (A(N) - A(N without m)) / A(N)",
             "A(N without m)"],
            [[m, cu.split, cu.n, cu[m], cu.accuracy_without[m]] for m in mods],
            caption=f"Conditional utilisation (Greedy), '{cu.baseline}' baseline; A(N) = "
                    f"{cu.accuracy_all:.3f}; d_util = {cu.d_util:+.3f}"
                    + (f" (u({mods[1]}|{mods[0]}) - u({mods[0]}|{mods[1]}))" if len(mods) == 2
                       else " (max - min)")))
        if cu.note:
            paragraphs.append(cu.note)
    return Section(f"Robustness and conditional utilisation{label}", paragraphs=paragraphs,
                   tables=tables, figures=figures)


def _level(rep) -> str:
    iv = next(iter(rep.intervals.values()), None)
    return f"{100 * iv.level:g} %" if iv else "95 %"


def _interval_tables(rep) -> list[Table]:
    if not rep.intervals:
        return []
    mods = list(rep.ranking or rep.modalities)
    level = _level(rep)
    means = Table(
        ["probe", "split", "n", "modality", "mean", f"{level} CI low", f"{level} CI high"],
        [[iv.probe, iv.split, iv.n, m, iv.mean[m], iv.low[m], iv.high[m]]
         for iv in rep.intervals.values() for m in mods],
        caption=f"Means with {level} paired-bootstrap intervals over the {rep.split} samples")
    rows = []
    for iv in rep.intervals.values():
        for i, k in enumerate(mods):
            for j in mods[i + 1:]:
                est, lo, hi = iv.difference(k, j)
                rows.append([iv.probe, iv.split, f"{k} − {j}", est, lo, hi, iv.margin])
    leads = Table(["probe", "split", "lead", "estimate", f"{level} CI low", f"{level} CI high",
                   "practical margin"], rows,
                  caption=f"Pairwise leads on the {rep.split} split (imbalanced: the lead of the "
                          "first over the last is above 0 and the margin on both probes)")
    return [means, leads]


def _recommendation_section(rep, label: str) -> Section:
    if rep.recommendations:
        groups: dict[str, list[dict]] = {}  # one row per reason, its methods side by side
        for r in rep.recommendations:
            groups.setdefault(r["why"], []).append(r)
        table = Table(["methods", "why", "pages"],
                      [[[Link(r["method"], r["page"]) for r in recs], why,
                        ", ".join(r["page"] for r in recs)] for why, recs in groups.items()],
                      caption=f"Methods for the imbalance found on the {rep.split} split")
        return Section(f"Recommendation{label}", tables=[table])
    what = ("the modalities are balanced" if rep.verdict == "balanced"
            else "the evidence is inconclusive")
    return Section(f"Recommendation{label}",
                   paragraphs=[f"No recommendation: {what} ({rep.reason})."])


def _per_modality(rep, baseline: str) -> Table:
    """Per-modality numbers; columns only for the probes that ran."""
    mods, split = list(rep.modalities), rep.split
    columns = ["modality", f"unimodal acc ({split}, {baseline} baseline)",
               f"true-class prob ({split})", f"mean Shapley ({split}, {baseline} baseline)",
               f"low-contrib. share ({split})"]
    if rep.fisher:
        columns.append(f"Fisher trace ({split})")
    if rep.separability:
        fit_on, scored_on = _sep_splits(rep)
        columns += [f"purity {fit_on}", f"purity {scored_on}", f"purity gap {fit_on}/{scored_on}",
                    f"linear probe (fit on {fit_on}, scored on {scored_on})"]
    if rep.under_optimisation:
        columns += ["probe joint", "probe alone", "starvation gap"]
    mean, low = rep.shapley.mean(), rep.shapley.low_contribution_share()
    rows = []
    for m in mods:
        u = rep.unimodal.unimodal[m]
        row = [m, u.accuracy, u.true_prob, mean[m], low[m]]
        if rep.fisher:
            row.append(rep.fisher[m])
        if rep.separability:
            s = rep.separability[m]
            row += [s.train_purity, s.val_purity, s.gap,
                    s.linear_probe if s.linear_probe is not None else "—"]
        if rep.under_optimisation:
            uo = rep.under_optimisation[m]
            row += [uo["joint"], uo["alone"], uo["gap"]]
        rows.append(row)
    return Table(columns, rows)


def diagnosis_sections(rep, name: str = "", class_names=None,
                       figures: dict | list | None = None) -> list[Section]:
    """Verdict (with intervals), recommendation, evidence, per-class breakdown, robustness and
    figures of one diagnosis.

    ``figures``: already rendered ``{stem: (data URI, caption)}`` (or a list of pairs, all shown
    as evidence); rendered here when omitted.
    """
    label = f" — {name}" if name else ""
    mods, split = list(rep.modalities), rep.split
    baseline = getattr(rep, "baseline", None) or rep.config.get("baseline", "zero")
    evidence = Table(["probe", "split", "first", "last", *mods, "what it measures"],
                     [[e.probe, e.split or split, e.dominant, e.weakest,
                       *[e.scores[m] for m in mods], e.description] for e in rep.evidence],
                     caption="Point estimates per probe (each probe's own first and last)")
    names = class_names or {}
    per_class = Table(["class", "n", f"fused acc ({split})", *[f"{m} acc ({split})" for m in mods],
                       *[f"{m} Shapley ({split})" for m in mods]],
                      [[names[c] if isinstance(names, (list, tuple)) and c < len(names) else c,
                        rec["n"], rec["acc"], *[rec["unimodal_acc"][m] for m in mods],
                        *[(rec["shapley"] or {}).get(m, float("nan")) for m in mods]]
                       for c, rec in sorted(rep.per_class.items())],
                      caption=f"Per class on the {split} split")
    if figures is None:
        figures = {stem: (figure_to_data_uri(fig), caption)
                   for stem, (fig, caption) in diagnosis_figures(rep).items()}
    if not isinstance(figures, dict):
        figures = {str(i): pair for i, pair in enumerate(figures)}
    robust_figures = [figures[k] for k in _ROBUSTNESS_FIGURES if k in figures]
    figures = [v for k, v in figures.items() if k not in _ROBUSTNESS_FIGURES]
    robust = _robustness_section(rep, label, robust_figures)
    absence = (f"Absence: a missing modality's feature is replaced by its '{baseline}' baseline "
               "(the same for unimodal accuracy and Shapley).")
    # the summary already holds the disagreements: they are not repeated below it
    return [
        Section(f"Verdict{label}: {rep.verdict}", verdict=rep.summary,
                verdict_warn=rep.verdict != "imbalanced" or not rep.agree,
                paragraphs=[absence], tables=_interval_tables(rep)),
        _recommendation_section(rep, label),
        Section(f"Evidence{label}", tables=[evidence, _per_modality(rep, baseline)],
                figures=figures),
        Section(f"Per class{label}", tables=[per_class]),
        *([robust] if robust is not None else []),
        Section(f"Configuration{label}", config=rep.config),
    ]


def diagnosis_html(rep, title: str = "modaldiag diagnosis", class_names=None,
                   figures: dict | list | None = None) -> str:
    return render_page(title, diagnosis_sections(rep, class_names=class_names, figures=figures),
                       subtitle=f"modalities: {', '.join(rep.modalities)}; verdict measured on "
                                f"the {rep.split} split (n = {rep.n or rep.unimodal.n})")


def write_diagnosis(rep, directory: Path, title: str = "modaldiag diagnosis",
                    class_names=None) -> None:
    """Figures (PNG + SVG) and ``report.html`` of ``rep`` into ``directory``; each figure is
    drawn once and embedded in the page."""
    embedded = {}
    for stem, (fig, caption) in diagnosis_figures(rep).items():
        embedded[stem] = (figure_to_data_uri(fig, close=False), caption)
        plots.save_figure(fig, directory / stem)
    atomic_write_text(directory / "report.html",
                      diagnosis_html(rep, title, class_names, figures=embedded))


register_renderers(to_html=diagnosis_html, save=write_diagnosis)
register_plot(plots.robustness)
