import itertools

import pytest
import torch
from conftest import FUSIONS, make_inputs, make_model
from torch import nn

import modaldiag as md


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("m", [2, 3])
def test_absent_modality_cannot_change_output(fusion, m):
    model = make_model(m, fusion).eval()
    x = make_inputs(model)
    feats = model.encode(x)
    for r in range(m + 1):
        for present in itertools.combinations(model.modalities, r):
            base = model.head(feats, present=present)
            for absent in set(model.modalities) - set(present):
                perturbed = dict(feats)
                perturbed[absent] = feats[absent] * 7.0 + 3.0
                torch.testing.assert_close(model.head(perturbed, present=present), base)
            if len(present) < m and len(present) > 0:
                # the present ones do matter (the test could fail)
                changed = dict(feats)
                changed[present[0]] = feats[present[0]] + 5.0
                assert not torch.allclose(model.head(changed, present=present), base)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_absent_means_baseline_substitution(fusion):
    model = make_model(3, fusion).eval()
    feats = model.encode(make_inputs(model))
    zeroed = {k: v if k == "m1" else torch.zeros_like(v) for k, v in feats.items()}
    torch.testing.assert_close(model.head(feats, present=("m1",)), model.fuse(zeroed))
    means = {m: torch.full((model.feature_dims[m],), 0.5) for m in model.modalities}
    model.set_baseline(means)
    assert model.baseline_kind == "custom"
    subst = {k: v if k == "m1" else means[k].expand_as(v) for k, v in feats.items()}
    torch.testing.assert_close(model.head(feats, present=("m1",)), model.fuse(subst))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_head_coalitions_matches_one_call_per_coalition(fusion):
    model = make_model(3, fusion).eval()
    feats = model.encode(make_inputs(model, batch=5))
    masks = torch.tensor(list(itertools.product([False, True], repeat=3)))
    batched = model.head_coalitions(feats, masks, max_rows=10)  # forces chunking
    for k, mask in enumerate(masks):
        present = [n for n, keep in zip(model.modalities, mask, strict=True) if keep]
        torch.testing.assert_close(batched[k], model.head(feats, present=present))


def test_mean_baseline_from_loader_and_state_dict_roundtrip(synth):
    model = md.models.default_model(synth)
    model.set_baseline("mean", synth.train.loader(128))
    assert model.baseline_kind == "mean"
    with torch.no_grad():
        feats = model.encode(synth.train.inputs)
    torch.testing.assert_close(model.baselines.get("a"), feats["a"].mean(0), atol=1e-5, rtol=1e-5)
    fresh = md.models.default_model(synth)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.baselines.get("b"), model.baselines.get("b"))


def test_parameters_grouped_by_module_identity():
    model = make_model(3, "gated")
    enc_ids = {m: {id(p) for p in model.modality_parameters(m)} for m in model.modalities}
    assert all(enc_ids[m] == {id(p) for p in model.encoders[m].parameters()} for m in model.modalities)
    head_ids = {id(p) for p in model.head_parameters()}
    all_ids = {id(p) for p in model.parameters()}
    assert head_ids | set().union(*enc_ids.values()) == all_ids
    assert not head_ids & set().union(*enc_ids.values())


class AVClassifier(nn.Module):
    """The common shape of published audio-visual classifiers."""

    def __init__(self):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.visual_net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fusion_module = nn.Linear(8, 5)

    def forward(self, audio, visual):
        a = torch.flatten(nn.functional.adaptive_avg_pool2d(self.audio_net(audio), 1), 1)
        v = torch.flatten(nn.functional.adaptive_avg_pool2d(self.visual_net(visual), 1), 1)
        return self.fusion_module(torch.cat([a, v], 1))


def test_wrap_reproduces_model_outputs_exactly():
    torch.manual_seed(0)
    net = AVClassifier().eval()
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    wrapped = md.wrap(net, encoders={"audio": nn.Sequential(net.audio_net, pool),
                                     "visual": nn.Sequential(net.visual_net, pool)},
                      head=lambda f: net.fusion_module(torch.cat([f["audio"], f["visual"]], 1)))
    a, v = torch.randn(4, 1, 8, 8), torch.randn(4, 3, 8, 8)
    expected = net(a, v)
    assert torch.equal(wrapped({"audio": a, "visual": v}), expected)
    assert wrapped.modalities == ("audio", "visual")
    assert wrapped.num_classes == 5
    # same parameter objects, not copies
    assert {id(p) for p in wrapped.modality_parameters("audio")} == {id(p) for p in net.audio_net.parameters()}
    assert {id(p) for p in wrapped.head_parameters()} == {id(p) for p in net.fusion_module.parameters()}
    # absence works through the user's head too
    feats = wrapped.encode({"audio": a, "visual": v})
    uni = wrapped.head(feats, present=("audio",))
    manual = net.fusion_module(torch.cat([feats["audio"], torch.zeros_like(feats["visual"])], 1))
    torch.testing.assert_close(uni, manual)


def test_wrap_refuses_foreign_encoder():
    net = AVClassifier()
    with pytest.raises(ValueError, match="not the wrapped model's"):
        md.wrap(net, encoders={"audio": nn.Linear(2, 2), "visual": net.visual_net},
                head=lambda f: f["audio"])


def test_bad_inputs_raise_clear_errors():
    model = make_model(2)
    x = make_inputs(model)
    with pytest.raises(ValueError, match=r"missing \['m1'\].*unexpected \['video'\]"):
        model({"m0": x["m0"], "video": x["m1"]})
    with pytest.raises(ValueError, match="batch sizes differ"):
        model({"m0": x["m0"], "m1": x["m1"][:3]})
    with pytest.raises(ValueError, match="unknown modalities"):
        model(x, present=("audio",))
    with pytest.raises(ValueError, match=r"returned shape \(6, 5\); expected \(B, 4\)"):
        bad = md.MultimodalClassifier({"m0": nn.Linear(5, 5), "m1": nn.Linear(6, 5)},
                                      {"m0": 4, "m1": 5}, 3)
        bad(x)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        md.MultimodalClassifier({"a": nn.Linear(2, 2)}, {"a": 2}, 3)
    with pytest.raises(ValueError, match="fusion must be one of"):
        md.MultimodalClassifier({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, {"a": 2, "b": 2}, 3,
                                fusion="attention")
    with pytest.raises(ValueError, match="feature_dims keys"):
        md.MultimodalClassifier({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, {"a": 2}, 3)
    with pytest.raises(ValueError, match="may not contain '.'"):
        md.MultimodalClassifier({"a.b": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, {"a.b": 2, "b": 2}, 3)


def test_custom_fusion_module_gets_full_feature_dict():
    class Max(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, f):
            return self.fc(torch.maximum(f["m0"], f["m1"][:, :4]))

    model = make_model(2)
    custom = md.MultimodalClassifier(dict(model.encoders), model.feature_dims, 3, fusion=Max())
    out = custom(make_inputs(model))
    assert out.shape == (6, 3)


def test_head_that_ignores_present_is_refused():
    class Leaky(md.MultimodalClassifier):
        def head(self, features, present=None):  # bypasses the baseline substitution
            return self.fuse(features)

    torch.manual_seed(0)
    base = make_model(2, "concat")
    leaky = Leaky(dict(base.encoders), base.feature_dims, 3)
    x = make_inputs(base)
    with pytest.raises(ValueError, match="head ignores present="):
        md.shapley(leaky, [(x, torch.arange(6) % 3)])
    md.shapley(base, [(x, torch.arange(6) % 3)])  # the honest one passes


def test_encoder_failure_names_the_modality():
    model = make_model(2)
    x = make_inputs(model)
    with pytest.raises(ValueError, match=r"encoder for modality 'm1' failed on its input of shape \(6, 3\)"):
        model({"m0": x["m0"], "m1": x["m1"][:, :3]})
    with pytest.raises(ValueError, match="dtype torch.float64"):
        model({"m0": x["m0"].double(), "m1": x["m1"]})


class _Fixed(nn.Module):
    """A fusion head whose output is ``fn(concatenated features)`` (to produce bad shapes)."""

    def __init__(self, out: int, fn=None):
        super().__init__()
        self.fc = nn.Linear(9, out)
        self.fn = fn or (lambda z: z)

    def forward(self, f):
        return self.fn(self.fc(torch.cat([f["m0"], f["m1"]], 1)))


def _custom(out, fn=None):
    base = make_model(2)
    return md.MultimodalClassifier(dict(base.encoders), base.feature_dims, 3, fusion=_Fixed(out, fn))


@pytest.mark.parametrize("bad, match", [
    ((1, lambda z: z[:, 0]), r"returned logits of shape \(6,\); expected \(B, num_classes\) = \(6, 3\): "
                             r"return one logit per class"),
    ((2, None), r"returned logits of shape \(6, 2\); expected \(B, num_classes\) = \(6, 3\).*"
                r"num_classes=3"),
    ((3, lambda z: z[:2]), r"shape \(2, 3\) for a batch of 6 samples"),
    ((3, lambda z: z.unsqueeze(1)), r"shape \(6, 1, 3\); expected .*\(6, 3\)"),
])
def test_head_output_shape_is_checked_on_every_path(bad, match):
    model = _custom(*bad).eval()
    x = make_inputs(model)
    feats = model.encode(x)
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(ValueError, match=match):
        model.head(feats, present=("m0",))
    with pytest.raises(ValueError, match=match):
        model.unimodal_logits(feats)
    # the generic coalition path stacks K * B rows: the batch it names is K * B = 24
    masks = torch.tensor([[True, True], [True, False], [False, True], [False, False]])
    with pytest.raises(ValueError, match=match.replace("6", "24")):
        model.head_coalitions(feats, masks)
    with pytest.raises(ValueError, match=match):
        md.shapley(model, [(x, torch.arange(6) % 3)])


def test_fast_coalition_path_output_is_checked():
    class BadFast(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(9, 3)

        def forward(self, f):
            return self.fc(torch.cat([f["m0"], f["m1"]], 1))

        def coalitions(self, features, absent, masks):  # drops the coalition dimension
            return self.forward(features)

    base = make_model(2)
    model = md.MultimodalClassifier(dict(base.encoders), base.feature_dims, 3, fusion=BadFast())
    feats = model.encode(make_inputs(model))
    assert model.head(feats).shape == (6, 3)
    with pytest.raises(ValueError, match=r"fuse_coalitions returned \(6, 3\) for 2 coalitions of 6 "
                                         r"samples; expected \(K, B, num_classes\) = \(2, 6, 3\)"):
        model.unimodal_logits(feats)


def test_builtin_heads_pass_the_shape_check_on_the_fast_path():
    for fusion in FUSIONS:
        model = make_model(3, fusion).eval()
        feats = model.encode(make_inputs(model, batch=5))
        masks = torch.tensor(list(itertools.product([False, True], repeat=3)))
        assert model.head_coalitions(feats, masks).shape == (8, 5, 3)
        assert all(v.shape == (5, 3) for v in model.unimodal_logits(feats).values())


def test_wrap_checks_logit_shape_and_learns_num_classes_once():
    net = AVClassifier()
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoders = {"audio": nn.Sequential(net.audio_net, pool), "visual": nn.Sequential(net.visual_net, pool)}
    x = {"audio": torch.randn(4, 1, 8, 8), "visual": torch.randn(4, 3, 8, 8)}
    flat = md.wrap(net, encoders, head=lambda f: net.fusion_module(torch.cat([f["audio"], f["visual"]], 1))[:, 0])
    with pytest.raises(ValueError, match=r"shape \(4,\); expected \(B, num_classes\) = \(4, C\)"):
        flat(x)
    assert flat.num_classes is None  # nothing learnt from a refused output
    single = md.wrap(net, encoders,
                     head=lambda f: net.fusion_module(torch.cat([f["audio"], f["visual"]], 1))[:, :1])
    with pytest.raises(ValueError, match=r"shape \(4, 1\); expected .* with C >= 2"):
        single(x)
    wrong = md.wrap(net, encoders, num_classes=6,
                    head=lambda f: net.fusion_module(torch.cat([f["audio"], f["visual"]], 1)))
    with pytest.raises(ValueError, match=r"shape \(4, 5\).*num_classes=6"):
        wrong(x)
    cols = {"n": 5}
    good = md.wrap(net, encoders,
                   head=lambda f: net.fusion_module(torch.cat([f["audio"], f["visual"]], 1))[:, :cols["n"]])
    assert good(x).shape == (4, 5) and good.num_classes == 5
    cols["n"] = 4  # the head changes its output width later: refused, not silently mixed
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*num_classes=5"):
        good(x)


def test_wrap_validates_its_arguments():
    net = AVClassifier()
    enc = {"audio": net.audio_net, "visual": net.visual_net}
    with pytest.raises(TypeError, match="wrap: head must be a callable"):
        md.wrap(net, enc, head=3)
    with pytest.raises(TypeError, match="wrap: model must be an nn.Module"):
        md.wrap("net", enc, head=lambda f: f)
    with pytest.raises(TypeError, match="wrap: encoders must be a dict"):
        md.wrap(net, [net.audio_net, net.visual_net], head=lambda f: f)
    with pytest.raises(ValueError, match=r"wrap: num_classes must be None or an integer in \[2"):
        md.wrap(net, enc, head=lambda f: f, num_classes=1)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"num_classes": 1}, ValueError, r"num_classes must be an integer in \[2"),
    ({"num_classes": 2.5}, ValueError, r"num_classes must be an integer in \[2, inf[])]; got 2.5"),
    ({"num_classes": True}, ValueError, "num_classes must be an integer"),
    ({"fusion": 3}, ValueError, "fusion must be one of 'concat'"),
    ({"hidden_dim": 0}, ValueError, "hidden_dim must be None or an integer in \\[1"),
    ({"feature_dims": {"a": 0, "b": 2}}, ValueError, r"feature_dims\['a'\] must be an integer in \[1"),
    ({"feature_dims": {"a": 2.0, "b": 2}}, ValueError, r"feature_dims\['a'\] must be an integer"),
    ({"encoders": [nn.Linear(2, 2)]}, TypeError, "encoders must be a dict"),
])
def test_classifier_parameters_are_validated(kwargs, exc, match):
    args = {"encoders": {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, "feature_dims": {"a": 2, "b": 2},
            "num_classes": 3, **kwargs}
    with pytest.raises(exc, match=match):
        md.MultimodalClassifier(**args)


def test_numpy_integers_are_accepted_as_sizes():
    import numpy as np

    model = md.MultimodalClassifier({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)},
                                    {"a": np.int64(2), "b": 2}, np.int64(4))
    assert model.num_classes == 4 and type(model.num_classes) is int
    assert model({"a": torch.randn(3, 2), "b": torch.randn(3, 2)}).shape == (3, 4)


@pytest.mark.parametrize("build, match", [
    (lambda: md.models.MLPEncoder(0), r"MLPEncoder: in_dim must be an integer in \[1"),
    (lambda: md.models.MLPEncoder(3, -2), "MLPEncoder: feature_dim must be"),
    (lambda: md.models.MLPEncoder(3, hidden=(8, 0)), "hidden must be a sequence of positive integers"),
    (lambda: md.models.MLPEncoder(3, dropout=1.0), r"dropout must be a finite number in \[0, 1\)"),
    (lambda: md.models.Conv1dEncoder(3, kernel_size=0), "Conv1dEncoder: kernel_size"),
    (lambda: md.models.Conv2dEncoder(0), "Conv2dEncoder: in_channels"),
    (lambda: md.models.FrameEncoder(3, channels=()), None),
    (lambda: md.models.encoder_for_shape((3, 0)), "shape must be a non-empty sequence of positive"),
    (lambda: md.models.encoder_for_shape(()), "shape must be a non-empty sequence"),
    (lambda: md.models.default_model(object()), "default_model: data must be a dataset bundle"),
])
def test_encoder_sizes_are_validated(build, match):
    if match is None:  # no channels: a valid (if tiny) encoder, must still build and run
        enc = build()
        assert enc(torch.randn(2, 2, 3, 8, 8)).shape == (2, 64)
        return
    with pytest.raises(ValueError, match=match):
        build()


def test_mean_baseline_leaves_submodule_modes_as_found(synth):
    model = md.models.default_model(synth)
    model.train()
    model.encoders["a"].eval()  # e.g. a frozen pretrained encoder
    modes = [m.training for m in model.modules()]
    model.set_baseline("mean", synth.train.loader(128))
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(ValueError, match=r"yielded a tuple of 3 items.*adapt_loader"):
        model.mean_features([(synth.train.inputs["a"], synth.train.inputs["b"], synth.train.labels)])


def test_baseline_of_the_wrong_shape_is_named():
    model = make_model(2, "concat")
    model.set_baseline({"m0": torch.zeros(3), "m1": torch.zeros(5)})  # m0's features are (B, 4)
    feats = model.encode(make_inputs(model))
    with pytest.raises(ValueError, match=r"baseline of modality 'm0' has shape \(3,\) but its features "
                                         r"have shape \(6, 4\)"):
        model.head(feats, present=("m1",))
