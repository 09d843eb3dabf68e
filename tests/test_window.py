import math
import random

import pytest

import modaldiag as md
from modaldiag.probes import window_state


def test_saturating_trace():
    # rho_2 = (2-1)/2 = .5, rho_3 = (3-2)/3 = .33, rho_4 = .05/3.05 = .016 <= .04 -> closes
    w = md.learning_window({"a": [1, 2, 3, 3.05, 3.06, 3.06]})
    assert w.open_epochs("a") == [0, 1, 2, 3]
    assert w.rho["a"][2] == pytest.approx(0.5) and w.rho["a"][4] == pytest.approx(0.05 / 3.05)
    assert w.peak_growth_epoch["a"] == 1


def test_rise_then_fall_trace():
    # rho_2 = 2/3, rho_3 = 2/5, rho_4 = -1/4 -> closed from epoch 4 on
    w = md.learning_window({"a": [1, 3, 5, 4, 2, 1], "b": [1, 1.01, 1.02, 5, 9, 9]})
    assert w.open_epochs("a") == [0, 1, 2, 3]
    assert w.peak_growth_epoch["a"] == 1 and w.peak_epoch["a"] == 2
    # b: rho_2 = .01/1.01 < .04 -> closed at 2 and stays closed (sticky) despite the later rise
    assert w.open_epochs("b") == [0, 1]
    loose = md.learning_window({"b": [1, 1.01, 1.02, 5, 9, 9]}, sticky=False)
    assert loose.open_epochs("b") == [0, 1, 4, 5]  # rho_4 = 3.98/5, rho_5 = 4/9


def test_flat_trace():
    w = md.learning_window({"a": [2.0, 2.0, 2.0, 2.0]})
    assert w.open_epochs("a") == [0, 1]
    assert w.rho["a"][2] == 0.0


def test_threshold_k():
    tr = {"a": [1, 2, 2.1, 2.2]}  # rho_2 = .5, rho_3 = .1/2.1 = .0476
    assert md.learning_window(tr).open_epochs("a") == [0, 1, 2, 3]
    assert md.learning_window(tr, K=0.05).open_epochs("a") == [0, 1, 2]


def test_code_rule_uses_zero_prefill_moving_average_and_first_modality():
    traces = {"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0]}
    state, rho = window_state(traces, 0, rule="code")
    assert state == {"a": True, "b": True} and rho["a"] is None
    # epoch 2: cur = (1+2)/10 = .3, prev = 1/10 = .1 -> rho = 2/3
    state, rho = window_state(traces, 2, rule="code")
    assert rho["a"] == pytest.approx(2 / 3) and rho["b"] == rho["a"] and state["b"]
    # a flat first trace keeps the window open for epochs 0..10 through the zero pre-fill
    w = md.learning_window({"a": [1.0] * 14, "b": [1.0] * 14}, rule="code")
    assert w.K == 0.05
    assert w.open_epochs("a") == list(range(11))


def test_window_from_history(synth):
    model = md.models.default_model(synth, feature_dim=8)
    hist = md.fit(model, synth.train.loader(64, shuffle=True), epochs=4, progress=False)
    w = md.learning_window(hist)
    assert w.modalities == ("a", "b") and len(w.open["a"]) == 4
    assert w.traces["a"] == hist.series("fisher.a")
    assert md.plot.learning_window(hist) is not None
    robust = md.learning_window(hist, rule="robust")
    assert robust.rule == "robust" and robust.traces == w.traces and len(robust.open["b"]) == 4
    bare = md.fit(model, synth.train.loader(64), epochs=1, monitor=False, progress=False)
    with pytest.raises(ValueError, match="no Fisher traces"):
        md.learning_window(bare)


def test_bad_window_input():
    with pytest.raises(ValueError, match="lengths differ"):
        md.learning_window({"a": [1, 2], "b": [1]})
    with pytest.raises(ValueError, match="rule must be one of"):
        md.learning_window({"a": [1, 2]}, rule="fancy")


def test_bad_window_parameters_name_the_parameter():
    with pytest.raises(ValueError, match=r"learning_window: K must be .*None or a finite number; got nan"):
        md.learning_window({"a": [1, 2]}, K=float("nan"))
    with pytest.raises(TypeError, match=r"sticky must be True or False"):
        md.learning_window({"a": [1, 2]}, sticky="yes")
    with pytest.raises(ValueError, match=r"the traces of \['a'\] contain NaN/inf"):
        md.learning_window({"a": [1.0, float("inf")], "b": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"window_state: epoch must be an integer in \[0, inf[])]"):
        window_state({"a": [1.0]}, -1)


# --- rule="robust": Theil-Sen slope of log Tr over the last `span` epochs, with hysteresis -------

def _saturating(n=30):
    return [1 - 0.9 * math.exp(-t / 4) for t in range(n)]


def _noisy(seed, n=30, sd=0.05):
    rng = random.Random(seed)
    return [v * math.exp(rng.gauss(0, sd)) for v in _saturating(n)]


def _changes_after_first_close(opened):
    first = opened.index(False)
    return first, sum(opened[t] != opened[t - 1] for t in range(first + 1, len(opened)))


def test_robust_clean_saturating_trace_closes_near_the_paper_rule():
    tr = {"a": _saturating()}
    paper = md.learning_window(tr)
    robust = md.learning_window(tr, rule="robust")
    # paper: rho_9 = .0394 <= .04; robust: the 5-epoch slope lags by ~2 epochs, rho_11 = .0354
    assert paper.open_epochs("a") == list(range(9))
    assert robust.open_epochs("a") == list(range(11))
    assert robust.rho["a"][2] == pytest.approx(paper.rho["a"][2])  # two points: the same ratio
    assert robust.rho["a"][10] == pytest.approx(0.0472, abs=1e-4)
    assert robust.rho["a"][11] == pytest.approx(0.0354, abs=1e-4)
    assert (robust.K, robust.K_open, robust.span, robust.sticky) == (0.04, 0.08, 5, False)
    assert paper.K_open is None and paper.span is None
    assert robust.to_dict()["K_open"] == 0.08


def test_robust_rho_matches_the_paper_on_geometric_growth():
    tr = {"a": [3 * 1.1 ** t for t in range(8)]}
    paper = md.learning_window(tr).rho["a"]
    robust = md.learning_window(tr, rule="robust").rho["a"]
    assert robust[2:] == pytest.approx(paper[2:]) and robust[5] == pytest.approx(1 - 1 / 1.1)


def test_robust_theil_sen_ignores_one_outlying_epoch():
    # log-slope 0.1/epoch with a 5x spike at epoch 6: the median of the pairwise slopes keeps 0.1
    tr = [math.exp(0.1 * t) for t in range(10)]
    tr[6] *= 5
    _, rho = window_state({"a": tr}, 8, rule="robust")
    assert rho["a"] == pytest.approx(1 - math.exp(-0.1))


def test_robust_noisy_saturating_trace_does_not_flicker():
    # multiplicative log-normal noise (sd .05), seed 0: the paper's per-epoch decision first closes
    # at 8 and then changes state 11 times; the robust window closes once, at 13
    tr = {"a": _noisy(0)}
    loose = md.learning_window(tr, sticky=False)
    assert _changes_after_first_close(loose.open["a"]) == (8, 11)
    assert md.learning_window(tr).open_epochs("a") == list(range(8))  # sticky: closes at 8
    robust = md.learning_window(tr, rule="robust")
    assert _changes_after_first_close(robust.open["a"]) == (13, 0)
    for seed in range(1, 5):
        tr = {"a": _noisy(seed)}
        assert _changes_after_first_close(md.learning_window(tr, sticky=False).open["a"])[1] >= 8
        first, changes = _changes_after_first_close(md.learning_window(tr, rule="robust").open["a"])
        assert changes <= 1 and 10 <= first <= 13


def test_robust_rise_then_fall_trace():
    tr = {"a": [1, 2, 3.5, 5, 6, 6.2, 5.5, 4.5, 3.5, 2.8, 2.2, 1.8]}
    assert md.learning_window(tr).open_epochs("a") == [0, 1, 2, 3, 4, 5]  # rho_6 = .032
    robust = md.learning_window(tr, rule="robust")
    # rho_7 = .104 (slope over epochs 2..6), rho_8 = -.036: closed from 8, never reopens
    assert robust.open_epochs("a") == [0, 1, 2, 3, 4, 5, 6, 7]
    assert robust.rho["a"][8] == pytest.approx(-0.036, abs=1e-3) and max(robust.rho["a"][8:]) < 0


def test_robust_flat_trace():
    w = md.learning_window({"a": [2.0] * 8}, rule="robust")
    assert w.open_epochs("a") == [0, 1] and w.rho["a"][2:] == [0.0] * 6
    zeros = md.learning_window({"a": [0.0] * 4}, rule="robust")
    assert zeros.open_epochs("a") == [0, 1] and zeros.rho["a"][3] == 0.0


def test_robust_hysteresis_reopens_only_above_k_open():
    base = [1, 2, 3, 3.05, 3.06, 3.06, 3.06, 3.06]
    steep = {"a": base + [4, 6, 9, 13, 13, 13]}
    assert md.learning_window(steep, rule="robust").open_epochs("a") == [0, 1, 2, 3, 4, 5, 10, 11,
                                                                         12, 13]
    # a second rise of 0.06 in log per epoch: rho = 1 - e^-.06 = .058, inside the band (.04, .08]
    slow = {"a": base + [3.06 * math.exp(0.06 * k) for k in range(1, 9)]}
    w = md.learning_window(slow, rule="robust")
    assert w.rho["a"][-1] == pytest.approx(1 - math.exp(-0.06))
    assert w.open_epochs("a") == [0, 1, 2, 3, 4, 5]
    # rho_10 = .0296, rho_11.. = .0582: reopens at 11 once K_open = .05
    assert md.learning_window(slow, rule="robust", K_open=0.05).open_epochs("a")[6:] == [11, 12, 13,
                                                                                         14, 15]
    # the same rho decides differently by the previous state; sticky does not apply
    state, rho = window_state(slow, 15, rule="robust", previous={"a": False})
    assert rho["a"] == pytest.approx(0.058, abs=1e-3) and state == {"a": False}
    assert window_state(slow, 15, rule="robust", previous={"a": True})[0] == {"a": True}
    assert window_state(steep, 11, rule="robust", previous={"a": False}, sticky=True)[0]["a"]


def test_robust_is_per_modality():
    tr = {"a": _saturating(), "b": [2.0] * 30}
    w = md.learning_window(tr, rule="robust")
    assert w.open_epochs("a") == list(range(11)) and w.open_epochs("b") == [0, 1]


@pytest.mark.parametrize("rule", ["paper", "code", "robust"])
def test_window_decisions_are_causal(rule):
    base = _noisy(3, n=20)
    ref = md.learning_window({"a": base, "b": base[::-1]}, rule=rule, sticky=False)
    for t in range(20):
        for factor in (0.2, 5.0):
            changed = list(base)
            changed[t] *= factor
            w = md.learning_window({"a": changed, "b": base[::-1]}, rule=rule, sticky=False)
            assert w.open["a"][:t + 1] == ref.open["a"][:t + 1]
            assert w.rho["a"][:t + 1] == ref.rho["a"][:t + 1]
    # window_state reads only traces[:epoch]
    for t in range(20):
        assert (window_state({"a": base}, t, rule=rule) ==
                window_state({"a": base[:t]}, t, rule=rule))


def test_robust_parameters_are_validated():
    tr = {"a": [1.0, 2.0, 3.0]}
    with pytest.raises(ValueError, match=r"learning_window: span must be an integer in \[2, inf\)"
                                         r"; got 1"):
        md.learning_window(tr, rule="robust", span=1)
    with pytest.raises(ValueError, match=r"span must be an integer in \[2, inf\); got 2.5"):
        md.learning_window(tr, rule="robust", span=2.5)
    with pytest.raises(ValueError, match=r"learning_window: K_open must be None or a finite number"
                                         r"; got nan"):
        md.learning_window(tr, rule="robust", K_open=float("nan"))
    with pytest.raises(ValueError, match=r"learning_window: K_open must be >= K .*K_open=0.03 < "
                                         r"K=0.04"):
        md.learning_window(tr, rule="robust", K_open=0.03)
    with pytest.raises(ValueError, match=r"window_state: K_open must be >= K"):
        window_state(tr, 2, rule="robust", K=0.1, K_open=0.05)
    with pytest.raises(ValueError, match=r"window_state: span must be"):
        window_state(tr, 2, rule="robust", span=0)
    assert md.learning_window(tr, rule="robust", K=0.1, K_open=0.1).K_open == 0.1
    assert md.learning_window(tr, rule="robust", K=0.1).K_open == pytest.approx(0.2)
