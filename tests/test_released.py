"""Every method's ``variant="released"`` against a small, independent transcription of the
authors' released code (the formula path, not their scripts), on fixed weights and batches:
coefficients, modulated gradients, drop masks, traces and window states, to float tolerance. Where
paper and released forms differ, the tests also assert by how much.

Oracles are plain torch written from the released code's logic (GeWu-Lab repositories
InfoReg_CVPR2025, OGM-GE_CVPR2022, BML_TPAMI2024, MMPareto_ICML2024,
Diagnosing_Relearning_ECCV2024, Valuate-And-Enhance-Multimodal-Cooperation); none calls
modaldiag's helpers.
"""

from __future__ import annotations

import copy
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs, make_model
from torch import nn

import modaldiag as md
import modaldiag.regulators.relearning as relearning_module
from modaldiag.probes import window_state
from modaldiag.regulators import extra_copies
from modaldiag.regulators.inforeg import inforeg_coefficients, lead_gap
from modaldiag.regulators.ogm import ogm_coefficients
from modaldiag.regulators.opm import opm_drop_probability, opm_released_theta
from modaldiag.training.callbacks import StepContext

# ==========================================================================================
# InfoReg (GeWu-Lab/InfoReg_CVPR2025, main.py): released variant, code-rule window, M > 2
# ==========================================================================================

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


def oracle_logits(model, x, bias_share=2):
    """Multimodal and unimodal logits of the concat head, written out by hand (released
    ``main.py``: ``out_a = a @ W[:, :512].T + bias / 2``, with gradient). ``bias_share=1``:
    modaldiag's paper form for concat (the other modality's features at baseline 0)."""
    f = [model.encoders[m](x[m]) for m in NAMES]
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    out = torch.cat(f, 1) @ w.T + b
    out_a = f[0] @ w[:, :DIMS["m0"]].T + b / bias_share  # main.py: head.bias / 2
    out_v = f[1] @ w[:, DIMS["m0"]:].T + b / bias_share
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


def test_released_unimodal_logits_halve_the_bias_and_the_full_bias_is_caught():
    """The released logits are W_m f_m + b/2; the baseline form (full bias) trains differently."""
    batches = make_batches()
    finals = {}
    for logits in ("released", "baseline"):
        net = make_net()
        with torch.no_grad():
            net.fusion.fc.bias.copy_(torch.tensor([1.0, -0.5, 0.2]))  # a bias far from 0
        run_modaldiag(net, sgd(net), md.InfoReg(variant="released", logits=logits), batches,
                      epochs=2)
        finals[logits] = torch.cat([p.detach().flatten() for p in net.parameters()])
    ref = make_net()
    with torch.no_grad():
        ref.fusion.fc.bias.copy_(torch.tensor([1.0, -0.5, 0.2]))
    ref_opt, audio = sgd(ref), [0.0] * 10
    ref.train()
    for _ in range(2):
        audio.append(oracle_epoch(ref, ref_opt, batches, audio)[2]["m0"])
    oracle = torch.cat([p.detach().flatten() for p in ref.parameters()])
    torch.testing.assert_close(finals["released"], oracle, rtol=1e-5, atol=1e-6)
    assert (finals["baseline"] - oracle).abs().max() > 1e-3


def test_released_logits_refuse_a_head_without_a_released_definition():
    torch.manual_seed(0)
    net = md.MultimodalClassifier({m: nn.Linear(3, 4) for m in NAMES}, {m: 4 for m in NAMES}, 3,
                                  fusion="gated")
    run = md.Regulation(net, sgd(net), md.InfoReg(variant="released"))
    x = {m: torch.randn(4, 3) for m in NAMES}
    with pytest.raises(ValueError, match=r"InfoReg\(variant='released'\).*'gated'"):
        run.epoch_start(0, [(x, torch.tensor([0, 1, 2, 0]))])
        run.backward(x, torch.tensor([0, 1, 2, 0]))
    md.InfoReg(variant="released", logits="baseline")  # the explicit override is accepted


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
            _, out_a, out_v = oracle_logits(ref, x, bias_share=2 if variant == "released" else 1)
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
    expected = {}
    for name, reg in (("paper", reg_p), ("released", reg_r)):
        model, run, x, y = _one_regulated_step(reg)
        run.ctx.optimizer.zero_grad()
        run.backward(x, y)
        got[name] = run.epoch_end()["regulator"]
        with torch.no_grad():  # lr = 0: the weights of the step; train mode: batch statistics
            _, out_a, out_v = oracle_logits(model, x, bias_share=2 if name == "released" else 1)
        scale = 1 if name == "released" else len(y)
        expected[name] = {"m0": true_prob_sum(out_a, y) / scale,
                          "m1": true_prob_sum(out_v, y) / scale}
    sp, sr = got["paper"]["score"], got["released"]["score"]
    # paper: means of the baseline form (full bias); released: sums with the bias halved
    assert sp == pytest.approx(expected["paper"], rel=1e-6)
    assert sr == pytest.approx(expected["released"], rel=1e-6)
    assert sr["m0"] != pytest.approx(8 * sp["m0"], rel=1e-3)  # the two forms' logits differ
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


# ==========================================================================================
# OGM (GeWu-Lab/OGM-GE_CVPR2022) and OPM (GeWu-Lab/BML_TPAMI2024), plus paper-form OPM checks
# ==========================================================================================

REL = dict(rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ oracles (plain torch)
def oracle_ogm_released(fa, fv, w, b, y, alpha):
    """The released OGM step for a concat head: logits W_m f_m + b/2, ratio, Eq. (10)."""
    da = fa.shape[1]
    out_a = fa @ w[:, :da].T + b / 2
    out_v = fv @ w[:, da:].T + b / 2
    score_a = sum(F.softmax(out_a, 1)[i][y[i]] for i in range(len(y)))
    score_v = sum(F.softmax(out_v, 1)[i][y[i]] for i in range(len(y)))
    ratio_v = float(score_v / score_a)
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        coeff_v, coeff_a = 1 - math.tanh(alpha * max(ratio_v, 0.0)), 1.0
    else:
        coeff_a, coeff_v = 1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0
    return {"a": coeff_a, "v": coeff_v}, {"a": ratio_a, "v": ratio_v}


def oracle_opm_released(f1, f2, w, b, y, q_base, lam, mask):
    """The released OPM forward for a concat head: calcu_q, then Modality_drop with a given
    (B, 2) keep mask: every modality's kept feature divided by (1 - theta)."""
    d1, d2 = f1.shape[1], f2.shape[1]
    t1 = f1 @ w[:, :d1].T + b / 2
    t2 = f2 @ w[:, d1:].T + b / 2
    p1 = sum(F.softmax(t1, 1)[i][y[i]] for i in range(len(y)))
    p2 = sum(F.softmax(t2, 1)[i][y[i]] for i in range(len(y)))
    r1 = math.tanh(max(float(p1 / p2) - 1, 0.0))
    r2 = math.tanh(max(float(p2 / p1) - 1, 0.0))
    q = [q_base * (1 + lam * r1) if r1 > 0 else 0.0, q_base * (1 + lam * r2) if r2 > 0 else 0.0]
    q = [min(max(v, 0.0), 1.0) for v in q]
    theta = (d1 * q[0] + d2 * q[1]) / (d1 + d2)
    m = mask.float()
    return q, theta, f1 * m[:, :1] / (1 - theta), f2 * m[:, 1:] / (1 - theta)


# ------------------------------------------------------------------ fixtures
def _conv_encoder(d):
    # a 4-D conv weight, a 1-D conv bias and a 2-D linear weight: conv_only is visible
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, d))


def _ogm_fixture(bias=(2.5, -2.0, 0.5)):
    torch.manual_seed(0)
    model = md.MultimodalClassifier({"a": _conv_encoder(6), "v": _conv_encoder(5)},
                                    {"a": 6, "v": 5}, 3, fusion="concat")
    with torch.no_grad():
        model.fusion.fc.weight[:, :6].mul_(12)
        model.fusion.fc.weight[:, 6:].mul_(2)
        model.fusion.fc.bias.copy_(torch.tensor(bias))
    g = torch.Generator().manual_seed(1)
    x = {"a": 3 * torch.randn(16, 1, 6, 6, generator=g), "v": torch.randn(16, 1, 6, 6, generator=g)}
    y = torch.tensor([0, 2, 0, 2, 2, 1, 2, 2, 2, 2, 1, 0, 2, 0, 2, 2])
    return model, x, y


def _ctx(model, x, y, epoch=0, step=0):
    ctx = StepContext(model=model, epoch=epoch, step=step, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    ctx.compute_unimodal_logits()
    return ctx


def _ogm_step(reg, model, x, y, epoch=0, step=0):
    """One step through the regulator's hooks; returns (features, grads before, grads after)."""
    model.zero_grad(set_to_none=True)
    ctx = _ctx(model, x, y, epoch, step)
    reg.on_fit_start(ctx)
    reg.on_after_forward(ctx)
    F.cross_entropy(ctx.logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.on_before_optimizer_step(ctx)
    after = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {m: f.detach() for m, f in ctx.features.items()}, before, after


# ------------------------------------------------------------------ OGM released
@pytest.mark.parametrize("epoch,inside", [(1, False), (2, True), (4, True), (5, False)])
def test_ogm_released_coefficients_and_gradients_equal_the_oracle(epoch, inside):
    model, x, y = _ogm_fixture()
    alpha = 0.8
    reg = md.OGM(alpha=alpha, start_epoch=2, end_epoch=4, variant="released")
    feats, before, after = _ogm_step(reg, model, x, y, epoch=epoch)
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    k, rho = oracle_ogm_released(feats["a"], feats["v"], w, b, y, alpha)
    assert rho["a"] > 1.2 and k["a"] < 0.3  # the fixture modulates audio clearly
    assert reg._sums["rho"]["a"] == pytest.approx(rho["a"], rel=1e-6)
    assert reg._sums["rho"]["v"] == pytest.approx(rho["v"], rel=1e-6)
    expect = k if inside else {"a": 1.0, "v": 1.0}  # window [2, 4], both ends included
    for m in ("a", "v"):
        assert reg.coefficients[m] == pytest.approx(expect[m], rel=1e-6)
    for name, g in after.items():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        if m is not None and g.dim() == 4:  # released: only 4-D gradients are modulated
            torch.testing.assert_close(g, before[name] * expect[m], **REL)
        else:
            torch.testing.assert_close(g, before[name], rtol=0, atol=0)
    conv = after["encoders.a.0.weight"]
    if inside:
        assert not torch.allclose(conv, before["encoders.a.0.weight"])


def test_ogm_released_and_paper_differ_by_the_bias_share():
    model, x, y = _ogm_fixture()
    rel = md.OGM(alpha=0.8, variant="released")
    pap = md.OGM(alpha=0.8)
    feats, before, after_rel = _ogm_step(rel, model, x, y)
    _, _, after_pap = _ogm_step(pap, model, x, y)
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    # paper: the other modality at its (zero) baseline, so the FULL bias: W_a f_a + b
    s = [F.softmax(f @ wm.T + b, 1).gather(1, y[:, None]).sum()
         for f, wm in ((feats["a"], w[:, :6]), (feats["v"], w[:, 6:]))]
    rho_paper = float(s[0] / s[1])
    _, rho_rel = oracle_ogm_released(feats["a"], feats["v"], w, b, y, 0.8)
    assert pap._sums["rho"]["a"] == pytest.approx(rho_paper, rel=1e-6)
    assert rel._sums["rho"]["a"] == pytest.approx(rho_rel["a"], rel=1e-6)
    assert rho_paper == pytest.approx(1.289, abs=2e-3)  # this fixture: 1.289 (paper)
    assert rho_rel["a"] == pytest.approx(1.375, abs=2e-3)  # vs 1.375 (released)
    assert pap.coefficients["a"] / rel.coefficients["a"] > 1.10  # k differs by > 10 %
    # and paper modulates the linear layer too, released does not
    assert not torch.allclose(after_pap["encoders.a.4.weight"], after_rel["encoders.a.4.weight"])
    # with a zero bias the two scores coincide
    model0, x0, y0 = _ogm_fixture(bias=(0.0, 0.0, 0.0))
    r0, p0 = md.OGM(variant="released"), md.OGM()
    _ogm_step(r0, model0, x0, y0)
    _ogm_step(p0, model0, x0, y0)
    assert r0._sums["rho"]["a"] == pytest.approx(p0._sums["rho"]["a"], rel=1e-6)


def test_ogm_released_late_head_uses_each_modality_own_linear():
    torch.manual_seed(3)
    model = md.MultimodalClassifier({"a": _conv_encoder(4), "v": _conv_encoder(4)},
                                    {"a": 4, "v": 4}, 3, fusion="late")
    with torch.no_grad():
        model.fusion.heads["a"].weight.mul_(10)
        model.fusion.heads["a"].bias.copy_(torch.tensor([1.0, -1.0, 0.0]))
        model.fusion.heads["v"].bias.copy_(torch.tensor([-3.0, 3.0, 0.5]))
    g = torch.Generator().manual_seed(4)
    x = {m: 3 * torch.randn(12, 1, 6, 6, generator=g) for m in ("a", "v")}
    with torch.no_grad():  # labels that modality a predicts: rho far from 1
        y = model.fusion.heads["a"](model.encoders["a"](x["a"])).argmax(1)
    reg = md.OGM(alpha=0.5, variant="released")
    feats, before, after = _ogm_step(reg, model, x, y)
    ha, hv = model.fusion.heads["a"], model.fusion.heads["v"]
    sa = F.softmax(feats["a"] @ ha.weight.detach().T + ha.bias.detach(), 1).gather(1, y[:, None]).sum()
    sv = F.softmax(feats["v"] @ hv.weight.detach().T + hv.bias.detach(), 1).gather(1, y[:, None]).sum()
    rho_v = float(sv / sa)
    k = ({"a": 1.0, "v": 1 - math.tanh(0.5 * rho_v)} if rho_v > 1
         else {"a": 1 - math.tanh(0.5 / rho_v), "v": 1.0})
    assert reg._sums["rho"]["v"] == pytest.approx(rho_v, rel=1e-6)
    assert reg.coefficients == pytest.approx(k, rel=1e-6)
    assert rho_v < 0.8 and k["a"] < 0.8
    # paper: fc_a(f_a) + bias of v (v at its zero baseline) -- a different score
    pap = md.OGM(alpha=0.5)
    _ogm_step(pap, model, x, y)
    assert abs(pap._sums["rho"]["v"] - rho_v) > 0.05


def test_ogm_released_tie_modulates_the_first_modality():
    k_rel, _ = ogm_coefficients({"a": 3.0, "v": 3.0}, 0.8, "released")
    k_pap, _ = ogm_coefficients({"a": 3.0, "v": 3.0}, 0.8)
    assert k_rel == pytest.approx({"a": 1 - math.tanh(0.8), "v": 1.0})
    assert k_pap == {"a": 1.0, "v": 1.0}
    # away from the tie both forms agree
    for s in ({"a": 3.0, "v": 2.0}, {"a": 2.0, "v": 3.0}):
        assert ogm_coefficients(s, 0.8, "released")[0] == pytest.approx(ogm_coefficients(s, 0.8)[0])


def test_ogm_released_ge_noise_only_on_4d_with_unmodulated_std():
    model, x, y = _ogm_fixture()
    reg = md.OGM(alpha=2.6, noise=True, variant="released", seed=5)
    _, before, after = _ogm_step(reg, model, x, y)
    k = reg.coefficients["a"]
    assert k < 0.01  # strongly modulated: modulated and unmodulated std differ 100-fold
    name = "encoders.a.0.weight"
    noise = after[name] - k * before[name]
    assert noise.std().item() == pytest.approx(before[name].std().item(), rel=0.15)
    for n, g in after.items():
        if g.dim() != 4:
            torch.testing.assert_close(g, before[n], rtol=0, atol=0)
    # deterministic in (seed, step)
    reg2 = md.OGM(alpha=2.6, noise=True, variant="released", seed=5)
    _, _, again = _ogm_step(reg2, model, x, y)
    torch.testing.assert_close(again[name], after[name], rtol=0, atol=0)


# ------------------------------------------------------------------ refusals
def _model(fusion, m=2):
    torch.manual_seed(0)
    names = [f"m{i}" for i in range(m)]
    enc = {n: nn.Linear(3, 4) for n in names}
    return md.MultimodalClassifier(enc, {n: 4 for n in names}, 3, fusion=fusion)


@pytest.mark.parametrize("fusion", ["film", "gated", "sum", "wrapped"])
@pytest.mark.parametrize("cls", [md.OGM, md.OPM])
def test_released_refuses_heads_without_a_released_definition(cls, fusion):
    if fusion == "wrapped":
        net = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4), "h": nn.Linear(8, 3)})
        model = md.wrap(net, {"a": net["a"], "b": net["b"]},
                        head=lambda f: net["h"](torch.cat([f["a"], f["b"]], 1)), num_classes=3)
    else:
        model = _model(fusion)
    with pytest.raises(ValueError, match="released"):
        cls(variant="released").on_fit_start(StepContext(model=model))
    cls().on_fit_start(StepContext(model=model))  # the paper form works on every head
    for ok in ("concat", "late"):
        cls(variant="released").on_fit_start(StepContext(model=_model(ok)))


def test_released_options_are_validated_and_recorded():
    with pytest.raises(ValueError, match="conv_only"):
        md.OGM(variant="released", conv_only=False)
    with pytest.raises(ValueError, match="variant"):
        md.OGM(variant="code")
    with pytest.raises(ValueError, match="variant"):
        md.OPM(variant="Released")
    assert md.OGM(variant="released").config()["conv_only"] is True
    assert md.OGM().config() == {"alpha": 0.8, "noise": False, "start_epoch": 0,
                                 "end_epoch": None, "conv_only": False, "variant": "paper"}
    assert md.OGM(variant="released", start_epoch=3, end_epoch=3).active(3)  # inclusive
    assert not md.OGM(start_epoch=2, end_epoch=3).active(3)  # paper: end excluded
    assert md.OPM(variant="released").start_epoch == 6
    assert md.OPM().start_epoch == 0
    assert md.OPM(variant="released", start_epoch=2).start_epoch == 2
    assert md.OPM(variant="released").config()["variant"] == "released"


# ------------------------------------------------------------------ OPM fixtures
def _opm_fixture(batch=64, extra=3, seed=0, extra_v=None):
    """Concat head, C = 2, zero bias, features whose class-0 logits give every sample the true-class
    probability 0.8 (modality a) and 0.4 (modality v): rho_a = 2 exactly, q far from 0.5. Extra
    feature columns (random per sample) have zero weight: they move nothing but the expectation
    check."""
    d = 1 + extra
    dv = d if extra_v is None else 1 + extra_v
    model = md.MultimodalClassifier({"a": nn.Identity(), "v": nn.Identity()}, {"a": d, "v": dv}, 2,
                                    fusion="concat")
    with torch.no_grad():
        model.fusion.fc.weight.zero_()
        model.fusion.fc.bias.zero_()
        model.fusion.fc.weight[0, 0] = 1.0
        model.fusion.fc.weight[0, d] = 1.0
    g = torch.Generator().manual_seed(seed)
    logit = {"a": math.log(0.8 / 0.2), "v": math.log(0.4 / 0.6)}
    feats = {m: torch.cat([torch.full((batch, 1), logit[m]),
                           1 + torch.rand(batch, e, generator=g)], 1)
             for m, e in (("a", extra), ("v", dv - 1))}
    return model, feats, torch.zeros(batch, dtype=torch.long)


Q2 = 0.5 * (1 + 0.5 * math.tanh(1.0))  # q at rho = 2 (q_base = lam = 0.5): 0.6904


def _mean_over_draws(reg, model, feats, y, steps, epoch=10):
    total = {m: torch.zeros_like(f) for m, f in feats.items()}
    dropped = torch.zeros(())
    for step in range(steps):
        out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=epoch, step=step))
        for m in feats:
            total[m] += out[m]
        mask = reg.last_mask if reg.variant == "paper" else reg.last_mask[:, 0]
        dropped += (~mask).float().mean()
    return {m: t / steps for m, t in total.items()}, float(dropped / steps)


def test_opm_paper_fixture_far_from_one_drop_rate_and_expectation():
    model, feats, y = _opm_fixture()
    reg = md.OPM(p_exe=1.0)
    dominant, q, rho = reg.drop_plan(model, feats, y)
    assert dominant == "a" and rho["a"] == pytest.approx(2.0, rel=1e-5)
    assert q == pytest.approx(Q2, rel=1e-5) and abs(q - 0.5) > 0.15
    mean, drop = _mean_over_draws(reg, model, feats, y, steps=300)
    # an inverted keep-mask would drop 1 - q = 0.31 of the samples
    assert drop == pytest.approx(Q2, abs=0.02)
    # preserves expectation: mean over 300 draws of f' = f (aggregate ratio, 64 x 3 entries;
    # std of the estimate ~0.01; a missing 1/(1-q) gives 0.31, an inverted mask 2.2)
    cols = slice(1, None)
    ratio = float((mean["a"][:, cols] * feats["a"][:, cols]).sum() / feats["a"][:, cols].pow(2).sum())
    assert ratio == pytest.approx(1.0, abs=0.04)
    # per sample: every entry within 0.35 f (about 4.5 standard errors of a 300-draw mean)
    assert torch.all((mean["a"][:, cols] / feats["a"][:, cols] - 1).abs() < 0.35)
    torch.testing.assert_close(mean["v"], feats["v"])  # the other modality untouched


def test_opm_released_equals_the_oracle_and_rescales_every_modality():
    model, feats, y = _opm_fixture(batch=40, extra=3, extra_v=7)  # d = 4 and 8: theta = q / 3
    with torch.no_grad():  # a nonzero bias: the released b/2 matters for the scores
        model.fusion.fc.bias.copy_(torch.tensor([0.7, -0.4]))
        model.fusion.fc.weight[1, 2] = 0.9
    reg = md.OPM(p_exe=1.0, variant="released")
    ctx = StepContext(model=model, labels=y, epoch=6, step=3)
    out = reg.transform_features(feats, ctx)
    w, b = model.fusion.fc.weight.detach(), model.fusion.fc.bias.detach()
    q, theta, o1, o2 = oracle_opm_released(feats["a"], feats["v"], w, b, y, 0.5, 0.5, reg.last_mask)
    assert reg.last_mask.shape == (40, 2)
    assert reg._sums["q"]["a"] == pytest.approx(q[0], rel=1e-6) and q[0] > 0.5
    assert reg._sums["q"]["v"] == q[1] == 0.0
    assert reg.last_theta == pytest.approx(theta, rel=1e-6) and theta == pytest.approx(q[0] / 3)
    torch.testing.assert_close(out["a"], o1, **REL)
    torch.testing.assert_close(out["v"], o2, **REL)
    assert torch.all(reg.last_mask[:, 1])  # q = 0: never dropped
    assert not torch.all(reg.last_mask[:, 0])


def test_opm_released_expected_dominant_feature_is_047_f_vs_f_for_paper():
    # the closed form at rho = 2, equal dimensions
    theta = opm_released_theta({"a": Q2, "v": 0.0}, {"a": 512, "v": 512})
    assert theta == pytest.approx(Q2 / 2)
    assert (1 - Q2) / (1 - theta) == pytest.approx(0.4728, abs=1e-4)
    # measured on the regulators (rho = 2 exactly): released 0.47 f, paper f
    model, feats, y = _opm_fixture(batch=400, extra=1)
    rel, pap = md.OPM(p_exe=1.0, variant="released"), md.OPM(p_exe=1.0)
    m_rel, drop_rel = _mean_over_draws(rel, model, feats, y, steps=20)
    m_pap, drop_pap = _mean_over_draws(pap, model, feats, y, steps=20)
    assert drop_rel == pytest.approx(Q2, abs=0.02) and drop_pap == pytest.approx(Q2, abs=0.02)
    r_rel = float(m_rel["a"][:, 1].sum() / feats["a"][:, 1].sum())
    r_pap = float(m_pap["a"][:, 1].sum() / feats["a"][:, 1].sum())
    assert r_rel == pytest.approx(0.4728, abs=0.02)
    assert r_pap == pytest.approx(1.0, abs=0.04)
    # released also scales the other modality by 1 / (1 - theta) = 1.53; paper leaves it alone
    torch.testing.assert_close(m_rel["v"], feats["v"] / (1 - Q2 / 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_pap["v"], feats["v"])


def test_opm_released_warm_up_is_epochs_0_to_5():
    model, feats, y = _opm_fixture(batch=50)
    reg = md.OPM(p_exe=1.0, variant="released")
    for epoch in range(6):  # released: warm_up = 1 if epoch <= 5 (0-based epochs)
        out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=epoch, step=epoch))
        assert reg.last_mask is None and all(out[m] is feats[m] for m in feats)
    out = reg.transform_features(feats, StepContext(model=model, labels=y, epoch=6, step=6))
    assert reg.last_mask is not None and not torch.equal(out["v"], feats["v"])
    paper = md.OPM(p_exe=1.0)
    paper.transform_features(feats, StepContext(model=model, labels=y, epoch=0, step=0))
    assert paper.last_mask is not None  # the paper form has no warm-up


# ------------------------------------------------------------------ M > 2 continuity
def _q_released(scores, q_base=0.5, lam=0.5):
    names = list(scores)
    rho = {m: scores[m] / (sum(scores[k] for k in names if k != m) / (len(names) - 1))
           for m in names}
    return {m: opm_drop_probability(r, q_base, lam) if r > 1 else 0.0 for m, r in rho.items()}, rho


def test_coefficients_continuous_for_three_modalities_except_the_paper_jump_at_one():
    gen = torch.Generator().manual_seed(0)
    eps = 1e-7
    checked = 0
    for _ in range(300):
        s = (torch.rand(3, generator=gen) + 0.05).tolist()
        scores = dict(zip("abc", s, strict=True))
        k, rho = ogm_coefficients(scores, 0.8, "released")
        if min(abs(r - 1) for r in rho.values()) < 1e-3:
            continue  # the documented jump at rho = 1 (the paper's own rule at M = 2)
        checked += 1
        for m in "abc":
            bumped = {**scores, m: scores[m] + eps}
            k2, _ = ogm_coefficients(bumped, 0.8, "released")
            assert max(abs(k2[n] - k[n]) for n in k) < 1e-5
            assert k2 == pytest.approx(ogm_coefficients(bumped, 0.8)[0])
            q, _ = _q_released(scores)
            q2, _ = _q_released(bumped)
            assert max(abs(q2[n] - q[n]) for n in q) < 1e-5
    assert checked > 250
    # the released-OPM rule at M = 3 is the regulator's: two modalities above the mean both drop
    model = _model("concat", m=3)
    feats = {f"m{i}": torch.randn(30, 4) for i in range(3)}
    q, rho = md.OPM(variant="released").released_plan(model, feats, torch.arange(30) % 3)
    assert q == pytest.approx({m: opm_drop_probability(r, 0.5, 0.5) if r > 1 else 0.0
                               for m, r in rho.items()})
    # M = 2 reduction: exactly the two-modality rule
    k2, rho2 = ogm_coefficients({"a": 3.0, "v": 2.0}, 0.8, "released")
    assert k2 == pytest.approx({"a": 1 - math.tanh(0.8 * 1.5), "v": 1.0})


# ------------------------------------------------------------------ end to end
def test_released_variants_run_in_fit_and_refuse_film_there():
    data = md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.5, "b": 0.6},
                                 dims={"a": 8, "b": 8}, seed=0)
    model = md.models.default_model(data, feature_dim=6)
    reg = md.OGM(alpha=0.8, noise=True, variant="released")
    hist = md.fit(model, data.train.loader(40, shuffle=True), epochs=1, regulator=reg,
                  progress=False)
    assert set(hist[0]["regulator"]["coefficient"]) == {"a", "b"}
    opm = md.OPM(p_exe=1.0, variant="released", start_epoch=0)
    hist = md.fit(model, data.train.loader(40, shuffle=True), epochs=1, regulator=opm,
                  progress=False)
    q = hist[0]["regulator"]["q"]
    assert set(q) == {"a", "b"} and max(q.values()) > 0.1  # some batches were modulated
    torch.manual_seed(0)
    film = md.MultimodalClassifier({"a": nn.Linear(8, 6), "b": nn.Linear(8, 6)}, {"a": 6, "b": 6},
                                   3, fusion="film")
    for bad in (md.OGM(variant="released"), md.OPM(variant="released")):
        with pytest.raises(ValueError, match="film"):
            md.fit(film, data.train.loader(40), epochs=1, regulator=bad, progress=False)


def _opm_plan_for_scores(scores):
    """Drop probabilities of the paper form for given true-class probability sums (M = 3)."""
    reg = md.OPM()
    names = list(scores)

    class Uni:
        modalities = tuple(names)

        def unimodal_logits(self, features):
            return features

    labels = torch.zeros(1, dtype=torch.long)
    # logits whose softmax true-class probability is exactly s: [log s, log(1 - s)]
    feats = {m: torch.tensor([[math.log(s), math.log(1 - s)]]) for m, s in scores.items()}
    q, rho = reg.drop_probabilities(Uni(), feats, labels)
    return q, rho


def test_opm_paper_m3_leaders_are_continuous_and_m2_is_the_paper():
    q1, _ = _opm_plan_for_scores({"a": 0.60, "b": 0.59, "c": 0.10})
    q2, _ = _opm_plan_for_scores({"a": 0.59, "b": 0.60, "c": 0.10})
    assert q1["a"] == pytest.approx(0.657, abs=1e-3) and q1["b"] == pytest.approx(0.649, abs=1e-3)
    assert q1["c"] == 0.0
    # a 0.01 swap of the two leaders moves each q by < 0.01 (it used to jump 0.657 -> 0)
    assert abs(q1["a"] - q2["a"]) < 0.01 and abs(q1["b"] - q2["b"]) < 0.01
    # M = 2: only the dominant modality has q > 0, equal to the paper's formula
    q, rho = _opm_plan_for_scores({"a": 0.8, "b": 0.4})
    assert q["b"] == 0.0
    assert q["a"] == pytest.approx(md.regulators.opm_drop_probability(rho["a"], 0.5, 0.5), rel=1e-6)


# ==========================================================================================
# MMPareto, Re-learning and valuation re-sampling (GeWu-Lab repositories), released variants
# ==========================================================================================

# ================================================================ MMPareto
def _released_min_norm_weight(vecs_mm, vecs_u):
    """MinNormSolver._min_norm_element_from2 on two gradient lists (dot products summed over
    tensors); returns the weight of the first (multimodal) task."""
    v1v1 = sum(float((a * a).sum()) for a in vecs_mm)
    v1v2 = sum(float((a * b).sum()) for a, b in zip(vecs_mm, vecs_u, strict=True))
    v2v2 = sum(float((b * b).sum()) for b in vecs_u)
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def _released_mmpareto(model, x, y_mm, y, gamma=1.5, per_tensor=True):
    """Transcription of the released train step: one backward per loss (zeroing between), the
    weights per encoder from its concatenated gradients, then the magnitude factor per parameter
    tensor (``per_tensor=True``, released) or per encoder (the paper form, for comparison)."""
    mods = list(model.modalities)
    enc = {m: [p for p in model.encoders[m].parameters()] for m in mods}
    enc_ids = {id(p) for ps in enc.values() for p in ps}
    head = [p for p in model.parameters() if id(p) not in enc_ids]

    def losses():
        feats = {m: model.encoders[m](x[m]) for m in mods}
        out = {"both": F.cross_entropy(model.head(feats), y_mm)}
        for m in mods:  # shared head, every other modality absent (zero feature)
            alone = {k: (f if k == m else torch.zeros_like(f)) for k, f in feats.items()}
            out[m] = F.cross_entropy(model.head(alone), y)
        return out

    grads = {}
    for name in ["both", *mods]:
        model.zero_grad(set_to_none=True)
        losses()[name].backward()
        grads[name] = {id(p): (torch.zeros_like(p) if p.grad is None else p.grad.clone())
                       for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    total = {i: sum(grads[n][i] for n in grads) for i in grads["both"]}

    final = {}
    for m in mods:
        g_mm = [grads["both"][id(p)] for p in enc[m]]
        g_u = [grads[m][id(p)] for p in enc[m]]
        cat_mm, cat_u = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_u])
        if F.cosine_similarity(cat_mm, cat_u, dim=0) > 0:
            k = (0.5, 0.5)
        else:
            c = _released_min_norm_weight(g_mm, g_u)
            k = (c, 1 - c)
        if per_tensor:
            for p, a, b in zip(enc[m], g_mm, g_u, strict=True):
                three = total[id(p)].norm()
                new = 2 * k[0] * a + 2 * k[1] * b
                diff = three / new.norm()
                final[id(p)] = diff * new * gamma if diff > 1 else new * gamma
        else:
            three = torch.cat([total[id(p)].flatten() for p in enc[m]]).norm()
            new = [2 * k[0] * a + 2 * k[1] * b for a, b in zip(g_mm, g_u, strict=True)]
            diff = three / torch.cat([t.flatten() for t in new]).norm()
            for p, t in zip(enc[m], new, strict=True):
                final[id(p)] = diff * t * gamma if diff > 1 else t * gamma
    for p in head:
        final[id(p)] = total[id(p)]
    return {n: final[id(p)] for n, p in model.named_parameters()}


def _modaldiag_mmpareto(model, x, y_mm, y, **kw):
    model.zero_grad(set_to_none=True)
    reg = md.MMPareto(**kw)
    ctx = StepContext(model=model, epoch=0, step=0, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    ctx.compute_unimodal_logits()
    reg.on_after_forward(ctx)
    ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, y_mm)
    assert reg.backward(ctx)
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out, reg


@pytest.fixture(scope="module")
def conflict_case():
    """Fixed weights and batch where both encoders' multimodal and unimodal gradients conflict
    (the multimodal loss is taken against shifted labels), so the min-norm branch and the
    magnitude rescaling are both exercised."""
    model = make_model(2, "concat", seed=2).double()
    x = {m: v.double() for m, v in make_inputs(model, batch=12, seed=3).items()}
    y = (torch.arange(12) * 7 + 2) % 3
    return model, x, (y + 1) % 3, y


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_mmpareto_released_equals_transcription(conflict_case):
    model, x, y_mm, y = conflict_case
    ref = _released_mmpareto(copy.deepcopy(model), x, y_mm, y)
    # this transcription uses the shared head (the separate heads are tested at the file's end)
    got, reg = _modaldiag_mmpareto(model, x, y_mm, y, variant="released", unimodal_heads="shared")
    assert reg.rescale == "tensor" and reg.config()["variant"] == "released"
    logs = reg.collect_logs()
    assert all(c < 0 for c in logs["cosine"].values())  # the min-norm branch ran for both
    assert all(abs(w - 0.5) > 0.05 for w in logs["w_multimodal"].values())
    for n in ref:
        assert _rel_err(got[n], ref[n]) < 1e-9


def test_mmpareto_paper_equals_per_encoder_transcription(conflict_case):
    model, x, y_mm, y = conflict_case
    ref = _released_mmpareto(copy.deepcopy(model), x, y_mm, y, per_tensor=False)
    got, reg = _modaldiag_mmpareto(model, x, y_mm, y)  # default: paper
    assert reg.rescale == "encoder" and reg.variant == "paper"
    for n in ref:
        assert _rel_err(got[n], ref[n]) < 1e-9
    # explicit finer option with variant="paper" = released behaviour
    got_t, _ = _modaldiag_mmpareto(model, x, y_mm, y, rescale="tensor")
    ref_t = _released_mmpareto(copy.deepcopy(model), x, y_mm, y)
    for n in ref_t:
        assert _rel_err(got_t[n], ref_t[n]) < 1e-9


def test_mmpareto_paper_and_released_differ_per_tensor(conflict_case):
    """Same weights: the encoder gradients differ tensor by tensor (measured here: up to ~115 %
    of the paper gradient's norm on one tensor); head gradients are identical."""
    model, x, y_mm, y = conflict_case
    paper, _ = _modaldiag_mmpareto(model, x, y_mm, y, variant="paper")
    released, _ = _modaldiag_mmpareto(model, x, y_mm, y, variant="released", unimodal_heads="shared")
    enc = [n for n in paper if n.startswith("encoders.")]
    assert enc and len(enc) < len(paper)
    errs = [_rel_err(released[n], paper[n]) for n in enc]
    assert max(errs) > 0.5
    for n in paper:
        if n not in enc:  # the head: plain summed gradient in both forms
            torch.testing.assert_close(released[n], paper[n], rtol=0, atol=0)
    # with aligned gradients (cos > 0, weights 1/2) both forms give gamma * (g_mm + g_u)
    paper, _ = _modaldiag_mmpareto(model, x, y, y, variant="paper")
    released, _ = _modaldiag_mmpareto(model, x, y, y, variant="released", unimodal_heads="shared")
    for n in enc:
        assert _rel_err(released[n], paper[n]) < 1e-12


def test_mmpareto_variant_validation():
    with pytest.raises((ValueError, TypeError)):
        md.MMPareto(variant="code")
    with pytest.raises((ValueError, TypeError)):
        md.MMPareto(rescale="layer")
    assert md.MMPareto(variant="released", rescale="encoder").rescale == "encoder"


# ================================================================ Re-learning
def _released_reinit_epochs(H, R, epochs):
    """ours.py: after training 0-based epoch e, ``if e % H == 0 and e > 0: flag += 1; if flag <=
    R: re-initialise``."""
    out, flag = [], 0
    for epoch in range(epochs):
        if (epoch % H == 0) & (epoch > 0):
            flag += 1
            if flag <= R:
                out.append(epoch)
    return out


def _drive_relearning(reg, model, epochs, monkeypatch, gaps):
    fake = {m: SimpleNamespace(gap=g) for m, g in gaps.items()}
    monkeypatch.setattr(relearning_module, "separability", lambda *a, **k: fake)
    reg.remember_init(model)
    fired = []
    for epoch in range(epochs):
        before = reg.resets
        ctx = SimpleNamespace(model=model, epoch=epoch, train_loader=[], val_loader=[],
                              optimizer=None)
        reg.on_train_epoch_end(ctx)
        if reg.resets > before:
            fired.append(epoch)
    return fired


@pytest.mark.parametrize("H,R,epochs", [(20, 3, 80), (5, 2, 30), (1, 3, 6)])
def test_relearning_released_schedule_exact_epochs(H, R, epochs, monkeypatch):
    model = make_model(2, "concat")
    gaps = {"m0": 0.1, "m1": 0.0}
    rel = _drive_relearning(md.Relearning(every=H, max_resets=R, variant="released"), model,
                            epochs, monkeypatch, gaps)
    assert rel == _released_reinit_epochs(H, R, epochs)
    paper = _drive_relearning(md.Relearning(every=H, max_resets=R), model, epochs, monkeypatch,
                              gaps)
    assert paper == [H * k - 1 for k in range(1, R + 1)]
    if H == 20:
        assert rel == [20, 40, 60] and paper == [19, 39, 59]


def test_relearning_released_interpolates_like_the_code(monkeypatch):
    """At the released epoch, every encoder parameter becomes tanh(lam g) init + (1 - .) current."""
    model = make_model(2, "concat")
    reg = md.Relearning(lam=3.0, every=2, max_resets=1, variant="released")
    gaps = {"m0": 0.2, "m1": 0.05}
    fake = {m: SimpleNamespace(gap=g) for m, g in gaps.items()}
    monkeypatch.setattr(relearning_module, "separability", lambda *a, **k: fake)
    reg.remember_init(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    cur = {n: p.detach().clone() for n, p in model.named_parameters()}
    for epoch in range(2):  # epochs 0 and 1: nothing in the released schedule
        reg.on_train_epoch_end(SimpleNamespace(model=model, epoch=epoch, train_loader=[],
                                               val_loader=[], optimizer=None))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), cur[n])
    reg.on_train_epoch_end(SimpleNamespace(model=model, epoch=2, train_loader=[], val_loader=[],
                                           optimizer=None))
    for n, p in model.named_parameters():
        if n.startswith("encoders."):
            w = float(torch.tanh(torch.tensor(3.0 * gaps[n.split(".")[1]])))
            torch.testing.assert_close(p.detach(), w * init[n] + (1 - w) * cur[n])
        else:
            assert torch.equal(p.detach(), cur[n])
    assert reg.config()["schedule"] == "released" and reg.history[0]["epoch"] == 2


def test_relearning_released_in_fit(synth):
    model = md.models.default_model(synth, feature_dim=8)
    reg = md.Relearning(every=2, max_resets=2, variant="released")
    md.fit(model, synth.train.loader(64, shuffle=True), synth.val.loader(128), epochs=5,
           regulator=reg, progress=False)
    assert [h["epoch"] for h in reg.history] == [2, 4] == _released_reinit_epochs(2, 2, 5)


# ================================================================ valuation re-sampling
PHI = [0.75, 0.25, -0.25, 1.25, 0.5, 0.0, -0.5, 1.0, 1.5, 0.9, 0.8, 0.4, -0.1, -2.0]


def _paper_copies(phi):
    """2 (1 - phi) rounded as integers, halves up; none for phi >= 1."""
    return math.floor(2 * (1 - phi) + 0.5) if phi < 1 else 0


def _released_copies(phi):
    """dataloader.py AV_KS_Dataset_sample_level: the if/elif chain on the contribution."""
    if 0.4 < phi < 0.9:
        return 1
    elif -0.1 < phi < 0.4:
        return 2
    elif phi < -0.1:
        return 3
    return 0


def test_extra_copies_paper_rounds_halves_up():
    got = extra_copies(torch.tensor(PHI, dtype=torch.float64)[:, None]).flatten().tolist()
    assert got == [_paper_copies(p) for p in PHI]
    # the half boundaries, exactly: 0.75 -> 1 (torch.round would give 0), 0.25 -> 2, -0.25 -> 3
    assert got[:4] == [1, 2, 3, 0]
    assert extra_copies(torch.tensor([[0.75, 0.25]])).tolist() == [[1, 2]]  # float32 too


def test_extra_copies_released_bins():
    got = extra_copies(torch.tensor(PHI, dtype=torch.float64)[:, None], "bins").flatten().tolist()
    assert got == [_released_copies(p) for p in PHI]
    assert got == [1, 2, 3, 0, 1, 2, 3, 0, 0, 0, 1, 0, 0, 3]
    paper = [_paper_copies(p) for p in PHI]
    differ = [p for p, a, b in zip(PHI, paper, got, strict=True) if a != b]
    assert differ == [0.8, 0.4, -0.1, -2.0]  # paper 0/1/2/6 copies, released 1/0/0/3
    # float32 values compare in float32: 0.9f and 0.4f sit on the strict bounds
    assert extra_copies(torch.tensor([[0.9, 0.4, -0.1]]), "bins").tolist() == [[0, 0, 0]]


def _fake_values(phi_rows):
    table = torch.tensor(phi_rows, dtype=torch.float64)

    def value(model, dataset, indices, batch_size):
        return table[indices]
    return value


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_sample_level_plan_counts(synth, variant):
    model = md.models.default_model(synth, feature_dim=8)
    n = len(synth.train)
    rows = [[PHI[i % len(PHI)], PHI[(3 * i + 1) % len(PHI)]] for i in range(n)]
    reg = md.ValuationResampling("sample", warmup=0, variant=variant)
    reg._value = _fake_values(rows)
    entries, masks, _ = reg.plan(model, synth.train, 64, epoch=0)
    rule = _released_copies if variant == "released" else _paper_copies
    for j in range(2):
        expected = [rule(r[j]) for r in rows]
        only_j = masks[n:, j] & ~masks[n:, 1 - j]
        got = torch.bincount(entries[n:][only_j], minlength=n).tolist()
        assert got == expected
    assert len(entries) == n + sum(rule(r[0]) + rule(r[1]) for r in rows)


def test_modality_level_released_int_and_replacement(synth):
    """Constant phi (a: 0.5479, b: 1.3) makes the gaps independent of the draw; spread 0.7521,
    ratio * N = 210.588 for N = 420: the released int() gives 210 extra samples, the paper 211."""
    model = md.models.default_model(synth, feature_dim=8)
    n = len(synth.train)
    calls = {}

    def run(variant, subset, alpha):
        reg = md.ValuationResampling("modality", warmup=0, variant=variant, subset=subset,
                                     alpha=alpha)
        table = torch.tensor([[0.5479, 1.3]] * n, dtype=torch.float64)

        def value(model_, dataset, indices, batch_size):
            calls[variant] = indices.clone()
            return table[indices]
        reg._value = value
        entries, masks, _ = reg.plan(model, synth.train, 64, epoch=3)
        assert reg.collect_logs()["subset_size"] == (
            int(subset * n) if variant == "released" else math.floor(subset * n + 0.5))
        return reg, entries, masks

    alpha = 1.0
    gap_a, gap_b = 1.0 - 0.5479, 1.0 - 1.3
    released_ratio = abs(gap_a - gap_b) / 3 * 2 * alpha  # modality_level.py's order
    reg, entries, masks = run("released", 0.2512, alpha)  # |Z| = int(105.504) = 105
    assert len(entries) - n == int(released_ratio * n)
    assert bool(masks[n:, 0].all()) and not bool(masks[n:, 1].any())  # weakest = larger gap: a
    assert reg.last_counts == {"a": int(released_ratio * n), "b": 0}
    assert len(calls["released"]) < 105  # Z drawn with replacement: duplicates
    reg_p, entries_p, _ = run("paper", 0.2512, alpha)  # |Z| = 106
    assert len(entries_p) - n == math.floor(alpha * (2 / 3) * abs(gap_a - gap_b) * n + 0.5)
    assert len(calls["paper"]) == 106 and len(set(calls["paper"].tolist())) == 106
    assert n == 420 and (len(entries) - n, len(entries_p) - n) == (210, 211)


def test_valuation_variant_sets_finer_options():
    r = md.ValuationResampling(variant="released")
    assert (r.copies, r.draw) == ("bins", "released")
    assert r.config()["variant"] == "released"
    p = md.ValuationResampling()
    assert (p.copies, p.draw) == ("round", "paper")
    assert md.ValuationResampling(copies="bins").copies == "bins"
    with pytest.raises((ValueError, TypeError)):
        md.ValuationResampling(copies="floor")


# ================================================================ end to end through md.fit
def test_released_variants_train_through_fit(synth):
    n = len(synth.train)
    for reg, check in [
        (md.MMPareto(variant="released"),
         lambda logs: set(logs["w_multimodal"]) == {"a", "b"}),
        (md.ValuationResampling("modality", warmup=1, variant="released"),
         lambda logs: logs["subset_size"] == int(0.2 * n)
         and logs["extra_copies"][max(logs["gap"], key=logs["gap"].get)]
         == int(logs["ratio"] * n)),
        (md.ValuationResampling("sample", warmup=1, variant="released"),
         lambda logs: all(v >= 0 for v in logs["extra_copies"].values())),
    ]:
        model = md.models.default_model(synth, feature_dim=8)
        hist = md.fit(model, synth.train.loader(64, shuffle=True), epochs=2, regulator=reg,
                      progress=False)
        logs = hist[1]["regulator"]
        assert check(logs), (reg, logs)
        assert "variant='released'" in repr(reg)


# ================================================================ MMPareto: separate unimodal heads
def _fixed_heads(model, seed=4):
    """Fixed unimodal head weights (one linear classifier per modality), float64; with the
    conflict_case batch both encoders' cosines are < 0 (min-norm weights 0.994 and 0.945)."""
    g = torch.Generator().manual_seed(seed)
    return {m: {"weight": torch.randn(model.num_classes, d, generator=g, dtype=torch.float64),
                "bias": torch.randn(model.num_classes, generator=g, dtype=torch.float64)}
            for m, d in model.feature_dims.items()}


def _released_mmpareto_separate(model, heads, x, y_mm, y, gamma=1.5):
    """Transcription of the released train step with its separate unimodal heads: the model
    returns (out, out_a, out_v) with out_m = head_m(f_m); one backward per loss (zeroing between);
    encoder weights from the concatenated gradients, the factor per tensor; every parameter whose
    name holds 'head' (fusion head AND unimodal heads) keeps the gradient of the summed loss."""
    mods = list(model.modalities)
    lins = {}
    for m in mods:
        lin = nn.Linear(heads[m]["weight"].shape[1], heads[m]["weight"].shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(heads[m]["weight"])
            lin.bias.copy_(heads[m]["bias"])
        lins[m] = lin
    enc = {m: list(model.encoders[m].parameters()) for m in mods}
    enc_ids = {id(p) for ps in enc.values() for p in ps}
    named = dict(model.named_parameters())
    for m in mods:
        named[f"uni_head.{m}.weight"], named[f"uni_head.{m}.bias"] = lins[m].weight, lins[m].bias
    every = list(named.values())

    def forward():
        feats = {m: model.encoders[m](x[m]) for m in mods}
        out = {"both": F.cross_entropy(model.head(feats), y_mm)}
        for m in mods:
            out[m] = F.cross_entropy(lins[m](feats[m]), y)
        return out

    grads = {}
    for name in ["both", *mods]:
        for p in every:
            p.grad = None
        forward()[name].backward()
        grads[name] = {id(p): (torch.zeros_like(p) if p.grad is None else p.grad.clone())
                       for p in every}
    for p in every:
        p.grad = None
    forward_total = forward()
    sum(forward_total.values()).backward()  # loss = loss_mm + loss_a + loss_v; one backward
    total = {id(p): p.grad.clone() for p in every}
    final, weights = {}, {}
    for m in mods:
        g_mm = [grads["both"][id(p)] for p in enc[m]]
        g_u = [grads[m][id(p)] for p in enc[m]]
        cat_mm, cat_u = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_u])
        if F.cosine_similarity(cat_mm, cat_u, dim=0) > 0:
            k = (0.5, 0.5)
        else:
            c = _released_min_norm_weight(g_mm, g_u)
            k = (c, 1 - c)
        weights[m] = k[0]
        for p, a, b in zip(enc[m], g_mm, g_u, strict=True):
            three = total[id(p)].norm()
            new = 2 * k[0] * a + 2 * k[1] * b
            diff = three / new.norm()
            final[id(p)] = diff * new * gamma if diff > 1 else new * gamma
    for p in every:
        if id(p) not in enc_ids:
            final[id(p)] = total[id(p)]
    return {n: final[id(p)] for n, p in named.items()}, weights, grads


def _modaldiag_separate(model, heads, x, y_mm, y, **kw):
    """One MMPareto step (own backward) with the separate heads restored from fixed weights."""
    model.zero_grad(set_to_none=True)
    reg = md.MMPareto(**kw)
    if heads is not None:
        reg.load_state_dict({"unimodal_heads": copy.deepcopy(heads)})
    ctx = StepContext(model=model, epoch=0, step=0, inputs=x, labels=y)
    ctx.features = model.encode(x)
    ctx.logits = model.head(ctx.features)
    if reg.needs_unimodal_logits:
        ctx.compute_unimodal_logits()
    reg.on_after_forward(ctx)
    ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, y_mm)
    assert reg.backward(ctx)
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    for m, lin in (reg.heads or {}).items():
        out[f"uni_head.{m}.weight"], out[f"uni_head.{m}.bias"] = lin.weight.grad, lin.bias.grad
    model.zero_grad(set_to_none=True)
    return out, reg


def test_mmpareto_released_separate_heads_equal_transcription(conflict_case):
    model, x, y_mm, y = conflict_case
    heads = _fixed_heads(model)
    ref, ref_w, _ = _released_mmpareto_separate(copy.deepcopy(model), heads, x, y_mm, y)
    got, reg = _modaldiag_separate(model, heads, x, y_mm, y, variant="released")
    assert reg.unimodal_heads == "separate" and reg.rescale == "tensor"
    assert not reg.needs_unimodal_logits  # the shared head's unimodal logits are not computed
    logs = reg.collect_logs()
    assert all(c < 0 for c in logs["cosine"].values())  # the min-norm branch ran for both
    for m in model.modalities:
        assert logs["w_multimodal"][m] == pytest.approx(ref_w[m], abs=1e-12)
    assert set(got) == set(ref) and any(n.startswith("uni_head.") for n in ref)
    for n in ref:  # encoders, fusion head and unimodal heads
        assert _rel_err(got[n], ref[n]) < 1e-9, n


def test_mmpareto_fusion_head_gets_no_unimodal_gradient_with_separate_heads(conflict_case):
    model, x, y_mm, y = conflict_case
    head = [n for n, _ in model.named_parameters() if not n.startswith("encoders.")]
    loss_mm = F.cross_entropy(model(x), y_mm)
    only_mm = dict(zip(head, torch.autograd.grad(loss_mm, [dict(model.named_parameters())[n]
                                                           for n in head]), strict=True))
    sep, _ = _modaldiag_separate(model, _fixed_heads(model), x, y_mm, y, variant="released")
    shared, _ = _modaldiag_separate(model, None, x, y_mm, y, variant="released",
                                    unimodal_heads="shared")
    for n in head:
        torch.testing.assert_close(sep[n], only_mm[n], rtol=1e-12, atol=1e-14)
    # the shared head does receive the unimodal CE gradient: far from the multimodal one alone
    assert max(_rel_err(shared[n], only_mm[n]) for n in head) > 0.1
    # and the unimodal heads' gradient is exactly their unimodal CE gradient
    feats = {m: f.detach() for m, f in model.encode(x).items()}
    for m, t in _fixed_heads(model).items():
        w, b = t["weight"].requires_grad_(), t["bias"].requires_grad_()
        gw, gb = torch.autograd.grad(F.cross_entropy(F.linear(feats[m], w, b), y), [w, b])
        torch.testing.assert_close(sep[f"uni_head.{m}.weight"], gw, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sep[f"uni_head.{m}.bias"], gb, rtol=1e-12, atol=1e-14)


def test_mmpareto_unimodal_heads_option_validation_and_defaults():
    assert md.MMPareto().unimodal_heads == "shared"
    assert md.MMPareto(variant="released").unimodal_heads == "separate"
    assert md.MMPareto(variant="released", unimodal_heads="shared").unimodal_heads == "shared"
    assert md.MMPareto(unimodal_heads="separate").config()["unimodal_heads"] == "separate"
    for bad in ({"unimodal_heads": "own"}, {"seed": -1}, {"seed": 1.5}):
        with pytest.raises((ValueError, TypeError)):
            md.MMPareto(**bad)
    with pytest.raises(ValueError, match="unimodal_heads"):
        md.MMPareto().load_state_dict({"unimodal_heads": {"a": {"weight": torch.zeros(2, 3),
                                                                "bias": torch.zeros(2)}}})


def _pareto_run(model, reg, opt, loader, epochs, start=0, run=None):
    run = run or md.Regulation(model, opt, reg)
    for epoch in range(start, epochs):
        for inputs, labels in run.epoch_start(epoch, loader):
            opt.zero_grad(set_to_none=True)
            run.backward(inputs, labels)
            opt.step()
            run.batch_end()
        run.epoch_end()
    return run


def test_mmpareto_separate_heads_are_seeded_registered_saved_and_reset(synth):
    torch.manual_seed(0)
    model = md.models.default_model(synth, feature_dim=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    n_groups = len(opt.param_groups)
    reg = md.MMPareto(variant="released", seed=3)
    state_rng = torch.get_rng_state()
    run = md.Regulation(model, opt, reg)
    run.start()
    assert torch.equal(torch.get_rng_state(), state_rng)  # the global RNG is untouched
    assert len(opt.param_groups) == n_groups + 1
    group = opt.param_groups[-1]
    assert {k: v for k, v in group.items() if k not in ("params",)} == {
        **{k: v for k, v in opt.param_groups[0].items() if k != "params"},
        "modaldiag_mmpareto_unimodal_heads": True}
    assert [id(p) for p in group["params"]] == [id(p) for p in reg.owned_parameters()]
    for m, lin in reg.heads.items():
        assert lin.weight.shape == (model.num_classes, model.feature_dims[m])
        bound = 1 / math.sqrt(model.feature_dims[m])
        assert float(lin.weight.detach().abs().max()) <= bound
        assert float(lin.bias.detach().abs().max()) <= bound
    init = {m: lin.weight.detach().clone() for m, lin in reg.heads.items()}
    same = md.MMPareto(variant="released", seed=3)
    md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), same).start()
    other = md.MMPareto(variant="released", seed=4)
    md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), other).start()
    for m in init:
        assert torch.equal(same.heads[m].weight, init[m])
        assert not torch.equal(other.heads[m].weight, init[m])
    _pareto_run(model, reg, opt, synth.train.loader(64), 1, run=run)
    state = reg.state_dict()
    for m, lin in reg.heads.items():
        assert not torch.equal(lin.weight, init[m])  # trained through the optimizer
        assert torch.equal(state["unimodal_heads"][m]["weight"], lin.weight)
    # a fresh run on the same optimizer drops the old heads' group and creates new heads
    run2 = md.Regulation(model, opt, reg)
    run2.start()
    assert len(opt.param_groups) == n_groups + 1
    for m in init:
        assert torch.equal(reg.heads[m].weight, init[m])
    assert all(id(p) in {id(q) for q in opt.param_groups[-1]["params"]} for p in reg.owned_parameters())
    # shared heads own nothing and save nothing
    shared = md.MMPareto()
    md.Regulation(model, torch.optim.SGD(model.parameters(), lr=0.1), shared).start()
    assert shared.owned_parameters() == [] and shared.state_dict() == {}


def test_mmpareto_separate_heads_lazy_for_a_model_without_feature_dims(synth):
    torch.manual_seed(0)
    inner = md.models.default_model(synth, feature_dim=6)
    wrapped = md.wrap(inner, encoders=dict(inner.encoders), head=inner.head,
                      num_classes=inner.num_classes)
    assert not isinstance(getattr(wrapped, "feature_dims", None), dict)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    reg = md.MMPareto(variant="released")
    run = md.Regulation(wrapped, opt, reg)
    run.start()
    assert reg.heads is None and len(opt.param_groups) == 1
    _pareto_run(wrapped, reg, opt, synth.train.loader(64), 1, run=run)
    assert set(reg.heads) == set(inner.modalities) and len(opt.param_groups) == 2


def test_mmpareto_separate_heads_plain_loop_resume_is_bit_identical(synth):
    """4 epochs straight == 2 epochs, save (regulator, optimizer, model), restore into new
    objects (regulator first, then register_parameters, then the optimizer), 2 more epochs."""
    loader = synth.train.loader(64)

    def fresh():
        torch.manual_seed(0)
        model = md.models.default_model(synth, feature_dim=6)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), \
            md.MMPareto(variant="released")

    model, opt, reg = fresh()
    _pareto_run(model, reg, opt, loader, 4)
    ref = {**model.state_dict(), **{f"h.{k}": v for k, v in reg.state_dict()["unimodal_heads"]
                                    .items() for k, v in v.items()}}
    model, opt, reg = fresh()
    run = _pareto_run(model, reg, opt, loader, 2)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "run": run.state_dict()})
    assert len(saved["opt"]["param_groups"]) == 2
    model, opt, reg = fresh()
    run = md.Regulation(model, opt, reg)
    run.load_state_dict(saved["run"])
    reg.register_parameters(opt)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert opt.state[reg.owned_parameters()[0]]["momentum_buffer"].abs().sum() > 0
    _pareto_run(model, reg, opt, loader, 4, start=2, run=run)
    got = {**model.state_dict(), **{f"h.{k}": v for k, v in reg.state_dict()["unimodal_heads"]
                                    .items() for k, v in v.items()}}
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_mmpareto_separate_heads_fit_resume_is_bit_identical(synth, tmp_path):
    def fit(epochs, ck, resume=False):
        torch.manual_seed(0)
        model = md.models.default_model(synth, feature_dim=6)
        reg = md.MMPareto(variant="released")
        md.fit(model, synth.train.loader(64), epochs=epochs, regulator=reg, monitor=False,
               progress=False, seed=0, checkpoint_dir=ck, resume=resume, restore_best=False)
        return {**model.state_dict(), **{f"h.{k}": v for k, v in reg.state_dict()
                                         ["unimodal_heads"].items() for k, v in v.items()}}

    ref = fit(4, tmp_path / "straight")
    fit(2, tmp_path / "cut")
    got = fit(4, tmp_path / "cut", resume=True)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_mmpareto_separate_heads_refused_by_the_lightning_path(conflict_case):
    model, x, y_mm, y = conflict_case
    reg = md.MMPareto(variant="released")
    ctx = StepContext(model=model, epoch=0, step=0, inputs=x, labels=y)
    with pytest.raises(ValueError, match=r"unimodal_heads='separate'.*Lightning.*'shared'"):
        reg.defer_gradients(ctx)


def test_mmpareto_separate_heads_refused_by_the_lightning_callback(synth):
    pl = pytest.importorskip("lightning.pytorch")
    from modaldiag.integrations.lightning import ModalDiagCallback, ModalDiagModule

    lit = ModalDiagModule(md.models.default_model(synth, feature_dim=8), lr=0.05, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"unimodal_heads='separate'.*'shared'.*md\.fit"):
        cb = ModalDiagCallback(md.MMPareto(variant="released"), monitor=False)
        pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(lit, synth.train.loader(64))
    # the paper form (shared head) still trains there
    cb = ModalDiagCallback(md.MMPareto(variant="released", unimodal_heads="shared"), monitor=False)
    pl.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", devices=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(lit, synth.train.loader(64))
    assert "w_multimodal" in cb.logs[-1]["regulator"]


_PARETO_DDP_WORKER = '''
import sys
import torch
import torch.distributed as dist
import modaldiag as md

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
d = md.datasets.synthetic(n_samples=240, num_classes=3, strength={"a": 2.0, "b": 0.6},
                          dims={"a": 8, "b": 8}, seed=0)
torch.manual_seed(rank)  # different initial model weights per rank: DDP broadcasts rank 0's
model = md.models.default_model(d, feature_dim=6)
reg = md.MMPareto(variant="released")
seen = {"init": None, "digest": []}

class Grab(md.training.Callback):
    def on_train_batch_start(self, ctx):
        if seen["init"] is None:
            seen["init"] = {m: lin.weight.detach().clone() for m, lin in reg.heads.items()}
        seen["digest"].append(float(ctx.inputs["a"].double().sum()))

hist = md.fit(model, d.train, epochs=2, regulator=reg, batch_size=32, seed=0, progress=False,
              restore_best=False, callbacks=[Grab()])
torch.save({"model": model.state_dict(), "heads": reg.state_dict()["unimodal_heads"],
            "init": seen["init"], "digest": seen["digest"], "n": hist[-1]["train"]["n"]},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.destroy_process_group()
'''


def test_mmpareto_separate_heads_identical_on_ddp_ranks(tmp_path):
    """Two gloo CPU ranks on different shards: the heads start identical (seeded generator)
    and end identical (their gradients are averaged with the rest), like the model."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not installed")
    script = tmp_path / "worker.py"
    script.write_text(_PARETO_DDP_WORKER)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [exe, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    if proc.returncode != 0 and any(t in proc.stderr for t in ("EADDRINUSE", "Address already in use",
                                                              "RendezvousConnectionError",
                                                              "DistNetworkError")):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["digest"] != b["digest"] and a["n"] == b["n"] > 0  # the ranks saw different data
    for m in a["init"]:
        assert torch.equal(a["init"][m], b["init"][m])
        assert not torch.equal(a["heads"][m]["weight"], a["init"][m])  # the heads trained
        for k in ("weight", "bias"):
            assert float((a["heads"][m][k] - b["heads"][m][k]).abs().max()) < 1e-6, (m, k)
    for k in a["model"]:
        assert float((a["model"][k].double() - b["model"][k].double()).abs().max()) < 1e-6, k
