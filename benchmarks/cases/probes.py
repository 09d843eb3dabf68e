"""Probes: read-only (mode, grads, buffers, RNG as found), one baseline rule, trustworthy
Shapley chunks on disk, and errors that name the encoder or the argument at fault."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

import modaldiag as md

from . import Case

AREA = "probes"


def _model() -> md.MultimodalClassifier:
    torch.manual_seed(0)
    enc_a = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    enc_b = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    return md.MultimodalClassifier({"a": enc_a, "b": enc_b}, {"a": 6, "b": 6}, 3)


def cases(tmp: Path) -> list[Case]:
    data = md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 4, "b": 4}, seed=0)
    loader = data.train.loader(40)

    def frozen_bn_stays_frozen():
        model = _model().train()
        bn = model.encoders["a"][1]
        bn.eval()
        md.shapley(model, loader)
        md.unimodal_scores(model, loader)
        md.probes.collect_features(model, loader)
        return {"bn_training": bn.training, "model_training": model.training}

    def rng_untouched():
        model = _model()
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        expected = (torch.rand(1).item(), float(np.random.rand()), random.random())
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        md.diagnose(model, data.train.loader(40, shuffle=True), data.val.loader(40),
                    fisher=None, reference_epochs=1)
        got = (torch.rand(1).item(), float(np.random.rand()), random.random())
        return expected, got

    def mean_baseline_honoured():
        model = _model()
        model.set_baseline("mean", loader)
        stored = md.shapley(model, loader, value="prob")
        explicit = md.shapley(model, loader, value="prob", baseline="mean")
        zero = md.shapley(model, loader, value="prob", baseline="zero")
        rep = md.diagnose(model, loader, fisher=None)
        return {"stored": stored.baseline, "same": float((stored.values - explicit.values).abs().max()),
                "vs_zero": float((stored.values - zero.values).abs().mean()),
                "diagnose": (rep.baseline, rep.shapley.baseline, rep.unimodal.baseline),
                "summary_says_mean": "baseline 'mean'" in rep.summary}

    def fingerprint_mismatch():
        folder = tmp / "sv"
        md.probes.shapley_to_disk(_model(), loader, folder)
        other = _model()
        with torch.no_grad():
            other.encoders["b"][0].weight.mul_(2)
        md.probes.shapley_to_disk(other, loader, folder)

    def nan_features():
        model = _model()
        with torch.no_grad():
            model.encoders["b"][0].weight[0, 0] = float("nan")
        md.shapley(model, loader)

    def check_bn(r):
        return (not r["bn_training"] and r["model_training"],
                f"after shapley, unimodal_scores, collect_features: BatchNorm.training="
                f"{r['bn_training']}, model.training={r['model_training']}")

    def check_rng(r):
        expected, got = r
        return expected == got, f"next draws torch/numpy/python {got} vs without the probe {expected}"

    def check_mean(r):
        ok = (r["stored"] == "mean" and r["same"] == 0.0 and r["vs_zero"] > 1e-4
              and r["diagnose"] == ("mean",) * 3 and r["summary_says_mean"])
        return ok, (f"after set_baseline('mean'): shapley baseline={r['stored']!r}, max |default - "
                    f"baseline='mean'| = {r['same']:.1e}, mean |mean - zero| = {r['vs_zero']:.4f}; "
                    f"diagnose (report, shapley, unimodal) = {r['diagnose']}")

    return [
        Case(AREA, "a frozen eval-mode BatchNorm stays frozen after probing a train-mode model",
             frozen_bn_stays_frozen, check=check_bn),
        Case(AREA, "diagnose(reference_epochs=1) leaves the global RNG streams as found",
             rng_untouched, check=check_rng),
        Case(AREA, "model.set_baseline('mean') is the default absence of shapley and diagnose",
             mean_baseline_honoured, check=check_mean),
        Case(AREA, "shapley_to_disk refuses to resume chunks computed for another model",
             fingerprint_mismatch, raises=ValueError,
             match=r"chunks of a different job.*model's weights.*resume=False"),
        Case(AREA, "NaN features from finite inputs name the encoder and the batch",
             nan_features, raises=ValueError,
             match=r"the encoder of modality 'b' produced NaN/inf features from finite inputs "
                   r"\(batch 0"),
        Case(AREA, "a bad probe argument names the probe and the parameter",
             lambda: md.shapley(_model(), loader, n_permutations=0), raises=ValueError,
             match=r"shapley: n_permutations must be an integer in \[1, inf[])]; got 0"),
        Case(AREA, "a loader of (audio, video, label) tuples gets the adapter recipe",
             lambda: md.unimodal_scores(_model(), [(torch.randn(4, 4), torch.randn(4, 4),
                                                    torch.zeros(4, dtype=torch.long))]),
             raises=ValueError, match=r"tuple of 3 items.*adapt_loader"),
    ]
