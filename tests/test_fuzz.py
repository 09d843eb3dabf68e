"""Property-based and fuzz tests: random shapes never give silently wrong results; garbage input
gives clean errors."""

import string

import pytest
import torch
from conftest import FUSIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modaldiag as md
from modaldiag.cli import main

SETTINGS = settings(max_examples=int(__import__("os").environ.get("MD_FUZZ_EXAMPLES", 25)), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def model_and_batch(draw):
    m = draw(st.integers(2, 4))
    fusion = draw(st.sampled_from(FUSIONS))
    classes = draw(st.integers(2, 5))
    in_dims = [draw(st.integers(1, 6)) for _ in range(m)]
    feat_dims = [draw(st.integers(1, 6)) for _ in range(m)]
    n = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 1000))
    torch.manual_seed(seed)
    names = [f"mod{i}" for i in range(m)]
    encoders = {k: md.models.MLPEncoder(i, f, hidden=(4,)) for k, i, f in zip(names, in_dims, feat_dims, strict=True)}
    model = md.MultimodalClassifier(encoders, dict(zip(names, feat_dims, strict=True)), classes, fusion=fusion)
    inputs = {k: torch.randn(n, i) for k, i in zip(names, in_dims, strict=True)}
    labels = torch.arange(n) % classes
    return model, inputs, labels


@SETTINGS
@given(model_and_batch(), st.sampled_from(["paper", "prob", "logit"]))
def test_random_models_give_correct_shapes_everywhere(case, value):
    model, inputs, labels = case
    n, m = labels.shape[0], len(model.modalities)
    batches = [({k: v[:n // 2] for k, v in inputs.items()}, labels[:n // 2]),
               ({k: v[n // 2:] for k, v in inputs.items()}, labels[n // 2:])]
    batches = [b for b in batches if b[1].numel()]
    sv = md.shapley(model, batches, value=value)
    assert sv.values.shape == (n, m) and sv.full_value.shape == (n,) and sv.labels.tolist() == labels.tolist()
    torch.testing.assert_close(sv.values.sum(1), sv.full_value - sv.empty_value)
    tr = md.fisher_trace(model, batches)
    assert list(tr) == list(model.modalities) and all(v >= 0 for v in tr.values())
    hist = md.fit(model, batches, epochs=1, progress=False, seed=0)
    assert len(hist) == 1 and set(hist[0]["fisher"]) == set(model.modalities)


@SETTINGS
@given(st.text(alphabet=string.ascii_letters + string.digits + "-_./ <>&'\"", min_size=1, max_size=30))
def test_cli_garbage_dataset_and_method_names_exit_2(tmp_path, junk):
    if junk in md.datasets.available() or junk.lower().startswith("mfeat-") or junk.startswith("-"):
        return
    assert main(["train", "--dataset", junk, "--epochs", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "hapt", "--method", junk + "!", "--out", str(tmp_path / "y")])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_csv_gives_a_clean_error(tmp_path, payload):
    (tmp_path / "audio").mkdir(exist_ok=True)
    (tmp_path / "visual").mkdir(exist_ok=True)
    (tmp_path / "list.csv").write_bytes(payload)
    try:
        ds = md.datasets.AVFolderDataset(tmp_path, "list.csv")
    except ValueError as exc:
        assert "list.csv" in str(exc) or "class_names" in str(exc)  # names the file it refuses
        assert type(exc) is ValueError  # not a raw UnicodeDecodeError etc.
        return
    for i in range(min(len(ds), 3)):  # files are missing: a ValueError naming the clip, nothing else
        with pytest.raises(ValueError):
            ds[i]


def test_probes_refuse_nonfinite_inputs_naming_batch_and_modality():
    torch.manual_seed(0)
    model = md.MultimodalClassifier({"a": md.models.MLPEncoder(3, 4), "b": md.models.MLPEncoder(2, 4)},
                                    {"a": 4, "b": 4}, 3)
    x = {"a": torch.randn(5, 3), "b": torch.randn(5, 2)}
    bad = {"a": x["a"], "b": x["b"].clone()}
    bad["b"][2, 0] = float("inf")
    loader = [(x, torch.arange(5) % 3), (bad, torch.arange(5) % 3)]
    for probe in (md.shapley, md.fisher_trace, md.unimodal_scores):
        with pytest.raises(ValueError, match="modality 'b' in batch 1 contains NaN/inf"):
            probe(model, loader)
