"""``adapt_loader``: present any loader as modaldiag's ``(inputs: dict, labels)`` batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from ..utils.validation import InstanceOf, validate_params

__all__ = ["AdaptedLoader", "adapt_loader"]

_parameter_constraints = {
    "loader": [InstanceOf(Iterable, what="an iterable loader (e.g. a torch DataLoader)")],
    "fn": [InstanceOf(Callable, what="a callable fn(batch) -> (inputs: dict[str, Tensor], labels)")],
}


class AdaptedLoader:
    """A re-iterable view of ``loader`` whose batches are ``fn(batch)``. Built by :func:`adapt_loader`.

    Every ``iter()`` starts a fresh pass over ``loader`` (so every epoch works); ``len()``,
    ``.dataset`` and ``.batch_size`` are the loader's own when it has them. ``.loader`` and
    ``.fn`` are the wrapped loader and the adapter.
    """

    def __init__(self, loader: Iterable, fn: Callable[[object], tuple[Mapping, torch.Tensor]]):
        self.loader, self.fn = loader, fn

    def adapt(self, batch) -> tuple[Mapping, torch.Tensor]:
        """``fn(batch)``, checked to be an ``(inputs: dict, labels)`` pair."""
        return _checked_pair(self.fn(batch), None)

    def __iter__(self) -> Iterator[tuple[Mapping, torch.Tensor]]:
        for index, batch in enumerate(self.loader):
            try:
                out = self.fn(batch)
            except Exception as exc:  # noqa: BLE001 - re-raised with the batch it failed on
                raise ValueError(
                    f"adapt_loader: fn failed on batch {index} ({_describe(batch)}): "
                    f"{type(exc).__name__}: {exc}") from exc
            yield _checked_pair(out, index)

    @property
    def dataset(self):
        try:
            return self.loader.dataset
        except AttributeError:
            raise AttributeError(f"the adapted loader ({type(self.loader).__name__}) has no "
                                 "dataset") from None

    @property
    def batch_size(self):
        try:
            return self.loader.batch_size
        except AttributeError:
            raise AttributeError(f"the adapted loader ({type(self.loader).__name__}) has no "
                                 "batch_size") from None

    def __repr__(self) -> str:
        return f"AdaptedLoader({self.loader!r}, fn={getattr(self.fn, '__name__', self.fn)!r})"


class _SizedAdaptedLoader(AdaptedLoader):
    """An :class:`AdaptedLoader` over a loader that has ``len()``."""

    def __len__(self) -> int:
        return len(self.loader)


def _checked_pair(out, index: int | None) -> tuple[Mapping, torch.Tensor]:
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Mapping):
        return out[0], out[1]
    where = f" for batch {index}" if index is not None else ""
    raise ValueError(
        f"adapt_loader: fn returned a {_describe(out)}{where}; it must return a pair (inputs: "
        "dict[str, Tensor], labels), e.g. lambda b: ({'audio': b[0], 'visual': b[1]}, b[2]).")


def _describe(batch) -> str:
    if isinstance(batch, (tuple, list)):
        parts = [f"{type(b).__name__}{tuple(b.shape) if isinstance(b, torch.Tensor) else ''}"
                 for b in batch]
        return f"{type(batch).__name__} of {len(batch)}: {', '.join(parts)}"
    return type(batch).__name__


def adapt_loader(loader: Iterable, fn: Callable[[object], tuple[Mapping, torch.Tensor]]) -> AdaptedLoader:
    """Map every batch of ``loader`` with ``fn``, re-iterably, so modaldiag can read it.

    modaldiag reads ``(inputs: dict[str, Tensor], labels: LongTensor)`` batches; published
    audio-visual code yields tuples such as ``(audio, video, label)``. Nothing is copied: ``fn``
    runs on each batch as it is drawn.

    Parameters
    ----------
    loader : iterable
        A re-iterable loader (a ``DataLoader``, a list of batches, ...). A one-shot iterator or
        generator is refused: it would be empty from the second epoch on.
    fn : callable
        ``fn(batch) -> (inputs, labels)`` with ``inputs = {modality: Tensor (B, ...)}``.

    Returns
    -------
    AdaptedLoader
        Iterable any number of times; has ``len()`` when ``loader`` does; ``.dataset`` and
        ``.batch_size`` are ``loader``'s.

    Example
    -------
    >>> train = md.datasets.adapt_loader(
    ...     av_loader, lambda b: ({"audio": b[0], "visual": b[1]}, b[2]))
    >>> md.fit(model, train, epochs=30)
    """
    validate_params(_parameter_constraints, {"loader": loader, "fn": fn}, "adapt_loader")
    if isinstance(loader, Iterator):
        raise ValueError(
            f"adapt_loader: loader is a one-shot {type(loader).__name__} (an iterator or "
            "generator), which is exhausted after the first epoch; pass the DataLoader (or list of "
            "batches) itself, not iter(loader) or a generator expression.")
    if isinstance(loader, AdaptedLoader):
        inner, outer = loader.fn, fn
        return adapt_loader(loader.loader, lambda batch: outer(inner(batch)))
    cls = _SizedAdaptedLoader if hasattr(type(loader), "__len__") else AdaptedLoader
    return cls(loader, fn)
