"""Valuation cost: md.shapley (exact) against one plain forward pass over the same data."""

from __future__ import annotations

import torch

import modaldiag as md

from .common import Table, timeit


def _model_and_loader(m: int, n: int, encoder: str, batch: int = 1000):
    names = [f"m{i}" for i in range(m)]
    torch.manual_seed(0)
    if encoder == "conv1d":
        encs = {k: md.models.Conv1dEncoder(3, 64) for k in names}
        inputs = {k: torch.randn(n, 3, 128) for k in names}
    else:
        encs = {k: md.models.MLPEncoder(128, 64, hidden=(256,)) for k in names}
        inputs = {k: torch.randn(n, 128) for k in names}
    model = md.MultimodalClassifier(encs, {k: 64 for k in names}, 10).eval()
    labels = torch.randint(0, 10, (n,))
    data = md.datasets.MultimodalDataset(inputs, labels, num_classes=10)
    return model, data.loader(batch)


@torch.no_grad()
def _forward(model, loader):
    for x, _ in loader:
        model(x)


def run(quick: bool = False) -> list[Table]:
    n = 2000 if quick else 20000
    table = Table(
        f"Exact Shapley valuation vs one plain forward pass (N = {n}, batch 1000, eval mode)",
        ["encoders", "M", "coalitions", "forward s", "shapley s", "ratio"],
        note="The forward pass runs encoders + head once; md.shapley runs the encoders once and "
             "the head on all 2^M coalitions in one stacked call per batch. Median of 3 runs.",
    )
    for encoder in ("mlp", "conv1d"):
        for m in (2, 3, 4):
            model, loader = _model_and_loader(m, n if encoder == "mlp" else n // 4, encoder)
            t_fwd = timeit(lambda model=model, loader=loader: _forward(model, loader))
            t_sv = timeit(lambda model=model, loader=loader: md.shapley(model, loader))
            table.rows.append([encoder, m, 2 ** m, t_fwd, t_sv, t_sv / t_fwd])
    return [table]
