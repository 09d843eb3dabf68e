r"""Robustness probes: fused accuracy when one modality is missing, noisy or shuffled.

For every modality :math:`m`, corruption :math:`c` and severity :math:`s`, the fused prediction
(the head, or a regulator's ``predict``) is scored on the loader with modality :math:`m`
corrupted and every other modality clean. Encoders run **once** per sample: the features
:math:`f_{im}` are cached over the loader and only the head is re-evaluated (feature space).

Corruptions (:math:`N` samples; one seeded random order :math:`\pi` of the samples; the
corrupted set at severity :math:`s` is :math:`\pi_{1..k}`, :math:`k = \lfloor sN + 1/2 \rfloor`,
so the sets are nested over severities and the same for every modality):

* ``missing``: the samples of the corrupted set have :math:`m` absent: its feature becomes the
  contract's baseline (``model.absent_feature``: zeros, the stored mean, or a custom vector; the
  substitution ``head(f, present=N \ {m})`` performs). Severity = fraction of samples.
  At :math:`s = 1` the fused accuracy is the accuracy of ``head(f, present=others)``; for two
  modalities, the other modality's unimodal accuracy through the joint head.
* ``gaussian``: :math:`f_{im} + s\,\sigma_m\,\varepsilon_{im}`, :math:`\varepsilon \sim
  \mathcal N(0, I)` drawn once per modality (the same draws at every severity), for every sample.
  :math:`\sigma_m` is **one scalar per modality**: the standard deviation of all entries of
  :math:`m`'s features over the loader (about their grand mean). With ``noise_space="input"``
  the noise is added to the raw inputs instead (:math:`\sigma_m` = standard deviation of all
  input entries) and the encoders re-run on the noisy inputs.
* ``shuffle``: the samples of the corrupted set take :math:`m`'s feature from another sample:
  :math:`f_{im} \leftarrow f_{\delta(i)m}` with :math:`\delta` a seeded derangement (a cyclic
  shift of a random order, so :math:`\delta(i) \ne i`). It breaks the pairing of the modalities
  while keeping the marginal distribution of each.
* a custom corruption: a callable ``fn(x, severity, generator) -> x'`` on one modality's features
  ``x`` (B, d_m) (a copy; feature space, also with ``noise_space="input"``), ``generator`` a
  ``torch.Generator`` on ``x``'s device seeded from ``seed``, the corruption's name and the
  modality, and re-seeded at every severity (the same draws at every severity). Given in ``corruptions`` as a mapping ``{name: fn}`` or a bare callable (named by its
  ``__name__``).

Samples whose modality is already absent in the data (a per-sample presence mask) keep their
baseline under every corruption.

**Intervals.** A seeded percentile bootstrap over samples (``n_resamples`` draws of ``N`` sample
indices with replacement, the same draws for every point): the central ``level`` range of each
point's accuracy and of each AUC.

**AUC** per (modality, corruption): the trapezoid area under accuracy against severity divided by
the severity range, :math:`\frac{1}{s_K - s_1}\sum_j (s_{j+1} - s_j)\frac{a_j + a_{j+1}}{2}`
(a flat curve has AUC = its accuracy; a single severity gives that accuracy). It is the mean
over samples of a per-sample weighted correctness, so it is bootstrapped with the same draws.

**DDP.** Every rank corrupts its own shard (subsets and derangements within the shard); the
per-sample results of every rank are gathered, so every rank returns the scores of the union.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..utils.distributed import all_gather_cat, all_reduce_sum
from ..utils.progress import progress_bar
from ..utils.validation import BOOL, POSITIVE_INT, Interval, Options, Satisfies, validate_params
from ._common import (
    BASELINE_CONSTRAINT,
    ITERABLE,
    SEED,
    baseline_context,
    contract_model,
    encode_checked,
    iterate_batches,
    present_of,
    probe_state,
    split_of,
)
from .verdict import _boot_means

__all__ = ["robustness", "RobustnessResult", "CORRUPTIONS", "NOISE_SPACES", "DEFAULT_SEVERITIES",
           "robustness_auc", "register_plot"]

#: the built-in corruptions
CORRUPTIONS = ("missing", "gaussian", "shuffle")
#: where gaussian noise is added
NOISE_SPACES = ("feature", "input")
DEFAULT_SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
#: corruptions whose severity is a fraction of samples (must lie in [0, 1])
_FRACTIONS = ("missing", "shuffle")
#: the figure writer of :meth:`RobustnessResult.plot`, registered by :mod:`modaldiag.report`
_PLOT: dict = {}


def register_plot(fn) -> None:
    """Register ``fn(result, ax=None) -> Figure`` as :meth:`RobustnessResult.plot`."""
    _PLOT["plot"] = fn


def robustness_auc(severities: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` against ``severities`` divided by the severity range
    (``values[0]`` for a single severity)."""
    return float(np.dot(_auc_weights(severities), np.asarray(values, dtype=np.float64)))


def _auc_weights(severities: Sequence[float]) -> np.ndarray:
    """``w`` with ``w @ values`` = :func:`robustness_auc` (linear in the values)."""
    s = np.asarray(severities, dtype=np.float64)
    if s.size == 1:
        return np.ones(1)
    w = np.zeros_like(s)
    gaps = np.diff(s)
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    return w / (s[-1] - s[0])


# ----------------------------------------------------------------------------------- result
@dataclass
class RobustnessResult:
    """What :func:`robustness` returns.

    Curves are indexed ``[corruption][modality]`` with one value per severity: ``accuracy``
    (fused accuracy on ``split`` with that modality corrupted), ``accuracy_low`` /
    ``accuracy_high`` (bootstrap interval), ``true_prob`` (mean probability of the true class).
    ``auc`` / ``auc_low`` / ``auc_high`` ``[corruption][modality]``: area under the accuracy
    curve over the severity range (see the module docstring). ``noise_scale[m]`` is
    :math:`\\sigma_m` of the gaussian corruption in ``noise_space``; ``baseline`` the kind of
    absence ``missing`` used; ``absent_in_data[m]`` the samples whose modality was already absent
    (presence mask) and stays so.
    """

    modalities: tuple[str, ...]
    corruptions: tuple[str, ...]
    severities: tuple[float, ...]
    accuracy: dict[str, dict[str, list[float]]]
    accuracy_low: dict[str, dict[str, list[float]]]
    accuracy_high: dict[str, dict[str, list[float]]]
    true_prob: dict[str, dict[str, list[float]]]
    auc: dict[str, dict[str, float]]
    auc_low: dict[str, dict[str, float]]
    auc_high: dict[str, dict[str, float]]
    clean_accuracy: float
    clean_true_prob: float
    n: int
    split: str = "unnamed"
    baseline: str = "zero"
    noise_space: str = "feature"
    noise_scale: dict[str, float] = field(default_factory=dict)
    level: float = 0.95
    n_resamples: int = 1000
    seed: int = 0
    absent_in_data: dict[str, int] = field(default_factory=dict)

    @property
    def noise_definition(self) -> str:
        """What ``gaussian`` severity means, in words."""
        if self.noise_space == "input":
            return ("gaussian: x_m + s * sigma_m * eps on the raw inputs (encoders re-run), "
                    f"sigma_m = std of all input entries of modality m on {self.split}")
        return ("gaussian: f_m + s * sigma_m * eps on the features, sigma_m = std of all feature "
                f"entries of modality m on {self.split}")

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (modality, corruption, severity): ``modality, corruption, severity,
        accuracy, accuracy_low, accuracy_high, true_prob, n, split, baseline, noise_space``."""
        rows = []
        for c in self.corruptions:
            for m in self.modalities:
                for j, s in enumerate(self.severities):
                    rows.append((m, c, float(s), self.accuracy[c][m][j], self.accuracy_low[c][m][j],
                                 self.accuracy_high[c][m][j], self.true_prob[c][m][j], self.n,
                                 self.split, self.baseline, self.noise_space))
        frame = pd.DataFrame(rows, columns=["modality", "corruption", "severity", "accuracy",
                                            "accuracy_low", "accuracy_high", "true_prob", "n",
                                            "split", "baseline", "noise_space"])
        return frame.astype({"severity": float, "accuracy": float, "accuracy_low": float,
                             "accuracy_high": float, "true_prob": float, "n": int})

    def auc_frame(self) -> pd.DataFrame:
        """One row per (modality, corruption): ``modality, corruption, auc, auc_low, auc_high``
        (``frame.attrs`` holds ``split``, ``n``, ``level``)."""
        rows = [(m, c, self.auc[c][m], self.auc_low[c][m], self.auc_high[c][m])
                for c in self.corruptions for m in self.modalities]
        frame = pd.DataFrame(rows, columns=["modality", "corruption", "auc", "auc_low",
                                            "auc_high"])
        frame = frame.astype({"auc": float, "auc_low": float, "auc_high": float})
        frame.attrs.update(split=self.split, n=self.n, level=self.level)
        return frame

    def plot(self, ax=None):
        """One panel per corruption, one curve per modality with its bootstrap band; returns the
        Figure. ``ax``: an Axes (one corruption) or a sequence of Axes, one per corruption."""
        if "plot" not in _PLOT:
            raise RuntimeError("the robustness figure writer is not registered; import modaldiag "
                               "(or modaldiag.report) before calling RobustnessResult.plot.")
        return _PLOT["plot"](self, ax=ax)

    def summary(self) -> str:
        """The AUCs in words, every number labelled with its split."""
        pct = f"{100 * self.level:g} % CI"
        lines = [f"Robustness on the {self.split} split (n = {self.n}; clean fused accuracy "
                 f"{self.clean_accuracy:.3f}); area under the fused-accuracy curve over severities "
                 f"{self.severities[0]:g}-{self.severities[-1]:g}, mean [{pct}]:"]
        for c in self.corruptions:
            lines.append(f"  {c}: " + ", ".join(
                f"{m} {self.auc[c][m]:.3f} [{self.auc_low[c][m]:.3f}, {self.auc_high[c][m]:.3f}]"
                for m in self.modalities))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"], d["corruptions"] = list(self.modalities), list(self.corruptions)
        d["severities"] = [float(s) for s in self.severities]
        d["noise_definition"] = self.noise_definition
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> RobustnessResult:
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        keep["modalities"] = tuple(d["modalities"])
        keep["corruptions"] = tuple(d["corruptions"])
        keep["severities"] = tuple(float(s) for s in d["severities"])
        return cls(**keep)

    def __repr__(self) -> str:
        return (f"RobustnessResult(split={self.split!r}, n={self.n}, "
                f"corruptions={list(self.corruptions)}, severities={list(self.severities)})\n"
                + self.summary())


# ----------------------------------------------------------------------------- the feature cache
@dataclass
class FeatureCache:
    """Encoder outputs of one pass over a loader (on the model's device), in loader order.

    ``present``: the data's per-sample presence ``{m: BoolTensor (N,)}`` (None: all present);
    the features of absent samples are already the baseline. ``inputs``: per-batch raw inputs on
    CPU (kept only for input-space noise). ``batch_sizes``: the loader's batch sizes.
    """

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    batch_sizes: list[int]
    present: dict[str, torch.Tensor] | None = None
    inputs: list[dict[str, torch.Tensor]] | None = None

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def chunks(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for size in self.batch_sizes:
            out.append((start, start + size))
            start += size
        return out


@torch.no_grad()
def cache_features(net, loader: Iterable, device=None, *, keep_inputs: bool = False,
                   progress: bool = False, desc: str = "robustness: encode") -> FeatureCache:
    """One encoder pass over ``loader`` (call inside :func:`probe_state`)."""
    feats: dict[str, list] = {m: [] for m in net.modalities}
    labels, sizes, inputs_kept = [], [], []
    present: dict[str, list] = {m: [] for m in net.modalities}
    any_mask = False
    batches = progress_bar(iterate_batches(net, loader, device), enabled=progress, desc=desc)
    for b, (inputs, y) in enumerate(batches):
        mask = present_of(inputs)
        f = encode_checked(net, inputs, b)  # absent samples' features are the baseline
        for m in net.modalities:
            feats[m].append(f[m])
            keep = (mask or {}).get(m)
            present[m].append(torch.ones(len(y), dtype=torch.bool, device=y.device)
                              if keep is None else keep.to(y.device))
        any_mask = any_mask or bool(mask)
        labels.append(y)
        sizes.append(int(y.shape[0]))
        if keep_inputs:
            inputs_kept.append({m: x.detach().cpu() for m, x in inputs.items()})
    return FeatureCache({m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels), sizes,
                        {m: torch.cat(v) for m, v in present.items()} if any_mask else None,
                        inputs_kept if keep_inputs else None)


def _sub_seed(seed: int, *keys) -> int:
    """A seed for one purpose, derived from ``seed`` and integer ``keys`` (independent streams)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _scalar_std(x: torch.Tensor, rows: torch.Tensor | None) -> float:
    """Std of all entries of ``x`` (N, ...) over ``rows`` (about the grand mean), DDP-summed."""
    if rows is not None:
        x = x[rows.to(x.device)]
    x = x.detach().double().flatten()
    stats = all_reduce_sum(torch.stack([x.sum(), (x * x).sum(),
                                        torch.tensor(float(x.numel()), dtype=torch.float64,
                                                     device=x.device)]).cpu())
    total, sq, count = (float(v) for v in stats)
    if count == 0:
        return 0.0
    mean = total / count
    return math.sqrt(max(sq / count - mean * mean, 0.0))


# --------------------------------------------------------------------------------- the probe
def _normalise_corruptions(corruptions) -> dict[str, str | Callable]:
    """``{name: "missing"|"gaussian"|"shuffle"|callable}`` from what the caller passed."""
    if callable(corruptions) and not isinstance(corruptions, Mapping):
        corruptions = [corruptions]
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    if isinstance(corruptions, Mapping):
        items = list(corruptions.items())
    else:
        items = []
        for c in corruptions:
            if isinstance(c, str):
                items.append((c, c))
            elif callable(c):
                items.append((getattr(c, "__name__", None) or type(c).__name__, c))
            else:
                raise ValueError(f"robustness: each corruption must be one of {list(CORRUPTIONS)} "
                                 f"or a callable fn(x, severity, generator); got {c!r}.")
    out: dict[str, str | Callable] = {}
    for name, c in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"robustness: corruption names must be non-empty strings; got "
                             f"{name!r}.")
        if isinstance(c, str) and c not in CORRUPTIONS:
            raise ValueError(f"robustness: unknown corruption {c!r}; use one of "
                             f"{list(CORRUPTIONS)} or a callable fn(x, severity, generator).")
        if not isinstance(c, str) and not callable(c):
            raise ValueError(f"robustness: corruption {name!r} must be one of {list(CORRUPTIONS)} "
                             f"or a callable fn(x, severity, generator); got {c!r}.")
        if name in out:
            raise ValueError(f"robustness: corruption {name!r} is given twice.")
        out[name] = c
    if not out:
        raise ValueError("robustness: corruptions is empty; give at least one.")
    return out


def _check_severities(severities, kinds: dict) -> tuple[float, ...]:
    try:
        sev = tuple(float(s) for s in severities)
    except (TypeError, ValueError):
        raise ValueError(f"robustness: severities must be a sequence of numbers; got "
                         f"{severities!r}.") from None
    if not sev or any(not math.isfinite(s) or s < 0 for s in sev):
        raise ValueError(f"robustness: severities must be finite numbers >= 0; got {list(sev)}.")
    if any(b <= a for a, b in zip(sev, sev[1:], strict=False)):
        raise ValueError(f"robustness: severities must be strictly increasing; got {list(sev)}.")
    fractions = [n for n, c in kinds.items() if c in _FRACTIONS]
    if fractions and sev[-1] > 1:
        raise ValueError(f"robustness: the severity of {fractions} is a fraction of samples, so "
                         f"severities must lie in [0, 1]; got {list(sev)}. Run gaussian or custom "
                         "corruptions with larger severities in a separate call.")
    return sev


def _check_modalities(modalities, mods: tuple[str, ...]) -> tuple[str, ...]:
    if modalities is None:
        return mods
    chosen = (modalities,) if isinstance(modalities, str) else tuple(modalities)
    unknown = [m for m in chosen if m not in mods]
    if unknown or not chosen:
        raise ValueError(f"robustness: modalities must be a non-empty subset of {list(mods)}; "
                         f"got {list(chosen)}.")
    return chosen


class _Scorer:
    """Per-sample correctness and true-class probability of the fused prediction."""

    def __init__(self, net, cache: FeatureCache, predict):
        self.net, self.cache = net, cache
        self.fused = predict if predict is not None else net.head

    def __call__(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hits, probs = [], []
        y = self.cache.labels
        for a, b in self.cache.chunks():
            logits = self.fused({m: f[a:b] for m, f in feats.items()})
            hits.append(logits.argmax(1) == y[a:b])  # as md.probes.evaluate
            probs.append(F.softmax(logits.float(), dim=1).gather(1, y[a:b, None])[:, 0])
        return torch.cat(hits), torch.cat(probs)


def _corrupt_rows(kind: str, cache: FeatureCache, net, m: str, s: float, order: torch.Tensor,
                  source: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features with ``m`` missing or shuffled on the first ``k`` samples of ``order``."""
    feats = dict(cache.features)
    f = feats[m]
    k = int(math.floor(s * cache.n + 0.5))
    if k == 0:
        return feats
    keep = torch.ones(cache.n, dtype=torch.bool, device=f.device)
    keep[order[:k].to(f.device)] = False
    if kind == "missing":  # the contract's absence, row by row
        return net.mask_features(feats, {m: keep})
    feats[m] = torch.where(keep.view(-1, *([1] * (f.dim() - 1))), f, f[source.to(f.device)])
    return feats


def _custom(fn: Callable, name: str, cache: FeatureCache, m: str, s: float,
            seed: int) -> dict[str, torch.Tensor]:
    feats = dict(cache.features)
    f = feats[m]
    gen = torch.Generator(device=f.device).manual_seed(seed)
    parts = []
    for a, b in cache.chunks():
        x = f[a:b].clone()
        out = fn(x, s, gen)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"robustness: custom corruption {name!r} must return a tensor shaped "
                             f"like its input {tuple(x.shape)} (modality {m!r}); got {shape}.")
        if out.is_floating_point() and not torch.isfinite(out).all():
            raise ValueError(f"robustness: custom corruption {name!r} returned NaN/inf features "
                             f"for modality {m!r} at severity {s:g}.")
        parts.append(out.to(device=f.device, dtype=f.dtype))
    feats[m] = torch.cat(parts)
    return feats


def _input_noise(net, cache: FeatureCache, m: str, s: float, sigma: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """Every feature re-encoded from the cached inputs with ``m``'s input made noisy."""
    gen = torch.Generator().manual_seed(seed)
    dev = cache.labels.device
    parts: dict[str, list] = {k: [] for k in net.modalities}
    for b, inputs in enumerate(cache.inputs):
        x = inputs[m]
        noisy = dict(inputs)
        noisy[m] = x + (s * sigma) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        feats = encode_checked(net, {k: v.to(dev) for k, v in noisy.items()}, b)
        for k in net.modalities:
            parts[k].append(feats[k])
    return {k: torch.cat(v) for k, v in parts.items()}


_ROBUSTNESS_CONSTRAINTS = {
    "loader": [ITERABLE], "noise_space": [Options(*NOISE_SPACES)],
    "n_resamples": [POSITIVE_INT], "level": [Interval(0, 1, closed="neither")], "seed": SEED,
    "baseline": BASELINE_CONSTRAINT, "baseline_loader": [None, ITERABLE], "progress": [BOOL],
    "split": [None, Satisfies(lambda s: isinstance(s, str) and bool(s.strip()),
                              "a non-empty split name such as 'test' or 'val'")],
    "predict": [None, Satisfies(callable, "a callable predict(features) -> logits")],
}


def robustness(model, loader: Iterable, *, corruptions=CORRUPTIONS,
               severities: Sequence[float] = DEFAULT_SEVERITIES, modalities=None,
               noise_space: str = "feature", n_resamples: int = 1000, level: float = 0.95,
               seed: int = 0, baseline: str | None = None, baseline_loader: Iterable | None = None,
               split: str | None = None, predict=None, device=None,
               progress: bool = False) -> RobustnessResult:
    """Fused accuracy against severity when one modality at a time is missing, noisy or shuffled.

    Parameters
    ----------
    model : MultimodalModel
    loader : iterable of ``(inputs, labels)``
        Held-out data (the test split for a final number).
    corruptions : sequence, mapping or callable, default ("missing", "gaussian", "shuffle")
        Built-in names (see the module docstring) and/or custom callables
        ``fn(x, severity, generator) -> x'`` acting on one modality's features ``x`` (B, d_m);
        a mapping ``{name: "missing" | callable}`` names them.
    severities : sequence of float, default (0, 0.25, 0.5, 0.75, 1)
        Strictly increasing, >= 0; in [0, 1] when ``missing`` or ``shuffle`` is asked for (a
        fraction of samples). ``gaussian``: noise std in units of :math:`\\sigma_m`.
    modalities : sequence of str, optional
        The modalities to corrupt (default all).
    noise_space : {"feature", "input"}, default "feature"
        Where ``gaussian`` adds noise. ``"input"`` keeps the raw inputs on CPU and re-runs the
        encoders on the noisy inputs (floating-point inputs only).
    n_resamples : int, default 1000
    level : float, default 0.95
        Bootstrap resamples and coverage of the intervals.
    seed : int, default 0
        Seed of the corrupted subsets, derangements, noise and bootstrap (the global RNG is left
        exactly as found).
    baseline : {None, "zero", "mean"}, default None
        What a missing modality becomes (None: the model's stored baseline), as in
        :func:`~modaldiag.probes.evaluate`.
    baseline_loader : iterable, optional
        With ``baseline="mean"``: the loader (the training data) whose mean features stand in.
    split : str, optional
        Name of ``loader``'s data; None reads ``loader.dataset.split``, else ``"unnamed"``.
    predict : callable, optional
        ``predict(features) -> logits`` when the fused rule is not the head (a regulator's
        test-time rule); ``missing`` then substitutes the baseline before calling it.
    progress : bool, default False

    Returns
    -------
    RobustnessResult
        ``.to_dataframe()``, ``.auc_frame()``, ``.plot()``, ``.to_dict()``, ``.summary()``.

    The model (every submodule's mode, ``requires_grad``, ``.grad``, buffers) and the global RNG
    states are left exactly as found. Encoders run once per sample (with input noise, once more
    per noisy severity and modality, on the raw inputs kept on the CPU).
    """
    validate_params(_ROBUSTNESS_CONSTRAINTS,
                    {"loader": loader, "noise_space": noise_space, "n_resamples": n_resamples,
                     "level": level, "seed": seed, "baseline": baseline,
                     "baseline_loader": baseline_loader, "progress": progress, "split": split,
                     "predict": predict}, "robustness")
    net = contract_model(model)
    kinds = _normalise_corruptions(corruptions)
    sev = _check_severities(severities, kinds)
    mods = _check_modalities(modalities, net.modalities)
    split = split or split_of(loader) or "unnamed"
    keep_inputs = noise_space == "input" and "gaussian" in kinds.values()
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        cache = cache_features(net, loader, device, keep_inputs=keep_inputs, progress=progress)
        return robustness_from_cache(net, cache, kinds, sev, mods, noise_space=noise_space,
                                     n_resamples=n_resamples, level=level, seed=seed,
                                     baseline_kind=kind, split=split, predict=predict,
                                     progress=progress)


@torch.no_grad()
def robustness_from_cache(net, cache: FeatureCache, kinds: Mapping[str, str | Callable],
                          severities: Sequence[float], modalities: Sequence[str], *,
                          noise_space: str = "feature", n_resamples: int = 1000,
                          level: float = 0.95, seed: int = 0, baseline_kind: str = "zero",
                          split: str = "unnamed", predict=None,
                          progress: bool = False) -> RobustnessResult:
    """:func:`robustness` on features already encoded (``md.diagnose`` shares its pass); call
    inside :func:`probe_state` and the baseline context."""
    if any(c == "shuffle" for c in kinds.values()) and cache.n < 2:
        raise ValueError("robustness: shuffle needs at least 2 samples on every rank.")
    score = _Scorer(net, cache, predict)
    clean_hit, clean_p = score(cache.features)
    gen = torch.Generator().manual_seed(_sub_seed(seed, 0))
    order = torch.randperm(cache.n, generator=gen)
    walk = torch.randperm(cache.n, generator=gen)
    source = torch.empty_like(walk)
    source[walk] = torch.roll(walk, -1)  # a derangement: sample walk[j] takes walk[j+1]'s feature
    sigma: dict[str, float] = {}
    for m in modalities:
        rows = None if cache.present is None else cache.present[m]
        if noise_space == "input" and "gaussian" in kinds.values():
            xs = [inp[m] for inp in cache.inputs]
            if not all(x.is_floating_point() for x in xs):
                raise ValueError(f"robustness: gaussian noise in input space needs floating-point "
                                 f"inputs; modality {m!r} has dtype {xs[0].dtype}. Use "
                                 "noise_space='feature'.")
            sigma[m] = _scalar_std(torch.cat([x.flatten(1) for x in xs]), rows)
        else:
            sigma[m] = _scalar_std(cache.features[m], rows)
    names = list(kinds)
    columns_hit, columns_p = [], []
    todo = [(c, m) for c in names for m in modalities]
    bar = progress_bar(None, enabled=progress, desc="robustness: curves",
                       total=len(todo) * len(severities), unit="point")
    with bar:
        for c, m in todo:
            what = kinds[c]
            mi = net.modalities.index(m)
            noise = None
            if what == "gaussian" and noise_space == "feature":
                f = cache.features[m]
                g = torch.Generator().manual_seed(_sub_seed(seed, 1, mi))
                noise = torch.randn(f.shape, generator=g).to(device=f.device, dtype=f.dtype)
            for s in severities:
                if what in CORRUPTIONS and s == 0:
                    hit, p = clean_hit, clean_p
                else:
                    if what in _FRACTIONS:
                        feats = _corrupt_rows(what, cache, net, m, s, order, source)
                    elif what == "gaussian" and noise_space == "feature":
                        feats = dict(cache.features)
                        feats[m] = cache.features[m] + (s * sigma[m]) * noise
                    elif what == "gaussian":
                        feats = _input_noise(net, cache, m, s, sigma[m], _sub_seed(seed, 2, mi))
                    else:
                        feats = _custom(what, c, cache, m, s,
                                        _sub_seed(seed, 3, mi, *c.encode()))
                    hit, p = score(net.mask_features(feats, cache.present))
                columns_hit.append(hit)
                columns_p.append(p)
                bar.update()
    # the union of every rank's samples, in rank order
    hits = all_gather_cat(torch.stack([clean_hit, *columns_hit], 1).to(torch.uint8)).cpu()
    probs = all_gather_cat(torch.stack([clean_p, *columns_p], 1).float()).cpu()
    absent = ({m: int(all_reduce_sum((~v).sum().double().cpu())) for m, v in cache.present.items()}
              if cache.present is not None else {m: 0 for m in net.modalities})
    return _summarise(hits.double().numpy(), probs.double().numpy(), names, list(modalities),
                      tuple(float(s) for s in severities), n_resamples=n_resamples, level=level,
                      seed=seed, split=split, baseline=baseline_kind, noise_space=noise_space,
                      sigma=sigma, absent=absent)


def _summarise(hits: np.ndarray, probs: np.ndarray, names: list[str], mods: list[str],
               sev: tuple[float, ...], **kw) -> RobustnessResult:
    """Point estimates, bootstrap intervals and AUCs from per-sample matrices ``(n, 1 + K*S)``
    (column 0: clean; then corruption-major, modality, severity)."""
    n, S = hits.shape[0], len(sev)
    w = _auc_weights(sev)
    curves = hits[:, 1:].reshape(n, -1, S)  # (n, K, S)
    per_sample_auc = curves @ w  # (n, K)
    stacked = np.concatenate([hits[:, 1:], per_sample_auc], axis=1)
    boot = _boot_means(stacked, kw["n_resamples"], _sub_seed(kw["seed"], 4))
    q = 100 * np.array([(1 - kw["level"]) / 2, (1 + kw["level"]) / 2])
    lo, hi = np.percentile(boot, q, axis=0)
    est = stacked.mean(0)
    p_est = probs[:, 1:].mean(0)
    K = curves.shape[1]
    acc, acc_lo, acc_hi, tp, auc, auc_lo, auc_hi = ({} for _ in range(7))
    for k in range(K):
        c, m = names[k // len(mods)], mods[k % len(mods)]
        cols = slice(k * S, (k + 1) * S)
        for store, vals in ((acc, est), (acc_lo, lo), (acc_hi, hi), (tp, p_est)):
            store.setdefault(c, {})[m] = [float(v) for v in vals[cols]]
        for store, vals in ((auc, est), (auc_lo, lo), (auc_hi, hi)):
            store.setdefault(c, {})[m] = float(vals[K * S + k])
    return RobustnessResult(
        tuple(mods), tuple(names), sev, acc, acc_lo, acc_hi, tp, auc, auc_lo, auc_hi,
        float(hits[:, 0].mean()), float(probs[:, 0].mean()), n, kw["split"], kw["baseline"],
        kw["noise_space"], {m: float(v) for m, v in kw["sigma"].items()}, kw["level"],
        kw["n_resamples"], kw["seed"], dict(kw["absent"]))
