"""Greedy's conditional utilisation rate (md.probes.conditional_utilization)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from test_robustness import _Data, _trained

import modaldiag as md
from modaldiag.probes.conditional import (
    ConditionalUtilization,
    conditional_utilization,
    conditional_utilization_rates,
    utilization_difference,
)


def test_spec_numbers():
    # METHODS-2 R18: A(N) = 0.8, A({a}) = 0.7, A({v}) = 0.4
    rates = conditional_utilization_rates(0.8, {"a": 0.4, "v": 0.7})  # A(N \ {m})
    assert rates["v"] == pytest.approx(0.125)  # u(v|a)
    assert rates["a"] == pytest.approx(0.5)  # u(a|v)
    assert utilization_difference(rates) == pytest.approx(-0.375)  # m0 = a: u(v|a) - u(a|v)
    assert utilization_difference({"a": 0.5, "v": 0.125, "t": 0.3}) == pytest.approx(0.375)
    nan = conditional_utilization_rates(0.0, {"a": 0.0, "v": 0.0})
    assert all(v != v for v in nan.values())


def _brute_force(model, loader, substitute):
    """A(N) and A(N \\ {m}) with one head call per sample set, by hand."""
    with torch.no_grad():
        feats, ys = {m: [] for m in model.modalities}, []
        for x, y in loader:
            for m, f in model.eval().encode(x).items():
                feats[m].append(f)
            ys.append(y)
        feats = {m: torch.cat(v) for m, v in feats.items()}
        y = torch.cat(ys)
        acc_all = float((model.fusion(feats).argmax(1) == y).double().mean())
        without = {}
        for m in model.modalities:
            sub = dict(feats)
            sub[m] = substitute[m].expand_as(feats[m])
            without[m] = float((model.fusion(sub).argmax(1) == y).double().mean())
    return acc_all, without


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_rates_match_a_brute_force_computation(fusion):
    model, loader = _trained(3, fusion, seed=2)
    train = torch.utils.data.DataLoader(_Data(model, n=80, seed=9, split="train"), batch_size=40)
    cu = conditional_utilization(model, loader, baseline_loader=train)
    acc_all, without = _brute_force(model, loader, model.mean_features(train))
    assert cu.accuracy_all == pytest.approx(acc_all, abs=1e-9)
    assert cu.accuracy_without == pytest.approx(without, abs=1e-9)
    for m in model.modalities:
        assert cu[m] == pytest.approx((acc_all - without[m]) / acc_all, abs=1e-9)
    assert cu.d_util == pytest.approx(max(cu.values()) - min(cu.values()))
    assert cu.baseline == "mean" and cu.note == "" and cu.split == "test" and cu.n == 120
    assert model.baseline_kind == "zero"  # the stored baseline is restored
    # the model uses m0 most (it carries the label most strongly)
    assert max(cu, key=cu.get) == "m0"


def test_behaves_like_a_dict_and_round_trips(trained_pair):
    model, loader = trained_pair
    cu = conditional_utilization(model, loader)
    assert isinstance(cu, dict) and list(cu) == list(model.modalities)
    assert json.loads(json.dumps(cu)) == pytest.approx(dict(cu))
    assert cu.rates == dict(cu)
    # two modalities: d_util = u(m1|m0) - u(m0|m1) = u[m1] - u[m0]
    assert cu.d_util == pytest.approx(cu["m1"] - cu["m0"])
    back = ConditionalUtilization.from_dict(json.loads(json.dumps(cu.to_dict())))
    assert back == cu and back.d_util == cu.d_util and back.note == cu.note
    assert "u(m0)" in cu.summary() and "test split" in cu.summary()


@pytest.fixture(scope="module")
def trained_pair():
    return _trained()


def test_without_a_baseline_loader_it_falls_back_and_says_so(trained_pair):
    model, loader = trained_pair
    cu = conditional_utilization(model, loader)
    assert cu.baseline == "zero"
    assert "instead of the training-set mean" in cu.note and "baseline_loader" in cu.note
    acc_all, without = _brute_force(
        model, loader, {m: torch.zeros(d) for m, d in model.feature_dims.items()})
    assert cu.accuracy_without == pytest.approx(without, abs=1e-9)
    # two modalities: A(N \ {m0}) is m1's unimodal accuracy through the joint head
    ev = md.probes.evaluate(model, loader)
    assert cu.accuracy_without["m0"] == pytest.approx(ev.unimodal["m1"].accuracy, abs=1e-9)
    # a stored mean baseline is used as such
    model.set_baseline("mean", loader)
    try:
        stored = conditional_utilization(model, loader)
        assert stored.baseline == "mean" and "stored mean baseline" in stored.note
    finally:
        model.set_baseline("zero")
    with pytest.raises(ValueError, match="baseline must be"):
        conditional_utilization(model, loader, baseline="median")


def test_any_number_of_modalities_any_head():
    model = make_model(4, "film", seed=5).eval()
    loader = torch.utils.data.DataLoader(_Data(model, n=40, seed=6), batch_size=16)
    cu = conditional_utilization(model, loader, baseline="zero")
    acc_all, without = _brute_force(
        model, loader, {m: torch.zeros(d) for m, d in model.feature_dims.items()})
    assert cu.accuracy_all == pytest.approx(acc_all, abs=1e-9)
    assert cu.accuracy_without == pytest.approx(without, abs=1e-9)
    assert len(cu) == 4
