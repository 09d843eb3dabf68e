"""Modality names as container keys.

Modality names are user strings. ``nn.ModuleDict`` and ``register_buffer`` refuse keys that are
attributes of the container (``"keys"``, ``"type"``, ``"training"``, ``"forward"``, ...), so a
name like that is stored under an *escaped key* (``"~keys"``) while every lookup still uses the
name: ``model.encoders["keys"]`` returns the encoder, ``list(model.encoders)`` lists the names.

The escape is injective: a name is stored as itself unless it starts with :data:`ESCAPE` or
collides with an attribute of the container, in which case it is stored as ``ESCAPE + name``.
Ordinary names therefore keep their ``state_dict`` keys (``encoders.audio.weight``); an escaped
one appears as ``encoders.~keys.weight``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["ESCAPE", "modality_key", "modality_from_key", "ModalityDict"]

#: prefix of an escaped key
ESCAPE = "~"

_INSTANCE_ATTRIBUTES = frozenset(vars(nn.ModuleDict()))


def modality_key(name: str, owner: type = nn.ModuleDict) -> str:
    """The key under which modality ``name`` is stored in a container of type ``owner``."""
    if name.startswith(ESCAPE) or name in _INSTANCE_ATTRIBUTES or hasattr(owner, name):
        return ESCAPE + name
    return name


def modality_from_key(key: str) -> str:
    """Inverse of :func:`modality_key` (for any ``owner``)."""
    return key[len(ESCAPE):] if key.startswith(ESCAPE) else key


class ModalityDict(nn.ModuleDict):
    """An ``nn.ModuleDict`` indexed by modality name, whatever the name.

    Behaves like ``nn.ModuleDict`` (``d[name]``, ``name in d``, ``iter``, ``keys``, ``items``,
    ``values``, ``len``) with names as keys; names that would collide with a ``ModuleDict``
    attribute are stored under :func:`modality_key`.
    """

    def __getitem__(self, name: str) -> nn.Module:
        try:
            return self._modules[modality_key(name)]
        except (KeyError, AttributeError, TypeError):
            raise KeyError(name) from None

    def __setitem__(self, name: str, module: nn.Module) -> None:
        self.add_module(modality_key(name), module)

    def __delitem__(self, name: str) -> None:
        try:
            del self._modules[modality_key(name)]
        except (KeyError, AttributeError, TypeError):
            raise KeyError(name) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and modality_key(name) in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter([modality_from_key(k) for k in self._modules])

    def pop(self, name: str) -> nn.Module:
        module = self[name]
        del self[name]
        return module

    def keys(self) -> list[str]:  # type: ignore[override]
        return [modality_from_key(k) for k in self._modules]

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(modality_from_key(k), m) for k, m in self._modules.items()]

    def values(self) -> list[nn.Module]:  # type: ignore[override]
        return list(self._modules.values())
