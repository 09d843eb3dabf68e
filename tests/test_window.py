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
