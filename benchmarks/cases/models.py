"""The model contract, modality names, datasets and the audio-visual folder loader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

import modaldiag as md
from modaldiag.models import MLPEncoder

from . import Case

AREA = "models"


class _Head(nn.Module):
    """A fusion head with a deliberately wrong output: ``fn(logits (B, out))``."""

    def __init__(self, out: int, fn):
        super().__init__()
        self.fc, self.fn = nn.Linear(8, out), fn

    def forward(self, f):
        return self.fn(self.fc(torch.cat([f["a"], f["b"]], 1)))


def _model(names=("a", "b"), fusion="concat", num_classes=3):
    torch.manual_seed(0)
    return md.MultimodalClassifier({n: MLPEncoder(3, 4, hidden=(6,)) for n in names},
                                   {n: 4 for n in names}, num_classes, fusion=fusion)


def _inputs(names=("a", "b"), batch=8):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(batch, 3, generator=g) for n in names}


def _bad_head(out, fn):
    base = _model()
    return md.MultimodalClassifier(dict(base.encoders), base.feature_dims, 3, fusion=_Head(out, fn))


def _wrapped_flat():
    net = _model()
    return md.wrap(net, {"a": net.encoders["a"], "b": net.encoders["b"]},
                   head=lambda f: net.fusion(f)[:, 0])


def _av_fixture(root: Path, n=4, lengths=None):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    (root / "visual").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        clip = f"c{i}"
        rows.append(f"{clip},{'XY'[i % 2]}")
        t = 10 if lengths is None else lengths[i]
        np.save(root / "audio" / f"{clip}.npy", rng.standard_normal((6, t)).astype(np.float32))
        (root / "visual" / clip).mkdir(exist_ok=True)
        for f in range(2):
            Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(
                root / "visual" / clip / f"f{f}.png")
    for split in ("train", "test"):
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _symlink_escape(tmp: Path):
    from PIL import Image

    root = _av_fixture(tmp / "symlink" / "root")
    secret = tmp / "symlink" / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    frame = root / "visual" / "c0" / "f1.png"
    frame.unlink()
    frame.symlink_to(secret)
    return md.datasets.AVFolderDataset(root, num_frames=2, image_size=8)[0]


def _header_kept(tmp: Path):
    root = _av_fixture(tmp / "header")
    (root / "label.csv").write_text("c0,label\nc1,class\nc2,label\nc3,class\n")
    return md.datasets.AVFolderDataset(root, "label.csv", num_frames=2, image_size=8)


def _absurd_header(tmp: Path):
    root = _av_fixture(tmp / "absurd")
    with open(root / "audio" / "c2.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": (1 << 30, 1 << 30)})
        fh.write(b"\0" * 32)
    return md.datasets.AVFolderDataset(root, num_frames=2, image_size=8)


def _single_clip(tmp: Path):
    root = _av_fixture(tmp / "single")
    (root / "one.csv").write_text("c0,X\n")
    return md.datasets.av_folder(root, train_csv="one.csv", num_frames=2, image_size=8)


def _name_keys():
    model = _model(("keys", "type"), fusion="late")
    x = _inputs(("keys", "type"))
    fresh = _model(("keys", "type"), fusion="late")
    fresh.load_state_dict(model.state_dict())
    return model, x, fresh


def _check_keys(result):
    model, x, fresh = result
    enc = model.encoders["keys"]
    ok = (isinstance(enc, MLPEncoder) and list(model.encoders) == ["keys", "type"]
          and model(x).shape == (8, 3) and torch.equal(fresh(x), model(x)))
    return ok, (f"model.encoders['keys'] is the {type(enc).__name__}; list(model.encoders) = "
                f"{list(model.encoders)}; logits {tuple(model(x).shape)}; state_dict round trip "
                f"{'identical' if torch.equal(fresh(x), model(x)) else 'differs'}")


def _mathtext_legend():
    names = ("$x^$", "_aux")
    data = md.datasets.synthetic(n_samples=60, num_classes=2, strength={names[0]: 2.0, names[1]: 0.5},
                                 dims=3, seed=0)
    model = md.models.default_model(data, feature_dim=4)
    history = md.fit(model, data.train.loader(32), val_loader=data.val.loader(32), epochs=1,
                     monitor=False, seed=0, progress=False)
    fig = md.plot.unimodal_accuracy(history)
    fig.savefig(io.BytesIO(), format="png", dpi=30)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    import matplotlib.pyplot as plt

    plt.close(fig)
    return texts


def _adapted_epochs():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 2
    ds = torch.utils.data.TensorDataset(torch.randn(24, 3, generator=g) + y[:, None],
                                        torch.randn(24, 3, generator=g), y)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    seen = []

    def fn(b):
        seen.append(len(b[2]))
        return {"a": b[0], "b": b[1]}, b[2]

    adapted = md.datasets.adapt_loader(loader, fn)
    model = _model(num_classes=2)
    history = md.fit(model, adapted, epochs=3, monitor=False, seed=0, progress=False)
    return len(adapted), len(history.epochs), sum(seen)


def cases(tmp: Path) -> list[Case]:
    x = _inputs()

    def refused(name, run, match, raises=ValueError):
        return Case(AREA, name, run, raises=raises, match=match)

    def holds(name, run, check):
        return Case(AREA, name, run, check=check)

    return [
        refused("head returns logits (B,)", lambda: _bad_head(1, lambda z: z[:, 0])(x),
                r"logits of shape \(8,\); expected \(B, num_classes\) = \(8, 3\)"),
        refused("head returns fewer logits than classes", lambda: _bad_head(2, lambda z: z)(x),
                r"shape \(8, 2\); expected \(B, num_classes\) = \(8, 3\).*num_classes=3"),
        refused("head returns another batch size", lambda: _bad_head(3, lambda z: z[:1])(x),
                r"shape \(1, 3\) for a batch of 8 samples"),
        refused("wrapped head returns (B,) (md.wrap)", lambda: _wrapped_flat()(x),
                r"logits of shape \(8,\); expected \(B, num_classes\) = \(8, C\)"),
        holds("modality names 'keys' and 'type' (ModuleDict attributes)", _name_keys, _check_keys),
        holds("names '$x^$' and '_aux' in a figure legend", _mathtext_legend,
              lambda texts: (texts == ["fused", "$x^$", "_aux"], f"legend texts {texts}")),
        refused("modality name containing '.'",
                lambda: _model(("a.b", "c")), r"may not contain '\.'"),
        refused("float labels 2.7 in MultimodalDataset",
                lambda: md.datasets.MultimodalDataset({"a": np.zeros((3, 2)), "b": np.zeros((3, 2))},
                                                      np.array([0.0, 2.7, 1.0])),
                r"non-integral value 2\.7 at index 1"),
        holds("integral float labels 2.0 become class 2",
              lambda: md.datasets.MultimodalDataset({"a": np.zeros((3, 2)), "b": np.zeros((3, 2))},
                                                    np.array([0.0, 2.0, 1.0])).labels,
              lambda y: (y.dtype == torch.long and y.tolist() == [0, 2, 1],
                         f"labels {y.tolist()} ({y.dtype})")),
        refused("NaN label", lambda: md.datasets.MultimodalDataset(
            {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, np.array([0.0, np.nan])), r"NaN"),
        refused("label >= num_classes", lambda: md.datasets.MultimodalDataset(
            {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, [0, 3], num_classes=3),
            r"labels must lie in \[0, 3\)"),
        refused("modalities with different sample counts", lambda: md.datasets.MultimodalDataset(
            {"a": np.zeros((3, 2)), "b": np.zeros((2, 2))}, [0, 1, 0]),
            r"labels have 3 rows but the modalities have \{'a': 3, 'b': 2\}"),
        refused("empty dataset", lambda: md.datasets.MultimodalDataset(
            {"a": np.zeros((0, 2)), "b": np.zeros((0, 2))}, []), r"empty \(0 samples\)"),
        refused("synthetic with negative strength",
                lambda: md.datasets.synthetic(strength={"a": -1.0, "b": 1.0}),
                r"strength\['a'\] must be a finite number in \[0"),
        refused("num_classes=1 for MultimodalClassifier", lambda: _model(num_classes=1),
                r"num_classes must be an integer in \[2"),
        refused("av_folder: frame file symlinked outside the root", lambda: _symlink_escape(tmp),
                r"frame file .* escapes the dataset root.*symlink"),
        holds("av_folder: first CSV row with label 'label' is data", lambda: _header_kept(tmp),
              lambda ds: (len(ds) == 4 and ds.rows[0] == ("c0", "label"),
                          f"{len(ds)} clips, first row {ds.rows[0]}")),
        refused("av_folder: clips of different lengths",
                lambda: md.datasets.AVFolderDataset(_av_fixture(tmp / "ragged", lengths=[10, 11, 10, 10])),
                r"clips differ in length.*'c1' has \(6, 11\).*audio_length"),
        refused("av_folder: absurd .npy header (2^60 float64)", lambda: _absurd_header(tmp),
                r"c2\.npy.*header claims shape \(1073741824, 1073741824\).*file holds 32 bytes"),
        refused("av_folder: a single training clip", lambda: _single_clip(tmp),
                r"lists 1 clip; av_folder needs at least 2"),
        refused("av_folder: num_frames=0", lambda: md.datasets.av_folder(
            _av_fixture(tmp / "frames0"), num_frames=0), r"num_frames must be an integer in \[1"),
        holds("adapt_loader: tuple loader trains 3 epochs", _adapted_epochs,
              lambda r: (r == (3, 3, 72), f"len {r[0]} batches, {r[1]} epochs, {r[2]} samples adapted")),
        refused("adapt_loader over a generator", lambda: md.datasets.adapt_loader(
            (b for b in [(x["a"], x["b"], torch.zeros(8))]), lambda b: b), r"one-shot generator"),
    ]
