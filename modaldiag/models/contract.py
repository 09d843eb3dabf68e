"""The multimodal model contract: ``encoders`` (one per modality) + a ``head`` over features.

Invariant: *absence is a feature-level substitution*. ``head(features, present=S)`` replaces the
feature of every modality outside ``S`` by its baseline (zeros by default, or a stored
per-modality mean) and runs the ordinary fusion. Unimodal logits, Shapley coalitions, OPM feature
dropping and valuation re-sampling all go through this one rule, for every fusion type. A
modality missing for some *samples* (per-sample presence masks from the data, or
ModalityDropout) is the same rule row by row: :meth:`MultimodalModel.mask_features`.

Invariant: parameters belong to a modality by *module identity* (``model.encoders[m]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..utils.distributed import all_reduce_sum
from ..utils.torch_utils import preserved_state
from ..utils.validation import (
    POSITIVE_INT,
    InstanceOf,
    as_plain_int,
    check_features,
    check_inputs,
    check_logits,
    check_modality_names,
    check_present,
    unpack_batch_present,
    validate_params,
)
from .names import modality_key

__all__ = ["MultimodalModel", "BaselineStore"]


class BaselineStore(nn.Module):
    """Per-modality baseline vectors as buffers (so they travel with ``state_dict``).

    A modality with no stored vector uses zeros. Buffers are created on load when a checkpoint
    holds them, so a fresh model can load a checkpoint that used a mean baseline. A modality
    whose name is an attribute of this module (``"get"``, ``"training"``...) is stored under
    :func:`~modaldiag.models.names.modality_key`.
    """

    def get(self, modality: str) -> torch.Tensor | None:
        return self._buffers.get(modality_key(modality, type(self)))

    def set(self, modality: str, value: torch.Tensor | None) -> None:
        key = modality_key(modality, type(self))
        if value is None:
            self._buffers.pop(key, None)
        else:
            self.register_buffer(key, value.detach().clone())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            if "." not in name and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MultimodalModel(nn.Module):
    """Base class of every modaldiag model (built with :class:`MultimodalClassifier` or
    :func:`wrap`).

    Subclasses set ``self.encoders`` (an ``nn.ModuleDict`` keyed by modality) and implement
    :meth:`fuse`, which maps a *complete* feature dict to logits ``(B, C)``.

    Attributes
    ----------
    modalities : tuple[str, ...]
        Modality names, in the order given at construction.
    encoders : nn.ModuleDict
        One encoder per modality; ``encoders[m](x_m)`` returns features ``(B, d_m)``.
    num_classes : int or None
        Number of classes of the logits (``None`` until known for a wrapped model).
    """

    encoders: nn.ModuleDict

    def __init__(self, modalities: Iterable[str], num_classes: int | None = None):
        super().__init__()
        self.modalities: tuple[str, ...] = check_modality_names(modalities)
        self.num_classes = num_classes
        self.baselines = BaselineStore()

    # ------------------------------------------------------------------ encoders
    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run every encoder once. ``inputs[m]`` has shape ``(B, ...)``; returns ``{m: (B, d_m)}``."""
        check_inputs(inputs, self.modalities)
        features = {}
        for m in self.modalities:
            x = inputs[m]
            try:
                feats = self.encoders[m](x)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(
                    f"the encoder for modality {m!r} failed on its input of shape "
                    f"{tuple(x.shape)}, dtype {x.dtype}, device {x.device}: {exc} -- check that "
                    "the loader's tensors for this modality have the shape and dtype the encoder "
                    "expects (e.g. float32, channels first)."
                ) from exc
            if not isinstance(feats, torch.Tensor):
                raise TypeError(
                    f"encoder for modality {m!r} returned {type(feats).__name__}; it must return a "
                    "Tensor (B, d). Wrap it, e.g. nn.Sequential(encoder, nn.Flatten())."
                )
            features[m] = feats
        self._check_feature_shapes(features)
        return features

    def _check_feature_shapes(self, features: Mapping[str, torch.Tensor]) -> None:
        """Hook for subclasses that know the feature dimensions."""

    @torch.no_grad()
    def check_absence(self, features: Mapping[str, torch.Tensor]) -> None:
        """Raise if the head's output depends on an absent modality's features.

        Absence must be the baseline substitution of :meth:`head`; a subclass that overrides
        ``head``/``fuse`` and reads features (or raw inputs) some other way breaks every probe
        and regulator built on ``present``. Called once by ``md.shapley`` and ``md.diagnose``.
        """
        for m in self.modalities:
            others = [k for k in self.modalities if k != m]
            base = self.head(features, present=others)
            perturbed = dict(features)
            perturbed[m] = features[m] + 1.0 + features[m].abs()
            if not torch.allclose(self.head(perturbed, present=others), base, rtol=1e-4, atol=1e-5):
                raise ValueError(
                    f"the model's head ignores present=: its output changes when the features of "
                    f"the absent modality {m!r} change. Absent modalities must be replaced by "
                    "their baseline (MultimodalModel.head does this; do not bypass it in fuse).")

    # ------------------------------------------------------------------ head
    def fuse(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Map a complete feature dict to logits ``(B, C)``. Implemented by subclasses."""
        raise TypeError(
            f"{type(self).__name__} must implement fuse(features) -> logits (B, C); build models "
            "with md.MultimodalClassifier or md.wrap, or subclass and define fuse.")

    def absent_feature(self, modality: str, feature: torch.Tensor) -> torch.Tensor:
        """The baseline that stands in for ``modality`` when it is absent, shaped like ``feature``."""
        stored = self.baselines.get(modality)
        if stored is None:
            return torch.zeros_like(feature)
        if tuple(stored.shape) != tuple(feature.shape[1:]):
            raise ValueError(
                f"the stored baseline of modality {modality!r} has shape {tuple(stored.shape)} but "
                f"its features have shape {tuple(feature.shape)}; a baseline is one feature vector "
                f"of shape {tuple(feature.shape[1:])}. Set it again with model.set_baseline(...).")
        return stored.to(dtype=feature.dtype, device=feature.device).expand_as(feature)

    def mask_features(self, features: Mapping[str, torch.Tensor],
                      present: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``features`` with the rows of absent samples replaced by each modality's baseline.

        ``present`` is a per-sample mask ``{m: BoolTensor (B,)}`` (True = present; a modality
        left out is present everywhere), as loaders yield in ``(inputs, labels, present)``.
        Absent rows become :meth:`absent_feature` through ``torch.where``, so nothing downstream
        (head, unimodal logits, regulators, losses) reads them and the encoder of an absent
        modality gets no gradient from that sample. Identity (the same dict) when ``present`` is
        None or all True.
        """
        if not present:
            return features
        out = dict(features)
        for m, mask in present.items():
            f = out[m]
            keep = mask.to(device=f.device, dtype=torch.bool).view(-1, *([1] * (f.dim() - 1)))
            out[m] = torch.where(keep, f, self.absent_feature(m, f))
        return out

    def head(
        self, features: Mapping[str, torch.Tensor], present: Iterable[str] | str | None = None
    ) -> torch.Tensor:
        """Logits ``(B, C)`` with every modality outside ``present`` replaced by its baseline.

        ``present=None`` means all modalities. ``present=("audio",)`` gives audio's unimodal
        logits; ``present=()`` gives the logits of the all-baseline input.
        """
        present = check_present(present, self.modalities)
        batch = check_features(features, self.modalities)
        if len(present) < len(self.modalities):
            features = {
                m: features[m] if m in present else self.absent_feature(m, features[m])
                for m in self.modalities
            }
        return self._checked_logits(self.fuse(features), batch)

    def _checked_logits(self, logits, batch: int, what: str = "the model's head") -> torch.Tensor:
        """``logits`` after checking its shape is ``(batch, num_classes)``.

        A model built without ``num_classes`` (``md.wrap``) learns it from its first valid output.
        """
        check_logits(logits, batch, self.num_classes, what=what)
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        return logits

    def _coalition_fast_path(self, features: Mapping[str, torch.Tensor], masks: torch.Tensor,
                             batch: int) -> torch.Tensor | None:
        """:meth:`fuse_coalitions` with its output checked to be ``(K, B, num_classes)``."""
        fast = self.fuse_coalitions(features, masks)
        if fast is None:
            return None
        k = masks.shape[0]
        if not isinstance(fast, torch.Tensor) or fast.dim() != 3 or tuple(fast.shape[:2]) != (k, batch):
            shape = tuple(fast.shape) if isinstance(fast, torch.Tensor) else type(fast).__name__
            raise ValueError(
                f"fuse_coalitions returned {shape} for {k} coalitions of {batch} samples; "
                f"expected (K, B, num_classes) = ({k}, {batch}, {self.num_classes}).")
        if k:
            self._checked_logits(fast[0], batch, what="fuse_coalitions")
        return fast

    def head_coalitions(
        self,
        features: Mapping[str, torch.Tensor],
        masks: torch.Tensor,
        *,
        max_rows: int = 65536,
    ) -> torch.Tensor:
        """Evaluate the head on many coalitions at once.

        Parameters
        ----------
        features : dict[str, Tensor]
            Features ``{m: (B, d_m)}`` from :meth:`encode`.
        masks : BoolTensor (K, M)
            ``masks[k, i]`` is True when modality ``self.modalities[i]`` is present in coalition k.
        max_rows : int, default 65536
            Upper bound on ``K_chunk * B`` rows per head call (bounds memory).

        Returns
        -------
        Tensor (K, B, C)
            Logits of every coalition for every sample. The head runs on stacked coalitions, so
            it must treat rows independently (true for any head in eval mode).
        """
        batch = check_features(features, self.modalities)
        max_rows = as_plain_int(max_rows)
        validate_params({"masks": [InstanceOf(torch.Tensor, what="a BoolTensor (K, M)")],
                         "max_rows": [POSITIVE_INT]}, {"masks": masks, "max_rows": max_rows},
                        "head_coalitions")
        masks = masks.to(torch.bool)
        if masks.dim() != 2 or masks.shape[1] != len(self.modalities):
            raise ValueError(
                f"masks must have shape (K, {len(self.modalities)}); got {tuple(masks.shape)}."
            )
        first = features[self.modalities[0]]
        fast = self._coalition_fast_path(features, masks.to(first.device), batch)
        if fast is not None:
            return fast
        per_call = max(1, max_rows // max(batch, 1))
        out = []
        for start in range(0, masks.shape[0], per_call):
            chunk = masks[start:start + per_call].to(first.device)
            k = chunk.shape[0]
            stacked = {}
            for i, m in enumerate(self.modalities):
                f = features[m]
                keep = chunk[:, i].view(k, *([1] * f.dim()))
                mixed = torch.where(keep, f.unsqueeze(0), self.absent_feature(m, f).unsqueeze(0))
                stacked[m] = mixed.reshape(k * batch, *f.shape[1:])
            logits = self._checked_logits(
                self.fuse(stacked), k * batch,
                what=f"the model's head (on {k} coalitions x {batch} samples, stacked)")
            out.append(logits.reshape(k, batch, -1))
        return torch.cat(out, dim=0)

    def fuse_coalitions(self, features: Mapping[str, torch.Tensor],
                        masks: torch.Tensor) -> torch.Tensor | None:
        """Optional fast path of :meth:`head_coalitions` for heads with exploitable structure.

        Return logits ``(K, B, C)`` or None to use the generic stacked evaluation. The default
        delegates to ``self.fusion.coalitions(features, absent, masks)`` when the fusion module
        defines it (the additive ``concat`` and ``late`` heads do).
        """
        fusion = getattr(self, "fusion", None)
        if fusion is None or not hasattr(fusion, "coalitions"):
            return None
        absent = {m: self.absent_feature(m, f) for m, f in features.items()}
        return fusion.coalitions(features, absent, masks)

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{m: head(features, present=(m,))}`` for every modality.

        Uses one stacked evaluation when the head has an exact coalition fast path; otherwise one
        head call per modality (so a head with batch statistics sees ordinary batches).
        """
        batch = check_features(features, self.modalities)
        first = features[self.modalities[0]]
        eye = torch.eye(len(self.modalities), dtype=torch.bool, device=first.device)
        fast = self._coalition_fast_path(features, eye, batch)
        if fast is not None:
            return {m: fast[i] for i, m in enumerate(self.modalities)}
        return {m: self.head(features, present=(m,)) for m in self.modalities}

    def forward(
        self, inputs: Mapping[str, torch.Tensor], present: Iterable[str] | str | None = None,
        step=None,
    ):
        """``head(encode(inputs), present)``: logits ``(B, C)``.

        ``step`` (internal): a callable ``step(model, inputs)`` run instead, so that a whole
        training forward (encode, feature transforms, head, unimodal logits) executes inside
        ``DistributedDataParallel.forward`` and DDP synchronises the gradients of its backward.
        """
        if step is not None:
            return step(self, inputs)
        return self.head(self.encode(inputs), present=present)

    # ------------------------------------------------------------------ baselines
    @property
    def baseline_kind(self) -> str:
        """``"zero"`` when no modality has a stored baseline, else ``"mean"``/``"custom"``."""
        if not len(self.baselines._buffers):
            return "zero"
        return getattr(self, "_baseline_kind", "custom")

    @torch.no_grad()
    def set_baseline(
        self,
        baseline: str | Mapping[str, torch.Tensor] = "zero",
        loader: Iterable | None = None,
    ) -> MultimodalModel:
        """Choose what an absent modality's feature is replaced by.

        ``"zero"`` (default, the authors' convention); ``"mean"``: the mean feature of each
        modality over ``loader`` (use the training loader), computed in eval mode; or a dict
        ``{m: Tensor (d_m,)}``.
        """
        if isinstance(baseline, str):
            if baseline == "zero":
                for m in self.modalities:
                    self.baselines.set(m, None)
                return self
            if baseline != "mean":
                raise ValueError(f"baseline must be 'zero', 'mean' or a dict; got {baseline!r}.")
            if loader is None:
                raise ValueError("baseline='mean' needs the training loader: set_baseline('mean', loader).")
            means = self.mean_features(loader)
            for m, v in means.items():
                self.baselines.set(m, v)
            self._baseline_kind = "mean"
            return self
        check_present(baseline.keys(), self.modalities)
        for m, v in baseline.items():
            self.baselines.set(m, torch.as_tensor(v))
        self._baseline_kind = "custom"
        return self

    @torch.no_grad()
    def mean_features(self, loader: Iterable) -> dict[str, torch.Tensor]:
        """Mean encoder output per modality over ``loader`` (eval mode, streaming).

        With a per-sample presence mask (``(inputs, labels, present)`` batches) each modality's
        mean is over the samples where it is present: placeholder inputs of absent samples never
        enter the baseline. Every submodule's train/eval mode (and the global RNG state) ends as
        it was found.
        """
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, torch.Tensor] = {}
        device = _module_device(self)
        with preserved_state(self):
            self.eval()
            for index, batch in enumerate(loader):
                inputs, _, present = unpack_batch_present(batch, self.modalities, batch_index=index)
                feats = self.encode({m: x.to(device) for m, x in inputs.items()})
                for m, f in feats.items():
                    keep = (present or {}).get(m)
                    if keep is not None:
                        keep = keep.to(f.device)
                        f = f[keep]
                    s = f.double().sum(0)
                    n = torch.tensor([float(f.shape[0])], dtype=torch.float64)
                    sums[m] = s if m not in sums else sums[m] + s
                    counts[m] = n if m not in counts else counts[m] + n
        if not counts:
            raise ValueError("the loader is empty: cannot compute mean features.")
        out = {}
        for m, s in sums.items():
            total = all_reduce_sum(counts[m].to(s.device))
            if total.item() == 0:
                raise ValueError(
                    f"modality {m!r} is absent from every sample of the loader (presence mask): "
                    "cannot compute its mean feature. Pass a loader where it is present, or set "
                    "its baseline by hand: model.set_baseline({m: tensor}).")
            out[m] = (all_reduce_sum(s) / total).float()
        return out

    # ------------------------------------------------------------------ parameters
    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """Parameters of ``encoders[modality]`` (by module identity)."""
        check_present((modality,), self.modalities)
        return self.encoders[modality].parameters()

    def named_modality_parameters(self, modality: str) -> Iterator[tuple[str, nn.Parameter]]:
        check_present((modality,), self.modalities)
        return self.encoders[modality].named_parameters()

    def head_parameters(self) -> list[nn.Parameter]:
        """Every parameter that belongs to no encoder (the fusion head)."""
        enc = {id(p) for p in self.encoders.parameters()}
        return [p for p in self.parameters() if id(p) not in enc]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def modality_index(model: MultimodalModel, names: Sequence[str]) -> list[int]:
    return [model.modalities.index(n) for n in names]
