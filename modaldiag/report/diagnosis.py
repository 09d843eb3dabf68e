"""The diagnosis as HTML sections (used by ``Diagnosis.save`` and the CLI)."""

from __future__ import annotations

from pathlib import Path

from ..probes.diagnose import register_renderers
from ..utils.io import atomic_write_text
from . import plots
from .html import Section, Table, figure_to_data_uri, render_page

__all__ = ["diagnosis_sections", "diagnosis_html", "diagnosis_figures", "write_diagnosis"]


def diagnosis_figures(rep) -> dict:
    """The diagnosis figures by file stem: ``{stem: (Figure, caption)}``."""
    figures = {"unimodal": (plots.unimodal_bars(rep), "Unimodal accuracy through the joint head"),
               "shapley": (plots.shapley(rep.shapley), "Sample-level Shapley contributions")}
    if rep.separability:
        figures["separability"] = (plots.separability(rep.separability),
                                   "Representation separability (k-means purity, linear probe)")
    return figures


def diagnosis_sections(rep, name: str = "", class_names=None,
                       figures: list[tuple[str, str]] | None = None) -> list[Section]:
    """Verdict, evidence, probes' numbers, per-class breakdown and figures of one diagnosis.

    ``figures``: already rendered ``(data URI, caption)`` pairs (rendered here when omitted).
    """
    label = f" — {name}" if name else ""
    mods = list(rep.modalities)
    baseline = getattr(rep, "baseline", None) or rep.config.get("baseline", "zero")
    evidence = Table(["probe", "dominant", "weakest", *mods, "what it measures"],
                     [[e.probe, e.dominant, e.weakest, *[e.scores[m] for m in mods], e.description]
                      for e in rep.evidence])
    numbers = []
    for m in mods:
        u = rep.unimodal.unimodal[m]
        row = [m, u.accuracy, u.true_prob, rep.shapley.mean()[m],
               rep.shapley.low_contribution_share()[m]]
        row.append(rep.fisher[m] if rep.fisher else "—")
        if rep.separability:
            s = rep.separability[m]
            row += [s.train_purity, s.val_purity, s.gap, s.linear_probe]
        else:
            row += ["—"] * 4
        if rep.under_optimisation:
            uo = rep.under_optimisation[m]
            row += [uo["joint"], uo["alone"], uo["gap"]]
        else:
            row += ["—"] * 3
        numbers.append(row)
    per_modality = Table(["modality", f"unimodal acc ({baseline} baseline)", "true-class prob",
                          f"mean Shapley ({baseline} baseline)",
                          "low-contrib. share", "Fisher trace", "purity train", "purity val",
                          "purity gap", "linear probe", "probe joint", "probe alone", "starvation gap"],
                         numbers)
    names = class_names or {}
    per_class = Table(["class", "n", "fused acc", *[f"{m} acc" for m in mods],
                       *[f"{m} Shapley" for m in mods]],
                      [[names[c] if isinstance(names, (list, tuple)) and c < len(names) else c,
                        rec["n"], rec["acc"], *[rec["unimodal_acc"][m] for m in mods],
                        *[(rec["shapley"] or {}).get(m, float("nan")) for m in mods]]
                       for c, rec in sorted(rep.per_class.items())])
    if figures is None:
        figures = [(figure_to_data_uri(fig), caption) for fig, caption in diagnosis_figures(rep).values()]
    absence = (f"Absence: a missing modality's feature is replaced by its '{baseline}' baseline "
               "(the same for unimodal accuracy and Shapley).")
    return [
        Section(f"Verdict{label}", verdict=rep.summary, verdict_warn=not rep.agree,
                paragraphs=[absence] + ([] if rep.agree else
                                        ["Disagreements: " + " ".join(rep.disagreements)])),
        Section(f"Evidence{label}", tables=[evidence, per_modality], figures=figures),
        Section(f"Per class{label}", tables=[per_class]),
        Section(f"Configuration{label}", config=rep.config),
    ]


def diagnosis_html(rep, title: str = "modaldiag diagnosis", class_names=None,
                   figures: list[tuple[str, str]] | None = None) -> str:
    return render_page(title, diagnosis_sections(rep, class_names=class_names, figures=figures),
                       subtitle=f"modalities: {', '.join(rep.modalities)}")


def write_diagnosis(rep, directory: Path, title: str = "modaldiag diagnosis",
                    class_names=None) -> None:
    """Figures (PNG + SVG) and ``report.html`` of ``rep`` into ``directory``; each figure is
    drawn once and embedded in the page."""
    embedded = []
    for stem, (fig, caption) in diagnosis_figures(rep).items():
        embedded.append((figure_to_data_uri(fig, close=False), caption))
        plots.save_figure(fig, directory / stem)
    atomic_write_text(directory / "report.html",
                      diagnosis_html(rep, title, class_names, figures=embedded))


register_renderers(to_html=diagnosis_html, save=write_diagnosis)
