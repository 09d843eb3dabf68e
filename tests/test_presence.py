"""Missing modalities (issue 16, part 2): per-sample presence masks through the datasets, the
batch format, md.fit / md.Regulation and every probe. Absent = the contract's baseline."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model

import modaldiag as md
from modaldiag.probes.fisher import fisher_trace
from modaldiag.probes.separability import separability
from modaldiag.probes.shapley import shapley
from modaldiag.probes.unimodal import evaluate
from modaldiag.utils.validation import unpack_batch, unpack_batch_present

RTOL, ATOL = 1e-5, 1e-6


def _batch(model, n=6, seed=1, classes=3):
    x = make_inputs(model, batch=n, seed=seed)
    y = torch.arange(n) % classes
    return x, y


def _by_hand(model, x, absent):
    """Features with the rows listed in ``absent`` ({m: [rows]}) replaced by the baseline."""
    feats = model.encode(x)
    for m, rows in absent.items():
        f = feats[m].clone()
        for i in rows:
            f[i] = model.absent_feature(m, f)[i]
        feats[m] = f
    return feats


def _mask(n, rows):
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(rows)] = False
    return keep


# ---------------------------------------------------------------- the batch format
def test_unpack_batch_present_formats_and_errors():
    mods = ("audio", "visual")
    x = {"audio": torch.zeros(4, 2), "visual": torch.zeros(4, 3)}
    y = torch.zeros(4, dtype=torch.long)
    assert unpack_batch_present((x, y), mods)[2] is None
    # all-True is "nothing absent": None, so it trains exactly like a 2-tuple
    assert unpack_batch_present((x, y, {"audio": torch.ones(4, dtype=torch.bool)}), mods)[2] is None
    keep = torch.tensor([True, False, True, True])
    got = unpack_batch_present((x, y, {"audio": keep}), mods)[2]
    assert set(got) == {"audio"} and torch.equal(got["audio"], keep)
    assert unpack_batch((x, y, {"audio": keep}), mods)[0] is x  # label-only readers accept it
    with pytest.raises(ValueError, match=r"names 'audoi'.*Did you mean 'audio'\?"):
        unpack_batch_present((x, y, {"audoi": keep}), mods, batch_index=3)
    with pytest.raises(ValueError, match=r"modality 'audio' \(batch 2\) has shape \(3,\); expected \(4,\)"):
        unpack_batch_present((x, y, {"audio": keep[:3]}), mods, batch_index=2)
    with pytest.raises(ValueError, match="has dtype torch.int64; it must be torch.bool"):
        unpack_batch_present((x, y, {"audio": keep.long()}), mods)
    with pytest.raises(TypeError, match=r"the third item must be the presence mask, a dict \{modality: BoolTensor \(B,\)\}"):
        unpack_batch_present((x, y, [keep]), mods)


def test_mask_features_rows_become_the_baseline():
    model = make_model()
    x, _ = _batch(model)
    feats = model.encode(x)
    assert model.mask_features(feats, None) is feats
    model.set_baseline({"m0": torch.full((4,), 0.5), "m1": torch.full((5,), -1.0)})
    out = model.mask_features(feats, {"m0": _mask(6, [1, 4])})
    assert torch.equal(out["m1"], feats["m1"])
    assert torch.equal(out["m0"][[0, 2, 3, 5]], feats["m0"][[0, 2, 3, 5]])
    assert torch.equal(out["m0"][[1, 4]], torch.full((2, 4), 0.5))


# ---------------------------------------------------------------- training
def test_absent_modality_gets_no_gradient_from_its_sample():
    """Sample 2 has m0 absent: the gradient w.r.t. its m0 input is exactly 0, and every parameter
    gradient equals the brute-force one (its m0 feature replaced by the baseline by hand)."""
    model = make_model()
    x, y = _batch(model)
    x = {m: v.clone().requires_grad_(True) for m, v in x.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = md.Regulation(model, opt)
    run.epoch_start(0)
    run.backward(x, y, {"m0": _mask(6, [2])})
    assert float(x["m0"].grad[2].abs().max()) == 0.0
    assert float(x["m0"].grad[[0, 1, 3, 4, 5]].abs().sum()) > 0  # the others still learn
    assert float(x["m1"].grad[2].abs().sum()) > 0  # its present modality too
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model.head(_by_hand(model, {m: v.detach() for m, v in x.items()},
                                        {"m0": [2]})), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=RTOL, atol=ATOL, msg=n)


def test_ctx_present_and_regulators_see_the_baseline():
    seen = {}

    class Spy(md.Callback):
        def transform_features(self, features, ctx):
            seen["present"] = ctx.present
            seen["m0"] = features["m0"].detach().clone()
            return features

    model = make_model()
    x, y = _batch(model)
    model.set_baseline({"m0": torch.full((4,), 3.0)})
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Spy()])
    run.epoch_start(0)
    run.backward(x, y, {"m0": _mask(6, [0, 5])})
    assert torch.equal(seen["present"]["m0"], _mask(6, [0, 5]))
    assert torch.equal(seen["m0"][[0, 5]], torch.full((2, 4), 3.0))
    run.backward(x, y)
    assert seen["present"] is None


def _batches(ds, bs):
    out = []
    for i in range(0, len(ds), bs):
        idx = torch.arange(i, min(i + bs, len(ds)))
        out.append(({m: t[idx] for m, t in ds.inputs.items()}, ds.labels[idx]))
    return out


def test_all_true_presence_is_bit_identical_to_two_tuples():
    data = md.datasets.synthetic(n_samples=120, num_classes=3, dims={"a": 5, "b": 5}, seed=0)
    plain = _batches(data.train, 16)
    flagged = [(x, y, {"a": torch.ones(len(y), dtype=torch.bool),
                       "b": torch.ones(len(y), dtype=torch.bool)}) for x, y in plain]
    states = []
    for loader in (plain, flagged):
        torch.manual_seed(0)
        model = md.models.default_model(data, feature_dim=4)
        hist = md.fit(model, loader, val_loader=flagged[:2], epochs=2, progress=False, seed=1,
                      regulator=md.OGM())
        states.append((model.state_dict(), hist.to_dataframe().drop(columns="time_s")))
    for k, v in states[0][0].items():
        assert torch.equal(v, states[1][0][k]), k
    assert states[0][1].equals(states[1][1])


def test_fit_with_missing_synthetic_data_trains_and_validates():
    data = md.datasets.synthetic(n_samples=300, num_classes=3, dims={"a": 6, "b": 6},
                                 missing_rate={"a": 0.4}, seed=0)
    model = md.models.default_model(data, feature_dim=4)
    hist = md.fit(model, data.train.loader(32, shuffle=True), val_loader=data.val.loader(64),
                  epochs=2, progress=False, seed=0)
    val = evaluate(model, data.val.loader(64))
    assert hist.to_dataframe()["val.acc"].iloc[-1] == pytest.approx(val.accuracy)
    assert hist.to_dataframe()["val.loss"].iloc[-1] == pytest.approx(val.loss, rel=RTOL)


# ---------------------------------------------------------------- probes
def _masked_loader(model, absent, n=9, seed=1):
    x, y = _batch(model, n=n, seed=seed)
    present = {m: _mask(n, rows) for m, rows in absent.items()}
    return x, y, [(x, y, present)]


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_evaluate_equals_the_baseline_by_hand(fusion):
    model = make_model(fusion=fusion).eval()
    model.set_baseline({"m0": torch.full((4,), 0.25), "m1": torch.zeros(5)})
    absent = {"m0": [1, 4], "m1": [4, 7]}
    x, y, loader = _masked_loader(model, absent)
    res = evaluate(model, loader)
    with torch.no_grad():
        feats = _by_hand(model, x, absent)
        logits = model.head(feats)
        uni = {m: model.head(feats, present=(m,)) for m in model.modalities}
    assert res.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=RTOL, abs=ATOL)
    assert res.accuracy == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    for m in model.modalities:
        assert res.unimodal[m].accuracy == pytest.approx(
            float((uni[m].argmax(1) == y).double().mean()))
    plain = evaluate(model, [(x, y)])
    assert plain.loss != pytest.approx(res.loss)  # the mask changed something


@pytest.mark.parametrize("method", ["exact", "permutation"])
@pytest.mark.parametrize("value", ["paper", "prob"])
def test_shapley_of_an_absent_modality_is_zero(method, value):
    """The dummy axiom: sample i's absent modality is at its baseline in every coalition, the
    coalition is played as S & present, so its value is exactly 0; the present modality gets
    v(present) - v(empty); samples with everything present are unchanged."""
    model = make_model(m=3).eval()
    absent = {"m0": [0, 3], "m2": [3, 5]}
    x, y, loader = _masked_loader(model, absent)
    sv = shapley(model, loader, value=value, method=method, n_permutations=8)
    plain = shapley(model, [(x, y)], value=value, method=method, n_permutations=8)
    assert sv.values[[0, 3], 0].tolist() == [0.0, 0.0]
    assert sv.values[[3, 5], 2].tolist() == [0.0, 0.0]
    # sample 3 has only m1: phi_m1 = v({m1}) - v(empty), from the baseline logits by hand
    with torch.no_grad():
        feats = _by_hand(model, x, absent)
        only = model.head(feats, present=("m1",))[3]
        empty = model.head(feats, present=())[3]
    def v(logits, size):
        if value == "paper":
            return size * float(logits.argmax() == y[3])
        return float(F.softmax(logits.double(), 0)[y[3]])
    assert float(sv.values[3, 1]) == pytest.approx(v(only, 1) - v(empty, 0), abs=1e-9)
    torch.testing.assert_close(sv.values.sum(1), (sv.full_value - sv.empty_value).double(),
                               rtol=1e-9, atol=1e-9)
    for i in (1, 2, 4, 6, 7, 8):  # everything present: the game is the plain one
        torch.testing.assert_close(sv.values[i], plain.values[i], rtol=1e-9, atol=1e-9)


def _brute_fisher(model, x, y, absent):
    totals = {m: 0.0 for m in model.modalities}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        xi = {m: v[i:i + 1] for m, v in x.items()}
        feats = model.encode(xi)
        for m, rows in absent.items():
            if i in rows:
                feats[m] = model.absent_feature(m, feats[m]).detach()
        F.cross_entropy(model.head(feats), y[i:i + 1]).backward()
        for m in model.modalities:
            totals[m] += sum(float(p.grad.pow(2).sum()) for p in model.encoders[m].parameters()
                             if p.grad is not None)
    return {m: t / len(y) for m, t in totals.items()}


@pytest.mark.parametrize("engine", ["hooks", "vmap", "loop"])
def test_fisher_trace_honours_presence(engine):
    model = make_model().eval()
    absent = {"m0": [0, 2, 3]}
    x, y, loader = _masked_loader(model, absent, n=5)
    want = _brute_fisher(model, x, y, absent)
    got = fisher_trace(model, loader, engine=engine)
    for m in model.modalities:
        assert got[m] == pytest.approx(want[m], rel=1e-4, abs=ATOL)
    # every sample's m0 absent: exactly zero trace for m0
    all_absent = fisher_trace(model, [(x, y, {"m0": torch.zeros(5, dtype=torch.bool)})],
                              engine=engine)
    assert all_absent["m0"] == 0.0 and all_absent["m1"] > 0


def test_separability_uses_only_the_samples_where_a_modality_is_present():
    data = md.datasets.synthetic(n_samples=240, num_classes=3, dims={"a": 6, "b": 6},
                                 missing_rate={"a": 0.3}, seed=0)
    model = md.models.default_model(data, feature_dim=4).eval()
    got = separability(model, data.train.loader(64), data.val.loader(64), n_init=2)
    keep_tr, keep_va = data.train.present["a"], data.val.present["a"]
    sub_tr = data.train.subset(torch.nonzero(keep_tr).flatten())
    sub_va = data.val.subset(torch.nonzero(keep_va).flatten())
    want = separability(model, sub_tr.loader(64), sub_va.loader(64), n_init=2)
    assert got["a"].n_train == int(keep_tr.sum()) < len(data.train)
    for key in ("train_purity", "val_purity", "linear_probe", "silhouette"):
        assert getattr(got["a"], key) == pytest.approx(getattr(want["a"], key), abs=1e-9), key
    assert got["b"].n_train == len(data.train)


def test_mean_baseline_averages_present_samples_only():
    model = make_model().eval()
    x, y, loader = _masked_loader(model, {"m0": [0, 1, 2]}, n=6)
    means = model.mean_features(loader)
    with torch.no_grad():
        feats = model.encode(x)
    torch.testing.assert_close(means["m0"], feats["m0"][3:].mean(0), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(means["m1"], feats["m1"].mean(0), rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="'m0' is absent from every sample"):
        model.mean_features([(x, y, {"m0": torch.zeros(6, dtype=torch.bool)})])


def test_diagnose_runs_on_missing_data():
    data = md.datasets.synthetic(n_samples=240, num_classes=3, dims={"a": 6, "b": 6},
                                 missing_rate={"b": 0.5}, seed=1)
    model = md.models.default_model(data, feature_dim=4)
    md.fit(model, data.train.loader(32), epochs=1, progress=False)
    dx = md.diagnose(model, data.test.loader(64), train_loader=data.train.loader(64),
                     val_loader=data.val.loader(64), fisher=None)
    plain = evaluate(model, data.test.loader(64))
    assert dx.unimodal.accuracy == pytest.approx(plain.accuracy)


# ---------------------------------------------------------------- datasets
def test_synthetic_missing_rate_yields_presence_masks():
    data = md.datasets.synthetic(n_samples=300, num_classes=3, missing_rate={"b": 0.3}, seed=0)
    for k, split in enumerate(("train", "val", "test")):
        ds = getattr(data, split)
        assert set(ds.present) == {"b"}
        assert np.array_equal(ds.present["b"].numpy(), ~data.info["missing"]["b"][k])
        # the placeholder input of a missing entry is zeros
        assert float(ds.inputs["b"][~ds.present["b"]].abs().sum()) == 0.0
    miss = np.concatenate(data.info["missing"]["b"]).mean()
    assert 0.25 < miss < 0.35
    batch = next(iter(data.train.loader(50)))
    assert len(batch) == 3 and batch[2]["b"].dtype == torch.bool
    assert torch.equal(batch[2]["b"], data.train.present["b"][:50])
    item = data.train[4]
    assert len(item) == 3 and bool(item[2]["b"]) == bool(data.train.present["b"][4])
    sub = data.train.subset([5, 1])
    assert torch.equal(sub.present["b"], data.train.present["b"][[5, 1]])
    collated = next(iter(torch.utils.data.DataLoader(data.train, batch_size=8)))
    assert torch.equal(collated[2]["b"], data.train.present["b"][:8])
    assert len(next(iter(md.datasets.synthetic(n_samples=60, num_classes=3).train.loader(8)))) == 2


def test_dataset_presence_argument_is_checked():
    x = {"audio": np.zeros((4, 2), np.float32), "visual": np.zeros((4, 2), np.float32)}
    y = [0, 1, 0, 1]
    ds = md.datasets.MultimodalDataset(x, y, present={"audio": [1, 0, 1, 1]})
    assert ds.present["audio"].tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match=r"names 'vidual'.*Did you mean 'visual'\?"):
        md.datasets.MultimodalDataset(x, y, present={"vidual": [1, 1, 1, 1]})
    with pytest.raises(ValueError, match=r"present\['audio'\] has shape \(3,\); expected \(4,\)"):
        md.datasets.MultimodalDataset(x, y, present={"audio": [1, 1, 1]})
    with pytest.raises(ValueError, match="must hold booleans or 0/1"):
        md.datasets.MultimodalDataset(x, y, present={"audio": [1, 2, 1, 1]})


def _write_av(root, rows, absent_files=()):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "audio").mkdir()
    (root / "visual").mkdir()
    for line in rows[1:]:
        clip = line.split(",")[0]
        if (clip, "audio") not in absent_files:
            np.save(root / "audio" / f"{clip}.npy", rng.standard_normal((6, 10)).astype(np.float32))
        if (clip, "visual") not in absent_files:
            (root / "visual" / clip).mkdir()
            for f in range(2):
                img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
                Image.fromarray(img).save(root / "visual" / clip / f"frame_{f}.png")
    (root / "train.csv").write_text("\n".join(rows) + "\n")


def test_av_folder_presence_columns(tmp_path):
    rows = ["clip,label,audio_present,visual_present", "c0,A,1,1", "c1,B,0,1", "c2,A,1,0",
            "c3,B,1,1"]
    _write_av(tmp_path, rows, absent_files={("c1", "audio"), ("c2", "visual")})
    ds = md.datasets.AVFolderDataset(tmp_path, num_frames=2, image_size=8)
    assert len(ds) == 4  # the header row is never a clip
    assert ds.present == {"audio": [True, False, True, True], "visual": [True, True, False, True]}
    x, y, present = ds[1]
    assert present == {"audio": torch.tensor(False), "visual": torch.tensor(True)}
    assert x["audio"].shape == (1, 6, 10) and float(x["audio"].abs().sum()) == 0.0
    x2, _, p2 = ds[2]
    assert x2["visual"].shape == (2, 3, 8, 8) and float(x2["visual"].abs().sum()) == 0.0
    batch = next(iter(ds.loader(batch_size=4)))
    assert batch[2]["audio"].tolist() == [True, False, True, True]
    assert ds.subset([2, 1]).present == {"audio": [True, False], "visual": [False, True]}
    model = md.models.default_model(md.datasets.DatasetSplits("av", ds, ds, ds), feature_dim=4)
    res = evaluate(model, ds.loader(batch_size=4))
    assert res.n == 4


@pytest.mark.parametrize("rows, message", [
    (["clip,label,audio_present", "c0,A,1", "c1,B,yes"],
     r"train.csv:3: column 'audio_present' must be 0 or 1 .*got 'yes'"),
    (["clip,label,audoi_present", "c0,A,1", "c1,B,1"],
     r"column 'audoi_present' names no modality.*Did you mean 'audio_present'\?"),
    (["clip,label,audio_presnt", "c0,A,1", "c1,B,1"],
     r"column 'audio_presnt' is not a presence column; did you mean 'audio_present'\?"),
])
def test_av_folder_bad_presence_columns(tmp_path, rows, message):
    _write_av(tmp_path, rows)
    with pytest.raises(ValueError, match=message):
        md.datasets.AVFolderDataset(tmp_path, num_frames=2, image_size=8)


def test_av_folder_missing_file_of_a_present_modality_still_fails(tmp_path):
    rows = ["clip,label,audio_present", "c0,A,1", "c1,B,1"]
    _write_av(tmp_path, rows, absent_files={("c1", "audio")})
    with pytest.raises(ValueError, match="missing spectrogram for clip 'c1'"):
        md.datasets.AVFolderDataset(tmp_path, num_frames=2, image_size=8)
    with pytest.raises(ValueError, match="header=False but its first row names presence"):
        md.datasets.AVFolderDataset(tmp_path, num_frames=2, image_size=8, header=False)
