"""Valuation speed and accuracy.

1. Speed (concat head): modaldiag's exact Shapley vs shap's exact explainer, Captum's
   ``ShapleyValues`` (which enumerates all M! permutations: M * M! evaluations per sample, not
   2^M coalitions), Captum's ``ShapleyValueSampling`` (stated ``n_samples`` permutations) and the
   published code's approach (a full forward pass per coalition), plus the distance from the floor.
2. Every head (concat, sum, film, gated, late) at M = 3 and M = 6: exact valuation timed against
   one forward pass; only the additive heads (concat, late) have the exact coalition fast path.
3. Scaling in M (exact and permutation sampling, time only).
4. Permutation-sampling accuracy on *trained* models whose heads interact (gated, FiLM; concat as
   the additive control): relative error vs exact, and Captum's ``ShapleyValueSampling`` on the
   identical feature-level game with the same number of permutations.

Setup of 1-3: M modalities, each an MLP encoder 128 -> 256 -> 64, 10 classes, batches of 1000,
eval mode, CPU. Value function "logit" (true-class logit) unless stated, zero baseline.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch

import modaldiag as md
from modaldiag.probes.shapley import value_of_logits

from .common import Table, timeit


def model_and_data(m: int, n: int, *, fusion: str = "concat", encoder: str = "mlp", seed: int = 0):
    names = [f"m{i}" for i in range(m)]
    torch.manual_seed(seed)
    if encoder == "conv1d":
        encs = {k: md.models.Conv1dEncoder(3, 64) for k in names}
        inputs = {k: torch.randn(n, 3, 128) for k in names}
    else:
        encs = {k: md.models.MLPEncoder(128, 64, hidden=(256,)) for k in names}
        inputs = {k: torch.randn(n, 128) for k in names}
    model = md.MultimodalClassifier(encs, {k: 64 for k in names}, 10, fusion=fusion).eval()
    data = md.datasets.MultimodalDataset(inputs, torch.randint(0, 10, (n,)), num_classes=10)
    return model, data


@torch.no_grad()
def _encode_all(model, loader):
    return [(model.encode(x), y) for x, y in loader]


@torch.no_grad()
def floor_seconds(model, loader) -> float:
    """One encoder pass + exactly the head calls exact valuation needs (features precomputed)."""
    masks = md.probes.coalition_masks(len(model.modalities))
    t_enc = timeit(lambda: _encode_all(model, loader))
    feats = _encode_all(model, loader)
    t_head = timeit(lambda: [model.head_coalitions(f, masks) for f, _ in feats])
    return t_enc + t_head


@torch.no_grad()
def published_seconds(model, loader) -> float:
    """The published approach: a full model forward (encoders included) per coalition."""
    mods = model.modalities
    subsets = [c for r in range(len(mods) + 1) for c in itertools.combinations(mods, r)]

    def run():
        for x, y in loader:
            for s in subsets:
                logits = model(x, present=s)
                value_of_logits(logits.unsqueeze(0), y, torch.tensor([len(s)]), "logit")
    return timeit(run, repeat=1)


@torch.no_grad()
def shap_seconds_per_sample(model, data, n_samples: int = 100) -> float:
    """shap's exact explainer, one call per sample, the game vectorised over coalitions."""
    import shap

    m = len(model.modalities)
    feats = model.encode({k: v[:n_samples] for k, v in data.inputs.items()})
    labels = data.labels[:n_samples]
    masker = shap.maskers.Independent(np.zeros((1, m)))

    current = {}

    def game(masks):
        masks = torch.as_tensor(np.asarray(masks) > 0.5)
        logits = model.head_coalitions(current["features"], masks)
        return value_of_logits(logits, current["label"], masks.sum(1), "logit")[:, 0].numpy()

    explainer = shap.explainers.Exact(game, masker)  # built once; the game reads the current sample
    current["features"] = {k: f[:1] for k, f in feats.items()}
    current["label"] = labels[:1]
    explainer(np.ones((1, m)))  # warm-up: shap compiles numba kernels on first use

    def run():
        for i in range(n_samples):
            current["features"] = {k: f[i:i + 1] for k, f in feats.items()}
            current["label"] = labels[i:i + 1]
            explainer(np.ones((1, m)))

    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) / n_samples


def _captum():
    """Captum's attribution module, or None when captum is not installed (``pip install .[bench]``)."""
    try:
        from captum import attr
    except ImportError:
        return None
    return attr


def captum_per_sample(model, data, n_samples: int, *, sampling: int | None = None
                      ) -> tuple[float, float] | None:
    """Captum on the model's inputs, one feature group per modality (input-level zero baseline).

    ``sampling=None``: ``ShapleyValues`` (all M! permutations); else ``ShapleyValueSampling`` with
    ``n_samples=sampling`` permutations. Returns (seconds per sample, model evaluations per sample
    counted at the forward function), or None when captum is not installed.
    """
    attr = _captum()
    if attr is None:
        return None
    mods = model.modalities
    inputs = tuple(data.inputs[k][:n_samples] for k in mods)
    labels = data.labels[:n_samples]
    masks = tuple(torch.full((1, t.shape[1]), i, dtype=torch.long) for i, t in enumerate(inputs))
    rows = [0]

    def forward(*xs):
        rows[0] += xs[0].shape[0]
        return model(dict(zip(mods, xs, strict=True)))

    if sampling is None:
        explainer, kwargs = attr.ShapleyValues(forward), {}
    else:
        explainer, kwargs = attr.ShapleyValueSampling(forward), {"n_samples": sampling}
    chunk = 50
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n_samples, chunk):
            sl = slice(start, start + chunk)
            explainer.attribute(tuple(t[sl] for t in inputs), target=labels[sl], feature_mask=masks,
                                perturbations_per_eval=64, **kwargs)
    return (time.perf_counter() - t0) / n_samples, rows[0] / n_samples


def matched_sampling(m: int) -> int:
    """Captum ``ShapleyValueSampling`` permutations with about as many evaluations per sample
    (M per permutation) as exact valuation's 2^M coalitions."""
    return max(1, math.ceil(2 ** m / m))


def run_speed(quick: bool) -> Table:
    sizes = (2000,) if quick else (2000, 20000)
    cap = _captum() is not None
    speed = Table(
        "Exact valuation time (seconds) for N samples, concat head (the additive fast path): "
        "modaldiag vs shap's exact explainer vs Captum ShapleyValues (all M! permutations) and "
        "ShapleyValueSampling (n_samples permutations) vs the published approach (one full "
        "forward per coalition)",
        ["M", "N", "modaldiag", "floor", "modaldiag / floor", "published approach", "shap Exact*",
         "Captum ShapleyValues*", "its evals/sample", "Captum ShapleyValueSampling*", "n_samples",
         "its evals/sample ", "speed-up vs shap", "speed-up vs Captum ShapleyValues",
         "speed-up vs Captum sampling"],
        note="Concat head only: its coalitions use the exact additive fast path, so modaldiag / "
             "floor ≈ 1 here; other heads cost more (next table). Floor = one encoder pass over "
             "the data + the 2^M head evaluations (features precomputed); exact valuation "
             "evaluates 2^M coalitions per sample. Captum's ShapleyValues is exact by "
             "enumerating every permutation: M·M! model evaluations per sample (+1; counted at "
             "the forward function: 4,320 at M = 6), not 2^M coalitions. Captum's "
             "ShapleyValueSampling is the like-for-like row: n_samples = ⌈2^M / M⌉ random "
             "permutations, i.e. about as many evaluations per sample as exact valuation's 2^M "
             "coalitions (an estimate, not exact). *shap and Captum are timed on a subsample "
             f"({20 if quick else 100} / {10 if quick else 100} samples) and scaled linearly to N "
             "(their cost is per sample); Captum ablates inputs rather than features (a "
             "different game), included for cost only; the accuracy table below runs Captum on "
             "the identical feature-level game."
             + ("" if cap else " Captum columns: captum not installed (pip install '.[bench]')."),
    )
    for m in (2, 3, 4, 6):
        shap_ps = shap_seconds_per_sample(*model_and_data(m, 200), n_samples=20 if quick else 100)
        n_cap = 10 if quick else 100
        exact_cap = captum_per_sample(*model_and_data(m, 400), n_samples=n_cap)
        samp_cap = captum_per_sample(*model_and_data(m, 400), n_samples=n_cap,
                                     sampling=matched_sampling(m))
        for n in sizes:
            model, data = model_and_data(m, n)
            loader = data.loader(1000)
            t_md = timeit(lambda model=model, loader=loader: md.shapley(model, loader, value="logit"))
            t_floor = floor_seconds(model, loader)
            t_pub = published_seconds(model, loader)
            t_shap = shap_ps * n
            if exact_cap is None:
                cap_cols = ["captum not installed", "—", "captum not installed", matched_sampling(m),
                            "—"]
                speedups = ["captum not installed", "captum not installed"]
            else:
                t_cap, t_samp = exact_cap[0] * n, samp_cap[0] * n
                cap_cols = [t_cap, round(exact_cap[1]), t_samp, matched_sampling(m),
                            round(samp_cap[1])]
                speedups = [t_cap / t_md, t_samp / t_md]
            speed.rows.append([m, n, t_md, t_floor, t_md / t_floor, t_pub, t_shap, *cap_cols,
                               t_shap / t_md, *speedups])
    return speed


@torch.no_grad()
def _forward_all(model, loader):
    return [model(x) for x, _ in loader]


def run_heads(quick: bool) -> Table:
    n = 1000 if quick else 4000
    heads = Table(
        f"Exact valuation vs one forward pass, every head (N = {n}, MLP encoders, batches of 1000)",
        ["head", "M", "coalition fast path", "one forward pass s", "exact valuation s",
         "exact / forward", "floor s", "exact / floor"],
        note="One forward pass = encoders + head once over the data (eval, no grad). Exact "
             "valuation runs the encoders once and evaluates all 2^M coalitions through the head: "
             "'about one forward pass' holds only for the heads with the additive fast path "
             "(concat, late); sum, FiLM and gated heads run every coalition through the stacked "
             "generic head, so their cost grows with 2^M. Floor = one encoder pass + the same "
             "head_coalitions calls with features precomputed.",
    )
    for fusion in ("concat", "sum", "film", "gated", "late"):
        for m in (3, 6):
            model, data = model_and_data(m, n, fusion=fusion)
            loader = data.loader(1000)
            fast = hasattr(getattr(model, "fusion", None), "coalitions")
            t_fwd = timeit(lambda model=model, loader=loader: _forward_all(model, loader))
            t_md = timeit(lambda model=model, loader=loader: md.shapley(
                model, loader, value="logit", method="exact"))
            t_floor = floor_seconds(model, loader)
            heads.rows.append([fusion, m, "yes (additive)" if fast else "no (stacked generic head)",
                               t_fwd, t_md, t_md / t_fwd, t_floor, t_md / t_floor])
    return heads


def run_scaling(quick: bool) -> Table:
    scaling = Table(
        "Scaling in M: exact up to M = 12, permutation sampling (64 antithetic pairs per batch) "
        "up to M = 16 (time only)",
        ["M", "N", "head", "method", "coalitions evaluated", "seconds", "mean std. error"],
        note="Untrained random models (values ~1e-4): timings only. 'concat' uses the exact "
             "additive fast path; 'gated' runs every coalition through the stacked generic head. "
             "The accuracy of permutation sampling is measured on trained models in the next "
             "table, not here (an untrained head is nearly additive, where sampling is exact by "
             "construction).",
    )
    n = 500 if quick else 2000
    ms = (2, 4, 8) if quick else (2, 4, 6, 8, 10, 12)
    for fusion in ("concat", "gated"):
        for m in ms:
            model, data = model_and_data(m, n, fusion=fusion)
            loader = data.loader(250 if m >= 10 else 1000)
            t = timeit(lambda model=model, loader=loader: md.shapley(model, loader, value="prob",
                                                                     method="exact"), repeat=1)
            scaling.rows.append([m, n, fusion, "exact", 2 ** m, t, 0.0])
    for m in ((8,) if quick else (8, 12, 16)):
        model, data = model_and_data(m, n, fusion="gated")
        loader = data.loader(250)
        t0 = time.perf_counter()
        approx = md.shapley(model, loader, value="prob", method="permutation", n_permutations=64)
        t = time.perf_counter() - t0
        scaling.rows.append([m, n, "gated", "permutation", f"<= {128 * (m + 1)} per batch", t,
                             float(approx.stderr.mean())])
    return scaling


# ---------------------------------------------------------------- accuracy on trained models
TRAIN_LR = 0.05


def trained_model(m: int, fusion: str, *, epochs: int, n: int, seed: int = 0):
    """A model trained for ``epochs`` (SGD, lr ``TRAIN_LR``) on synthetic data with M modalities
    of graded strength; returns (model in eval mode, data, test accuracy)."""
    names = [f"m{i}" for i in range(m)]
    strength = {k: float(s) for k, s in zip(names, np.linspace(1.2, 0.4, m), strict=True)}
    data = md.datasets.synthetic(n_samples=n, num_classes=6, strength=strength,
                                 dims={k: 16 for k in names}, seed=seed)
    torch.manual_seed(seed)
    model = md.models.default_model(data, fusion=fusion)
    md.fit(model, data.train.loader(64, shuffle=True), data.val.loader(500), epochs=epochs,
           monitor=False, seed=seed, progress=False, lr=TRAIN_LR)
    acc = md.probes.evaluate(model, data.test.loader(500)).accuracy
    return model.eval(), data, acc


def _coalition_values(model, loader, value: str):
    """v(S) for every coalition and sample, (K, N), and the masks (K, M) (zero baseline)."""
    masks = md.probes.coalition_masks(len(model.modalities))
    out = []
    with torch.no_grad():
        for x, y in loader:
            logits = model.head_coalitions(model.encode(x), masks).double()
            out.append(value_of_logits(logits, y, masks.sum(1), value))
    return torch.cat(out, dim=1), masks


def interaction(model, loader, value: str) -> tuple[float, float]:
    """How far the game is from additive, and from pairwise: the residual of the least-squares
    fit of v(S) over all coalitions by main effects only, and by main effects + pairwise
    interactions, each relative to the spread of v. Any permutation is exact on an additive game,
    and an antithetic pair (a permutation and its reverse) is exact on a game with at most
    pairwise interactions, so only the second residual can cause modaldiag's sampling error."""
    v, masks = _coalition_values(model, loader, value)
    x = masks.double()
    spread = (v - v.mean(0)).pow(2).sum().sqrt()
    pairs = [x[:, i] * x[:, j] for i, j in itertools.combinations(range(x.shape[1]), 2)]
    out = []
    for design in (torch.cat([torch.ones(x.shape[0], 1), x], dim=1),
                   torch.cat([torch.ones(x.shape[0], 1), x, torch.stack(pairs, 1)], dim=1)):
        coef = torch.linalg.lstsq(design, v).solution
        out.append(float((v - design @ coef).pow(2).sum().sqrt() / spread))
    return out[0], out[1]


def captum_feature_game(model, loader, n_perm: int, value: str = "logit", seed: int = 0):
    """Captum ShapleyValueSampling on the feature-level game modaldiag values (head on encoded
    features, absent modality = zero feature, value = true-class logit, or its softmax
    probability for ``value="prob"``): the identical game, so its values compare directly with
    modaldiag's exact ones. None when captum is absent."""
    attr = _captum()
    if attr is None:
        return None
    mods = model.modalities
    torch.manual_seed(seed)
    rows = [0]

    def forward(*fs):
        rows[0] += fs[0].shape[0]
        logits = model.fuse(dict(zip(mods, fs, strict=True)))
        return logits.softmax(-1) if value == "prob" else logits

    svs = attr.ShapleyValueSampling(forward)
    out, n = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, y in loader:
            feats = model.encode(x)
            fs = tuple(feats[k] for k in mods)
            masks = tuple(torch.full((1, f.shape[1]), i, dtype=torch.long) for i, f in enumerate(fs))
            a = svs.attribute(fs, baselines=tuple(torch.zeros_like(f) for f in fs), target=y,
                              feature_mask=masks, n_samples=n_perm, perturbations_per_eval=64)
            out.append(torch.stack([t[:, 0] for t in a], dim=1).double())
            n += y.shape[0]
    return torch.cat(out), time.perf_counter() - t0, rows[0] / n


def _errors(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error ||approx - exact|| / ||exact||, max |error| / mean |exact|)."""
    diff = approx - exact
    return (float(diff.norm() / exact.norm()), float(diff.abs().max() / exact.abs().mean()))


def run_accuracy(quick: bool) -> Table:
    epochs = 8 if quick else 30
    n = 2000 if quick else 4000
    ms = (6,) if quick else (6, 8)
    perms = (8, 64) if not quick else (8, 32)
    cap = _captum() is not None
    table = Table(
        f"Permutation-sampling accuracy on trained models (synthetic data, N = {n}, M modalities "
        f"of graded strength, {epochs} epochs of md.fit, lr {TRAIN_LR}; values on the test split; "
        "relative error vs exact)",
        ["M", "head", "test acc", "value", "non-additive", "beyond pairwise", "mean |phi|",
         "estimator", "permutations/sample", "evals/sample", "seconds", "relative error",
         "max |err| / mean |phi|", "within 2 s.e."],
        note="Relative error = ||phi_hat - phi_exact||_F / ||phi_exact||_F over all samples and "
             "modalities (not an absolute error, which the value scale would flatter). "
             "Non-additive / beyond pairwise = residual of the best fit of v(S) over all 2^M "
             "coalitions by main effects / by main effects + pairwise interactions, relative to "
             "v's spread. Every permutation is exact on an additive game and every antithetic pair "
             "(a permutation and its reverse) on a game with at most pairwise interactions, so "
             "modaldiag's error tracks the 'beyond pairwise' column (FiLM's logit is bilinear in "
             "two modalities' features: pairwise, hence exact); the gated head and the softmax "
             "'prob' value have higher-order interactions. modaldiag permutation: P antithetic pairs per batch = 2P permutations shared "
             "by the batch's samples; Captum ShapleyValueSampling: n_samples = 2P random "
             "permutations per call, run on the identical feature-level game (head on encoded "
             "features, zero feature for an absent modality, true-class logit or its softmax "
             "probability), so both rows of a block estimate the same exact values; Captum draws "
             "independent permutations per call (no antithetic pairs). 'within 2 s.e.': fraction of values whose "
             "error is within twice modaldiag's reported standard error."
             + ("" if cap else " Captum rows: captum not installed (pip install '.[bench]')."),
    )
    for m in ms:
        for fusion in ("concat", "gated", "film"):
            model, data, acc = trained_model(m, fusion, epochs=epochs, n=n)
            loader = data.test.loader(500)
            for value in ("logit", "prob"):
                exact = md.shapley(model, loader, value=value, method="exact").values
                nonadd, beyond = interaction(model, loader, value)
                scale = float(exact.abs().mean())
                lead = [m, fusion, acc, value, nonadd, beyond, scale]
                for p in perms:
                    t0 = time.perf_counter()
                    approx = md.shapley(model, loader, value=value, method="permutation",
                                        n_permutations=p)
                    t = time.perf_counter() - t0
                    rel, mx = _errors(approx.values, exact)
                    se = approx.stderr
                    within = float(((approx.values - exact).abs() <= 2 * se + 1e-12).double().mean())
                    table.rows.append([*lead, f"modaldiag permutation (n_permutations={p})", 2 * p,
                                       f"<= {2 * p * (m + 1)} per batch", t, rel, mx, within])
                    res = captum_feature_game(model, loader, 2 * p, value)
                    if res is None:
                        table.rows.append([*lead, f"Captum ShapleyValueSampling (n_samples={2 * p})",
                                           2 * p, "—", "captum not installed", "—", "—", "—"])
                        continue
                    vals, t_c, evals = res
                    rel_c, mx_c = _errors(vals, exact)
                    table.rows.append([*lead, f"Captum ShapleyValueSampling (n_samples={2 * p})",
                                       2 * p, round(evals), t_c, rel_c, mx_c, "—"])
    return table


def run(quick: bool = False) -> list[Table]:
    return [run_speed(quick), run_heads(quick), run_scaling(quick), run_accuracy(quick)]
