"""Run every benchmark suite side by side and write results + docs/benchmarks.md.

    python -m benchmarks.run            # full run (make bench)
    python -m benchmarks.run --quick    # CI-sized
    python -m benchmarks.run --only training
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from modaldiag.utils.io import atomic_write_json, atomic_write_text

from .common import machine_info

ROOT = Path(__file__).resolve().parent.parent
SUITES = ["valuation", "fisher", "overhead", "diagnosis", "methods", "training"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    args = parser.parse_args(argv)
    info = machine_info()
    results_dir = ROOT / "benchmarks" / "results"
    for suite in args.only or SUITES:
        module = importlib.import_module(f"benchmarks.bench_{suite}")
        print(f"== {suite}", flush=True)
        tables = module.run(quick=args.quick)
        for t in tables:
            print(t.to_markdown())
        atomic_write_json(results_dir / f"{suite}.json",
                          {"suite": suite, "quick": args.quick, "machine": info,
                           "tables": [t.to_dict() for t in tables]})
    render(results_dir, ROOT / "docs" / "benchmarks.md")
    return 0


def render(results_dir: Path, out: Path) -> None:
    """docs/benchmarks.md from every stored suite result (no hand-edited numbers)."""
    from .common import Table

    parts = ["# Benchmarks", "",
             "Produced by `make bench` (`python -m benchmarks.run`); do not edit by hand.", ""]
    for suite in SUITES:
        path = results_dir / f"{suite}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        m = data["machine"]
        parts += [f"## {suite}", "",
                  f"{m['date']} · {m['machine']} · Python {m['python']} · torch {m['torch']} · "
                  f"modaldiag {m['modaldiag']}" + (" · **quick mode**" if data["quick"] else ""), ""]
        for t in data["tables"]:
            parts.append(Table(**t).to_markdown())
    atomic_write_text(out, "\n".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
