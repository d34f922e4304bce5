"""`prep pack` and `prep verify` read encoded.csv a line at a time: they hold no more rows at once
than the shards in flight, whatever the number of images, and keep their errors and outputs."""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import weakref
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from PIL import Image
from test_pack import cli_run, ok

from pipeline import executors, imaging, workdir
from pipeline.errors import PrepError
from pipeline.formats import parquet
from pipeline.stages import pack as pack_stage
from pipeline.stages import verify as verify_stage
from pipeline.stages.encode import ENCODED_COLUMNS

CLASSES = ["ant", "bee", "cow"]
COUNT = 4000  # images: more than twice the rows the shards in flight hold
SHARDS_HELD = (executors.IN_FLIGHT_PER_SLOT + 1) * 256  # shards of 256 rows pending, and the one at hand


def make_work(folder: Path, count: int = COUNT) -> Path:
    """A work directory as `prep encode` leaves it: tiny resized PNGs, classes.json, encoded.csv
    (splits interleaved, as split writes them; a group of two train images every 50)."""
    work = folder / "work"
    rows = []
    for i in range(count):
        label_id = i % len(CLASSES)
        label = CLASSES[label_id]
        name = f"{label}/img{i:05d}.png"
        png = imaging.encode_png(Image.new("RGB", (8, 8), (i % 256, i // 256 % 256, label_id)))
        target = work / "resized" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        split = ("train", "train", "train", "valid", "test")[i % 5]
        group = f"g{i - i % 50}" if i % 50 < 2 else ""
        rows.append([f"{label}/img{i:05d}.jpg", label, hashlib.sha256(b"source %d" % i).hexdigest(), name,
                     hashlib.sha256(png).hexdigest(), split, group, label_id])
    with open(work / "encoded.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ENCODED_COLUMNS)
        writer.writerows(rows)
    (work / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    return work


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    work = make_work(tmp_path_factory.mktemp("memory"))
    ok(cli_run(work, "pack", "--executor", "serial"))
    return work


class Tracked(str):
    """An image path from encoded.csv whose life is followed (a str subclass takes a weak reference)."""


class Rows:
    """How many encoded.csv rows are alive at once: each path read is a :class:`Tracked`,
    counted while anything (a row, a shard, a sample) still refers to it."""

    def __init__(self, monkeypatch):
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.read = self.peak = 0
        iter_csv = workdir.iter_csv

        def tracked(path, columns, *args, **kwargs):
            for values in iter_csv(path, columns, *args, **kwargs):
                if Path(path).name == workdir.ENCODED:
                    values = (Tracked(values[0]), *values[1:])
                    self.alive.add(values[0])
                    self.read += 1
                    self.peak = max(self.peak, len(self.alive))
                yield values

        monkeypatch.setattr(workdir, "iter_csv", tracked)


def test_pack_holds_only_the_rows_of_the_shards_in_flight(tmp_path, monkeypatch):
    work = make_work(tmp_path)
    rows = Rows(monkeypatch)
    # h5 buffers a chunk of each split (1 MiB of pixels: all of these tiny images), parquet a row group
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "tfrecord", "--format", "parquet",
               "--executor", "serial"))
    assert rows.read == 2 * COUNT  # read twice: counted and checked, then packed
    assert rows.peak <= SHARDS_HELD + 3 * parquet.ROW_GROUP < COUNT / 2
    monkeypatch.undo()
    assert "pixels match the resized PNGs" in ok(cli_run(work, "verify", "--executor", "serial")).stdout


def test_a_cold_verify_holds_only_the_rows_of_the_shards_in_flight(packed, monkeypatch):
    rows = Rows(monkeypatch)
    result = ok(cli_run(packed, "verify", "--executor", "serial", "--full")).stdout
    assert "pixels match the resized PNGs" in result and result.startswith("Verified pkl.gz, h5, tfrecord, parquet:")
    assert rows.read == 4 * COUNT  # checked, then once per split, in the order the formats hold them
    assert rows.peak <= SHARDS_HELD + 1 < COUNT / 2


def test_a_warm_verify_reads_no_row(packed, monkeypatch):
    # every file counts as settled at once: a file changed in the last 2 s is checked again,
    # which a quick machine would otherwise hit, the work directory being just made
    from pipeline.stages import index, resize, verify

    for module in (workdir, index, resize, verify):
        monkeypatch.setattr(module, "SETTLED_NS", -60 * 10**9, raising=False)
    ok(cli_run(packed, "verify", "--executor", "serial"))
    rows = Rows(monkeypatch)
    assert "unchanged since the last check" in ok(cli_run(packed, "verify", "--executor", "serial")).stdout
    assert rows.read == 0


def test_encoded_csv_is_never_read_whole(tmp_path, monkeypatch):
    read_csv = workdir.read_csv

    def refuse(path, *args, **kwargs):
        assert Path(path).name != workdir.ENCODED, "encoded.csv read whole"
        return read_csv(path, *args, **kwargs)

    monkeypatch.setattr(workdir, "read_csv", refuse)
    work = make_work(tmp_path, count=40)
    ok(cli_run(work, "pack", "--executor", "serial"))
    assert "pixels match the resized PNGs" in ok(cli_run(work, "verify", "--executor", "serial")).stdout
    assert inspect.isgeneratorfunction(pack_stage.iter_rows)


def test_hashes_that_collide_are_told_apart(packed, monkeypatch):
    """verify finds leaks by a 64-bit hash per image; rows whose hashes meet in two splits are read
    again and compared by their text, so a collision is no leak."""
    monkeypatch.setattr(verify_stage, "hash", lambda text: 12345 << 2, raising=False)
    assert "pixels match the resized PNGs" in ok(cli_run(packed, "verify", "--executor", "serial", "--full")).stdout


@pytest.mark.parametrize("column", ["sha256", "group"])
def test_a_leak_is_named_by_its_first_rows_as_before(tmp_path, column):
    """Two rows of one content (one group) in two splits: the first row of it and the first
    later row of another split are named, as when encoded.csv was held whole."""
    work = make_work(tmp_path, count=40)
    with open(work / "encoded.csv", encoding="utf-8", newline="") as handle:
        table = list(csv.reader(handle))
    at = ENCODED_COLUMNS.index(column)
    # images 11 (train) and 13 (valid) share a value, and so do 21 and 22 (both train: no leak)
    table[12][at] = table[14][at] = "1" * 64
    table[22][at] = table[23][at] = "2" * 64
    with open(work / "encoded.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(table)
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    assert_one_line_error(cli_run(work, "verify", "--executor", "serial"), "two splits",
                          f"{table[12][0]} (train) and {table[14][0]} (valid)")


def test_errors_come_in_the_order_of_a_whole_read(tmp_path):
    """A malformed line anywhere first, then the first path leaving its folder, then the first
    other fault, whatever their order in the file; a single pass stops at the first bad line."""
    work = make_work(tmp_path, count=12)
    wd = workdir.Workdir(work)
    encoded = work / "encoded.csv"
    lines = encoded.read_text().splitlines()
    lines[3] = lines[3].replace(",train,", ",holdout,")
    lines[7] = lines[7].replace("ant/img00006.png", "../img00006.png")
    encoded.write_text("\n".join(lines) + "\n")

    def first_error(**kwargs) -> str:
        with pytest.raises(PrepError) as caught:
            list(pack_stage.iter_rows(encoded, CLASSES, wd, **kwargs))
        return str(caught.value)

    assert "line 8" in first_error(whole_file=True) and "leaves resized/" in first_error(whole_file=True)
    assert "line 4" in first_error() and "'holdout' is not one of" in first_error()
    encoded.write_text("\n".join(lines + ["ant/x.jpg,ant"]) + "\n")
    assert "line 14" in first_error(whole_file=True) and "2 fields" in first_error(whole_file=True)
    assert_one_line_error(cli_run(work, "pack", "--executor", "serial"), "encoded.csv", "line 14")


def test_a_label_id_written_otherwise_reads_as_before(tmp_path):
    work = make_work(tmp_path, count=6)
    encoded = work / "encoded.csv"
    encoded.write_text(encoded.read_text().replace(",0\n", ",00\n", 1))
    rows = list(pack_stage.iter_rows(encoded, CLASSES, workdir.Workdir(work)))
    assert [r.label_id for r in rows] == [0, 1, 2, 0, 1, 2]


def test_an_encoded_csv_changed_while_packing_is_an_error(tmp_path, monkeypatch):
    work = make_work(tmp_path, count=40)
    iter_rows = pack_stage.iter_rows

    def longer(encoded, classes, wd, *, whole_file=False):
        yield from iter_rows(encoded, classes, wd, whole_file=whole_file)
        if not whole_file:  # the second read finds a row the first did not
            yield pack_stage.Row("ant/new.jpg", "ant", "0" * 64, "ant/img00000.png", "0" * 64, "train", "", 0)

    monkeypatch.setattr(pack_stage, "iter_rows", longer)
    assert_one_line_error(cli_run(work, "pack", "--executor", "serial"), "encoded.csv", "changed while it was packed")
    assert not (work / "dataset.pkl.gz").exists() and not (work / "manifest.json").exists()
