"""`prep verify`: passes on a fresh pack, and every kind of difference fails with its file, split and index."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from test_pack import cli_run, encoded_rows, ok, prepare


def reseal(work: Path, rel: str) -> None:
    """Record a file's new size and sha256 in manifest.json, as a buggy writer would have."""
    manifest_path = work / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (work / rel).read_bytes()
    manifest["files"][rel].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_path.write_text(json.dumps(manifest))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    work = prepare(tmp_path_factory.mktemp("verify"))
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--executor", "serial"))
    return work


@pytest.fixture
def work(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "work"))


def verify(work: Path):
    return cli_run(work, "verify", "--executor", "serial")


def test_fresh_pack_verifies(work, tmp_path):
    result = ok(cli_run(tmp_path / "elsewhere", "verify", str(work), "--executor", "serial"))
    assert result.stdout.startswith("Verified pkl.gz, h5: 2 files")
    assert "pixels match the resized PNGs" in result.stdout


def test_without_the_resized_pngs_the_formats_are_compared_with_each_other(work):
    shutil.rmtree(work / "resized")
    assert "pixels match each other" in ok(verify(work)).stdout


@pytest.mark.parametrize("name", ["dataset.pkl.gz", "dataset.h5", "manifest.json"])
def test_a_flipped_byte_is_caught_and_named(work, name):
    flip_byte(work / name)
    # XOR 0xFF turns an ASCII byte into a non-UTF-8 one, so manifest.json is no longer JSON
    assert_one_line_error(verify(work), name, "not UTF-8" if name.endswith(".json") else "sha256")


def test_a_missing_file_is_named(work):
    (work / "dataset.h5").unlink()
    assert_one_line_error(verify(work), "dataset.h5", "missing")


def test_different_pixels_are_named_by_split_and_index(work):
    import h5py

    with h5py.File(work / "dataset.h5", "r+") as f:
        f["valid/images"][2, 0, 0, 0] ^= 0xFF
    reseal(work, "dataset.h5")
    path = [r for r in encoded_rows(work) if r["split"] == "valid"][2]["path"]
    assert_one_line_error(verify(work), "dataset.h5", "split valid, index 2", path, "pixels differ")


def test_a_label_out_of_range_is_named(work):
    with gzip.open(work / "dataset.pkl.gz") as handle:
        data = pickle.load(handle)
    data[0][1][3] = 99
    with gzip.open(work / "dataset.pkl.gz", "wb") as handle:
        pickle.dump(data, handle)
    reseal(work, "dataset.pkl.gz")
    assert_one_line_error(verify(work), "dataset.pkl.gz", "split train, index 3", "label 99 out of range")


def test_a_wrong_dtype_is_named(work):
    with gzip.open(work / "dataset.pkl.gz") as handle:
        data = pickle.load(handle)
    data[1] = (data[1][0].astype("int32"), data[1][1])
    with gzip.open(work / "dataset.pkl.gz", "wb") as handle:
        pickle.dump(data, handle)
    reseal(work, "dataset.pkl.gz")
    assert_one_line_error(verify(work), "dataset.pkl.gz", "split valid", "int32", "expected uint8")


def test_encoded_csv_changed_after_pack(work):
    with open(work / "encoded.csv", "a", encoding="utf-8") as handle:
        handle.write("\n")
    assert_one_line_error(verify(work), "encoded.csv", "changed since `prep pack`")


def test_the_same_content_in_two_splits_is_a_leak(work):
    rows = encoded_rows(work)
    train = next(r for r in rows if r["split"] == "train")
    test = next(r for r in rows if r["split"] == "test")
    test["sha256"] = train["sha256"]
    with open(work / "encoded.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--executor", "serial"))
    assert_one_line_error(verify(work), "two splits", train["path"], test["path"])


def test_no_manifest(work):
    (work / "manifest.json").unlink()
    assert_one_line_error(verify(work), "manifest.json", "prep pack")


def test_tfrecord_shards_are_checked(work):
    ok(cli_run(work, "pack", "--executor", "serial"))
    assert "Verified pkl.gz, h5, tfrecord" in ok(verify(work)).stdout

    shard = sorted((work / "tfrecord").glob("valid-*.tfrecord"))[0]
    stray = work / "tfrecord" / "extra.tfrecord"
    shutil.copy(shard, stray)
    assert_one_line_error(verify(work), "tfrecord/extra.tfrecord", "not listed")
    stray.unlink()

    flip_byte(shard)
    assert_one_line_error(verify(work), f"tfrecord/{shard.name}", "sha256")
