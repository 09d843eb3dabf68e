"""The ``modaldiag`` command line. Thin: parse arguments, call the library.

Exit codes: 0 success, 2 bad arguments or input (a clear message on stderr), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]

DEMO_DATASET = "mfeat-fou-pix"
METHODS = ("joint",)


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


def _load_dataset(name: str):
    from . import datasets

    try:
        return datasets.load(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _train_run(data, method: str, epochs: int, seed: int, out: Path, *, fusion: str,
               batch_size: int, lr: float, device, quiet: bool) -> dict:
    """Train one run into ``out`` (written atomically): history.json, model.pt, figures."""
    import torch

    from .models import default_model
    from .probes import evaluate
    from .report.plots import save_figure, unimodal_accuracy
    from .training import fit
    from .utils.io import atomic_directory, atomic_write_json

    torch.manual_seed(seed)
    model = default_model(data, fusion=fusion)
    train, val, test = data.loaders(batch_size)
    history = fit(model, train, val, epochs=epochs, seed=seed, lr=lr, device=device,
                  progress=not quiet)
    result = evaluate(model, test)
    history.meta["test"] = result.to_dict()
    history.meta.update({"dataset": data.name, "method": method})
    with atomic_directory(out) as tmp:
        history.save(tmp / "history.json")
        torch.save({"model": model.state_dict(), "dataset": data.name, "fusion": fusion,
                    "method": method, "seed": seed}, tmp / "model.pt")
        save_figure(unimodal_accuracy(history), tmp / "unimodal_accuracy")
        atomic_write_json(tmp / "summary.json", {
            "dataset": data.name, "method": method, "epochs": epochs, "seed": seed,
            "test_acc": result.accuracy,
            "test_unimodal_acc": {m: s.accuracy for m, s in result.unimodal.items()},
        })
    return {"history": history, "test": result}


def _cmd_datasets(args) -> int:
    from . import datasets

    for name in datasets.available():
        data = datasets.load(name)
        shapes = ", ".join(f"{m} {s}" for m, s in data.input_shapes.items())
        print(f"{name:22s} n={len(data):6d} classes={data.num_classes:3d}  {shapes}")
    print(f"(any subset of mfeat views also works, e.g. mfeat-fou-kar-mor; views: "
          f"{', '.join(datasets.MFEAT_VIEWS)})")
    return 0


def _cmd_train(args) -> int:
    data = _load_dataset(args.dataset)
    run = _train_run(data, args.method, args.epochs, args.seed, Path(args.out), fusion=args.fusion,
                     batch_size=args.batch_size, lr=args.lr, device=args.device, quiet=args.quiet)
    if not args.quiet:
        t = run["test"]
        uni = ", ".join(f"{m} {s.accuracy:.3f}" for m, s in t.unimodal.items())
        print(f"{args.method} on {data.name}: test accuracy {t.accuracy:.3f} (unimodal: {uni}); "
              f"written to {args.out}")
    return 0


def _cmd_demo(args) -> int:
    data = _load_dataset(args.dataset)
    out = Path(args.out)
    run = _train_run(data, "joint", args.epochs, args.seed, out / "joint", fusion="concat",
                     batch_size=64, lr=0.01, device=args.device, quiet=args.quiet)
    t = run["test"]
    summary = {"dataset": data.name, "test_acc": t.accuracy,
               "test_unimodal_acc": {m: s.accuracy for m, s in t.unimodal.items()}}
    if not args.quiet:
        print(json.dumps(summary, indent=2))
        print(f"history, checkpoint and figures written to {out / 'joint'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modaldiag",
                                     description="Diagnose and repair modality imbalance.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")

    demo = sub.add_parser("demo", parents=[common], help="the main job on an embedded dataset")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--dataset", default=DEMO_DATASET, help=f"default: {DEMO_DATASET}")
    demo.add_argument("--epochs", type=_positive_int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", parents=[common], help="train one run")
    train.add_argument("--dataset", required=True)
    train.add_argument("--method", choices=METHODS, default="joint")
    train.add_argument("--epochs", type=_positive_int, default=30)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--fusion", choices=("concat", "sum", "film", "gated", "late"), default="concat")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument("--lr", type=float, default=0.01)
    train.add_argument("--out", required=True)
    train.set_defaults(func=_cmd_train)

    ds = sub.add_parser("datasets", help="list the embedded datasets")
    ds.set_defaults(func=_cmd_datasets)
    return parser


def _version() -> str:
    from . import __version__

    return f"modaldiag {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"modaldiag: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"modaldiag: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modaldiag: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
