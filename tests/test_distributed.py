"""Distributed correctness: real torchrun / Lightning DDP launches, 2 CPU processes, gloo."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modaldiag as md

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _torchrun(script, *args, timeout=600):
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [exe, "--standalone", "--nproc_per_node=2", str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    transient = ("EADDRINUSE", "Address already in use", "RendezvousConnectionError",
                 "DistNetworkError", "Connection reset")
    if proc.returncode != 0 and any(t in proc.stderr for t in transient):
        first = proc.stderr[-3000:]  # a port/rendezvous hiccup of --standalone: try once more
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        assert proc.returncode == 0, "first attempt:\n" + first + "\nsecond:\n" + proc.stderr[-6000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(HERE / "distributed" / "ddp_worker.py", out)
    return json.loads((out / "ddp_results.json").read_text()), out


def test_every_regulator_keeps_replicas_identical(ddp_results):
    results, _ = ddp_results
    assert results["world"] == 2
    for name, rec in results["regulators"].items():
        assert rec["max_param_diff"] < 1e-6, name
        assert rec["train_n"] > 0


#: what each regulator must log (its coefficients), compared across ranks by the worker
LOGGED = {
    "joint": set(),
    "InfoReg": {"alpha", "delta", "score", "trace", "window_open", "window_rho"},
    "InfoReg*": {"alpha", "delta", "score", "trace", "window_open", "window_rho"},
    "InfoReg (released)": {"alpha", "delta", "score", "trace", "weight", "window_open",
                           "window_rho"},
    "Relearning": {"alpha", "gap", "resets"},
    "OGM-GE": {"coefficient", "rho"},
    "OPM": {"q", "rho"},
    "MMPareto": {"cosine", "w_multimodal"},
    "Valuation (sample)": {"extra_copies", "mean_phi"},
    "Valuation (modality)": {"extra_copies", "gap", "ratio"},
    "AGM": {"score", "running_score", "ratio", "optimal_ratio", "coefficient"},
    "AGM (released)": {"score", "running_score", "ratio", "optimal_ratio", "coefficient"},
    "PMR": {"score", "rho", "beta", "pce"},
    "MMCosine": {"auxiliary_ce", "scale", "true_cosine", "weight_norm", "nce"},
    "MBSD": {"gate", "rs", "kd", "unimodal_ce"},
    "CML": {"violation_rate", "violation", "hinge", "loss"},
    "LFM (learnable)": {"alpha_c", "alpha_a", "alignment", "ce", "h"},
    "GBlending": {"w", "w_fused", "delta_G", "delta_O"},
    "AMCo": {"mass", "dependent", "masked"},
    "MLA": {"ce", "encoder_grad_sq", "grad_kept", "projector_norm"},
    "MLA (released)": {"ce", "encoder_grad_sq"},
    "ReconBoost": {"stage", "phase", "modality", "boost_loss", "q_y", "ga", "ensemble_ce",
                   "ensemble_acc", "rho"},
    "UMT": {"distill_mse", "teacher_val_accuracy", "variant", "active"},
    "UMT (projection)": {"distill_mse", "variant", "active"},
    "UME": {"unimodal_ce", "unimodal_train_acc", "variant", "combine"},
    "UME (separate)": {"unimodal_ce", "unimodal_train_acc", "variant", "combine"},
    "ModalityDropout": {"drop_rate"},
    "Greedy": {"bdr", "d_speed", "rebalance_steps", "rebalanced"},
    "Greedy (random)": {"rebalance_steps", "rebalanced"},
}


def test_every_regulator_derives_identical_coefficients_on_every_rank(ddp_results):
    """Each rank trains on its own shard (the batch digests differ at every step), yet every
    per-step coefficient (OGM k, OPM drop mask, InfoReg alpha and window) and every logged epoch
    value (q, rho, alpha, delta, scores, traces, gaps, valuation counts) is the same on both."""
    results, _ = ddp_results
    assert set(results["regulators"]) == set(LOGGED)
    for name, rec in results["regulators"].items():
        assert rec["data_differs"], name  # really different data on the two ranks
        assert rec["coefficient_mismatch"] == [], (name, rec["coefficient_mismatch"][:5])
        assert set(rec["logged_keys"]) >= LOGGED[name], (name, rec["logged_keys"])
    regs = results["regulators"]
    # the compared coefficients are not trivial: something was actually modulated
    ogm = [s["k"] for s in regs["OGM-GE"]["steps"]]
    assert len(ogm) == regs["OGM-GE"]["n_steps"] > 0 and any(min(k.values()) < 1 for k in ogm)
    masks = [s["mask"] for s in regs["OPM"]["steps"] if s["mask"] is not None]
    assert masks and any(0 < sum(m) < len(m) for m in masks)
    assert any(s["alpha"] for s in regs["InfoReg*"]["steps"])
    assert any(rec["resets"] for rec in regs["Relearning"]["logged"] if rec)
    assert any(sum(rec.get("extra_copies", {}).values()) for rec in regs["Valuation (sample)"]["logged"])


def test_distributed_probes_equal_single_process_on_the_union(ddp_results):
    results, out = ddp_results
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_worker", HERE / "distributed" / "ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    d = worker.data()
    model = md.models.default_model(d, feature_dim=8)
    model.load_state_dict(torch.load(out / "probe_model.pt", weights_only=True))

    def union(ds):  # rank 0's shard then rank 1's: the order all_gather produces
        return ds.subset([*range(0, len(ds), 2), *range(1, len(ds), 2)])

    test, val, train = union(d.test), union(d.val), union(d.train)
    probes = results["probes"]
    sv = md.shapley(model, test.loader(17))
    torch.testing.assert_close(torch.tensor(probes["shapley_values"], dtype=torch.float64), sv.values)
    assert probes["shapley_labels"] == sv.labels.tolist()
    fisher = md.fisher_trace(model, test.loader(17))
    for m in fisher:
        assert probes["fisher"][m] == pytest.approx(fisher[m], rel=1e-5)
    sep = md.separability(model, train.loader(50), val.loader(50))
    for m, s in sep.items():
        assert probes["separability"][m] == pytest.approx([s.train_purity, s.val_purity, s.linear_probe])
    uni = md.unimodal_scores(model, test.loader(17))
    for m, s in uni.items():
        assert probes["unimodal"][m] == pytest.approx([s.accuracy, s.true_prob, s.cross_entropy], rel=1e-5)
    rep = md.diagnose(model, test.loader(17), val.loader(17))
    assert probes["diagnose"][:2] == [rep.dominant, rep.weakest]
    assert probes["diagnose"][2] == pytest.approx(rep.fused_accuracy)
    # robustness: identical on both ranks; the clean (severity 0) and fully-missing (severity 1)
    # points, which do not depend on which samples are picked, equal one process on the union
    assert probes["robustness_mismatch"] == []
    ddp = md.RobustnessResult.from_dict(probes["robustness"]).to_dataframe()
    single = md.robustness(model, test.loader(17), n_resamples=50).to_dataframe()
    for frame in (ddp, single):
        frame.query("corruption == 'missing' and severity in (0.0, 1.0)", inplace=True)
    key = ["modality", "severity"]
    assert ddp.sort_values(key)["accuracy"].tolist() == pytest.approx(
        single.sort_values(key)["accuracy"].tolist(), abs=1e-12)
    assert ddp["n"].tolist() == single["n"].tolist()


@pytest.mark.parametrize("regulator", [pytest.param("OGM-GE", marks=pytest.mark.slow), "MMPareto"])
def test_lightning_ddp_strategy_two_cpu_processes(tmp_path, regulator):
    pytest.importorskip("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(HERE / "distributed" / "lightning_ddp.py"), str(tmp_path),
                           regulator], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    a = torch.load(tmp_path / f"{regulator}-rank0.pt", weights_only=True)
    b = torch.load(tmp_path / f"{regulator}-rank1.pt", weights_only=True)
    assert float((a - b).abs().max()) < 1e-6


def test_torchrun_example(tmp_path):
    _torchrun(ROOT / "examples" / "torchrun_ddp.py", "--epochs", "1", "--out", tmp_path / "run")
    assert (tmp_path / "run" / "history.json").exists() and (tmp_path / "run" / "last.pt").exists()
