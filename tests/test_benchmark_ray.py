"""md.benchmark on Ray: a local Ray instance started here gives the local backend's numbers."""

import os

import pandas as pd
import pytest

import modaldiag as md
from modaldiag.benchmark import benchmark

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_backend_equals_local(local_ray, tmp_path):
    data = md.datasets.synthetic(n_samples=200, num_classes=3, strength={"a": 2.0, "b": 0.6},
                                 dims={"a": 8, "b": 6}, seed=0)
    kw = {"methods": ["joint", "ogm"], "seeds": 2, "epochs": 2, "threads": 1, "progress": False}
    out = tmp_path / "ray-bench"
    remote = benchmark(data, out=out, backend="ray", **kw)
    assert ray.is_initialized()  # the test's instance was used, and left running for its owner
    pids = {r["environment"]["pid"] for r in remote.records}
    assert os.getpid() not in pids  # every cell ran in a Ray worker process
    local = benchmark(data, out=None, **kw)
    cols = ["dataset", "method", "seed", "test_acc", "val_acc", "best_epoch",
            "test_unimodal_acc.a", "test_unimodal_acc.b", "key"]
    pd.testing.assert_frame_equal(remote.cells[cols], local.cells[cols])
    assert len(list((out / "cells").glob("*.json"))) == 4  # cached like any other backend
    assert (out / "leaderboard.html").is_file()
