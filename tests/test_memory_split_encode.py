"""`prep split` and `prep encode` hold a few numbers per image, not its rows.

split keeps what it knows of each image in numpy arrays and reads labels.csv and resized.csv
again, side by side, to write its outputs; encode reads splits.csv twice. On a made-up table of
every kind of row (copies, near copies, the same picture under two labels, rejects, images
without hashes, user groups), the outputs and messages are those recorded below (the digests of
what the implementation that held every row wrote), whatever the order of the rows; the tables
are read a line at a time, in a fixed number of passes; and what is alive while splits.csv is
written does not grow with the images by more than a few bytes each."""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from pipeline import workdir
from pipeline.stages import encode, split
from pipeline.stages.resize import RESIZED_COLUMNS

CLASSES = ["Zebra", "img2", "img10", "고양이", "with,comma", "tiny"]  # natural order is not sorted()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def messy_tables(work: Path, per_class: int = 1000, seed: int = 3, shuffle: str = "") -> Path:
    """labels.csv, resized.csv and index.json as `prep index` and `prep resize` write them (no
    image files: split and encode read none), for ``per_class`` images in each class ("tiny"
    has 2): half pictures of their own, half drawn from a pool shared by all classes, with 0 to
    12 of their 64 hash bits changed (and 0 to 80 of 256), some the very same file (under one
    label or two, and a few of them hashed otherwise, as a crafted table may have them); 3%
    rejected by resize, 3% without hashes. ``shuffle``: "labels" or "resized" writes that table
    in another order (then read whole and sorted)."""
    rng = random.Random(seed)
    pool = [(rng.getrandbits(64), rng.getrandbits(256)) for _ in range(per_class // 2)]
    rows = []
    for label in CLASSES:
        for i in range(2 if label == "tiny" else per_class):
            path = f"{label}/img{i}.png"
            sha = digest(path)
            if rng.random() < 0.5:
                h8, h16 = rng.getrandbits(64), rng.getrandbits(256)
            else:
                k = int(len(pool) * rng.random() ** 2)  # some pictures copied often
                h8, h16 = pool[k]
                flips8, flips16 = rng.choice([0, 0, 0, 1, 3, 4, 5, 7, 8, 9, 12]), rng.choice([0, 0, 20, 39, 41, 80])
                for bit in rng.sample(range(64), flips8):
                    h8 ^= 1 << bit
                for bit in rng.sample(range(256), flips16):
                    h16 ^= 1 << bit
                if flips8 == flips16 == 0 and rng.random() < 0.6:
                    sha = digest(f"picture {k}")
                    if rng.random() < 0.05:
                        h8 ^= 1 << rng.randrange(64)
            hashed = rng.random() > 0.03
            rows.append({
                "path": path, "label": label, "sha256": sha, "bytes": str(rng.randrange(100, 9000)),
                "resized": path, "resized_sha256": digest("png " + path),
                "status": "rejected" if rng.random() < 0.03 else "ok", "reason": "", "format": "PNG",
                "mode": "RGB", "width": "64", "height": "64", "settings": "s",
                "phash8": f"{h8:016x}" if hashed else "", "phash16": f"{h16:064x}" if hashed else "",
            })
    rows.sort(key=lambda r: (workdir.natural_key(r["label"]), workdir.natural_key(r["path"])))
    work.mkdir(parents=True, exist_ok=True)
    for name, columns in (("labels.csv", ["path", "label", "sha256", "bytes"]), ("resized.csv", RESIZED_COLUMNS)):
        workdir.write_csv(work / name, columns, rows)
        if name == "labels.csv":  # what index records of the labels.csv it wrote, in natural order
            (work / "index.json").write_text(json.dumps({
                "order": workdir.NATURAL_ORDER, "labels_sha256": workdir.sha256_file(work / name),
                "raw": "raw", "labels": name, "classes": {c: per_class for c in CLASSES},
            }))
        if shuffle + ".csv" == name:
            workdir.write_csv(work / name, columns, random.Random(seed).sample(rows, len(rows)))
    with open(work / "groups.csv", "w", encoding="utf-8", newline="") as handle:  # for --groups
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerows([("path", "group"), *((r["path"], f"g{i % 97}") for i, r in enumerate(rows) if i % 3 == 0),
                          ("nowhere/x.png", "g1")])
    return work


SPLIT_FILES = ["splits.csv", "conflicts.csv", "near_copies.csv", "split.json"]
ENCODE_FILES = ["encoded.csv", "classes.json"]

# command lines (" + " between commands run in turn) -> a digest of what the last wrote and
# printed, as the implementation that held every row did, on messy_tables()
EXPECTED = {
    'split --drop-small': '395cca02a7314914',
    'split --drop-small --near-copies strict': '824ca0c1fcef6a04',
    'split --drop-small --near-copies off': '426ca3d197025b73',
    'split --drop-small --on-conflict drop': '933af81b65a3e866',
    'split --drop-small --ratios 8:2:0 --seed 7': 'd68dff17d124c71c',
    'split --drop-small --ratios 1:1:1 --seed 11 --group-by ^[^/]+/(?P<group>img\\d\\d\\d)': '3867e13346255876',
    'split --drop-small --groups work/groups.csv': '457568a700c23962',
    'split': '238e92579538c101',
    'split --drop-small --on-conflict error': 'a099a903f95038fd',
    'split --drop-small + encode': 'c8606e50efd995fa',
    'split --drop-small --seed 5 + encode --class-order alphabetical': 'cd8597b91696fc8d',
}
REORDERED = ["split --drop-small", "split --drop-small --on-conflict drop",
             "split --drop-small --groups work/groups.csv"]


def outcome(result, work: Path, files: list[str]) -> str:
    """A digest of what a command wrote and printed."""
    text = [str(result.exit_code), result.stdout, result.stderr.replace(str(work), "WORK")]
    text += [(work / f).read_text(encoding="utf-8") if (work / f).exists() else "-" for f in files]
    return digest("\0".join(text))[:16]


def run_commands(prep, work: Path, lines) -> dict[str, str]:
    found = {}
    for line in lines:
        for name in SPLIT_FILES + ENCODE_FILES:
            (work / name).unlink(missing_ok=True)
        for stamp in (work / workdir.STAMPS_DIR).glob("*.json"):
            stamp.unlink()
        for command in line.split(" + "):
            result = prep(*command.split())
        found[line] = outcome(result, work, SPLIT_FILES + ENCODE_FILES)
    return found


def test_outputs_and_messages_are_those_of_the_row_holding_implementation(tmp_path, prep):
    work = messy_tables(tmp_path / "work")
    assert run_commands(prep, work, EXPECTED) == EXPECTED


@pytest.mark.parametrize("shuffle", ["labels", "resized"])
def test_tables_in_another_order_are_read_whole_and_give_the_same(tmp_path, prep, monkeypatch, shuffle):
    held = []
    monkeypatch.setattr(split.Usable, "hold", lambda self, hold=split.Usable.hold: held.append(1) or hold(self))
    work = messy_tables(tmp_path / "work", shuffle=shuffle)
    assert run_commands(prep, work, REORDERED) == {line: EXPECTED[line] for line in REORDERED}
    assert len(held) == len(REORDERED)  # once per run


def test_tables_as_index_and_resize_write_them_are_read_side_by_side(tmp_path, prep, monkeypatch):
    held = []
    monkeypatch.setattr(split.Usable, "hold", lambda self: held.append(1))
    work = messy_tables(tmp_path / "work")
    assert run_commands(prep, work, ["split --drop-small"]) == {"split --drop-small": EXPECTED["split --drop-small"]}
    assert held == []


def test_the_same_in_small_pieces(tmp_path, prep, monkeypatch):
    # every loop over pieces of the arrays (hashes, candidate pairs, edges, pairs) with many pieces
    from pipeline import nearcopy

    monkeypatch.setattr(nearcopy, "_CHUNK", 700)
    monkeypatch.setattr(split, "_CHUNK", 97)
    work = messy_tables(tmp_path / "work")
    lines = ["split --drop-small", "split --drop-small --on-conflict drop"]
    assert run_commands(prep, work, lines) == {line: EXPECTED[line] for line in lines}


# -- reading ---------------------------------------------------------------------------------


def count_reads(monkeypatch) -> dict[str, int]:
    """Rows read, by file name (and "whole": tables read whole), from here on."""
    reads: dict[str, int] = {}
    iter_csv, read_csv = workdir.iter_csv, workdir.read_csv

    def counted(path, *args, **kw):
        for row in iter_csv(path, *args, **kw):
            reads[Path(path).name] = reads.get(Path(path).name, 0) + 1
            yield row

    def whole(path, *args, **kw):
        reads["whole"] = reads.get("whole", 0) + 1
        return read_csv(path, *args, **kw)

    monkeypatch.setattr(workdir, "iter_csv", counted)
    monkeypatch.setattr(workdir, "read_csv", whole)
    return reads


def test_split_and_encode_read_their_tables_a_line_at_a_time_in_a_few_passes(tmp_path, prep, monkeypatch):
    work = messy_tables(tmp_path / "work")
    rows = len(workdir.read_csv(work / "labels.csv"))
    reads = count_reads(monkeypatch)
    assert prep("split", "--drop-small").exit_code == 0
    # one pass for the arrays, one for the paths of the conflicts (up to the last of them),
    # one to write splits.csv (and take the paths of the near copies)
    assert 2 * rows < reads["labels.csv"] == reads["resized.csv"] <= 3 * rows
    assert "whole" not in reads
    kept = len(workdir.read_csv(work / "splits.csv"))
    reads.clear()
    assert prep("encode").exit_code == 0
    assert reads == {"splits.csv": 2 * kept}  # the labels, then the rows to write


# -- memory ----------------------------------------------------------------------------------


def held_while_writing(run, name: str) -> tuple[int, int, int]:
    """The blocks and bytes Python holds as ``run()`` starts writing ``name``, and its peak bytes."""
    seen = []
    write = workdir.write_csv_rows

    def watched(path, *args, **kw):
        if Path(path).name == name:
            gc.collect()  # and with it the free lists of tuples and dicts
            snapshot = tracemalloc.take_snapshot()
            seen.append((len(snapshot.traces), tracemalloc.get_traced_memory()[0]))
        return write(path, *args, **kw)

    workdir.write_csv_rows = watched
    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        workdir.write_csv_rows = write
    (blocks, held), = seen
    return blocks, held, peak


@pytest.mark.parametrize("stage", ["split", "encode"])
def test_what_is_held_grows_by_a_few_bytes_per_image_and_no_object(tmp_path, stage):
    found = []
    for per_class in (300, 1000, 3000):  # the first one imports what the stage needs
        work = messy_tables(tmp_path / str(per_class), per_class=per_class)
        wd = workdir.Workdir(work)
        split_cfg = split.SplitConfig(workdir=wd, labels=work / "labels.csv", out=work / "splits.csv",
                                      drop_small=True)
        encode_cfg = encode.EncodeConfig(workdir=wd, splits=work / "splits.csv", classes_out=work / "classes.json",
                                         out=work / "encoded.csv")
        if stage == "split":
            found.append(held_while_writing(lambda: split.run(split_cfg), "splits.csv"))
        else:
            split.run(split_cfg)
            found.append(held_while_writing(lambda: encode.run(encode_cfg), "encoded.csv"))
    (blocks, held, peak), (more_blocks, more_held, more_peak) = found[1:]
    images = 5 * 2000  # the more
    assert more_blocks - blocks < images / 20  # no object per image (a dict, a tuple, a string): arrays
    if stage == "split":
        assert more_held - held < 120 * images  # a few numbers per image
        assert more_peak - peak < 200 * images
    else:
        assert more_held - held < 4096  # nothing per row
        assert more_peak - peak < 512 * 1024  # (stamping the output reads it a MB at a time)


# -- faults ----------------------------------------------------------------------------------


def edit(table: Path, line: int, **values) -> None:
    rows = workdir.read_csv(table)
    rows[line - 2].update(values)
    workdir.write_csv(table, list(rows[0]), rows)


@pytest.mark.parametrize("fault", ["both tables", "resized.csv", "stale"])
def test_faults_are_reported_as_when_the_tables_are_read_whole(tmp_path, prep, fault):
    work = messy_tables(tmp_path / "work", per_class=200)
    if fault != "stale":
        edit(work / "resized.csv", 40, resized="../../y.png")
    if fault == "both tables":  # labels.csv's fault first, wherever it is
        edit(work / "labels.csv", 300, path="../x.png")
    if fault == "stale":
        edit(work / "resized.csv", 300, sha256=digest("old content"))
    meta = json.loads((work / "index.json").read_text())  # as if index had written labels.csv so
    meta["labels_sha256"] = workdir.sha256_file(work / "labels.csv")
    (work / "index.json").write_text(json.dumps(meta))
    stale = workdir.read_csv(work / "labels.csv")[298]["path"]
    expected = {"both tables": ("labels.csv line 300", "'../x.png'", "leaves RAW"),
                "resized.csv": ("resized.csv line 40", "'../../y.png'", "leaves resized/"),
                "stale": ("resized.csv is out of date", f"({stale} not resized)")}[fault]
    assert_one_line_error(prep("split", "--drop-small"), *expected)
