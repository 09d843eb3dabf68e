"""InfoReg: ``variant="released"`` against an independent transcription of the authors' code,
the code-rule window that reopens (issue 12), and the continuous M > 2 rule.

The oracles below are written in plain torch from the released training step of
GeWu-Lab/InfoReg_CVPR2025 (``main.py``, ``train_epoch``): the trace list pre-filled with ten zeros
and its 10-epoch moving averages (first modality only, threshold 0.05, re-evaluated every epoch),
the batch *sums* of true-class probabilities, the if/elif coefficient (0.95 / 0.1 times
``exp(tanh(gap))``), ``grad += beta * (theta - theta_epoch_start)``, the loss
multimodal + unimodal CE, and the Fisher trace summed over batches from Conv/Linear weights only
(after the proximal term is added), element mean per layer, summed over layers. They use none of
modaldiag's helpers; the unimodal logits use modaldiag's convention (absent feature = 0, full
bias), which is what the regulator receives.
"""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modaldiag as md
from modaldiag.probes import window_state
from modaldiag.regulators.inforeg import inforeg_coefficients, lead_gap

NAMES = ("m0", "m1")  # m0 plays the released code's "audio" (first), m1 its "visual"
DIMS = {"m0": 4, "m1": 3}


# ---------------------------------------------------------------- oracles (released code)
def released_k(trace_list):
    """The released window statistic at the start of the epoch; trace_list starts with 10 zeros."""
    epoch = len(trace_list) - 10
    if epoch == 0:
        return 1.0
    tr1 = sum(trace_list[-10:]) / 10
    tr2 = sum(trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def released_betas(score_a, score_v, k):
    """The released if/elif: (beta for the first modality, beta2 for the second)."""
    if score_a > score_v and k > 0.05:
        return 0.95 * math.exp(math.tanh(score_a - score_v)), 0.0
    if score_a < score_v and k > 0.05:
        return 0.0, 0.1 * math.exp(math.tanh(score_v - score_a))
    return 0.0, 0.0


def oracle_logits(model, x):
    """Multimodal and unimodal logits of the concat head, written out by hand."""
    f = [model.encoders[m](x[m]) for m in NAMES]
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    out = torch.cat(f, 1) @ w.T + b
    out_a = f[0] @ w[:, :DIMS["m0"]].T + b
    out_v = f[1] @ w[:, DIMS["m0"]:].T + b
    return out, out_a, out_v


def true_prob_sum(logits, y):
    p = torch.softmax(logits.detach(), 1)
    return float(sum(p[i, y[i]] for i in range(len(y))))


def weight_layers(encoder):
    return [mod for mod in encoder.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]


def oracle_epoch(model, opt, batches, audio_list):
    """One released training epoch; returns (betas per step, traces per modality)."""
    k = released_k(audio_list)
    anchor = copy.deepcopy(model)
    fim = {m: [torch.zeros_like(mod.weight) for mod in weight_layers(model.encoders[m])]
           for m in NAMES}
    betas = []
    for x, y in batches:
        opt.zero_grad()
        out, out_a, out_v = oracle_logits(model, x)
        (F.cross_entropy(out_v, y) + F.cross_entropy(out_a, y) + F.cross_entropy(out, y)).backward()
        beta, beta2 = released_betas(true_prob_sum(out_a, y), true_prob_sum(out_v, y), k)
        betas.append((beta, beta2))
        with torch.no_grad():
            for m, c in zip(NAMES, (beta, beta2), strict=True):
                for p, q in zip(model.encoders[m].parameters(), anchor.encoders[m].parameters(),
                                strict=True):
                    p.grad += c * (p - q)
            for m in NAMES:
                for acc, mod in zip(fim[m], weight_layers(model.encoders[m]), strict=True):
                    acc += mod.weight.grad * mod.weight.grad
        opt.step()
    traces = {m: sum(float(acc.mean()) for acc in fim[m]) for m in NAMES}
    return k, betas, traces


# ---------------------------------------------------------------- fixtures
def make_net(seed=0):
    torch.manual_seed(seed)
    encoders = {"m0": nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)),
                "m1": nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))}
    return md.MultimodalClassifier(encoders, DIMS, 3, fusion="concat")


def make_batches(n=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (size,), generator=g)
        x = {"m0": torch.randn(size, 5, generator=g), "m1": torch.randn(size, 3, generator=g)}
        x["m0"][:, :3] += 1.5 * F.one_hot(y, 3).float()  # m0 informative: it leads
        out.append((x, y))
    return out


def run_modaldiag(model, opt, reg, batches, epochs, accumulate=1):
    run = md.Regulation(model, opt, reg, accumulate_grad_batches=accumulate)
    logs = []
    for _ in range(epochs):
        run.epoch_start(None, batches)
        model.train()
        for i, (x, y) in enumerate(batches):
            if i % accumulate == 0:
                opt.zero_grad()
            run.backward(x, y)
            if (i + 1) % accumulate == 0:
                opt.step()
                run.batch_end()
        logs.append(run.epoch_end()["regulator"])
    return logs


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


# ---------------------------------------------------------------- 1. window re-opening
def drive_window(reg, traces):
    """Decide the window at the start of every epoch from the traces measured so far."""
    model = make_net()
    ctx = md.training.callbacks.StepContext(model=model)
    opened = []
    for t in range(len(traces["m0"])):
        reg.traces = {m: list(v[:t]) for m, v in traces.items()}
        reg.on_train_epoch_start(ctx)
        opened.append(reg.collect_logs()["window_open"])
    return opened


def test_code_rule_window_reopens_like_learning_window_and_released_code():
    seq = [1.0] * 11 + [5.0] * 5  # flat (closes at 11), then a rise (reopens at 12)
    traces = {"m0": seq, "m1": [2.0] * len(seq)}
    opened = drive_window(md.InfoReg(rule="code"), traces)
    lw = md.learning_window(traces, rule="code")
    for m in NAMES:
        assert [o[m] for o in opened] == lw.open[m]
    # the released code's k on the zero-prefilled list, epoch by epoch
    expected = [released_k([0.0] * 10 + seq[:t]) > 0.05 for t in range(len(seq))]
    assert expected == [True] * 11 + [False] + [True] * 4
    assert [o["m0"] for o in opened] == expected == [o["m1"] for o in opened]
    # the old regulator (sticky window) would have stayed closed from epoch 11 on
    prev, sticky = None, []
    for t in range(len(seq)):
        prev, _ = window_state({m: v[:t] for m, v in traces.items()}, t, rule="code",
                               previous=prev, sticky=True)
        sticky.append(prev["m0"])
    assert sticky == [True] * 11 + [False] * 5 != expected
    # the released variant uses the same rule
    assert [o["m0"] for o in drive_window(md.InfoReg(variant="released"), traces)] == expected


def test_paper_rule_window_stays_closed_once_closed():
    traces = {"m0": [1.0, 2.0, 2.0, 2.0, 5.0, 9.0], "m1": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    opened = drive_window(md.InfoReg(), traces)
    assert [o["m0"] for o in opened] == [True, True, True, False, False, False]  # rho_5 = .44
    assert [o["m0"] for o in opened] == md.learning_window(traces).open["m0"]
    assert [o["m1"] for o in opened] == md.learning_window(traces).open["m1"]


# ---------------------------------------------------------------- 2. released end to end
def test_released_training_equals_transcription_from_scratch():
    """Three epochs (window open: regulation active from the second step on)."""
    batches = make_batches()
    net, ref = make_net(), make_net()
    opt, ref_opt = sgd(net), sgd(ref)
    logs = run_modaldiag(net, opt, md.InfoReg(variant="released"), batches, epochs=3)
    audio, seen = [0.0] * 10, []
    ref.train()
    for epoch in range(3):
        k, betas, traces = oracle_epoch(ref, ref_opt, batches, audio)
        audio.append(traces["m0"])
        assert k > 0.05 and logs[epoch]["window_open"] == {"m0": True, "m1": True}
        for i, m in enumerate(NAMES):
            assert logs[epoch]["trace"][m] == pytest.approx(traces[m], rel=1e-5)
            mean_beta = sum(b[i] for b in betas) / len(betas)
            assert logs[epoch]["alpha"][m] == pytest.approx(mean_beta, rel=1e-6, abs=1e-9)
        seen.append(betas)
    # both released branches ran: 0.95 * exp(tanh(gap)) for m0, 0.1 * exp(tanh(gap)) for m1
    assert any(b[0] > 0.95 for bs in seen for b in bs) and any(b[1] > 0.1 for bs in seen for b in bs)
    for (n, a), (_, b) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_released_training_equals_transcription_window_closes_then_reopens():
    """A history that closes the window at the first epoch; the real traces reopen it."""
    c = 1e-9
    hist = [c] * 12
    hist[2] = 0.0  # epoch 12: (h11 - h1) = 0 -> closed; epoch 13: (Tr12 - h2) > 0 -> open
    batches = make_batches(seed=3)
    net, ref = make_net(1), make_net(1)
    opt, ref_opt = sgd(net), sgd(ref)
    reg = md.InfoReg(variant="released")
    reg.load_state_dict({"traces": {"m0": list(hist), "m1": list(hist)}, "window": {}})
    logs = run_modaldiag(net, opt, reg, batches, epochs=3)
    audio = [0.0] * 10 + hist
    ref.train()
    windows, betas_all = [], []
    for epoch in range(3):
        k, betas, traces = oracle_epoch(ref, ref_opt, batches, audio)
        audio.append(traces["m0"])
        windows.append(k > 0.05)
        betas_all.append(betas)
        assert logs[epoch]["window_open"]["m0"] == (k > 0.05)
        for i, m in enumerate(NAMES):
            assert logs[epoch]["trace"][m] == pytest.approx(traces[m], rel=1e-5)
            assert logs[epoch]["alpha"][m] == pytest.approx(
                sum(b[i] for b in betas) / len(betas), rel=1e-6, abs=1e-9)
    assert windows == [False, True, True]
    assert all(b == (0.0, 0.0) for b in betas_all[0]) and betas_all[1][1][0] > 0.95
    for (n, a), (_, b) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def _one_regulated_step(reg, seed=5):
    """Epoch start, move the weights off the anchors, one step; returns (model, grads before the
    proximal term, grads after it)."""
    model = make_net(seed)
    x, y = make_batches(1, seed=seed)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run = md.Regulation(model, opt, reg)
    run.epoch_start(0, [(x, y)])
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.train()
    return model, run, x, y


def test_released_trace_is_weights_only_after_the_proximal_term():
    reg = md.InfoReg(variant="released")
    model, run, x, y = _one_regulated_step(reg)
    opt = run.ctx.optimizer
    opt.zero_grad()
    ref = copy.deepcopy(model)
    run.backward(x, y)
    run.epoch_end()
    assert len(reg._alpha) == 1  # a regulated step
    # by hand: the full loss's gradient + alpha * (theta - anchor), weights of Linear layers only
    out, out_a, out_v = oracle_logits(ref, x)
    (F.cross_entropy(out, y) + F.cross_entropy(out_a, y) + F.cross_entropy(out_v, y)).backward()
    beta, beta2 = released_betas(true_prob_sum(out_a, y), true_prob_sum(out_v, y), 1.0)
    leader = "m0" if beta > 0 else "m1"
    assert set(reg._alpha) == {leader} and reg._alpha[leader] == pytest.approx(max(beta, beta2))
    expected, no_prox, with_bias = {}, {}, {}
    for m, c in zip(NAMES, (beta, beta2), strict=True):
        anchors = dict(zip([n for n, _ in ref.encoders[m].named_parameters()], reg.anchors[m],
                           strict=True))
        layers = [(n, mod) for n, mod in ref.encoders[m].named_modules()
                  if isinstance(mod, nn.Linear)]
        final = {f"{n}.{pn}": p.grad + c * (p.detach() - anchors[f"{n}.{pn}"])
                 for n, mod in layers for pn, p in mod.named_parameters()}
        expected[m] = sum(float(final[f"{n}.weight"].pow(2).mean()) for n, _ in layers)
        no_prox[m] = sum(float(mod.weight.grad.pow(2).mean()) for _, mod in layers)
        with_bias[m] = expected[m] + sum(float(final[f"{n}.bias"].pow(2).mean()) for n, _ in layers)
    traces = {m: reg.traces[m][-1] for m in NAMES}
    for m in NAMES:
        assert traces[m] == pytest.approx(expected[m], rel=1e-5)
    # the alternatives are measurably different, so the check above can fail
    assert abs(no_prox[leader] - expected[leader]) > 0.05 * expected[leader]
    assert all(abs(with_bias[m] - expected[m]) > 0.05 * expected[m] for m in NAMES)


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_accumulation_delta_from_step_or_last_micro_batch(variant):
    batches = make_batches(2, seed=7)
    batches[1][0]["m0"].mul_(0.0)  # the last micro-batch: m0 uninformative, m1 may lead
    model = make_net(2)
    ref = copy.deepcopy(model)
    ref.train()
    reg = md.InfoReg(variant=variant)
    logs = run_modaldiag(model, torch.optim.SGD(model.parameters(), lr=0.0), reg, batches,
                         epochs=1, accumulate=2)
    probs = []
    with torch.no_grad():
        for x, y in batches:
            _, out_a, out_v = oracle_logits(ref, x)
            probs.append((true_prob_sum(out_a, y), true_prob_sum(out_v, y), len(y)))
    if variant == "released":  # batch sums of the last micro-batch, the released coefficient
        sa, sv, _ = probs[-1]
        expected = released_betas(sa, sv, 1.0)
    else:  # means over both micro-batches, the paper coefficient
        n = sum(p[2] for p in probs)
        sa, sv = sum(p[0] for p in probs) / n, sum(p[1] for p in probs) / n
        expected = tuple(math.exp(0.9 * math.tanh(a - b)) if a > b else 0.0
                         for a, b in ((sa, sv), (sv, sa)))
    assert logs[0]["score"] == pytest.approx({"m0": sa, "m1": sv}, rel=1e-6)
    assert (logs[0]["alpha"]["m0"], logs[0]["alpha"]["m1"]) == pytest.approx(expected, rel=1e-6)


def test_accumulation_forms_differ_where_micro_batches_disagree():
    batches = make_batches(2, seed=7)
    batches[1][0]["m0"].mul_(0.0)
    alphas = {}
    for acc in ("step", "last"):
        model = make_net(2)
        logs = run_modaldiag(model, torch.optim.SGD(model.parameters(), lr=0.0),
                             md.InfoReg(accumulation=acc), batches, epochs=1, accumulate=2)
        alphas[acc] = logs[0]["alpha"]
    assert alphas["step"] != pytest.approx(alphas["last"], abs=1e-3)


# ---------------------------------------------------------------- paper vs released
def test_paper_and_released_coefficients_differ_on_the_same_batch():
    reg_p, reg_r = md.InfoReg(), md.InfoReg(variant="released")
    got = {}
    for name, reg in (("paper", reg_p), ("released", reg_r)):
        model, run, x, y = _one_regulated_step(reg)
        run.ctx.optimizer.zero_grad()
        run.backward(x, y)
        got[name] = run.epoch_end()["regulator"]
    sp, sr = got["paper"]["score"], got["released"]["score"]
    # paper: means; released: sums over the batch of 8
    assert sr["m0"] == pytest.approx(8 * sp["m0"], rel=1e-6)
    a_paper = (paper_alpha(sp["m0"] - sp["m1"]), paper_alpha(sp["m1"] - sp["m0"]))
    a_rel = released_betas(sr["m0"], sr["m1"], 1.0)
    assert (got["paper"]["alpha"]["m0"], got["paper"]["alpha"]["m1"]) == pytest.approx(a_paper, rel=1e-6)
    assert (got["released"]["alpha"]["m0"], got["released"]["alpha"]["m1"]) == pytest.approx(a_rel, rel=1e-6)
    leader = "m0" if sp["m0"] > sp["m1"] else "m1"
    i = NAMES.index(leader)
    assert a_rel[i] > 0 and a_paper[i] > 0
    assert abs(a_rel[i] - a_paper[i]) > 0.2  # batch sum in tanh, c_m, no beta: another number
    # released trace (weights only, sum over steps, proximal included) vs paper online trace
    assert got["paper"]["trace"]["m0"] != pytest.approx(got["released"]["trace"]["m0"], rel=0.05)


def test_released_coefficient_equals_if_elif_on_random_pairs():
    rng = random.Random(0)
    for _ in range(500):
        sa, sv = rng.uniform(0, 8), rng.uniform(0, 8)
        if rng.random() < 0.1:
            sv = sa  # ties: neither is regulated
        for k in (1.0, 0.06, 0.05, 0.0):
            window = {"m0": k > 0.05, "m1": k > 0.05}
            _, _, alpha = inforeg_coefficients({"m0": sa, "m1": sv}, coefficient="code",
                                               window=window)
            assert (alpha["m0"], alpha["m1"]) == pytest.approx(released_betas(sa, sv, k), rel=1e-12)


def test_variant_sets_the_finer_options_and_explicit_ones_override():
    cfg = md.InfoReg(variant="released").config()
    assert {k: cfg[k] for k in ("variant", "rule", "trace", "score", "coefficient",
                                "unimodal_loss", "accumulation")} == {
        "variant": "released", "rule": "code", "trace": "code", "score": "code",
        "coefficient": "code", "unimodal_loss": True, "accumulation": "last"}
    cfg = md.InfoReg().config()
    assert {k: cfg[k] for k in ("variant", "rule", "trace", "score", "coefficient",
                                "unimodal_loss", "accumulation", "multi")} == {
        "variant": "paper", "rule": "paper", "trace": "online", "score": "prob",
        "coefficient": "paper", "unimodal_loss": False, "accumulation": "step",
        "multi": "continuous"}
    assert md.InfoReg(variant="released", trace="online").trace == "online"
    assert md.InfoReg(rule="code", coefficient="code").config()["score"] == "prob"
    with pytest.raises(ValueError, match=r"InfoReg: .*\bvariant\b"):
        md.InfoReg(variant="code")
    with pytest.raises(ValueError, match=r"InfoReg: .*\bmulti\b"):
        md.InfoReg(multi="any")
    with pytest.raises(ValueError, match=r"InfoReg: .*\baccumulation\b"):
        md.InfoReg(accumulation="mean")


# ---------------------------------------------------------------- 3. M > 2
def paper_alpha(d, beta=0.9):
    return math.exp(beta * math.tanh(d)) if d > 0 else 0.0


def test_m2_is_exactly_the_paper_on_random_scores():
    rng = random.Random(1)
    for _ in range(500):
        s = {"a": rng.random(), "b": rng.random()}
        beta = rng.uniform(0, 2)
        delta, weight, alpha = inforeg_coefficients(s, beta=beta)
        assert delta == {"a": max(0.0, s["a"] - s["b"]), "b": max(0.0, s["b"] - s["a"])}
        assert alpha == {"a": paper_alpha(s["a"] - s["b"], beta),
                         "b": paper_alpha(s["b"] - s["a"], beta)}  # exact, not approximate
        assert inforeg_coefficients(s, beta=beta, multi="leaders")[2] == alpha


def _alphas(scores, multi="continuous"):
    a = inforeg_coefficients(dict(zip("abc", scores, strict=True)), multi=multi)[2]
    return [a["a"], a["b"], a["c"]]


def _max_step(xs, fn):
    vals = [fn(x) for x in xs]
    return max(max(abs(u - v) for u, v in zip(p, q, strict=True))
               for p, q in zip(vals, vals[1:], strict=False))


def test_m3_near_tie_gets_a_small_coefficient():
    a = _alphas((0.60, 0.30, 0.29))
    # D = (0.305, 0.005, 0): alpha_1 = exp(.9 tanh .305), alpha_2 = (.005/.305) exp(.9 tanh .005)
    assert a[0] == pytest.approx(math.exp(0.9 * math.tanh(0.305)), rel=1e-9)
    assert a[0] == pytest.approx(1.305118, abs=1e-6)
    assert a[1] == pytest.approx(0.005 / 0.305 * math.exp(0.9 * math.tanh(0.005)), rel=1e-9)
    assert a[1] == pytest.approx(0.016467, abs=1e-6)
    assert a[2] == 0.0
    old = _alphas((0.60, 0.30, 0.29), "leaders")
    assert old[1] / old[0] == pytest.approx(0.7734, abs=1e-3)  # the "77 %"
    assert a[1] / a[0] < 0.013
    swapped = _alphas((0.60, 0.29, 0.30))  # a 0.01 swap moves the coefficients by ~0.016
    assert max(abs(u - v) for u, v in zip(a, swapped, strict=True)) < 0.02


def test_m3_sweep_has_no_jump_where_the_old_rule_jumps():
    step = 1e-4
    xs = [0.25 + i * step for i in range(1001)]  # the third score through the second (0.30)
    new = _max_step(xs, lambda x: _alphas((0.6, 0.3, x)))
    old = _max_step(xs, lambda x: _alphas((0.6, 0.3, x), "leaders"))
    assert old > 0.9  # 0 -> exp(0) at the crossing
    lip = math.exp(0.9) * (4 / 0.3 + 2 * 0.9)  # L = e^beta (4 / D_max + 2 beta), D_max >= 0.3
    assert new <= lip * step and new < 5e-3
    xs = [0.55 + i * step for i in range(1001)]  # the third score through the first (0.60)
    new = _max_step(xs, lambda x: _alphas((0.6, 0.3, x)))
    old = _max_step(xs, lambda x: _alphas((0.6, 0.3, x), "leaders"))
    assert old > 0.1  # P5's mean over the worse modalities jumps from 0.15 to 0.30
    assert new < 5e-3


def test_m3_lipschitz_bound_on_random_scores():
    rng = random.Random(2)
    checked = 0
    for _ in range(2000):
        s = [rng.random() for _ in range(3)]
        d = lead_gap(dict(zip("abc", s, strict=True)))
        top = max(d.values())
        if top < 0.05:
            continue
        eps = 1e-6
        t = [v + rng.uniform(-eps, eps) for v in s]
        dev = max(abs(u - v) for u, v in zip(s, t, strict=True))
        change = max(abs(u - v) for u, v in zip(_alphas(s), _alphas(t), strict=True))
        assert change <= math.exp(0.9) * (4 / (top - 2 * eps) + 2 * 0.9) * dev + 1e-12
        checked += 1
    assert checked > 1000


def test_m3_regulator_applies_the_weighted_coefficients():
    torch.manual_seed(0)
    from conftest import make_inputs, make_model

    model = make_model(3, "late")
    x, y = make_inputs(model, batch=10), torch.arange(10) % 3
    reg = md.InfoReg()
    run = md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.0), reg)
    run.epoch_start(0, [(x, y)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    feats = model.encode(x)
    s = {m: float(F.softmax(model.head(feats, present=(m,)).detach(), 1)
                  .gather(1, y[:, None]).mean()) for m in model.modalities}
    names = list(model.modalities)
    d = {m: sum(max(0.0, s[m] - s[k]) for k in names if k != m) / 2 for m in names}
    top = max(d.values())
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    model.zero_grad()
    run.backward(x, y)
    record = run.epoch_end()["regulator"]
    logged = record["alpha"]
    for m in names:
        a = d[m] / top * math.exp(0.9 * math.tanh(d[m])) if d[m] > 0 else 0.0
        assert logged[m] == pytest.approx(a, rel=1e-6)
        for p, anchor in zip(model.encoders[m].parameters(), reg.anchors[m], strict=True):
            torch.testing.assert_close(p.grad, grads[id(p)] + a * (p.detach() - anchor))
    # this fixture has one leader at full weight and one near it at a fraction (0.42) of it
    assert sorted(record["weight"].values())[1:] == pytest.approx([0.4205, 1.0], abs=1e-3)
