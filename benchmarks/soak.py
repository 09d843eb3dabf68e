"""Soak: a long run with every regulator in turn; RSS and open file handles per epoch."""

from __future__ import annotations

import os
import re
import tempfile

import torch

import modaldiag as md

REGULATORS = [("joint", lambda: None), ("InfoReg", lambda: md.InfoReg()),
              ("Relearning", lambda: md.Relearning(every=3)), ("OGM-GE", lambda: md.OGM(noise=True)),
              ("OPM", lambda: md.OPM()), ("MMPareto", lambda: md.MMPareto()),
              ("ValuationResampling", lambda: md.ValuationResampling(warmup=1))]


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Probe(md.Callback):
    def __init__(self, records, name):
        self.records, self.label = records, name

    def on_train_epoch_end(self, ctx):
        self.records.append({"regulator": self.label, "epoch": ctx.epoch, "rss_mb": rss_mb(),
                             "fds": open_fds()})


def soak(epochs_each: int = 15) -> list[dict]:
    """Run every regulator for ``epochs_each`` epochs with checkpoints; return per-epoch records."""
    data = md.datasets.synthetic(n_samples=600, num_classes=3, strength={"a": 2.0, "b": 0.6},
                                 dims={"a": 16, "b": 16}, seed=0)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in REGULATORS:
            torch.manual_seed(0)
            model = md.models.default_model(data, feature_dim=16)
            md.fit(model, data.train.loader(32, shuffle=True), data.val.loader(128),
                   epochs=epochs_each, regulator=make(), callbacks=[Probe(records, name)],
                   checkpoint_dir=f"{tmp}/{name}", progress=False)
    return records
