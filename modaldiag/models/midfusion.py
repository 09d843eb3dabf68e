"""``MidFusionClassifier``: per-modality branches with MMTM fusion blocks between their stages.

The architecture of Greedy (Wu, Jastrzębski, Cho, Geras, ICML 2022), for any M >= 2: every
modality m has a branch of S encoder stages; after the stages listed in ``fusion_after`` an MMTM
block (Joze et al., CVPR 2020) lets every branch modulate every other::

    s_m = mean of a_m over its spatial/time dims        (B, c_m)   "squeezed activation"
    e   = relu(W_s [s_1; ...; s_M] + b_s)                (B, h),    h = int(2 * sum_m c_m / ratio)
    g_m = k * sigmoid(W_m e + b_m)                       (B, c_m)   branch m's gate, k = gate_scale
    a_m <- a_m * g_m                                     (broadcast over the spatial dims)

The final activation of branch m, averaged over its spatial dims, is the feature ``f_m`` (B, d_m):
mid fusion happens *inside* :meth:`MidFusionClassifier.encode`. One linear classifier per branch,
``z_m = W^cls_m f_m + b^cls_m``; the prediction (the head) is the mean of branch logits
``z = (1/M) sum_m z_m``, and the training loss of Greedy is ``sum_m CE(z_m)``.

**Contract.** ``encode(inputs)`` returns ``{m: f_m}``; ``head(features, present=S)`` is the mean of
the branch classifiers with every branch outside S at its feature baseline (zero by default:
``z_k = b^cls_k``). The probes therefore work, but "unimodal" means the branch classifier on a
feature that was *still modulated by the other modalities* inside ``encode``: a mid-fusion model's
unimodal accuracy is not that of a model that never saw the other inputs. (Greedy's own diagnostic,
the conditional utilisation rate, has the same caveat in the paper, which replaces the missing
modality's squeezed activations by their training-set means.)

**Mid-fusion protocol (contract extension X6)**, what Greedy and the conditional learning speed
monitor need from a model:

- ``main_params(m)``: ``phi_m``, the parameters of branch m (its stages and its classifier);
- ``bypass_params(m)``: ``psi_m``, the fusion parameters that inject the other modalities into
  branch m: every block's shared squeeze layer ``W_s, b_s`` (counted for every m) and the block's
  excitation ``W_m, b_m`` of branch m;
- ``rebalance(m)``: a context manager; forwards inside it run a *re-balancing step* for m;
- ``branch_logits(features)``: ``{m: z_m}``, the per-branch logits the loss is summed over.

**Re-balancing** (``rebalance_by="gate"``, the authors' code: ``curation_mode`` of their
``MMTM_mitigate``): inside ``rebalance(m)``, branch m's gate ``g_m`` at every fusion block is
replaced by the detached running mean of ``g_m``, so branch m's output no longer depends on the
other modalities' current inputs and m learns from its own input only. ``rebalance_by="squeeze"``
(the authors' ``turnoff_cross_modal_flow``): ``g_m`` is computed from branch m's own squeezed
activation and the detached running means of the *other* branches' squeezed activations. In the
gate form the replaced gate is added as ``mean + 0 * g_m``, so the excitation parameters of m still
receive an (exactly zero) gradient: ``DistributedDataParallel`` then sees every parameter used, and
the optimizer treats them as the authors' PyTorch did (``zero_grad`` left zeros, not None).

**Running means** (buffers of ``encoders[m]``, so they travel with ``state_dict``): the cumulative
mean, since training start, of the batch means of ``g_m`` and ``s_m`` at every block, updated at
every forward in training mode (also during re-balancing steps, from the gates actually computed)::

    mean <- (batch_mean + n * mean) / (n + 1),      n = number of earlier updates

Deviations from the released code: the authors update the *second* modality's running mean from
the *first* modality's gate (``running_avg_weight_skeleton`` from ``vis_out``); here every branch's
mean comes from its own gate. They also update during evaluation forwards; here only in training
mode, so probes and validation leave the model unchanged. Under DDP each rank updates its own
buffers and DDP broadcasts rank 0's at every forward, so every rank re-balances with rank 0's means.

``encoders[m](x)`` alone runs branch m with every gate at its running mean: the re-balancing form of
the branch, the only one that needs no other modality.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..utils.validation import (
    InstanceOf,
    Interval,
    Options,
    Satisfies,
    as_plain_int,
    check_features,
    check_inputs,
    check_present,
    validate_params,
)
from .contract import MultimodalModel
from .fusion import _additive_coalitions
from .names import ModalityDict

__all__ = ["MidFusionClassifier", "MidFusionBranch", "MMTMBlock", "mid_fusion_model",
           "MID_FUSION_PROTOCOL", "missing_protocol"]

#: the attributes a model needs for Greedy (X6); the speed monitor needs the first two
MID_FUSION_PROTOCOL = ("main_params", "bypass_params", "rebalance", "branch_logits")


def missing_protocol(model, needed: Sequence[str] = MID_FUSION_PROTOCOL) -> list[str]:
    """Names in ``needed`` that ``model`` does not define as callables."""
    return [name for name in needed if not callable(getattr(model, name, None))]


def _squeeze(a: torch.Tensor) -> torch.Tensor:
    """``(B, c)``: the mean of an activation ``(B, c, ...)`` over its trailing dims."""
    return a.flatten(2).mean(-1) if a.dim() > 2 else a


def _scale(a: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return a * gate.view(gate.shape + (1,) * (a.dim() - gate.dim()))


class MMTMBlock(nn.Module):
    """One MMTM fusion point: gates ``{m: (B, c_m)}`` from squeezed activations ``{m: (B, c_m)}``.

    ``squeeze`` (shared by all branches) maps the concatenated squeezes to the hidden excitation,
    ``excite[m]`` maps it to branch m's gate logits.
    """

    def __init__(self, channels: Mapping[str, int], ratio: float = 4, gate_scale: float = 2.0):
        super().__init__()
        self.modalities = tuple(channels)
        self.gate_scale = float(gate_scale)
        total = sum(int(c) for c in channels.values())
        hidden = max(1, int(2 * total / ratio))  # the released MMTM: dim_out = 2 * dim / ratio
        self.squeeze = nn.Linear(total, hidden)
        self.excite = ModalityDict({m: nn.Linear(hidden, int(c)) for m, c in channels.items()})

    def forward(self, squeezes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        e = torch.relu(self.squeeze(torch.cat([squeezes[m] for m in self.modalities], dim=1)))
        return {m: self.gate_scale * torch.sigmoid(self.excite[m](e)) for m in self.modalities}

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, gate_scale={self.gate_scale:g}"


class MidFusionBranch(nn.Module):
    """Branch m of a :class:`MidFusionClassifier`: its encoder stages, and the running means of
    its gate and of its squeezed activation at every fusion point (buffers).

    Called alone, ``branch(x)`` runs the stages with every gate at its running mean (the
    re-balancing form, which needs no other modality) and returns ``(B, d_m)``.
    """

    def __init__(self, stages: Sequence[nn.Module], channels: Sequence[int],
                 fusion_after: Sequence[int], gate_scale: float = 2.0):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.fusion_after = tuple(int(i) for i in fusion_after)
        for i in self.fusion_after:
            self.register_buffer(f"gate_mean_{i}", torch.full((int(channels[i]),), 0.5 * gate_scale))
            self.register_buffer(f"squeeze_mean_{i}", torch.zeros(int(channels[i])))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def gate_mean(self, stage: int) -> torch.Tensor:
        return getattr(self, f"gate_mean_{stage}")

    def squeeze_mean(self, stage: int) -> torch.Tensor:
        return getattr(self, f"squeeze_mean_{stage}")

    @torch.no_grad()
    def update_running(self, stage: int, gate: torch.Tensor, squeeze: torch.Tensor) -> None:
        """Cumulative means ``(batch_mean + n mean) / (n + 1)`` (``n`` = :attr:`updates`, advanced
        by the model once per forward)."""
        n = float(self.updates)
        for buf, value in ((self.gate_mean(stage), gate), (self.squeeze_mean(stage), squeeze)):
            batch_mean = value.detach().to(buf.dtype).mean(0)
            buf.copy_((batch_mean + n * buf) / (n + 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x
        for i, stage in enumerate(self.stages):
            a = stage(a)
            if i in self.fusion_after:
                a = _scale(a, self.gate_mean(i).to(a.dtype).expand(a.shape[0], -1))
        return _squeeze(a)


class _FramesToChannels(nn.Module):
    """``(B, T, C, H, W) -> (B, C, T, H, W)`` (video frames first, for Conv3d stages)."""

    def forward(self, x):
        return x.transpose(1, 2)


def _stages_for_shape(shape: Sequence[int], widths: Sequence[int]) -> list[nn.Module]:
    """Encoder stages for one sample's input shape: ``(D,)`` Linear-ReLU, ``(C, T)`` Conv1d,
    ``(C, H, W)`` Conv2d, ``(T, C, H, W)`` Conv3d over (T, H, W) with frame-wise kernels; every
    conv stage is conv-BatchNorm-ReLU and halves the spatial size while it is at least 2."""
    shape = tuple(int(d) for d in shape)
    stages: list[nn.Module] = []
    if len(shape) == 1:
        last = shape[0]
        for j, w in enumerate(widths):
            layers = [nn.Flatten(1)] if j == 0 else []
            stages.append(nn.Sequential(*layers, nn.Linear(last, w), nn.ReLU()))
            last = w
        return stages
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"MidFusionClassifier.for_shapes: no default stages for input shape "
                         f"{shape}; pass your own stages to MidFusionClassifier(stages, channels, "
                         "num_classes).")
    if len(shape) == 4:
        last, spatial = shape[1], [shape[2], shape[3]]
    else:
        last, spatial = shape[0], list(shape[1:])
    conv, norm, pool = {2: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
                        3: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d),
                        4: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)}[len(shape)]
    for j, w in enumerate(widths):
        layers: list[nn.Module] = [_FramesToChannels()] if (j == 0 and len(shape) == 4) else []
        if len(shape) == 4:
            layers.append(conv(last, w, (1, 3, 3), padding=(0, 1, 1)))
        else:
            layers.append(conv(last, w, 5 if len(shape) == 2 else 3,
                               padding=2 if len(shape) == 2 else 1))
        layers += [norm(w), nn.ReLU()]
        if min(spatial) >= 2:
            layers.append(pool((1, 2, 2)) if len(shape) == 4 else pool(2))
            spatial = [s // 2 for s in spatial]
        stages.append(nn.Sequential(*layers))
        last = w
    return stages


_WIDTHS = Satisfies(lambda v: not isinstance(v, (str, bytes)) and len(v) >= 1 and all(
    isinstance(as_plain_int(w), int) and not isinstance(w, bool) and as_plain_int(w) >= 1
    for w in v), "a non-empty sequence of positive integers (one width per stage)")


class MidFusionClassifier(MultimodalModel):
    """Mid fusion for any M >= 2: branches of encoder stages, MMTM blocks between them, one
    classifier per branch, prediction = mean of branch logits (see the module docstring).

    Parameters
    ----------
    stages : dict[str, sequence of nn.Module]
        Per modality, its S encoder stages in order (every modality has the same S). Stage i of
        modality m maps its input to an activation ``(B, channels[m][i], ...)`` (channels first).
    channels : dict[str, sequence of int]
        Per modality, the channel count of each stage's output (same keys and lengths as
        ``stages``); the last one is the feature dimension ``d_m``.
    num_classes : int >= 2
    fusion_after : sequence of int, optional
        Stage indices followed by an MMTM block (default: every stage; at least one).
    ratio : float > 0, default 4
        MMTM bottleneck: the hidden excitation has ``int(2 * sum_m c_m / ratio)`` units (the
        authors' ``MMTM(…, ratio=4)``).
    rebalance_by : {"gate", "squeeze"}, default "gate"
        What :meth:`rebalance` replaces: branch m's gate by its running mean (authors'
        re-balancing step), or the other branches' squeezed activations in m's gate by their
        running means (authors' ``turnoff_cross_modal_flow``).
    gate_scale : float > 0, default 2.0
        ``k`` in ``g_m = k * sigmoid(...)``: 2 is the MMTM paper's ``2 sigma(E)`` (a gate of 1 on
        average at initialisation, so activations keep their scale through the blocks); 1 is the
        Greedy authors' released MMTM (plain sigmoid: every block halves the activations at
        initialisation, and with SGD at lr 0.01 the model learns several times slower).

    Build one for the embedded datasets with :func:`mid_fusion_model` or
    :meth:`for_shapes`.
    """

    _parameter_constraints = {
        "stages": [InstanceOf(Mapping, what="a dict {modality name: list of nn.Module stages}")],
        "channels": [InstanceOf(Mapping, what="a dict {modality name: list of ints}")],
        "num_classes": [Interval(2, None, integer=True)],
        "fusion_after": [None, Satisfies(lambda v: not isinstance(v, (str, bytes)) and len(v) >= 1,
                                         "a non-empty sequence of stage indices")],
        "ratio": [Interval(0, None, closed="neither")],
        "rebalance_by": [Options("gate", "squeeze")],
        "gate_scale": [Interval(0, None, closed="neither")],
    }

    def __init__(self, stages: Mapping[str, Sequence[nn.Module]], channels: Mapping[str, Sequence[int]],
                 num_classes: int, *, fusion_after: Sequence[int] | None = None, ratio: float = 4,
                 rebalance_by: str = "gate", gate_scale: float = 2.0):
        num_classes = as_plain_int(num_classes)
        validate_params(self._parameter_constraints, {
            "stages": stages, "channels": channels, "num_classes": num_classes,
            "fusion_after": fusion_after, "ratio": ratio, "rebalance_by": rebalance_by,
            "gate_scale": gate_scale},
            "MidFusionClassifier")
        super().__init__(stages.keys(), num_classes)
        if len(self.modalities) < 2:
            raise ValueError(f"MidFusionClassifier needs at least 2 modalities; got "
                             f"{list(self.modalities)}.")
        if set(channels) != set(stages):
            raise ValueError(f"MidFusionClassifier: channels keys {sorted(channels)} must equal "
                             f"stages keys {sorted(stages)}.")
        counts = {m: len(stages[m]) for m in self.modalities}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ValueError(f"MidFusionClassifier: every modality needs the same number (>= 1) of "
                             f"stages, so that fusion block i joins stage i of every branch; got "
                             f"{counts}.")
        n_stages = next(iter(counts.values()))
        chans = {}
        for m in self.modalities:
            validate_params({f"channels[{m!r}]": [_WIDTHS]}, {f"channels[{m!r}]": channels[m]},
                            "MidFusionClassifier")
            if len(channels[m]) != n_stages:
                raise ValueError(f"MidFusionClassifier: channels[{m!r}] has {len(channels[m])} "
                                 f"entries for {n_stages} stages; give one per stage.")
            chans[m] = [int(as_plain_int(c)) for c in channels[m]]
            for j, st in enumerate(stages[m]):
                if not isinstance(st, nn.Module):
                    raise TypeError(f"stage {j} of modality {m!r} must be an nn.Module; got "
                                    f"{type(st).__name__}.")
        after = list(range(n_stages)) if fusion_after is None else sorted(
            {int(as_plain_int(i)) for i in fusion_after})
        bad = [i for i in after if not 0 <= i < n_stages]
        if bad:
            raise ValueError(f"MidFusionClassifier: fusion_after {bad} out of range for "
                             f"{n_stages} stages (indices 0..{n_stages - 1}).")
        self.fusion_after = tuple(after)
        self.ratio, self.rebalance_by = float(ratio), rebalance_by
        self.fusion_type = "mid"
        self.channels = chans
        self.feature_dims = {m: chans[m][-1] for m in self.modalities}
        self.gate_scale = float(gate_scale)
        self.encoders = ModalityDict({m: MidFusionBranch(stages[m], chans[m], after, gate_scale)
                                      for m in self.modalities})
        self.fusion_blocks = nn.ModuleList([
            MMTMBlock({m: chans[m][i] for m in self.modalities}, ratio, gate_scale) for i in after])
        self.classifiers = ModalityDict({m: nn.Linear(self.feature_dims[m], num_classes)
                                         for m in self.modalities})
        self._rebalancing: str | None = None

    @classmethod
    def for_shapes(cls, input_shapes: Mapping[str, Sequence[int]], num_classes: int,
                   widths: Sequence[int] = (32, 64), **kwargs) -> MidFusionClassifier:
        """Default stages for one sample's input shape per modality (``(D,)`` MLP, ``(C, T)``
        Conv1d, ``(C, H, W)`` Conv2d, ``(T, C, H, W)`` frame-wise Conv3d), one stage per width,
        an MMTM block after every stage; ``kwargs`` go to the constructor."""
        validate_params({"widths": [_WIDTHS]}, {"widths": widths}, "MidFusionClassifier.for_shapes")
        widths = [int(as_plain_int(w)) for w in widths]
        stages = {m: _stages_for_shape(s, widths) for m, s in input_shapes.items()}
        return cls(stages, {m: list(widths) for m in input_shapes}, num_classes, **kwargs)

    # ------------------------------------------------------------------ protocol (X6)
    def main_params(self, modality: str) -> list[nn.Parameter]:
        """``phi_m``: branch m's stages and classifier."""
        check_present((modality,), self.modalities)
        return list(self.encoders[modality].parameters()) + list(self.classifiers[modality].parameters())

    def bypass_params(self, modality: str) -> list[nn.Parameter]:
        """``psi_m``: every block's shared squeeze layer and its excitation of branch m."""
        check_present((modality,), self.modalities)
        out: list[nn.Parameter] = []
        for block in self.fusion_blocks:
            out += list(block.squeeze.parameters()) + list(block.excite[modality].parameters())
        return out

    @property
    def rebalancing(self) -> str | None:
        """The modality whose branch the current forwards re-balance, or None."""
        return self._rebalancing

    @contextlib.contextmanager
    def rebalance(self, modality: str | None) -> Iterator[MidFusionClassifier]:
        """Forwards inside the block run re-balancing steps for ``modality`` (None: ordinary)."""
        if modality is not None:
            check_present((modality,), self.modalities)
        previous, self._rebalancing = self._rebalancing, modality
        try:
            yield self
        finally:
            self._rebalancing = previous

    def branch_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{m: z_m}``: each branch classifier on its own feature, ``(B, C)`` (features cast to
        the classifier's dtype, so that half-precision features from an autocast forward work
        outside it)."""
        check_features(features, self.modalities)
        out = {}
        for m in self.modalities:
            lin = self.classifiers[m]
            out[m] = lin(features[m].to(lin.weight.dtype))
        return out

    # ------------------------------------------------------------------ contract
    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the branches stage by stage with the MMTM blocks between them; ``{m: (B, d_m)}``."""
        check_inputs(inputs, self.modalities)
        acts = dict(inputs)
        target = self._rebalancing
        update = self.training
        block_index = 0
        for i in range(len(self.encoders[self.modalities[0]].stages)):
            for m in self.modalities:
                x = acts[m]
                try:
                    acts[m] = self.encoders[m].stages[i](x)
                except (RuntimeError, TypeError) as exc:
                    raise ValueError(
                        f"stage {i} of modality {m!r} failed on its input of shape "
                        f"{tuple(x.shape)}, dtype {x.dtype}: {exc} -- check the stage's expected "
                        "input shape against the previous stage's output (channels first).") from exc
                if acts[m].dim() < 2 or acts[m].shape[1] != self.channels[m][i]:
                    raise ValueError(
                        f"stage {i} of modality {m!r} returned shape {tuple(acts[m].shape)}; "
                        f"expected (B, {self.channels[m][i]}, ...) as declared in channels.")
            if i not in self.fusion_after:
                continue
            block = self.fusion_blocks[block_index]
            block_index += 1
            squeezes = {m: _squeeze(acts[m]) for m in self.modalities}
            gates = block(squeezes)
            if update:
                for m in self.modalities:
                    self.encoders[m].update_running(i, gates[m], squeezes[m])
            if target is not None:
                gates[target] = self._rebalanced_gate(block, i, target, squeezes, gates[target])
            acts = {m: _scale(acts[m], gates[m]) for m in self.modalities}
        if update:
            for m in self.modalities:
                self.encoders[m].updates.add_(1)
        features = {m: _squeeze(acts[m]) for m in self.modalities}
        self._check_feature_shapes(features)
        return features

    def _rebalanced_gate(self, block: MMTMBlock, stage: int, target: str,
                         squeezes: Mapping[str, torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
        if self.rebalance_by == "gate":
            mean = self.encoders[target].gate_mean(stage).detach().clone().to(gate.dtype)
            return mean.expand_as(gate) + 0.0 * gate  # exactly zero gradient, every param used
        mixed = {m: squeezes[m] if m == target else
                 self.encoders[m].squeeze_mean(stage).detach().clone().to(squeezes[m].dtype)
                 .expand_as(squeezes[m]) for m in self.modalities}
        return block(mixed)[target]

    def _check_feature_shapes(self, features):
        for m, f in features.items():
            if f.dim() != 2 or f.shape[1] != self.feature_dims[m]:
                raise ValueError(f"branch {m!r} produced features of shape {tuple(f.shape)}; "
                                 f"expected (B, {self.feature_dims[m]}).")

    def fuse(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = [self.classifiers[m](features[m]) for m in self.modalities]
        return torch.stack(logits).mean(0)

    def fuse_coalitions(self, features, masks):
        """Exact fast path: the mean of branch logits is additive over modalities."""
        k = float(len(self.modalities))
        terms = [self.classifiers[m](features[m]) / k for m in self.modalities]
        absent = [self.classifiers[m](self.absent_feature(m, features[m])) / k
                  for m in self.modalities]
        return _additive_coalitions(terms, absent, None, masks)

    def extra_repr(self) -> str:
        return (f"modalities={self.modalities}, fusion='mid', fusion_after={self.fusion_after}, "
                f"rebalance_by={self.rebalance_by!r}, num_classes={self.num_classes}")


def mid_fusion_model(data, widths: Sequence[int] = (32, 64), **kwargs) -> MidFusionClassifier:
    """A :class:`MidFusionClassifier` with default stages for a dataset bundle (what
    :func:`modaldiag.datasets.load` / ``synthetic`` return); ``kwargs`` go to the constructor."""
    validate_params({
        "data": [Satisfies(lambda d: all(hasattr(d, a) for a in ("input_shapes", "modalities",
                                                                 "num_classes")),
                           "a dataset bundle with .input_shapes, .modalities and .num_classes "
                           "(what md.datasets.load / synthetic / av_folder return)")]},
        {"data": data}, "mid_fusion_model")
    shapes = {m: data.input_shapes[m] for m in data.modalities}
    return MidFusionClassifier.for_shapes(shapes, data.num_classes, widths, **kwargs)

