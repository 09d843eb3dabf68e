"""Where cells run: this process, local worker processes, or a Ray cluster. No scheduler of our own.

* ``backend="local", jobs=1``: one after the other, in this process.
* ``backend="local", jobs=N``: :class:`concurrent.futures.ProcessPoolExecutor` with N spawned
  processes; each worker sets its thread count once (:func:`modaldiag.set_threads`) and receives
  the in-memory datasets once (the pool's initializer).
* ``backend="ray"``: every task is a ``ray.remote`` task (``num_cpus`` = its thread count);
  ``ray.init()`` is called when Ray is not initialised yet (``address``: the ``ray_address``
  argument, else ``$RAY_ADDRESS``, else a local instance, shut down again at the end).

Results are handed to ``on_done(task, result)`` in this process as each task finishes, so they
are cached at once. When a task fails, nothing new is started, the tasks already running finish
(and are handed over), and the first error is raised. Ctrl-C cancels what has not finished.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ..utils.threads import set_threads
from .cells import init_worker, register_data

__all__ = ["BACKENDS", "execute", "require_ray"]

BACKENDS = ("local", "ray")


def require_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray, which is not installed; install it with "
                          "`pip install modaldiag[ray]` (or `pip install 'ray[default]'`).") from None
    return ray


def execute(fn: Callable, tasks: Sequence, *, on_done: Callable, backend: str = "local",
            jobs: int = 1, threads: int | None = None, objects: Mapping | None = None,
            ray_address: str | None = None) -> None:
    """Run ``fn(task)`` for every task on ``backend``; ``on_done(task, result)`` as each ends."""
    tasks = list(tasks)
    if not tasks:
        return
    objects = dict(objects or {})
    if backend == "ray":
        _run_ray(fn, tasks, on_done, threads, objects, ray_address)
    elif jobs <= 1:
        for task in tasks:
            on_done(task, fn(task))
    else:
        _run_processes(fn, tasks, on_done, jobs, threads, objects)


def _run_processes(fn, tasks, on_done, jobs, threads, objects) -> None:
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                               initializer=init_worker, initargs=(threads, objects))
    futures = {pool.submit(fn, task): task for task in tasks}
    error = None
    try:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                exc = future.exception()
                if exc is not None:
                    if error is None:
                        error = exc
                        for other in pending:  # start nothing new; running tasks finish
                            other.cancel()
                    continue
                on_done(futures[future], future.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if error is not None:
        raise error


def _ray_task(fn, task, threads, objects):
    """Runs inside a Ray worker process."""
    if threads is not None:
        set_threads(int(threads))
    register_data(objects)
    return fn(task)


def _run_ray(fn, tasks, on_done, threads, objects, ray_address) -> None:
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        started = True
    try:
        remote = ray.remote(num_cpus=threads or 1, max_retries=0)(_ray_task)
        shared = ray.put(objects)
        refs = {remote.remote(fn, task, threads, shared): task for task in tasks}
        pending, error = list(refs), None
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError) as exc:
                        if isinstance(exc, ray.exceptions.TaskCancelledError):
                            continue
                        if error is None:
                            error = exc
                            for other in pending:
                                ray.cancel(other)
                        continue
                    on_done(refs[ref], result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        if error is not None:
            cause = error.as_instanceof_cause() if hasattr(error, "as_instanceof_cause") else error
            raise cause
    finally:
        if started:
            ray.shutdown()
