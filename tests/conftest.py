import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread: the suite's models are tiny, and on a shared 2-core machine torch's
# thread pool collapses under contention (measured: 5x slower under load). Subprocesses
# (torchrun, the CLI, crash tests) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

import modaldiag as md  # noqa: E402

md.set_threads(1)  # also numpy/scikit-learn's BLAS and OpenMP pools (separability)
from modaldiag.models import MLPEncoder  # noqa: E402

FUSIONS = ("concat", "sum", "film", "gated", "late")


def make_model(m: int = 2, fusion: str = "concat", in_dim: int = 5, feat: int = 4,
               num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    encoders = {n: MLPEncoder(in_dim + i, feat + i, hidden=(8,)) for i, n in enumerate(names)}
    dims = {n: feat + i for i, n in enumerate(names)}
    return md.MultimodalClassifier(encoders, dims, num_classes, fusion=fusion)


def make_inputs(model, batch: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, enc.net[0].in_features, generator=g)
            for n, enc in model.encoders.items()}


@pytest.fixture(scope="session")
def fou_pix():
    return md.datasets.load("mfeat-fou-pix")


@pytest.fixture(scope="session")
def synth():
    return md.datasets.synthetic(n_samples=600, num_classes=4, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 16, "b": 16}, seed=0)
