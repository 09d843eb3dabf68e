"""P3: representation separability (Diagnosing & Re-learning, ECCV 2024, Sec. 3.2).

Per modality, features of the training set D and a held-out validation set V (eval mode):
min-max scale each dimension to [-1, 1] (fitted on that set), k-means with k = number of classes
(fixed seed, explicit ``n_init``), purity = (1/N) * sum over clusters of the count of its most
common label. Learning-state gap ``g_m = |purity(D) - purity(V)|``.

Extras: linear-probe accuracy (logistic regression on frozen train features, scored on val) and
the silhouette of val features under the true labels. Above ``minibatch_threshold`` samples,
MiniBatchKMeans is used; above ``max_samples`` a seeded subsample.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..utils.distributed import all_gather_cat, is_distributed
from ..utils.progress import progress_bar
from ..utils.torch_utils import preserved_state
from ..utils.validation import BOOL, POSITIVE_INT, validate_params
from ._common import (
    ITERABLE,
    SEED,
    contract_model,
    encode_checked,
    iterate_batches,
    present_of,
    probe_state,
)

__all__ = ["Separability", "separability", "purity", "collect_features", "linear_probe_accuracy"]


@dataclass
class Separability:
    """Separability of one modality's features on the train and val sets.

    ``train_split`` / ``val_split`` name the data the purities were measured on (D and V; the
    linear probe is fitted on D and scored on V).
    """

    modality: str
    train_purity: float
    val_purity: float
    gap: float
    linear_probe: float | None = None
    silhouette: float | None = None
    n_train: int = 0
    n_val: int = 0
    train_split: str = "train"
    val_split: str = "val"

    def to_dict(self) -> dict:
        return asdict(self)


_PARAMETER_CONSTRAINTS = {
    "train_loader": [ITERABLE], "val_loader": [ITERABLE], "loader": [ITERABLE],
    "seed": SEED, "n_init": [POSITIVE_INT], "linear_probe": [BOOL], "silhouette": [BOOL],
    "max_samples": [POSITIVE_INT], "minibatch_threshold": [POSITIVE_INT],
    "num_classes": [POSITIVE_INT], "progress": [BOOL], "present": [BOOL],
}


@torch.no_grad()
def collect_features(model, loader: Iterable, device=None, *, present: bool = False):
    """Encoder outputs ``{m: (N, d_m)}`` (float32, flattened) and labels ``(N,)`` over ``loader``.

    A sample whose modality is absent (presence mask in the batches) has the model's baseline as
    that modality's feature row. ``present=True`` also returns ``{m: bool ndarray (N,)}``, the
    presence of every sample (True everywhere for a loader without masks), as a third item.
    Runs in eval mode; the model and the global RNG states are left exactly as found.
    """
    validate_params(_PARAMETER_CONSTRAINTS, {"loader": loader, "present": present},
                    "collect_features")
    net = contract_model(model)
    feats: dict[str, list] = {m: [] for m in net.modalities}
    flags: dict[str, list] = {m: [] for m in net.modalities}
    labels = []
    with probe_state(net):
        for b, (inputs, y) in enumerate(iterate_batches(net, loader, device)):
            f = encode_checked(net, inputs, b)
            mask = present_of(inputs) or {}
            for m in net.modalities:
                feats[m].append(f[m].float().flatten(1).cpu().numpy())
                flags[m].append(mask[m].cpu().numpy() if m in mask
                                else np.ones(len(y), dtype=bool))
            labels.append(y.cpu().numpy())
    out = {m: np.concatenate(v) for m, v in feats.items()}
    y = np.concatenate(labels)
    kept = {m: np.concatenate(v) for m, v in flags.items()}
    if is_distributed():  # every rank gets the union of the shards, in rank order
        out = {m: all_gather_cat(torch.from_numpy(v)).numpy() for m, v in out.items()}
        y = all_gather_cat(torch.from_numpy(y)).numpy()
        if present:
            kept = {m: all_gather_cat(torch.from_numpy(v)).numpy() for m, v in kept.items()}
    return (out, y, kept) if present else (out, y)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(0, keepdims=True), x.max(0, keepdims=True)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return 2.0 * (x - lo) / span - 1.0


def purity(features: np.ndarray, labels: np.ndarray, num_classes: int, *, seed: int = 0,
           n_init: int = 10, minibatch_threshold: int = 10000) -> float:
    """k-means purity of min-max-scaled ``features`` (N, d) against integer ``labels`` (N,).

    ``k = min(num_classes, N)`` clusters, ``n_init`` restarts with ``random_state=seed``
    (MiniBatchKMeans above ``minibatch_threshold`` samples). Returns a float in (0, 1].
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    validate_params(_PARAMETER_CONSTRAINTS, {"num_classes": num_classes, "seed": seed,
                                             "n_init": n_init,
                                             "minibatch_threshold": minibatch_threshold}, "purity")
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.ndim != 1 or len(x) != len(labels) or len(x) == 0:
        raise ValueError(f"purity needs features (N, d) and labels (N,) with N >= 1; got shapes "
                         f"{x.shape} and {labels.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("purity: the features contain NaN/inf; k-means cannot cluster them.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("purity: labels must be non-negative integer class indices.")
    x = _minmax(x)
    k = min(num_classes, len(x))
    with preserved_state(None):
        if len(x) > minibatch_threshold:
            km = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed, batch_size=2048)
        else:
            km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        clusters = km.fit_predict(x)
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(labels[clusters == c]).max()
    return float(total / len(labels))


def linear_probe_accuracy(train_x, train_y, val_x, val_y, *, seed: int = 0) -> float:
    """Accuracy on val of a logistic regression fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    validate_params(_PARAMETER_CONSTRAINTS, {"seed": seed}, "linear_probe_accuracy")
    if len(np.unique(train_y)) < 2:
        raise ValueError("a linear probe needs at least two classes in the training features.")
    for name, x in (("train_x", train_x), ("val_x", val_x)):
        if not np.isfinite(np.asarray(x, dtype=np.float64)).all():
            raise ValueError(f"linear_probe_accuracy: {name} contains NaN/inf features.")
    with preserved_state(None):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        clf.fit(train_x, train_y)
        return float(clf.score(val_x, val_y))


def _subsample(x: dict, y: np.ndarray, max_samples: int, seed: int):
    if len(y) <= max_samples:
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(y), max_samples, replace=False))
    return {m: v[idx] for m, v in x.items()}, y[idx]


def separability(
    model,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    seed: int = 0,
    n_init: int = 10,
    linear_probe: bool = True,
    silhouette: bool = True,
    max_samples: int = 50000,
    minibatch_threshold: int = 10000,
    device=None,
    progress: bool = False,
) -> dict[str, Separability]:
    """k-means purity of each modality's features on train and val, and the gap.

    Parameters
    ----------
    model : MultimodalModel
    train_loader, val_loader : iterables of ``(inputs, labels)``
        D and V. V must be held out from training (carve it from train; never the test set).
        With presence masks (``(inputs, labels, present)``), each modality is measured on the
        samples where it is present (``n_train``/``n_val`` count them).
    seed, n_init : int
        k-means seed and restarts (explicit: scikit-learn changed the default in 1.4).
    linear_probe, silhouette : bool
        Compute the extras.
    max_samples : int, default 50000
        Seeded subsample above this size per set.
    progress : bool, default False
        A progress bar over the steps (features of D, features of V, then one step per
        modality); nothing is printed when False.

    Returns
    -------
    dict[str, Separability]
        ``{m: Separability(train_purity, val_purity, gap, linear_probe, silhouette)}``.

    Runs in eval mode; the model and the global RNG states are left exactly as found.
    """
    validate_params(_PARAMETER_CONSTRAINTS,
                    {"train_loader": train_loader, "val_loader": val_loader, "seed": seed,
                     "n_init": n_init, "linear_probe": linear_probe, "silhouette": silhouette,
                     "max_samples": max_samples, "minibatch_threshold": minibatch_threshold,
                     "progress": progress}, "separability")
    net = contract_model(model)
    with probe_state(net):
        return _separability(net, train_loader, val_loader, seed, n_init, linear_probe,
                             silhouette, max_samples, minibatch_threshold, device,
                             progress=progress)


def _separability(net, train_loader, val_loader, seed, n_init, linear_probe, silhouette,
                  max_samples, minibatch_threshold, device, *, progress: bool = False,
                  desc: str = "separability") -> dict[str, Separability]:
    k = net.num_classes
    if k is None:
        raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
    bar = progress_bar(None, enabled=progress, desc=desc, total=2 + len(net.modalities),
                       unit="step")
    with bar:
        return _separability_steps(net, train_loader, val_loader, seed, n_init, linear_probe,
                                   silhouette, max_samples, minibatch_threshold, device, bar, k)


def _present_subset(x: dict, y: np.ndarray, kept: dict, m: str, max_samples: int, seed: int):
    """Modality ``m``'s features and labels over the samples where it is present, subsampled."""
    keep = kept[m]
    sub, labels = _subsample({m: x[m][keep]}, y[keep], max_samples, seed)
    if len(labels) == 0:
        raise ValueError(f"modality {m!r} is absent from every sample of a loader (presence mask); "
                         "separability needs samples where it is present.")
    return sub[m], labels


def _separability_steps(net, train_loader, val_loader, seed, n_init, linear_probe, silhouette,
                        max_samples, minibatch_threshold, device, bar, k):
    # per modality, only the samples where it is present (a baseline row is not the encoder's)
    train = collect_features(net, train_loader, device, present=True)
    bar.update()
    val = collect_features(net, val_loader, device, present=True)
    bar.update()
    if len(np.unique(train[1])) < 2:
        raise ValueError("the training loader holds a single class; separability needs at least two.")
    out = {}
    for m in net.modalities:
        (txm, ty), (vxm, vy) = (_present_subset(*train, m, max_samples, seed),
                                _present_subset(*val, m, max_samples, seed))
        tx, vx = {m: txm}, {m: vxm}
        p_train = purity(tx[m], ty, k, seed=seed, n_init=n_init, minibatch_threshold=minibatch_threshold)
        p_val = purity(vx[m], vy, k, seed=seed, n_init=n_init, minibatch_threshold=minibatch_threshold)
        lp = linear_probe_accuracy(tx[m], ty, vx[m], vy, seed=seed) if linear_probe else None
        sil = None
        if silhouette and len(np.unique(vy)) > 1:
            from sklearn.metrics import silhouette_score

            sil = float(silhouette_score(vx[m], vy, sample_size=min(len(vy), 2000), random_state=seed))
        out[m] = Separability(m, p_train, p_val, abs(p_train - p_val), lp, sil, len(ty), len(vy))
        bar.update()
    return out
