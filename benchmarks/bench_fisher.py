"""Fisher trace speed: vectorised per-sample gradients vs a per-sample backward loop, and the cost
of the online monitor on a training epoch."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import modaldiag as md

from .common import Table, timeit


def _loop_trace(model, loader):
    model.eval()
    total = {m: 0.0 for m in model.modalities}
    n = 0
    for x, y in loader:
        for i in range(y.shape[0]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model({m: t[i:i + 1] for m, t in x.items()}), y[i:i + 1]).backward()
            for m in model.modalities:
                total[m] += sum(float(p.grad.pow(2).sum()) for p in model.encoders[m].parameters()
                                if p.grad is not None)
            n += 1
    return {m: v / n for m, v in total.items()}


def run(quick: bool = False) -> list[Table]:
    n = 256 if quick else 1024
    speed = Table(
        f"Per-sample Fisher trace over N = {n} samples: torch.func (grad + vmap, chunks of 64) vs "
        "a loop of per-sample backward passes",
        ["data / encoders", "M", "vectorised s", "loop s", "speed-up", "max relative difference"],
    )
    for name in ("mfeat-fou-pix", "mfeat", "hapt"):
        data = md.datasets.load(name)
        torch.manual_seed(0)
        model = md.models.default_model(data)
        sub = data.train.subset(range(n))
        loader = sub.loader(256)
        t_vec = timeit(lambda model=model, loader=loader: md.fisher_trace(model, loader, chunk_size=64),
                       repeat=1)
        t0 = time.perf_counter()
        ref = _loop_trace(model, loader)
        t_loop = time.perf_counter() - t0
        vec = md.fisher_trace(model, loader, chunk_size=64)
        diff = max(abs(vec[m] - ref[m]) / max(abs(ref[m]), 1e-12) for m in ref)
        kind = "1-D CNN" if name == "hapt" else "MLP"
        speed.rows.append([f"{name} / {kind}", len(data.modalities), t_vec, t_loop, t_loop / t_vec, diff])

    overhead = Table(
        "Online Fisher monitor: training epoch time with and without it (md.fit, 1 epoch, "
        "median of 3)",
        ["dataset", "without monitor s", "with monitor s", "overhead"],
    )
    for name in ("mfeat-fou-pix", "hapt"):
        data = md.datasets.load(name)
        loader = data.train.loader(64)
        times = {}
        for monitor in (False, True):
            torch.manual_seed(0)
            model = md.models.default_model(data)
            times[monitor] = timeit(lambda model=model, monitor=monitor, loader=loader: md.fit(
                model, loader, epochs=1, monitor=monitor, progress=False, seed=0),
                repeat=3 if not quick else 1)
        overhead.rows.append([name, times[False], times[True], f"{100 * (times[True] / times[False] - 1):+.1f} %"])
    return [speed, overhead]
