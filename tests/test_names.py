"""Hostile modality names work everywhere: models, state_dict, training, probes, figures, HTML."""

import html
import io
import warnings

import pytest
import torch
from torch import nn

import modaldiag as md
from modaldiag.models import MLPEncoder

HOSTILE = ["keys", "type", "items", "values", "training", "forward", "get", "__class__",
           "__head__", "$x^$", "a$b", "_aux", "~tilde", "über 音声", "with space", "x" * 200,
           "<script>alert(1)</script>", "encoders"]

# every name above, in two multi-modality models that each go through the whole pipeline
GROUPS = [["keys", "$x^$", "_aux", "__head__", "training", "type", "a$b", "über 音声", "x" * 200],
          ["forward", "~tilde", "items", "values", "<script>alert(1)</script>", "get",
           "__class__", "with space", "encoders"]]


def _model(names, fusion):
    torch.manual_seed(0)
    encoders = {n: MLPEncoder(3, 4, hidden=(5,)) for n in names}
    return md.MultimodalClassifier(encoders, {n: 4 for n in names}, 3, fusion=fusion)


@pytest.mark.parametrize("name", HOSTILE)
@pytest.mark.parametrize("fusion", ["sum", "late", "gated", "film"])
def test_hostile_name_works_in_the_model(name, fusion):
    names = [name, "other"]
    model = _model(names, fusion)
    assert model.modalities == (name, "other")
    assert list(model.encoders) == names and list(model.encoders.keys()) == names
    assert [k for k, _ in model.encoders.items()] == names
    assert name in model.encoders and "missing" not in model.encoders
    assert isinstance(model.encoders[name], MLPEncoder)
    assert {id(p) for p in model.modality_parameters(name)} == \
        {id(p) for p in model.encoders[name].parameters()}
    x = {n: torch.randn(4, 3) for n in names}
    feats = model.encode(x)
    assert model(x).shape == (4, 3)
    uni = model.unimodal_logits(feats)
    torch.testing.assert_close(uni[name], model.head(feats, present=(name,)))
    model.set_baseline({name: torch.full((4,), 0.5), "other": torch.zeros(4)})
    torch.testing.assert_close(model.baselines.get(name), torch.full((4,), 0.5))
    fresh = _model(names, fusion)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.baselines.get(name), torch.full((4,), 0.5))
    torch.testing.assert_close(fresh(x), model(x))


def test_escaped_keys_are_injective_and_leave_ordinary_names_alone():
    from modaldiag.models.names import modality_from_key, modality_key

    assert modality_key("audio") == "audio"
    assert modality_key("keys") == "~keys"
    assert modality_key("~keys") == "~~keys"
    for n in HOSTILE + ["audio", "~", "~~"]:
        assert modality_from_key(modality_key(n)) == n
    model = _model(["keys", "~keys"], "late")
    assert list(model.encoders) == ["keys", "~keys"]
    assert model.encoders["keys"] is not model.encoders["~keys"]
    ordinary = _model(["audio", "visual"], "concat")
    assert "encoders.audio.net.0.weight" in ordinary.state_dict()
    assert "encoders.~keys.net.0.weight" in model.state_dict()


def _legend(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg is not None else []


def _render(fig):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing CJK glyphs in the default font
        fig.savefig(buf, format="png", dpi=40)
    return buf.getvalue()


@pytest.mark.parametrize("names", GROUPS, ids=["group1", "group2"])
def test_hostile_names_through_fit_probes_figures_and_report(names, tmp_path):
    import matplotlib.pyplot as plt

    strength = {n: 2.0 - 0.25 * i for i, n in enumerate(names)}
    data = md.datasets.synthetic(n_samples=90, num_classes=3, strength=strength, dims=3, seed=0)
    assert data.modalities == tuple(names)
    model = md.models.default_model(data, fusion="gated", feature_dim=4)
    train, val, test = data.loaders(32)
    history = md.fit(model, train, val_loader=val, epochs=1, monitor=True, seed=0)
    assert len(history.epochs) == 1
    sv = md.shapley(model, test)
    assert sv.modalities == tuple(names) and list(sv.mean()) == names
    assert sv.values.shape == (len(data.test), len(names))
    torch.testing.assert_close(sv.values.sum(1), sv.full_value - sv.empty_value,
                               atol=1e-5, rtol=1e-5)
    uni = md.unimodal_scores(model, test)
    assert list(uni) == names and all(0.0 <= uni[n].accuracy <= 1.0 for n in names)
    sep = md.separability(model, train, val)
    rep = md.diagnose(model, test, val_loader=val)

    fig = md.plot.unimodal_accuracy(history)
    _render(fig)
    assert _legend(fig.axes[0]) == ["fused", *names]
    fig = md.plot.learning_window(history)
    _render(fig)
    assert [ax.get_ylabel() for ax in fig.axes] == [f"{n}\nFisher trace" for n in names]
    for fig in (md.plot.shapley(sv), md.plot.separability(sep), md.plot.unimodal_bars(rep)):
        _render(fig)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names
    fig = md.plot.compare({names[0]: history, names[1]: history})
    _render(fig)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names[:2]
    assert [ax.get_title() for ax in fig.axes[1:]] == [f"{n} unimodal (validation)" for n in names]
    plt.close("all")

    rep.save(tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    for n in names:
        assert html.escape(n, quote=True) in page
    assert "<script>alert(1)</script>" not in page


@pytest.mark.parametrize("name", ["", "a.b", "tab\there", "new\nline"])
def test_unusable_names_are_refused_at_construction(name):
    with pytest.raises((ValueError, TypeError), match="modality name|non-empty strings"):
        _model([name, "other"], "concat")


def test_non_string_name_is_a_type_error():
    with pytest.raises(TypeError, match="non-empty strings"):
        md.MultimodalClassifier({1: nn.Linear(2, 2), "b": nn.Linear(2, 2)}, {1: 2, "b": 2}, 3)


def test_dot_refusal_says_why_and_suggests_a_name():
    from modaldiag.utils.validation import check_modality_names

    with pytest.raises(ValueError, match=r"'\.' separates the parts of state_dict and History keys.*"
                                         r"Rename it, e\.g\. 'audio_left'"):
        check_modality_names(["audio.left", "video"])
    with pytest.raises(TypeError, match="not the single string 'ab'"):
        check_modality_names("ab")
