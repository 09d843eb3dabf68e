import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import modaldiag as md
from modaldiag.probes import inforeg_gap, ogm_ratio


def test_ogm_ratio_and_inforeg_gap_closed_forms():
    s = {"a": 0.9, "b": 0.3, "c": 0.6}
    r = ogm_ratio(s)
    assert r["a"] == pytest.approx(0.9 / 0.45) and r["b"] == pytest.approx(0.3 / 0.75)
    assert ogm_ratio({"a": 2.0, "v": 1.0}) == {"a": 2.0, "v": 0.5}  # two modalities: s_a / s_v
    g = inforeg_gap(s)
    assert g["a"] == pytest.approx(((0.9 - 0.3) + (0.9 - 0.6)) / 2)
    assert g["c"] == pytest.approx(0.3) and g["b"] == 0.0


def test_unimodal_scores_match_manual_computation():
    model = make_model(3, "film").eval()
    x = make_inputs(model, batch=17)
    y = torch.arange(17) % 3
    loader = [({k: v[:9] for k, v in x.items()}, y[:9]), ({k: v[9:] for k, v in x.items()}, y[9:])]
    scores = md.unimodal_scores(model, loader)
    with torch.no_grad():
        feats = model.encode(x)
        for m in model.modalities:
            logits = model.head(feats, present=(m,))
            assert scores[m].accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
            p = F.softmax(logits, 1).gather(1, y[:, None]).mean()
            assert scores[m].true_prob == pytest.approx(float(p), rel=1e-5)
            assert scores[m].cross_entropy == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_unimodal_scores_follow_the_baseline_rule():
    model = make_model(2, "concat").eval()
    x = make_inputs(model, batch=12)
    y = torch.arange(12) % 3
    loader = [(x, y)]
    zero = md.unimodal_scores(model, loader)
    assert all(s.baseline == "zero" for s in zero.values())
    means = {m: torch.full((d,), 0.75) for m, d in model.feature_dims.items()}
    model.set_baseline(means)  # a custom baseline
    stored = md.probes.evaluate(model, loader)
    assert stored.baseline == "custom" and stored.to_dict()["baseline"] == "custom"
    with torch.no_grad():
        feats = model.encode(x)
        expected = model.fusion({"m0": feats["m0"], "m1": means["m1"].expand(12, -1)})
        p = F.softmax(expected, 1).gather(1, y[:, None]).mean()
    assert stored.unimodal["m0"].true_prob == pytest.approx(float(p), rel=1e-5)
    # measured: cross-entropy 1.1429 (custom) vs 1.1026 (zero)
    assert abs(stored.unimodal["m0"].cross_entropy - zero["m0"].cross_entropy) > 0.02
    again = md.unimodal_scores(model, loader, baseline="zero")
    assert again["m0"].true_prob == pytest.approx(zero["m0"].true_prob, rel=1e-6)
    assert model.baseline_kind == "custom"
    with pytest.raises(ValueError, match="baseline='mean' needs the training-set mean"):
        md.unimodal_scores(model, loader, baseline="mean")
    with pytest.raises(ValueError, match=r"evaluate: baseline must be one of None, 'zero'"):
        md.probes.evaluate(model, loader, baseline="none")


def test_fit_validation_path_gives_evaluate_numbers_and_keeps_modes_and_rng():
    from modaldiag.probes.unimodal import validate
    model = make_model(2, "concat")
    model.train()
    model.encoders["m1"].eval()  # a user's frozen submodule stays in eval mode
    batches = [(make_inputs(model, batch=10), torch.arange(10) % 3) for _ in range(3)]
    full = md.probes.evaluate(model, batches)
    rng = torch.get_rng_state()
    light = validate(model, batches)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and not model.encoders["m1"].training
    assert light.to_dict() == full.to_dict()
    assert light.per_class is None and light.correct is None
    # a regulator's test-time rule replaces the fused logits, never the unimodal scores
    flipped = validate(model, batches, predict=lambda f: -model.head(f))
    assert flipped.accuracy != full.accuracy
    assert flipped.to_dict()["unimodal_acc"] == full.to_dict()["unimodal_acc"]


def test_all_finite_is_exact_when_the_sum_overflows_or_a_value_is_bad():
    from modaldiag.utils.torch_utils import all_finite
    big = torch.full((4,), 3e38)  # finite values whose float32 sum overflows to inf
    assert all_finite([big, big])
    assert not all_finite([big, torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])  # sum is NaN
    assert all_finite([torch.arange(3)])  # integer tensors are not checked
    assert all_finite([])
    assert not all_finite([torch.tensor([1 + 1j, complex(float("nan"), 0)])])  # complex checked
    assert all_finite([torch.tensor([1 + 1j, 2 - 1j])])
    w = torch.ones(3, requires_grad=True)
    assert all_finite([w * 2])  # a tensor in a graph: checked without recording anything


def test_validate_names_the_bad_batch_or_blames_the_head():
    """``validate`` checks no batch on the way; a non-finite total re-runs the checked pass."""
    from modaldiag.probes.unimodal import validate
    model = make_model(2, "concat")
    batches = [(make_inputs(model, batch=8), torch.arange(8) % 3) for _ in range(3)]
    batches[2][0]["m1"][5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"batch 2.*'m1'|'m1'.*batch 2"):
        validate(model, batches)
    batches[2][0]["m1"][5, 0] = 0.0
    assert validate(model, batches).loss == pytest.approx(md.probes.evaluate(model, batches).loss)
    with pytest.raises(ValueError, match="the fusion head .* produced non-finite logits"):
        validate(model, batches, predict=lambda f: model.head(f) * float("nan"))
