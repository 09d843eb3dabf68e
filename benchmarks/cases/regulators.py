"""Reliability cases for the regulators: a reused regulator starts afresh, randomness advances
with the step in a plain loop, arguments are validated, and misuse gets an error that says what
to do."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.models import MLPEncoder
from modaldiag.training.callbacks import StepContext

from . import Case

AREA = "regulators"


@functools.cache
def _data():
    """112 training / 24 validation samples, modalities a (6 features) and b (6), 3 classes."""
    return md.datasets.synthetic(n_samples=160, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 6, "b": 6}, seed=2)


def _model(seed: int = 0, names: tuple[str, str] = ("a", "b")) -> md.MultimodalClassifier:
    torch.manual_seed(seed)
    enc = {n: MLPEncoder(6, 4, hidden=(8,)) for n in names}
    return md.MultimodalClassifier(enc, dict.fromkeys(names, 4), 3)


def _fit(model, regulator, epochs: int = 2):
    data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val = data.val.loader(64) if isinstance(regulator, md.Relearning) else None
        md.fit(model, data.train.loader(32), val, epochs=epochs,
               regulator=regulator, monitor=False, restore_best=False, progress=False, seed=0)
    return model


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _reuse(make, epochs: int):
    reused = make()
    _fit(_model(), reused, epochs)
    second = _fit(_model(), reused, epochs)
    fresh = _fit(_model(), make(), epochs)
    return _max_diff(second, fresh)


def _weights_equal(diff: float) -> tuple[bool, str]:
    return diff == 0.0, f"max |second run - run with a new object| = {diff:.3g}"


def _plain_loop_noise():
    """OGM-GE (alpha=0: noise only) in the README loop, no batch_end, 3 steps on one batch."""
    x, y = next(iter(_data().train.loader(32)))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []

    class Before(md.Callback):
        def on_before_optimizer_step(self, ctx):
            seen.append(ctx.model.encoders["a"].net[0].weight.grad.clone())

    class After(md.Callback):
        def on_before_optimizer_step(self, ctx):
            g = ctx.model.encoders["a"].net[0].weight.grad
            seen[-1] = (g - seen[-1]) / seen[-1].std()  # noise in units of std(g)

    run = md.Regulation(model, opt, [Before(), md.OGM(alpha=0.0, noise=True), After()])
    run.epoch_start(0, [(x, y)] * 3)
    for _ in range(3):
        opt.zero_grad()
        run.backward(x, y)
        opt.step()
    return [float((seen[i] - seen[i + 1]).abs().mean()) for i in range(2)]


def _plain_loop_masks():
    x, y = next(iter(_data().train.loader(32)))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opm = md.OPM(q_base=0.5, p_exe=1.0)
    run = md.Regulation(model, opt, opm)
    run.epoch_start(0, [(x, y)] * 3)
    masks = []
    for _ in range(3):
        opt.zero_grad()
        run.backward(x, y)
        opt.step()
        masks.append(opm.last_mask.clone())
    return [int((masks[i] != masks[i + 1]).sum()) for i in range(2)]


def _plain_loop_vs_fit():
    data = _data()
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    md.fit(ref, data.train.loader(32), epochs=2, optimizer=opt, regulator=md.OGM(noise=True),
           monitor=False, seed=None, progress=False)
    net = _model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run = md.Regulation(net, opt, md.OGM(noise=True))
    for epoch in range(2):
        for inputs, labels in run.epoch_start(epoch, data.train.loader(32)):
            opt.zero_grad()
            run.backward(inputs, labels)
            opt.step()
        run.epoch_end()
    return _max_diff(ref, net)


def _foreign_optimizer():
    model, other = _model(), _model(seed=1)
    md.Regulation(model, torch.optim.SGD(other.parameters(), lr=0.1), md.OGM())


def _missing_encoder():
    model = _model()
    params = [p for n, p in model.named_parameters() if not n.startswith("encoders.b.")]
    md.Regulation(model, torch.optim.SGD(params, lr=0.1), md.OGM())


def _backward_before_epoch_start():
    x, y = next(iter(_data().train.loader(8)))
    model = _model()
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), md.InfoReg())
    run.backward(x, y)


def _data_parallel_mmpareto():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    md.Regulation(nn.DataParallel(model), opt, md.MMPareto())


def _tuple_batch():
    x, y = next(iter(_data().train.loader(8)))
    model = _model()
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1))
    run.epoch_start(0, [])
    run.backward(x["a"], y)


def _nan_encoder():
    x, y = next(iter(_data().train.loader(8)))
    model = _model()
    with torch.no_grad():
        model.encoders["b"].net[0].weight[0, 0] = float("nan")
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), md.OPM())
    run.epoch_start(0, [])
    run.backward(x, y)


def _head_named_modality():
    """OGM on a model whose first modality is literally named "__head__", made dominant."""
    model = _model(names=("__head__", "b"))
    with torch.no_grad():  # b's features do not reach the logits
        model.fusion.fc.weight[:, 4:] = 0
        model.fusion.fc.bias.zero_()
    x, _ = next(iter(_data().train.loader(16)))
    x = {"__head__": x["a"], "b": x["b"]}
    feats = model.encode(x)
    y = model.head(feats, present=("__head__",)).argmax(1).detach()
    ctx = StepContext(model=model, inputs=x, labels=y, features=feats, logits=model.head(feats))
    ctx.compute_unimodal_logits()
    reg = md.OGM(alpha=0.5)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    k = reg.coefficients["__head__"]
    head = max(float((p.grad - before[n]).abs().max()) for n, p in model.named_parameters()
               if n.startswith("fusion."))
    enc = max(float((p.grad - k * before[n]).abs().max()) for n, p in model.named_parameters()
              if n.startswith("encoders.__head__."))
    return k, head, enc


def cases(tmp: Path) -> list[Case]:
    return [
        Case(AREA, "InfoReg reused for a second fit (fresh identical model)",
             lambda: _reuse(md.InfoReg, 3), check=_weights_equal),
        Case(AREA, "Relearning reused for a second fit: re-initialises again, toward the new init",
             lambda: _reuse(lambda: md.Relearning(every=1, max_resets=1), 2), check=_weights_equal),
        Case(AREA, "plain loop without batch_end: OGM-GE noise at steps 0, 1, 2",
             _plain_loop_noise,
             check=lambda d: (min(d) > 0.5, "mean |noise_t - noise_t+1| / std(g) = "
                                            + ", ".join(f"{v:.2f}" for v in d) + " (same noise: 0)")),
        Case(AREA, "plain loop without batch_end: OPM drop masks at steps 0, 1, 2",
             _plain_loop_masks,
             check=lambda d: (min(d) > 0, f"samples whose mask changed between steps: {d} of 32")),
        Case(AREA, "plain loop (no batch_end) vs md.fit with OGM-GE, 2 epochs",
             _plain_loop_vs_fit,
             check=lambda d: (d <= 1e-6, f"max |weight difference| = {d:.3g}")),
        Case(AREA, "MMPareto(gamma=-1) (gradient ascent)", lambda: md.MMPareto(gamma=-1.0),
             raises=ValueError, match=r"MMPareto: gamma must be a finite number in \(0, inf\)"),
        Case(AREA, "OGM(alpha=nan)", lambda: md.OGM(alpha=float("nan")),
             raises=ValueError, match=r"OGM: alpha"),
        Case(AREA, "OGM(start_epoch=5, end_epoch=3) (empty window)",
             lambda: md.OGM(start_epoch=5, end_epoch=3),
             raises=ValueError, match=r"end_epoch must be greater"),
        Case(AREA, "OPM(p_exe=0) (never modulates)", lambda: md.OPM(p_exe=0.0),
             raises=ValueError, match=r"OPM: p_exe"),
        Case(AREA, "Relearning(every=0)", lambda: md.Relearning(every=0),
             raises=ValueError, match=r"Relearning: every"),
        Case(AREA, "ValuationResampling(subset=1.5)", lambda: md.ValuationResampling(subset=1.5),
             raises=ValueError, match=r"ValuationResampling: subset"),
        Case(AREA, "Regulation(accumulate_grad_batches=0)",
             lambda: md.Regulation(_model(), torch.optim.SGD(_model().parameters(), lr=0.1),
                                   accumulate_grad_batches=0),
             raises=ValueError, match=r"Regulation: accumulate_grad_batches"),
        Case(AREA, "optimizer over another model's parameters", _foreign_optimizer,
             raises=ValueError, match=r"covers 0 of the model's \d+ trainable"),
        Case(AREA, "optimizer missing every parameter of encoder 'b'", _missing_encoder,
             raises=ValueError, match=r"none of the \d+ trainable parameter tensors of encoder 'b'"),
        Case(AREA, "Regulation.backward before epoch_start", _backward_before_epoch_start,
             raises=ValueError, match=r"before epoch_start.*run\.epoch_start\(epoch, train_loader\)"),
        Case(AREA, "nn.DataParallel model with MMPareto", _data_parallel_mmpareto,
             raises=ValueError, match=r"DistributedDataParallel.*model\.module"),
        Case(AREA, "plain loop given a bare tensor instead of the inputs dict", _tuple_batch,
             raises=ValueError, match=r"adapt_loader"),
        Case(AREA, "encoder with a NaN weight (finite inputs)", _nan_encoder,
             raises=ValueError,
             match=r"encoder 'b' \(MLPEncoder\) produced NaN/inf features from finite inputs"),
        Case(AREA, "OGM on a modality named \"__head__\"", _head_named_modality,
             check=lambda r: (r[0] < 1 and r[1] == 0.0 and r[2] <= 1e-6,
                              f"k('__head__') = {r[0]:.3f}; fusion head gradient change "
                              f"{r[1]:.3g}; encoder grad - k * grad = {r[2]:.3g}")),
    ]
