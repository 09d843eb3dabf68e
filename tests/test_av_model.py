"""The whole library on a published-style audio-visual model (ResNet blocks with in-place ReLU and
``out += identity``, frames folded into the batch, a fusion module returning ``(a, v, out)``),
wrapped with ``md.wrap`` as the README shows: every regulator trains it, every probe reads it,
and nothing changes the state the user left it in."""

from __future__ import annotations

import pytest
import torch
from models_av import make_av_batch, make_av_model

import modaldiag as md

REGULATORS = {
    "joint": lambda: None,
    "inforeg": lambda: md.InfoReg(),
    "inforeg-per-sample": lambda: md.InfoReg(trace="per_sample"),
    "relearning": lambda: md.Relearning(every=1),
    "ogm-ge": lambda: md.OGM(noise=True),
    "ogm-conv-only": lambda: md.OGM(conv_only=True),
    "opm": lambda: md.OPM(),
    "mmpareto": lambda: md.MMPareto(),
    "valuation": lambda: md.ValuationResampling("sample", warmup=0),
    "valuation-modality": lambda: md.ValuationResampling("modality", warmup=0),
}


def _data(n: int = 24, seed: int = 3):
    inputs, labels = make_av_batch(n, seed=seed)
    return md.datasets.MultimodalDataset(inputs, labels, num_classes=4)


@pytest.mark.parametrize("name", list(REGULATORS))
def test_every_regulator_trains_the_published_style_model(name):
    _, model = make_av_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = _data(24, seed=3), _data(12, seed=4)
    history = md.fit(model, train.loader(8, shuffle=True), val.loader(12), epochs=2,
                     regulator=REGULATORS[name](), progress=False)
    assert len(history.epochs) == 2
    after = model.state_dict()
    for m in ("audio", "visual"):
        moved = [k for k in after if k.startswith(f"encoders.{m}.") and after[k].is_floating_point()
                 and not torch.equal(after[k], before[k])]
        assert moved, f"{name}: encoder {m!r} did not train"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_diagnose_reads_the_published_style_model_without_changing_it():
    net, model = make_av_model()
    model.train()
    net.audio_net.bn1.eval()  # a frozen BatchNorm the user set
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    rep = md.diagnose(model, _data(24, seed=3).loader(8), _data(12, seed=4).loader(12))
    assert rep.baseline == "zero"
    assert set(rep.to_dict()) and rep.summary
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    tr = md.fisher_trace(model, _data(8).loader(4))
    assert tr.engine in ("vmap", "loop") and set(tr) == {"audio", "visual"}
    assert all(v > 0 for v in tr.values())
