"""Joint training cost and result on the embedded datasets (the reference loop's baseline)."""

from __future__ import annotations

import time

import torch

import modaldiag as md

from .common import Table


def run(quick: bool = False) -> list[Table]:
    table = Table(
        "Joint training with md.fit (concat head, default encoders, seed 0)",
        ["dataset", "M", "epochs", "s/epoch", "fused test acc", "unimodal test acc (joint head)"],
        note="Time per epoch includes the per-epoch validation pass and the online Fisher monitor.",
    )
    cases = [("synthetic", 5 if quick else 20), ("mfeat-fou-pix", 5 if quick else 20),
             ("mfeat", 5 if quick else 20), ("hapt", 2 if quick else 10)]
    for name, epochs in cases:
        data = (md.datasets.synthetic(n_samples=2000, strength={"a": 2.0, "b": 0.5})
                if name == "synthetic" else md.datasets.load(name))
        torch.manual_seed(0)
        model = md.models.default_model(data)
        train, val, test = data.loaders(64)
        t0 = time.perf_counter()
        md.fit(model, train, val, epochs=epochs, progress=False, seed=0)
        per_epoch = (time.perf_counter() - t0) / epochs
        ev = md.probes.evaluate(model, test)
        uni = ", ".join(f"{m} {s.accuracy:.3f}" for m, s in ev.unimodal.items())
        table.rows.append([name, len(data.modalities), epochs, per_epoch, ev.accuracy, uni])
    return [table]
