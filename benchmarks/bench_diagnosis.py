"""What each probe says after joint training on the embedded real datasets."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import modaldiag as md

from .common import Table

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
QUICK_FIGURES = Path(__file__).resolve().parent / "results-quick" / "figures"

CASES = [("mfeat-fou-pix", 20), ("mfeat-zer-fac", 20), ("mfeat-mor-kar", 20), ("mfeat", 20),
         ("hapt", 10), ("nutrimouse", 40)]


def _rank(scores: dict[str, float]) -> str:
    return " > ".join(f"{m} {v:.2f}" for m, v in sorted(scores.items(), key=lambda kv: -kv[1]))


def run(quick: bool = False) -> list[Table]:
    verdicts = Table(
        "Diagnosis after joint training (concat head, default encoders, seed 0; the verdict, "
        "unimodal accuracy and Shapley on the test split, as `modaldiag diagnose --run`; linear "
        "probe fit on train and scored on val; purity train vs val)",
        ["dataset", "epochs", "fused val acc", "verdict (test)", "dominant", "weakest", "reason",
         "recommended", "agree", "unimodal acc (test, joint head)", "mean Shapley (test, paper)",
         "linear probe (val)"],
    )
    starvation = Table(
        "Under-optimisation gap: linear probe of the jointly trained encoder vs the same encoder "
        "trained alone (same epochs)",
        ["dataset", "modality", "joint", "alone", "gap", "Fisher trace (per-sample)",
         "purity train/val", "diagnose s"],
    )
    windows = Table(
        "Prime learning windows after joint training (paper rule, K = 0.04; online Fisher trace)",
        ["dataset", "open epochs per modality", "peak growth epoch", "figure"],
    )
    figures = QUICK_FIGURES if quick else FIGURES  # quick runs leave the published figures alone
    figures.mkdir(parents=True, exist_ok=True)
    for name, epochs in CASES:
        if quick:
            epochs = max(2, epochs // 5)
        data = md.datasets.load(name)
        torch.manual_seed(0)
        model = md.models.default_model(data)
        bs = 8 if name.startswith("nutrimouse") else 64
        hist = md.fit(model, data.train.loader(bs, shuffle=True), data.val.loader(512),
                      epochs=epochs, progress=False, seed=0)
        win = md.learning_window(hist)
        fig_path = figures / f"window-{name}.png"
        md.plot.save_figure(md.plot.learning_window(hist), fig_path.with_suffix(""), formats=("png",))
        windows.rows.append([name, "; ".join(f"{m}: {o[0]}–{o[-1]}" if o else f"{m}: never"
                                             for m, o in win.open_epochs().items()),
                             ", ".join(f"{m} {e}" for m, e in win.peak_growth_epoch.items()),
                             f"![{name}](figures/window-{name}.png)"])
        t0 = time.perf_counter()
        rep = md.diagnose(model, data.test.loader(512), data.val.loader(512), split="test",
                          train_loader=data.train.loader(512), reference_epochs=epochs,
                          fisher="per_sample", history=hist)
        seconds = time.perf_counter() - t0
        ev = {e.probe: e.scores for e in rep.evidence}
        verdicts.rows.append([name, epochs, hist[-1]["val"]["acc"], rep.verdict,
                              rep.dominant or "—", rep.weakest or "—", rep.reason,
                              ", ".join(r["method"] for r in rep.recommendations) or "—",
                              "yes" if rep.agree else "no", _rank(ev["unimodal accuracy"]),
                              _rank(ev["shapley"]), _rank(ev["linear probe"])])
        for m in data.modalities:
            u = rep.under_optimisation[m]
            s = rep.separability[m]
            starvation.rows.append([name, m, u["joint"], u["alone"], u["gap"], rep.fisher[m],
                                    f"{s.train_purity:.2f}/{s.val_purity:.2f}", seconds])
    return [verdicts, starvation, windows]
