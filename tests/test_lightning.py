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
                                  lambda: md.MMPareto(), lambda: md.OPM(),
                                  lambda: md.OGM(alpha=0.5, noise=True)])
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


def test_lightning_refuses_a_regulator_with_its_own_backward_before_touching_the_optimizer():
    """ReconBoost runs its own backward; refused at construction, before on_fit_start would add
    its scalar to the user's optimizer."""
    with pytest.raises(ValueError, match="ReconBoost runs its own backward pass"):
        ModalDiagCallback(md.ReconBoost())
    ModalDiagCallback(md.MMPareto())  # has a Lightning mode (defer_gradients)


def test_lightning_refuses_valuation_resampling():
    with pytest.raises(ValueError, match="md.fit or md.Regulation"):
        ModalDiagCallback(md.ValuationResampling())


def test_reused_callback_and_regulator_train_like_new_ones(synth):
    """A second trainer.fit with the same callback (and InfoReg) equals one with new objects."""
    def trained(cb):
        torch.manual_seed(0)
        lit = Lit(md.models.default_model(synth, feature_dim=8))
        _trainer(cb, epochs=3).fit(lit, synth.train.loader(64))
        return lit.model

    cb = ModalDiagCallback(md.InfoReg(), monitor=False)
    trained(cb)
    second = trained(cb)
    fresh = trained(ModalDiagCallback(md.InfoReg(), monitor=False))
    for (n, a), (_, b) in zip(second.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_tuple_batches_get_the_adapter_recipe(synth):
    lit = Lit(md.models.default_model(synth, feature_dim=8))
    cb = ModalDiagCallback(md.OGM(), monitor=False)
    x, y = next(iter(synth.train.loader(8)))
    # (audio, video, label) items, as published audio-visual loaders yield them
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x["a"], x["b"], y), batch_size=4)
    with pytest.raises(ValueError, match=r"3 items.*adapt_loader\(loader, lambda b: \(\{'a': b\[0\], 'b': b\[1\]\}, b\[2\]\)\)"):
        _trainer(cb, epochs=1).fit(lit, loader)


@pytest.mark.parametrize("kwargs, arg", [({"monitor": "yes"}, "monitor"), ({"model_attr": 3}, "model_attr"),
                                         ({"unimodal_loss_weight": -1.0}, "unimodal_loss_weight")])
def test_callback_arguments_are_validated(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=rf"ModalDiagCallback: {arg}\b"):
        ModalDiagCallback(md.OGM(), **kwargs)
