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
    with pytest.raises(ValueError, match="at least 2"):
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
    ds = md.datasets.AVFolderDataset(tmp_path, "evil.csv")
    with pytest.raises(ValueError, match="escapes the dataset root"):
        ds[0]
    with pytest.raises(ValueError, match="escapes the dataset root"):
        md.datasets.AVFolderDataset(tmp_path, "../outside.csv")
    (tmp_path / "bad.csv").write_text("only_one_column\n")
    with pytest.raises(ValueError, match="expected '<clip id>,<label>'"):
        md.datasets.AVFolderDataset(tmp_path, "bad.csv")
    (tmp_path / "empty.csv").write_text("clip,label\n")
    with pytest.raises(ValueError, match="lists no clips"):
        md.datasets.AVFolderDataset(tmp_path, "empty.csv")
