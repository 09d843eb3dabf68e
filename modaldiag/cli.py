"""The ``modaldiag`` command line. Thin: parse arguments, call the library.

Exit codes: 0 success; 2 bad arguments or input (one clear line on stderr); 1 an unexpected
failure (with the traceback); 130 interrupted. Output folders are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

DEMO_DATASET = "mfeat-fou-pix"


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _device(text: str | None):
    if text is None:
        return None
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise CLIError(f"invalid --device {text!r}; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text} requested but CUDA is not available; use --device cpu.")
    return dev


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)


# ---------------------------------------------------------------- commands
def _cmd_datasets(args) -> int:
    from . import datasets

    for name in datasets.available():
        data = datasets.load(name)
        shapes = ", ".join(f"{m} {s}" for m, s in data.input_shapes.items())
        print(f"{name:22s} n={len(data):6d} classes={data.num_classes:3d}  {shapes}")
    print(f"(any subset of mfeat views works too, e.g. mfeat-fou-kar-mor; views: "
          f"{', '.join(datasets.MFEAT_VIEWS)})")
    return 0


def _cmd_train(args) -> int:
    from . import datasets
    from .runs import train_run

    data = datasets.load(args.dataset)
    run = train_run(data, args.method, args.epochs, Path(args.out), seed=args.seed,
                    fusion=args.fusion, batch_size=args.batch_size, lr=args.lr,
                    device=_device(args.device), progress=not args.quiet)
    uni = ", ".join(f"{m} {a:.3f}" for m, a in run.config["test_unimodal_acc"].items())
    _say(args, f"{run.name} on {data.name}: test accuracy {run.config['test_acc']:.3f} "
               f"(unimodal: {uni}); written to {args.out}")
    return 0


def _diagnose_run(run, device, progress):
    from .probes import diagnose

    data = run.data()
    model = run.model(data, device=device or "cpu")
    return diagnose(model, data.train.loader(512), data.val.loader(512), progress=progress), data


def _cmd_diagnose(args) -> int:
    from .runs import load_run
    from .utils.io import atomic_directory

    run = load_run(args.run)
    rep, data = _diagnose_run(run, _device(args.device), not args.quiet)
    out = Path(args.out) if args.out else run.path / "diagnosis"
    with atomic_directory(out) as tmp:
        rep.save(tmp, title=f"modaldiag diagnosis: {run.name} on {data.name}",
                 class_names=data.class_names)
    _say(args, rep.summary)
    _say(args, f"report written to {out / 'report.html'}")
    return 0


def _cmd_compare(args) -> int:
    from .report.compare import write_comparison
    from .runs import load_run

    if len(args.runs) < 2:
        raise CLIError("compare needs at least two run folders.")
    runs = [load_run(p) for p in args.runs]
    datasets = {r.config["dataset"] for r in runs}
    if len(datasets) > 1:
        raise CLIError(f"runs are on different datasets {sorted(datasets)}; compare runs of one dataset.")
    out = Path(args.out)
    from .utils.io import atomic_directory

    with atomic_directory(out) as tmp:
        summary = write_comparison(runs, tmp)
    _say(args, summary)
    _say(args, f"comparison written to {out / 'report.html'}")
    return 0


def _cmd_demo(args) -> int:
    from . import datasets
    from .report.compare import write_comparison
    from .runs import train_run
    from .utils.io import atomic_directory

    data = datasets.load(args.dataset)
    device = _device(args.device)
    out = Path(args.out)
    with atomic_directory(out) as tmp:
        runs, diagnoses = [], {}
        for method in ("joint", "inforeg"):
            _say(args, f"training {method} on {data.name} ({args.epochs} epochs)...")
            run = train_run(data, method, args.epochs, tmp / method, seed=args.seed,
                            device=device, progress=not args.quiet)
            runs.append(run)
            _say(args, f"diagnosing {run.name}...")
            rep, _ = _diagnose_run(run, device, not args.quiet)
            rep.save(tmp / method / "diagnosis", title=f"Diagnosis: {run.name} on {data.name}",
                     class_names=data.class_names)
            diagnoses[run.name] = rep
        summary = write_comparison(runs, tmp, diagnoses=diagnoses,
                                   title=f"modaldiag demo: joint training vs InfoReg on {data.name}")
    _say(args, summary)
    _say(args, f"report: {out / 'report.html'}")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .runs import METHODS

    parser = argparse.ArgumentParser(prog="modaldiag",
                                     description="Diagnose and repair modality imbalance.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")

    demo = sub.add_parser("demo", parents=[common],
                          help="joint training vs InfoReg on an embedded dataset, diagnosed and compared")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--dataset", default=DEMO_DATASET, help=f"default: {DEMO_DATASET}")
    demo.add_argument("--epochs", type=_positive_int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", parents=[common], help="train one run into a folder")
    train.add_argument("--dataset", required=True, help="see `modaldiag datasets`")
    train.add_argument("--method", choices=METHODS, default="joint")
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--fusion", choices=("concat", "sum", "film", "gated", "late"), default="concat")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=_positive_float, default=0.01)
    train.add_argument("--out", required=True, help="run folder to write")
    train.set_defaults(func=_cmd_train)

    diag = sub.add_parser("diagnose", parents=[common], help="diagnose a trained run")
    diag.add_argument("--run", required=True, help="a folder written by `modaldiag train`")
    diag.add_argument("--out", default=None, help="default: RUN/diagnosis")
    diag.set_defaults(func=_cmd_diagnose)

    comp = sub.add_parser("compare", parents=[common], help="compare runs side by side")
    comp.add_argument("runs", nargs="+", help="run folders (same dataset)")
    comp.add_argument("--out", default="comparison", help="output folder (default: comparison)")
    comp.set_defaults(func=_cmd_compare)

    ds = sub.add_parser("datasets", help="list the embedded datasets")
    ds.set_defaults(func=_cmd_datasets)
    return parser


def _version() -> str:
    from . import __version__

    return f"modaldiag {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "quiet"):
        args.quiet = False
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"modaldiag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modaldiag: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
