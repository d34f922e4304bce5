"""`prep status` and `prep report` in memory that does not grow with the rows: a first look
reads each CSV a row at a time, a bounded number of times, and keeps per image only numbers in
arrays; asked again with nothing changed, they read no row, open no image and hash no file, and
each change is still seen."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline import executors, workdir
from pipeline.stages import facts as facts_module
from pipeline.stages import index, resize, split, status
from tests.conftest import hash_entries, make_tree


class Reads:
    """What is read: CSVs (by name, whole or a row at a time), files hashed, images opened."""

    def __init__(self, monkeypatch):
        self.csv, self.hashed, self.images = [], [], []
        png = lambda path: str(path).endswith(".png")  # noqa: E731

        def counted(log, call, is_image=lambda path: False):
            def wrapper(path, *args, **kwargs):
                (self.images if is_image(path) else log).append(Path(path).name)
                return call(path, *args, **kwargs)
            return wrapper

        monkeypatch.setattr(workdir, "read_csv", counted(self.csv, workdir.read_csv))
        monkeypatch.setattr(workdir, "iter_csv", counted(self.csv, workdir.iter_csv))
        monkeypatch.setattr(workdir, "sha256_file", counted(self.hashed, workdir.sha256_file))
        monkeypatch.setattr(workdir, "read_file", counted([], workdir.read_file, png))
        monkeypatch.setattr(Image, "open", counted(self.images, Image.open))
        monkeypatch.setattr(Path, "read_bytes", counted([], Path.read_bytes, png))

    def none(self) -> bool:
        return not (self.csv or self.hashed or self.images)

    def clear(self) -> None:
        self.csv.clear(), self.hashed.clear(), self.images.clear()


@pytest.fixture
def settled(monkeypatch):
    """Every file counts as settled at once, so that a test need not wait for the caches."""
    for module in (workdir, index, resize):
        monkeypatch.setattr(module, "SETTLED_NS", -60 * 10**9, raising=False)


@pytest.fixture
def packed(prep, tmp_path: Path) -> Path:
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12, "bird": 9})
    shutil.copy(raw / "cat" / "img0.png", raw / "cat" / "copy0.png")  # identical files: a group
    shutil.copy(raw / "cat" / "img1.png", raw / "dog" / "copy1.png")  # under two labels
    for args in (["index", raw], ["resize", "--executor", "serial"], ["split"], ["encode"],
                 ["pack", "--format", "pkl.gz", "--executor", "serial"]):
        result = prep(*args)
        assert result.exit_code == 0, result.output
    return tmp_path / "work"


def reasons(result) -> dict[str, tuple[str, list[str]]]:
    return {s["stage"]: (s["state"], s["reasons"]) for s in json.loads(result.stdout)["stages"]}


def test_warm_status_reads_nothing_and_sees_each_change(prep, packed: Path, settled, monkeypatch):
    raw = packed.parent / "raw"
    first = prep("status", "--json")
    assert [state for state, _ in reasons(first).values()][:5] == ["up to date"] * 5
    reads = Reads(monkeypatch)
    assert prep("status", "--json").stdout == first.stdout
    assert reads.none(), (reads.csv, reads.hashed, reads.images)

    def seen(stage: str) -> list[str]:
        reads.clear()
        result = reasons(prep("status", "--json"))
        assert reads.csv  # looked again
        return result[stage][1]

    png = packed / "resized" / "dog" / "img3.png"
    with Image.open(png) as img:
        size = img.size
    Image.new("RGB", size, (1, 2, 3)).save(png)  # in place: its folder is unchanged
    assert seen("resize") == ["1 resized file missing or changed since `prep resize` (dog/img3.png)"]
    (packed / "resized" / "bird" / "img2.png").unlink()
    assert seen("resize") == ["2 resized files missing or changed since `prep resize` (bird/img2.png, ...)"]

    shutil.copy(raw / "dog" / "img0.png", raw / "dog" / "new.png")
    assert seen("index") == ["1 new image in RAW"]
    target = raw / "cat" / "img5.png"
    st = target.stat()
    target.write_bytes(target.read_bytes() + b"\0")  # edited in place, its mtime put back
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert seen("index") == ["1 new image in RAW", "1 image changed in RAW"]
    (raw / "bird" / "img1.png").unlink()
    assert seen("index") == ["1 new image in RAW", "1 image gone from RAW", "1 image changed in RAW"]

    before = prep("status", "--json").stdout
    (raw / ".DS_Store").write_bytes(b"x")  # what index skips changes no verdict
    (raw / "dog" / "notes.txt").write_text("x")
    (raw / "loose.png").write_bytes((raw / "dog" / "img0.png").read_bytes())  # not in a class folder
    assert prep("status", "--json").stdout == before

    labels = packed / "labels.csv"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    assert "1 image no longer in labels.csv" in seen("resize")


@pytest.mark.skipif(sys.platform != "linux" or executors.cpu_count() < 2, reason="walked apart on Linux, on 2 cores")
def test_resized_walked_by_another_process_is_the_same_walk(packed: Path):
    """status walks resized/ in another process while it walks RAW: the same digest as here."""
    folder = packed / "resized"
    with status._walked_apart(folder, serial=False) as walked:
        assert walked is not None
        assert walked()[0] == status.tree_state(folder)[0]
    with status._walked_apart(folder, serial=True) as walked:
        assert walked is None


def test_quick_status_stats_folders_only_and_sees_files_added_removed_or_replaced(prep, packed: Path, settled,
                                                                                  monkeypatch):
    raw = packed.parent / "raw"
    full = prep("status", "--json").stdout
    assert prep("status", "--quick", "--json").stdout == full  # judged once more, then kept
    stats = []

    class Entry:  # a DirEntry whose stat is counted
        def __init__(self, entry):
            self.entry, self.name = entry, entry.name

        def stat(self, **kw):
            stats.append(self.name)
            return self.entry.stat(**kw)

        def __getattr__(self, name):  # is_dir, is_symlink, path, ...
            return getattr(self.entry, name)

    listed = []

    class scandir:  # os.scandir's, each entry counted
        def __init__(self, where):
            listed.append(os.readlink(f"/proc/self/fd/{where}") if isinstance(where, int) else where)
            self.entries = os.scandir(where)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.entries.close()

        def __iter__(self):
            return map(Entry, self.entries)

    monkeypatch.setattr(status, "os", types.SimpleNamespace(**{**vars(os), "scandir": scandir}))
    monkeypatch.setattr(executors, "cpu_count", lambda: 1)  # resized/ walked here too, where it is counted
    reads = Reads(monkeypatch)
    assert prep("status", "--quick", "--json").stdout == full
    assert reads.none(), (reads.csv, reads.hashed, reads.images)
    assert stats == []  # a stat per folder of RAW and resized/, none per entry
    # and only the folders that hold folders are listed (this file system keeps the link count)
    assert sorted(listed) == sorted(str(p) for p in (raw, packed / "resized")), listed
    assert prep("status", "--json").stdout == full
    assert len(stats) > 2 * 33  # a full status: one per entry
    stats.clear()

    def quick(stage: str) -> list[str]:
        return reasons(prep("status", "--quick", "--json"))[stage][1]

    target = raw / "cat" / "img5.png"
    st = target.stat()
    data = target.read_bytes()
    reads.clear()
    assert quick("index") == [] and reads.none()  # each kind of status keeps its own verdict
    target.write_bytes(data + b"\0")  # rewritten in place: what a quick status does not see
    assert quick("index") == []
    assert reasons(prep("status", "--json"))["index"][1] == ["1 image changed in RAW"]
    target.write_bytes(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert quick("index") == []

    replacement = raw / "cat" / ".img5.png.tmp"
    replacement.write_bytes(data + b"\0")
    os.replace(replacement, target)  # saved as most programs save: a new file renamed over the old
    assert quick("index") == ["1 image changed in RAW"]
    (packed / "resized" / "bird" / "img2.png").unlink()
    assert "1 resized file missing or changed since `prep resize` (bird/img2.png)" in quick("resize")
    shutil.copy(raw / "dog" / "img0.png", raw / "dog" / "new.png")
    assert quick("index") == ["1 new image in RAW", "1 image changed in RAW"]


def test_status_reads_each_csv_a_row_at_a_time(prep, packed: Path, settled, monkeypatch):
    (packed / status.STATUS_CACHE).unlink(missing_ok=True)
    reads = Reads(monkeypatch)
    assert prep("status").exit_code == 0
    counts = Counter(name if not name.startswith("resized-files") else "record" for name in reads.csv)
    # labels.csv for index's check, then resize's; resized.csv for its rows, then its files, beside
    # resize's record of them
    assert counts == {"labels.csv": 2, "resized.csv": 2, "record": 1}, counts


def test_the_hash_cache_is_read_beside_labels_csv_in_one_pass(tmp_path: Path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 2})
    assert prep("index", raw).exit_code == 0
    wd, root = workdir.Workdir(tmp_path / "work"), str(raw.resolve())
    labels = wd.path("labels.csv")
    indexed, cached, versions = status._indexed_and_cached(wd, root, labels)
    entries = list(hash_entries(wd, root))
    assert len(entries) == 5 == len(indexed)
    assert set(zip(cached.tolist(), versions.tolist())) == {(hash(p), hash((size, v))) for p, size, v, _, _ in entries}
    assert len(status._indexed_and_cached(wd, "/elsewhere", labels)[1]) == 0


def test_tree_state_sees_a_file_edited_in_place(tmp_path: Path):
    folder = tmp_path / "tree"
    for i in range(5000):  # more than the entries folded into the digest at a time
        (folder / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"d{i % 2}" / f"f{i}").write_bytes(b"x")
    first = status.tree_state(folder)
    assert status.tree_state(folder) == first
    target = folder / "d1" / "f7"
    st = target.stat()
    target.write_bytes(b"y")  # the same size, the mtime put back: the ctime tells
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert status.tree_state(folder)[0] != first[0]
    assert status.tree_state(folder, lambda name: name == "d1")[0] != status.tree_state(folder)[0]


def test_report_warm_reads_nothing_and_cold_reads_each_csv_a_bounded_number_of_times(prep, packed: Path, settled,
                                                                                      monkeypatch):
    reads = Reads(monkeypatch)
    assert prep("report").stdout.startswith("Wrote")
    counts = Counter(reads.csv)
    assert not [name for name in counts if not name.endswith(".csv")]
    assert counts["labels.csv"] <= 2 and counts["resized.csv"] == 1 and counts["splits.csv"] <= 2, counts
    reads.clear()
    assert prep("report").stdout.startswith("Up to date:")
    assert reads.none(), (reads.csv, reads.hashed, reads.images)


def rows(path: Path) -> list[dict]:
    return workdir.read_csv(path)


def test_gather_keeps_what_the_page_shows_and_counts_the_rest(packed: Path, monkeypatch):
    """The facts against the same questions asked of every row (as the page once did)."""
    monkeypatch.setattr(facts_module, "MAX_ROWS", 1)
    found = facts_module.gather(workdir.Workdir(packed), samples=3)

    labels = rows(packed / "labels.csv")
    groups = defaultdict(list)
    for row in labels:
        groups[row["sha256"]].append({k: row[k] for k in ("path", "label", "sha256")})
    groups = [g for g in groups.values() if len(g) > 1]
    conflicts = [g for g in groups if len({r["label"] for r in g}) > 1]
    assert found.labels.count == len(labels)
    assert (found.labels.group_count, found.labels.conflict_count, found.labels.extra) == (
        len(groups), len(conflicts), sum(len(g) - 1 for g in groups)) == (2, 1, 2)
    assert found.labels.groups == groups[:1] and found.labels.conflicts == conflicts[:1]

    splits = rows(packed / "splits.csv")
    first = defaultdict(list)
    for row in splits:
        first[row["label"]].append({k: row[k] for k in ("path", "label", "resized", "split")})
    assert found.splits == [row for label in first for row in first[label][:3]]
    assert found.split_counts == Counter((row["label"], row["split"]) for row in splits)
    assert found.resized.usable == len(rows(packed / "resized.csv")) and found.resized.samples == []

    grouped = defaultdict(list)
    for row in splits:
        if row["group"]:
            grouped[row["group"]].append(row)
    assert found.groups.per_split == {s: [sum(1 for g in grouped.values() if g[0]["split"] == s),
                                          sum(len(g) for g in grouped.values() if g[0]["split"] == s)]
                                      for s in workdir.SPLIT_NAMES}
    largest = sorted(grouped.values(), key=lambda g: (-len(g), workdir.natural_key(g[0]["path"])))[:5]
    assert [(n, s, [r["path"] for r in kept]) for n, s, kept in found.groups.largest] == [
        (len(g), g[0]["split"], [r["path"] for r in g[:12]]) for g in largest]


def test_split_files_are_named_as_split_names_them():
    assert (facts_module.CONFLICTS, facts_module.NEAR_COPIES) == (split.CONFLICTS, split.NEAR_COPIES)


def test_a_size_that_is_not_a_number_is_a_one_line_error(prep, packed: Path):
    table = packed / "resized.csv"
    lines = table.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    fields = lines[3].rstrip("\n").split(",")
    fields[header.index("width")] = "wide"
    table.write_text("".join(lines[:3] + [",".join(fields) + "\n"] + lines[4:]))
    result = prep("report")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{table} line 4: width 'wide'" in result.output
