import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics.cluster import contingency_matrix

import modaldiag as md
from modaldiag.probes import collect_features, purity


def _reference_purity(x, y, k, seed=0):
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(0), x.max(0)
    scaled = 2 * (x - lo) / np.where(hi > lo, hi - lo, 1) - 1
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(scaled)
    return contingency_matrix(y, clusters).max(axis=0).sum() / len(y)


def test_purity_matches_direct_sklearn(synth):
    model = md.models.default_model(synth, feature_dim=8)
    md.fit(model, synth.train.loader(64, shuffle=True), epochs=3, progress=False)
    sep = md.separability(model, synth.train.loader(128), synth.val.loader(128))
    tx, ty = collect_features(model, synth.train.loader(128))
    vx, vy = collect_features(model, synth.val.loader(128))
    for m in ("a", "b"):
        assert sep[m].train_purity == pytest.approx(_reference_purity(tx[m], ty, 4))
        assert sep[m].val_purity == pytest.approx(_reference_purity(vx[m], vy, 4))
        assert sep[m].gap == pytest.approx(abs(sep[m].train_purity - sep[m].val_purity))
        assert 0 <= sep[m].linear_probe <= 1 and -1 <= sep[m].silhouette <= 1
    assert sep["a"].linear_probe > sep["b"].linear_probe
    assert sep["a"].train_purity > sep["b"].train_purity


def test_purity_extremes():
    y = np.repeat(np.arange(3), 20)
    separated = np.eye(3)[y] * 10 + np.random.default_rng(0).normal(0, 0.01, (60, 3))
    assert purity(separated, y, 3) == 1.0
    assert purity(separated, y, 3, minibatch_threshold=10) == 1.0  # MiniBatchKMeans path


def test_single_class_refused(synth):
    model = md.models.default_model(synth, feature_dim=8)
    one = synth.train.subset(torch.nonzero(synth.train.labels == 0).flatten())
    with pytest.raises(ValueError, match="single class"):
        md.separability(model, one.loader(64), synth.val.loader(64))


def test_bad_arguments_name_the_parameter(synth):
    model = md.models.default_model(synth, feature_dim=8)
    tr, va = synth.train.loader(128), synth.val.loader(128)
    for kwargs, exc, match in [
        ({"n_init": 0}, ValueError, r"separability: n_init must be an integer in \[1, inf[])]"),
        ({"max_samples": -5}, ValueError, r"max_samples must be an integer"),
        ({"linear_probe": "yes"}, TypeError, r"linear_probe must be True or False"),
        ({"seed": -1}, ValueError, r"seed must be an integer in \[0, inf[])]"),
    ]:
        with pytest.raises(exc, match=match):
            md.separability(model, tr, va, **kwargs)
    with pytest.raises(ValueError, match="purity: the features contain NaN/inf"):
        purity(np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match=r"features \(N, d\) and labels \(N,\)"):
        purity(np.zeros((4, 2)), np.zeros(3, dtype=int), 2)
