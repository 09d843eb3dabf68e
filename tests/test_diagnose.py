import json

import pytest
import torch
from conftest import FUSIONS

import modaldiag as md
from modaldiag.probes.diagnose import Evidence, _votes


@pytest.mark.parametrize("fusion", FUSIONS)
def test_synthetic_ground_truth_for_every_fusion(synth, fusion):
    torch.manual_seed(0)
    model = md.models.default_model(synth, fusion=fusion, feature_dim=16)
    md.fit(model, synth.train.loader(32, shuffle=True), synth.val.loader(256), epochs=8,
           progress=False)
    rep = md.diagnose(model, synth.train.loader(256), synth.val.loader(256), fisher="batch")
    assert rep.dominant == "a", rep.summary
    assert rep.weakest == "b", rep.summary


@pytest.fixture(scope="module")
def fou_pix_model(fou_pix):
    model = md.models.default_model(fou_pix)
    md.fit(model, fou_pix.train.loader(64, shuffle=True), fou_pix.val.loader(400), epochs=20,
           progress=False, seed=0)
    return model


def test_real_pair_verdict_matches_standalone_accuracies(fou_pix, fou_pix_model):
    # standalone (logistic regression, shared/datasets/README): pix .96 > fou .82
    rep = md.diagnose(fou_pix_model, fou_pix.train.loader(400), fou_pix.val.loader(400))
    assert (rep.dominant, rep.weakest) == ("pix", "fou")
    assert rep.agree
    scores = {e.probe: e.scores for e in rep.evidence}
    assert scores["unimodal accuracy"]["pix"] > scores["unimodal accuracy"]["fou"] + 0.4
    assert scores["linear probe"]["fou"] > scores["unimodal accuracy"]["fou"]  # known but unused
    assert "'pix' dominates" in rep.summary
    assert set(rep.per_class) == set(range(10))
    assert set(rep.per_class[3]["shapley"]) == {"fou", "pix"}


def test_under_optimisation_and_save(fou_pix, fou_pix_model, tmp_path):
    rep = md.diagnose(fou_pix_model, fou_pix.train.loader(400), fou_pix.val.loader(400),
                      reference_epochs=5, fisher="per_sample")
    assert set(rep.under_optimisation) == {"fou", "pix"}
    for rec in rep.under_optimisation.values():
        assert rec["gap"] == pytest.approx(rec["alone"] - rec["joint"])
    assert rep.starved in ("fou", "pix")
    assert rep.fisher["fou"] > 0
    rep.save(tmp_path)
    data = json.loads((tmp_path / "diagnosis.json").read_text())
    assert data["dominant"] == "pix" and data["under_optimisation"]
    for name in ("shapley", "unimodal", "separability"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / f"{name}.svg").exists()


def test_votes_and_disagreement_are_reported():
    ev = [Evidence("unimodal accuracy", {"a": .9, "b": .2, "c": .5}, "a", "b", ""),
          Evidence("shapley", {"a": .5, "b": .1, "c": .9}, "c", "b", ""),
          Evidence("linear probe", {"a": .9, "b": .3, "c": .6}, "a", "b", "")]
    assert _votes(ev, "dominant", "c") == "a"
    assert _votes(ev[:2], "dominant", "c") == "c"  # tie -> Shapley
    assert _votes(ev, "weakest", "b") == "b"


def test_diagnose_without_val_and_bad_args(synth):
    model = md.models.default_model(synth, feature_dim=8)
    rep = md.diagnose(model, synth.val.loader(128), fisher=None)
    assert rep.separability is None and rep.fisher is None
    assert [e.probe for e in rep.evidence] == ["unimodal accuracy", "shapley"]
    with pytest.raises(ValueError, match="reference_epochs needs val_loader"):
        md.diagnose(model, synth.val.loader(128), reference_epochs=2)
