"""How many CPU threads torch uses for modaldiag's work (``--threads N`` on every command).

``set_threads(n)`` sets torch's intra-op thread count and the BLAS/OpenMP pools of numpy, scipy
and scikit-learn; ``set_threads(None)`` applies the default: the ``MODALDIAG_THREADS``
environment variable when set, else ``OMP_NUM_THREADS`` when set, else :func:`default_threads`,
which uses the cores that are idle right now (at least one). Measured on a 2-core machine
(docs/performance.md): when torch's threads share cores with other CPU-bound work its thread pool
collapses (hapt, one epoch: 5.4 s with 1 thread, 47 s with 2 at load 2.5), while on idle cores a
second thread gains little, so a shared machine is best served by one thread per busy core less.
"""

from __future__ import annotations

import os

import torch
from threadpoolctl import threadpool_limits

__all__ = ["set_threads", "default_threads", "available_cores", "load_average", "ENV_VAR"]

ENV_VAR = "MODALDIAG_THREADS"
#: what OpenMP and BLAS libraries read when they load; set by :func:`set_threads`
_POOL_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: the values set_threads last wrote (told apart from the user's own OMP_NUM_THREADS)
_written: dict[str, str | None] = dict.fromkeys(_POOL_VARS)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), None where the OS does not report it."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def default_threads(load: float | None = None, cores: int | None = None) -> int:
    """The thread count used when none is asked for: the idle cores, at least 1.

    ``round(cores - load)`` clipped to ``[1, cores]``, where ``cores`` is
    :func:`available_cores` and ``load`` the 1-minute load average (:func:`load_average`).
    A quiet machine gets every core; a machine whose cores are all busy (another training, a
    test suite, a benchmark) gets 1 thread, which is many times faster there than a thread pool
    fighting for the same cores (see docs/performance.md). Where the OS reports no load
    average, every core.

    Parameters
    ----------
    load : float >= 0, optional
        Default: the current 1-minute load average.
    cores : int >= 1, optional
        Default: :func:`available_cores`.
    """
    cores = available_cores() if cores is None else max(1, int(cores))
    load = load_average() if load is None else float(load)
    if load is None or not load == load:  # no load average (or NaN): every core
        return cores
    return int(min(cores, max(1, round(cores - max(0.0, load)))))


def _from_env() -> int | None:
    """``$MODALDIAG_THREADS`` (a bad value is an error), else a valid ``$OMP_NUM_THREADS`` (the
    usual way to pin a process's threads, which torch honours too), else None."""
    text = os.environ.get(ENV_VAR)
    if text is None or not text.strip():
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp == _written["OMP_NUM_THREADS"]:  # set_threads wrote it: not the user's choice
            return None
        return int(omp) if omp.isdigit() and int(omp) >= 1 else None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_VAR}={text!r} must be a positive integer (number of CPU threads).")
    return value


def set_threads(n: int | None = None) -> int:
    """Set the CPU thread count of torch and of the BLAS/OpenMP pools numpy, scipy and
    scikit-learn use (via threadpoolctl); returns torch's count now in use.

    Parameters
    ----------
    n : int >= 1 or None, default None
        None: ``$MODALDIAG_THREADS`` if set, else ``$OMP_NUM_THREADS`` if set, else
        :func:`default_threads` (the idle cores).

    Notes
    -----
    Also sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS`` in
    ``os.environ`` (so libraries loaded later, and subprocesses, use ``n`` too).

    Examples
    --------
    >>> import modaldiag as md
    >>> md.set_threads(1)      # one thread: the fastest choice on a busy shared machine
    1
    """
    if n is None:
        n = _from_env() or default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer; got {n!r}.")
    torch.set_num_threads(n)
    # numpy / scipy / scikit-learn (separability's k-means and linear probe) run on their own
    # BLAS and OpenMP pools, which collapse under contention exactly like torch's: limit those
    # loaded now, and tell those loaded later (scikit-learn's OpenMP runtime) through the
    # variables they read when they load
    for var in _POOL_VARS:
        os.environ[var] = _written[var] = str(n)
    threadpool_limits(limits=n)
    return torch.get_num_threads()
