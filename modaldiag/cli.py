"""The ``modaldiag`` command line. Thin: parse arguments, call the library.

Exit codes: 0 success; 2 bad arguments or input (one clear line on stderr); 1 an unexpected
failure (with the traceback); 130 interrupted.

Output folders are checked before any work (a non-empty folder modaldiag did not create, ``.``,
the home folder, or a folder containing or inside an input run are refused), locked while the
command runs, written atomically, and marked as modaldiag's (``.modaldiag``); an existing
modaldiag folder is replaced only with ``--overwrite``. ``train`` checkpoints every epoch and the
same command resumes; ``--restart`` starts over.
"""

from __future__ import annotations

import argparse
import errno
import math
import shlex
import sys

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
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
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


def _command(args) -> str:
    return shlex.join(["modaldiag", *args.argv])


def _cmd_train(args) -> int:
    from . import datasets
    from .runs import train_run
    from .utils.io import check_output_dir

    out = check_output_dir(args.out, existing_ok=True)
    data = datasets.load(args.dataset)
    device = _device(args.device)
    run = train_run(data, args.method, args.epochs, out, seed=args.seed, fusion=args.fusion,
                    batch_size=args.batch_size, lr=args.lr, device=device,
                    progress=not args.quiet, overwrite=args.overwrite, restart=args.restart,
                    command=_command(args), log=lambda text: print(text, file=sys.stderr))
    uni = ", ".join(f"{m} {a:.3f}" for m, a in run.config["test_unimodal_acc"].items())
    done = "already complete in" if run.status == "already complete" else "written to"
    _say(args, f"{run.name} on {data.name}: test accuracy {run.config['test_acc']:.3f} "
               f"(unimodal: {uni}); {done} {args.out}")
    return 0


def _diagnose_run(run, device, progress):
    from .probes import diagnose

    data = run.data()
    model = run.model(data, device=device or "cpu")
    return diagnose(model, data.train.loader(512), data.val.loader(512), progress=progress), data


def _cmd_diagnose(args) -> int:
    from .runs import load_run
    from .utils.io import DirectoryLock, atomic_directory, check_output_dir

    run = load_run(args.run)
    default = run.path / "diagnosis"
    out = check_output_dir(default if args.out is None else args.out, inputs=[run.path],
                           allowed_inside=[default], overwrite=args.overwrite)
    device = _device(args.device)
    with DirectoryLock(out):
        rep, data = _diagnose_run(run, device, not args.quiet)
        with atomic_directory(out, kind="diagnosis", command=_command(args),
                              overwrite=args.overwrite) as tmp:
            rep.save(tmp, title=f"modaldiag diagnosis: {run.name} on {data.name}",
                     class_names=data.class_names)
    _say(args, rep.summary)
    _say(args, f"report written to {out / 'report.html'}")
    return 0


def _cmd_compare(args) -> int:
    from .report.compare import write_comparison
    from .runs import load_run
    from .utils.io import DirectoryLock, atomic_directory, check_output_dir

    if len(args.runs) < 2:
        raise CLIError("compare needs at least two run folders.")
    runs = [load_run(p) for p in args.runs]
    datasets = {r.config["dataset"] for r in runs}
    if len(datasets) > 1:
        raise CLIError(f"runs are on different datasets {sorted(datasets)}; compare runs of one dataset.")
    out = check_output_dir(args.out, inputs=[r.path for r in runs], overwrite=args.overwrite)
    with DirectoryLock(out), atomic_directory(out, kind="comparison", command=_command(args),
                                              overwrite=args.overwrite) as tmp:
        summary = write_comparison(runs, tmp)
    _say(args, summary)
    _say(args, f"comparison written to {out / 'report.html'}")
    return 0


def _cmd_demo(args) -> int:
    from . import datasets
    from .report.compare import write_comparison
    from .runs import train_run
    from .utils.io import DirectoryLock, atomic_directory, check_output_dir, write_marker

    out = check_output_dir(args.out, overwrite=args.overwrite)
    data = datasets.load(args.dataset)
    device = _device(args.device)
    command = _command(args)
    with DirectoryLock(out), atomic_directory(out, kind="demo", command=command,
                                              overwrite=args.overwrite) as tmp:
        runs, diagnoses = [], {}
        for method in ("joint", "inforeg"):
            _say(args, f"training {method} on {data.name} ({args.epochs} epochs)...")
            run = train_run(data, method, args.epochs, tmp / method, seed=args.seed,
                            device=device, progress=not args.quiet, command=command)
            runs.append(run)
            _say(args, f"diagnosing {run.name}...")
            rep, _ = _diagnose_run(run, device, not args.quiet)
            rep.save(tmp / method / "diagnosis", title=f"Diagnosis: {run.name} on {data.name}",
                     class_names=data.class_names)
            write_marker(tmp / method / "diagnosis", "diagnosis", command=command)
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
    common.add_argument("--overwrite", action="store_true",
                        help="replace --out when it already holds an earlier modaldiag output "
                             "(train: retrain a finished run, or replace another command's run); "
                             "a folder modaldiag did not create is never replaced")

    demo = sub.add_parser("demo", parents=[common],
                          help="joint training vs InfoReg on an embedded dataset, diagnosed and compared")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--dataset", default=DEMO_DATASET, help=f"default: {DEMO_DATASET}")
    demo.add_argument("--epochs", type=_positive_int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", parents=[common], help="train one run into a folder (resumable)")
    train.add_argument("--dataset", required=True, help="see `modaldiag datasets`")
    train.add_argument("--method", choices=METHODS, default="joint")
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--fusion", choices=("concat", "sum", "film", "gated", "late"), default="concat")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=_positive_float, default=0.01)
    train.add_argument("--out", required=True,
                       help="run folder to write; checkpoints are kept every epoch, and re-running "
                            "the same command resumes from the last completed epoch (a finished "
                            "run is reported complete, not retrained; a different command into "
                            "the same folder is refused)")
    train.add_argument("--restart", action="store_true",
                       help="discard the checkpoints of an interrupted run in --out and train "
                            "from epoch 0 (also retrains a finished run)")
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


_USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not hasattr(args, "quiet"):
        args.quiet = False
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"modaldiag: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _USER_OS_ERRORS:
            raise
        print(f"modaldiag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; re-run the same command to resume from the last completed epoch"
                if args.command == "train" else "")
        print(f"modaldiag: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
