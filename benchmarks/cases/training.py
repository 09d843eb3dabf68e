"""Reliability cases for ``md.fit``: it fails loudly on diverged weights, refuses arguments,
optimizers and checkpoints it cannot use, and says what to do with awkward loaders."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

import modaldiag as md
from modaldiag.datasets import MultimodalDataset
from modaldiag.models import MLPEncoder
from modaldiag.utils.io import safe_torch_load

from . import Case

AREA = "training"


@functools.cache
def _data():
    """112 training / 24 validation samples, modalities m0 (5 features) and m1 (6), 3 classes."""
    return md.datasets.synthetic(n_samples=160, num_classes=3, strength={"m0": 2.0, "m1": 0.6},
                                 dims={"m0": 5, "m1": 6}, seed=0)


def _model(in_dim: int = 5, seed: int = 0) -> md.MultimodalClassifier:
    torch.manual_seed(seed)
    enc = {"m0": MLPEncoder(in_dim, 4, hidden=(8,)), "m1": MLPEncoder(6, 5, hidden=(8,))}
    return md.MultimodalClassifier(enc, {"m0": 4, "m1": 5}, 3)


def _bn_model() -> md.MultimodalClassifier:
    torch.manual_seed(0)

    def enc():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())

    return md.MultimodalClassifier({"a": enc(), "b": enc()}, {"a": 8, "b": 8}, 3)


def _bn_data(n: int, huge: bool = False) -> MultimodalDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    xa = x.clone()
    if huge:
        xa[0] = 1e20  # finite, but its variance overflows float32
    return MultimodalDataset({"a": xa, "b": x}, torch.arange(n) % 3, num_classes=3)


def _nan_bn_data() -> MultimodalDataset:
    data = _bn_data(32)
    data.inputs["a"][20, 2] = float("nan")  # in the second batch of 16
    return data


def _frozen_batchnorm():
    model = _bn_model()
    bn = model.encoders["a"][1]
    bn.eval()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    data = _bn_data(32)
    _fit(model, data.loader(8, shuffle=True), data.loader(16), epochs=2,
         regulator=md.Relearning(every=1))
    return bn, before


def _frozen_batchnorm_check(result) -> tuple[bool, str]:
    bn, (mean, var) = result
    same = torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    return (same and not bn.training,
            f"after 2 epochs: still eval mode: {not bn.training}; running stats unchanged: {same} "
            f"(batches tracked {int(bn.num_batches_tracked)})")


def _fit(model, loader, val=None, **kw):
    kw = {"progress": False, "monitor": False, "epochs": 1, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return md.fit(model, loader, val, **kw)


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _lr_inf():
    model = _model()
    data = _data()
    _fit(model, data.train.loader(len(data.train.labels)),
         optimizer=torch.optim.SGD(model.parameters(), lr=float("inf")))


def _diverge_then_resume(folder: Path):
    data = _data()
    model = _model()
    _fit(model, data.train.loader(16), data.val.loader(64), lr=0.05, checkpoint_dir=folder)
    try:
        _fit(model, data.train.loader(16), data.val.loader(64), epochs=3, lr=1e30,
             checkpoint_dir=folder, resume=True)
        raised = "nothing"
    except ValueError as exc:
        raised = str(exc)[:60]
    last, best = safe_torch_load(folder / "last.pt"), safe_torch_load(folder / "best.pt")
    return {"raised": raised, "last_epoch": last["epoch"], "last_finite": _finite(last["model"]),
            "best_finite": _finite(best["model"])}


def _diverged_check(r):
    ok = (r["raised"] != "nothing" and r["last_epoch"] == 1 and r["last_finite"]
          and r["best_finite"])
    return ok, (f"lr=1e30 after a good epoch raised ({r['raised']}...); last.pt holds epoch "
                f"{r['last_epoch']} (finite: {r['last_finite']}), best.pt finite: "
                f"{r['best_finite']}")


def _checkpoint(folder: Path, **kw) -> Path:
    if not (folder / "last.pt").exists():
        _fit(_model(), _data().train.loader(32), checkpoint_dir=folder, **kw)
    return folder


def _batch_of_one():
    model = _bn_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = md.fit(model, _bn_data(33).loader(16), epochs=2, progress=False, monitor=False)
    return hist, model, [str(w.message) for w in caught if "ONE sample" in str(w.message)]


def _batch_of_one_check(result):
    hist, model, warned = result
    skipped = [r["train"]["skipped_batch_of_one"] for r in hist.epochs]
    n = [r["train"]["n"] for r in hist.epochs]
    tracked = int(model.encoders["a"][1].num_batches_tracked)
    ok = skipped == [1, 1] and n == [32, 32] and tracked == 4 and len(warned) == 2
    return ok, (f"33 samples in batches of 16: last batch of one skipped per epoch {skipped}, "
                f"samples trained {n}, BatchNorm updates {tracked} (2 per epoch), "
                f"{len(warned)} warnings")


def cases(tmp: Path) -> list[Case]:
    """The training area's cases (``tmp``: a scratch folder for checkpoints)."""
    tmp = Path(tmp)

    def case(name, run, **kw):
        return Case(AREA, name, run, **kw)

    return [
        case("optimizer with lr=inf: fit raises naming the epoch, parameter and encoder",
             _lr_inf, raises=ValueError,
             match=r"weights became non-finite .*epoch 0: parameter 'encoders\.m0\.net\.0\.weight' "
                   r"of the encoder of modality 'm0'.*lower learning rate"),
        case("fit(lr=inf) refused before any work", lambda: _fit(
            _model(), _data().train.loader(16), lr=float("inf")), raises=ValueError,
             match=r"fit: lr must be a finite number in \(0, inf\); got inf"),
        case("lr=1e30 diverges after a good epoch: raises, last.pt keeps the good epoch, best.pt "
             "finite", lambda: _diverge_then_resume(tmp / "diverge"), check=_diverged_check),
        case("lr=1e30 with on_nonfinite='skip': a model overflowing on finite inputs still raises",
             lambda: _fit(_model(), _data().train.loader(16), lr=1e30, on_nonfinite="skip"),
             raises=ValueError, match=r"diverged in epoch 0.*inputs are finite"),
        case("BatchNorm running_var overflowing to inf (finite loss) raises naming the buffer",
             lambda: _fit(_bn_model(), _bn_data(32, huge=True).loader(32)), raises=ValueError,
             match=r"buffer 'encoders\.a\.1\.running_var' of the encoder of modality 'a'"),
        case("NaN input poisoning BatchNorm statistics raises even with on_nonfinite='skip'",
             lambda: _fit(_bn_model(), _nan_bn_data().loader(16), on_nonfinite="skip"),
             raises=ValueError, match=r"at batch 1, whose input of modality 'a' contains NaN/inf"
                                      r".*buffer 'encoders\.a\.1\.running_mean'"),
        case("max_grad_norm=0 refused", lambda: _fit(
            _model(), _data().train.loader(16), max_grad_norm=0.0), raises=ValueError,
             match=r"fit: max_grad_norm must be a finite number in \(0, inf\)"),
        case("unimodal_loss_weight=NaN refused", lambda: _fit(
            _model(), _data().train.loader(16), unimodal_loss_weight=float("nan")),
             raises=ValueError, match=r"fit: unimodal_loss_weight must be a finite number in \[0"),
        case("seed=-1 refused", lambda: _fit(_model(), _data().train.loader(16), seed=-1),
             raises=ValueError, match=r"fit: seed must be an integer in \[0, 2\*\*63 - 1\]"),
        case("optimizer over another model's parameters refused", lambda: _fit(
            _model(), _data().train.loader(16),
            optimizer=torch.optim.SGD(_model(seed=1).parameters(), lr=0.1)), raises=ValueError,
             match=r"covers 0 of the model's 10 trainable parameter tensors"),
        case("resume with another model refused, naming the key and shapes", lambda: _fit(
            _model(in_dim=7), _data().train.loader(32), epochs=2, resume=True,
            checkpoint_dir=_checkpoint(tmp / "plain")), raises=ValueError,
             match=r"written for another model: 'encoders\.m0\.net\.0\.weight' has shape \(8, 5\) "
                   r"in the checkpoint but \(8, 7\)"),
        case("resume with another optimizer (Adam for SGD) refused", lambda: _fit(
            (m := _model()), _data().train.loader(32), epochs=2, resume=True,
            optimizer=torch.optim.Adam(m.parameters()), checkpoint_dir=_checkpoint(tmp / "plain")),
             raises=ValueError, match=r"written for another optimizer: SGD, but this call uses Adam"),
        case("resume without its regulator refused, naming both", lambda: _fit(
            _model(), _data().train.loader(32), epochs=2, resume=True,
            checkpoint_dir=_checkpoint(tmp / "ogm", regulator=md.OGM(alpha=0.8))),
             raises=ValueError,
             match=r"regulated by \[.OGM\(alpha=0\.8.*but this call passes no regulator"),
        case("a last batch of ONE sample with BatchNorm: skipped with a warning, counted",
             _batch_of_one, check=_batch_of_one_check),
        case("every batch of ONE sample with BatchNorm refused", lambda: _fit(
            _bn_model(), _bn_data(6).loader(1)), raises=ValueError,
             match=r"every training batch of epoch 0 held ONE sample.*batch size of at least 2"),
        case("a BatchNorm the user froze (eval mode) stays frozen through fit with Re-learning",
             _frozen_batchnorm, check=_frozen_batchnorm_check),
        case("a loader yielding (audio, video, label) tuples gets the adapter recipe", lambda: _fit(
            _model(), [(torch.randn(8, 5), torch.randn(8, 6), torch.arange(8) % 3)]),
             raises=ValueError, match=r"tuple of 3 items.*md\.datasets\.adapt_loader\(loader"),
    ]
