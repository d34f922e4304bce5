"""Packaged files from strangers, and packs that fail: no code runs from a pickle, every loader
checks shapes and dtypes, and a full disk, a file size limit or Ctrl-C during `prep pack` gives
one line and leaves the previous outputs as they were, with no temporary file behind.

Work directories come from test_pack's helpers (the real index, resize, split and encode);
signals and limits are tried on real `prep` processes.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_pack import cli_run, ok, outputs, prepare

import pipeline
from pipeline import workdir
from pipeline.errors import PrepError

FORMATS = ("pkl.gz", "h5", "tfrecord")
STAMP = {"pkl.gz": "pack-pkl.gz", "h5": "pack-h5", "tfrecord": "pack-tfrecord"}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    work = prepare(tmp_path_factory.mktemp("packed"))
    ok(cli_run(work, "pack", *[a for f in FORMATS for a in ("--format", f)], "--executor", "serial"))
    return work


@pytest.fixture
def work(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "work"))


def prep_process(work: Path, *args, **popen) -> subprocess.CompletedProcess:
    """``prep --workdir WORK ARGS`` as a process of its own, its stderr as text. Through a file,
    not a pipe, and in a session of its own, killed at the end: the worker processes of a
    command that crashed would hold a pipe open."""
    command = [sys.executable, "-m", "pipeline", "--workdir", str(work), *map(str, args)]
    # no byte-code written: under a file size limit, Python would leave truncated .pyc files
    popen.setdefault("env", {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, **popen)
        try:
            proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the workers it left, if any
            proc.wait()
        stderr.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, None, stderr.read())


def one_error_line(stderr: str, *fragments: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def leftovers(work: Path) -> list[str]:
    """Temporary files and folders anywhere in the work directory."""
    return sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.name.endswith((".tmp", ".old")))


# -- unpickling -----------------------------------------------------------------------------


class WritesAMarker:
    """Unpickled by a plain pickle.load, this writes ``marker``: what a hostile file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_pickle(path: Path, data, protocol: int = 4) -> Path:
    with gzip.open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def plant(work: Path, data) -> Path:
    """``data`` as the work directory's dataset.pkl.gz, with manifest.json's size and sha256 edited to match."""
    target = write_pickle(work / "dataset.pkl.gz", data)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["files"]["dataset.pkl.gz"].update(bytes=target.stat().st_size, sha256=workdir.sha256_file(target))
    (work / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_a_pickle_that_runs_code_is_refused_by_load_and_verify(work, tmp_path):
    marker = tmp_path / "marker"
    labels = np.zeros(2, np.int64)
    target = plant(work, [(WritesAMarker(marker), labels)] * 3)
    refusal = f"refusing to unpickle {os.system.__module__}.system from {target}: not a prep dataset"
    for path in (target, work):
        with pytest.raises(PrepError) as raised:
            pipeline.load(path)
        assert not marker.exists()
        assert str(raised.value) == refusal
    result = prep_process(work, "verify", "--executor", "serial")
    assert result.returncode == 1
    one_error_line(result.stderr, refusal)
    assert not marker.exists()


def test_verify_train_refuses_a_pickle_that_runs_code_before_training(work, tmp_path):
    pytest.importorskip("tensorflow")
    marker = tmp_path / "marker"
    target = plant(work, [(WritesAMarker(marker), np.zeros(2, np.int64))] * 3)
    result = prep_process(work, "verify-train", "--format", "pkl.gz", "--model", "mlp", "--epochs", "1")
    assert result.returncode == 1
    one_error_line(result.stderr, f"refusing to unpickle {os.system.__module__}.system from {target}")
    assert not marker.exists() and not (work / "verify" / "metrics.json").exists()


def test_numpy_arrays_of_numbers_load_from_numpy_1_and_2_pickles_but_not_object_arrays(tmp_path):
    x = np.arange(2 * 4 * 3 * 3, dtype=np.uint8).reshape(2, 4, 3, 3)
    y = np.array([1, 0], np.int64)
    # numpy 1 names numpy.core; protocol 2 (mnist.pkl.gz's) pickles bytes through _codecs.encode
    old = pickle.dumps([(x, y)] * 3, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in old and b"_codecs\nencode" in old
    (tmp_path / "numpy1.pkl.gz").write_bytes(gzip.compress(old))
    for name, protocol in (("numpy1", None), ("p4", 4), ("p5", 5)):
        path = tmp_path / f"{name}.pkl.gz"
        if protocol:
            write_pickle(path, [(x, y)] * 3, protocol)
        for got_x, got_y in pipeline.load(path):
            assert got_x.dtype == np.uint8 and np.array_equal(got_x, x) and np.array_equal(got_y, y)

    objects = write_pickle(tmp_path / "objects.pkl.gz", [(np.array([1, "a"], dtype=object), y)] * 3)
    with pytest.raises(PrepError, match=f"^refusing to unpickle an object array from {objects}: not a prep dataset$"):
        pipeline.load(objects)


def test_flat_and_float_files_load_and_arrays_that_do_not_match_are_refused(work, tmp_path):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--flat", "--float", "--executor", "serial"))
    (x_train, y_train), _, _ = pipeline.load(work / "dataset.pkl.gz")
    assert x_train.dtype == np.float32 and x_train.shape == (len(y_train), 8 * 12 * 3)

    x = np.zeros((3, 8, 12, 3), np.uint8)
    y = np.zeros(3, np.int64)
    cases = {
        "split valid: 3 images but 2 labels": [(x, y), (x, y[:2]), (x, y)],
        "split train: images are int64 (3, 8, 12, 3); expected uint8 (N, H, W, C)": [(x.astype(np.int64), y)] * 3,
        "split test: labels are float64 (3,); expected int64 (N,)": [(x, y), (x, y), (x, y.astype(float))],
        "split valid: images are uint8 (8, 12, 1); split train's are uint8 (8, 12, 3)": [(x, y), (x[..., :1], y), (x, y)],
    }
    for message, data in cases.items():
        path = write_pickle(tmp_path / "case.pkl.gz", data)
        with pytest.raises(PrepError) as raised:
            pipeline.load(path)
        assert str(raised.value).startswith(f"{path}: {message}"), raised.value


def test_an_h5_file_whose_groups_do_not_match_is_refused(tmp_path):
    import h5py

    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        for split in ("train", "valid", "test"):
            f[f"{split}/images"] = np.zeros((10, 8, 12, 3), np.uint8)
            f[f"{split}/labels"] = np.zeros(420 if split == "valid" else 10, np.int64)
    for load in (pipeline.load, lambda p: pipeline.load_tf(p, "train")):
        with pytest.raises(PrepError, match=f"^{path}: split valid: 10 images but 420 labels$"):
            load(path)
    with h5py.File(path, "a") as f:
        del f["test/labels"]
    with pytest.raises(PrepError, match=r"not a prep HDF5 dataset \(no dataset test/labels\)"):
        pipeline.load(path)


# -- failed packs ---------------------------------------------------------------------------


def file_size_limit(limit: int):
    """For preexec_fn: files the process writes stop at ``limit`` bytes (EFBIG, not SIGXFSZ)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_size_limit_during_pack_is_one_line_and_leaves_the_previous_outputs(work, fmt):
    from pipeline.formats import FORMATS as MODULES

    before = outputs(work)
    (work / ".stamps" / f"{STAMP[fmt]}.json").unlink()  # pack it again
    # every output is larger than 4 KB; so far as it gets, a write fails with EFBIG
    result = prep_process(work, "pack", "--format", fmt, preexec_fn=file_size_limit(4096))
    assert result.returncode == 1, result.stderr
    one_error_line(result.stderr, f"{work / MODULES[fmt].OUTPUT}: {os.strerror(27)}")
    assert outputs(work) == before
    assert leftovers(work) == []


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own, mounted at tmp_path/disk (skips where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_during_pack_is_one_line_and_leaves_the_previous_outputs(packed, small_disk):
    work = Path(shutil.copytree(packed, small_disk / "work"))
    before = outputs(work)
    (work / ".stamps" / "pack-h5.json").unlink()
    used = os.statvfs(small_disk)
    used = (used.f_blocks - used.f_bfree) * used.f_frsize
    room = used + (work / "dataset.h5").stat().st_size // 2  # half what a new dataset.h5 needs
    subprocess.run(["mount", "-o", f"remount,size={room}", str(small_disk)], check=True)
    result = prep_process(work, "pack", "--format", "h5")
    assert result.returncode == 1, result.stderr
    one_error_line(result.stderr, f"{work / 'dataset.h5'}: {os.strerror(28)}")
    assert outputs(work) == before
    assert leftovers(work) == []


# The first write to the output being packed marks the test's file, then waits while the test
# presses Ctrl-C.
SLOW_WRITES = """
import contextlib, os, signal, sys, time
# as in a terminal: a test run started in the background ignores SIGINT, and its children inherit that
signal.signal(signal.SIGINT, signal.default_int_handler)
from pipeline import cli, workdir
from pipeline.formats import tfrecord
marker, fmt = sys.argv[1:3]

class Slow:
    def __init__(self, f):
        self.f = f
    def __getattr__(self, name):
        return getattr(self.f, name)
    def write(self, data):
        if not os.path.exists(marker):
            open(marker, "a").close()
            time.sleep(2)
        return self.f.write(data)

atomic_write = workdir.atomic_write
@contextlib.contextmanager
def slow_atomic_write(path, *args, **kwargs):
    with atomic_write(path, *args, **kwargs) as handle:
        yield Slow(handle) if os.path.basename(path) in ("dataset.pkl.gz", "dataset.h5") else handle
workdir.atomic_write = slow_atomic_write
tfrecord.open = lambda *args, **kwargs: Slow(open(*args, **kwargs))  # the shard files
sys.argv = ["prep", "-q", *sys.argv[3:]]
cli.main()
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_ctrl_c_during_pack_is_one_line_and_leaves_the_previous_outputs(work, tmp_path, fmt):
    before = outputs(work)
    (work / ".stamps" / f"{STAMP[fmt]}.json").unlink()
    marker = tmp_path / "writing"
    command = [sys.executable, "-c", SLOW_WRITES, str(marker), fmt, "--workdir", str(work), "pack", "--format", fmt]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the command and its workers
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read().decode()
    assert stderr.splitlines() == ["Interrupted; run the same command again to resume."], stderr
    assert outputs(work) == before
    assert leftovers(work) == []


def test_a_pack_removes_the_temporaries_a_killed_pack_left(work):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(gone.stdout), os.getppid()  # a process that has ended; one that runs
    stale = [f".dataset.h5.{dead}-1.tmp", f".dataset.pkl.gz.{dead}-2.tmp", f".tfrecord.{dead}-3.tmp", ".tfrecord.old",
             f".manifest.json.{dead}-4.tmp"]
    for name in stale:
        if "tfrecord" in name:
            (work / name).mkdir()
            (work / name / "train-00000-of-00001.tfrecord").write_bytes(b"half a shard")
        else:
            (work / name).write_bytes(b"half a file")
    kept = work / f".dataset.h5.{live}-5.tmp"  # another process's, still writing
    kept.write_bytes(b"being written")
    before = outputs(work)
    ok(cli_run(work, "pack", "--format", "h5", "--executor", "serial"))  # up to date: nothing to write
    assert outputs(work) == before
    assert leftovers(work) == [kept.name]
