"""The Dask executor on a real cluster of 2 worker processes on 127.0.0.1.

Outputs must be byte-identical to a serial run, from a folder or from a bucket, and a worker
killed mid-run must cost only a retry of its shards.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, make_tree, tree_digests
from pipeline import executors
from pipeline.errors import PrepError
from pipeline.stages import resize
from test_remote_workdir import bucket, bucket_files  # noqa: F401  (bucket is a fixture)
from test_sources import s3, upload  # noqa: F401  (s3 is a fixture)

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster(s3):  # noqa: F811  (after s3: the workers inherit its AWS environment)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster, distributed.Client(cluster) as client:
        cluster.client = client
        yield cluster


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    raw = make_tree(tmp_path / "raw", {"cat": 14, "dog": 11, "bird": 9}, size=(48, 40))
    (raw / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (raw / "dog" / "empty.png").write_bytes(b"")
    return raw


def run_stages(prep, raw, workdir: Path, *options, env=None) -> None:
    for args in (("index", raw), ("resize", "--size", "20x16", "--mode", "crop")):
        result = prep(*args, *options, workdir=workdir, env=env)
        assert result.exit_code == 0, result.output


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in ("labels.csv", "resized.csv", "rejected.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert tree_digests(a / "resized") == tree_digests(b / "resized")


class Bar:
    """Stands in for the progress bar and remembers what it was told."""

    def __init__(self, total, desc, enabled=True, unit="img"):
        self.total, self.desc, self.done = total, desc, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.done += n


def pack(prep, workdir: Path, *options, env=None) -> None:
    for args in (("split",), ("encode",), ("pack", "--format", "pkl.gz", "--format", "h5", *options)):
        result = prep(*args, workdir=workdir, env=env)
        assert result.exit_code == 0, result.output


def test_dask_run_matches_serial_run_byte_for_byte(tmp_path, corpus, cluster, prep, monkeypatch):
    run_stages(prep, corpus, tmp_path / "serial", "--executor", "serial")
    pack(prep, tmp_path / "serial", "--executor", "serial")
    bars = []
    monkeypatch.setattr(executors, "progress", lambda *a, **kw: bars.append(Bar(*a, **kw)) or bars[-1])
    monkeypatch.setattr(distributed, "LocalCluster", None)  # PREP_SCHEDULER must pick the running one
    env = {"PREP_SCHEDULER": cluster.scheduler_address}
    run_stages(prep, corpus, tmp_path / "dask", "--executor", "dask", env=env)
    pack(prep, tmp_path / "dask", "--executor", "dask", env=env)

    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")
    for name in ("dataset.pkl.gz", "dataset.h5", "manifest.json"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes(), name
    rejected = (tmp_path / "dask" / "rejected.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in rejected[1:]] == ["cat/broken.jpg", "dog/empty.png"]
    assert [(b.desc, b.total, b.done) for b in bars] == [("hash", 36, 36), ("resize", 36, 36), ("pack", 34, 34)]
    assert {"hash_shard", "resize_shard", "read_pngs"} <= set(cluster.scheduler.task_prefixes)


def test_s3_raw_read_by_dask_workers_matches_the_local_folder(tmp_path, corpus, s3, cluster, prep):  # noqa: F811
    url = upload(s3, corpus)
    run_stages(prep, corpus, tmp_path / "local", "--executor", "serial")
    run_stages(prep, url, tmp_path / "s3", "--executor", "dask", "--scheduler", cluster.scheduler_address)
    assert_same_outputs(tmp_path / "local", tmp_path / "s3")


def test_workers_write_straight_to_a_work_directory_on_a_bucket(tmp_path, corpus, s3, bucket, cluster, prep):  # noqa: F811
    from pipeline import remote

    url = f"s3://{bucket}/work"
    on_cluster = ("--executor", "dask", "--scheduler", cluster.scheduler_address)
    copy = remote.mirror_of(url)
    for size in ("20x16", "12x12"):  # the second run rewrites every file the first one wrote
        local = tmp_path / f"local-{size}"
        for args in (("index", corpus), ("resize", "--size", size)):
            assert prep(*args, "--executor", "serial", workdir=local).exit_code == 0
            result = prep(*args, *on_cluster, workdir=url)
            assert result.exit_code == 0, result.output
        stored = bucket_files(s3, bucket, "work")
        pngs = {name[len("resized/"):] for name in stored if name.startswith("resized/")}
        assert pngs == set(tree_digests(local / "resized")) and len(pngs) == 34
        assert all(remote.hashlib.sha256(stored[f"resized/{n}"]).hexdigest() == tree_digests(local / "resized")[n]
                   for n in pngs)
        assert stored["resized.csv"] == (local / "resized.csv").read_bytes()
        assert stored["rejected.csv"] == (local / "rejected.csv").read_bytes()
        if size == "20x16":  # the client received no image: its copy has none until a command fetches them
            assert not [p for p in (copy / "resized").rglob("*") if p.is_file()]
        for args in (("split",), ("encode",), ("pack", "--format", "pkl.gz")):
            assert prep(*args, workdir=local).exit_code == 0
            result = prep(*args, workdir=url)
            assert result.exit_code == 0, result.output
        assert bucket_files(s3, bucket, "work")["dataset.pkl.gz"] == (local / "dataset.pkl.gz").read_bytes()
        assert tree_digests(copy / "resized") == tree_digests(local / "resized")  # fetched, the stale ones too
    result = prep("resize", "--size", "12x12", *on_cluster, workdir=url)
    assert result.exit_code == 0 and "up to date" in result.stdout.lower(), result.output

    # pack and verify on the cluster: its workers read the resized files from the bucket (the
    # client's copy holds them already, so the GETs of resized files are the workers', and the
    # client's read of the first one's shape)
    assert prep("pack", "--format", "h5", "--executor", "serial", workdir=local).exit_code == 0
    with _requests() as seen:  # the server's log of requests
        result = prep("pack", "--format", "h5", *on_cluster, workdir=url)
    assert result.exit_code == 0, result.output
    assert len([line for line in seen if '"GET ' in line and "/work/resized/" in line]) == 34 + 1
    assert bucket_files(s3, bucket, "work")["dataset.h5"] == (local / "dataset.h5").read_bytes()
    with _requests() as seen:
        result = prep("verify", *on_cluster, workdir=url)
    assert result.exit_code == 0 and result.stdout.startswith("Verified"), result.output
    assert len([line for line in seen if '"GET ' in line and "/work/resized/" in line]) == 34

    # on another machine, a pack on the cluster fetches no resized file into its copy: tfrecord's
    # shards are planned by the objects' sizes, asked of the bucket
    shutil.rmtree(copy.parent)
    assert prep("pack", "--format", "tfrecord", "--executor", "serial", workdir=local).exit_code == 0
    with _requests() as seen:
        result = prep("pack", "--format", "tfrecord", *on_cluster, workdir=url)
    assert result.exit_code == 0, result.output
    assert not (copy / "resized").exists()
    assert len([line for line in seen if '"GET ' in line and "/work/resized/" in line]) == 34 + 1
    heads = {line.split('"')[1] for line in seen if '"HEAD ' in line and "/work/resized/" in line}
    assert len(heads) == 34  # each one's size asked (by the client; s3fs's reads ask it too)
    stored = bucket_files(s3, bucket, "work")
    shards = {name for name in stored if name.startswith("tfrecord/")}
    assert shards and shards == {f"tfrecord/{p.name}" for p in (local / "tfrecord").iterdir()}
    assert all(stored[name] == (local / name).read_bytes() for name in shards)

    # and a verify on the cluster fetches none either: the workers compare the bucket's PNGs; a
    # rerun lists them (no folder there has a time) and reads none; one changed there is caught
    for fresh in (True, False):
        with _requests() as seen:
            result = prep("verify", *on_cluster, workdir=url)
        assert result.exit_code == 0, result.output
        assert ("pixels match the resized PNGs" in result.stdout) == fresh, result.output
        assert ("unchanged since the last check" in result.stdout) != fresh, result.output
        assert len([line for line in seen if '"GET ' in line and "/work/resized/" in line]) == (34 if fresh else 0)
        assert not (copy / "resized").exists()
    first, second = sorted(name for name in stored if name.startswith("resized/"))[:2]
    s3.put_object(Bucket=bucket, Key=f"work/{first}", Body=stored[second])
    assert_one_line_error(prep("verify", *on_cluster, workdir=url), f"{url}/{first}", "changed since `prep resize`")


@contextlib.contextmanager
def _requests():
    """The lines the S3 server logs meanwhile, one per request."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    server_log = logging.getLogger("werkzeug")
    level = server_log.level
    server_log.addHandler(handler)
    server_log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        server_log.removeHandler(handler)
        server_log.setLevel(level)


def test_a_worker_reads_resized_files_from_a_bucket(s3, bucket):  # noqa: F811
    from pipeline import sources
    from pipeline.stages import pack, verify

    png = _png(6, 5)
    s3.put_object(Bucket=bucket, Key="work/resized/a/one.png", Body=png)
    s3.put_object(Bucket=bucket, Key="work/resized/a/two.png", Body=b"not a png")
    names = [("a/one.png", resize.hashlib.sha256(png).hexdigest()), ("a/two.png", "0" * 64), ("a/gone.png", "0" * 64)]
    pixels, pngs, problems = pack.read_pngs(names, f"s3://{bucket}/work/resized", (5, 6, 3), True, "a/one.png")
    assert pixels[0].tolist() == [[[255, 0, 0]] * 6] * 5 and pngs[0] == png
    assert problems == {1: "changed since `prep resize` (its sha256 differs from the one resize recorded)",
                        2: "missing"}
    digests = verify.digest_pngs(names, f"s3://{bucket}/work/resized")
    assert digests[0] == resize.hashlib.sha256(pixels[0].tobytes()).digest()
    assert digests[1].startswith("changed since `prep resize`") and digests[2].startswith("cannot read")
    sizes = list(sources.sizes_below(f"s3://{bucket}/work/resized", [n for n, _ in names]))
    assert sizes[:2] == [len(png), len(b"not a png")] and isinstance(sizes[2], FileNotFoundError)


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (255, 0, 0)).save(out, "PNG")
    return out.getvalue()


def test_prep_run_on_a_cluster_and_a_bucket_packs_what_the_workers_wrote(tmp_path, corpus, s3, bucket, cluster,
                                                                         prep):  # noqa: F811
    url = f"s3://{bucket}/work"
    options = ("--size", "20x16", "--format", "pkl.gz", "--license", "cc-by-4.0")
    assert prep("run", corpus, *options, "--executor", "serial", workdir=tmp_path / "local").exit_code == 0
    result = prep("run", corpus, *options, "--executor", "dask", "--scheduler", cluster.scheduler_address, workdir=url)
    assert result.exit_code == 0, result.output
    stored = bucket_files(s3, bucket, "work")
    for name in ("resized.csv", "splits.csv", "encoded.csv", "dataset.pkl.gz"):
        assert stored[name] == (tmp_path / "local" / name).read_bytes(), name


def test_without_a_scheduler_a_local_cluster_is_started(tmp_path, corpus, prep, monkeypatch):
    monkeypatch.delenv("PREP_SCHEDULER", raising=False)
    run_stages(prep, corpus, tmp_path / "serial", "--executor", "serial")
    assert prep("index", corpus, "--executor", "serial", workdir=tmp_path / "dask").exit_code == 0
    started = []
    local_cluster = distributed.LocalCluster
    monkeypatch.setattr(distributed, "LocalCluster", lambda **kw: started.append(kw) or local_cluster(**kw))
    result = prep("resize", "--size", "20x16", "--mode", "crop", "--executor", "dask", "--workers", "1",
                  workdir=tmp_path / "dask")
    assert result.exit_code == 0, result.output
    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")
    assert [(kw["n_workers"], kw["threads_per_worker"], kw["host"]) for kw in started] == [(1, 1, "127.0.0.1")]


def _environ() -> dict:
    return {name: os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}


def _config() -> dict:
    import dask

    return {key: dask.config.get(key) for key in executors.LOCAL_CLUSTER_CONFIG}


def _scratch() -> str:
    from distributed import get_worker

    return get_worker().local_directory


def test_local_cluster_workers_keep_thread_limits_but_not_the_malloc_trim(monkeypatch, tmp_path):
    # A value in this process's environment wins over the config, and the nanny copies its
    # variables into this environment: clear them here, and have them put back afterwards.
    for name in ("PREP_SCHEDULER", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                 "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED"):
        monkeypatch.setenv(name, "")  # records the value to restore
        monkeypatch.delenv(name)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the system's temporary folder
    with executors.make_executor("dask", workers=1) as pool:
        seen = pool.submit(_environ).result()  # in the worker process
        config = pool.submit(_config).result()
        on_ctrl_c = pool.submit(signal.getsignal, signal.SIGINT).result()
        scratch = pool.submit(_scratch).result()
    assert scratch.startswith(str(tmp_path / "tmp" / "prep-dask-"))
    assert list((tmp_path / "tmp").iterdir()) == []  # no dask-scratch-space left behind
    assert seen == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}
    assert config == executors.LOCAL_CLUSTER_CONFIG  # the worker runs with prep's settings
    assert on_ctrl_c == signal.SIG_IGN  # Ctrl-C is the main process's to handle


SLOW_WORKERS = """\
import time
from pipeline import imaging
real = imaging.transform
imaging.transform = lambda data, spec: (time.sleep(0.2), real(data, spec))[1]
"""


def test_ctrl_c_on_a_local_cluster_stops_the_run_with_one_line_and_a_rerun_resumes(tmp_path, prep, monkeypatch):
    """As with local worker processes: Ctrl-C reaches the whole process group, Dask's workers and
    nannies too, and only the main process speaks (a worker used to print a traceback each, and
    a warning for every task the closing cluster dropped)."""
    from test_resize import slowed_prep_half_way

    monkeypatch.delenv("PREP_SCHEDULER", raising=False)
    raw = make_tree(tmp_path / "raw", {"a": 20, "b": 20})
    clean, work = tmp_path / "clean", tmp_path / "work"
    assert prep("index", raw, workdir=clean).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial", workdir=clean).exit_code == 0
    assert prep("index", raw, workdir=work).exit_code == 0
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_WORKERS)  # imported by every process started
    path = os.pathsep.join(filter(None, [str(tmp_path / "slow"), os.environ.get("PYTHONPATH")]))
    proc = slowed_prep_half_way(work, "resize", "--size", "8", "--executor", "dask", "--workers", "2",
                                env={**os.environ, "PYTHONPATH": path})
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the command, the nannies and the workers
    assert proc.wait(timeout=60) == 130
    stderr = proc.stderr.read().decode()
    assert stderr.splitlines() == ["Interrupted; run the same command again to resume."], stderr

    result = prep("resize", "--size", "8", "--executor", "serial", workdir=work)
    assert result.exit_code == 0, result.output
    assert int(re.search(r"(\d+) already up to date", result.stdout).group(1)) >= 8
    assert_same_outputs(clean, work)


def _shard_or_fail(shard: list, fail_on: str) -> list[dict]:
    if fail_on in shard:
        raise ValueError(f"cannot take {fail_on}")
    return [{"item": item, "bytes": item.encode()} for item in shard]


def test_dask_tasks_return_shards_in_order_and_raise_what_the_shard_raised(cluster):
    with executors.make_executor("dask", scheduler=cluster.scheduler_address) as pool:
        shards = [["a", "b"], ["c"]]
        assert list(executors.map_shards(pool, _shard_or_fail, shards, "z")) == [
            [{"item": "a", "bytes": b"a"}, {"item": "b", "bytes": b"b"}],
            [{"item": "c", "bytes": b"c"}],
        ]
        with pytest.raises(ValueError, match="cannot take c"):
            list(executors.map_shards(pool, _shard_or_fail, shards, "c"))
    assert "shard_or_fail" in cluster.scheduler.task_prefixes  # named after the shard function


def test_the_client_keeps_few_of_the_messages_it_sent(cluster):
    # each holds a shard's arguments: Dask's default of 1,000 grew the client by 0.14 KB per image
    with executors.make_executor("dask", scheduler=cluster.scheduler_address) as pool:
        shards = [[f"{i}-{k}" * 500 for k in range(20)] for i in range(60)]
        assert len(list(executors.map_shards(pool, _shard_or_fail, shards, "z", in_flight=2))) == 60
        kept = pool._client.scheduler_comm.recent_message_log
        assert 0 < len(kept) <= executors.CLIENT_CONFIG["distributed.admin.low-level-log-length"]


def _named_shard(shard: list) -> list[bytes]:
    return [item.encode() * 1000 for item in shard]


def test_a_consumed_result_leaves_the_cluster_at_once(cluster):
    # with the garbage collector off, as between two of its runs: only references count
    gc.disable()
    try:
        with executors.make_executor("dask", scheduler=cluster.scheduler_address) as pool:
            results = list(executors.map_shards(pool, _named_shard, [["a"], ["b"], ["c"]]))
            assert results == [[b"a" * 1000], [b"b" * 1000], [b"c" * 1000]]
            del results
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _held(cluster, "named_shard"):
                time.sleep(0.05)
            assert _held(cluster, "named_shard") == []
    finally:
        gc.enable()


def _held(cluster, prefix: str) -> list:
    return [key for key in list(cluster.scheduler.tasks) if prefix in str(key)]


def test_without_dask_installed_the_error_says_what_to_install(tmp_path, corpus, prep, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(PrepError, match=r"pip install 'dask\[distributed\]'"):
        with executors.make_executor("dask"):
            pass
    result = prep("index", corpus, "--executor", "dask")
    assert_one_line_error(result, "--executor dask", "pip install 'dask[distributed]'")
    assert not (tmp_path / "work" / "labels.csv").exists()


def test_workers_running_another_prep_version_are_refused(cluster, monkeypatch):
    import pipeline

    monkeypatch.setattr(pipeline, "__version__", "0.0.0-not-the-workers")
    with pytest.raises(PrepError, match=r"2 Dask workers run another prep version .*install prep 0\.0\.0-not"):
        with executors.make_executor("dask", scheduler=cluster.scheduler_address):
            pass


def slowly(fn, shard, *args):
    """A shard function that takes long enough for a worker to be killed in the middle of it."""
    time.sleep(0.4)
    return fn(shard, *args)


def kill_a_busy_worker(client, killed: list) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not killed:
        busy = [worker for worker, keys in client.processing().items() if keys]
        if busy:
            pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.05)


def test_a_worker_killed_mid_run_costs_only_a_retry(tmp_path, corpus, cluster, prep, monkeypatch):
    import cloudpickle

    run_stages(prep, corpus, tmp_path / "serial", "--executor", "serial")
    result = prep("index", corpus, "--executor", "serial", workdir=tmp_path / "dask")
    assert result.exit_code == 0, result.output

    # ship `slowly` by value: the workers cannot import this test module
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    map_shards = executors.map_shards
    monkeypatch.setattr(
        executors, "map_shards", lambda pool, fn, *a, **kw: map_shards(pool, functools.partial(slowly, fn), *a, **kw)
    )
    client = cluster.client
    pids_before = set(client.run(os.getpid).values())
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_busy_worker, args=(client, killed))
    killer.start()
    try:
        # --workers 8 only cuts more, smaller shards, so the run outlasts the kill
        result = prep("resize", "--size", "20x16", "--mode", "crop", "--executor", "dask", "--workers", "8",
                      "--scheduler", cluster.scheduler_address, workdir=tmp_path / "dask")
    finally:
        killer.join()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert result.exit_code == 0, result.output
    assert len(killed) == 1 and killed[0] in pids_before
    assert_same_outputs(tmp_path / "serial", tmp_path / "dask")
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it
    assert killed[0] not in client.run(os.getpid, on_error="ignore").values()
