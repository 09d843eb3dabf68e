"""Joint training cost and result on the embedded datasets (the reference loop's baseline), md.fit
beside a plain PyTorch loop, and the time to diagnose hapt."""

from __future__ import annotations

import copy
import inspect
import time

import torch
import torch.nn.functional as F

import modaldiag as md
from modaldiag.utils.torch_utils import seed_everything

from .common import Table

#: md.fit over a plain loop doing the same work must stay at or under this ratio
FIT_TARGET = 1.1
#: md.diagnose on hapt (the CLI's call: verdict on the test split) must stay at or under this
DIAGNOSE_TARGET_S = 20.0


def _setup(name: str):
    data = md.datasets.load(name)
    torch.manual_seed(0)
    return data, md.models.default_model(data)


def plain_loop(model, train, val, epochs: int, seed: int = 0, unimodal: bool = False) -> float:
    """The loop a user would write: SGD (lr 0.01, momentum 0.9, weight decay 1e-4, md.fit's
    default), cross-entropy, per-epoch validation accuracy (``val`` None: none) and a copy of the
    best weights; validation leaves the global RNG as found, as md.fit's does, so both loops
    shuffle alike. ``unimodal=True``: validation also computes every modality's accuracy through
    the head (the others at their zero baseline) with its mean true-class probability and
    cross-entropy, and the fused loss: the information md.fit records each epoch.
    Returns the final epoch's mean training loss."""
    seed_everything(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    best, best_state, mean_loss = -1.0, None, float("nan")
    for _ in range(epochs):
        model.train()
        total, n = torch.zeros(()), 0
        for inputs, labels in train:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            opt.step()
            total += loss.detach() * labels.shape[0]
            n += labels.shape[0]
        mean_loss = float(total) / n
        if val is None:
            continue
        model.eval()
        correct, seen = 0, 0
        rng = torch.get_rng_state()  # iterating a DataLoader draws a seed: keep the shuffles
        with torch.no_grad():
            for inputs, labels in val:
                if unimodal:  # what md.fit records: loss, accuracy; per modality acc, p(y), CE
                    feats = model.encode(inputs)
                    logits = model.head(feats)
                    _ = float(F.cross_entropy(logits, labels, reduction="sum"))
                    correct += int((logits.argmax(1) == labels).sum())
                    for m in model.modalities:
                        logp = F.log_softmax(model.head(feats, present=(m,)), 1)
                        true = logp.gather(1, labels[:, None])
                        _ = (int((logp.argmax(1) == labels).sum()), float(true.exp().sum()),
                             float(-true.sum()))
                else:
                    correct += int((model(inputs).argmax(1) == labels).sum())
                seen += labels.shape[0]
        torch.set_rng_state(rng)
        if correct / seen > best:
            best, best_state = correct / seen, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return mean_loss


def fit_vs_plain(name: str, epochs: int, repeat: int, unimodal: bool = False) -> list:
    """``[dataset, epochs, plain s, md.fit s, ratio, target, same weights]`` in CPU seconds of
    this process (robust to other jobs on the machine; run with one thread): the fastest of
    ``repeat`` alternating runs (plain, then md.fit, so both see the same machine load) after one
    untimed warm-up epoch of each (torch's first calls are slow)."""
    data, warm = _setup(name)
    plain_loop(warm, *data.loaders(64)[:2], 1)
    md.fit(_setup(name)[1], *data.loaders(64)[:2], epochs=1, monitor=False, progress=False)
    plain_s, fit_s = [], []
    for _ in range(repeat):
        data, a = _setup(name)
        train, val, _ = data.loaders(64)
        t0 = time.process_time()
        plain_loop(a, train, val, epochs, unimodal=unimodal)
        plain_s.append(time.process_time() - t0)
        _, b = _setup(name)
        t0 = time.process_time()
        md.fit(b, train, val, epochs=epochs, monitor=False, progress=False, seed=0)
        fit_s.append(time.process_time() - t0)
    diff = max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(),
                                                           b.state_dict().values(), strict=True)
               if p.is_floating_point())
    plain, fit = min(plain_s), min(fit_s)
    return [name, epochs, plain, fit, f"{fit / plain:.2f}x", f"<= {FIT_TARGET}x",
            "yes" if diff <= 1e-5 else f"no (max |diff| {diff:.2g})"]


def diagnose_call(model, data, **kwargs):
    """``md.diagnose`` as ``modaldiag diagnose --run`` calls it: the verdict on the test split,
    separability and the linear probe from the training split against validation."""
    extra = {"progress": False, **kwargs}
    if "train_loader" in inspect.signature(md.diagnose).parameters:
        extra["train_loader"] = data.train.loader(512)
        return md.diagnose(model, data.test.loader(512), data.val.loader(512), **extra)
    return md.diagnose(model, data.train.loader(512), data.val.loader(512), **extra)


def time_to_answer(quick: bool) -> Table:
    table = Table(
        "Time to answer: md.fit beside a plain PyTorch loop (same model, data, seed; monitor "
        "off), and md.diagnose on hapt",
        ["what", "dataset", "epochs", "plain loop s", "modaldiag s", "ratio", "target",
         "same weights"],
        note=("md.fit vs plain loop: CPU seconds of the process with one torch thread (robust to "
              "other jobs on the machine). Plain loop: SGD, cross-entropy, per-epoch validation "
              "accuracy, best weights kept (second row per dataset: its validation also computes "
              "the fused loss and each modality's accuracy, true-class probability and "
              "cross-entropy through the head, the information md.fit records every epoch); "
              "md.fit also checks every batch (names, shapes, labels, NaN) and keeps a History. "
              "Fastest of "
              "alternating runs after a warm-up. 'same weights': both end with the same "
              "parameters (|diff| <= 1e-5). diagnose: wall seconds after joint training, the "
              "CLI's call (verdict on the test split), all probes, per-sample Fisher trace."),
    )
    repeat = 2 if quick else 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU seconds of one thread: no spin-waiting thread pool in them
    try:
        for name, epochs in (("mfeat-fou-pix", 5 if quick else 20), ("hapt", 1 if quick else 2)):
            for unimodal, what in ((False, "plain loop validating fused accuracy"),
                                   (True, "plain loop validating what md.fit records")):
                row = fit_vs_plain(name, epochs, repeat, unimodal=unimodal)
                table.rows.append([f"md.fit vs {what} (CPU s, 1 thread)", *row[:2], row[2],
                                   row[3], row[4], row[5], row[6]])
    finally:
        torch.set_num_threads(threads)
    data, model = _setup("hapt")
    train, val, _ = data.loaders(64)
    epochs = 2 if quick else 10
    md.fit(model, train, val, epochs=epochs, progress=False, seed=0)
    t0 = time.perf_counter()
    diagnose_call(model, data)
    took = time.perf_counter() - t0
    table.rows.append([f"md.diagnose (wall s, {threads} thread{'s' if threads > 1 else ''})",
                       "hapt", epochs, "—", took,
                       "—", f"<= {DIAGNOSE_TARGET_S:g} s", "—"])
    return table


def run(quick: bool = False) -> list[Table]:
    table = Table(
        "Joint training with md.fit (concat head, default encoders, seed 0)",
        ["dataset", "M", "epochs", "s/epoch", "fused test acc", "unimodal test acc (joint head)"],
        note="Time per epoch includes the per-epoch validation pass and the online Fisher monitor.",
    )
    cases = [("synthetic", 5 if quick else 20), ("mfeat-fou-pix", 5 if quick else 20),
             ("mfeat", 5 if quick else 20), ("hapt", 2 if quick else 10)]
    for name, epochs in cases:
        data = (md.datasets.synthetic(n_samples=2000, strength={"a": 2.0, "b": 0.5})
                if name == "synthetic" else md.datasets.load(name))
        torch.manual_seed(0)
        model = md.models.default_model(data)
        train, val, test = data.loaders(64)
        t0 = time.perf_counter()
        md.fit(model, train, val, epochs=epochs, progress=False, seed=0)
        per_epoch = (time.perf_counter() - t0) / epochs
        ev = md.probes.evaluate(model, test)
        uni = ", ".join(f"{m} {s.accuracy:.3f}" for m, s in ev.unimodal.items())
        table.rows.append([name, len(data.modalities), epochs, per_epoch, ev.accuracy, uni])
    return [table, time_to_answer(quick)]
