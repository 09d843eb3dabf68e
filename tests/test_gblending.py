"""G-Blending (R13): weight formula, loss, trial training on copies, resume, md.fit, refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.regulators import gblending_weights
from modaldiag.training.callbacks import StepContext

R13 = dict(lt_start=[0.9, 1.1, 0.9], lv_start=[1.0, 1.2, 1.0],
           lt_end=[0.5, 0.9, 0.3], lv_end=[0.8, 1.1, 0.7])  # branches a, v, fused


@pytest.fixture(scope="module")
def tri():
    return md.datasets.synthetic(n_samples=150, num_classes=3,
                                 strength={"a": 2.0, "b": 1.0, "c": 0.3}, dims=6, seed=1)


@pytest.fixture(scope="module")
def duo():
    return md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 6, "b": 5}, seed=2)


def _model(data, fusion="concat", seed=0, feat=6):
    torch.manual_seed(seed)
    return md.models.default_model(data, fusion=fusion, feature_dim=feat)


# ---------------------------------------------------------------- the weight formula
def test_r13_numeric_weights():
    w, d_g, d_o = gblending_weights(**R13)
    torch.testing.assert_close(torch.tensor(w, dtype=torch.float64),
                               torch.tensor([5, 10, 10 / 3], dtype=torch.float64) / (15 + 10 / 3))
    torch.testing.assert_close(torch.tensor(w), torch.tensor([0.2727, 0.5455, 0.1818]),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(d_g), torch.tensor([0.2, 0.1, 0.3]), rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(d_o), torch.tensor([0.2, 0.1, 0.3]), rtol=0, atol=1e-9)


def test_weight_sign_uniform_fallback_and_released_abs():
    # branch a overfits and generalises worse (dG < 0): the paper gives it weight 0
    w, d_g, _ = gblending_weights([0.9, 0.9], [1.0, 1.0], [0.5, 0.3], [1.2, 0.7])
    assert d_g[0] < 0 and w[0] == 0.0 and w[1] == 1.0
    # the released |dG / dO^2| keeps it: dG = -0.2, dO = 0.6 -> 0.2/0.36; fused 0.3/0.09
    wr, _, _ = gblending_weights([0.9, 0.9], [1.0, 1.0], [0.5, 0.3], [1.2, 0.7], variant="released")
    ref = torch.tensor([0.2 / 0.36, 0.3 / 0.09], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(wr, dtype=torch.float64), ref / ref.sum())
    # nothing generalises: uniform
    assert gblending_weights([1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])[0] == [1 / 3] * 3
    # a non-finite loss (diverged trial) counts as 0
    assert gblending_weights([1, 1], [1, 1], [0.5, 0.5], [float("nan"), 0.8])[0] == [0.0, 1.0]


def test_more_branches_reduce_continuously_to_fewer():
    """M > 2: one more branch whose dG -> 0+ leaves the others' weights -> the M = 2 weights."""
    two = gblending_weights(*(s[1:] for s in R13.values()))[0]
    for eps in (1e-3, 1e-6, 1e-9):
        three = gblending_weights(*([a] + s[1:] for a, s in zip([0.9, 1.0, 0.5, 1.0 - eps],
                                                                   R13.values(), strict=True)))[0]
        assert abs(three[0]) < 100 * eps
        torch.testing.assert_close(torch.tensor(three[1:]), torch.tensor(two), rtol=0,
                                   atol=100 * eps)


# ---------------------------------------------------------------- the training loss
@pytest.mark.parametrize("heads", ["separate", "shared"])
def test_loss_is_the_weighted_sum_of_branch_cross_entropies(tri, heads):
    model = _model(tri, fusion="gated")
    reg = md.GBlending(super_epoch=1, heads=heads)
    reg.weights = [0.1, 0.2, 0.3, 0.4]
    if heads == "separate":
        reg._create_heads(model, model.feature_dims)
    inputs, y = next(iter(tri.train.loader(16)))
    ctx = StepContext(model=model, inputs=inputs, labels=y)
    ctx.features = model.encode(inputs)
    ctx.logits = model.head(ctx.features)
    ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, y)
    if reg.needs_unimodal_logits:
        ctx.compute_unimodal_logits()
    reg.on_after_forward(ctx)
    total = sum(ctx.losses.values())
    branch = [model.head(ctx.features, present=(m,)) if heads == "shared"
              else reg.heads[m](ctx.features[m]) for m in model.modalities]
    expected = sum(w * F.cross_entropy(z, y) for w, z in zip(reg.weights, branch + [ctx.logits],
                                                             strict=True))
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    params = list(model.parameters()) + reg.owned_parameters()
    g1 = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(expected, params, allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    logs = reg.collect_logs()
    assert logs["w"] == {"a": 0.1, "b": 0.2, "c": 0.3}


# ---------------------------------------------------------------- trial training
def _bn_model(data):
    """Encoders with BatchNorm (buffers) and Dropout (RNG): what the trial must not disturb."""
    torch.manual_seed(0)
    enc = {m: nn.Sequential(nn.Linear(x.shape[1], 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3))
           for m, x in data.train.inputs.items()}
    return md.MultimodalClassifier(enc, {m: 6 for m in enc}, data.num_classes, fusion="gated")


def test_trial_training_leaves_model_optimizer_rngs_and_loader_untouched(tri):
    model = _bn_model(tri)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(7)
    train, val = tri.train.loader(32, shuffle=True, generator=gen), tri.val.loader(64)
    reg = md.GBlending(super_epoch=2)
    run = md.Regulation(model, opt, reg)
    run.start(train, val)
    for inputs, labels in run.epoch_start(0, train):  # one live epoch (momentum state exists)
        opt.zero_grad()
        run.backward(inputs, labels)
        opt.step()
    run.epoch_end()
    model.encoders["a"][0].weight.grad.fill_(0.5)  # a live gradient the trial must keep
    snap = copy.deepcopy(model.state_dict())
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone())
             for n, p in model.named_parameters()}
    opt_state = copy.deepcopy(opt.state_dict())
    heads = {m: (lin.weight.clone(), lin.bias.clone()) for m, lin in reg.heads.items()}
    model.encoders["b"].eval()  # a frozen-looking submodule: modes come back as they were
    modes = [mod.training for mod in model.modules()]
    rng, gstate = torch.get_rng_state(), gen.get_state()
    estimates = len(reg.estimates)
    seen = {"a": [], "b": []}  # the modes the trial copies run in (hooks travel with deepcopy)
    hooks = [model.encoders[m].register_forward_hook(
        lambda mod, i, o, m=m: seen[m].append(mod.training)) for m in seen]
    run.epoch_start(2, train)  # epoch 2 % 2 == 0: a new estimate (2 * 4 trial epochs)
    for h in hooks:
        h.remove()
    assert any(seen["a"]) and seen["b"] and not any(seen["b"])  # frozen stays eval in the trial
    assert len(reg.estimates) == estimates + 1
    for n, v in model.state_dict().items():
        assert torch.equal(v, snap[n]), n
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0], n
        if p.grad is not None:
            assert torch.equal(p.grad, grads[n][1]), n
    new_state = opt.state_dict()
    assert new_state["param_groups"] == opt_state["param_groups"]
    for i, s in opt_state["state"].items():
        assert torch.equal(new_state["state"][i]["momentum_buffer"], s["momentum_buffer"])
    for m, (w, b) in heads.items():
        assert torch.equal(reg.heads[m].weight, w) and torch.equal(reg.heads[m].bias, b)
    assert [mod.training for mod in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(gen.get_state(), gstate)


def _manual_paper_losses(model, heads, opt, train, val, k, epochs):
    """Independent transcription of one paper-form trial: returns (LT_end, LV_end)."""
    mods = model.modalities
    cp, hp = copy.deepcopy(model), copy.deepcopy(heads)
    head_params = [p for m in mods for p in hp[m].parameters()]
    o = torch.optim.SGD([{"params": list(cp.parameters())}, {"params": head_params}], lr=0.1,
                        momentum=0.9)
    live = opt.state_dict()["state"]  # indexed over the live groups: model, then the heads
    for i, p in enumerate(list(cp.parameters()) + head_params):
        if i in live:
            o.state[p]["momentum_buffer"] = live[i]["momentum_buffer"].clone()

    def logits(x):
        if k == len(mods):
            return cp(x)
        return hp[mods[k]](cp.encoders[mods[k]](x[mods[k]]))

    for _ in range(epochs):
        cp.train()
        for x, y in train:
            o.zero_grad()
            F.cross_entropy(logits(x), y).backward()
            o.step()
    cp.eval()
    with torch.no_grad():
        return [float(sum(F.cross_entropy(logits(x), y, reduction="sum") for x, y in ld)
                      / sum(len(y) for _, y in ld)) for ld in (train, val)]


def test_paper_trial_matches_an_independent_transcription(duo):
    model = _model(duo)
    train, val = duo.train.loader(40), duo.val.loader(64)
    reg = md.GBlending(super_epoch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # + the heads' group
    run = md.Regulation(model, opt, reg)
    run.start(train, val)
    for x, y in run.epoch_start(0, train):  # epoch 0: estimate, then one live epoch
        opt.zero_grad()
        run.backward(x, y)
        opt.step()
    run.epoch_end()
    heads = copy.deepcopy(reg.heads)
    run.epoch_start(2, train)  # the estimate of interest, from a state with momentum
    est = reg.estimates[-1]
    for k in range(3):
        lt, lv = _manual_paper_losses(model, heads, opt, train, val, k, epochs=2)
        assert est["LT_end"][k] == pytest.approx(lt, rel=1e-4, abs=1e-5), k
        assert est["LV_end"][k] == pytest.approx(lv, rel=1e-4, abs=1e-5), k
    # start losses: the live model (and heads) in eval mode
    model.eval()
    with torch.no_grad():
        lv0 = float(sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in val)) / len(
            duo.val)
        lt0_a = float(sum(F.cross_entropy(heads["a"](model.encoders["a"](x["a"])), y,
                                          reduction="sum") for x, y in train)) / len(duo.train)
    assert est["LV_start"][2] == pytest.approx(lv0, rel=1e-5)
    assert est["LT_start"][0] == pytest.approx(lt0_a, rel=1e-5)
    w, _, _ = gblending_weights(est["LT_start"], est["LV_start"], est["LT_end"], est["LV_end"])
    assert reg.weights == w and abs(sum(w) - 1) < 1e-12


def test_released_trial_matches_an_independent_transcription(duo):
    """BB's estimate: sums of batch losses, train loss accumulated while training, start after
    the first trial epoch, other raw inputs zeroed, fresh optimizer at the initial lr, |dG|."""
    model = _model(duo)
    train, val = duo.train.loader(40), duo.val.loader(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)  # records initial_lr = 0.1
    opt.param_groups[0]["lr"] = 0.01  # as after one scheduled step; BB's trial restarts at 0.1
    reg = md.GBlending(super_epoch=2, variant="released")
    assert reg.heads_mode == "shared"
    run = md.Regulation(model, opt, reg)
    run.start(train, val)
    run.epoch_start(0, train)
    est = reg.estimates[-1]
    for k in range(3):
        cp = copy.deepcopy(model)
        o = torch.optim.SGD(cp.parameters(), lr=0.1, momentum=0.9)

        def fwd(x, k=k, cp=cp):
            if k < 2:
                x = {m: v if m == model.modalities[k] else torch.zeros_like(v) for m, v in x.items()}
            return cp(x)

        got = []
        for _ in range(2):
            cp.train()
            tr = 0.0
            for x, y in train:
                o.zero_grad()
                loss = F.cross_entropy(fwd(x), y)
                loss.backward()
                o.step()
                tr += float(loss.detach())
            cp.eval()
            with torch.no_grad():
                got += [tr, sum(float(F.cross_entropy(fwd(x), y)) for x, y in val)]
        ref = [est[key][k] for key in ("LT_start", "LV_start", "LT_end", "LV_end")]
        torch.testing.assert_close(torch.tensor(ref), torch.tensor(got), rtol=1e-4, atol=1e-5)
    w, _, _ = gblending_weights(est["LT_start"], est["LV_start"], est["LT_end"], est["LV_end"],
                                variant="released")
    assert reg.weights == w


# ---------------------------------------------------------------- md.fit, M = 3, gated head
def test_fit_three_modalities_gated_logs_weights_and_acts(tri):
    def train(reg, epochs=3):
        model = _model(tri, fusion="gated")
        hist = md.fit(model, tri.train.loader(32, shuffle=True), tri.val.loader(64), epochs=epochs,
                      regulator=reg, progress=False, seed=0)
        return model, hist

    reg = md.GBlending(super_epoch=1)
    model, hist = train(reg)
    joint, _ = train(None)
    assert len(reg.estimates) == 3 and [e["epoch"] for e in reg.estimates] == [0, 1, 2]
    for rec, est in zip(hist, reg.estimates, strict=True):
        r = rec["regulator"]
        w = [r["w"][m] for m in ("a", "b", "c")] + [r["w_fused"]]
        assert w == pytest.approx(est["w"], abs=1e-12) and sum(w) == pytest.approx(1.0)
        for key in ("delta_G", "delta_O", "LT_start", "LV_start", "LT_end", "LV_end"):
            assert set(r[key]) == {"a", "b", "c"} and f"{key}_fused" in r
        assert all(set(v) == {"a", "b", "c"} for v in r.values() if isinstance(v, dict))
    diff = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), joint.parameters(),
                                                          strict=True))
    assert diff > 1e-4
    # default arguments (N = 10, separate heads) run too: 4 branches x 10 trial epochs at epoch 0
    _, hist = train(md.GBlending(), epochs=1)
    assert sum(hist[0]["regulator"]["w"].values()) + hist[0]["regulator"]["w_fused"] == \
        pytest.approx(1.0)


def test_separate_heads_join_the_optimizer_and_train(duo):
    model = _model(duo)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = md.GBlending(super_epoch=1)
    md.fit(model, duo.train.loader(32), duo.val.loader(64), epochs=1, optimizer=opt,
           regulator=reg, progress=False, seed=0, restore_best=False)
    ids = {id(p) for p in opt.param_groups[-1]["params"]}
    assert len(opt.param_groups) == 2 and ids == {id(p) for p in reg.owned_parameters()}
    torch.manual_seed(0)
    fresh = md.GBlending(super_epoch=1)
    fresh._create_heads(model, model.feature_dims)
    assert not torch.equal(fresh.heads["a"].weight, reg.heads["a"].weight)  # they trained


# ---------------------------------------------------------------- resume, reuse
@pytest.mark.parametrize("split, heads", [(2, "separate"), (3, "separate"), (3, "shared")])
def test_resumed_run_ends_with_identical_weights(duo, tmp_path, split, heads):
    def run(epochs, ckpt, resume):
        model = _model(duo)
        md.fit(model, duo.train.loader(32, shuffle=True), duo.val.loader(64), epochs=epochs,
               regulator=md.GBlending(super_epoch=2, heads=heads), checkpoint_dir=ckpt,
               resume=resume, restore_best=False, progress=False, seed=3)
        return model

    full = run(4, tmp_path / "full", False)
    run(split, tmp_path / "split", False)
    resumed = run(4, tmp_path / "split", True)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_reused_regulator_trains_like_a_new_one(duo):
    def fit(reg):
        model = _model(duo)
        md.fit(model, duo.train.loader(32), duo.val.loader(64), epochs=2, regulator=reg,
               progress=False, seed=0, restore_best=False)
        return model

    reused = md.GBlending(super_epoch=1)
    fit(reused)
    second, fresh = fit(reused), fit(md.GBlending(super_epoch=1))
    for (n, a), (_, b) in zip(second.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert len(reused.estimates) == 2


def test_plain_loop_equals_fit(duo):
    ref = _model(duo)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    md.fit(ref, duo.train.loader(32), duo.val.loader(64), epochs=2, optimizer=opt,
           regulator=md.GBlending(super_epoch=1), seed=None, progress=False, restore_best=False)
    net = _model(duo)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    run = md.Regulation(net, opt, md.GBlending(super_epoch=1))
    run.start(duo.train.loader(32), duo.val.loader(64))
    for epoch in range(2):
        for x, y in run.epoch_start(epoch, duo.train.loader(32)):
            opt.zero_grad()
            run.backward(x, y)
            opt.step()
        run.epoch_end()
    for a, b in zip(ref.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- refusals
def test_missing_val_loader_is_refused_with_advice(duo):
    model = _model(duo)
    with pytest.raises(ValueError, match=r"GBlending needs a validation loader.*run\.start"):
        md.fit(model, duo.train.loader(32), epochs=1, regulator=md.GBlending(), progress=False)
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), md.GBlending())
    with pytest.raises(ValueError, match="val_loader"):
        run.epoch_start(0, duo.train.loader(32))


def test_lightning_runs_with_its_own_val_loader_and_is_refused_without(duo):
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    def trainer(cb):
        return pl.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", devices=1,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)

    with pytest.raises(ValueError, match=r"GBlending needs a validation loader.*val_loader=\.\.\."):
        trainer(ModalDiagCallback(md.GBlending(), monitor=False)).fit(
            ModalDiagModule(_model(duo)), duo.train.loader(32))
    reg = md.GBlending(super_epoch=1, val_loader=duo.val.loader(64))
    cb = ModalDiagCallback(reg, monitor=False)
    t = trainer(cb)
    t.fit(ModalDiagModule(_model(duo)), duo.train.loader(32))
    assert len(cb.logs) == 2 and len(reg.estimates) == 2
    w = [cb.logs[-1]["regulator"]["w"][m] for m in duo.modalities] + [cb.logs[-1]["regulator"]["w_fused"]]
    assert sum(w) == pytest.approx(1.0, rel=1e-6)
    held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in held for p in reg.owned_parameters())  # the heads joined the optimizer


def test_mmpareto_combination_is_refused():
    with pytest.raises(ValueError, match="GBlending cannot be combined"):
        md.training.loop.as_callbacks([md.GBlending(), md.MMPareto()])


@pytest.mark.parametrize("kwargs, arg", [
    ({"super_epoch": 0}, "super_epoch"), ({"super_epoch": 1.5}, "super_epoch"),
    ({"super_epoch": 1, "variant": "released"}, "super_epoch"), ({"variant": "bb"}, "variant"),
    ({"heads": "own"}, "heads"), ({"seed": -1}, "seed")])
def test_bad_arguments_are_rejected(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=rf"GBlending: .*\b{arg}\b"):
        md.GBlending(**kwargs)


def test_constraints_cover_every_constructor_argument():
    import inspect

    assert set(inspect.signature(md.GBlending).parameters) == set(
        md.GBlending._parameter_constraints)
    assert md.GBlending().config() == {"super_epoch": 10, "variant": "paper",
                                       "heads": "separate", "seed": 0, "val_loader": "the run's"}


def test_wrapped_model_without_feature_dims_sizes_the_heads_from_a_batch(duo):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ea, self.eb = nn.Linear(6, 4), nn.Linear(5, 3)
            self.fc = nn.Linear(7, 3)

    net = Net()
    model = md.wrap(net, encoders={"a": net.ea, "b": net.eb},
                    head=lambda f: net.fc(torch.cat([f["a"], f["b"]], 1)), num_classes=3)
    gen = torch.Generator().manual_seed(1)
    train = duo.train.loader(32, shuffle=True, generator=gen)
    reg = md.GBlending(super_epoch=1)
    hist = md.fit(model, train, duo.val.loader(64), epochs=2, regulator=reg, progress=False,
                  seed=0, restore_best=False)
    assert {m: lin.weight.shape for m, lin in reg.heads.items()} == {
        "a": torch.Size([3, 4]), "b": torch.Size([3, 3])}
    assert len(reg.estimates) == 2 and "w_fused" in hist[-1]["regulator"]


def test_weights_refuse_branch_lists_of_different_lengths():
    from modaldiag.regulators.gblending import gblending_weights

    ok = [1.0, 1.2, 1.0], [0.9, 1.1, 0.9], [0.8, 1.1, 0.7], [0.5, 0.9, 0.3]
    assert len(gblending_weights(*ok)[0]) == 3
    with pytest.raises(ValueError):
        gblending_weights([1.0, 1.2, 1.0], [0.9, 1.1], [0.8, 1.1, 0.7], [0.5, 0.9, 0.3])
    with pytest.raises(ValueError):
        gblending_weights([], [], [], [])


def test_trial_optimizer_copies_each_group_hyperparameters_not_the_defaults(duo):
    """A scheduler (or the user) changes a group's lr away from the optimizer's defaults: the
    trial copy keeps the live group's value."""
    model = _model(duo)
    opt = torch.optim.SGD([{"params": list(model.encoders.parameters()), "lr": 0.05},
                           {"params": list(model.fusion.parameters())}], lr=0.1, momentum=0.9)
    opt.param_groups[1]["lr"] = 0.02  # e.g. after a scheduler step
    memo: dict = {}
    import copy as _copy
    _copy.deepcopy(model, memo)
    trial = md.GBlending()._trial_optimizer(opt, memo)
    assert [g["lr"] for g in trial.param_groups] == [0.05, 0.02]
    assert all(g["momentum"] == 0.9 for g in trial.param_groups)
    # released: a fresh optimizer at each group's *initial* lr (set by a scheduler), not defaults
    opt.param_groups[0]["initial_lr"], opt.param_groups[1]["initial_lr"] = 0.04, 0.03
    trial = md.GBlending(variant="released", super_epoch=2)._trial_optimizer(opt, memo)
    assert [g["lr"] for g in trial.param_groups] == [0.04, 0.03]
    assert not trial.state
