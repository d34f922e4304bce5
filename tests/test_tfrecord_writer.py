"""The TFRecord writer without TensorFlow: its bytes against TensorFlow's own Example and writer."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree
from PIL import Image
from test_pack import cli_run, encoded_rows, ok, outputs

from pipeline.formats import Layout, PackOptions, Sample, tfrecord

CLASSES = {"dog": 5, "chat été": 4, "猫": 6}  # non-ASCII class names, so non-ASCII file paths too


@pytest.fixture(scope="module")
def tf():
    return tfrecord.import_tf()


def png(shape: tuple[int, int, int], seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tf_example(tf, features: dict[str, bytes | int]) -> bytes:
    """The Example built and serialized by TensorFlow: what the writer used to produce."""
    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    example = tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in features.items()}))
    return example.SerializeToString(deterministic=True)


def features_of(png_bytes: bytes, shape, label: int, text: str, path: str) -> dict[str, bytes | int]:
    """The features of one sample, as ``tfrecord._Writer._example`` should set them."""
    height, width, channels = shape
    return {
        "image/encoded": png_bytes, "image/format": b"png", "image/height": height, "image/width": width,
        "image/channels": channels, "image/class/label": label, "image/class/text": text.encode("utf-8"),
        "image/filename": path.encode("utf-8"),
    }


@pytest.mark.parametrize("shape, label, path, png_bytes", [
    ((8, 12, 3), 0, "cat/img0.png", None),
    ((6, 10, 1), 1, "chat été/Ünïcode 猫.png", None),
    ((300, 200, 3), 99_999, "deep/a b/c.png", None),  # 3-byte varints; a PNG over 127 bytes
    ((1, 1, 1), 2, "", b""),  # empty PNG bytes and path: zero-length values are still written
])
def test_writer_example_matches_tensorflow(tf, tmp_path, shape, label, path, png_bytes):
    classes = ("cat", "chat été", "猫") + tuple(f"class {i}" for i in range(3, 100_000))
    png_bytes = png(shape, label) if png_bytes is None else png_bytes
    layout = Layout(*shape, classes, {"train": 1})
    sample = Sample("train", 0, label, path, png_bytes, np.zeros(shape, np.uint8))
    written = tfrecord._Writer(tmp_path, layout, PackOptions())._example(sample)
    assert written == tf_example(tf, features_of(png_bytes, shape, label, classes[label], path))
    assert tf.train.Example.FromString(written).features.feature["image/encoded"].bytes_list.value == [png_bytes]


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -2**63])
def test_encode_example_int64_edge_values(tf, value):
    features = {"b": value, "a": b"x" * 200, "é": b"", "A": value}  # unsorted keys; non-ASCII key last
    assert tfrecord.encode_example(features) == tf_example(tf, features)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**70])
def test_encode_example_refuses_ints_beyond_int64(value):
    with pytest.raises(ValueError, match="64 bits"):
        tfrecord.encode_example({"label": value})


def test_frame_matches_tensorflow_writer(tf, tmp_path):
    records = [b"", b"a", bytes(range(256)) * 70]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for record in records:
            w.write(record)
    assert b"".join(map(tfrecord.frame, records)) == (tmp_path / "tf.tfrecord").read_bytes()


# -- the real pack stage ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    """A work directory up to encode: non-ASCII class names and paths, an empty test split."""
    folder = tmp_path_factory.mktemp("tfwriter")
    work = folder / "work"
    ok(cli_run(work, "index", make_tree(folder / "raw", CLASSES), "--executor", "serial"))
    ok(cli_run(work, "resize", "--size", "12x8", "--executor", "serial"))
    ok(cli_run(work, "split", "--ratios", "7:3:0"))
    ok(cli_run(work, "encode"))
    return work


@pytest.fixture
def work(encoded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(encoded, tmp_path / "work"))


def expected_records(tf, work: Path) -> dict[str, list[bytes]]:
    """split -> the Examples TensorFlow serializes for encoded.csv and the resized PNGs, in order."""
    classes = json.loads((work / "classes.json").read_text(encoding="utf-8"))["classes"]
    records: dict[str, list[bytes]] = {"train": [], "valid": [], "test": []}
    for row in encoded_rows(work):
        data = (work / "resized" / row["resized"]).read_bytes()
        label = int(row["label_id"])
        records[row["split"]].append(tf_example(tf, features_of(data, (8, 12, 3), label, classes[label], row["path"])))
    return records


def pack_tfrecord(work: Path, compression: str) -> dict:
    ok(cli_run(work, "pack", "--format", "tfrecord", "--executor", "serial", "--shard-mb", "0.001",
               "--tfrecord-compression", compression))
    return json.loads((work / "tfrecord" / "features.json").read_text(encoding="utf-8"))


def test_uncompressed_shards_are_byte_identical_to_tf_writer(tf, work, tmp_path):
    meta = pack_tfrecord(work, "none")
    expected = expected_records(tf, work)
    assert any(not paths for paths in expected.values()) and len(meta["splits"]["train"]["shards"]) > 1
    assert any(not row["path"].isascii() for row in encoded_rows(work))
    for split, records in expected.items():
        start = 0
        for shard in meta["splits"][split]["shards"]:
            with tf.io.TFRecordWriter(str(tmp_path / shard["file"])) as w:
                for record in records[start:start + shard["count"]]:
                    w.write(record)
            start += shard["count"]
            assert (work / "tfrecord" / shard["file"]).read_bytes() == (tmp_path / shard["file"]).read_bytes(), shard
        assert start == len(records)


def test_gzip_shards_read_back_with_tensorflow_and_rerun_identically(tf, work, tmp_path):
    meta = pack_tfrecord(work, "gzip")
    assert meta["compression"] == "GZIP"
    for split, records in expected_records(tf, work).items():
        files = [str(work / "tfrecord" / shard["file"]) for shard in meta["splits"][split]["shards"]]
        read = [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
        assert read == records, split
        assert b"".join(gzip.decompress(Path(f).read_bytes()) for f in files) == b"".join(map(tfrecord.frame, read))

    first = {k: v for k, v in outputs(work).items() if k.startswith("tfrecord/")}
    again = Path(shutil.copytree(work, tmp_path / "again"))
    for name in ("tfrecord", ".stamps", "manifest.json"):
        shutil.rmtree(again / name) if (again / name).is_dir() else (again / name).unlink()
    pack_tfrecord(again, "gzip")
    assert {k: v for k, v in outputs(again).items() if k.startswith("tfrecord/")} == first
    assert len(first) > 3


def test_pack_tfrecord_does_not_import_tensorflow(work):
    script = (
        "import sys\nfrom pipeline.cli import main\n"
        f"sys.argv = ['prep', '--workdir', {str(work)!r}, 'pack', '--format', 'tfrecord', '--executor', 'serial',"
        " '--tfrecord-compression', 'gzip']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print('tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Packed {sum(CLASSES.values())} images"), result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert (work / "tfrecord" / "features.json").is_file()
