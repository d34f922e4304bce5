"""Where the parallel work runs: serial, local processes or a Dask cluster.

Every executor is a :class:`concurrent.futures.Executor`; stages hand :func:`map_shards` a
pure, module-level function and a list of shards and get the results back in order. Nothing
here knows about images, and the shard functions know nothing about executors, so a run
gives the same results whichever executor runs it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from .errors import PrepError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "serial", "dask")
T = TypeVar("T")


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SerialExecutor(Executor):
    """Runs each call at submit time in this process: for debugging and tests."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to the caller through the future
            future.set_exception(err)
        return future


@contextlib.contextmanager
def make_executor(kind: str = "local", workers: int | None = None, scheduler: str | None = None) -> Iterator[Executor]:
    """Open an executor of ``kind`` with ``workers`` processes (all cores by default)."""
    workers = workers or cpu_count()
    if workers < 1:
        raise PrepError(f"--workers must be at least 1; received {workers}")
    if kind == "serial" or (kind == "local" and workers == 1):
        yield SerialExecutor()
    elif kind == "local":
        method = "fork" if sys.platform == "linux" else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            yield pool
    elif kind == "dask":
        with _dask_executor(workers, scheduler) as executor:
            yield executor
    else:
        raise PrepError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}")


@contextlib.contextmanager
def _dask_executor(workers: int, scheduler: str | None) -> Iterator[Executor]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise PrepError("--executor dask needs Dask: pip install 'prep[dask]'") from None
    scheduler = scheduler or os.environ.get("PREP_SCHEDULER")
    with contextlib.ExitStack() as stack:
        if scheduler:
            try:
                client = stack.enter_context(Client(scheduler, timeout="10s"))
            except OSError as err:
                raise PrepError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
        else:
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    silence_logs=logging.WARNING,
                )
            )
            client = stack.enter_context(Client(cluster))
        log.info("dask: %s", client)
        # pure=False: two shards with equal arguments are still two tasks; retries cover a
        # task that raised, and Dask reschedules the tasks of a worker that died on its own.
        yield client.get_executor(pure=False, retries=2)


def map_shards(
    executor: Executor,
    fn: Callable[..., T],
    shards: Sequence[Any],
    *args: Any,
    in_flight: int | None = None,
) -> Iterator[T]:
    """Yield ``fn(shard, *args)`` for each shard, in order, keeping at most ``in_flight`` pending.

    The bound keeps memory flat however many shards there are: results are consumed (written)
    by the caller while later shards are still being computed.
    """
    in_flight = in_flight or 4 * cpu_count()
    pending: deque[Future] = deque()
    shards_iter = iter(shards)
    for shard in shards_iter:
        pending.append(executor.submit(fn, shard, *args))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def chunk(items: Sequence[T], workers: int, *, max_size: int = 256, min_size: int = 8) -> list[Sequence[T]]:
    """Cut ``items`` into shards: several per worker for balance, none too large to retry cheaply."""
    if not items:
        return []
    size = max(min_size, min(max_size, -(-len(items) // (4 * max(1, workers)))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def progress(total: int, desc: str, enabled: bool = True, unit: str = "img"):
    """A progress bar (count, rate, ETA) on stderr; silent when disabled or not a terminal run."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def iter_with_progress(results: Iterable[Any], bar, weight: Callable[[Any], int] = len) -> Iterator[Any]:
    for result in results:
        bar.update(weight(result))
        yield result
