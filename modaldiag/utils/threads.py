"""How many CPU threads torch uses for modaldiag's work (``--threads N`` on every command).

``set_threads(n)`` sets torch's intra-op thread count; ``set_threads(None)`` applies the
default: the ``MODALDIAG_THREADS`` environment variable when set, else :func:`default_threads`.
"""

from __future__ import annotations

import os

import torch

__all__ = ["set_threads", "default_threads", "ENV_VAR"]

ENV_VAR = "MODALDIAG_THREADS"


def default_threads() -> int:
    """The thread count used when none is asked for (see docs/performance.md)."""
    return torch.get_num_threads()


def _from_env() -> int | None:
    text = os.environ.get(ENV_VAR)
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_VAR}={text!r} must be a positive integer (number of CPU threads).")
    return value


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU thread count; returns the count now in use.

    Parameters
    ----------
    n : int >= 1 or None, default None
        None: ``$MODALDIAG_THREADS`` if set, else :func:`default_threads`.
    """
    if n is None:
        n = _from_env() or default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer; got {n!r}.")
    torch.set_num_threads(n)
    return torch.get_num_threads()
