"""Fisher trace speed: every per-sample engine of ``md.fisher_trace`` side by side (``hooks``: layer
inputs x output gradients from one backward per batch; ``vmap``: torch.func per-sample gradients;
``loop``: one backward per sample, the reference), each row labelled with the engine that actually
ran (``FisherTrace.engine``), and the cost of the online monitor on a training epoch."""

from __future__ import annotations

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


ENGINES = ("hooks", "vmap", "loop")


def _engine_row(model, loader, engine: str, ref: dict, t_loop_ref: float | None, quick: bool):
    """[engine requested, engine that ran, seconds, speed-up vs the library loop, max rel. diff]."""
    try:
        trace = md.fisher_trace(model, loader, chunk_size=64, engine=engine)
    except ValueError as exc:  # e.g. hooks refused for a layer they cannot make exact
        return [engine, f"refused: {str(exc)[:120]}", "—", "—", "—"], None
    t = timeit(lambda: md.fisher_trace(model, loader, chunk_size=64, engine=engine),
               repeat=1 if quick or engine == "loop" else 3, warmup=0 if engine == "loop" else 1)
    diff = max(abs(trace[m] - ref[m]) / max(abs(ref[m]), 1e-12) for m in ref)
    return [engine, trace.engine, t, "—" if t_loop_ref is None else t_loop_ref / t, diff], t


def run(quick: bool = False) -> list[Table]:
    n = 128 if quick else 1024
    speed = Table(
        f"Per-sample Fisher trace over N = {n} samples, every engine of md.fisher_trace "
        "(engine = what FisherTrace.engine reports actually ran)",
        ["data / encoders", "M", "engine requested", "engine (FisherTrace.engine)", "seconds",
         "speed-up vs loop", "max relative difference vs independent loop"],
        note="hooks: per-sample gradient norms from each Linear/Conv/BatchNorm layer's inputs and "
             "output gradients, one backward per batch of 256 (what engine='auto' picks for these "
             "encoders); vmap: torch.func grad + vmap in chunks of 64; loop: the library's one "
             "backward per sample (the reference for speed-up). The last column compares each "
             "engine with an independent per-sample backward loop written in this benchmark. "
             + ("Quick mode: one timing per engine. " if quick else
                "Median of 3 timings after a warm-up (the loop: one timing). "),
    )
    for name in ("mfeat-fou-pix", "mfeat", "hapt"):
        data = md.datasets.load(name)
        torch.manual_seed(0)
        model = md.models.default_model(data)
        sub = data.train.subset(range(n))
        loader = sub.loader(256)
        ref = _loop_trace(model, loader)
        kind = "1-D CNN" if name == "hapt" else "MLP"
        rows = {}
        for engine in ("loop", "hooks", "vmap"):  # loop first: the speed-up reference
            t_loop = rows["loop"][1] if "loop" in rows else None
            rows[engine] = _engine_row(model, loader, engine, ref, t_loop, quick)
        auto = md.fisher_trace(model, loader, chunk_size=64)
        for engine in ENGINES:
            row = rows[engine][0]
            if engine == "loop" and rows["loop"][1] is not None:
                row[3] = 1.0
            label = row[1] + (" (auto's choice)" if row[1] == auto.engine else "")
            speed.rows.append([f"{name} / {kind}", len(data.modalities), row[0], label, *row[2:]])

    overhead = Table(
        "Online Fisher monitor: training epoch time with and without it (md.fit, 1 epoch, "
        + ("1 timing, quick mode)" if quick else "median of 3)"),
        ["dataset", "without monitor s", "with monitor s", "overhead"],
        note="The online monitor accumulates the batch form (squared norm of each mini-batch "
             "gradient, from the backward pass training already does): no per-sample engine runs.",
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
