"""`prep index`: labels from folders or file names, what is skipped, order, CSV, hashes, cache."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_one_line_error, make_tree, tree_digests, write_image
from click.testing import CliRunner

from pipeline import workdir
from pipeline.cli import cli
from pipeline.errors import PrepError
from pipeline.executors import Execution
from pipeline.stages import index


def read_labels(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def config(tmp_path, raw, **kw):
    wd = workdir.Workdir(tmp_path / "work")
    return index.IndexConfig(raw=raw, workdir=wd, out=wd.path("labels.csv"), execution=Execution("serial", progress=False), **kw)


def test_class_is_the_first_level_folder_and_deeper_files_belong_to_it(tmp_path, prep):
    raw = tmp_path / "raw"
    write_image(raw / "cat" / "a.png")
    write_image(raw / "cat" / "indoor" / "sofa" / "b.png")
    write_image(raw / "dog" / "2021" / "c.png")
    result = prep("index", raw)
    assert result.exit_code == 0, result.output
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert [(r["path"], r["label"]) for r in rows] == [
        ("cat/a.png", "cat"),
        ("cat/indoor/sofa/b.png", "cat"),
        ("dog/2021/c.png", "dog"),
    ]
    assert "Found 3 images in 2 classes (skipped 0 files)" in result.stdout


def test_files_directly_in_raw_are_skipped_in_folder_mode(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 2})
    write_image(raw / "loose.png")
    result = prep("index", raw)
    assert "Found 2 images in 1 class (skipped 1 file)" in result.stdout
    meta = json.loads((tmp_path / "work" / "index.json").read_text())
    assert meta["skipped"] == {"not in a class folder": 1}


def test_labels_from_filename_with_the_default_pattern(tmp_path, prep):
    raw = tmp_path / "flat"
    for name in ["drop-12.png", "drop-2.png", "motor-3.png", "motor-10.jpg", "wet-road-7.png", "nodigits.png",
                 "cat_001.png", "cat.1234.jpg", "cat 7.png", "v1-3.png", "img12.png"]:
        write_image(raw / name)
    result = prep("index", raw, "--labels-from", "filename")
    assert result.exit_code == 0, result.output
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert [(r["path"], r["label"]) for r in rows] == [
        ("cat 7.png", "cat"),
        ("cat.1234.jpg", "cat"),
        ("cat_001.png", "cat"),
        ("drop-2.png", "drop"),
        ("drop-12.png", "drop"),
        ("motor-3.png", "motor"),
        ("motor-10.jpg", "motor"),
        ("v1-3.png", "v1"),
        ("wet-road-7.png", "wet-road"),
    ]
    assert "Found 9 images in 5 classes (skipped 2 files)" in result.stdout
    skipped = json.loads((tmp_path / "work" / "index.json").read_text())["skipped_examples"]
    assert skipped["name does not match the label pattern (--pattern)"] == ["img12.png", "nodigits.png"]


def test_labels_from_filename_with_a_custom_pattern(tmp_path, prep):
    raw = tmp_path / "flat"
    for name in ["IMG_cat_001.png", "IMG_dog_002.png", "sub/IMG_cat_003.png", "other.png"]:
        write_image(raw / name)
    result = prep("index", raw, "--labels-from", "filename", "--pattern", r"IMG_(?P<label>[a-z]+)_\d+")
    assert result.exit_code == 0, result.output
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert {r["path"]: r["label"] for r in rows} == {
        "IMG_cat_001.png": "cat", "sub/IMG_cat_003.png": "cat", "IMG_dog_002.png": "dog",
    }


@pytest.mark.parametrize("pattern", ["(unclosed", "no_group_here"])
def test_a_bad_pattern_is_a_one_line_error(tmp_path, prep, pattern):
    write_image(tmp_path / "raw" / "a-1.png")
    assert_one_line_error(prep("index", tmp_path / "raw", "--labels-from", "filename", "--pattern", pattern), pattern)


def test_extensions_are_case_insensitive(tmp_path, prep):
    raw = tmp_path / "raw"
    kinds = {"a.JPG": "JPEG", "b.Png": "PNG", "c.TIFF": "TIFF", "d.webp": "WEBP", "e.jpeg": "JPEG",
             "f.Tif": "TIFF", "g.BMP": "BMP", "h.gif": "GIF", "i.JFIF": "JPEG", "j.jpe": "JPEG"}
    for name, fmt in kinds.items():
        write_image(raw / "x" / name, fmt=fmt)
    write_image(raw / "x" / "notes.txt.bak", fmt="PNG")
    (raw / "x" / "readme.txt").write_text("not an image")
    result = prep("index", raw)
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert sorted(r["path"].split("/")[1] for r in rows) == sorted(kinds)
    assert "Found 10 images in 1 class (skipped 2 files)" in result.stdout
    assert prep("resize", "--size", "4", "--executor", "serial").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "work" / "resized" / "x").iterdir()) == sorted(
        n.rsplit(".", 1)[0] + ".png" for n in kinds)


def test_hidden_and_junk_files_are_skipped_counted_and_never_classes(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 2, "dog": 2})
    junk = [
        "cat/.DS_Store", "cat/Thumbs.db", "cat/.hidden.png", "dog/desktop.ini",
        ".ipynb_checkpoints/img0-checkpoint.png", "cat/.ipynb_checkpoints/img1-checkpoint.png",
        "__MACOSX/cat/._img0.png", ".trash/x.png", ".DS_Store",
    ]
    for rel in junk:
        write_image(raw / rel, fmt="PNG")
    result = prep("index", raw)
    assert result.exit_code == 0, result.output
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert {r["label"] for r in rows} == {"cat", "dog"}
    assert len(rows) == 4
    # a hidden folder counts once, whatever it holds, and as a folder
    assert "Found 4 images in 2 classes (skipped 5 files and 4 folders)" in result.stdout
    meta = json.loads((tmp_path / "work" / "index.json").read_text())
    assert meta["skipped"] == {"hidden": len(junk)}
    assert meta["empty_classes"] == []


def test_symlinks_are_followed_only_when_asked(tmp_path, prep):
    elsewhere = make_tree(tmp_path / "elsewhere", {"more": 2})
    raw = make_tree(tmp_path / "raw", {"cat": 2})
    os.symlink(elsewhere / "more", raw / "linked_class")
    os.symlink(elsewhere / "more" / "img0.png", raw / "cat" / "linked.png")
    os.symlink(raw, raw / "cat" / "loop")  # would never end if followed blindly

    result = prep("index", raw)
    assert result.exit_code == 0, result.output
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert [r["path"] for r in rows] == ["cat/img0.png", "cat/img1.png"]
    assert "(skipped 3 files)" in result.stdout

    result = prep("index", raw, "--follow-links")  # not the links that lead out of RAW
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in read_labels(tmp_path / "work" / "labels.csv")] == ["cat/img0.png", "cat/img1.png"]
    skipped = json.loads((tmp_path / "work" / "index.json").read_text())["skipped_examples"]
    assert sorted(skipped["symlink leaves RAW (use --allow-outside-links)"]) == ["cat/linked.png", "linked_class"]

    result = prep("index", raw, "--follow-links", "--allow-outside-links")
    assert result.exit_code == 0, result.output
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert [r["path"] for r in rows] == [
        "cat/img0.png", "cat/img1.png", "cat/linked.png", "linked_class/img0.png", "linked_class/img1.png",
    ]
    target = hashlib.sha256((elsewhere / "more" / "img0.png").read_bytes()).hexdigest()
    assert rows[2]["sha256"] == target


def test_natural_sort_and_the_same_csv_whatever_the_creation_order(tmp_path, prep):
    names = [f"class{c}/img{i}.png" for c in (1, 2, 10) for i in (1, 2, 10, 11, 20)]
    outputs = []
    for attempt in range(2):
        raw = tmp_path / f"raw{attempt}"
        order = names[:]
        random.Random(attempt).shuffle(order)
        for rel in order:
            write_image(raw / rel, color=(names.index(rel) * 5, 0, 0))
        assert prep("index", raw, workdir=tmp_path / f"work{attempt}").exit_code == 0
        outputs.append((tmp_path / f"work{attempt}" / "labels.csv").read_bytes())
    assert outputs[0] == outputs[1]
    rows = read_labels(tmp_path / "work0" / "labels.csv")
    assert [r["path"] for r in rows] == names


def test_csv_header_relative_paths_sha256_and_size(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    text = (tmp_path / "work" / "labels.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0].startswith("path,label")
    rows = read_labels(tmp_path / "work" / "labels.csv")
    assert len(rows) == 30
    on_disk = {p.relative_to(tree).as_posix() for p in tree.rglob("*.png")}
    assert {r["path"] for r in rows} == on_disk
    for row in rows:
        assert "\\" not in row["path"] and not row["path"].startswith("/")
        data = (tree / row["path"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(row["bytes"]) == len(data) == os.path.getsize(tree / row["path"])


def test_odd_names_round_trip_through_csv_and_pandas(tmp_path, prep):
    raw = tmp_path / "raw"
    rels = [
        "고양이/사진 1.png",
        "고양이/a, b.png",
        'with "quotes"/x.png',
        "with, comma/y y.png",
        "NA/nan.png",
        "café crème/naïve.JPG",
        "tab\tand 'single'/z.png",
    ]
    for i, rel in enumerate(rels):
        write_image(raw / rel, color=(i * 30, 0, 0), fmt="JPEG" if rel.endswith("JPG") else "PNG")
    result = prep("index", raw)
    assert result.exit_code == 0, result.output
    labels = tmp_path / "work" / "labels.csv"
    expected = {rel: rel.split("/")[0] for rel in rels}
    assert {r["path"]: r["label"] for r in read_labels(labels)} == expected
    frame = pd.read_csv(labels, dtype=str, keep_default_na=False, encoding="utf-8")
    assert dict(zip(frame["path"], frame["label"])) == expected
    assert "고양이" in result.stdout


def test_missing_raw_is_a_one_line_error(tmp_path, prep):
    assert_one_line_error(prep("index", tmp_path / "nope"), "nope", "does not exist")


def test_raw_that_is_a_file_is_a_one_line_error(tmp_path, prep):
    path = write_image(tmp_path / "one.png")
    assert_one_line_error(prep("index", path), "one.png", "not a folder")


def test_raw_without_images_is_a_one_line_error(tmp_path, prep):
    (tmp_path / "raw" / "cat").mkdir(parents=True)
    (tmp_path / "raw" / "cat" / "notes.txt").write_text("hello")
    assert_one_line_error(prep("index", tmp_path / "raw"), "no images found", "skipped 1 file")
    assert not (tmp_path / "work" / "labels.csv").exists()


def test_images_directly_in_raw_get_a_hint_at_the_two_ways_out(tmp_path, prep):
    for i in range(3):
        write_image(tmp_path / "china" / f"photo-{i}.png")
    result = prep("index", tmp_path / "china")
    assert_one_line_error(result, "no images found", "3 images are directly in it", "--labels-from filename")
    assert prep("index", tmp_path / "china", "--labels-from", "filename").exit_code == 0


def test_a_pattern_without_labels_from_filename_is_an_error_not_ignored(tmp_path, prep, tree):
    result = prep("index", tree, "--pattern", "(?P<label>[a-z]+)")
    assert_one_line_error(result, "--pattern", "--labels-from filename")
    assert not (tmp_path / "work" / "labels.csv").exists()


def test_empty_class_folder_gets_a_warning_naming_it(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 10})  # enough not to be a small class (tests/test_polish.py)
    (raw / "empty_class").mkdir()
    (raw / "only_text").mkdir()
    (raw / "only_text" / "a.txt").write_text("x")
    result = prep("index", raw)
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 3
    assert "empty_class" in warnings[0] and "only_text" in warnings[1]
    assert warnings[2].startswith("WARNING: one class only (cat): a classifier needs at least two")
    assert "Found 10 images in 1 class" in result.stdout
    (raw / "empty_class" / "a.png").write_bytes((raw / "cat" / "img0.png").read_bytes())
    again = prep("index", raw)
    assert "one class only" not in again.stderr and "Found 11 images in 2 classes" in again.stdout


def test_workdir_inside_raw_is_refused(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 2})
    before = tree_digests(raw)
    assert_one_line_error(prep("index", raw, workdir=raw / "processed"), "inside RAW")
    assert_one_line_error(prep("index", raw, "--out", raw / "labels.csv"), "inside RAW")
    assert tree_digests(raw) == before and not (raw / "processed").exists()


def age(folder: Path, seconds: int = 100) -> None:
    past = time.time_ns() - seconds * 1_000_000_000
    for path in folder.rglob("*"):
        os.utime(path, ns=(past, past))


def test_hash_cache_is_reused_and_changed_files_are_rehashed(tmp_path, monkeypatch):
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    age(raw)
    hashed = []
    real = workdir.sha256_bytes

    def counting(data):
        hashed.append(len(data))
        return real(data)

    monkeypatch.setattr(workdir, "sha256_bytes", counting)
    first = index.run(config(tmp_path, raw))
    assert len(hashed) == 6
    before = (tmp_path / "work" / "labels.csv").read_bytes()

    hashed.clear()
    index.run(config(tmp_path, raw))
    assert hashed == []
    assert (tmp_path / "work" / "labels.csv").read_bytes() == before

    # new content of the same size (a later mtime) and a new file: only those two are hashed
    changed = raw / "dog" / "img1.png"
    stat = changed.stat()
    data = bytearray(changed.read_bytes())
    data[-20] ^= 0xFF
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    write_image(raw / "dog" / "new.png")
    index.run(config(tmp_path, raw))
    assert len(hashed) == 2
    rows = {r["path"]: r for r in read_labels(tmp_path / "work" / "labels.csv")}
    assert rows["dog/img1.png"]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()
    assert "dog/new.png" in rows and first.images == 6

    # new.png was written just now: a rewrite within the same clock tick would keep its size
    # and mtime, so its hash is not trusted until its mtime is older than the listing's time
    hashed.clear()
    index.run(config(tmp_path, raw))
    assert len(hashed) == 1
    age(raw / "dog")
    index.run(config(tmp_path, raw))
    hashed.clear()
    index.run(config(tmp_path, raw))
    assert hashed == []


def test_index_run_rejects_bad_labels_from(tmp_path):
    raw = make_tree(tmp_path / "raw", {"cat": 1})
    with pytest.raises(PrepError, match="'path'"):
        index.run(config(tmp_path, raw, labels_from="path"))


def test_label_from_filename():
    pattern = index.compile_pattern(index.DEFAULT_PATTERN)
    assert index.label_from_filename("sub/drop-12.png", pattern) == "drop"
    assert index.label_from_filename("a-b-1-2.jpeg", pattern) == "a-b-1"
    assert index.label_from_filename("-3.png", pattern) is None
    assert index.label_from_filename("drop.png", pattern) is None


def test_no_name_matching_the_pattern_is_a_one_line_error_saying_so(tmp_path, prep):
    write_image(tmp_path / "raw" / "cat" / "photo.png")
    result = prep("index", tmp_path / "raw", "--labels-from", "filename")
    assert_one_line_error(result, "matches --pattern", "cat/photo.png")


def test_order_is_stable_for_names_natsort_holds_equal(tmp_path, monkeypatch):
    """img1/img01 and classes 1/01 sort the same way whatever order the listing gives."""
    from pipeline import sources

    raw = tmp_path / "raw"
    for label in ("01", "1"):
        for name in ("img01.png", "img1.png", "img2.png"):
            write_image(raw / label / name, color=(len(label) * 40, len(name), 9))
    outputs = []
    real = sources.list_files
    for reverse in (False, True):
        def listing(*args, _reverse=reverse, **kwargs):  # the files listed in another order
            found = real(*args, **kwargs)
            reordered = sources.Listing(skipped=found.skipped, folders=found.folders)
            for entry in sorted(found.entries(), reverse=_reverse):
                reordered.add(*entry)
            return reordered

        monkeypatch.setattr(sources, "list_files", listing)
        work = tmp_path / f"work{reverse}"
        result = CliRunner().invoke(cli, ["--workdir", str(work), "index", str(raw)])
        assert result.exit_code == 0, result.output
        outputs.append((work / "labels.csv").read_bytes())
    assert outputs[0] == outputs[1]
    paths = [line.split(",")[0] for line in outputs[0].decode().splitlines()[1:]]
    assert paths == ["01/img01.png", "01/img1.png", "01/img2.png", "1/img01.png", "1/img1.png", "1/img2.png"]


def test_an_unreadable_file_is_skipped_with_its_reason(tmp_path, monkeypatch):
    from pipeline import sources

    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    real = sources.read_bytes

    def read_bytes(root, rel):
        if rel == "a/img1.png":
            raise PermissionError(13, "Permission denied")
        return real(root, rel)

    monkeypatch.setattr(sources, "read_bytes", read_bytes)
    work = tmp_path / "work"
    result = CliRunner().invoke(cli, ["--workdir", str(work), "index", str(raw), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "Found 5 images in 2 classes (skipped 1 file)" in result.output
    assert "a/img1.png" not in (work / "labels.csv").read_text()
    meta = json.loads((work / "index.json").read_text())
    assert meta["skipped"] == {"unreadable (Permission denied)": 1}


def test_a_copied_work_directory_uses_its_own_labels(tmp_path):
    import shutil

    from pipeline.workdir import Workdir

    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    work = tmp_path / "work"
    assert CliRunner().invoke(cli, ["--workdir", str(work), "index", str(raw)]).exit_code == 0
    shutil.copytree(work, tmp_path / "copy")
    assert Workdir(tmp_path / "copy").labels() == tmp_path / "copy" / "labels.csv"


def _outputs(work: Path) -> dict[str, int]:
    names = ("labels.csv", "index.json", workdir.HASH_CACHE)
    return {n: (work / n).stat().st_mtime_ns for n in names}


@pytest.mark.parametrize("labels_from", ["folder", "filename"])
def test_a_rerun_over_an_unchanged_raw_reads_and_writes_nothing(tmp_path, monkeypatch, labels_from):
    raw = make_tree(tmp_path / "raw", {"class10": 2, "class2": 3, "Zeta": 1})  # natural order is not sorted()
    (raw / "class2" / "notes.txt").write_text("not an image")
    (raw / "empty").mkdir()
    age(raw)
    kw = {"labels_from": "filename", "pattern": r"^img([0-1])$"} if labels_from == "filename" else {}
    first = index.run(config(tmp_path, raw, **kw))
    work = tmp_path / "work"
    written = _outputs(work)
    labels = (work / "labels.csv").read_bytes()

    def no_reading(*args):
        raise AssertionError("an unchanged RAW was read")

    monkeypatch.setattr(workdir, "sha256_bytes", no_reading)
    monkeypatch.setattr(workdir, "write_csv", no_reading)
    again = index.run(config(tmp_path, raw, **kw))
    assert again.up_to_date and not first.up_to_date and "labels.csv is up to date" in again.summary
    assert list(again.class_counts.items()) == list(first.class_counts.items())
    assert (again.images, again.skipped, again.empty_classes) == (first.images, first.skipped, first.empty_classes)
    assert sorted(again.unlabelled) == sorted(first.unlabelled)
    assert bool(first.unlabelled) == (labels_from == "filename")
    assert _outputs(work) == written and (work / "labels.csv").read_bytes() == labels


def _set_mtimes(folder: Path, ns: int) -> None:
    for path in folder.rglob("*"):
        os.utime(path, ns=(ns, ns))


@pytest.mark.parametrize("change, said", [
    ("new image", "since the last run: 1 new"),
    ("image removed", "since the last run: 1 gone"),
    ("image rewritten", "since the last run: 1 changed"),
    ("new other file", "since the last run: no change"),
    ("touched image", "since the last run: no change"),
    ("labels edited", ""),  # not the CSV the last run wrote: nothing to compare with
    ("other settings", "since the last run: 5 changed"),  # other labels
    ("nothing, but just written", "since the last run: no change"),
])
def test_a_rerun_after_any_change_indexes_again(tmp_path, change, said):
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 2})
    past = time.time_ns() - 100_000_000_000
    if change != "nothing, but just written":
        _set_mtimes(raw, past)
    first = index.run(config(tmp_path, raw))
    labels = tmp_path / "work" / "labels.csv"
    kw = {}
    if change == "new image":
        write_image(raw / "dog" / "new.png")
    elif change == "new other file":
        (raw / "cat" / "readme.md").write_text("x")
    elif change == "image removed":
        (raw / "cat" / "img2.png").unlink()
    elif change == "image rewritten":
        write_image(raw / "cat" / "img2.png", color=(1, 2, 3))
        _set_mtimes(raw, past)
    elif change == "touched image":
        os.utime(raw / "cat" / "img0.png", ns=(past + 1, past + 1))  # same bytes: read again to know
    elif change == "labels edited":
        labels.write_text(labels.read_text().replace("cat/img0.png", "cat/img9.png"))
    elif change == "other settings":
        kw = {"labels_from": "filename", "pattern": r"^(?P<label>img)\d$"}
    # else: a file rewritten within the clock tick of the listing could keep its size and mtime
    if change.startswith("new"):
        _set_mtimes(raw, past)  # the new file as old as the others: only its presence differs
    result = index.run(config(tmp_path, raw, **kw))
    assert not result.up_to_date and not first.up_to_date
    assert result.summary.endswith(said) and ("since" in result.summary) == bool(said)
    rows = read_labels(labels)
    assert "cat/img9.png" not in [r["path"] for r in rows]
    assert len(rows) == {"new image": 6, "image removed": 4}.get(change, 5)
    skipped = json.loads((tmp_path / "work" / "index.json").read_text())["skipped"]
    assert skipped == ({"not an image extension": 1} if change == "new other file" else {})


@pytest.mark.parametrize("text", [
    "path,label\ncat/a.png,cat\n",
    "path,label,sha256\n1,2,3\n\n4,5\n6,7,8,9\n\"x,y\",z,\n",  # blank, short and long lines, quoting
    "",
    "path,label\n",
    "path,label\r\n\"multi\nline\",\"quote \"\"d\"\"\"\r\n",
])
def test_read_csv_gives_what_csv_dictreader_gives(tmp_path, text):
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode("utf-8"))
    with open(path, encoding="utf-8", newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert workdir.read_csv(path) == expected


@pytest.mark.parametrize("files, folders, said", [
    (0, 0, "0 files"), (1, 0, "1 file"), (3, 0, "3 files"), (0, 1, "1 folder"), (2, 1, "2 files and 1 folder"),
])
def test_skipped_counts_read_as_english(files, folders, said):
    assert index._files(files, folders) == said
