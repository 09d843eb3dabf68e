"""R16: UMT and UME (Du et al., ICML 2023) — uni-modal teachers and the uni-modal ensemble.

Both start from one unimodal model per modality. Here a unimodal model for modality m is a deep
copy of the model's encoder ``E_m`` (as it is at the start of the run) plus a fresh linear head
``nn.Linear(d_m, C)`` (initialised from a ``torch.Generator`` seeded with ``seed``, never from the
global RNG), trained on ``CE(head(E_m(x_m)), y)`` for ``teacher_epochs`` epochs of the training
loader with its own SGD (:func:`train_unimodal_models`). The live model, its modes and buffers, the
python / numpy / torch RNG streams and the training loader's shuffling generator (and a
DistributedSampler's epoch) end that training exactly as they began.

**UMT** (uni-modal teachers, distillation into the multimodal model). The trained encoders become
frozen teachers ``T_m`` (eval mode, ``requires_grad=False``, outside the model and the optimizer);
inside the window ``[start_epoch, end_epoch)`` every step adds::

    L = CE(z) + lambda * sum_m MSE(P_m(f_m), sg(T_m(x_m))),    MSE = mean over B * d_m,

with ``f_m`` the model's features of the batch and ``x_m`` its raw inputs (``ctx.inputs``).
``P_m`` is the identity when the (flattened) shapes agree; teachers of another width need
``projection=True``: a regulator-owned ``nn.Linear(d_m, d_m^T)`` per such modality (FitNets'
regressor direction: student to teacher), trained with the run's optimizer. Which layer the paper
distils and its lambda are **[unverified]**; BalanceBenchmark distils the encoder outputs with
lambda ("scaling") = 10, which are the defaults here.

**UME** (uni-modal ensemble, no joint training). The default form keeps one model: every encoder
learns through the model's head from its own modality only, ``L = sum_m CE(z_m, y)`` with
``z_m = h(f, present={m})`` (this replaces the step's multimodal term ``CE(z)``), and the test-time
prediction is ``mean_m z_m`` (``combine="mean_logits"``) or ``log mean_m softmax(z_m)``
(``"mean_probs"``). As the encoders are disjoint, encoder m's gradient is exactly that of its
unimodal model. The paper's exact combination is **[unverified]**. ``heads="separate"`` gives each
modality its own regulator-owned linear head instead (M truly separate unimodal models sharing
nothing; the model's own head is then left untrained and unused by the prediction).

**Which one.** The paper prefers UME when cross-modal interaction matters little and UMT otherwise;
its exact criterion is **[unverified]**. The library's rule, :func:`choose_umt_or_ume`: the one with
the higher validation accuracy (a tie goes to UME, the cheaper one, with no distillation term).

Missing modalities (batches ``(inputs, labels, present)``, ``ctx.present``): every per-sample mean
above (teacher CE, distillation MSE, UME's unimodal CE, teacher accuracy) runs over the samples
where that modality is present; a batch without any gives a zero term that is still in the graph.
Teacher m trains on exactly the present subset of each batch: the rows are selected before its
encoder runs (a BatchNorm in training mode never sees a placeholder input) and a batch without a
present row takes no optimizer step (SGD's momentum and weight decay do not move the teacher).

DDP: teacher training averages its gradients over ranks at every step (the teachers start from the
DDP-broadcast encoders and seeded heads, so every rank ends with identical teachers); teacher
accuracies, the logged MSEs and unimodal statistics are summed over ranks before use; the owned
projections / heads are outside the DDP module, so their gradients are averaged before each step.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.distributed import all_reduce_sum, is_main_process, world_size
from ..utils.io import atomic_torch_save, safe_torch_load
from ..utils.progress import progress_bar
from ..utils.torch_utils import module_device, preserved_state, to_device
from ..utils.validation import (
    BOOL,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    Satisfies,
    as_plain_int,
    closest_match,
    unpack_batch,
    unpack_batch_present,
)
from .base import (
    EPOCH_END,
    SEED,
    EpochMeans,
    Regulator,
    average_over_ranks,
    check_epoch_range,
    seeded_linear,
    seeded_unimodal_heads,
)

__all__ = ["UMT", "UME", "umt_distillation_loss", "choose_umt_or_ume", "train_unimodal_models",
           "ume_combine", "TEACHERS_FORMAT"]

#: the format tag of a teacher file written by :meth:`UMT.save_teachers`
TEACHERS_FORMAT = "modaldiag.umt_teachers"
TEACHERS_VERSION = 1


# ---------------------------------------------------------------- the formulas
def umt_distillation_loss(features: Mapping[str, torch.Tensor],
                          teacher_features: Mapping[str, torch.Tensor],
                          weight: float, present: Mapping[str, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """``(weight * sum_m MSE_m, {m: MSE_m})`` with ``MSE_m = mean((f_m - sg(t_m))^2)`` over all
    ``B * d_m`` entries (features flattened after the batch dimension, computed in float32 or
    wider). The teacher features are detached; the gradient reaches only ``features``.

    ``present`` (optional): per-sample presence ``{m: BoolTensor (B,)}`` (a missing dataset
    modality); the mean of modality m then runs over its present samples only (0 when none).
    Refuses modalities missing from ``teacher_features`` and shapes that differ."""
    missing = [m for m in features if m not in teacher_features]
    if missing:
        raise ValueError(f"umt_distillation_loss: no teacher features for {missing}; give one "
                         "teacher output per modality.")
    total, mse = None, {}
    for m, f in features.items():
        f2 = f.flatten(1)
        t2 = teacher_features[m].detach().flatten(1)
        if f2.shape != t2.shape:
            raise ValueError(f"umt_distillation_loss: modality {m!r}: features of shape "
                             f"{tuple(f.shape)} and teacher features of shape "
                             f"{tuple(teacher_features[m].shape)} differ; MSE needs equal shapes "
                             "(UMT(projection=True) maps the features to the teacher's width).")
        dtype = torch.float64 if f2.dtype == torch.float64 else torch.float32
        per_sample = (f2.to(dtype) - t2.to(dtype)).pow(2).mean(1)
        term = _masked_mean(per_sample, None if present is None else present.get(m))
        mse[m] = float(term.detach())
        total = term if total is None else total + term
    if total is None:
        raise ValueError("umt_distillation_loss: no modalities given.")
    return weight * total, mse


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_sample`` (B,) over the rows where ``mask`` is True (all rows without a
    mask; 0, still in the graph, when no row is)."""
    if mask is None:
        return per_sample.mean()
    w = mask.to(per_sample.device, per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp_min(1.0)


def ume_combine(logits: Mapping[str, torch.Tensor], combine: str = "mean_logits") -> torch.Tensor:
    """The ensemble's logits ``(B, C)`` from the unimodal logits ``{m: (B, C)}``:
    ``mean_m z_m`` (``"mean_logits"``) or ``log(mean_m softmax(z_m))`` (``"mean_probs"``, whose
    softmax is the mean of the unimodal probabilities)."""
    stacked = torch.stack(list(logits.values()))
    if combine == "mean_logits":
        return stacked.mean(0)
    if combine == "mean_probs":
        probs = F.softmax(stacked.float(), dim=-1).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log().to(stacked.dtype)
    raise ValueError(f"ume_combine: combine must be 'mean_logits' or 'mean_probs'; got {combine!r}.")


def choose_umt_or_ume(val_accuracy_umt: float, val_accuracy_ume: float) -> str:
    """The library's UMT-vs-UME rule: ``"UMT"`` when its validation accuracy is strictly higher,
    else ``"UME"`` (a tie goes to the cheaper ensemble). The paper's own criterion (how much the
    task needs cross-modal interaction) is **[unverified]**; compare the two on held-out data,
    never on the test set."""
    accs = {"val_accuracy_umt": val_accuracy_umt, "val_accuracy_ume": val_accuracy_ume}
    for name, v in accs.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) <= 1:
            raise ValueError(f"choose_umt_or_ume: {name} must be an accuracy in [0, 1]; got {v!r}.")
    return "UMT" if float(val_accuracy_umt) > float(val_accuracy_ume) else "UME"


# ---------------------------------------------------------------- teacher training
def _loader_parts(loader) -> list:
    """The loader, its sampler, its batch sampler and samplers nested in those (depth <= 3)."""
    found, seen, todo = [], set(), [(loader, 0)]
    while todo:
        obj, depth = todo.pop()
        if obj is None or depth > 3 or id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        todo.extend((getattr(obj, name, None), depth + 1) for name in ("sampler", "batch_sampler"))
    return found


class _LoaderState:
    """Restore the ``torch.Generator`` states a loader's shuffling draws from and a
    DistributedSampler's epoch (anywhere in the loader's sampler chain) on exit."""

    def __init__(self, *loaders):
        parts = [p for ld in loaders if ld is not None for p in _loader_parts(ld)]
        gens = {id(g): g for p in parts if isinstance(g := getattr(p, "generator", None),
                                                      torch.Generator)}
        self.gens = list(gens.values())
        self.samplers = [p for p in parts
                         if hasattr(p, "set_epoch") and isinstance(getattr(p, "epoch", None), int)]

    def __enter__(self):
        self.states = [g.get_state() for g in self.gens]
        self.epochs = [s.epoch for s in self.samplers]
        return self

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def __exit__(self, *exc) -> bool:
        for g, s in zip(self.gens, self.states, strict=True):
            g.set_state(s)
        for s, e in zip(self.samplers, self.epochs, strict=True):
            s.set_epoch(e)
        return False


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None
    return module


def _any_rank(flag: bool, device) -> bool:
    """True when ``flag`` holds on any DDP rank (one all-reduce; plain value without DDP)."""
    if world_size() == 1:
        return flag
    return float(all_reduce_sum(torch.tensor([float(flag)], device=device))) > 0


@torch.no_grad()
def _feature_width(encoder: nn.Module, x: torch.Tensor) -> int:
    """Flattened output width of ``encoder`` on ``x`` (eval mode, no gradient; modes restored),
    to size a head when the first batch holds no row to train on."""
    modes = [(mod, mod.training) for mod in encoder.modules()]
    encoder.eval()
    try:
        return int(encoder(x).flatten(1).shape[1])
    finally:
        for mod, training in modes:
            mod.training = training


@torch.no_grad()
def _accuracy(encoder, head, loader, modalities, m: str, device) -> float:
    """Accuracy of ``head(encoder(x_m))`` over ``loader`` (eval mode; counts summed over ranks)."""
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        inputs, labels, present = unpack_batch_present(batch, modalities, batch_index=i)
        x = inputs[m].to(device) if isinstance(inputs[m], torch.Tensor) else inputs[m]
        logits = head(encoder(x).flatten(1).to(head.weight.dtype))
        rows = (present or {}).get(m)
        keep = (torch.ones_like(labels, dtype=torch.bool) if rows is None else rows).to(device)
        counts[0] += ((logits.argmax(1) == labels.to(device)) & keep).sum()
        counts[1] += keep.sum()
    all_reduce_sum(counts)
    return float(counts[0] / counts[1]) if float(counts[1]) > 0 else float("nan")


def train_unimodal_models(model, train_loader, *, epochs: int, lr: float = 0.01,
                          momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                          modalities=None, val_loader=None, device=None, progress: bool = False,
                          owner: str = "UMT") -> dict[str, dict]:
    """One unimodal model per modality: ``{m: {"encoder", "head", "accuracy", "split"}}``.

    Model m is a deep copy of ``model.encoders[m]`` plus ``seeded_linear(d_m, C)`` (drawn from a
    generator seeded with ``seed``, in modality order), trained for ``epochs`` epochs of
    ``train_loader`` on ``CE(head(E_m(x_m)), y)`` with ``SGD(lr, momentum, weight_decay)`` over its
    trainable parameters (parameters the user froze in the encoder stay frozen). With presence
    masks (``(inputs, labels, present)`` batches) model m trains only on the rows where m is
    present, selected before encoding (a BatchNorm never sees a placeholder input): each step is
    exactly a step on the batch's present subset. A batch with no such row, or with one row while
    the encoder holds a BatchNorm in training mode, is skipped (no optimizer step; on every DDP
    rank alike). Accuracy counts the present rows only. Under DDP the
    gradients are averaged over ranks at every step, so every rank ends with the same models. The
    returned encoders and heads are frozen and in eval mode; ``accuracy`` is measured on
    ``val_loader`` (``split="val"``) or, without one, on ``train_loader`` (``split="train"``).

    The live model (modes, ``requires_grad``, grads, buffers, values), the global RNG streams and
    the loaders' shuffling generators (and a DistributedSampler's epoch) end as they began.
    """
    modalities = list(model.modalities if modalities is None else modalities)
    device = device if device is not None else module_device(model)
    num_classes = int(model.num_classes)
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, dict] = {}
    with preserved_state(model), _LoaderState(train_loader, val_loader) as loaders, torch.enable_grad():
        for m in modalities:
            enc = copy.deepcopy(model.encoders[m])
            for p in enc.parameters():
                p.grad = None
            if not model.training:  # like md.fit: a model handed over in eval trains whole
                enc.train()
            batchnorm = any(isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training
                            for mod in enc.modules())
            head, opt, params = None, None, []
            bar = progress_bar(range(epochs), enabled=progress, total=epochs, unit="epoch",
                               desc=f"{owner}: unimodal model {m!r}")
            for epoch in bar:
                loaders.set_epoch(epoch)
                for i, batch in enumerate(train_loader):
                    inputs, labels, present = unpack_batch_present(batch, model.modalities,
                                                                   batch_index=i)
                    x_all = x = to_device({m: inputs[m]}, device)[m]
                    labels = labels.to(device)
                    rows = (present or {}).get(m)
                    if rows is not None:  # the unimodal model of m learns m's data only
                        rows = rows.to(device)
                        x, labels = x[rows], labels[rows]
                    n = labels.shape[0]
                    skip = _any_rank(rows is not None and (n == 0 or (n == 1 and batchnorm)),
                                     device)
                    feats = None if skip else enc(x).flatten(1)
                    if head is None:  # sized from the first batch (skipped or not)
                        ref = next((p for p in enc.parameters() if p.is_floating_point()), None)
                        width = (int(feats.shape[1]) if feats is not None
                                 else _feature_width(enc, x_all))
                        dtype = (ref.dtype if ref is not None else feats.dtype
                                 if feats is not None else torch.get_default_dtype())
                        head = seeded_linear(width, num_classes, gen, device, dtype)
                        params = [p for p in enc.parameters() if p.requires_grad]
                        params += list(head.parameters())
                        opt = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                              weight_decay=weight_decay)
                    if skip:  # no row where m is present: no step (momentum does not move)
                        continue
                    loss = _masked_mean(F.cross_entropy(head(feats.to(head.weight.dtype))
                                                        .float(), labels, reduction="none"), None)
                    if _any_rank(not bool(torch.isfinite(loss)), device):
                        raise ValueError(
                            f"{owner}: training the unimodal model of modality {m!r} diverged (a "
                            f"non-finite loss at teacher epoch {epoch}, batch {i}); lower "
                            "teacher_lr or check that modality's inputs.")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if world_size() > 1:
                        for p in params:
                            if p.grad is None:
                                p.grad = torch.zeros_like(p)
                        average_over_ranks([p.grad for p in params])
                    opt.step()
            if head is None:
                raise ValueError(f"{owner}: the training loader yielded no batch; the unimodal "
                                 f"model of {m!r} cannot be trained.")
            _freeze(enc)
            _freeze(head)
            split = "val" if val_loader is not None else "train"
            acc = _accuracy(enc, head, val_loader if val_loader is not None else train_loader,
                            model.modalities, m, device)
            out[m] = {"encoder": enc, "head": head, "accuracy": acc, "split": split}
    return out


def _rows(labels: torch.Tensor, present, m: str) -> int:
    """Samples of the batch where modality m is present (all without a presence mask)."""
    rows = None if present is None else present.get(m)
    return int(labels.shape[0]) if rows is None else int(rows.sum())


def _average_owned_gradients(params: list[nn.Parameter]) -> None:
    """Average regulator-owned parameters' gradients over DDP ranks (they are outside DDP)."""
    if not params or world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average_over_ranks([p.grad for p in params])


def _linear_from(state: Mapping[str, torch.Tensor]) -> nn.Linear:
    w, b = state["weight"], state["bias"]
    lin = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def _linear_state(lin: nn.Linear) -> dict[str, torch.Tensor]:
    return {"weight": lin.weight.detach().clone(), "bias": lin.bias.detach().clone()}


def _is_teacher_dict(value) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, nn.Module) for k, v in value.items()))


def _read_teacher_file(path) -> dict:
    """The contents of a teacher file written by :meth:`UMT.save_teachers`; refuses any other."""
    shown = repr(os.fspath(path))
    try:
        state = safe_torch_load(path, map_location="cpu")
    except FileNotFoundError:
        raise ValueError(f"UMT: the teacher file {shown} does not exist; write one with "
                         "UMT.save_teachers(path) after a run, or leave teachers=None.") from None
    except ValueError as exc:
        raise ValueError(f"UMT: {shown} is not a teacher file written by modaldiag ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != TEACHERS_FORMAT:
        raise ValueError(f"UMT: {shown} was not written by UMT.save_teachers (no "
                         f"{TEACHERS_FORMAT!r} format tag); modaldiag loads only its own "
                         "teacher files.")
    if state.get("version") != TEACHERS_VERSION:
        raise ValueError(f"UMT: {shown} has teacher-file version {state.get('version')!r}; this "
                         f"modaldiag reads version {TEACHERS_VERSION}.")
    return state


# ---------------------------------------------------------------- UMT
class UMT(Regulator):
    """UMT regulator: distil frozen unimodal teachers' features into the model's encoders.

    Parameters
    ----------
    weight : float > 0, default 10.0
        lambda, the weight of ``sum_m MSE(f_m, sg(T_m(x_m)))`` (BalanceBenchmark's "scaling";
        the paper's value **[unverified]**).
    teachers : None, dict or path, default None
        None: train one unimodal model per modality at the start of the run (see
        :func:`train_unimodal_models`) and use its encoder. A dict ``{m: nn.Module}``: given
        teacher encoders ``x_m -> (B, ...)`` for some or all modalities (deep-copied, frozen, put
        in eval mode; the others are trained). A path: a file written by :meth:`save_teachers`
        (refused if modaldiag did not write it).
    teacher_epochs : int >= 1, optional
        Epochs of teacher training; None: the run's number of epochs (``md.fit(epochs=...)``).
    teacher_lr, teacher_momentum, teacher_weight_decay : default 0.01, 0.9, 0.0
        The teachers' own SGD.
    projection : bool, default False
        Allow teachers whose (flattened) feature width differs from the model's: a learnable
        ``nn.Linear(d_m, d_m^T)`` on the model's features, owned by the regulator, trained by the
        run's optimizer (one extra parameter group) and saved in ``state_dict``. False: such a
        teacher is refused at the start of the run.
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch, optional
        The distillation term acts in ``[start_epoch, end_epoch)``; None: to the end
        (BalanceBenchmark 0..80 inclusive).
    seed : int >= 0, default 0
        Seed of the teacher heads' and projections' initialisation (same on every DDP rank).
    progress : bool, optional
        A progress bar over teacher training (main process only). None: the run's setting when it
        exposes one (``ctx.progress``), else off.
    """

    owned_group_key = "modaldiag_umt_projections"
    _parameter_constraints = {
        "weight": [POSITIVE],
        "teachers": [None, str, os.PathLike,
                     Satisfies(_is_teacher_dict, "a non-empty dict {modality: nn.Module}")],
        "teacher_epochs": [None, POSITIVE_INT], "teacher_lr": [POSITIVE],
        "teacher_momentum": [Interval(0, 1, closed="left")],
        "teacher_weight_decay": [NON_NEGATIVE], "projection": [BOOL],
        "start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END, "seed": [SEED],
        "progress": [None, BOOL]}

    def __init__(self, weight: float = 10.0, *, teachers=None, teacher_epochs: int | None = None,
                 teacher_lr: float = 0.01, teacher_momentum: float = 0.9,
                 teacher_weight_decay: float = 0.0, projection: bool = False,
                 start_epoch: int = 0, end_epoch: int | None = None, seed: int = 0,
                 progress: bool | None = None):
        teacher_epochs, start_epoch, end_epoch, seed = (
            as_plain_int(v) for v in (teacher_epochs, start_epoch, end_epoch, seed))
        self._validate(weight=weight, teachers=teachers, teacher_epochs=teacher_epochs,
                       teacher_lr=teacher_lr, teacher_momentum=teacher_momentum,
                       teacher_weight_decay=teacher_weight_decay, projection=projection,
                       start_epoch=start_epoch, end_epoch=end_epoch, seed=seed, progress=progress)
        check_epoch_range("UMT", start_epoch, end_epoch)
        self.weight = float(weight)
        self.given = dict(teachers) if isinstance(teachers, Mapping) else None
        self.teacher_path = os.fspath(teachers) if isinstance(teachers, (str, os.PathLike)) else None
        self.teacher_epochs, self.teacher_lr = teacher_epochs, float(teacher_lr)
        self.teacher_momentum = float(teacher_momentum)
        self.teacher_weight_decay = float(teacher_weight_decay)
        self.projection, self.start_epoch, self.end_epoch = projection, start_epoch, end_epoch
        self.seed, self.progress = seed, progress
        super().__init__()

    def config(self) -> dict:
        source = ("given" if self.given is not None else
                  "file" if self.teacher_path is not None else "trained")
        return {"weight": self.weight, "teachers": source, "teacher_path": self.teacher_path,
                "teacher_epochs": self.teacher_epochs, "teacher_lr": self.teacher_lr,
                "teacher_momentum": self.teacher_momentum,
                "teacher_weight_decay": self.teacher_weight_decay, "projection": self.projection,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch, "seed": self.seed}

    def reset(self) -> None:
        """Forget the teachers, projections and their accuracies (a fresh run makes new ones)."""
        super().reset()
        self.teachers: dict[str, nn.Module] | None = None
        self.teacher_heads: dict[str, nn.Linear] = {}
        self.teacher_accuracy: dict[str, float] = {}
        self.accuracy_split: str | None = None
        self.projections: dict[str, nn.Linear] = {}
        self.teachers_trained = 0  # unimodal models trained by this object (all runs)
        self._pending: dict | None = None
        self._means = EpochMeans()

    def active(self, epoch: int) -> bool:
        """Whether the distillation term acts in ``epoch``."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def owned_parameters(self) -> list[nn.Parameter]:
        """The projections' parameters (none unless ``projection=True`` made some)."""
        return [p for lin in self.projections.values() for p in (lin.weight, lin.bias)]

    # ------------------------------------------------------------ teachers
    def on_fit_start(self, ctx) -> None:
        restored = self._restored
        trained = self.teachers_trained
        super().on_fit_start(ctx)
        self.teachers_trained = trained
        model = ctx.model
        device = ctx.device or module_device(model)
        if restored and self._pending is not None:
            self._build_restored(model, device)
        elif self.teachers is None:
            self._make_teachers(ctx, device)
        for lin in self.projections.values():  # in place: the Parameter objects stay
            lin.to(device)
        self._check_shapes(ctx, device)
        self.register_parameters(ctx.optimizer)

    def _check_names(self, names, model, what: str) -> None:
        unknown = [m for m in names if m not in model.modalities]
        if unknown:
            hints = [h for h in (closest_match(m, model.modalities) for m in unknown) if h]
            hint = f" (did you mean {hints[0]!r}?)" if hints else ""
            raise ValueError(f"UMT: {what} names modalities {unknown} that the model does not "
                             f"have{hint}; the model's modalities are {list(model.modalities)}.")

    def _teacher_epochs(self, ctx) -> int:
        if self.teacher_epochs is not None:
            return self.teacher_epochs
        if ctx.epochs is None:
            raise ValueError("UMT: teacher_epochs=None means 'as many epochs as the run', but this "
                             "run did not say how many (a plain loop); give "
                             "UMT(teacher_epochs=...) or run.start(train_loader, val_loader, "
                             "epochs).")
        return int(ctx.epochs)

    def _make_teachers(self, ctx, device) -> None:
        model = ctx.model
        teachers: dict[str, nn.Module] = {}
        if self.teacher_path is not None:
            state = _read_teacher_file(self.teacher_path)
            if list(state["modalities"]) != list(model.modalities):
                raise ValueError(f"UMT: the teacher file {self.teacher_path!r} holds teachers for "
                                 f"{list(state['modalities'])}, but the model's modalities are "
                                 f"{list(model.modalities)}.")
            self._pending = state
            self._build_restored(model, device, where=f"the teacher file {self.teacher_path!r}")
            return
        if self.given is not None:
            self._check_names(self.given, model, "teachers=")
            for m, mod in self.given.items():
                teachers[m] = _freeze(copy.deepcopy(mod).to(device))
        todo = [m for m in model.modalities if m not in teachers]
        if todo:
            if ctx.train_loader is None:
                raise ValueError("UMT trains its teachers from the training loader at the start "
                                 "of the run; pass it (md.fit does; a plain loop: "
                                 "run.start(train_loader, val_loader, epochs)), or give trained "
                                 "teachers: UMT(teachers={modality: module}) or "
                                 "UMT(teachers=path) with a file from UMT.save_teachers.")
            show = self.progress if self.progress is not None else bool(
                getattr(ctx, "progress", False))
            made = train_unimodal_models(
                model, ctx.train_loader, epochs=self._teacher_epochs(ctx), lr=self.teacher_lr,
                momentum=self.teacher_momentum, weight_decay=self.teacher_weight_decay,
                seed=self.seed, modalities=todo, val_loader=ctx.val_loader, device=device,
                progress=show and is_main_process(), owner="UMT")
            self.teachers_trained += len(made)
            for m, r in made.items():
                teachers[m] = r["encoder"]
                self.teacher_heads[m] = r["head"]
                self.teacher_accuracy[m] = r["accuracy"]
                self.accuracy_split = r["split"]
        self.teachers = {m: teachers[m] for m in model.modalities}

    def _build_restored(self, model, device, where: str = "the restored UMT state") -> None:
        """Teachers from saved weights: the architecture of the given module (``teachers=`` dict)
        or of a copy of the model's encoder, loaded strictly; nothing is retrained."""
        state, self._pending = self._pending, None
        teachers = {}
        for m, weights in state["encoders"].items():
            if m not in model.modalities:
                self._check_names([m], model, where)
            base = self.given[m] if self.given and m in self.given else model.encoders[m]
            enc = copy.deepcopy(base)
            try:
                enc.load_state_dict(weights)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ValueError(f"UMT: {where} holds a teacher for {m!r} that does not fit this "
                                 f"model's encoder {m!r} ({first}); use the model the teachers "
                                 "were trained with.") from None
            teachers[m] = _freeze(enc.to(device))
        missing = [m for m in model.modalities if m not in teachers]
        if missing:
            raise ValueError(f"UMT: {where} has no teacher for {missing}.")
        self.teachers = teachers
        self.teacher_heads = {m: _freeze(_linear_from(s).to(device))
                              for m, s in state.get("heads", {}).items()}
        self.teacher_accuracy = {m: float(v) for m, v in state.get("accuracy", {}).items()}
        self.accuracy_split = state.get("accuracy_split")

    def _check_shapes(self, ctx, device) -> None:
        """Compare teacher and model feature widths on one training batch; create projections
        where they differ (``projection=True``), else refuse."""
        model = ctx.model
        if ctx.train_loader is None:
            return
        with preserved_state(model), _LoaderState(ctx.train_loader), torch.no_grad():
            batch = next(iter(ctx.train_loader), None)
            if batch is None:
                return
            inputs, _ = unpack_batch(batch, model.modalities)
            inputs = to_device(inputs, device)
            model.eval()
            feats = model.encode(inputs)
            outs = {m: self.teachers[m](inputs[m]) for m in model.modalities}
        gen = torch.Generator().manual_seed(self.seed)
        for m in model.modalities:
            f, t = feats[m].flatten(1), outs[m]
            if not isinstance(t, torch.Tensor) or t.shape[0] != f.shape[0]:
                raise ValueError(f"UMT: the teacher of {m!r} must return a Tensor (B, ...) for "
                                 f"the batch of modality {m!r}; it returned "
                                 f"{type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape)}.")
            d_s, d_t = f.shape[1], t.flatten(1).shape[1]
            if d_s == d_t:
                if m in self.projections:
                    raise ValueError(f"UMT: the state holds a projection for {m!r}, whose teacher "
                                     "now has the model's width; start a fresh run.")
                continue
            if not self.projection:
                raise ValueError(
                    f"UMT: the teacher of {m!r} gives features of width {d_t} (shape "
                    f"{tuple(t.shape)}) but the model's encoder gives {d_s} (shape "
                    f"{tuple(feats[m].shape)}); MSE distillation needs equal shapes. Give a "
                    "teacher of the same width, or UMT(projection=True) to learn a linear map "
                    "from the model's features to the teacher's.")
            lin = self.projections.get(m)
            if lin is None:
                ref = next((p for p in model.parameters() if p.is_floating_point()), f)
                self.projections[m] = seeded_linear(d_s, d_t, gen, device, ref.dtype)
            elif tuple(lin.weight.shape) != (d_t, d_s):
                raise ValueError(f"UMT: the restored projection of {m!r} maps {lin.weight.shape[1]}"
                                 f" to {lin.weight.shape[0]} features, but this run needs {d_s} to "
                                 f"{d_t}.")

    def save_teachers(self, path) -> None:
        """Write the teachers (and their heads and accuracies) to ``path`` atomically, for
        ``UMT(teachers=path)``. Refuses to overwrite a file that is not a modaldiag teacher
        file."""
        if self.teachers is None:
            raise ValueError("UMT.save_teachers: no teachers yet; they exist after the start of a "
                             "run (md.fit(..., regulator=umt)).")
        if os.path.exists(path):
            try:
                _read_teacher_file(path)
            except ValueError:
                raise ValueError(f"UMT.save_teachers: {os.fspath(path)!r} exists and was not "
                                 "written by UMT.save_teachers; nothing was overwritten. Choose "
                                 "another path.") from None
        atomic_torch_save({"format": TEACHERS_FORMAT, "version": TEACHERS_VERSION,
                           **self._teacher_state()}, path)

    def _teacher_state(self) -> dict:
        return {"modalities": list(self.teachers),
                "encoders": {m: {k: v.detach().cpu().clone() for k, v in t.state_dict().items()}
                             for m, t in self.teachers.items()},
                "heads": {m: {k: v.cpu() for k, v in _linear_state(h).items()}
                          for m, h in self.teacher_heads.items()},
                "accuracy": dict(self.teacher_accuracy),
                "accuracy_split": self.accuracy_split}

    # ------------------------------------------------------------ per step
    def on_train_epoch_start(self, ctx) -> None:
        self._means = EpochMeans()

    def teacher_features(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{m: T_m(x_m)}`` without gradient (the teachers are frozen, in eval mode)."""
        if self.teachers is None:
            raise RuntimeError("UMT: no teachers yet; the run must start with on_fit_start "
                               "(md.fit and run.epoch_start do).")
        with torch.no_grad():
            return {m: t(inputs[m]) for m, t in self.teachers.items()}

    def on_after_forward(self, ctx) -> None:
        if not self.active(ctx.epoch):
            return
        target = self.teacher_features(ctx.inputs)
        feats = {}
        for m in ctx.model.modalities:
            f = ctx.features[m]
            lin = self.projections.get(m)
            feats[m] = lin(f.flatten(1).to(lin.weight.dtype)) if lin is not None else f
        present = getattr(ctx, "present", None)
        loss, mse = umt_distillation_loss(feats, target, self.weight, present)
        ctx.losses["umt/distill"] = loss
        for m, v in mse.items():
            n = _rows(ctx.labels, present, m)
            self._means.add("distill_mse", m, v * n, n)

    def on_before_optimizer_step(self, ctx) -> None:
        _average_owned_gradients(self.owned_parameters())

    def on_train_epoch_end(self, ctx) -> None:
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values)
        if self.teacher_accuracy:
            self.record_epoch(f"teacher_{self.accuracy_split}_accuracy", dict(self.teacher_accuracy))
        self.record_epoch("variant", "UMT")
        self.record_epoch("active", bool(self.active(ctx.epoch)))

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        if self.teachers is None:
            return {"teachers_trained": self.teachers_trained} if self.teachers_trained else {}
        state = self._teacher_state()
        state["teachers_trained"] = self.teachers_trained
        if self.projections:
            state["projections"] = {m: _linear_state(lin) for m, lin in self.projections.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the teachers (built at the next ``on_fit_start`` from the model's encoder
        architecture, never retrained), the projections (recreated now, so that
        ``register_parameters`` can add them to the optimizer before its state is loaded) and
        the accuracies."""
        state = state or {}
        projections = {m: _linear_from(s) for m, s in state.get("projections", {}).items()}
        super().load_state_dict(state)
        self.teachers_trained = int(state.get("teachers_trained", 0))
        self.teachers, self.teacher_heads = None, {}
        self.projections = projections
        self._pending = dict(state) if "encoders" in state else None
        if self._pending is None:
            self._restored = False  # nothing to keep: the next run makes its teachers afresh


# ---------------------------------------------------------------- UME
class UME(Regulator):
    """UME: train each encoder on its own modality only; predict with the unimodal ensemble.

    The step's multimodal term is replaced: ``losses["multimodal"] = sum_m CE(z_m, y)`` (so the
    run's logged training loss is this objective). ``predict`` (used by ``md.fit`` for validation
    and by ``md.probes.evaluate(..., predict=reg.predict)``) combines the unimodal logits.

    Parameters
    ----------
    combine : {"mean_logits", "mean_probs"}, default "mean_logits"
        ``mean_m z_m`` or ``log mean_m softmax(z_m)`` (the paper's combination **[unverified]**).
    heads : {"shared", "separate"}, default "shared"
        ``z_m = h(f, present={m})`` with the model's head (keeps the model coherent for the
        probes), or one regulator-owned ``nn.Linear(d_m, C)`` per modality (M fully separate
        unimodal models; registered with the run's optimizer and saved in ``state_dict``).
    seed : int >= 0, default 0
        Seed of the separate heads' initialisation.
    """

    owned_group_key = "modaldiag_ume_heads"
    _parameter_constraints = {"combine": [Options("mean_logits", "mean_probs")],
                              "heads": [Options("shared", "separate")], "seed": [SEED]}

    def __init__(self, *, combine: str = "mean_logits", heads: str = "shared", seed: int = 0):
        seed = as_plain_int(seed)
        self._validate(combine=combine, heads=heads, seed=seed)
        self.combine, self.heads_mode, self.seed = combine, heads, seed
        self.needs_unimodal_logits = heads == "shared"
        super().__init__()

    def config(self) -> dict:
        return {"combine": self.combine, "heads": self.heads_mode, "seed": self.seed}

    def reset(self) -> None:
        super().reset()
        self.heads: dict[str, nn.Linear] | None = None
        self._means = EpochMeans()

    def owned_parameters(self) -> list[nn.Parameter]:
        return [p for lin in (self.heads or {}).values() for p in (lin.weight, lin.bias)]

    def _create_heads(self, model, dims: Mapping[str, int]) -> None:
        self.heads = seeded_unimodal_heads(model, dims, self.seed)

    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        if self.heads_mode == "separate":
            dims = getattr(ctx.model, "feature_dims", None)
            if self.heads is None and isinstance(dims, Mapping):
                self._create_heads(ctx.model, dims)
            self.register_parameters(ctx.optimizer)

    def unimodal_logits(self, model, features) -> dict[str, torch.Tensor]:
        """``{m: z_m}``: the model's head with only m present, or m's separate head."""
        if self.heads_mode == "shared":
            return model.unimodal_logits(features)
        if self.heads is None:
            raise RuntimeError("UME(heads='separate'): no heads yet; they are made at the start "
                               "of the run (or its first batch).")
        return {m: lin(features[m].flatten(1).to(lin.weight.dtype))
                for m, lin in self.heads.items()}

    def on_train_epoch_start(self, ctx) -> None:
        self._means = EpochMeans()

    def on_after_forward(self, ctx) -> None:
        model, labels = ctx.model, ctx.labels
        if self.heads_mode == "separate" and self.heads is None:
            self._create_heads(model, {m: f.flatten(1).shape[1] for m, f in ctx.features.items()})
            self.register_parameters(ctx.optimizer)
        uni = (ctx.compute_unimodal_logits() if self.heads_mode == "shared"
               else self.unimodal_logits(model, ctx.features))
        total = None
        present = getattr(ctx, "present", None)
        for m in model.modalities:
            rows = None if present is None else present.get(m)
            ce = _masked_mean(F.cross_entropy(uni[m].float(), labels, reduction="none"), rows)
            total = ce if total is None else total + ce
            n = _rows(labels, present, m)
            hits = uni[m].detach().argmax(1) == labels
            if rows is not None:
                hits = hits & rows.to(hits.device)
            self._means.add("unimodal_ce", m, float(ce.detach()) * n, n)
            self._means.add("unimodal_train_acc", m, float(hits.sum()), n)
        if self.heads_mode == "separate" and ctx.ddp_model is not None and ctx.logits is not None:
            # the model's head is unused; DDP (without find_unused_parameters) needs every
            # parameter in the graph: a zero-weighted term gives the head exact zero gradients
            total = total + 0.0 * ctx.logits.float().sum()
        ctx.losses["multimodal"] = total  # replaces CE(z): no joint term
        # the step's output is the ensemble: the run's training accuracy is UME's
        ctx.logits = ume_combine({m: uni[m].detach() for m in model.modalities}, self.combine)

    def on_before_optimizer_step(self, ctx) -> None:
        _average_owned_gradients(self.owned_parameters())

    def on_train_epoch_end(self, ctx) -> None:
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values)
        self.record_epoch("variant", "UME")
        self.record_epoch("combine", self.combine)

    def predict(self, model, features) -> torch.Tensor:
        """The ensemble's logits ``(B, C)``: :func:`ume_combine` of the unimodal logits."""
        return ume_combine(self.unimodal_logits(model, features), self.combine)

    def state_dict(self) -> dict:
        return {"heads": {m: _linear_state(h) for m, h in self.heads.items()}} if self.heads else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the separate heads (recreated now, so they can join the optimizer)."""
        state = state or {}
        if state.get("heads") and self.heads_mode != "separate":
            raise ValueError("UME: the state holds separate heads but this regulator uses "
                             "heads='shared'.")
        heads = {m: _linear_from(s) for m, s in state.get("heads", {}).items()} or None
        super().load_state_dict(state)
        self.heads = heads

