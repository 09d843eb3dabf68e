"""P1: Fisher-information trace per modality (InfoReg, CVPR 2025, Sec. 3.2).

Three forms:

- ``per_sample`` (default, the paper): ``Tr F_m = mean_i || grad_{theta_m} CE(x_i, y_i) ||^2``,
  exact for any encoder. The engine is chosen per model (``engine="auto"``): per-layer hooks
  (one backward per batch) where they are exact, else ``torch.func`` vmap, else a loop of
  per-sample backward passes (see :mod:`modaldiag.probes._persample`). The result says which
  engine ran and why (:class:`FisherTrace`);
- ``batch``: the mean over batches of the squared norm of the mini-batch gradient (what the online
  monitor, :class:`modaldiag.training.FisherMonitor`, accumulates during training at almost no
  cost); it underestimates the per-sample form by about the gradient-noise term;
- ``code``: the released code's form: per Conv/Linear *weight* the element-mean of the squared
  batch gradient, summed over layers (every layer weighs equally), averaged over batches.

``theta_m`` are the trainable parameters reachable from ``model.encoders[m]``: a parameter shared
by two modalities' encoders counts, with its whole gradient, for both; a parameter of the head
alone never counts. Parameters whose gradient is None are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.distributed import all_reduce_sum
from ..utils.progress import length_or_none, progress_bar
from ..utils.torch_utils import preserved_state
from ..utils.validation import BOOL, POSITIVE_INT, InstanceOf, Options, validate_params
from ._common import contract_model, iterate_batches, present_of
from ._persample import (
    UnsupportedByHooks,
    hook_sq_norms,
    hooks_blocker,
    loop_sq_norms,
    masked_logits,
    vmap_sq_norms,
)

__all__ = ["FisherTrace", "grad_sq_norms", "encoder_grad_sq_norms", "fisher_trace",
           "FISHER_FORMS", "FISHER_ENGINES"]

FISHER_FORMS = ("per_sample", "batch", "code")
FISHER_ENGINES = ("auto", "hooks", "vmap", "loop")

_parameter_constraints = {
    "per_sample": [BOOL],
    "form": [Options(*FISHER_FORMS), None],
    "chunk_size": [POSITIVE_INT],
    "engine": [Options(*FISHER_ENGINES)],
    "device": [None, InstanceOf(str, torch.device, what="a device such as 'cpu' or 'cuda:0'")],
    "progress": [BOOL],
}


class FisherTrace(dict):
    """``{m: Tr F_m}`` (a plain ``dict[str, float]`` to every caller) plus how it was computed.

    Attributes
    ----------
    form : str
        ``"per_sample"``, ``"batch"`` or ``"code"``.
    engine : str or None
        Per-sample form: the engine that computed it, ``"hooks"``, ``"vmap"`` or ``"loop"``
        (``"hooks+vmap"`` etc. if a later batch needed a fallback); None for the other forms.
    reason : str or None
        Why a faster engine was not used (names the module and the cause), else None.
    n_samples : int
        Samples (per-sample form) or batches (other forms) averaged over, summed over DDP ranks.
    """

    def __init__(self, values: Mapping[str, float] = (), *, form: str = "per_sample",
                 engine: str | None = None, reason: str | None = None, n_samples: int = 0):
        super().__init__(values)
        self.form, self.engine, self.reason, self.n_samples = form, engine, reason, n_samples

    def __reduce__(self):
        return (type(self), (dict(self),), self.__dict__)

    def __repr__(self) -> str:
        return f"FisherTrace({dict.__repr__(self)}, form={self.form!r}, engine={self.engine!r})"


@torch.no_grad()
def encoder_grad_sq_norms(model) -> dict[str, torch.Tensor | None]:
    """``{m: sum over encoder m's parameters of ||p.grad||^2}`` as 0-dim float tensors (no host
    sync), None where no parameter of m has a gradient. Shared parameters count for each owner."""
    out: dict[str, torch.Tensor | None] = {}
    for m in model.modalities:
        grads = [p.grad for p in model.encoders[m].parameters() if p.grad is not None]
        out[m] = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() if grads else None
    return out


def grad_sq_norms(model) -> dict[str, float]:
    """``{m: sum over encoder m's parameters of ||grad||^2}``; parameters without grad are skipped."""
    return {m: float(v) if v is not None else 0.0 for m, v in encoder_grad_sq_norms(model).items()}


def _code_compat_layers(encoder: nn.Module) -> list[nn.Parameter]:
    """Weights of the Conv/Linear layers of ``encoder`` (the released code's selection)."""
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and mod.weight.requires_grad]


class _PerSample:
    """Runs the requested per-sample engine; in ``auto`` falls back hooks -> vmap -> loop."""

    def __init__(self, net, engine: str, chunk_size: int):
        self.net, self.requested, self.chunk_size = net, engine, chunk_size
        self.used: list[str] = []
        self.reason: str | None = None
        self.current = engine
        if engine == "auto":
            self.reason = hooks_blocker(net)
            self.current = "hooks" if self.reason is None else "vmap"

    def _note(self, reason: str) -> None:
        self.reason = reason if self.reason is None else f"{self.reason}; {reason}"

    def __call__(self, inputs, labels, present=None) -> dict[str, torch.Tensor]:
        if self.current == "hooks":
            try:
                return self._done("hooks", hook_sq_norms(self.net, inputs, labels, present))
            except UnsupportedByHooks as exc:
                if self.requested == "hooks":
                    raise ValueError(
                        f"engine='hooks' cannot compute exact per-sample gradients for this model: "
                        f"{exc.reason}. Use engine='auto' (the default), which falls back to "
                        "torch.func vmap or a per-sample loop.") from None
                self._note(exc.reason)
                self.current = "vmap"
        if self.current == "vmap":
            try:
                with preserved_state(self.net):
                    return self._done("vmap", vmap_sq_norms(self.net, inputs, labels,
                                                            self.chunk_size, present))
            except Exception as exc:  # noqa: BLE001 - any vmap limitation; the loop is exact
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                if self.requested == "vmap":
                    raise ValueError(
                        f"engine='vmap' could not run this model under torch.func.vmap "
                        f"({type(exc).__name__}: {first}). Use engine='auto' or engine='loop'."
                    ) from exc
                self._note(f"torch.func vmap cannot run the model ({type(exc).__name__}: {first})")
                self.current = "loop"
        return self._done("loop", loop_sq_norms(self.net, inputs, labels, present))

    def _done(self, engine: str, sq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if engine not in self.used:
            self.used.append(engine)
        return sq


def fisher_trace(
    model,
    loader: Iterable,
    per_sample: bool = True,
    *,
    form: str | None = None,
    chunk_size: int = 64,
    engine: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> FisherTrace:
    """Fisher-information trace ``Tr F_m`` of every modality's encoder over ``loader``.

    The model runs in eval mode (BatchNorm uses running statistics, dropout off) and is left
    exactly as found: every submodule's mode, ``requires_grad``, ``.grad``, buffers and the
    global RNG state are restored.

    Parameters
    ----------
    model : MultimodalModel
        A modaldiag model (``md.MultimodalClassifier`` or ``md.wrap(...)``), DDP-wrapped or not.
    loader : iterable of ``(inputs: dict[str, Tensor (B, ...)], labels: LongTensor (B,))``
        or ``(inputs, labels, present)``: a sample contributes exactly 0 to ``Tr F_m`` where m is
        absent (its feature is the baseline); the mean is over all samples.
    per_sample : bool, default True
        True: the paper's per-sample form; False: the mini-batch ("batch") form.
    form : {"per_sample", "batch", "code"}, optional
        Overrides ``per_sample``; ``"code"`` is the released code's per-layer-mean form.
    chunk_size : int, default 64
        Samples per vectorised per-sample gradient call of the vmap engine (bounds memory).
    engine : {"auto", "hooks", "vmap", "loop"}, default "auto"
        How per-sample norms are computed. ``hooks``: from layer inputs and output gradients,
        one backward per batch; exact for Linear/Conv1d/Conv2d/eval-BatchNorm encoders whose
        layers each run once on one row per sample, and refused (ValueError naming the module
        and the cause) otherwise. ``vmap``: ``torch.func`` per-sample gradients, any functional
        encoder. ``loop``: one backward per sample, any model. ``auto`` uses hooks where they are
        exact, else vmap, else the loop; the result's ``engine`` and ``reason`` say which and why.
    device : str or torch.device, optional
        Where batches are moved (default: the model's device).
    progress : bool, default False
        Show a bar over batches (one plain line when stderr is not a terminal; see
        :func:`modaldiag.utils.progress.progress_bar`).

    Returns
    -------
    FisherTrace
        A ``dict[str, float]`` ``{m: Tr F_m}`` in the order of ``model.modalities``, with
        attributes ``form``, ``engine``, ``reason`` and ``n_samples``.
    """
    validate_params(_parameter_constraints,
                    {"per_sample": per_sample, "form": form, "chunk_size": chunk_size,
                     "engine": engine, "device": device, "progress": progress}, "fisher_trace")
    net = contract_model(model)
    form = form or ("per_sample" if per_sample else "batch")
    totals = {m: 0.0 for m in net.modalities}
    count = 0
    runner = None
    with preserved_state(net):
        net.eval()
        if form == "per_sample":
            runner = _PerSample(net, engine, chunk_size)
        batches = progress_bar(iterate_batches(net, loader, device), enabled=progress,
                               desc=f"fisher ({form})", total=length_or_none(loader))
        for inputs, labels in batches:
            if runner is not None:
                sq = runner(inputs, labels, present_of(inputs))
                for m in net.modalities:
                    totals[m] += float(sq[m].sum())
                count += labels.shape[0]
            else:
                _batch_sq_norms(net, inputs, labels, form, totals, present_of(inputs))
                count += 1
    # sum over DDP ranks: the trace of the union of every rank's data
    reduced = all_reduce_sum(torch.tensor([totals[m] for m in net.modalities] + [float(count)],
                                          dtype=torch.float64))
    return FisherTrace({m: float(reduced[i] / reduced[-1]) for i, m in enumerate(net.modalities)},
                       form=form, engine="+".join(runner.used) if runner else None,
                       reason=runner.reason if runner else None, n_samples=int(reduced[-1]))


def _batch_sq_norms(net, inputs, labels, form, totals, present=None) -> None:
    params = {m: (_code_compat_layers(net.encoders[m]) if form == "code"
                  else [p for p in net.encoders[m].parameters() if p.requires_grad])
              for m in net.modalities}
    flat = [p for m in net.modalities for p in params[m]]
    with torch.enable_grad():
        loss = F.cross_entropy(masked_logits(net, inputs, present), labels)
        if not flat or not loss.requires_grad:
            return
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    i = 0
    for m in net.modalities:
        for _ in params[m]:
            g = grads[i]
            i += 1
            if g is None:
                continue
            g = g.detach().float().pow(2)
            totals[m] += float(g.mean() if form == "code" else g.sum())

