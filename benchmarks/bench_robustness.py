"""The robustness claim (issue 16): joint training vs InfoReg, InfoReg*, OGM-GE, MMPareto and
ModalityDropout, robustness AUC on the test split, paired over seeds (Holm across methods).

Run through ``md.benchmark(..., robustness=True)``: equal budget (epochs, SGD, encoders, batch
size), selection on validation, test evaluated once; every finished (method, dataset, seed) cell
is cached atomically in ``benchmarks/results/robustness_cells/`` (a re-run computes only what is
missing). The table is the one of the methods suite (:func:`bench_methods.robustness_table`).
"""

from __future__ import annotations

from pathlib import Path

import modaldiag as md

from .bench_methods import ROBUSTNESS, ROBUSTNESS_METHODS, robustness_table
from .common import Table, code_fingerprint, short

RESULTS = Path(__file__).resolve().parent
#: CLI method name -> the label the methods tables use
METHODS = {"joint": "joint", "inforeg": "InfoReg", "inforeg-star": "InfoReg*",
           "ogm-ge": "OGM-GE", "mmpareto": "MMPareto", "dropout": "ModalityDropout"}
DATASETS = ("synthetic", "mfeat-fou-pix", "hapt")
EPOCHS = 20


def run(quick: bool = False, seeds: int | None = None) -> list[Table]:
    n_seeds = seeds or (2 if quick else 5)
    out = RESULTS / ("results-quick" if quick else "results") / "robustness_cells"
    res = md.benchmark(list(DATASETS), methods=list(METHODS), seeds=n_seeds,
                       epochs=3 if quick else EPOCHS, out=out, robustness=True,
                       corruptions=ROBUSTNESS["corruptions"], severities=ROBUSTNESS["severities"],
                       progress=False, threads=1, jobs=1 if quick else 2)
    assert tuple(METHODS.values()) == ROBUSTNESS_METHODS
    cells = res.cells
    runs: dict[str, dict[str, list[dict]]] = {}
    for dataset in DATASETS:
        sub = cells[cells.dataset == dataset].sort_values("seed")
        cols = [c for c in sub.columns  # this dataset's modalities only (others' columns: NaN)
                if c.startswith("robustness_auc.") and sub[c].notna().all()]
        runs[dataset] = {
            label: [{"robustness_auc": {"|".join(c.split(".", 1)[1].rsplit(".", 1)): float(row[c])
                                        for c in cols}}
                    for _, row in sub[sub.method == name].iterrows()]
            for name, label in METHODS.items()}
    table = robustness_table(runs, n_seeds, short(code_fingerprint()))
    table.title += (f"; md.benchmark, {EPOCHS if not quick else 3} epochs, default model "
                    "(concat head), cells cached in benchmarks/results/robustness_cells")
    return [table]
