"""Packaged files and settings from strangers, second round: SIGTERM and SIGHUP during an h5 write,
features.json and Parquet shards that point elsewhere, FIFOs where a loader reads a file, crafted
pickles, damaged Parquet pages and h5 datasets of the wrong type give one-line PrepErrors, never a
crash, a hang or a traceback; so do prep.toml values of the wrong type.

Work directories come from test_pack's helpers (the real index, resize, split and encode, then
pack of every format); signals are tried on real `prep` processes, and loaders that could wait on
a FIFO run in a process of their own.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from test_hardening_formats import leftovers
from test_pack import cli_run, ok, outputs, prepare

import pipeline
from pipeline import workdir
from pipeline.errors import PrepError
from pipeline.formats import parquet, tfrecord


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    work = prepare(tmp_path_factory.mktemp("packed"))
    ok(cli_run(work, "pack", "--format", "all", "--executor", "serial"))
    return work


@pytest.fixture
def work(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "work", symlinks=True))


# -- SIGTERM and SIGHUP during an h5 write ---------------------------------------------------

# Write number AT to dataset.h5 marks the test's file and waits while the test sends its signal;
# the h5 writer makes 48 writes for this work directory.
SIGNAL_AT_WRITE = """
import contextlib, os, signal, sys, time
# as in a terminal: a run started in the background (nohup, a CI runner) ignores SIGHUP, and its
# children inherit that
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from pipeline import cli, workdir
marker, at = sys.argv[1], int(sys.argv[2])

class Slow:
    writes = 0
    def __init__(self, f):
        self.f = f
    def __getattr__(self, name):
        return getattr(self.f, name)
    def write(self, data):
        Slow.writes += 1
        if Slow.writes == at:
            open(marker, "a").close()
            time.sleep(2)
        return self.f.write(data)

atomic_write = workdir.atomic_write
@contextlib.contextmanager
def slow_atomic_write(path, *args, **kwargs):
    with atomic_write(path, *args, **kwargs) as handle:
        yield Slow(handle) if os.path.basename(path) == "dataset.h5" else handle
workdir.atomic_write = slow_atomic_write
sys.argv = ["prep", "-q", *sys.argv[3:]]
cli.main()
"""


@pytest.mark.parametrize(("signum", "at"), [(signal.SIGTERM, 1), (signal.SIGTERM, 5), (signal.SIGTERM, 15),
                                            (signal.SIGTERM, 30), (signal.SIGTERM, 45), (signal.SIGHUP, 20)])
def test_sigterm_or_sighup_during_an_h5_write_stops_with_one_line_and_no_crash(work, tmp_path, signum, at):
    before = outputs(work)
    (work / ".stamps" / "pack-h5.json").unlink()
    marker = tmp_path / "writing"
    command = [sys.executable, "-c", SIGNAL_AT_WRITE, str(marker), str(at), "--workdir", str(work), "pack", "--format", "h5"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.01)
        assert marker.exists(), "the pack ended before the write the signal was meant for"
        os.kill(proc.pid, signum)  # as `kill PID`, or the terminal closing
        returncode = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read().decode()
    assert returncode == 128 + signum, stderr  # not -11 (SIGSEGV) nor 1
    assert stderr.splitlines() == ["Interrupted; run the same command again to resume."], stderr
    assert outputs(work) == before
    assert leftovers(work) == []


# -- tfrecord: features.json and the shards ----------------------------------------------------


def edit_features(folder: Path, edit) -> Path:
    """features.json of ``folder`` as ``edit`` changes it, with manifest.json's size and sha256 to match."""
    path = folder / "features.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    manifest_path = folder.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["tfrecord/features.json"].update(bytes=path.stat().st_size, sha256=workdir.sha256_file(path))
    manifest_path.write_text(json.dumps(manifest))
    return path


def first_shard(meta: dict) -> dict:
    return meta["splits"]["train"]["shards"][0]


@pytest.mark.parametrize("case", ["absolute", "dotdot", "link out", "a string", "a count in quotes", "a negative count",
                                  "another split's name", "no compression"])
def test_features_json_naming_shards_elsewhere_or_malformed_is_one_line(work, tmp_path, case):
    folder = work / "tfrecord"
    outside = tmp_path / "outside.tfrecord"
    shutil.copy(folder / "train-00000-of-00001.tfrecord", outside)  # a readable shard: only where it is is wrong
    if case == "link out":
        (folder / "train-00000-of-00001.tfrecord").unlink()
        (folder / "train-00000-of-00001.tfrecord").symlink_to(outside)
    edits = {
        "absolute": lambda m: first_shard(m).update(file=str(outside)),
        "dotdot": lambda m: first_shard(m).update(file="../../outside.tfrecord"),
        "link out": lambda m: None,
        "a string": lambda m: m["splits"]["train"].update(shards=["train-00000-of-00001.tfrecord"]),
        "a count in quotes": lambda m: first_shard(m).update(count=str(first_shard(m)["count"])),
        "a negative count": lambda m: first_shard(m).update(count=-1),
        "another split's name": lambda m: first_shard(m).update(file="test-00000-of-00001.tfrecord"),
        "no compression": lambda m: m.pop("compression"),
    }
    features = edit_features(folder, edits[case])
    for load in (pipeline.load, tfrecord.load):
        with pytest.raises(PrepError) as raised:
            load(folder)
        assert str(raised.value).startswith(f"{features}:") and "\n" not in str(raised.value), raised.value
    named = "symbolic link" if case == "link out" else "features.json"  # manifest.json's check comes first there
    assert_one_line_error(cli_run(work, "verify", "--executor", "serial"), named)


def frame_with_length(length: int) -> bytes:
    """A TFRecord header claiming ``length`` bytes, with the CRC that makes it pass."""
    head = struct.pack("<Q", length)
    return head + tfrecord._masked_crc(head)


@pytest.mark.parametrize("compression", ["", "GZIP"])
def test_a_record_length_that_passes_its_crc_but_is_huge_is_one_line(work, compression):
    folder = work / "tfrecord"
    shard = folder / "train-00000-of-00001.tfrecord"
    data = frame_with_length(1 << 60) + shard.read_bytes()
    shard.write_bytes(gzip.compress(data, mtime=0) if compression else data)
    edit_features(folder, lambda m: m.update(compression=compression))
    with pytest.raises(PrepError, match=f"^{shard}: not a readable TFRecord file") as raised:
        pipeline.load(folder)
    assert "\n" not in str(raised.value)


def test_a_damaged_gzip_shard_or_a_feature_of_the_wrong_type_is_one_line(work):
    folder = work / "tfrecord"
    shard = folder / "train-00000-of-00001.tfrecord"
    squeezed = bytearray(gzip.compress(shard.read_bytes(), mtime=0))
    squeezed[len(squeezed) // 2] ^= 0xFF  # inside the deflate stream: zlib's own error
    shard.write_bytes(bytes(squeezed))
    edit_features(folder, lambda m: m.update(compression="GZIP"))
    with pytest.raises(PrepError, match=f"^{shard}: not a readable TFRecord file"):
        pipeline.load(folder)

    features = {"image/encoded": 5, "image/format": b"png", "image/height": 8, "image/width": 12,
                "image/channels": 3, "image/class/label": 0, "image/class/text": b"cat", "image/filename": b"a.png"}
    shard.write_bytes(tfrecord.frame(tfrecord.encode_example(features)))  # valid CRCs, an int for the PNG
    edit_features(folder, lambda m: m.update(compression=""))
    with pytest.raises(PrepError, match=f"^{shard}: .*feature image/encoded is not of type string"):
        pipeline.load(folder)


# -- FIFOs where a loader reads a file ---------------------------------------------------------

# Each loader runs in a process of its own, so that one waiting on a FIFO is ended by the timeout.
CALL = """
import sys
import pipeline
from pipeline.errors import PrepError
from pipeline.formats import FORMATS
name, path = sys.argv[1:]
fn = {"load": pipeline.load, "load_classes": pipeline.load_classes, "load_torch": pipeline.load_torch,
      **{f"{fmt}.load": module.load for fmt, module in FORMATS.items()}}[name]
try:
    result = fn(path)
except PrepError as err:
    print(f"PrepError: {err}")
else:
    print(f"returned a {type(result).__name__} of {len(result)}")
"""


def call(name: str, path: Path) -> str:
    """What ``name(path)`` printed in a process of its own: a PrepError, or what it returned."""
    try:
        done = subprocess.run([sys.executable, "-c", CALL, name, str(path)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}({path}) did not return: it waits on a FIFO")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout.strip()


def fifo(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def test_a_fifo_for_manifest_json_is_passed_over_and_a_manifest_of_another_shape_too(work):
    fifo(work / "manifest.json")
    assert call("load", work) == "returned a tuple of 3"  # the formats present decide
    assert call("load_torch", work).startswith("returned a TorchDataset of ")
    assert call("load_classes", work / "manifest.json").startswith(f"PrepError: {work / 'manifest.json'}: ")
    (work / "manifest.json").unlink()
    (work / "manifest.json").write_text(json.dumps({"settings": ["pack"]}))
    assert len(pipeline.load(work)) == 3


def test_a_fifo_beside_a_flat_pkl_gz_is_an_error_not_a_wait(work):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--flat", "--executor", "serial"))
    fifo(work / "manifest.json")
    assert call("load_torch", work / "dataset.pkl.gz") == (
        f"PrepError: {work / 'dataset.pkl.gz'} holds flat arrays; the image shape is in {work / 'manifest.json'},"
        " which is missing or unreadable")


@pytest.mark.parametrize(("fmt", "path"), [
    ("tfrecord", "tfrecord/features.json"), ("tfrecord", "tfrecord/train-00000-of-00001.tfrecord"),
    ("parquet", "data/train-00000-of-00001.parquet"), ("h5", "dataset.h5"), ("pkl.gz", "dataset.pkl.gz"),
])
def test_a_fifo_for_a_packaged_file_is_an_error_not_a_wait(work, fmt, path):
    fifo(work / path)
    target = work / path if fmt in ("h5", "pkl.gz") else (work / path).parent
    printed = call(f"{fmt}.load", target)
    assert printed.startswith(f"PrepError: {work / path}") and "not a regular file" in printed, printed


# -- Parquet: damaged pages, links out ----------------------------------------------------------


def test_a_damaged_parquet_page_is_one_line_naming_the_file_from_load_and_load_torch(work):
    import pyarrow.parquet as pq

    shard = work / "data" / "train-00000-of-00001.parquet"
    start = pq.ParquetFile(shard).metadata.row_group(0).column(0).data_page_offset
    data = bytearray(shard.read_bytes())
    for i in range(start + 96, start + 136):  # inside the first page's zstd frame
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    for load in (lambda: pipeline.load(work / "data"), lambda: pipeline.load_torch(work / "data", "train")[0]):
        with pytest.raises(PrepError) as raised:
            load()
        message = str(raised.value)
        assert message.startswith(f"{shard}: row group 0") and "\n" not in message, message


def test_prep_verify_names_the_file_when_pyarrow_refuses_a_row_group(work, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def refuse(self, *args, **kwargs):
        raise pa.ArrowInvalid("Column 1 named label expected length 0 but got length 18")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", refuse)
    result = cli_run(work, "verify", "--executor", "serial")
    assert_one_line_error(result, "train-00000-of-00001.parquet: row group 0", "expected length 0")


def test_a_parquet_shard_linked_from_elsewhere_is_not_read(work, tmp_path):
    shard = work / "data" / "train-00000-of-00001.parquet"
    outside = Path(shutil.move(shard, tmp_path / "elsewhere.parquet"))
    shard.symlink_to(outside)
    with pytest.raises(PrepError, match="leaves the Parquet folder through a symbolic link"):
        pipeline.load(work / "data")


# -- pkl.gz: what the unpickler allows, only as numpy calls it -----------------------------------


def gzipped(tmp_path: Path, name: str, pickled: bytes) -> Path:
    path = tmp_path / f"{name}.pkl.gz"
    path.write_bytes(gzip.compress(pickled))
    return path


def test_crafted_pickles_are_one_line_refusals_not_memory_or_overflow_errors(tmp_path):
    cases = {
        "overflow": (b"F1e400\n.", "not a readable pkl.gz dataset (OverflowError: "),
        "ndarray called": (b"cnumpy\nndarray\n((I1099511627776\nttR.", "refusing to unpickle a call of numpy.ndarray from"),
        "huge reconstruct": (b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I1099511627776\ntS'b'\ntR.",
                             "refusing to unpickle numpy's _reconstruct of (1099511627776,) from"),
        "huge bytes": (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b".", "not a readable pkl.gz dataset (MemoryError"),
    }
    for name, (pickled, expected) in cases.items():
        path = gzipped(tmp_path, name.replace(" ", "-"), pickled)
        with pytest.raises(PrepError) as raised:
            pipeline.load(path)
        assert expected in str(raised.value) and "\n" not in str(raised.value), (name, raised.value)


def test_a_protocol_2_pickle_with_an_empty_split_loads(tmp_path):
    x, y = np.arange(2 * 4 * 3 * 3, dtype=np.uint8).reshape(2, 4, 3, 3), np.array([1, 0], np.int64)
    empty = (x[:0], y[:0])  # protocol 2 pickles its empty bytes as bytes()
    path = gzipped(tmp_path, "p2", pickle.dumps([(x, y), empty, empty], protocol=2))
    (got_x, got_y), (valid_x, valid_y), _ = pipeline.load(path)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y) and valid_x.shape == (0, 4, 3, 3) and len(valid_y) == 0


# -- h5: load_torch checks shapes and dtypes ------------------------------------------------------


def test_load_torch_refuses_an_h5_file_whose_datasets_do_not_match(tmp_path):
    import h5py

    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        for split in ("train", "valid", "test"):
            f[f"{split}/images"] = np.zeros((4, 8, 12, 3), np.float32)
            f[f"{split}/labels"] = np.zeros(4, np.int64)
    with pytest.raises(PrepError, match=rf"^{path}: split train: images are float32 \(4, 8, 12, 3\); expected uint8"):
        pipeline.load_torch(path, "train")


# -- prep.toml values of the wrong type -------------------------------------------------------------


@pytest.mark.parametrize(("table", "line", "message"), [
    ("split", "groups = 3", "[split] groups must be a path in quotes; received 3"),
    ("encode", "classes = 3", "[encode] classes must be a path in quotes; received 3"),
    ("index", "out = 3", "[index] out must be a path in quotes; received 3"),
    ("split", "seed = [1]", "[split] seed must be a whole number; received [1]"),
    ("resize", "strict = 1", "[resize] strict must be true or false; received 1"),
])
def test_a_prep_toml_value_of_the_wrong_type_is_one_line(tmp_path, prep, table, line, message):
    (tmp_path / "raw" / "cat").mkdir(parents=True)
    (tmp_path / "prep.toml").write_text(f"[{table}]\n{line}\n")
    assert_one_line_error(prep(table, *(["raw"] if table == "index" else [])), f"prep.toml: {message}")


# -- parquet's ENCODING -----------------------------------------------------------------------------


def test_parquet_encoding_names_pyarrows_installed_version(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.0.0" if name == "pyarrow" else real(name))
    assert parquet.ENCODING.endswith("-pyarrow-9.0.0")  # not the last of a sorted glob, where 9.0 follows 15.0
    assert "ENCODING" not in vars(parquet)  # found when read, not at import
