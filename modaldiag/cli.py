"""The ``modaldiag`` command line. Thin: parse arguments, call the library.

Exit codes: 0 success; 2 bad arguments or input (one clear line on stderr); 1 an unexpected
failure (with the traceback); 130 interrupted.

Output folders are checked before any work (a non-empty folder modaldiag did not create, ``.``,
the home folder, or a folder containing or inside an input run are refused), locked while the
command runs, written atomically, and marked as modaldiag's (``.modaldiag``); an existing
modaldiag folder is replaced only with ``--overwrite``. ``train`` checkpoints every epoch and the
same command resumes; ``--restart`` starts over.

``train`` takes an embedded dataset (``--dataset``) or the user's own data and model
(``--data pkg.mod:func`` / ``--data file.py:func`` / ``--data AV_FOLDER_ROOT``, ``--model
pkg.mod:func``); ``diagnose`` and ``compare`` rebuild both from the specs recorded in the run.
Every command takes ``--threads N`` and ``--quiet``. See docs/cli.md.
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


def _choice(choices, what: str):
    """An argparse type accepting one of ``choices``; a typo gets "did you mean" (difflib)."""

    def parse(text: str) -> str:
        from .utils.validation import closest_match

        if text in choices:
            return text
        close = closest_match(text, choices)
        hint = f"; did you mean {close!r}?" if close else ""
        raise argparse.ArgumentTypeError(
            f"unknown {what} {text!r}{hint} (choose from {', '.join(choices)})")

    parse.__name__ = what
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a real default (not None/False) and
    does not already state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default:" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


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


def _note(text: str) -> None:
    """Notes such as "resuming from epoch k of N" go to stderr, also with --quiet."""
    print(text, file=sys.stderr)


def _train_data(args):
    """``(data, data_spec)``: the embedded ``--dataset`` or the user's ``--data``."""
    from . import datasets
    from .runs import load_data

    if args.data is not None:
        return load_data(args.data), args.data
    return datasets.load(args.dataset), None


def _cmd_train(args) -> int:
    from .runs import train_run
    from .utils.io import check_output_dir

    if args.model is not None and args.fusion is not None:
        raise CLIError("--fusion applies to the default model only; your --model function builds "
                       "its own fusion (drop --fusion).")
    out = check_output_dir(args.out, existing_ok=True)
    data, data_spec = _train_data(args)
    device = _device(args.device)
    run = train_run(data, args.method, args.epochs, out, seed=args.seed, fusion=args.fusion,
                    batch_size=args.batch_size, lr=args.lr, device=device,
                    progress=not args.quiet, overwrite=args.overwrite, restart=args.restart,
                    command=_command(args), log=_note, data_spec=data_spec,
                    model_spec=args.model)
    uni = ", ".join(f"{m} {a:.3f}" for m, a in run.config["test_unimodal_acc"].items())
    done = "already complete in" if run.status == "already complete" else "written to"
    _say(args, f"{run.name} on {data.name}: fused test accuracy {run.config['test_acc']:.3f} "
               f"(unimodal test accuracy: {uni}); {done} {args.out}")
    return 0


def _diagnose_run(run, device, progress):
    """Diagnose a run on its held-out test split (separability: train vs val; the run's
    History gives the learning-window evidence).

    Returns ``(Diagnosis, data)``."""
    from .probes import diagnose
    from .runs import run_loaders

    data = run.data()
    model = run.model(data, device=device or "cpu")
    _, val_loader, test_loader, train_loader = run_loaders(data, run.config.get("batch_size", 64))
    rep = diagnose(model, test_loader, val_loader, split="test", train_loader=train_loader,
                   progress=progress, history=run.history)
    return rep, data


def _diagnosis_title(run, data) -> str:
    return f"modaldiag diagnosis: {run.name} on {data.name} (test split)"


def _split_line(rep) -> str:
    split = getattr(rep, "split", None) or "test"
    return f"diagnosis measured on the {split} split"


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
            rep.save(tmp, title=_diagnosis_title(run, data), class_names=data.class_names)
    _say(args, f"{run.name} on {data.name}: {_split_line(rep)}")
    _say(args, rep.summary)
    _say(args, f"report written to {out / 'report.html'} (with diagnosis.json and CSV tables)")
    return 0


def _check_comparable(runs) -> None:
    data = {r.config.get("data") or r.config["dataset"] for r in runs}
    if len(data) > 1:
        raise CLIError(f"runs are on different datasets {sorted(data)}; compare runs of one "
                       "dataset.")
    mods = {tuple(sorted(r.config["test_unimodal_acc"])) for r in runs}
    if len(mods) > 1:
        raise CLIError(f"runs have different modalities {sorted(mods)}; compare runs of one "
                       "dataset.")


def _cmd_compare(args) -> int:
    from .report.compare import write_comparison
    from .runs import load_run
    from .utils.io import DirectoryLock, atomic_directory, check_output_dir

    if len(args.runs) < 2:
        raise CLIError("compare needs at least two run folders.")
    runs = [load_run(p) for p in args.runs]
    _check_comparable(runs)
    out = check_output_dir(args.out, inputs=[r.path for r in runs], overwrite=args.overwrite)
    with DirectoryLock(out), atomic_directory(out, kind="comparison", command=_command(args),
                                              overwrite=args.overwrite) as tmp:
        summary = write_comparison(runs, tmp)
    _say(args, summary)
    _say(args, f"comparison written to {out / 'report.html'} (with comparison.json and "
               "comparison.csv)")
    return 0


DEMO_METHODS = ("joint", "inforeg")


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
        runs = []
        for method in DEMO_METHODS:
            _say(args, f"training {method} on {data.name} ({args.epochs} epochs)...")
            run = train_run(data, method, args.epochs, tmp / method, seed=args.seed,
                            device=device, progress=not args.quiet, command=command)
            runs.append(run)
            _say(args, f"diagnosing {run.name} on the test split...")
            rep, _ = _diagnose_run(run, device, not args.quiet)
            rep.save(tmp / method / "diagnosis", title=_diagnosis_title(run, data),
                     class_names=data.class_names)
            write_marker(tmp / method / "diagnosis", "diagnosis", command=command)
        summary = write_comparison(
            runs, tmp, paths=[out / m for m in DEMO_METHODS],
            title=f"modaldiag demo: joint training vs InfoReg on {data.name}")
    _say(args, summary)
    _say(args, f"report: {out / 'report.html'}")
    return 0


def _methods_list(text: str) -> str:
    """``all`` or a comma-separated list of method names (each checked, with did-you-mean)."""
    from .runs import METHODS

    if text == "all":
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected 'all' or a comma-separated list of methods")
    check = _choice(METHODS, "method")
    return ",".join(check(n) for n in names)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _cmd_benchmark(args) -> int:
    from .benchmark import benchmark

    device = _device(args.device)
    data = args.data[0] if len(args.data) == 1 else list(args.data)
    res = benchmark(data, args.model, methods=args.methods, seeds=args.seeds, epochs=args.epochs,
                    out=args.out, jobs=args.jobs, backend=args.backend,
                    tune_trials=args.tune_trials, robustness=args.robustness,
                    batch_size=args.batch_size, lr=args.lr, device=device,
                    threads=args.threads, ray_address=args.ray_address,
                    progress=not args.quiet, log=_note, command=_command(args))
    _say(args, res.summary())
    _say(args, f"leaderboard written to {res.out / 'leaderboard.html'} (table: "
               f"{res.out / 'leaderboard.csv'}; one row per cell: {res.out / 'cells.csv'}; "
               f"cached cells: {res.out / 'cells'})")
    return 0


# ---------------------------------------------------------------- parser
THREADS_HELP = ("CPU threads for torch (default: $MODALDIAG_THREADS when set, else the idle "
                "cores: every core on a quiet machine, 1 when other jobs keep the cores busy; "
                "see docs/performance.md). Threads that fight other jobs for the same cores slow "
                "everything down many times over: on a shared machine give a small N (1-2).")


def build_parser() -> argparse.ArgumentParser:
    from .runs import FUSIONS, METHODS

    parser = argparse.ArgumentParser(prog="modaldiag", formatter_class=_HelpFormatter,
                                     description="Diagnose and repair modality imbalance in "
                                                 "multimodal PyTorch models (docs/cli.md).")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--quiet", action="store_true",
                      help="no progress bars or summaries (notes such as 'resuming from epoch "
                           "k of N' and errors still go to stderr)")
    base.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                      help=THREADS_HELP)
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    common.add_argument("--overwrite", action="store_true",
                        help="replace --out when it already holds an earlier modaldiag output "
                             "(train: retrain a finished run, or replace another command's run); "
                             "a folder modaldiag did not create is never replaced")

    def add(name, help_text, description, parents=(common,)):
        return sub.add_parser(name, parents=list(parents), help=help_text,
                              description=description, formatter_class=_HelpFormatter)

    demo = add("demo", "joint training vs InfoReg on an embedded dataset, diagnosed and compared",
               "Train joint training and InfoReg on an embedded dataset, diagnose both on the "
               "test split and compare them; writes OUT/report.html, comparison.json/.csv and "
               "one run folder per method.")
    demo.add_argument("--out", default="demo-out", help="output folder")
    demo.add_argument("--dataset", default=DEMO_DATASET,
                      help="embedded dataset (see `modaldiag datasets`)")
    demo.add_argument("--epochs", type=_positive_int, default=20, help="epochs per run")
    demo.add_argument("--seed", type=int, default=0, help="training seed of both runs")
    demo.set_defaults(func=_cmd_demo)

    train = add("train", "train one run into a folder (resumable)",
                "Train one run into --out: an embedded --dataset, or your own --data (and "
                "optionally --model). Writes run.json, history.json, history.csv, model.pt and "
                "figures; re-running the same command resumes.")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="an embedded dataset, e.g. mfeat-fou-pix or hapt (see "
                                          "`modaldiag datasets`)")
    source.add_argument("--data", metavar="SPEC",
                        help="your data: MODULE:FUNCTION (importable; the current folder is on "
                             "sys.path) or path/to/file.py:FUNCTION, a function taking no "
                             "arguments (or only `seed`) that returns md.datasets.DatasetSplits "
                             "or a (train, val, test) tuple of loaders yielding (dict of inputs, "
                             "labels); or the root folder of an av_folder dataset")
    train.add_argument("--model", metavar="SPEC", default=None,
                       help="your model: MODULE:FUNCTION or path/to/file.py:FUNCTION, a function "
                            "taking the splits (what --data returns) and returning "
                            "md.MultimodalClassifier(...) or md.wrap(your_model, ...) (default: "
                            "modaldiag's default encoders for the data's input shapes)")
    train.add_argument("--method", type=_choice(METHODS, "method"), choices=METHODS,
                       default="joint", metavar="METHOD",
                       help=f"training method: {', '.join(METHODS)}")
    train.add_argument("--epochs", type=_positive_int, default=30, help="training epochs")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the model's initialisation and the batch order")
    train.add_argument("--fusion", type=_choice(FUSIONS, "fusion"), choices=FUSIONS,
                       default=None, metavar="FUSION",
                       help=f"fusion of the default model: {', '.join(FUSIONS)} (default: "
                            "concat; shared for mla, mid for greedy; not with --model)")
    train.add_argument("--batch-size", type=_positive_int, default=64,
                       help="training batch size (loaders returned by --data are used as they "
                            "are)")
    train.add_argument("--lr", type=_positive_float, default=0.01,
                       help="learning rate (SGD, momentum 0.9)")
    train.add_argument("--out", required=True,
                       help="run folder to write; checkpoints are kept every epoch, and re-running "
                            "the same command resumes from the last completed epoch (a finished "
                            "run is reported complete, not retrained; a different command into "
                            "the same folder is refused)")
    train.add_argument("--restart", action="store_true",
                       help="discard the checkpoints of an interrupted run in --out and train "
                            "from epoch 0 (also retrains a finished run)")
    train.set_defaults(func=_cmd_train)

    diag = add("diagnose", "diagnose a trained run on its test split",
               "Diagnose a run written by `modaldiag train` on its held-out test split "
               "(separability: train vs val); writes report.html, diagnosis.json and CSV tables.")
    diag.add_argument("--run", required=True, help="a folder written by `modaldiag train`")
    diag.add_argument("--out", default=None, help="output folder (default: RUN/diagnosis)")
    diag.set_defaults(func=_cmd_diagnose)

    comp = add("compare", "compare runs side by side",
               "Compare runs of one dataset against the first: every modality's change in test "
               "accuracy, validation curves, learning windows on shared axes, and each run's "
               "saved diagnosis; writes report.html, comparison.json and comparison.csv.")
    comp.add_argument("runs", nargs="+", metavar="RUN",
                      help="run folders of one dataset; the first is the baseline")
    comp.add_argument("--out", default="comparison", help="output folder")
    comp.set_defaults(func=_cmd_compare)

    bench = add("benchmark", "compare methods × datasets × seeds under an equal budget "
                "(resumable)",
                "Train every method on every dataset for every seed under the same budget "
                "(epochs, SGD, batch size, encoders; selection on validation; test evaluated "
                "once), with paired tests against joint training (Holm-corrected). Writes "
                "leaderboard.html, leaderboard.csv, cells.csv and one cached JSON per finished "
                "cell; re-running the same command computes only the missing cells. See "
                "docs/benchmark.md.", parents=(base,))
    bench.add_argument("--data", nargs="+", required=True, metavar="DATA",
                       help="one or more datasets: embedded names (see `modaldiag datasets`), "
                            "'synthetic', MODULE:FUNCTION or path/to/file.py:FUNCTION specs (as "
                            "for `train --data`), or av_folder root folders")
    bench.add_argument("--model", metavar="SPEC", default=None,
                       help="your model: MODULE:FUNCTION or path/to/file.py:FUNCTION taking the "
                            "splits (default: modaldiag's default encoders, concat fusion)")
    bench.add_argument("--methods", type=_methods_list, default="all",
                       help=f"'all' or a comma-separated list of: {', '.join(METHODS)} (joint "
                            "training, the baseline, is always included)")
    bench.add_argument("--seeds", type=_positive_int, default=5,
                       help="number of seeds (0..N-1) per method and dataset")
    bench.add_argument("--epochs", type=_positive_int, default=30, help="epochs of every cell")
    bench.add_argument("--batch-size", type=_positive_int, default=64,
                       help="training batch size of every cell")
    bench.add_argument("--lr", type=_positive_float, default=0.01,
                       help="learning rate of every method (SGD, momentum 0.9) when untuned")
    bench.add_argument("--out", default="bench",
                       help="benchmark folder (new, empty, or an earlier benchmark to resume)")
    bench.add_argument("--jobs", type=_positive_int, default=1,
                       help="cells run in parallel in N local processes (threads per process: "
                            "--threads, default the cores divided by N)")
    bench.add_argument("--backend", type=_choice(("local", "ray"), "backend"),
                       choices=("local", "ray"), default="local", metavar="BACKEND",
                       help="local (processes on this machine) or ray (every cell a Ray task; "
                            "pip install modaldiag[ray])")
    bench.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="the Ray cluster to join (default: $RAY_ADDRESS, else a local "
                            "instance)")
    bench.add_argument("--tune-trials", type=_non_negative_int, default=0, metavar="N",
                       help="tune every method with N Optuna trials on the validation split (the "
                            "same N for every method; pip install modaldiag[tune]); 0: defaults")
    bench.add_argument("--robustness", action="store_true",
                       help="also measure the robustness AUC per modality and corruption on the "
                            "test split")
    bench.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    bench.set_defaults(func=_cmd_benchmark)

    ds = add("datasets", "list the embedded datasets", "List the embedded datasets.",
             parents=(base,))
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
    try:
        from .utils.threads import set_threads

        set_threads(args.threads)
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
                if args.command == "train" else
                "; re-run the same command to resume (finished cells are cached)"
                if args.command == "benchmark" else "")
        print(f"modaldiag: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
