import numpy as np
import pytest
import torch

import modaldiag as md
from modaldiag.datasets import MFEAT_VIEWS

MFEAT_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


def test_available_names_all_load():
    for name in md.datasets.available():
        data = md.datasets.load(name)
        assert len(data.modalities) >= 2
        inputs, labels = next(iter(data.train.loader(8)))
        assert set(inputs) == set(data.modalities)
        assert labels.dtype == torch.long and labels.shape == (8,)


def test_mfeat_shapes_and_split():
    data = md.datasets.load("mfeat")
    assert data.modalities == MFEAT_VIEWS
    assert data.input_shapes == {v: (d,) for v, d in MFEAT_DIMS.items()}
    assert (len(data.train), len(data.val), len(data.test)) == (1200, 400, 400)
    assert data.num_classes == 10
    # stratified: every class 120/40/40
    assert torch.bincount(data.train.labels).tolist() == [120] * 10
    # standardised on train only
    x = data.train.inputs["pix"]
    assert x.mean(0).abs().max() < 1e-4
    assert not torch.allclose(data.test.inputs["pix"].mean(0), torch.zeros(240), atol=1e-3)


def test_mfeat_pairs_in_named_order_and_deterministic():
    a = md.datasets.load("mfeat-pix-fou")
    assert a.modalities == ("pix", "fou")
    b = md.datasets.load("mfeat-pix-fou")
    assert torch.equal(a.train.inputs["fou"], b.train.inputs["fou"])
    with pytest.raises(ValueError, match="at least 2 distinct views"):
        md.datasets.load("mfeat-fou-xyz")
    with pytest.raises(ValueError, match="unknown dataset"):
        md.datasets.load("cremad")


def test_hapt_shapes_and_subject_split():
    data = md.datasets.load("hapt")
    assert data.modalities == ("accel", "gyro")
    assert data.input_shapes == {"accel": (3, 128), "gyro": (3, 128)}
    assert len(data) == 10017 and data.num_classes == 6
    subj = data.info["subjects"]
    assert len(subj["train"]) == 20 and len(subj["val"]) == 5 and len(subj["test"]) == 5
    assert not set(subj["train"]) & set(subj["test"]) and not set(subj["train"]) & set(subj["val"])
    # per-channel standardisation fitted on train
    ch_mean = data.train.inputs["gyro"].mean(dim=(0, 2))
    assert ch_mean.abs().max() < 1e-3
    assert data.train.inputs["accel"].dtype == torch.float32


def test_nutrimouse_targets():
    diet = md.datasets.load("nutrimouse")
    geno = md.datasets.load("nutrimouse-genotype")
    assert diet.input_shapes == {"gene": (120,), "lipid": (21,)}
    assert diet.num_classes == 5 and geno.num_classes == 2
    assert len(diet) == 40


def test_synthetic_is_deterministic_and_controls_strength():
    a = md.datasets.synthetic(n_samples=500, num_classes=3, strength={"x": 3.0, "y": 0.0}, seed=3)
    b = md.datasets.synthetic(n_samples=500, num_classes=3, strength={"x": 3.0, "y": 0.0}, seed=3)
    assert torch.equal(a.train.inputs["x"], b.train.inputs["x"])
    assert a.input_shapes == {"x": (32,), "y": (32,)}
    from sklearn.linear_model import LogisticRegression

    def acc(m):
        clf = LogisticRegression(max_iter=500).fit(a.train.inputs[m].numpy(), a.train.labels.numpy())
        return clf.score(a.test.inputs[m].numpy(), a.test.labels.numpy())

    assert acc("x") > 0.8 and acc("y") < 0.5  # y carries no class signal (chance = 1/3)


def test_synthetic_missing_and_label_noise():
    d = md.datasets.synthetic(n_samples=1000, strength={"a": 1.0, "b": 1.0},
                              missing_rate={"b": 0.3}, label_noise={"a": 0.5}, seed=0)
    miss = np.concatenate(d.info["missing"]["b"])
    assert 0.25 < miss.mean() < 0.35
    x = torch.cat([d.train.inputs["b"], d.val.inputs["b"], d.test.inputs["b"]])
    assert int((x.abs().sum(1) == 0).sum()) == int(miss.sum())
    with pytest.raises(ValueError, match="unknown modalities"):
        md.datasets.synthetic(strength={"a": 1.0, "b": 1.0}, noise={"c": 1.0})
    with pytest.raises(ValueError, match=r"num_classes must be an integer in \[2"):
        md.datasets.synthetic(num_classes=1)


def _write_av_fixture(root, n_train=6, n_test=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "audio").mkdir()
    (root / "visual").mkdir()
    labels = ["ANG", "HAP", "SAD"]
    for split, n in (("train", n_train), ("test", n_test)):
        rows = ["clip,label"]
        for i in range(n):
            clip = f"{split}_{i:03d}"
            rows.append(f"{clip},{labels[i % 3]}")
            np.save(root / "audio" / f"{clip}.npy", rng.standard_normal((20, 30 + i)).astype(np.float32))
            (root / "visual" / clip).mkdir()
            for f in range(4):
                img = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
                Image.fromarray(img).save(root / "visual" / clip / f"frame_{f:02d}.jpg")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return labels


def test_av_folder_loader(tmp_path):
    labels = _write_av_fixture(tmp_path)
    data = md.datasets.av_folder(tmp_path, val_fraction=0.2, num_frames=2, image_size=16,
                                 audio_length=32)
    assert data.class_names == labels
    assert (len(data.train), len(data.val), len(data.test)) == (5, 1, 3)
    assert data.input_shapes == {"audio": (1, 20, 32), "visual": (2, 3, 16, 16)}
    inputs, y = next(iter(data.train.loader(batch_size=4)))
    assert inputs["audio"].shape == (4, 1, 20, 32) and inputs["visual"].shape == (4, 2, 3, 16, 16)
    model = md.models.default_model(data, feature_dim=8)
    assert model(inputs).shape == (4, 3)


def test_av_folder_refuses_escaping_paths_and_bad_csv(tmp_path):
    _write_av_fixture(tmp_path)
    (tmp_path / "evil.csv").write_text("../../etc/passwd,ANG\n")
    with pytest.raises(ValueError, match="escapes the dataset root"):
        md.datasets.AVFolderDataset(tmp_path, "evil.csv")
    with pytest.raises(ValueError, match="escapes the dataset root"):
        md.datasets.AVFolderDataset(tmp_path, "../outside.csv")
    (tmp_path / "bad.csv").write_text("only_one_column\n")
    with pytest.raises(ValueError, match="expected '<clip id>,<label>'"):
        md.datasets.AVFolderDataset(tmp_path, "bad.csv")
    (tmp_path / "empty.csv").write_text("clip,label\n")
    with pytest.raises(ValueError, match="lists no clips"):
        md.datasets.AVFolderDataset(tmp_path, "empty.csv", header=True)
    with pytest.raises(ValueError, match="missing spectrogram for clip 'clip'.*pass header=True"):
        md.datasets.AVFolderDataset(tmp_path, "empty.csv")


# ---------------------------------------------------------------- MultimodalDataset input checks
def _ds(labels, n=None, **kwargs):
    n = len(labels) if n is None else n
    return md.datasets.MultimodalDataset({"a": torch.randn(n, 3), "b": torch.randn(n, 2)}, labels,
                                         **kwargs)


def test_float_labels_are_never_truncated():
    with pytest.raises(ValueError, match=r"non-integral value 2.7 at index 1.*never truncated"):
        _ds(np.array([0.0, 2.7, 1.0]))
    with pytest.raises(ValueError, match=r"non-integral value 0.5 at index 2"):
        _ds(torch.tensor([1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match=r"NaN or inf \(first at index 1\)"):
        _ds(np.array([0.0, np.nan, 1.0]))
    ds = _ds(np.array([0.0, 2.0, 1.0]))  # whole-number floats are exact class indices
    assert ds.labels.dtype == torch.long and ds.labels.tolist() == [0, 2, 1]
    assert ds.num_classes == 3


@pytest.mark.parametrize("labels, kwargs, exc, match", [
    ([0, 1, 2], {"num_classes": 2}, ValueError, r"labels must lie in \[0, 2\) .* from 0 to 2"),
    ([0, -1, 1], {}, ValueError, r"labels must lie in \[0, 2\) .* from -1 to 1"),
    (np.eye(3), {}, ValueError, r"labels must have shape \(N,\); got \(3, 3\)"),
    (np.array(["x", "y", "z"]), {}, TypeError, "labels have dtype <U1"),
    ([True, False, True], {}, ValueError, "labels have dtype torch.bool"),
    ([0, 1, 1], {"class_names": ["x"], "num_classes": 2}, ValueError, "class_names has 1 names"),
    ([0, 1, 1], {"num_classes": 0}, ValueError, r"num_classes must be None or an integer in \[1"),
    ([0, 1, 1], {"class_names": "ab"}, ValueError, "class_names must be None or a sequence"),
])
def test_bad_labels_are_refused(labels, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _ds(labels, **kwargs)


def test_dataset_shape_problems_are_refused():
    with pytest.raises(ValueError, match=r"labels have 5 rows but the modalities have \{'a': 5, 'b': 4\}"):
        md.datasets.MultimodalDataset({"a": torch.randn(5, 3), "b": torch.randn(4, 3)}, [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"the dataset is empty \(0 samples\)"):
        md.datasets.MultimodalDataset({"a": torch.randn(0, 3), "b": torch.randn(0, 3)}, [])
    with pytest.raises(TypeError, match="input of modality 'b' has dtype object"):
        md.datasets.MultimodalDataset({"a": np.zeros((2, 3)), "b": np.array([{}, {}], dtype=object)}, [0, 1])
    with pytest.raises(TypeError, match="MultimodalDataset: inputs must be a dict"):
        md.datasets.MultimodalDataset([np.zeros((2, 3))], [0, 1])
    ds = _ds([0, 1, 2, 1])
    assert len(ds.subset([])) == 0  # an empty *selection* of a valid dataset stays possible
    assert ds.subset([3, 0]).labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"subset indices must lie in \[0, 4\)"):
        ds.subset([4])


@pytest.mark.parametrize("kwargs, match", [
    ({"n_samples": 0}, r"n_samples must be an integer in \[1"),
    ({"n_samples": 2.5}, "n_samples must be an integer"),
    ({"num_classes": 1}, r"num_classes must be an integer in \[2"),
    ({"strength": {"a": -1.0, "b": 1.0}}, r"strength\['a'\] must be a finite number in \[0, inf"),
    ({"strength": {"a": float("nan"), "b": 1.0}}, r"strength\['a'\] must be a finite number"),
    ({"dims": 0}, r"dims\['a'\] must be an integer in \[1"),
    ({"dims": {"b": 2.5}}, r"dims\['b'\] must be an integer"),
    ({"noise": -0.5}, r"noise\['a'\] must be a finite number in \[0, inf"),
    ({"label_noise": {"b": 1.5}}, r"label_noise\['b'\] must be a finite number in \[0, 1\]"),
    ({"missing_rate": float("inf")}, r"missing_rate\['a'\] must be a finite number in \[0, 1\]"),
    ({"seed": -1}, r"seed must be an integer in \[0"),
    ({"splits": (0.5, 0.5, 0.0)}, "splits must be 3 positive fractions"),
    ({"n_samples": 8, "num_classes": 4}, r"n_samples=8 is too small .* split would be empty"),
])
def test_synthetic_parameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        md.datasets.synthetic(**kwargs)


# ---------------------------------------------------------------- av_folder
def _npy_with_header(path, shape, descr="<f4", payload=b""):
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
        fh.write(payload)


def _outside(tmp_path):
    out = tmp_path / "outside"
    out.mkdir()
    return out


def test_av_folder_refuses_symlinks_out_of_the_root(tmp_path):
    from PIL import Image

    root = tmp_path / "root"
    root.mkdir()
    _write_av_fixture(root)
    out = _outside(tmp_path)
    secret = out / "secret.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(secret)
    ds = md.datasets.AVFolderDataset(root, "train.csv", num_frames=4, image_size=8, audio_length=32)
    assert ds[0][0]["visual"].shape == (4, 3, 8, 8)
    # a frame file that is a symlink to a file outside the root
    frame = root / "visual" / "train_000" / "frame_01.jpg"
    frame.unlink()
    frame.symlink_to(secret)
    with pytest.raises(ValueError, match=r"frame file .*frame_01.jpg.* of clip 'train_000' escapes "
                                         r"the dataset root.*symlink that resolves to .*secret.jpg"):
        ds[0]
    # a symlink inside the root to a file inside the root is fine
    frame.unlink()
    frame.symlink_to(root / "visual" / "train_001" / "frame_00.jpg")
    assert ds[0][0]["visual"].shape == (4, 3, 8, 8)
    # a clip folder that is a symlink to a folder outside the root
    (out / "frames").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "frames" / "f.jpg")
    clip_dir = root / "visual" / "train_001"
    for f in clip_dir.iterdir():
        f.unlink()
    clip_dir.rmdir()
    clip_dir.symlink_to(out / "frames", target_is_directory=True)
    with pytest.raises(ValueError, match=r"frame folder of clip 'train_001' escapes the dataset root.*symlink"):
        ds[1]
    # a spectrogram that is a symlink outside: refused when the dataset is built
    np.save(out / "spec.npy", np.zeros((20, 32), np.float32))
    spec = root / "audio" / "train_002.npy"
    spec.unlink()
    spec.symlink_to(out / "spec.npy")
    with pytest.raises(ValueError, match=r"spectrogram file 'train_002.npy' escapes the dataset root.*symlink"):
        md.datasets.AVFolderDataset(root, "train.csv", audio_length=32)
    # a sub-folder that is a symlink outside
    (root / "linked").symlink_to(out, target_is_directory=True)
    with pytest.raises(ValueError, match=r"audio_dir 'linked' escapes the dataset root.*symlink"):
        md.datasets.AVFolderDataset(root, "test.csv", audio_dir="linked")


def test_av_folder_header_row_is_decided_explicitly(tmp_path):
    _write_av_fixture(tmp_path)  # train.csv starts with the header "clip,label"
    auto = md.datasets.AVFolderDataset(tmp_path, "train.csv", audio_length=32)
    assert len(auto) == 6 and auto.rows[0] == ("train_000", "ANG")
    # classes literally named like header words: the first row is data (its clip exists)
    (tmp_path / "y.csv").write_text("train_000,y\ntrain_001,n\ntrain_002,y\n")
    ds = md.datasets.AVFolderDataset(tmp_path, "y.csv", audio_length=32)
    assert ds.rows == [("train_000", "y"), ("train_001", "n"), ("train_002", "y")]
    assert ds.class_names == ["n", "y"] and ds.labels.tolist() == [1, 0, 1]
    (tmp_path / "label.csv").write_text("train_000,label\ntrain_001,class\ntrain_002,class\n")
    ds = md.datasets.AVFolderDataset(tmp_path, "label.csv", audio_length=32)
    assert len(ds) == 3 and ds.rows[0] == ("train_000", "label")
    # explicit choices override the rule
    assert len(md.datasets.AVFolderDataset(tmp_path, "label.csv", audio_length=32, header=True)) == 2
    with pytest.raises(ValueError, match=r"missing spectrogram for clip 'clip'"):
        md.datasets.AVFolderDataset(tmp_path, "train.csv", audio_length=32, header=False)
    # a known class in the first row keeps it even when the clip is missing (then: a clear error)
    (tmp_path / "gone.csv").write_text("nope,ANG\ntrain_001,HAP\ntrain_002,ANG\n")
    with pytest.raises(ValueError, match="missing spectrogram for clip 'nope'"):
        md.datasets.AVFolderDataset(tmp_path, "gone.csv", audio_length=32)


def test_av_folder_ragged_clips(tmp_path):
    from PIL import Image

    _write_av_fixture(tmp_path)  # spectrogram lengths 30..35: ragged in time
    with pytest.raises(ValueError, match=r"clips differ in length: .*'train_000' has shape \(20, 30\), "
                                         r".*'train_001' has \(20, 31\)\. Pass audio_length=T"):
        md.datasets.AVFolderDataset(tmp_path, "train.csv")
    # ragged frame counts and frame sizes are resampled / resized
    clip = tmp_path / "visual" / "train_002"
    for f in list(clip.iterdir())[1:]:
        f.unlink()
    Image.fromarray(np.zeros((50, 13, 3), np.uint8)).save(clip / "frame_09.png")
    Image.fromarray(np.zeros((7, 7), np.uint8)).save(clip / "frame_10.png")  # grayscale
    data = md.datasets.av_folder(tmp_path, num_frames=3, image_size=8, audio_length=32)
    batch, _ = next(iter(data.train.loader(batch_size=8)))
    assert batch["visual"].shape == (len(data.train), 3, 3, 8, 8)
    assert batch["audio"].shape == (len(data.train), 1, 20, 32)
    np.save(tmp_path / "audio" / "train_003.npy", np.zeros((21, 30), np.float32))
    with pytest.raises(ValueError, match=r"frequency bins: clip 'train_000' has shape \(20, 30\), "
                                         r"clip 'train_003' has \(21, 30\)"):
        md.datasets.AVFolderDataset(tmp_path, "train.csv", audio_length=32)


def test_av_folder_single_training_clip_and_bad_sizes(tmp_path):
    _write_av_fixture(tmp_path)
    (tmp_path / "one.csv").write_text("train_000,ANG\n")
    with pytest.raises(ValueError, match="one.csv lists 1 clip; av_folder needs at least 2 training"):
        md.datasets.av_folder(tmp_path, train_csv="one.csv", audio_length=32)
    (tmp_path / "three.csv").write_text("train_000,ANG\ntrain_001,HAP\ntrain_002,SAD\n")
    three = md.datasets.av_folder(tmp_path, train_csv="three.csv", audio_length=32, val_fraction=0.9)
    assert (len(three.train), len(three.val), len(three.test)) == (1, 2, 3)
    for kwargs, match in [({"num_frames": 0}, r"num_frames must be an integer in \[1"),
                          ({"num_frames": -2}, "num_frames must be an integer"),
                          ({"num_frames": 2.5}, "num_frames must be an integer"),
                          ({"image_size": 0}, r"image_size must be an integer in \[1"),
                          ({"image_size": "112"}, "image_size must be an integer"),
                          ({"audio_length": 0}, "audio_length must be None or an integer"),
                          ({"header": "yes"}, "header must be None or"),
                          ({"val_fraction": 1.0}, r"val_fraction must be a finite number in \(0, 1\)"),
                          ({"seed": -1}, r"seed must be an integer in \[0")]:
        with pytest.raises((ValueError, TypeError), match=match):
            md.datasets.av_folder(tmp_path, **{"audio_length": 32, **kwargs})


@pytest.mark.parametrize("write, match", [
    (lambda p: _npy_with_header(p, (100_000, 100_000), payload=b"\0" * 64),
     r"header claims shape \(100000, 100000\) of float32 \(40000000000 bytes of data\) but the file "
     r"holds 64 bytes"),
    (lambda p: _npy_with_header(p, (20, 30), payload=b"\0" * 100), "truncated or corrupt"),
    (lambda p: np.save(p, np.array([{"x": 1}] * 3, dtype=object), allow_pickle=True),
     "has dtype object; expected a numeric"),
    (lambda p: np.save(p, np.zeros((20, 30), dtype="U3")), "has dtype <U3"),
    (lambda p: np.save(p, np.zeros((20, 30), dtype=[("a", "f4")])), "has dtype"),
    (lambda p: np.save(p, np.zeros((2, 20, 30), np.float32)), r"has shape \(2, 20, 30\); expected a 2-D"),
    (lambda p: p.write_bytes(b"not a numpy file at all"), "is not a readable .npy array"),
])
def test_av_folder_absurd_npy_headers(tmp_path, write, match):
    _write_av_fixture(tmp_path)
    write(tmp_path / "audio" / "train_004.npy")
    with pytest.raises(ValueError, match=r"spectrogram '.*train_004.npy' of clip 'train_004'.*" + match):
        md.datasets.AVFolderDataset(tmp_path, "train.csv", audio_length=32)


def test_av_folder_npy_replaced_after_construction_is_checked_before_loading(tmp_path):
    _write_av_fixture(tmp_path)
    ds = md.datasets.AVFolderDataset(tmp_path, "train.csv", audio_length=32)
    _npy_with_header(tmp_path / "audio" / "train_001.npy", (1 << 40, 1 << 20), payload=b"\0" * 8)
    with pytest.raises(ValueError, match="header claims shape"):
        ds[1]


# ---------------------------------------------------------------- adapt_loader
def _tuple_loader(n=20, batch_size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    audio = torch.randn(n, 3, generator=g) + y[:, None]
    video = torch.randn(n, 4, generator=g)
    ds = torch.utils.data.TensorDataset(audio, video, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def test_adapt_loader_is_reiterable_and_trains_several_epochs():
    loader = _tuple_loader()
    calls = []

    def fn(b):
        calls.append(len(b[2]))
        return {"audio": b[0], "visual": b[1]}, b[2]

    adapted = md.datasets.adapt_loader(loader, fn)
    assert len(adapted) == 3 and adapted.batch_size == 8 and adapted.dataset is loader.dataset
    first = [y.tolist() for _, y in adapted]
    second = [y.tolist() for _, y in adapted]
    assert first == second and sum(map(len, first)) == 20
    inputs, labels = next(iter(adapted))
    assert set(inputs) == {"audio", "visual"} and inputs["audio"].shape == (8, 3)
    calls.clear()
    model = md.MultimodalClassifier({"audio": md.models.MLPEncoder(3, 4, hidden=(8,)),
                                     "visual": md.models.MLPEncoder(4, 4, hidden=(8,))},
                                    {"audio": 4, "visual": 4}, 2)
    history = md.fit(model, adapted, epochs=3, monitor=False, seed=0)
    assert [r["epoch"] for r in history.epochs] == [0, 1, 2]
    assert calls == [8, 8, 4] * 3  # every epoch drew the whole loader through fn


def test_adapt_loader_refuses_one_shot_iterators_and_bad_outputs():
    loader = _tuple_loader()
    fn = lambda b: ({"audio": b[0], "visual": b[1]}, b[2])  # noqa: E731
    with pytest.raises(ValueError, match="one-shot generator .* exhausted after the first epoch"):
        md.datasets.adapt_loader((b for b in loader), fn)
    with pytest.raises(TypeError, match="adapt_loader: fn must be a callable"):
        md.datasets.adapt_loader(loader, "fn")
    with pytest.raises(TypeError, match="adapt_loader: loader must be an iterable loader"):
        md.datasets.adapt_loader(3, fn)
    bad = md.datasets.adapt_loader(loader, lambda b: b)
    with pytest.raises(ValueError, match=r"adapt_loader: fn returned a list of 3: Tensor\(8, 3\), "
                                         r"Tensor\(8, 4\), Tensor\(8,\) for batch 0; it must return a pair"):
        next(iter(bad))
    broken = md.datasets.adapt_loader(loader, lambda b: ({"audio": b[5]}, b[2]))
    with pytest.raises(ValueError, match=r"fn failed on batch 0 \(list of 3: Tensor\(8, 3\)"):
        next(iter(broken))
    unsized = md.datasets.adapt_loader(_Unsized(loader), fn)
    assert not hasattr(unsized, "__len__") and len(list(unsized)) == 3
    with pytest.raises(AttributeError, match="has no dataset"):
        _ = unsized.dataset


class _Unsized:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def test_faq_recipe_uses_adapt_loader():
    from pathlib import Path

    faq = (Path(__file__).resolve().parents[1] / "docs" / "faq.md").read_text()
    assert "md.datasets.adapt_loader(" in faq
    assert "for a, v, y in loader))" not in faq


def test_loader_arguments_are_validated(synth, tmp_path):
    with pytest.raises(ValueError, match=r"batch_loader: batch_size must be an integer in \[1"):
        synth.train.loader(0)
    with pytest.raises(TypeError, match="batch_loader: shuffle must be True or False"):
        synth.train.loader(8, shuffle="yes")
    with pytest.raises(ValueError, match=r"loaders: batch_size must be an integer in \[1"):
        synth.loaders(-4)
    with pytest.raises(ValueError, match=r"load: seed must be an integer in \[0"):
        md.datasets.load("nutrimouse", seed=-1)
    assert len(synth.train.loader(np.int64(100))) == 5  # 420 samples, numpy sizes accepted
    _write_av_fixture(tmp_path)
    ds = md.datasets.AVFolderDataset(tmp_path, "test.csv", audio_length=32, image_size=8)
    with pytest.raises(ValueError, match=r"AVFolderDataset.loader: num_workers must be an integer in \[0"):
        ds.loader(2, num_workers=-1)
