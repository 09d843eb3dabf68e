"""ModalityDropout (issue 16): the expected rate in closed form, the realised rate, the
min_present floor, seeded draws (seed, rank, step), no gradient from dropped entries, exact
resume, no effect at evaluation, logging, argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import modaldiag as md
from modaldiag.probes.unimodal import evaluate
from modaldiag.regulators.dropout import ModalityDropout, dropout_generator, expected_drop_rate
from modaldiag.training.callbacks import StepContext

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tiny():
    return md.datasets.synthetic(n_samples=240, num_classes=3, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 6, "b": 6}, seed=0)


def test_expected_drop_rate_closed_form():
    assert expected_drop_rate(0.3, 2, 0) == pytest.approx(0.3, abs=1e-12)
    # M = 2, floor 1: K = 2 (prob 0.09) drops only one -> (0.42 + 0.09) / 2
    assert expected_drop_rate(0.3, 2, 1) == pytest.approx(0.255, abs=1e-12)
    # M = 3, floor 1: (1 * 0.441 + 2 * 0.189 + 2 * 0.027) / 3
    assert expected_drop_rate(0.3, 3, 1) == pytest.approx(0.291, abs=1e-12)
    assert expected_drop_rate(1.0, 2, 1) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("p, m, floor", [(0.3, 2, 1), (0.3, 2, 0), (0.5, 3, 2), (0.8, 3, 1)])
def test_realised_rate_matches_the_closed_form(p, m, floor):
    n = 20000
    reg = ModalityDropout(p, min_present=floor)
    keep = reg.keep_mask([p] * m, torch.ones(n, m, dtype=torch.bool), dropout_generator(0, 0, 7))
    rate = float((~keep).double().mean())
    want = expected_drop_rate(p, m, floor)
    sigma = math.sqrt(want * (1 - want) / (n * m))
    assert abs(rate - want) < 4 * sigma + 1e-12, (rate, want)
    assert int(keep.sum(1).min()) >= floor


def test_min_present_counts_only_modalities_present_in_the_data():
    reg = ModalityDropout(1.0, min_present=2)
    data = torch.tensor([[True, True, True], [True, False, True], [False, False, True],
                         [False, False, False]])
    keep = reg.keep_mask([1.0, 1.0, 1.0], data, dropout_generator(0, 0, 0))
    kept = (keep & data).sum(1).tolist()
    assert kept == [2, 2, 1, 0]  # min(min_present, present in the data)
    assert bool(keep[~data].all())  # a missing entry is never "dropped" again


def test_draws_depend_on_seed_rank_and_step_only():
    reg = ModalityDropout(0.5, min_present=0)
    ones = torch.ones(64, 2, dtype=torch.bool)

    def draw(seed, r, step):
        return reg.keep_mask([0.5, 0.5], ones, dropout_generator(seed, r, step))

    state = torch.random.get_rng_state()
    assert torch.equal(draw(0, 0, 3), draw(0, 0, 3))
    assert torch.equal(torch.random.get_rng_state(), state)  # never the global RNG
    assert not torch.equal(draw(0, 0, 3), draw(0, 0, 4))
    assert not torch.equal(draw(0, 0, 3), draw(0, 1, 3))  # ranks draw other samples
    assert not torch.equal(draw(0, 0, 3), draw(1, 0, 3))


def test_dropped_entries_are_the_baseline_and_get_no_gradient():
    model = make_model()
    model.set_baseline({"m0": torch.full((4,), 0.5), "m1": torch.full((5,), -0.5)})
    x = {m: v.requires_grad_(True) for m, v in make_inputs(model, batch=32).items()}
    y = torch.arange(32) % 3
    reg = ModalityDropout(0.4, seed=5)
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), reg)
    run.epoch_start(0)
    run.backward(x, y)
    keep = reg.last_keep
    assert set(keep) == {"m0", "m1"}
    dropped0 = ~keep["m0"]
    assert 0 < int(dropped0.sum()) < 32 and bool((keep["m0"] | keep["m1"]).all())
    assert float(x["m0"].grad[dropped0].abs().max()) == 0.0
    assert float(x["m0"].grad[~dropped0].abs().sum()) > 0
    torch.testing.assert_close(run.ctx.features["m0"][dropped0],
                               torch.full((int(dropped0.sum()), 4), 0.5))
    assert torch.equal(run.ctx.present["m0"], keep["m0"])
    # the same gradients by hand: features replaced, CE of the head
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    feats = model.mask_features(model.encode({m: v.detach() for m, v in x.items()}), keep)
    F.cross_entropy(model.head(feats), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=RTOL, atol=ATOL, msg=n)


def test_data_absence_and_dropout_combine():
    model = make_model()
    x, y = make_inputs(model, batch=40), torch.arange(40) % 3
    data = torch.arange(40) % 2 == 0  # m0 missing from every odd sample
    reg = ModalityDropout({"m0": 1.0}, min_present=0)
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), reg)
    run.epoch_start(0)
    run.backward(x, y, {"m0": data})
    assert set(reg.last_keep) == {"m0"}  # p names only m0: m1 is never dropped
    assert not bool(run.ctx.present["m0"].any())
    logs = run.epoch_end()
    # the rate is over the entries present in the data: all 20 of them dropped
    assert logs["regulator"]["drop_rate"] == {"m0": 1.0, "m1": 0.0}
    assert reg.realised_rate == {"m0": 1.0, "m1": 0.0}


def test_fit_logs_the_realised_rate_and_never_drops_at_evaluation(tiny):
    torch.manual_seed(0)
    model = md.models.default_model(tiny, feature_dim=4)
    reg = ModalityDropout(1.0, min_present=0)  # every training entry at its baseline
    hist = md.fit(model, tiny.train.loader(32, shuffle=True), val_loader=tiny.val.loader(64),
                  epochs=2, regulator=reg, progress=False, seed=0)
    df = hist.to_dataframe()
    assert df["regulator.drop_rate.a"].tolist() == [1.0, 1.0]
    val = evaluate(model, tiny.val.loader(64))
    assert df["val.acc"].iloc[-1] == pytest.approx(val.accuracy)  # validation: real features
    empty = evaluate(model, [(tiny.val.inputs, tiny.val.labels,
                              {m: torch.zeros(len(tiny.val), dtype=torch.bool)
                               for m in tiny.modalities})])
    assert df["val.loss"].iloc[-1] != pytest.approx(empty.loss)
    torch.manual_seed(0)
    model = md.models.default_model(tiny, feature_dim=4)
    hist = md.fit(model, tiny.train.loader(32, shuffle=True), epochs=3,
                  regulator=ModalityDropout(0.3, seed=2), progress=False, seed=0)
    rates = hist.to_dataframe()[["regulator.drop_rate.a", "regulator.drop_rate.b"]].to_numpy()
    n = 3 * len(tiny.train)
    assert abs(rates.mean(0) - 0.255).max() < 4 * math.sqrt(0.255 * 0.745 / n)


def test_resumed_run_ends_with_identical_weights(tiny, tmp_path):
    def run(epochs, ckpt, resume):
        torch.manual_seed(0)
        model = md.models.default_model(tiny, feature_dim=4)
        reg = ModalityDropout(0.4, seed=1)
        md.fit(model, tiny.train.loader(32, shuffle=True), epochs=epochs, regulator=reg,
               checkpoint_dir=ckpt, resume=resume, restore_best=False, progress=False, seed=3)
        return model, reg

    full, reg_full = run(3, tmp_path / "full", False)
    run(2, tmp_path / "split", False)
    resumed, reg_res = run(3, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert reg_full.state_dict() == reg_res.state_dict()
    assert reg_full.state_dict()["totals"]["a"][1] == 3 * len(tiny.train)
    other = ModalityDropout(0.4)
    other.load_state_dict(reg_full.state_dict())
    assert other.realised_rate == reg_full.realised_rate


def test_reset_forgets_the_run():
    model = make_model()
    reg = ModalityDropout(0.5)
    ctx = StepContext(model=model, step=0)
    reg.on_fit_start(ctx)
    reg.transform_features(model.encode(make_inputs(model, batch=8)), ctx)
    assert reg.totals["m0"][1] == 8
    reg.on_fit_start(ctx)  # a fresh run
    assert reg.totals == {} and reg.last_keep == {}


def test_argument_checks():
    model = make_model()
    ctx = StepContext(model=model)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\] or a dict"):
        ModalityDropout(1.5)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\] or a dict"):
        ModalityDropout({"m0": -0.1})
    with pytest.raises(ValueError, match=r"p names 'm00', which is not a modality.*Did you mean 'm0'"):
        ModalityDropout({"m00": 0.3}).on_fit_start(ctx)
    with pytest.raises(ValueError, match=r"modalities names 'm2'"):
        ModalityDropout(modalities=["m2"]).on_fit_start(ctx)
    with pytest.raises(ValueError, match="min_present=3 exceeds the model's 2 modalities"):
        ModalityDropout(min_present=3).on_fit_start(ctx)
    with pytest.raises((ValueError, TypeError), match="min_present"):
        ModalityDropout(min_present=-1)
    assert repr(ModalityDropout(0.2, modalities=["m0"])) == (
        "ModalityDropout(p=0.2, modalities=['m0'], min_present=1, seed=0)")
