"""From a diagnosis' evidence to the methods worth trying, with the reason.

Only an ``"imbalanced"`` verdict recommends anything: from balanced or inconclusive evidence the
list is empty. With ``d`` the dominant and ``w`` the weakest modality:

=====================================  ===========================================  =====================================
evidence                               reading                                      methods
=====================================  ===========================================  =====================================
linear probe of ``w`` (fit on D,       starvation at the head: the encoder knows,   MMPareto, valuation re-sampling,
scored on V) exceeds its unimodal      the head ignores it                          InfoReg
accuracy through the head by
>= ``HEAD_GAP`` (0.10)
under-optimisation gap of ``w``        the encoder itself is under-trained: slow    InfoReg, OGM-GE, OPM
>= ``UNDER_GAP`` (0.02), or its        the dominant modality early
linear probe trails ``d``'s by
>= ``KNOWLEDGE_GAP`` (0.10)
purity of ``d`` on D exceeds V         the dominant encoder over-fits               Re-learning
by >= ``OVERFIT_GAP`` (0.10)
the prime learning window of ``d``     the imbalance was set early: a remedy must   InfoReg, OGM-GE
(``history=``) closed within the       act from the first epochs (InfoReg
first ``WINDOW_EARLY`` (1/3) of        regulates inside the window)
training
the window of ``d`` is still open at   training may be too short for the picture   InfoReg
the last epoch                         to settle; InfoReg acts while it is open
none of the above (no held-out         the cause (head or encoder) is unknown:      OGM-GE, InfoReg
linear probe)                          the generic remedy slows ``d``
=====================================  ===========================================  =====================================
"""

from __future__ import annotations

__all__ = ["recommend", "METHOD_PAGES", "HEAD_GAP", "UNDER_GAP", "KNOWLEDGE_GAP", "OVERFIT_GAP",
           "WINDOW_EARLY"]

#: method name -> documentation page (relative to the repository root)
METHOD_PAGES = {
    "InfoReg": "docs/methods/inforeg.md",
    "OGM-GE": "docs/methods/ogm.md",
    "OPM": "docs/methods/opm.md",
    "MMPareto": "docs/methods/mmpareto.md",
    "Re-learning": "docs/methods/relearning.md",
    "Valuation re-sampling": "docs/methods/valuation.md",
}
#: linear probe of the weakest minus its unimodal accuracy through the head: starvation at the head
HEAD_GAP = 0.10
#: under-optimisation gap (alone - joint) of the weakest encoder: under-trained encoder
UNDER_GAP = 0.02
#: linear probe of the dominant minus the weakest: the weakest encoder knows less
KNOWLEDGE_GAP = 0.10
#: train minus val k-means purity of the dominant encoder: over-fitting
OVERFIT_GAP = 0.10
#: the dominant's prime learning window closed within this fraction of the training epochs
WINDOW_EARLY = 1 / 3


def _add(out: list[dict], methods, why: str) -> None:
    for method in methods:
        if all(r["method"] != method for r in out):
            out.append({"method": method, "why": why, "page": METHOD_PAGES[method]})


def recommend(verdict: str, dominant: str | None, weakest: str | None, *,
              unimodal_accuracy: dict[str, float], split: str, separability=None,
              under_optimisation: dict | None = None, window: dict | None = None) -> list[dict]:
    """Methods for an imbalanced model, each with ``{"method", "why", "page"}``.

    Parameters
    ----------
    verdict : str
        ``Diagnosis.verdict``; anything but ``"imbalanced"`` returns ``[]``.
    dominant, weakest : str or None
    unimodal_accuracy : dict[str, float]
        Unimodal accuracy through the joint head on ``split``.
    split : str
        The split the verdict was measured on (named in the reasons).
    separability : dict[str, Separability], optional
        Linear probe and purities (with their ``train_split`` / ``val_split``).
    under_optimisation : dict, optional
        ``{m: {"joint", "alone", "gap"}}``.
    window : dict, optional
        ``{m: {"open_epochs", "closed_at", "epochs"}}`` from the training History's prime
        learning window (``diagnose(history=...)``).
    """
    if verdict != "imbalanced" or dominant is None or weakest is None:
        return []
    d, w = dominant, weakest
    out: list[dict] = []
    lp = {m: s.linear_probe for m, s in (separability or {}).items()}
    if lp.get(w) is not None:
        s = separability[w]
        where = f"fit on {s.train_split}, scored on {s.val_split}"
        if lp[w] - unimodal_accuracy[w] >= HEAD_GAP:
            _add(out, ["MMPareto", "Valuation re-sampling", "InfoReg"],
                 f"starvation at the head: a linear probe on {w!r}'s frozen features reaches "
                 f"{lp[w]:.3f} ({where}) but the joint head alone on {w!r} only "
                 f"{unimodal_accuracy[w]:.3f} ({split}); train {w!r} through the head.")
        if lp.get(d) is not None and lp[d] - lp[w] >= KNOWLEDGE_GAP:
            _add(out, ["InfoReg", "OGM-GE", "OPM"],
                 f"the {w!r} encoder itself knows less: linear probe {lp[w]:.3f} vs {lp[d]:.3f} "
                 f"for {d!r} ({where}); slow {d!r} early (InfoReg acts in the prime learning "
                 f"window) so that the encoder of {w!r} learns.")
    if under_optimisation and under_optimisation.get(w, {}).get("gap", 0.0) >= UNDER_GAP:
        u = under_optimisation[w]
        _add(out, ["InfoReg", "OGM-GE", "OPM"],
             f"the {w!r} encoder is under-trained by joint training: linear probe {u['joint']:.3f} "
             f"vs {u['alone']:.3f} when trained alone (gap {u['gap']:+.3f}); slow {d!r} early.")
    if separability and d in separability:
        s = separability[d]
        if s.train_purity - s.val_purity >= OVERFIT_GAP:
            _add(out, ["Re-learning"],
                 f"the dominant {d!r} encoder over-fits: k-means purity {s.train_purity:.3f} on "
                 f"{s.train_split} vs {s.val_purity:.3f} on {s.val_split}; re-initialise it "
                 "softly (Re-learning).")
    win = (window or {}).get(d)
    if win and win["open_epochs"]:
        closed, total = win["closed_at"], win["epochs"]
        if closed is not None and closed <= WINDOW_EARLY * total:
            _add(out, ["InfoReg", "OGM-GE"],
                 f"{d!r}'s prime learning window (training History, paper rule) closed at epoch "
                 f"{closed} of {total}: the imbalance was set in the first epochs, so a remedy "
                 f"must act from epoch 0 (InfoReg regulates inside the window).")
        elif closed is None and win["open_epochs"][-1] == total - 1:
            _add(out, ["InfoReg"],
                 f"{d!r}'s prime learning window is still open at the last of {total} training "
                 "epochs: training may be too short for the imbalance to settle; InfoReg "
                 "regulates while the window is open.")
    if not out:
        why = (f"{d!r} leads {w!r} in what the fused model uses ({split}); "
               + ("the encoders' held-out evidence points to no specific cause, so "
                  if separability else
                  "without a held-out linear probe (pass val_loader) the cause, head or encoder, "
                  "is unknown; ")
               + f"the generic remedy slows {d!r} down.")
        _add(out, ["OGM-GE", "InfoReg"], why)
    return out
