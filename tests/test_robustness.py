"""md.robustness: fused accuracy when one modality is missing, noisy or shuffled."""

from __future__ import annotations

import copy
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from torch import nn

import modaldiag as md
from modaldiag.probes.robustness import RobustnessResult, robustness, robustness_auc

SEV = (0.0, 0.25, 0.5, 0.75, 1.0)


class _Data(torch.utils.data.Dataset):
    """Two or three modalities; the label is readable from m0 (strongly) and m1 (weakly)."""

    def __init__(self, model, n: int = 120, seed: int = 0, split: str = "test"):
        g = torch.Generator().manual_seed(seed)
        self.split = split
        self.y = torch.randint(0, model.num_classes, (n,), generator=g)
        self.x = {}
        for i, (m, enc) in enumerate(model.encoders.items()):
            d = enc.net[0].in_features
            x = torch.randn(n, d, generator=g)
            x[:, 0] += (2.0 if i == 0 else 0.7) * self.y.float()
            self.x[m] = x

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {m: x[i] for m, x in self.x.items()}, self.y[i]


def _trained(m: int = 2, fusion: str = "concat", seed: int = 0):
    model = make_model(m, fusion, seed=seed)
    data = _Data(model, n=160, seed=seed + 10, split="train")
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):  # full-batch Adam: a usable model in ~0.1 s
        opt.zero_grad()
        F.cross_entropy(model(data.x), data.y).backward()
        opt.step()
    model.eval()
    return model, torch.utils.data.DataLoader(_Data(model, n=120, seed=seed + 20), batch_size=32)


@pytest.fixture(scope="module")
def trained():
    return _trained()


def test_missing_at_full_severity_is_the_other_modalitys_unimodal_accuracy(trained):
    model, loader = trained
    rob = robustness(model, loader, n_resamples=50)
    ev = md.probes.evaluate(model, loader)
    # measured: unimodal accuracy m0 0.675, m1 0.325 (n = 120); fused 0.700
    assert ev.unimodal["m0"].accuracy - ev.unimodal["m1"].accuracy > 0.05
    assert rob.accuracy["missing"]["m0"][-1] == pytest.approx(ev.unimodal["m1"].accuracy, abs=1e-9)
    assert rob.accuracy["missing"]["m1"][-1] == pytest.approx(ev.unimodal["m0"].accuracy, abs=1e-9)
    assert rob.true_prob["missing"]["m0"][-1] == pytest.approx(ev.unimodal["m1"].true_prob,
                                                               rel=1e-5)
    assert rob.split == "test" and rob.n == 120 and rob.baseline == "zero"
    # severities in between: the corrupted subsets are nested, the curve interpolates the ends
    acc = rob.accuracy["missing"]["m0"]
    assert min(acc[0], acc[-1]) - 0.1 <= min(acc) and max(acc) <= max(acc[0], acc[-1]) + 0.1


def test_missing_uses_the_requested_baseline_for_any_head():
    model, loader = _trained(3, "film", seed=1)
    train = torch.utils.data.DataLoader(_Data(model, n=64, seed=5, split="train"), batch_size=32)
    rob = robustness(model, loader, corruptions=("missing",), severities=(0.0, 1.0),
                     baseline="mean", baseline_loader=train, n_resamples=20)
    assert rob.baseline == "mean" and model.baseline_kind == "zero"  # restored
    means = model.mean_features(train)
    with torch.no_grad():
        feats = {m: [] for m in model.modalities}
        ys = []
        for x, y in loader:
            for m, f in model.eval().encode(x).items():
                feats[m].append(f)
            ys.append(y)
        feats = {m: torch.cat(v) for m, v in feats.items()}
        y = torch.cat(ys)
        for m in model.modalities:
            sub = dict(feats)
            sub[m] = means[m].expand_as(feats[m])
            expected = float((model.fusion(sub).argmax(1) == y).double().mean())
            assert rob.accuracy["missing"][m][1] == pytest.approx(expected, abs=1e-9), m


def test_severity_zero_is_the_clean_accuracy_for_every_corruption(trained):
    model, loader = trained
    rob = robustness(model, loader, corruptions={"missing": "missing", "gaussian": "gaussian",
                                                 "shuffle": "shuffle",
                                                 "fade": lambda x, s, g: x * (1 - s)},
                     n_resamples=50)
    clean = md.probes.evaluate(model, loader).accuracy
    assert rob.clean_accuracy == pytest.approx(clean, abs=1e-9)
    for c in rob.corruptions:
        for m in rob.modalities:
            assert rob.accuracy[c][m][0] == pytest.approx(clean, abs=1e-9), (c, m)
    # the corruptions bite on the modality the model uses (measured: 0.700 -> 0.325 / 0.283)
    assert rob.accuracy["missing"]["m0"][-1] < clean - 0.1
    assert rob.accuracy["shuffle"]["m0"][-1] < clean - 0.1
    # gaussian at 3 sigma: measured 0.700 -> 0.450
    big = robustness(model, loader, corruptions=("gaussian",), severities=(0.0, 3.0),
                     n_resamples=20)
    assert big.accuracy["gaussian"]["m0"][-1] < clean - 0.05


def _ignore(model, m: str):
    """Make the head ignore modality ``m`` (its weights to zero)."""
    with torch.no_grad():
        if model.fusion_type == "concat":
            dims = [model.feature_dims[k] for k in model.modalities]
            start = sum(dims[:model.modalities.index(m)])
            model.fusion.fc.weight[:, start:start + model.feature_dims[m]] = 0
        elif model.fusion_type == "late":
            model.fusion.heads[m].weight.zero_()
        elif model.fusion_type == "sum":
            model.fusion.proj[m].weight.zero_()
    return model


@pytest.mark.parametrize("fusion", ["concat", "late", "sum"])
def test_an_ignored_modality_gives_flat_curves(fusion):
    model = _ignore(make_model(2, fusion, seed=3), "m1")
    loader = torch.utils.data.DataLoader(_Data(model, n=90, seed=4), batch_size=30)
    model.set_baseline({m: torch.full((d,), 0.5) for m, d in model.feature_dims.items()})
    rob = robustness(model, loader, n_resamples=20)
    for c in rob.corruptions:
        assert rob.accuracy[c]["m1"] == pytest.approx([rob.clean_accuracy] * len(SEV), abs=1e-9)
        assert rob.true_prob[c]["m1"] == pytest.approx([rob.clean_true_prob] * len(SEV),
                                                       rel=1e-5)
        assert rob.auc[c]["m1"] == pytest.approx(rob.clean_accuracy, abs=1e-9)


def test_shuffle_on_an_ignored_modality_changes_nothing_and_on_a_used_one_does(trained):
    model, loader = trained
    ignoring = _ignore(copy.deepcopy(model), "m1")
    rob = robustness(ignoring, loader, corruptions=("shuffle",), n_resamples=20)
    assert rob.accuracy["shuffle"]["m1"] == [rob.clean_accuracy] * len(SEV)
    assert rob.true_prob["shuffle"]["m1"] == pytest.approx([rob.clean_true_prob] * len(SEV),
                                                           rel=1e-6)
    # the same probe on m0 (used): the true-class probability falls at every severity step
    p = rob.true_prob["shuffle"]["m0"]
    assert all(b < a for a, b in zip(p, p[1:], strict=False)), p


def test_auc_is_the_normalised_trapezoid():
    assert robustness_auc((0, 0.25, 0.5, 1.0), (0.8, 0.6, 0.5, 0.2)) == pytest.approx(0.4875)
    assert robustness_auc((0.0, 2.0), (0.6, 0.2)) == pytest.approx(0.4)
    assert robustness_auc((0.3,), (0.7,)) == pytest.approx(0.7)


def test_result_auc_matches_a_hand_trapezoid(trained):
    model, loader = trained
    sev = (0.0, 0.1, 0.5, 1.0)
    rob = robustness(model, loader, severities=sev, n_resamples=100)
    for c in rob.corruptions:
        for m in rob.modalities:
            a = rob.accuracy[c][m]
            hand = sum((sev[j + 1] - sev[j]) * (a[j] + a[j + 1]) / 2 for j in range(3)) / 1.0
            assert rob.auc[c][m] == pytest.approx(hand, abs=1e-9)
            assert rob.auc_low[c][m] <= rob.auc[c][m] <= rob.auc_high[c][m]
            for j in range(4):
                assert rob.accuracy_low[c][m][j] <= a[j] <= rob.accuracy_high[c][m][j]
    frame = rob.auc_frame()
    assert list(frame.columns) == ["modality", "corruption", "auc", "auc_low", "auc_high"]
    assert frame.attrs["split"] == "test" and len(frame) == 6


class _Oracle(torch.utils.data.Dataset):
    """Feature ``a`` is the one-hot of a prediction that is right with probability ``p``."""

    def __init__(self, n: int, p: float, seed: int, classes: int = 3):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, classes, (n,), generator=g)
        right = torch.rand(n, generator=g) < p
        pred = torch.where(right, y, (y + 1) % classes)
        self.a = F.one_hot(pred, classes).float()
        self.b = torch.randn(n, 2, generator=g)
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"a": self.a[i], "b": self.b[i]}, self.y[i]


def test_bootstrap_intervals_cover_a_known_accuracy():
    model = md.MultimodalClassifier({"a": nn.Identity(), "b": nn.Identity()}, {"a": 3, "b": 2}, 3)
    with torch.no_grad():
        model.fusion.fc.weight.copy_(torch.cat([torch.eye(3), torch.zeros(3, 2)], 1))
        model.fusion.fc.bias.zero_()
    p, n, reps = 0.7, 200, 50
    covered, widths = 0, []
    for r in range(reps):
        loader = torch.utils.data.DataLoader(_Oracle(n, p, seed=100 + r), batch_size=100)
        rob = robustness(model, loader, corruptions=("missing",), modalities=("b",),
                         severities=(0.0, 1.0), n_resamples=300, level=0.9, seed=r)
        lo, hi = rob.accuracy_low["missing"]["b"][0], rob.accuracy_high["missing"]["b"][0]
        covered += lo <= p <= hi
        widths.append(hi - lo)
        # b is ignored: the curve is flat, so the AUC and its interval are the clean ones
        assert (rob.auc_low["missing"]["b"], rob.auc_high["missing"]["b"]) == (lo, hi)
    # nominal 90 %: measured 48 of 50; a binomial(50, 0.9) lies in [39, 50] with prob > 0.99
    assert 39 <= covered <= 50, covered
    # normal-approximation width 2 * 1.645 * sqrt(0.21 / 200) = 0.107; measured mean 0.106
    assert 0.09 < float(np.mean(widths)) < 0.12


def test_custom_corruptions_by_mapping_or_callable(trained):
    model, loader = trained

    def fade(x, severity, generator):
        return x.mul_(1 - severity)  # in place on the copy it is given: the cache is safe

    def jitter(x, severity, generator):
        return x + severity * torch.randn(x.shape, generator=generator, device=x.device)

    rob = robustness(model, loader, corruptions=["missing", fade, jitter], n_resamples=20)
    assert rob.corruptions == ("missing", "fade", "jitter")
    # fading to zero at severity 1 is the zero baseline: missing at severity 1
    for m in rob.modalities:
        assert rob.accuracy["fade"][m][-1] == pytest.approx(rob.accuracy["missing"][m][-1],
                                                            abs=1e-9)
        assert rob.accuracy["fade"][m][0] == pytest.approx(rob.clean_accuracy, abs=1e-9)
    again = robustness(model, loader, corruptions=jitter, n_resamples=20)
    assert again.accuracy["jitter"] == rob.accuracy["jitter"]  # seeded generator
    with pytest.raises(ValueError, match="must return a tensor shaped like its input"):
        robustness(model, loader, corruptions={"bad": lambda x, s, g: x[:, :1]})


def test_gaussian_noise_scale_is_the_std_of_all_entries(trained):
    model, loader = trained
    rob = robustness(model, loader, corruptions=("gaussian",), n_resamples=20)
    with torch.no_grad():
        feats = torch.cat([model.eval().encode(x)["m0"] for x, _ in loader])
        inputs = torch.cat([x["m0"] for x, _ in loader])
    assert rob.noise_scale["m0"] == pytest.approx(float(feats.double().std(unbiased=False)),
                                                  rel=1e-5)
    assert "std of all feature entries" in rob.noise_definition
    inp = robustness(model, loader, corruptions=("gaussian",), noise_space="input",
                     severities=(0.0, 3.0), n_resamples=20)
    assert inp.noise_scale["m0"] == pytest.approx(float(inputs.double().std(unbiased=False)),
                                                  rel=1e-5)
    assert inp.accuracy["gaussian"]["m0"][0] == pytest.approx(inp.clean_accuracy)
    # measured: input noise at 3 sigma 0.700 -> 0.492
    assert inp.accuracy["gaussian"]["m0"][-1] < inp.clean_accuracy - 0.05


def test_bad_arguments_say_what_to_do(trained):
    model, loader = trained
    with pytest.raises(ValueError, match=r"fraction of samples.*\[0, 1\]"):
        robustness(model, loader, severities=(0.0, 2.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        robustness(model, loader, severities=(0.5, 0.0))
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        robustness(model, loader, corruptions=("blur",))
    with pytest.raises(ValueError, match="non-empty subset"):
        robustness(model, loader, modalities=("audio",))
    with pytest.raises(ValueError, match="noise_space must be one of"):
        robustness(model, loader, noise_space="latent")


def test_round_trip_frames_and_plot(trained, tmp_path):
    model, loader = trained
    rob = robustness(model, loader, n_resamples=30)
    d = json.loads(json.dumps(rob.to_dict()))
    back = RobustnessResult.from_dict(d)
    assert back.to_dict() == rob.to_dict()
    frame = rob.to_dataframe()
    assert {"modality", "corruption", "severity", "accuracy", "accuracy_low", "accuracy_high",
            "true_prob", "n", "split"} <= set(frame.columns)
    assert len(frame) == 3 * 2 * 5 and set(frame["split"]) == {"test"}
    fig = back.plot()
    assert len(fig.axes) == 3
    texts = [ax.get_ylabel() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes]
    assert any("test" in t for t in texts) and any("sigma" in t for t in texts)
    plt.close(fig)


def test_model_and_rng_state_are_left_as_found():
    from test_probe_state import _loader, _run

    ref_model, ref, ref_draws = _run(None, None)
    model, got, draws = _run(lambda m, tmp: robustness(m, _loader(), noise_space="input",
                                                       n_resamples=20), None)
    assert got["modes"] == ref["modes"] and got["requires_grad"] == ref["requires_grad"]
    for n, b in got["buffer_values"].items():
        assert torch.equal(b, ref["buffer_values"][n]), n
    for n, p in got["params"].items():
        assert torch.equal(p, ref["params"][n]), n
    for n, g in got["grads"].items():
        assert g is dict(model.named_parameters())[n].grad
    assert torch.equal(draws[0], ref_draws[0]) and draws[2] == ref_draws[2]
    np.testing.assert_array_equal(draws[1], ref_draws[1])


def test_samples_absent_in_the_data_stay_absent(trained):
    model, loader = trained
    n = 120
    # m1 absent on the even samples: a (inputs, labels, present) loader
    batches = []
    for b, (x, y) in enumerate(loader):
        idx = torch.arange(b * 32, b * 32 + len(y))
        batches.append((x, y, {"m1": idx % 2 == 1}))
    rob = robustness(model, batches, n_resamples=20, split="test")
    assert rob.absent_in_data == {"m0": 0, "m1": n // 2}
    assert rob.clean_accuracy == pytest.approx(md.probes.evaluate(model, batches).accuracy)
    # with m1 absent everywhere in the data, no corruption of m1 can change anything
    none = [(x, y, {"m1": torch.zeros(len(y), dtype=torch.bool)}) for x, y in loader]
    flat = robustness(model, none, n_resamples=20)
    for c in flat.corruptions:
        assert flat.accuracy[c]["m1"] == [flat.clean_accuracy] * len(SEV), c
    # ...and the clean accuracy is m0's unimodal accuracy (measured 0.675)
    assert flat.clean_accuracy == pytest.approx(md.probes.evaluate(model, loader).unimodal["m0"].accuracy)


def test_diagnosis_holds_the_curves_and_the_rates(trained):
    model, loader = trained
    rep = md.diagnose(model, loader, fisher=None, n_resamples=50)
    # the diagnosis' robustness is md.robustness with its baseline, seed and resamples
    alone = robustness(model, loader, n_resamples=50)
    assert rep.robustness.to_dict() == alone.to_dict()
    assert rep.robustness.accuracy["missing"]["m0"][-1] == pytest.approx(
        rep.unimodal.unimodal["m1"].accuracy)
    assert rep.conditional_utilization.baseline == rep.baseline == "zero"
    assert "Robustness (test, AUC" in rep.summary and "Conditional utilisation (test" in rep.summary
    frame = rep.to_frame()
    auc = frame[frame.probe == "robustness AUC (shuffle)"].set_index("modality")
    assert auc.loc["m0", "value"] == pytest.approx(rep.robustness.auc["shuffle"]["m0"])
    assert (frame[frame.probe == "conditional utilisation"].value.tolist()
            == pytest.approx(list(rep.conditional_utilization.values())))
    back = md.Diagnosis.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back.robustness.to_dict() == rep.robustness.to_dict()
    assert back.conditional_utilization == rep.conditional_utilization
    assert md.diagnose(model, loader, fisher=None, robustness=False).robustness is None


def test_saved_diagnosis_and_comparison_show_the_curves(trained, tmp_path):
    """Draws the figures: 2.3 s on the shared 2-core machine."""
    from types import SimpleNamespace

    from modaldiag.report.compare import write_comparison

    model, loader = trained
    ignoring = _ignore(copy.deepcopy(model), "m1")
    reps = {name: md.diagnose(net, loader, fisher=None, n_resamples=50)
            for name, net in (("joint", model), ("ignores m1", ignoring))}
    rep = reps["joint"]
    out = rep.save(tmp_path / "diag")
    assert (out / "robustness.png").is_file()
    saved_csv = pd.read_csv(out / "robustness.csv")
    assert len(saved_csv) == 3 * 2 * 5 and set(saved_csv.split) == {"test"}
    page = (out / "report.html").read_text()
    assert "Robustness and conditional utilisation" in page and "d_util" in page

    def run(name):
        hist = md.History(("m0", "m1"), {}, [
            {"epoch": t, "val": {"acc": 0.6, "unimodal_acc": {"m0": 0.5, "m1": 0.3}},
             "speed": {"bdr": {"m0": 0.1 * t, "m1": 0.0}, "d_speed": 0.1 * t}}
            for t in range(3)], {"test": {"n": 120}})
        path = tmp_path / name.replace(" ", "-")
        path.mkdir()
        return SimpleNamespace(name=name, path=path, history=hist, config={
            "name": name, "dataset": "toy", "method": "joint", "epochs": 3, "seed": 0,
            "test_acc": 0.6, "test_unimodal_acc": {"m0": 0.5, "m1": 0.3}, "best_epoch": 2,
            "regulator": None})

    runs = [run("joint"), run("ignores m1")]
    write_comparison(runs, tmp_path / "cmp", diagnoses=reps)
    record = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert {"robustness.png", "conditional_speed.png"} <= set(record["files"])
    saved = RobustnessResult.from_dict(record["runs"][1]["diagnosis"]["robustness"])
    assert saved.accuracy["shuffle"]["m1"] == [saved.clean_accuracy] * len(SEV)  # flat
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "<h2>Robustness</h2>" in page and "Conditional learning speed" in page
    fig = md.plot.robustness_compare({"joint": rep.robustness,
                                      "ignores m1": reps["ignores m1"].robustness})
    # 3 panels x 2 runs x 2 modalities curves (+ clean-free legend proxies on the first panel)
    assert sum(len([ln for ln in ax.get_lines() if len(ln.get_xdata())]) for ax in fig.axes) \
        == 3 * 2 * 2
    plt.close(fig)
