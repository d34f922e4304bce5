"""Where the parallel work runs: serial, local processes or a Dask cluster.

Every executor is a :class:`concurrent.futures.Executor`; stages hand :func:`map_shards` a
pure, module-level function and a list of shards and get the results back in order. Nothing
here knows about images, and the shard functions know nothing about executors, so a run
gives the same results whichever executor runs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import weakref
from collections import deque
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .errors import PrepError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "serial", "dask")
DASK_MISSING = "--executor dask needs Dask: pip install 'dask[distributed]'"
T = TypeVar("T")
WORKERS_PER_CORE = 4  # the most worker processes prep starts per core (--workers above is lowered)
IN_FLIGHT_PER_SLOT = 4  # shards submitted per worker thread: enough to hide a round-trip
# Dask's defaults changed for the local cluster prep starts (each measured on resize, 20,000
# photos, 2 workers on 2 cores; docs/cluster.md gives the same as a file for other clusters):
LOCAL_CLUSTER_CONFIG = {
    # the workers' sampling profiler (for the dashboard) costs them ~10% CPU
    "distributed.worker.profile.enabled": False,
    # the nanny sets MALLOC_TRIM_THRESHOLD_ in every worker it spawns, to hand freed memory back
    # at once, which costs 25-50% on many small images (None unsets it; the other variables,
    # one BLAS/OpenMP thread per worker, stay)
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    # every process checks its event loop every 20 ms, workers and nannies their memory every
    # 100 ms, and the system monitor samples every 500 ms: on cores the workers keep busy, this
    # housekeeping costs 5-7% of the run (17.3-18.4 s against 18.6-19.2 s, 4 runs each)
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "1s",  # read by the nannies too
    "distributed.admin.system-monitor.interval": "5s",
}

# The client's connection keeps its last messages for debugging, 1,000 by default: each sent
# shard's arguments (up to ~100 KB), so up to 100 MB, and 0.14 KB per image up to 140,000 images
# (measured). A few are enough to debug with; the same for a local cluster's scheduler.
CLIENT_CONFIG = {"distributed.admin.low-level-log-length": 16}


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SerialExecutor(Executor):
    """Runs each call at submit time in this process: for debugging and tests."""

    slots = 1

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to the caller through the future
            future.set_exception(err)
        return future


def _local_executor(workers: int) -> Executor:
    """A pool of worker processes on this machine. (multiprocessing is imported here, not with
    this module: the commands that run no pool start without it.)"""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
                               initargs=(os.getpid(),))
    pool.slots = workers  # type: ignore[attr-defined]
    # Fork every worker now, while this process is still small and has no other threads:
    # a pool forks on its first task, which may come after a progress bar's thread has
    # started or tensorflow has been imported (a known deadlock hazard, and wasted memory).
    pool.submit(int).result()
    return pool


def _start_worker(parent: int) -> None:
    """In a worker: Ctrl-C reaches every process of the terminal's group, and it is the main
    process's to handle (it stops the pool and says how to resume), not a traceback per worker;
    so are SIGTERM and SIGHUP. A worker dies with the main process, even one killed by kill -9:
    on Linux the kernel kills it when the thread that forked it ends, and the pool forks from
    the main thread (:func:`_local_executor`)."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the main process ended before the line above
        os._exit(1)


def require(kind: str) -> None:
    """Fail with a one-line error if ``kind`` is not an executor, or its package is missing."""
    if kind not in EXECUTORS:
        raise PrepError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}")
    if kind == "dask" and importlib.util.find_spec("distributed") is None:
        raise PrepError(DASK_MISSING)


def bounded_workers(kind: str, workers: int | None, scheduler: str | None = None) -> int | None:
    """``workers``, at most :data:`WORKERS_PER_CORE` per core where prep starts them (local
    processes, a local Dask cluster): more only add memory and start-up time, as each image
    costs a core's time. A cluster's size is its own (``scheduler``)."""
    if workers is None or kind == "serial" or (kind == "dask" and (scheduler or os.environ.get("PREP_SCHEDULER"))):
        return workers
    return min(workers, WORKERS_PER_CORE * cpu_count())


@contextlib.contextmanager
def make_executor(kind: str = "local", workers: int | None = None, scheduler: str | None = None) -> Iterator[Executor]:
    """Open an executor of ``kind`` with ``workers`` processes (all cores by default).

    ``dask`` connects to the cluster whose scheduler is at ``scheduler`` (or $PREP_SCHEDULER),
    or else starts a local cluster of ``workers`` single-threaded processes.
    """
    require(kind)
    workers = bounded_workers(kind, workers, scheduler) or cpu_count()
    if workers < 1:
        raise PrepError(f"--workers must be at least 1; received {workers}")
    if kind == "serial" or (kind == "local" and workers == 1):
        yield SerialExecutor()
    elif kind == "local":
        pool = _local_executor(workers)
        try:
            yield pool
        except BaseException as err:  # an error or Ctrl-C: the shards still queued are not worth running
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(cancel_futures=True)
            if isinstance(err, BrokenExecutor):  # a worker died: how, to say so
                err.worker_ends = [p.exitcode for p in processes]  # type: ignore[attr-defined]
            raise
        pool.shutdown()
    else:
        with _dask_executor(workers, scheduler or os.environ.get("PREP_SCHEDULER")) as executor:
            yield executor


@contextlib.contextmanager
def _dask_executor(workers: int, scheduler: str | None) -> Iterator[Executor]:
    import uuid

    try:
        import dask
        from distributed import Client, LocalCluster
        from distributed.cfexecutor import ClientExecutor
    except ImportError:
        raise PrepError(DASK_MISSING) from None
    # distributed logs every worker start and stop at INFO: show that only with -vv
    logging.getLogger("distributed").setLevel(logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING)

    class DaskExecutor(ClientExecutor):
        def submit(self, fn, /, *args, **kwargs):
            # named after fn, not the wrapper, on the dashboard and in the scheduler's records
            key = f"{getattr(fn, '__name__', 'task')}-{uuid.uuid4().hex}"  # unique, as Dask's own
            return _unboxed(super().submit(_call_boxed, fn, _Box((args, kwargs)), key=key))

        @property
        def slots(self) -> int:
            """Threads in the cluster now: a cluster may gain or lose workers during a run."""
            return max(1, sum(client.nthreads().values()))

    with contextlib.ExitStack() as stack:
        stack.enter_context(dask.config.set(CLIENT_CONFIG))
        if scheduler:
            try:
                client = stack.enter_context(Client(scheduler, timeout="10s"))
            except (OSError, ValueError, TypeError) as err:
                raise PrepError(f"cannot reach the Dask scheduler at {scheduler!r}: {err}") from None
            _check_workers(client, scheduler)
        else:
            stack.enter_context(dask.config.set(LOCAL_CLUSTER_CONFIG))
            # the scheduler's and the workers' scratch space: gone with the cluster, not left in /tmp
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="prep-dask-"))
            stack.enter_context(dask.config.set({"temporary-directory": scratch}))
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",  # loopback, any free port: runs never collide
                    silence_logs=logging.WARNING,
                    # each worker runs this module's dask_setup as it starts (and the user's preloads)
                    preload=[*dask.config.get("distributed.worker.preload", []), __name__],
                )
            )
            client = stack.enter_context(Client(cluster))
        log.info("dask: %s", client)
        # pure=False: two shards with equal arguments are still two tasks. retries covers a
        # task that raised; the tasks of a worker that died are rescheduled by Dask itself.
        yield DaskExecutor(client, pure=False, retries=2)


def dask_setup(worker) -> None:
    """In each worker of the local Dask cluster prep starts: Ctrl-C reaches every process of the
    terminal's group, and it is the main process's to handle (it closes the cluster and says how
    to resume), not a traceback per worker and nanny (as :func:`_start_worker` for the local
    pool). SIGTERM stays: it is how the cluster stops a worker. Nor does each worker warn of
    every task it drops as the cluster closes under it. (A Ctrl-C while a worker starts, before
    this has run, still reaches it.)"""
    import signal

    if threading.current_thread() is threading.main_thread():  # where a worker process runs its loop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker.state_machine").addFilter(
        lambda record: not record.getMessage().endswith("ended with CancelledError"))


class _Box:
    """A task's arguments, or its result, as one object. Dask walks the lists, tuples and dicts
    it is handed: arguments, to find other tasks' keys in them (the 256 items of a shard), and
    results, to serialize them element by element (each dict of a resize shard, then each
    value). That kept the event loop of every worker, and the client's, busy for about a tenth
    of the run; one pickle of the whole costs a small part of that."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _call_boxed(fn, call: _Box) -> _Box:
    args, kwargs = call.value
    return _Box(fn(*args, **kwargs))


def _unboxed(boxed: Future) -> Future:
    """A future of the value in ``boxed``'s :class:`_Box`, with its outcome (and cancelling it
    cancels ``boxed``). ``boxed`` is held only by its callback to the new future, not the other
    way round: once the caller drops the new future, both go, and with them Dask's, so the
    cluster forgets the result at once (a reference cycle would keep it until a garbage
    collection, past the bound on shards in flight)."""
    out: Future = Future()
    weak = weakref.ref(boxed)

    def settle(done: Future) -> None:
        if not out.set_running_or_notify_cancel():
            return  # the caller cancelled it meanwhile
        if done.cancelled():
            out.set_exception(CancelledError())
        elif done.exception() is not None:
            out.set_exception(done.exception())
        else:
            out.set_result(done.result().value)

    def forward_cancel(future: Future) -> None:
        if future.cancelled() and (inner := weak()) is not None:
            inner.cancel()

    out.add_done_callback(forward_cancel)
    boxed.add_done_callback(settle)
    return out


def _prep_version() -> str:
    """This prep's version and what else decides the bytes of its outputs: the PNG encoder
    (the deflate package's version), the transform's revision and the decoders (simplejpeg's and
    Pillow's builds of libjpeg-turbo)."""
    from importlib.metadata import version

    from . import __version__
    from .spec import PNG_ENCODING, TRANSFORM_REVISION

    return (f"{__version__} ({PNG_ENCODING}, transform {TRANSFORM_REVISION}, simplejpeg {version('simplejpeg')},"
            f" pillow {version('pillow')})")


def _check_workers(client, scheduler: str) -> None:
    """Every worker must run this prep: the shard functions travel by name, not by value, and
    the resized files must have the bytes this machine would write."""
    from . import __version__

    try:
        versions = client.run(_prep_version)
    except Exception as err:  # typically ModuleNotFoundError: prep is not installed there
        raise PrepError(
            f"the Dask workers of {scheduler} cannot run prep ({type(err).__name__}: {err});"
            f" install prep {__version__} on every worker"
        ) from None
    here = _prep_version()
    wrong = {worker: v for worker, v in versions.items() if v != here}
    if wrong:
        worker, version = next(iter(wrong.items()))
        raise PrepError(
            f"{len(wrong)} Dask workers run another prep version (e.g. {worker}: {version}; here {here});"
            f" install prep {__version__} and the same deflate, simplejpeg and pillow packages on every worker"
        )


@dataclass(frozen=True)
class Execution:
    """How a stage runs its shards: the executor, its workers and cluster, and a progress bar or not."""

    executor: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    progress: bool = True

    @property
    def slots(self) -> int:
        """Workers to plan shards for (all cores when not given)."""
        return self.workers or cpu_count()

    def open(self):
        return make_executor(self.executor, self.workers, self.scheduler)

    @contextlib.contextmanager
    def pool(self) -> Iterator[Callable[[], Executor]]:
        """A function that gives the executor, opened on its first call (a cluster is not started
        for nothing); local worker processes are forked at once, though, while this process is
        still small: each keeps a copy of the memory this process holds when it forks."""
        with contextlib.ExitStack() as stack:
            opened: list[Executor] = []

            def get() -> Executor:
                if not opened:
                    opened.append(stack.enter_context(self.open()))
                return opened[0]

            if self.executor == "local":
                get()
            yield get

    def bar(self, total: int, desc: str, unit: str = "img"):
        return progress(total, desc, self.progress, unit)


def map_shards(
    executor: Executor,
    fn: Callable[..., T],
    shards: Sequence[Any],
    *args: Any,
    in_flight: int | None = None,
) -> Iterator[T]:
    """Yield ``fn(shard, *args)`` for each shard, in order, keeping at most ``in_flight`` pending.

    The bound keeps memory flat however many shards there are: results are consumed (written)
    by the caller while later shards are still being computed. By default it is a few shards
    per slot of the executor, asked again after each round, as a Dask cluster may grow.
    """
    bound = in_flight or IN_FLIGHT_PER_SLOT * _slots(executor)
    pending: deque[Future] = deque()
    consumed = 0
    for shard in shards:
        pending.append(executor.submit(fn, shard, *args))
        while len(pending) >= bound:
            yield pending.popleft().result()
            consumed += 1
            if not in_flight and consumed % bound == 0:
                bound = IN_FLIGHT_PER_SLOT * _slots(executor)
    while pending:
        yield pending.popleft().result()


def _slots(executor: Executor) -> int:
    """How many shards ``executor`` runs at once (for an executor not made here: the cores)."""
    return getattr(executor, "slots", None) or cpu_count()


def chunk(items: Sequence[T], workers: int, *, max_size: int = 256, min_size: int = 8) -> list[Sequence[T]]:
    """Cut ``items`` into shards: several per worker for balance, none too large to retry cheaply
    (the sizes of :func:`shard_sizes`)."""
    return list(shards_of(items, workers, max_size=max_size, min_size=min_size))


def shards_of(items: Sequence[T], workers: int, *, max_size: int = 256, min_size: int = 8) -> Iterator[Sequence[T]]:
    """:func:`chunk`'s shards, a slice of ``items`` at a time, as they are asked for."""
    start = 0
    for size in shard_sizes(len(items), workers, max_size=max_size, min_size=min_size):
        yield items[start : start + size]
        start += size


def shard_sizes(n: int, workers: int, *, max_size: int = 256, min_size: int = 8) -> Iterator[int]:
    """The sizes of the shards of ``n`` items: each takes a quarter of what is left per worker
    (guided scheduling), down to an eighth of ``max_size``, so the last shards are small and the
    workers finish close together instead of one running a full shard alone at the end."""
    per_round = 4 * max(1, workers)
    first = max(min_size, min(max_size, -(-n // per_round)))
    smallest = min(first, max(min_size, max_size // 8))
    start = 0
    while start < n:
        size = min(first, max(smallest, -(-(n - start) // per_round)), n - start)
        yield size
        start += size


def progress(total: int, desc: str, enabled: bool = True, unit: str = "img"):
    """A progress bar (count, rate, ETA) on stderr; silent when disabled or not a terminal run."""
    isatty = getattr(sys.stderr, "isatty", None)
    if not enabled or isatty is None or not isatty():  # tqdm's disable=None, without importing it
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


class _NoBar:
    """A progress bar that shows nothing."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *_) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass
