"""P4: sample-level modality valuation with Shapley values (Wei et al., CVPR 2024).

Players are modalities; coalition S runs the head with the modalities outside S absent (replaced
by their baseline). Encoders run once per batch; only the head runs per coalition, and all
coalitions of a batch go through the head in one stacked call.

Missing modalities (a per-sample presence mask from the loader): for a sample whose modality m is
absent, m's feature is its baseline in every coalition, and the coalition S is played as
``S ∩ present`` (its size too, for the ``paper`` value ``|S| * 1[correct]``): m is a dummy player
and its Shapley value is exactly 0 for that sample; the other modalities share
``v(present) - v(empty)``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..utils.distributed import all_gather_cat, all_reduce_sum, is_distributed, rank
from ..utils.io import atomic_write_bytes, atomic_write_json
from ..utils.progress import length_or_none, progress_bar
from ..utils.validation import BOOL, POSITIVE_INT, InstanceOf, Options, Satisfies, validate_params
from ._common import (
    BASELINE_CONSTRAINT,
    ITERABLE,
    SEED,
    autocast_context,
    baseline_context,
    contract_model,
    encode_checked,
    iterate_batches,
    present_of,
    probe_state,
)

__all__ = ["shapley", "shapley_to_disk", "ShapleyValues", "VALUE_FUNCTIONS", "coalition_masks",
           "shapley_weights", "value_of_logits"]

VALUE_FUNCTIONS = ("paper", "correct", "prob", "logit", "neg_loss")
EXACT_MAX_M = 10


def value_of_logits(logits: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor,
                    value: str) -> torch.Tensor:
    """Coalition values ``(K, B)`` from logits ``(K, B, C)``.

    ``sizes`` (K,) holds |S| of each coalition. ``paper``: |S| * 1[argmax == y] (so v(empty) = 0);
    ``correct``: 1[argmax == y]; ``prob``: softmax probability of y; ``logit``: logit of y;
    ``neg_loss``: -CE.
    """
    y = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    if value in ("paper", "correct"):
        correct = (logits.argmax(-1) == labels.view(1, -1)).double()
        return correct * sizes.view(-1, 1).double() if value == "paper" else correct
    if value == "logit":
        return logits.gather(-1, y).squeeze(-1).double()
    logp = F.log_softmax(logits.double(), dim=-1).gather(-1, y).squeeze(-1)
    return logp.exp() if value == "prob" else logp


def coalition_masks(m: int) -> torch.Tensor:
    """All 2^M coalitions as a BoolTensor (2^M, M); row 0 is empty, the last row is full."""
    return torch.tensor(list(itertools.product([False, True], repeat=m)), dtype=torch.bool).flip(1)


def shapley_weights(masks: torch.Tensor) -> torch.Tensor:
    """Matrix W (K, M) with ``phi = v @ W`` for values ``v`` (B, K) over the coalitions ``masks``.

    Coalition S gets +s!(M-s-1)!/M! (s = |S|-1) for each member and -|S|!(M-|S|-1)!/M! for each
    non-member: the exact Shapley formula, rearranged per coalition.
    """
    k, m = masks.shape
    sizes = masks.sum(1)
    fact = [math.factorial(i) for i in range(m + 1)]
    w = torch.zeros(k, m, dtype=torch.float64)
    for row in range(k):
        s = int(sizes[row])
        if s > 0:
            w[row, masks[row]] = fact[s - 1] * fact[m - s] / fact[m]
        if s < m:
            w[row, ~masks[row]] = -fact[s] * fact[m - s - 1] / fact[m]
    return w


@functools.lru_cache(maxsize=16)
def _exact_game(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coalition masks, Shapley weight matrix and coalition sizes for M players (cached)."""
    masks = coalition_masks(m)
    return masks, shapley_weights(masks), masks.sum(1)


@dataclass
class ShapleyValues:
    """Per-sample, per-modality Shapley values.

    Attributes
    ----------
    values : Tensor (N, M), float64
        ``values[i, j]`` is modality ``modalities[j]``'s contribution for sample i.
    modalities : tuple[str, ...]
    full_value, empty_value : Tensor (N,)
        ``v(all modalities)`` and ``v(no modality)``; ``values.sum(1) == full - empty``.
    labels, predictions : Tensor (N,)
        True labels and the fused model's predicted class.
    value, baseline, method : str
        How the game was defined and solved.
    stderr : Tensor (N, M) or None
        Standard error of each value (permutation mode only).
    """

    values: torch.Tensor
    modalities: tuple[str, ...]
    full_value: torch.Tensor
    empty_value: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    value: str = "paper"
    baseline: str = "zero"
    method: str = "exact"
    stderr: torch.Tensor | None = None
    n_permutations: int | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, index) -> ShapleyValues:
        """Rows: ``sv[mask]``, ``sv[:100]``, ``sv[sv.labels == 3]``."""
        def pick(t):
            return None if t is None else t[index]

        return ShapleyValues(pick(self.values), self.modalities, pick(self.full_value),
                             pick(self.empty_value), pick(self.labels), pick(self.predictions),
                             self.value, self.baseline, self.method, pick(self.stderr),
                             self.n_permutations, self.class_names)

    def mean(self) -> dict[str, float]:
        """Dataset-level contribution: mean phi_m over samples."""
        means = self.values.mean(0)
        return {m: float(means[i]) for i, m in enumerate(self.modalities)}

    def low_contribution_share(self) -> dict[str, float]:
        """Share of samples where modality m is low-contributing: ``phi_m < v(all) / M``."""
        fair = (self.full_value / len(self.modalities)).unsqueeze(1)
        low = (self.values < fair).double().mean(0)
        return {m: float(low[i]) for i, m in enumerate(self.modalities)}

    def imbalance_degree(self) -> float:
        """Spread of dataset-level contributions: ``sum_{i<j} |phi_i - phi_j| / ((M-1) sum |phi|)``.

        0 when every modality contributes equally, 1 when one modality contributes everything.
        For M = 2 it is ``|phi_a - phi_b| / (|phi_a| + |phi_b|)``.
        """
        phi = self.values.mean(0)
        m = len(self.modalities)
        total = float(phi.abs().sum())
        if total == 0:
            return 0.0
        spread = sum(abs(float(phi[i] - phi[j])) for i in range(m) for j in range(i + 1, m))
        return spread / ((m - 1) * total)

    def per_class(self) -> dict[int, dict[str, float]]:
        """Mean phi_m per true class."""
        out = {}
        for c in torch.unique(self.labels).tolist():
            sel = self.values[self.labels == c].mean(0)
            out[int(c)] = {m: float(sel[i]) for i, m in enumerate(self.modalities)}
        return out

    @property
    def dominant(self) -> str:
        means = self.mean()
        return max(means, key=means.get)

    @property
    def weakest(self) -> str:
        means = self.mean()
        return min(means, key=means.get)

    def to_shap(self):
        """A ``shap.Explanation`` (values, base_values = v(empty), feature_names = modalities).

        ``data`` holds the values too, so beeswarm colours points by contribution.
        """
        import shap

        vals = self.values.numpy()
        return shap.Explanation(values=vals, base_values=self.empty_value.numpy(), data=vals.copy(),
                                feature_names=list(self.modalities))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per sample, ready to save (``frame.to_csv(...)``) or group.

        Returns
        -------
        pandas.DataFrame (N rows)
            ``sample`` (row index in the probed loader's order), ``label`` (true class),
            ``prediction`` (the fused model's class), one column per modality holding its Shapley
            value (float64, the value function named by ``self.value``), then ``full_value``
            (``v(all modalities)``) and ``empty_value`` (``v(no modality)``); in permutation
            mode also ``stderr <modality>`` (standard error of that value).

        Raises
        ------
        ValueError
            A modality is named like one of the fixed columns.
        """
        fixed = ["sample", "label", "prediction", "full_value", "empty_value"]
        clash = [m for m in self.modalities if m in fixed or m.startswith("stderr ")]
        if clash:
            raise ValueError(f"modalities {clash} are named like a fixed column of the table "
                             f"({fixed}); rename those modalities.")
        values = self.values.detach().cpu().double().numpy()
        columns: dict[str, object] = {
            "sample": np.arange(len(self)),
            "label": self.labels.detach().cpu().numpy(),
            "prediction": self.predictions.detach().cpu().numpy(),
        }
        for j, m in enumerate(self.modalities):
            columns[m] = values[:, j]
        for name in ("full_value", "empty_value"):
            tensor = getattr(self, name)
            if tensor is not None:
                columns[name] = tensor.detach().cpu().double().numpy()
        if self.stderr is not None:
            err = self.stderr.detach().cpu().double().numpy()
            for j, m in enumerate(self.modalities):
                columns[f"stderr {m}"] = err[:, j]
        return pd.DataFrame(columns)

    def to_dict(self, per_sample: bool = False) -> dict:
        out = {"modalities": list(self.modalities), "value": self.value, "baseline": self.baseline,
               "method": self.method, "n": len(self), "mean": self.mean(),
               "low_contribution_share": self.low_contribution_share(),
               "imbalance_degree": self.imbalance_degree(),
               "mean_full_value": float(self.full_value.mean()),
               "mean_empty_value": float(self.empty_value.mean())}
        if self.stderr is not None:
            out["mean_stderr"] = {m: float(self.stderr[:, i].mean())
                                  for i, m in enumerate(self.modalities)}
            out["n_permutations"] = self.n_permutations
        if per_sample:
            out["values"] = self.values.tolist()
            out["labels"] = self.labels.tolist()
        return out

    @classmethod
    def load(cls, directory) -> ShapleyValues:
        """Read back the chunks written by :func:`shapley_to_disk` (in chunk order).

        The game's description comes from ``summary.json``, or from the job fingerprint
        (``shapley-job.json``) when an interrupted run wrote no summary yet.
        """
        directory = Path(directory)
        described = [directory / "summary.json", directory / JOB_FILE,
                     *sorted(directory.glob(f"rank*-{JOB_FILE}"))]
        source = next((p for p in described if p.is_file()), None)
        if source is None:
            raise ValueError(f"{str(directory)!r} holds no summary.json or {JOB_FILE}; it was not "
                             "written by md.probes.shapley_to_disk.")
        summary = json.loads(source.read_text())
        chunks = sorted(p for p in directory.glob("*chunk-*.npz") if _CHUNK.match(p.name))
        if not chunks:
            raise ValueError(f"no Shapley chunks in {str(directory)!r}.")
        parts = {k: [] for k in ("values", "full_value", "empty_value", "labels", "predictions")}
        for path in chunks:
            with np.load(path, allow_pickle=False) as data:
                for k in parts:
                    parts[k].append(torch.from_numpy(data[k]))
        cat = {k: torch.cat(v) for k, v in parts.items()}
        return cls(cat["values"], tuple(summary["modalities"]), cat["full_value"],
                   cat["empty_value"], cat["labels"], cat["predictions"], summary["value"],
                   summary["baseline"], summary["method"])

    def __repr__(self) -> str:
        means = ", ".join(f"{m}={v:.3f}" for m, v in self.mean().items())
        return f"ShapleyValues(n={len(self)}, value={self.value!r}, method={self.method!r}, mean: {means})"


def _permutation_masks(m: int, n_pairs: int, gen: torch.Generator):
    """Prefix coalitions of ``n_pairs`` antithetic permutation pairs.

    Returns ``perms`` (P, M) and ``prefix`` (P, M+1, M) bool: ``prefix[p, j]`` holds the first j
    players of permutation p.
    """
    perms = torch.stack([torch.randperm(m, generator=gen) for _ in range(n_pairs)])
    perms = torch.cat([perms, perms.flip(1)])  # antithetic: each permutation and its reverse
    p = perms.shape[0]
    prefix = torch.zeros(p, m + 1, m, dtype=torch.bool)
    for j in range(1, m + 1):
        prefix[:, j] = prefix[:, j - 1]
        prefix[torch.arange(p), j, perms[:, j - 1]] = True
    return perms, prefix


_METHODS = ("auto", "exact", "permutation")
_VALUE_CONSTRAINT = [Options(*VALUE_FUNCTIONS),
                     Satisfies(callable, "a callable (logits (K, B, C), labels (B,), sizes (K,)) "
                                         "-> values (K, B)")]
_SHAPLEY_CONSTRAINTS = {
    "loader": [ITERABLE],
    "value": _VALUE_CONSTRAINT,
    "baseline": BASELINE_CONSTRAINT,
    "method": [Options(*_METHODS)],
    "n_permutations": [POSITIVE_INT],
    "seed": SEED,
    "baseline_loader": [None, ITERABLE],
    "max_rows": [POSITIVE_INT],
    "progress": [BOOL],
    "autocast": [BOOL],
    "resume": [BOOL],
    "directory": [InstanceOf(str, os.PathLike, what="a folder path (str or os.PathLike)")],
}


def _batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The permutation generator of one batch: depends on (seed, batch index) only, so a batch
    gets the same permutations in memory, on disk, and when a run resumes."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) % 2**63)


class _Game:
    """The Shapley game of one probe call, solved batch by batch."""

    def __init__(self, net, value, method: str, n_permutations: int, seed: int, max_rows: int,
                 autocast: bool):
        self.net, self.m = net, len(net.modalities)
        self.method = ("exact" if self.m <= EXACT_MAX_M else "permutation") if method == "auto" else method
        self.value_fn = value if callable(value) else (lambda lg, y, s: value_of_logits(lg, y, s, value))
        self.n_permutations, self.seed = n_permutations, seed
        self.max_rows, self.autocast = max_rows, autocast
        self.checked = False
        if self.method == "exact":
            self.masks, self.weights, self.sizes = _exact_game(self.m)

    def batch(self, inputs, labels, b: int) -> dict[str, torch.Tensor]:
        """Per-sample ``values``, ``full_value``, ``empty_value``, ``labels``, ``predictions``
        (and ``stderr`` in permutation mode) of one batch, on the CPU."""
        net = self.net
        with autocast_context(self.autocast, inputs):
            feats = encode_checked(net, inputs, b)
            if not self.checked:
                net.check_absence(feats)
                self.checked = True
        out = {}
        present = _presence_matrix(present_of(inputs), net.modalities, labels)
        if self.method == "exact":
            with autocast_context(self.autocast, inputs):
                v, full_logits = _coalition_values(net, feats, labels, self.value_fn, self.masks,
                                                   present, self.max_rows, self.sizes)
            phi = v.T @ self.weights.to(v.device)
            full, empty, pred = v[-1], v[0], full_logits.argmax(-1)
        else:
            phi, err, full, empty, pred = _permutation_batch(
                net, feats, labels, self.value_fn, self.m, self.n_permutations,
                _batch_generator(self.seed, b), self.max_rows, present)
            out["stderr"] = err.cpu()
        if present is not None:  # the dummy axiom, free of float64 rounding in v.T @ W
            phi = phi.masked_fill(~present.to(phi.device), 0.0)
        out.update(values=phi.cpu(), full_value=full.cpu(), empty_value=empty.cpu(),
                   labels=labels.cpu(), predictions=pred.cpu())
        return out


def _value_name(value) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", "custom")


@torch.no_grad()
def shapley(
    model,
    loader: Iterable,
    value: str | Callable = "paper",
    baseline: str | None = None,
    method: str = "auto",
    *,
    n_permutations: int = 64,
    seed: int = 0,
    baseline_loader: Iterable | None = None,
    max_rows: int = 65536,
    device=None,
    progress: bool = False,
    autocast: bool = False,
) -> ShapleyValues:
    """Shapley value of every modality for every sample of ``loader``.

    Parameters
    ----------
    model : MultimodalModel
        Run in eval mode. The model (every submodule's mode, ``requires_grad``, ``.grad``,
        buffers) and the global RNG states are left exactly as found.
    loader : iterable of ``(inputs, labels)``
        or ``(inputs, labels, present)``: a sample's absent modality is a dummy player with value
        exactly 0 (see the module docstring).
    value : {"paper", "correct", "prob", "logit", "neg_loss"} or callable, default "paper"
        Coalition value. ``paper`` is ``|S| * 1[argmax H(S) == y]`` (CVPR 2024): contributions of a
        correctly classified sample sum to M and a balanced sample has ``phi_m = 1``. A callable
        gets ``(logits (K, B, C), labels (B,), sizes (K,))`` and returns ``(K, B)``.
    baseline : {None, "zero", "mean"}, default None
        What an absent modality's feature becomes. None: the model's stored baseline
        (``model.set_baseline``; zeros unless set). ``"zero"`` / ``"mean"`` override it for this
        call; ``mean`` uses the mean over ``baseline_loader`` (pass the training loader) or the
        model's stored mean baseline. The kind used is recorded in ``ShapleyValues.baseline``.
    method : {"auto", "exact", "permutation"}, default "auto"
        ``exact`` enumerates all 2^M coalitions (efficiency holds to float64 precision);
        ``permutation`` averages marginal contributions over ``2 * n_permutations`` permutations
        (antithetic pairs, shared by the samples of a batch) and reports a standard error;
        ``auto`` is exact for M <= 10.
    n_permutations : int, default 64
        Antithetic pairs per batch in permutation mode.
    seed : int, default 0
        Seed of the permutations (each batch draws from its own generator seeded by
        ``(seed, batch index)``; the global RNG is not used).
    baseline_loader : iterable, optional
        With ``baseline="mean"``: the loader whose mean features stand in for absent modalities.
    max_rows : int, default 65536
        Rows per stacked head call (bounds memory).
    autocast : bool, default False
        Run encoders and head under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU);
        values are computed from the logits in float64 either way.

    Returns
    -------
    ShapleyValues
    """
    validate_params(_SHAPLEY_CONSTRAINTS,
                    {"loader": loader, "value": value, "baseline": baseline, "method": method,
                     "n_permutations": n_permutations, "seed": seed,
                     "baseline_loader": baseline_loader, "max_rows": max_rows,
                     "progress": progress, "autocast": autocast}, "shapley")
    net = contract_model(model)
    parts: dict[str, list[torch.Tensor]] = {}
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        game = _Game(net, value, method, n_permutations, seed, max_rows, autocast)
        batches = iterate_batches(net, loader, device)
        for b, (inputs, labels) in enumerate(progress_bar(batches, enabled=progress,
                                                          desc="shapley",
                                                          total=length_or_none(loader))):
            for key, t in game.batch(inputs, labels, b).items():
                parts.setdefault(key, []).append(t)
        cat = {key: all_gather_cat(torch.cat(v)) for key, v in parts.items()}  # union over ranks
    return ShapleyValues(
        cat["values"], net.modalities, cat["full_value"], cat["empty_value"], cat["labels"],
        cat["predictions"], _value_name(value), kind, game.method, cat.get("stderr"),
        2 * n_permutations if game.method == "permutation" else None,
    )


# ---------------------------------------------------------------- shapley_to_disk
_CHUNK = re.compile(r"^(rank\d+-)?chunk-\d{6}\.npz$")
_CHUNK_KEYS = {"values", "full_value", "empty_value", "labels", "predictions"}
JOB_FILE = "shapley-job.json"


def _modaldiag_version() -> str:
    try:
        return importlib.metadata.version("modaldiag")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _hash_tensors(items) -> str:
    """sha256 over ``(name, tensor)`` pairs: names, dtypes, shapes and the raw bytes."""
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _value_id(value) -> str:
    if isinstance(value, str):
        return value
    code = getattr(value, "__code__", None)
    digest = ""
    if code is not None:  # bytecode, names and literal constants (nested code prints addresses)
        consts = tuple(c for c in code.co_consts if not hasattr(c, "co_code"))
        digest = hashlib.sha256(code.co_code + repr((code.co_names, consts)).encode()).hexdigest()[:16]
    return f"callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')} {digest}"


def _loader_size(loader) -> dict:
    def size(obj):
        try:
            return len(obj)
        except TypeError:
            return None

    dataset = getattr(loader, "dataset", None)
    return {"batches": size(loader), "samples": size(dataset) if dataset is not None else None}


def _job_fingerprint(net, kind: str, value, method: str, n_permutations: int, seed: int,
                     autocast: bool, loader, inputs, labels) -> dict:
    """What the chunks of a ``shapley_to_disk`` job depend on (compared on resume)."""
    return {
        "modaldiag": _modaldiag_version(),
        "modalities": list(net.modalities),
        "model": _hash_tensors(sorted(net.state_dict().items())),
        "value": _value_id(value), "baseline": kind, "method": method,
        "n_permutations": n_permutations, "seed": seed, "autocast": autocast,
        "loader": {**_loader_size(loader),
                   "first_batch": _hash_tensors([*sorted(inputs.items()), ("labels", labels),
                                                 *sorted(("present." + k, t) for k, t in
                                                         (present_of(inputs) or {}).items())])},
    }


def _describe_difference(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "model":
            diffs.append("the model's weights or buffers (state_dict hash) differ")
        elif key == "loader" and isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append("the loader's first batch (inputs/labels hash) differs"
                                 if sub == "first_batch" else
                                 f"the loader's {sub}: {a.get(sub)!r} then, {b.get(sub)!r} now")
        else:
            diffs.append(f"{key}: {a!r} then, {b!r} now")
    return diffs


def _own_chunk(path: Path) -> bool:
    """Whether ``path`` is a Shapley chunk modaldiag wrote (name pattern and exact npz keys)."""
    if not _CHUNK.match(path.name) or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return set(data.files) == _CHUNK_KEYS
    except Exception:  # noqa: BLE001 - unreadable: not recognisably ours
        return False


def _chunks(directory: Path, prefix: str) -> list[Path]:
    return sorted(p for p in directory.glob(f"{prefix}chunk-*.npz")
                  if _CHUNK.match(p.name) and (prefix or not p.name.startswith("rank")))


def _prepare_job(directory: Path, prefix: str, fingerprint: dict, resume: bool) -> None:
    """Check (``resume=True``) or reset (``resume=False``) the chunk folder for this job."""
    job = directory / f"{prefix}{JOB_FILE}"
    chunks = _chunks(directory, prefix)
    foreign = [p.name for p in chunks if not _own_chunk(p)]
    if foreign:
        raise ValueError(
            f"{str(directory)!r} holds files named like Shapley chunks that modaldiag did not "
            f"write ({', '.join(foreign[:3])}); modaldiag will not overwrite them. Move them or "
            "choose another directory.")
    old = None
    if job.exists():
        try:
            old = json.loads(job.read_text())
        except (OSError, ValueError):
            old = None
    if resume and chunks:
        if old is None:
            raise ValueError(
                f"{str(directory)!r} holds {len(chunks)} Shapley chunks without a readable job "
                f"fingerprint ({job.name}), so modaldiag cannot tell which model, value function "
                "and loader they belong to. Pass resume=False to recompute (deletes only those "
                "chunk files) or choose another directory.")
        diffs = _describe_difference(old, fingerprint)
        if diffs:
            raise ValueError(
                f"{str(directory)!r} holds {len(chunks)} Shapley chunks of a different job, so "
                f"they cannot be resumed: {'; '.join(diffs)}. Pass resume=False to start over "
                "(deletes only modaldiag's chunk files there) or choose another directory.")
    if not resume:
        for path in chunks:
            path.unlink()
    if not resume or old != fingerprint:
        summary = directory / "summary.json"
        if old is not None and rank() == 0 and summary.is_file():
            summary.unlink()  # the previous job's, which the old fingerprint describes
        atomic_write_json(job, fingerprint)


@torch.no_grad()
def shapley_to_disk(
    model,
    loader: Iterable,
    directory: str | os.PathLike,
    value: str | Callable = "paper",
    baseline: str | None = None,
    method: str = "auto",
    *,
    resume: bool = True,
    progress: bool = False,
    n_permutations: int = 64,
    seed: int = 0,
    baseline_loader: Iterable | None = None,
    max_rows: int = 65536,
    device=None,
    autocast: bool = False,
) -> dict:
    """Value a dataset of any size with memory bounded independently of N.

    Each batch's per-sample results are written atomically to ``directory/chunk-NNNNNN.npz``
    (``rank<r>-chunk-...`` under DDP); only running sums stay in memory. The arguments are those
    of :func:`shapley`. Returns the summary (also written to ``summary.json``): mean contribution
    and low-contribution share per modality, N, and how the game was defined (value, baseline,
    method). Read everything back with :meth:`ShapleyValues.load`.

    Parameters
    ----------
    directory : str or os.PathLike
        The chunk folder. It also receives ``shapley-job.json``, the job's fingerprint: a hash of
        the model's ``state_dict`` (weights, buffers, stored baseline), the value function,
        baseline kind, method, ``n_permutations``, ``seed``, ``autocast``, the loader's size and a
        hash of its first batch, and the modaldiag version.
    resume : bool, default True
        Batches whose chunk already exists are not recomputed, so an interrupted run continues
        where it stopped (the loader must yield the same batches in the same order). Chunks of a
        different job (fingerprint mismatch) are refused with a ValueError naming what differs.
        ``resume=False`` deletes the chunk files modaldiag wrote in ``directory`` (and nothing
        else) and recomputes every batch.
    """
    validate_params(_SHAPLEY_CONSTRAINTS,
                    {"loader": loader, "directory": directory, "value": value,
                     "baseline": baseline, "method": method, "resume": resume,
                     "n_permutations": n_permutations, "seed": seed,
                     "baseline_loader": baseline_loader, "max_rows": max_rows,
                     "progress": progress, "autocast": autocast}, "shapley_to_disk")
    net = contract_model(model)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"directory {str(directory)!r} is a file; pass a folder for the chunks.")
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f"rank{rank()}-" if is_distributed() else ""
    m = len(net.modalities)
    sums = torch.zeros(m, dtype=torch.float64)
    low = torch.zeros(m, dtype=torch.float64)
    n = 0
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        game = _Game(net, value, method, n_permutations, seed, max_rows, autocast)
        batches = iterate_batches(net, loader, device)
        for b, (inputs, labels) in enumerate(progress_bar(batches, enabled=progress,
                                                          desc="shapley",
                                                          total=length_or_none(loader))):
            if b == 0:
                fingerprint = _job_fingerprint(net, kind, value, game.method, n_permutations,
                                               seed, autocast, loader, inputs, labels)
                _prepare_job(directory, prefix, fingerprint, resume)
            path = directory / f"{prefix}chunk-{b:06d}.npz"
            if resume and path.exists():
                with np.load(path, allow_pickle=False) as data:
                    values = torch.from_numpy(data["values"])
                    full = torch.from_numpy(data["full_value"])
            else:
                out = game.batch(inputs, labels, b)
                values, full = out["values"], out["full_value"]
                buffer = io.BytesIO()
                np.savez(buffer, **{k: out[k].numpy() for k in sorted(_CHUNK_KEYS)})
                atomic_write_bytes(path, buffer.getvalue())
            sums += values.sum(0)
            low += (values < (full / m).unsqueeze(1)).double().sum(0)
            n += values.shape[0]
    totals = all_reduce_sum(torch.cat([sums, low, torch.tensor([float(n)], dtype=torch.float64)]))
    total_n = float(totals[-1])
    summary = {"modalities": list(net.modalities), "value": _value_name(value), "baseline": kind,
               "method": game.method, "n": int(total_n),
               "mean": {mod: float(totals[i] / total_n) for i, mod in enumerate(net.modalities)},
               "low_contribution_share": {mod: float(totals[m + i] / total_n)
                                          for i, mod in enumerate(net.modalities)}}
    if not is_distributed() or rank() == 0:
        atomic_write_json(directory / "summary.json", summary)
    return summary

def _presence_matrix(present, modalities, labels) -> torch.Tensor | None:
    """``present`` ``{m: (B,)}`` as a BoolTensor (B, M) in the order of ``modalities``, or None."""
    if not present:
        return None
    cols = [present[m].to(labels.device) if m in present
            else torch.ones_like(labels, dtype=torch.bool) for m in modalities]
    return torch.stack(cols, 1)


def _restricted_coalitions(masks: torch.Tensor, present: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalition ``k`` played by sample ``i`` is ``masks[k] & present[i]``: the distinct such
    coalitions ``(U, M)`` and ``index (K, B)`` with ``unique[index[k, i]] == masks[k] & present[i]``."""
    m = masks.shape[1]
    if m > 62:
        raise ValueError(f"shapley with a presence mask supports at most 62 modalities; got {m}.")
    bits = 2 ** torch.arange(m, dtype=torch.int64, device=present.device)
    played = masks.to(present.device).unsqueeze(1) & present.unsqueeze(0)  # (K, B, M)
    codes = (played.long() * bits).sum(-1)
    unique, index = torch.unique(codes, return_inverse=True)
    return (unique.unsqueeze(1) & bits) != 0, index


def _coalition_values(net, feats, labels, value_fn, masks, present, max_rows, sizes=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``(K, B)`` (float64) of coalitions ``masks`` (K, M), whose last row is the full
    coalition, and the logits ``(B, C)`` of the full coalition. With a presence matrix ``(B, M)``
    sample ``i`` plays ``masks[k] & present[i]`` (its absent modalities are dummy players)."""
    if present is None:
        logits = net.head_coalitions(feats, masks, max_rows=max_rows).float()
        sizes = masks.sum(1) if sizes is None else sizes
        return value_fn(logits, labels, sizes.to(labels.device)).double(), logits[-1]
    unique, index = _restricted_coalitions(masks, present)
    logits = net.head_coalitions(feats, unique, max_rows=max_rows).float()  # (U, B, C)
    v = value_fn(logits, labels, unique.sum(1).to(labels.device)).double()  # (U, B)
    rows = torch.arange(labels.shape[0], device=logits.device)
    return v.gather(0, index.to(v.device)), logits[index[-1].to(logits.device), rows]


def _permutation_batch(net, feats, labels, value_fn, m, n_pairs, gen, max_rows, present=None):
    perms, prefix = _permutation_masks(m, n_pairs, gen)
    p = perms.shape[0]
    flat = prefix.reshape(-1, m)
    if present is not None:
        v, full_logits = _coalition_values(net, feats, labels, value_fn,
                                           torch.cat([flat, flat[m:m + 1]]), present, max_rows)
        return _permutation_phi(perms, v[:-1].view(p, m + 1, -1), n_pairs, m,
                                full_logits.argmax(-1))
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    logits = net.head_coalitions(feats, unique, max_rows=max_rows)
    sizes = unique.sum(1).to(labels.device)
    v_unique = value_fn(logits, labels, sizes).double()  # (U, B)
    v = v_unique[inverse.to(v_unique.device)].view(p, m + 1, -1)  # (P, M+1, B)
    full_index = int(inverse.view(p, m + 1)[0, m])
    return _permutation_phi(perms, v, n_pairs, m, logits[full_index].argmax(-1))


def _permutation_phi(perms, v, n_pairs, m, pred):
    """Shapley estimates from the values ``v (P, M+1, B)`` of every permutation's prefixes."""
    p = perms.shape[0]
    marginal = v[:, 1:] - v[:, :-1]  # (P, M, B): contribution of the j-th player of perm p
    contrib = torch.zeros(p, m, v.shape[-1], dtype=torch.float64, device=v.device)
    contrib.scatter_(1, perms.to(v.device).unsqueeze(-1).expand(-1, -1, v.shape[-1]), marginal)
    pairs = (contrib[:n_pairs] + contrib[n_pairs:]) / 2  # antithetic pair means, independent
    phi = pairs.mean(0).T  # (B, M)
    err = (pairs.std(0, unbiased=True) / math.sqrt(n_pairs)).T if n_pairs > 1 else torch.full_like(phi, float("nan"))
    return phi, err, v[0, m], v[0, 0], pred
