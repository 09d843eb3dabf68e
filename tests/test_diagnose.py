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


@pytest.fixture(scope="module")
def mean_baseline_model(synth):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=8)
    md.fit(model, synth.train.loader(64, shuffle=True), epochs=3, progress=False, seed=0)
    model.set_baseline("mean", synth.train.loader(256))
    return model


def test_diagnose_uses_the_stored_baseline_for_every_probe_and_says_so(synth, mean_baseline_model,
                                                                       tmp_path):
    model = mean_baseline_model
    loader = synth.val.loader(128)
    rep = md.diagnose(model, loader, fisher=None)
    assert rep.baseline == rep.shapley.baseline == rep.unimodal.baseline == "mean"
    assert rep.config["baseline"] == "mean" and rep.to_dict()["baseline"] == "mean"
    assert rep.to_dict()["shapley"]["baseline"] == "mean"
    assert rep.to_dict()["unimodal"]["baseline"] == "mean"
    mean_sv = md.shapley(model, loader, baseline="mean")
    zero_sv = md.shapley(model, loader, baseline="zero")
    torch.testing.assert_close(rep.shapley.values, mean_sv.values, rtol=0, atol=0)
    mean_uni = md.unimodal_scores(model, loader, baseline="mean")
    zero_uni = md.unimodal_scores(model, loader, baseline="zero")
    assert {m: s.accuracy for m, s in rep.unimodal.unimodal.items()} == \
        {m: s.accuracy for m, s in mean_uni.items()}
    # the two baselines really are different games on this model (measured, not assumed)
    sv_gap = (mean_sv.values - zero_sv.values).abs().mean().item()
    acc_gap = max(abs(mean_uni[m].accuracy - zero_uni[m].accuracy) for m in ("a", "b"))
    ce_gap = max(abs(mean_uni[m].cross_entropy - zero_uni[m].cross_entropy) for m in ("a", "b"))
    # measured: 0.17 (Shapley, per sample), 2/88 (accuracy of b), 0.0021 (cross-entropy of b)
    assert sv_gap > 0.1 and acc_gap > 0.01 and ce_gap > 1e-3, (sv_gap, acc_gap, ce_gap)
    assert "mean training features (baseline 'mean'" in rep.summary
    assert "baseline 'mean'" in rep.evidence[1].description
    assert "mean baseline" in rep.evidence[0].description
    rep.save(tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "replaced by its &#x27;mean&#x27; baseline" in page
    assert "zero" not in rep.summary

    over = md.diagnose(model, loader, fisher=None, baseline="zero")
    assert over.baseline == over.shapley.baseline == over.unimodal.baseline == "zero"
    torch.testing.assert_close(over.shapley.values, zero_sv.values, rtol=0, atol=0)
    assert over.unimodal.unimodal["b"].true_prob == pytest.approx(zero_uni["b"].true_prob,
                                                                 rel=1e-9)
    assert "zero features (baseline 'zero'" in over.summary
    assert model.baseline_kind == "mean"  # the override was temporary


def test_diagnose_bad_arguments_name_the_parameter(synth):
    model = md.models.default_model(synth, feature_dim=8)
    loader = synth.val.loader(128)
    for kwargs, exc, match in [
        ({"fisher": "exact"}, ValueError, r"diagnose: fisher must be None or one of 'per_sample'"),
        ({"reference_epochs": 0}, ValueError,
         r"reference_epochs must be .*None or an integer in \[1, inf[])]; got 0"),
        ({"baseline": "median"}, ValueError, r"baseline must be one of None, 'zero', 'mean'"),
        ({"value": "accuracy"}, ValueError, r"value must be one of 'paper'"),
        ({"seed": 1.5}, ValueError, r"seed must be an integer"),
        ({"progress": 1}, TypeError, r"progress must be True or False"),
    ]:
        with pytest.raises(exc, match=match):
            md.diagnose(model, loader, **kwargs)
    with pytest.raises(ValueError, match=r"under_optimisation: lr must be a finite number in \(0"):
        md.probes.under_optimisation(model, loader, loader, lr=float("nan"))


def test_save_never_overwrites_files_in_a_folder_modaldiag_did_not_create(tmp_path, synth):
    model = md.models.default_model(synth, feature_dim=8)
    rep = md.diagnose(model, synth.train.loader(128), synth.val.loader(128), fisher=None)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "report.html").write_text("my own report")
    with pytest.raises(ValueError, match=r"already holds \['report.html'\].*nothing was overwritten"):
        rep.save(foreign)
    assert (foreign / "report.html").read_text() == "my own report"
    assert not (foreign / "diagnosis.json").exists()
    out = rep.save(tmp_path / "new")  # a new folder is marked, so saving again replaces its files
    assert (out / ".modaldiag").is_file() and (out / "report.html").is_file()
    rep.save(out)
