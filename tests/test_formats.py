"""The three formats and the load API: round trips against the resized PNGs, equality across formats."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pack import cli_run, encoded_rows, ok, prepare

import pipeline
from pipeline.errors import PrepError
from pipeline.formats import pickle_gz

SPLITS = ("train", "valid", "test")


def source(work: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """split -> (images, label ids, paths) straight from encoded.csv and the resized PNGs."""
    found: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    for row in encoded_rows(work):
        with Image.open(work / "resized" / row["resized"]) as img:
            pixels = np.asarray(img)
        x, y, paths = found[row["split"]]
        x.append(pixels[:, :, None] if pixels.ndim == 2 else pixels)
        y.append(int(row["label_id"]))
        paths.append(row["path"])
    return {s: (np.array(x, dtype=np.uint8), np.array(y, dtype=np.int64), p) for s, (x, y, p) in found.items()}


def assert_same_as_source(loaded, expected, shape) -> None:
    for split, (x, y) in zip(SPLITS, loaded, strict=True):
        want_x, want_y, _ = expected[split]
        assert x.dtype == np.uint8 and y.dtype == np.int64
        assert x.shape == (len(want_y), *shape)
        np.testing.assert_array_equal(x, want_x.reshape(x.shape))
        np.testing.assert_array_equal(y, want_y)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("rgb"))


@pytest.fixture
def work(rgb: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(rgb, tmp_path / "work"))


@pytest.fixture(scope="module")
def gray_all(tmp_path_factory) -> Path:
    """Grayscale 10x6, an empty test split, all three formats, gzip TFRecords in several shards."""
    work = prepare(tmp_path_factory.mktemp("gray"), size="10x6", channels="1", ratios="7:3:0")
    ok(cli_run(work, "pack", "--executor", "serial", "--shard-mb", "0.002", "--tfrecord-compression", "gzip"))
    return work


@pytest.mark.parametrize("fmt, name", [("pkl.gz", "dataset.pkl.gz"), ("h5", "dataset.h5")])
def test_round_trip(work, fmt, name):
    ok(cli_run(work, "pack", "--format", fmt, "--executor", "serial"))
    expected = source(work)
    assert_same_as_source(pipeline.load(work / name), expected, (8, 12, 3))
    assert_same_as_source(pipeline.load(work), expected, (8, 12, 3))
    assert pipeline.load_classes(work / name) == ["bird", "cat", "dog"]


def test_the_mnist_pickle_line_loads_it(work):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    p = work / "dataset.pkl.gz"
    train_set, valid_set, test_set = pickle.load(gzip.open(p), encoding='latin1')
    expected = source(work)
    for split, (x, y) in zip(SPLITS, (train_set, valid_set, test_set), strict=True):
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])
    header = p.read_bytes()[:10]
    assert header[3] & 0x08 == 0, "no file name in the gzip header"
    assert header[4:8] == b"\0\0\0\0", "gzip mtime 0"


def test_pkl_gz_is_cut_into_gzip_members_any_reader_joins(work, monkeypatch):
    monkeypatch.setattr(pickle_gz, "MEMBER", 1000)  # this small dataset then spans several members
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    data = (work / "dataset.pkl.gz").read_bytes()
    members = data.count(b"\x1f\x8b\x08\x00\x00\x00\x00\x00")  # each member's header: mtime 0, no name
    plain = gzip.decompress(data)
    assert members == -(-len(plain) // 1000) > 1
    gunzip = subprocess.run(["gzip", "-dc"], input=data, capture_output=True, check=True).stdout
    assert gunzip == plain  # the command-line tool reads the members as one stream too
    train_x, _ = pickle.loads(plain)[0]
    np.testing.assert_array_equal(train_x, source(work)["train"][0])


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 5432])
def test_gzip_members_do_not_depend_on_the_threads_or_the_writes(size, monkeypatch):
    monkeypatch.setattr(pickle_gz, "MEMBER", 1000)
    payload = np.random.default_rng(size).integers(0, 4, size, dtype=np.uint8).tobytes()
    outputs = set()
    for threads, step in [(1, size or 1), (3, 7), (2, 1000), (4, 333)]:
        out = io.BytesIO()
        with pickle_gz.GzipMembers(out, threads) as gz:
            for i in range(0, size, step):
                assert gz.write(payload[i : i + step]) == len(payload[i : i + step])
        outputs.add(out.getvalue())
    assert len(outputs) == 1
    data = outputs.pop()
    assert gzip.decompress(data) == payload
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # mtime 0, no name, OS unknown
    assert data.count(header) == max(1, -(-size // 1000)) and data.startswith(header)


def test_gzip_members_abandoned_on_an_error_write_nothing_more(monkeypatch):
    monkeypatch.setattr(pickle_gz, "MEMBER", 1000)
    out = io.BytesIO()
    with pytest.raises(RuntimeError, match="pickling failed"):
        with pickle_gz.GzipMembers(out, 2) as gz:
            gz.write(b"a" * 1500)
            raise RuntimeError("pickling failed")
    assert out.getvalue() == b""  # the one full member is still queued, not written
    assert gz.pool._shutdown


def test_pkl_gz_flat_float(work):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--flat", "--float", "--executor", "serial"))
    expected = source(work)
    for split, (x, _) in zip(SPLITS, pipeline.load(work / "dataset.pkl.gz"), strict=True):
        want = expected[split][0]
        assert x.dtype == np.float32 and x.shape == (len(want), 8 * 12 * 3)
        assert x.min() >= 0 and x.max() <= 1
        np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), want.reshape(len(want), -1))
    assert "Verified pkl.gz" in ok(cli_run(work, "verify", "--executor", "serial")).stdout


def test_empty_split_keeps_the_image_shape(tmp_path):
    work = prepare(tmp_path, ratios="8:2:0")
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--executor", "serial"))
    for name in ("dataset.pkl.gz", "dataset.h5"):
        x, y = pipeline.load(work / name)[2]
        assert x.shape == (0, 8, 12, 3) and x.dtype == np.uint8
        assert y.shape == (0,) and y.dtype == np.int64
    ok(cli_run(work, "verify", "--executor", "serial"))


def test_all_formats_hold_the_same_samples_and_load_tf_streams_them(gray_all):
    expected = source(gray_all)
    assert len(expected["test"][1]) == 0 and len(expected["valid"][1]) > 0
    loaded = {name: pipeline.load(gray_all / name) for name in ("dataset.pkl.gz", "dataset.h5", "tfrecord")}
    for arrays in loaded.values():
        assert_same_as_source(arrays, expected, (6, 10, 1))
    assert pipeline.load_classes(gray_all / "tfrecord") == pipeline.load_classes(gray_all / "dataset.h5")

    for name in ("dataset.pkl.gz", "dataset.h5", "tfrecord", "."):  # "." the work directory: tfrecord
        dataset = pipeline.load_tf(gray_all / name, "valid")
        image_spec, label_spec = dataset.element_spec
        assert (image_spec.shape, image_spec.dtype.name, label_spec.dtype.name) == ((6, 10, 1), "uint8", "int64")
        pairs = list(dataset.as_numpy_iterator())
        np.testing.assert_array_equal(np.array([x for x, _ in pairs]), expected["valid"][0])
        np.testing.assert_array_equal(np.array([y for _, y in pairs]), expected["valid"][1])
        assert list(pipeline.load_tf(gray_all / name, "test").as_numpy_iterator()) == []


def test_tfrecords_parse_with_tensorflow_alone(gray_all):
    """Only json and tensorflow: features.json is enough to read the shards."""
    script = """
import json, sys
from pathlib import Path
import tensorflow as tf
folder = Path(sys.argv[1])
meta = json.loads((folder / "features.json").read_text())
spec = {name: tf.io.FixedLenFeature(f["shape"], tf.as_dtype(f["dtype"])) for name, f in meta["features"].items()}
out = {}
for split, entry in meta["splits"].items():
    files = [str(folder / shard["file"]) for shard in entry["shards"]]
    rows = []
    for record in tf.data.TFRecordDataset(files, compression_type=meta["compression"]):
        ex = tf.io.parse_single_example(record, spec)
        image = tf.io.decode_png(ex["image/encoded"], channels=meta["image"]["channels"])
        rows.append([ex["image/filename"].numpy().decode(), int(ex["image/class/label"]),
                     ex["image/class/text"].numpy().decode(), image.numpy().tolist()])
    out[split] = rows
assert "pipeline" not in sys.modules
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", script, str(gray_all / "tfrecord")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    classes = json.loads((gray_all / "classes.json").read_text())["classes"]
    for split, (x, y, paths) in source(gray_all).items():
        assert [row[0] for row in parsed[split]] == paths
        assert [row[1] for row in parsed[split]] == y.tolist()
        assert [row[2] for row in parsed[split]] == [classes[i] for i in y]
        np.testing.assert_array_equal(np.array([row[3] for row in parsed[split]], dtype=np.uint8).reshape(x.shape), x)
    shards = json.loads((gray_all / "tfrecord" / "features.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) > 1 and shards[0]["file"] == f"train-00000-of-{len(shards):05d}.tfrecord"


def test_tfrecord_holds_the_resized_png_bytes_unchanged(gray_all):
    from pipeline.formats.tfrecord import import_tf

    tf = import_tf()
    meta = json.loads((gray_all / "tfrecord" / "features.json").read_text())
    first = meta["splits"]["train"]["shards"][0]["file"]
    record = next(iter(tf.data.TFRecordDataset(str(gray_all / "tfrecord" / first), compression_type="GZIP")))
    example = tf.train.Example.FromString(record.numpy())
    row = next(r for r in encoded_rows(gray_all) if r["split"] == "train")
    encoded = example.features.feature["image/encoded"].bytes_list.value[0]
    assert encoded == (gray_all / "resized" / row["resized"]).read_bytes()


def test_load_names_what_it_cannot_find(tmp_path):
    with pytest.raises(PrepError, match="no packaged dataset in"):
        pipeline.load(tmp_path)
    with pytest.raises(PrepError, match="does not exist"):
        pipeline.load(tmp_path / "nothing.h5")
    with pytest.raises(PrepError, match="split must be one of train, valid, test; received 'training'"):
        pipeline.load_tf(tmp_path, "training")


def test_shard_count_follows_the_png_bytes():
    from pipeline.formats.tfrecord import RECORD_OVERHEAD, shard_count

    mib = 1 << 20
    assert shard_count(0, 0, 100) == 1  # an empty split still has its (empty) shard
    assert shard_count(5, 5 * mib, 100) == 1
    assert shard_count(3000, 250 * mib - 3000 * RECORD_OVERHEAD, 100) == 3  # ceil(2.5)
    assert shard_count(4, 400 * mib, 100) == 4  # never an empty shard
