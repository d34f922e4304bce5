"""Packing and verifying at scale: the streamed pkl.gz writer, its memory warning, and a `prep verify`
that checks again only what changed since a run that passed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image
from test_pack import cli_run, ok, prepare

from pipeline import workdir
from pipeline.formats import FORMATS, Layout, PackOptions, Sample, pickle_gz
from pipeline.stages import verify as verify_stage

SPLITS = ("train", "valid", "test")


def samples_in_mixed_order(counts: dict[str, int], shape, seed: int = 0) -> list[Sample]:
    """Samples of every split interleaved, as encoded.csv lists them, each split's in order."""
    rng = np.random.default_rng(seed)
    order = [s for s in SPLITS for _ in range(counts[s])]
    rng.shuffle(order)
    position = dict.fromkeys(SPLITS, 0)
    out = []
    for split in order:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        out.append(Sample(split, position[split], int(rng.integers(0, 5)), f"c/{len(out)}.png", None, pixels))
        position[split] += 1
    return out


def in_memory_pkl_gz(samples: list[Sample], counts: dict[str, int], shape, options: PackOptions) -> bytes:
    """What pickle.dump of the whole arrays gives, through the same gzip members."""
    data = []
    for split in SPLITS:
        mine = [s for s in samples if s.split == split]
        x = np.array([s.pixels for s in mine], np.uint8).reshape(counts[split], *shape)
        if options.as_float:
            x = np.divide(x, 255, dtype=np.float32)
        if options.flat:
            x = x.reshape(counts[split], int(np.prod(shape)))
        data.append((x, np.array([s.label for s in mine], np.int64).reshape(counts[split])))
    out = io.BytesIO()
    with pickle_gz.GzipMembers(out, 2) as gz:
        pickle.dump(data, gz, protocol=pickle_gz.PROTOCOL)
    return out.getvalue()


@pytest.mark.parametrize("flat", [False, True], ids=["images", "flat"])
@pytest.mark.parametrize("as_float", [False, True], ids=["uint8", "float"])
@pytest.mark.parametrize("counts", [(1500, 1100, 0), (40, 30, 20)], ids=["large-empty-test", "small"])
def test_the_streamed_pkl_gz_is_the_bytes_of_pickle_dump_and_loads_with_the_plain_snippet(tmp_path, flat, as_float,
                                                                                       counts):
    # 1500 8x8 images (96 KB) are more than a pickle frame: written outside frames, streamed
    shape, counts = (8, 8, 1), dict(zip(SPLITS, counts))
    options = PackOptions(flat=flat, as_float=as_float)
    samples = samples_in_mixed_order(counts, shape)
    target = tmp_path / "dataset.pkl.gz"
    with pickle_gz.writer(target, Layout(*shape, ("a", "b", "c", "d", "e"), counts), options) as w:
        for sample in samples:
            w.write(sample)
    expected = in_memory_pkl_gz(samples, counts, shape, options)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()
    loaded = pickle.load(gzip.open(target), encoding="latin1")
    reference = pickle.loads(gzip.decompress(expected))
    for (x, y), (x0, y0) in zip(loaded, reference, strict=True):
        assert x.dtype == x0.dtype and x.shape == x0.shape and y.shape == y0.shape
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.pkl.gz"]  # no temporary file left


def test_pack_warns_when_the_pkl_gz_takes_over_a_quarter_of_memory_to_load(tmp_path, monkeypatch):
    work = prepare(tmp_path)
    monkeypatch.setattr(pickle_gz, "_machine_memory", lambda: 2_000_000_000)
    result = ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    assert "quarter" not in result.output
    (work / "dataset.pkl.gz").unlink()
    # 30 images of 12x8x3 as float32 with their labels: 30 * (288 * 4 + 8) bytes
    monkeypatch.setattr(pickle_gz, "_machine_memory", lambda: 4 * 30 * (288 * 4 + 8) - 1)
    result = ok(cli_run(work, "pack", "--format", "pkl.gz", "--float", "--executor", "serial"))
    warnings = [line for line in result.output.splitlines() if "quarter" in line]
    assert len(warnings) == 1, result.output
    for fragment in ("dataset.pkl.gz", "this machine", "h5", "parquet", "tfrecord"):
        assert fragment in warnings[0]


# -- incremental verify ---------------------------------------------------------------------


def age(root: Path, seconds: int = 60) -> None:
    """Set every file's and folder's mtime ``seconds`` back, as if written well before a check."""
    then = os.stat(root).st_mtime - seconds
    for path in [root, *root.rglob("*")]:
        os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture(scope="module")
def packed_all(tmp_path_factory) -> Path:
    work = prepare(tmp_path_factory.mktemp("scale-verify"))
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--format", "tfrecord", "--executor", "serial"))
    return work


@pytest.fixture
def work(packed_all: Path, tmp_path: Path) -> Path:
    work = Path(shutil.copytree(packed_all, tmp_path / "work"))
    age(work)
    return work


def verify(work: Path, *args):
    return cli_run(work, "verify", "--executor", "serial", *args)


class Reads:
    """Counts what verify reads: each format's reader, the resized PNGs and the files hashed."""

    def __init__(self, monkeypatch):
        self.formats: list[str] = []
        self.pngs = 0
        self.hashed: list[str] = []
        for name, module in FORMATS.items():
            monkeypatch.setattr(module, "read", self._reader(name, module.read))
        digest_pngs, sha256_file = verify_stage.digest_pngs, workdir.sha256_file

        def pngs(files, folder):
            self.pngs += len(files)
            return digest_pngs(files, folder)

        def hashed(path, *args):
            self.hashed.append(Path(path).name)
            return sha256_file(path, *args)

        monkeypatch.setattr(verify_stage, "digest_pngs", pngs)
        monkeypatch.setattr(workdir, "sha256_file", hashed)

    def _reader(self, name, read):
        def counted(*args):
            self.formats.append(name)
            return read(*args)

        return counted


def test_a_rerun_with_nothing_changed_reads_no_image_and_hashes_no_file(work, monkeypatch):
    first = ok(verify(work)).stdout
    assert "pixels match the resized PNGs" in first
    assert (work / verify_stage.VERIFIED).is_file()
    reads = Reads(monkeypatch)
    again = ok(verify(work)).stdout
    assert "unchanged since the last check at" in again and again.startswith("Verified pkl.gz, h5, tfrecord:")
    assert (reads.formats, reads.pngs, reads.hashed) == ([], 0, [])
    full = ok(verify(work, "--full")).stdout
    assert "pixels match the resized PNGs" in full
    assert sorted(reads.formats) == ["h5", "pkl.gz", "tfrecord"] and reads.pngs == 30
    assert "dataset.h5" in reads.hashed and "encoded.csv" in reads.hashed


def test_a_file_edited_after_a_check_is_named(work):
    ok(verify(work))
    data = bytearray((work / "dataset.h5").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (work / "dataset.h5").write_bytes(bytes(data))
    assert_one_line_error(verify(work), "dataset.h5", "sha256")


def test_a_repacked_format_is_read_again_alone(work, monkeypatch):
    ok(verify(work))
    ok(cli_run(work, "pack", "--format", "tfrecord", "--tfrecord-compression", "gzip", "--executor", "serial"))
    reads = Reads(monkeypatch)
    result = ok(verify(work)).stdout
    assert "unchanged since" not in result and "pixels match the resized PNGs" in result
    assert reads.formats == ["tfrecord"] and reads.pngs == 30
    assert reads.hashed == [p.name for p in sorted((work / "tfrecord").iterdir()) if p.is_file()]


def test_a_resealed_edit_is_found_without_reading_the_other_formats(work, monkeypatch):
    import h5py

    ok(verify(work))
    with h5py.File(work / "dataset.h5", "r+") as f:
        f["valid/images"][1, 0, 0, 0] ^= 0xFF
    manifest = json.loads((work / "manifest.json").read_text())
    data = (work / "dataset.h5").read_bytes()
    manifest["files"]["dataset.h5"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (work / "manifest.json").write_text(json.dumps(manifest))
    reads = Reads(monkeypatch)
    assert_one_line_error(verify(work), "dataset.h5", "split valid, index 1", "pixels differ")
    assert reads.formats == ["h5"]


def test_a_resized_png_replaced_after_a_check_is_named(work):
    ok(verify(work))
    png = next((work / "resized" / "dog").glob("*.png"))
    replacement = png.with_name("new.tmp")
    Image.new("RGB", (12, 8), (1, 2, 3)).save(replacement, format="PNG")
    os.replace(replacement, png)  # as resize writes: a new file renamed in, which changes the folder
    os.utime(png.parent, (os.stat(png.parent).st_atime, os.stat(png.parent).st_mtime - 60))  # settled, yet changed
    assert_one_line_error(verify(work), f"resized/dog/{png.name}", "changed since `prep resize`")


def test_a_failed_check_is_not_recorded(work):
    encoded = work / "encoded.csv"
    original = encoded.read_bytes()
    encoded.write_bytes(original + b"\n")
    assert_one_line_error(verify(work), "encoded.csv", "changed since `prep pack`")
    assert not (work / verify_stage.VERIFIED).exists()
    encoded.write_bytes(original)
    assert "pixels match the resized PNGs" in ok(verify(work)).stdout


def test_verify_reads_the_pkl_gz_without_loading_it_whole(work, monkeypatch):
    def refuse(path):
        raise AssertionError("verify loaded the whole pkl.gz")

    monkeypatch.setattr(pickle_gz, "load", refuse)
    assert "pixels match the resized PNGs" in ok(verify(work, "--full")).stdout

