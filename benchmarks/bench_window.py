"""Prime-learning-window rules on real Fisher traces: how often each rule's window changes state
after it first closes, and where it places the window.

    python -m benchmarks.bench_window            # prints the table, writes docs/figures/window-rules.png
    python -m benchmarks.bench_window --quick    # CI-sized; figure under benchmarks/results-quick/

Joint training (concat head, default encoders, plain SGD as ``md.fit`` sets it up, online Fisher
trace with ``monitor=True``) on the fast embedded datasets, several seeds; every rule is then
applied to the same recorded traces. The paper rule is taken as its per-epoch decision
(``sticky=False``): with ``sticky=True`` it can never change state after closing, but it closes at
the same first epoch, so the first-close column is the sticky window's end as well.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import modaldiag as md

from .common import Table

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
QUICK_FIGURES = Path(__file__).resolve().parent / "results-quick" / "figures"

#: (dataset, epochs, batch size)
CASES = [("hapt", 20, 64), ("mfeat-fou-pix", 20, 32), ("mfeat-zer-fac", 20, 32),
         ("mfeat-mor-kar", 20, 32), ("nutrimouse", 20, 8)]
SEEDS = 5
RULES = {"paper": {"sticky": False}, "code": {}, "robust": {}}


def _first_close(opened: list[bool]) -> int | None:
    return next((t for t, o in enumerate(opened) if not o), None)


def _changes_after_first_close(opened: list[bool]) -> int:
    first = _first_close(opened)
    if first is None:
        return 0
    return sum(opened[t] != opened[t - 1] for t in range(first + 1, len(opened)))


def collect(quick: bool = False) -> dict:
    """Train, record the Fisher traces, apply every rule.

    Returns
    -------
    dict
        ``{"quick", "seeds", "seconds", "datasets": {name: {"epochs", "batch_size",
        "modalities", "seconds", "traces": [{m: [Tr_0, ...]} per seed], "rules": {rule:
        {"open": [[bool] * epochs per (seed, modality)], "first_close": [int | None ...],
        "changes": [int ...]}}}}}``; the (seed, modality) lists are in seed-major order.
    """
    seeds = 2 if quick else SEEDS
    out = {"quick": quick, "seeds": seeds, "datasets": {}}
    start = time.perf_counter()
    for name, epochs, batch_size in CASES:
        if quick:
            epochs = max(4, epochs // 4)
        data = md.datasets.load(name)
        t0 = time.perf_counter()
        traces = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = md.models.default_model(data)
            hist = md.fit(model, data.train.loader(batch_size, shuffle=True), epochs=epochs,
                          monitor=True, seed=seed, progress=False)
            traces.append({m: hist.series(f"fisher.{m}") for m in data.modalities})
        rules = {}
        for rule, kwargs in RULES.items():
            opened, first, changes = [], [], []
            for tr in traces:
                win = md.learning_window(tr, rule=rule, **kwargs)
                for m in data.modalities:
                    opened.append(win.open[m])
                    first.append(_first_close(win.open[m]))
                    changes.append(_changes_after_first_close(win.open[m]))
            rules[rule] = {"open": opened, "first_close": first, "changes": changes}
        out["datasets"][name] = {"epochs": epochs, "batch_size": batch_size,
                                 "modalities": list(data.modalities),
                                 "seconds": time.perf_counter() - t0, "traces": traces,
                                 "rules": rules}
    out["seconds"] = time.perf_counter() - start
    return out


def _summary(values: list[int | None]) -> tuple[str, int]:
    closed = [v for v in values if v is not None]
    never = len(values) - len(closed)
    if not closed:
        return "never", never
    med = statistics.median(closed)
    return f"{med:g} [{min(closed)}–{max(closed)}]", never


def tables(results: dict) -> list[Table]:
    """The results as one :class:`~benchmarks.common.Table` (rows: dataset x rule)."""
    note = (f"Joint training, {results['seeds']} seeds per dataset; every rule applied to the same "
            "online Fisher traces, per modality (windows = seeds x modalities). *changes*: state "
            "changes after the window first closes (paper rule as its per-epoch decision, "
            "`sticky=False`; the code rule decides for all modalities from the first one). "
            "*first close*: the first epoch with the window closed, median [min–max] over the "
            f"windows that close. Total time {results['seconds']:.0f} s.")
    table = Table("Prime learning window: stability and placement of each rule",
                  ["dataset", "epochs", "rule", "windows", "mean changes", "max changes",
                   "windows that change", "first close", "never close"], note=note)
    for name, d in results["datasets"].items():
        for rule, r in d["rules"].items():
            changes = r["changes"]
            first, never = _summary(r["first_close"])
            table.rows.append([name, d["epochs"], rule, len(changes),
                               round(sum(changes) / len(changes), 2), max(changes),
                               sum(c > 0 for c in changes), first, never])
    return [table]


def table(results: dict) -> str:
    """The results as a markdown table."""
    return "\n".join(t.to_markdown() for t in tables(results))


def figure(results: dict, path_stem: Path):
    """One panel per dataset: the fraction of windows (seeds x modalities) open at each epoch,
    one line per rule; writes ``path_stem`` + ``.png`` and returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), sharey=True,
                             squeeze=False)
    styles = {"paper": ("tab:blue", "-"), "code": ("tab:orange", "--"),
              "robust": ("tab:green", "-")}
    for ax, name in zip(axes[0], names, strict=True):
        d = results["datasets"][name]
        for rule, r in d["rules"].items():
            rows = r["open"]
            frac = [sum(row[t] for row in rows) / len(rows) for t in range(d["epochs"])]
            color, ls = styles.get(rule, (None, "-"))
            label = "paper (per epoch)" if rule == "paper" else rule
            ax.plot(range(d["epochs"]), frac, ls, color=color, label=label, lw=1.8)
        ax.set_title(f"{name} ({len(d['rules']['paper']['open'])} windows)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of windows open")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    md.plot.save_figure(fig, path_stem, formats=("png",))
    return fig


def run(quick: bool = False) -> list[Table]:
    """The suite as ``benchmarks.run`` calls it: measure, write the figure, return the tables."""
    results = collect(quick)
    figures = QUICK_FIGURES if quick else FIGURES  # quick runs leave the published figure alone
    figures.mkdir(parents=True, exist_ok=True)
    figure(results, figures / "window-rules")
    return tables(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    args = parser.parse_args(argv)
    for t in run(quick=args.quick):
        print(t.to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
