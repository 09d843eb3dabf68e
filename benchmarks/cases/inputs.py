"""Bad inputs at the public boundary: each must give an error that names the problem."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch
from torch import nn

import modaldiag as md
from modaldiag.cli import main as cli_main
from modaldiag.utils.io import safe_torch_load

from . import Case

AREA = "inputs"


def cases(tmp: Path) -> list[Case]:
    data = md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 4, "b": 4}, seed=0)
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=4)
    x, y = next(iter(data.train.loader(16)))
    nan = {k: v.clone() for k, v in x.items()}
    nan["b"][3, 1] = float("nan")

    class Leaky(md.MultimodalClassifier):
        def head(self, features, present=None):
            return self.fuse(features)

    leaky = Leaky(dict(model.encoders), model.feature_dims, 3)

    def fit(loader, **kw):
        return md.fit(model, loader, epochs=1, progress=False, **kw)

    (tmp / "audio").mkdir(exist_ok=True)
    (tmp / "visual").mkdir(exist_ok=True)
    (tmp / "latin1.csv").write_bytes("clip,étiquette\n".encode("latin-1"))
    (tmp / "escape.csv").write_text("../../etc/passwd,ANG\n")
    (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp / "evil.pt").write_bytes(pickle.dumps(Evil()))
    single = data.train.subset(torch.nonzero(data.train.labels == 0).flatten()).loader(16)

    def case(name, run, match, raises=ValueError):
        return Case(AREA, name, run, raises=raises, match=match)

    def cli(argv):
        return lambda: sys.exit(cli_main(argv))

    return [
        case("wrong modality name in the batch", lambda: fit([({"a": x["a"], "video": x["b"]}, y)]),
             r"missing \['b'\].*unexpected \['video'\]"),
        case("extra modality in the batch", lambda: fit([({**x, "c": x["a"]}, y)]), r"unexpected \['c'\]"),
        case("batch sizes differ between modalities",
             lambda: fit([({"a": x["a"], "b": x["b"][:5]}, y)]), r"batch sizes differ"),
        case("float64 input for a float32 encoder",
             lambda: model({"a": x["a"].double(), "b": x["b"]}), r"modality 'a'.*float64"),
        case("input of the wrong width", lambda: model({"a": x["a"][:, :2], "b": x["b"]}),
             r"modality 'a'.*shape \(16, 2\)"),
        case("labels outside [0, C)", lambda: fit([(x, y + 5)]), r"\[0, 3\)"),
        case("float labels in a batch", lambda: fit([(x, y.float())]), r"integer class indices"),
        case("empty loader", lambda: fit([]), r"empty"),
        case("a single class", lambda: fit(single), r"single class"),
        case("NaN in one modality's input", lambda: fit([(nan, y)]), r"modality 'b'.*NaN"),
        case("M < 2 modalities",
             lambda: md.MultimodalClassifier({"a": nn.Linear(2, 2)}, {"a": 2}, 3), r"at least 2"),
        case("a head that ignores present=", lambda: md.shapley(leaky, [(x, y)]), r"ignores present"),
        case("unknown fusion", lambda: md.MultimodalClassifier(dict(model.encoders), model.feature_dims,
                                                              3, fusion="attention"), r"fusion"),
        case("unknown Shapley value function", lambda: md.shapley(model, [(x, y)], value="accuracy"),
             r"value"),
        case("unknown dataset name", lambda: md.datasets.load("cremad"), r"unknown dataset 'cremad'"),
        case("resume without a checkpoint folder", lambda: fit([(x, y)], resume=True), r"checkpoint_dir"),
        case("Re-learning without held-out data",
             lambda: md.fit(model, [(x, y)], epochs=1, regulator=md.Relearning(every=1), progress=False),
             r"held-out"),
        case("OGM combined with MMPareto", lambda: fit([(x, y)], regulator=[md.OGM(), md.MMPareto()]),
             r"cannot be combined"),
        case("clip list that is not UTF-8", lambda: md.datasets.AVFolderDataset(tmp, "latin1.csv"),
             r"not UTF-8"),
        case("clip id escaping the dataset root",
             lambda: md.datasets.AVFolderDataset(tmp, "escape.csv")[0], r"escapes|outside"),
        case("corrupt checkpoint", lambda: safe_torch_load(tmp / "corrupt.pt"), r"cannot load checkpoint"),
        case("checkpoint holding a code-running pickle", lambda: safe_torch_load(tmp / "evil.pt"),
             r"cannot load checkpoint.*safely"),
        case("CLI: --epochs 0", cli(["train", "--dataset", "hapt", "--epochs", "0",
                                     "--out", str(tmp / "x")]), r"exit code 2: .*positive integer",
             raises=SystemExit),
        case("CLI: unknown dataset", cli(["train", "--dataset", "nope", "--out", str(tmp / "x"),
                                          "--quiet"]), r"exit code 2: .*unknown dataset",
             raises=SystemExit),
        case("CLI: diagnose a folder that is not a run", cli(["diagnose", "--run", str(tmp)]),
             r"exit code 2: .*not a modaldiag run", raises=SystemExit),
    ]
