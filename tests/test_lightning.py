import pytest
import torch

import modaldiag as md

pl = pytest.importorskip("lightning.pytorch")
from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule  # noqa: E402


def Lit(model):  # noqa: N802 - the test's module: SGD(lr=0.05, momentum=0.9), no weight decay
    return ModalDiagModule(model, lr=0.05, weight_decay=0.0)


def _trainer(cb, epochs=2, **kw):
    return pl.Trainer(max_epochs=epochs, callbacks=[cb], accelerator="cpu", devices=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


@pytest.mark.parametrize("make", [lambda: md.OGM(alpha=0.5), lambda: md.InfoReg(),
                                  lambda: md.MMPareto(), lambda: md.OPM()])
def test_lightning_matches_md_fit(synth, make):
    """Same regulator, same data order, same init: identical weights after two epochs."""
    def model():
        torch.manual_seed(0)
        return md.models.default_model(synth, feature_dim=8)

    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    md.fit(ref, synth.train.loader(64), epochs=2, optimizer=opt, regulator=make(), seed=None,
           progress=False)
    lit = Lit(model())
    cb = ModalDiagCallback(make())
    _trainer(cb).fit(lit, synth.train.loader(64))
    for (n, a), (_, b) in zip(ref.state_dict().items(), lit.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    assert "fisher" in cb.logs[-1]


def test_lightning_gradient_accumulation_modulates_once_per_step(synth):
    calls = {"n": 0}

    class Count(md.Callback):
        def on_before_optimizer_step(self, ctx):
            calls["n"] += 1

    lit = Lit(md.models.default_model(synth, feature_dim=8))
    cb = ModalDiagCallback([md.OGM(), Count()], monitor=False)
    _trainer(cb, epochs=1, accumulate_grad_batches=2).fit(lit, synth.train.loader(105))
    assert calls["n"] == 2  # 4 batches / 2
    state = cb.state_dict()
    assert "regulation" in state


def test_lightning_refuses_valuation_resampling():
    with pytest.raises(ValueError, match="md.fit or md.Regulation"):
        ModalDiagCallback(md.ValuationResampling())
