"""`prep resize`: every kind of input, rejects as data, resumable, incremental, deterministic."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, make_tree, tree_digests
from pipeline import executors, imaging, workdir
from pipeline.stages import resize


def save(path: Path, img: Image.Image, fmt: str, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **params)
    return path


def make_messy_raw(raw: Path) -> dict[str, str]:
    """One file of every input kind; returns the bad ones: path -> a word of the expected reason."""
    rng = np.random.default_rng(3)
    photo = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(raw / "photo" / "rotated.JPG", photo, "JPEG", exif=exif)
    save(raw / "photo" / "plain.jpeg", photo, "JPEG")
    save(raw / "photo" / "cmyk.jpg", photo.convert("CMYK"), "JPEG")
    save(raw / "photo" / "photo.webp", photo, "WEBP")
    save(raw / "photo" / "photo.BMP", photo, "BMP")
    ramp16 = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (8, 1))
    save(raw / "scan" / "gradient16.png", Image.fromarray(ramp16), "PNG")
    save(raw / "scan" / "bilevel.png", photo.convert("1"), "PNG")
    save(raw / "scan" / "float.tif", Image.fromarray(rng.random((12, 12), dtype=np.float32)), "TIFF")
    save(raw / "scan" / "int.TIFF", Image.fromarray(rng.integers(0, 65535, (12, 12)).astype(np.int32)), "TIFF")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save(raw / "icon" / "palette_trns.png", palette, "PNG", transparency=0)
    save(raw / "icon" / "la.png", photo.convert("LA"), "PNG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    save(raw / "icon" / "rgba.png", rgba, "PNG")
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    save(raw / "icon" / "anim.gif", frames[0], "GIF", save_all=True, append_images=frames[1:])

    full = io.BytesIO()
    photo.save(full, format="JPEG")
    (raw / "photo" / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 3])
    (raw / "photo" / "empty.png").write_bytes(b"")
    (raw / "scan" / "notes.jpg").write_text("this is not a picture\n")
    save(raw / "scan" / "huge.png", Image.new("L", (300, 300)), "PNG")
    return {
        "photo/truncated.jpg": "truncated",
        "photo/empty.png": "empty",
        "scan/notes.jpg": "not an image",
        "scan/huge.png": "decompression bomb",
    }


def snapshot(work: Path) -> dict[str, bytes]:
    """The bytes of every resize output."""
    outputs = sorted(p for p in (work / "resized").rglob("*") if p.is_file())
    files = {p.relative_to(work).as_posix(): p.read_bytes() for p in outputs}
    for name in ("resized.csv", "rejected.csv"):
        files[name] = (work / name).read_bytes()
    return files


def mtimes(work: Path) -> dict[str, int]:
    paths = [p for p in (work / "resized").rglob("*") if p.is_file()] + [work / "resized.csv", work / "rejected.csv"]
    return {p.relative_to(work).as_posix(): p.stat().st_mtime_ns for p in paths}


def age(work: Path) -> None:
    """Set every output's mtime 100 s back, so a rewrite shows whatever the clock resolution."""
    past = time.time_ns() - 100_000_000_000
    for name in mtimes(work):
        os.utime(work / name, ns=(past, past))


def leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.rglob("*") if p.name.endswith(".tmp") or p.name == resize.JOURNAL)


# -- inputs and rejects ----------------------------------------------------------------------


def test_every_kind_of_input_and_bad_files_become_rejected_rows(tmp_path, prep):
    raw = tmp_path / "raw"
    bad = make_messy_raw(raw)
    before = tree_digests(raw)
    assert prep("index", raw).exit_code == 0
    result = prep("resize", "--size", "16", "--max-pixels", "50000", "--executor", "serial")
    assert result.exit_code == 0, result.output
    assert "Resized 13 images" in result.stdout and "4 rejected" in result.stdout

    work = tmp_path / "work"
    rejected = workdir.read_csv(work / "rejected.csv", resize.REJECTED_COLUMNS)
    assert {r["path"] for r in rejected} == set(bad)
    for row in rejected:
        assert bad[row["path"]] in row["reason"].lower(), row
        assert row["label"] == row["path"].split("/")[0]
    table = workdir.read_csv(work / "resized.csv", resize.RESIZED_COLUMNS)
    ok = [r for r in table if r["status"] == "ok"]
    assert len(ok) == 13
    modes = {r["path"]: r["mode"] for r in ok}
    assert (modes["scan/gradient16.png"], modes["photo/cmyk.jpg"], modes["scan/float.tif"]) == ("I;16", "CMYK", "F")
    for row in ok:
        data = (work / "resized" / row["resized"]).read_bytes()
        assert imaging.decode_png(data).shape == (16, 16, 3)
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == "RGB"
    # a rejected image leaves no output file, and RAW is untouched
    assert not (work / "resized" / "photo" / "truncated.png").exists()
    assert tree_digests(raw) == before
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert any("photo/truncated.jpg" in w for w in warnings)


def test_rotated_jpeg_output_is_upright(tmp_path, prep):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red: after a 90 degree clockwise turn, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    save(tmp_path / "raw" / "a" / "r.jpg", Image.fromarray(arr), "JPEG", exif=exif, quality=95)
    save(tmp_path / "raw" / "a" / "s.jpg", Image.fromarray(arr), "JPEG", quality=95)
    assert prep("index", tmp_path / "raw").exit_code == 0
    assert prep("resize", "--size", "10x20", "--executor", "serial").exit_code == 0
    out = imaging.decode_png((tmp_path / "work" / "resized" / "a" / "r.png").read_bytes()).astype(int)
    assert out.shape == (20, 10, 3)
    assert np.abs(out[2:8].mean((0, 1)) - (255, 0, 0)).max() < 30
    assert np.abs(out[12:18].mean((0, 1))).max() < 30


def test_every_image_bad_is_an_error(tmp_path, prep):
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "a" / "x.jpg").write_text("text")
    (raw / "a" / "y.png").write_bytes(b"")
    assert prep("index", raw).exit_code == 0
    assert_one_line_error(prep("resize", "--executor", "serial"), "every image was rejected")
    assert len(workdir.read_csv(tmp_path / "work" / "rejected.csv")) == 2


def test_strict_fails_on_any_reject_but_records_them(tmp_path, prep, tree):
    (tree / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert prep("index", tree).exit_code == 0
    assert_one_line_error(prep("resize", "--strict", "--executor", "serial"), "--strict", "cat/broken.png")
    rejected = workdir.read_csv(tmp_path / "work" / "rejected.csv")
    assert [r["path"] for r in rejected] == ["cat/broken.png"]
    result = prep("resize", "--executor", "serial")
    assert result.exit_code == 0 and "1 rejected" in result.stdout


@pytest.mark.parametrize(
    "args, shape",
    [
        (("--size", "32"), (32, 32, 3)),
        (("--size", "64x48"), (48, 64, 3)),
        (("--size", "64x48", "--mode", "crop", "--channels", "1"), (48, 64, 1)),
        (("--size", "20x30", "--mode", "pad", "--interpolation", "lanczos"), (30, 20, 3)),
    ],
)
def test_output_shapes(tmp_path, prep, args, shape):
    raw = make_tree(tmp_path / "raw", {"a": 2, "b": 1}, size=(50, 30))
    assert prep("index", raw).exit_code == 0
    assert prep("resize", *args, "--executor", "serial").exit_code == 0
    outputs = sorted((tmp_path / "work" / "resized").rglob("*.png"))
    assert len(outputs) == 3
    for path in outputs:
        assert imaging.decode_png(path.read_bytes()).shape == shape


def test_pad_fill_reaches_the_files(tmp_path, prep):
    save(tmp_path / "raw" / "a" / "wide.png", Image.new("RGB", (40, 10), (0, 255, 0)), "PNG")
    assert prep("index", tmp_path / "raw").exit_code == 0
    assert prep("resize", "--size", "8", "--mode", "pad", "--fill", "#0000ff", "--executor", "serial").exit_code == 0
    out = imaging.decode_png((tmp_path / "work" / "resized" / "a" / "wide.png").read_bytes())
    assert (out[0] == (0, 0, 255)).all() and (out[-1] == (0, 0, 255)).all() and (out[4] == (0, 255, 0)).all()


def test_output_names_keep_colliding_names_apart():
    names = resize.output_names(["a/x.jpg", "a/x.png", "a/Y.JPG", "a/y.png", "a/z.tif", "b/x.jpg"])
    assert names == {
        "a/x.jpg": "a/x.jpg.png", "a/x.png": "a/x.png.png", "a/Y.JPG": "a/Y.JPG.png", "a/y.png": "a/y.png.png",
        "a/z.tif": "a/z.png", "b/x.jpg": "b/x.png",
    }
    assert len(set(names.values())) == len(names)


def test_output_names_stay_apart_when_the_fallback_clashes_too():
    rels = ["cat/a.jpg", "cat/a.png", "cat/a.jpg.png", "cat/B.png", "cat/b.PNG"]
    names = resize.output_names(rels)
    assert len({n.casefold() for n in names.values()}) == len(rels)
    assert all(n.startswith("cat/") and n.endswith(".png") for n in names.values())
    assert names == resize.output_names(list(reversed(rels)))  # independent of row order


def test_workdir_inside_raw_is_refused(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    before = tree_digests(tree)
    result = prep("resize", "--labels", tmp_path / "work" / "labels.csv", "--raw", tree, workdir=tree / "processed")
    assert_one_line_error(result, "inside RAW")
    assert tree_digests(tree) == before and not (tree / "processed").exists()


# -- reruns ----------------------------------------------------------------------------------


def test_rerun_with_nothing_changed_rewrites_nothing(tmp_path, prep, tree):
    (tree / "dog" / "bad.jpg").write_text("nope")
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    work = tmp_path / "work"
    first = snapshot(work)
    age(work)
    aged = mtimes(work)
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0
    assert "Up to date: 31 images" in result.stdout
    assert mtimes(work) == aged
    assert snapshot(work) == first


def test_a_label_changed_in_the_labels_csv_reaches_resized_csv_without_resizing_again(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    work = tmp_path / "work"
    images = {k: v for k, v in snapshot(work).items() if k.startswith("resized/")}
    age(work)
    aged = {k: v for k, v in mtimes(work).items() if k.startswith("resized/")}
    rows = workdir.read_csv(work / "labels.csv")
    rows[0]["label"] = "lion"
    workdir.write_csv(work / "labels.csv", list(rows[0]), rows)

    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0 and "Up to date: 30 images" in result.stdout
    table = workdir.read_csv(work / "resized.csv")
    assert [r["label"] for r in table] == [r["label"] for r in rows]
    assert table[0]["label"] == "lion" and table[0]["path"] == rows[0]["path"]
    assert {k: v for k, v in snapshot(work).items() if k.startswith("resized/")} == images
    assert {k: v for k, v in mtimes(work).items() if k.startswith("resized/")} == aged


def test_rerun_retries_a_file_that_was_missing_and_puts_back_a_deleted_output(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    source = tree / "dog" / "img1.png"
    kept = source.read_bytes()
    source.unlink()  # after indexing: resize cannot read it
    first = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 29 images" in first.stdout and "1 rejected" in first.stdout
    source.write_bytes(kept)
    retried = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in retried.stdout and "29 already up to date" in retried.stdout

    work = tmp_path / "work"
    before = snapshot(work)
    (work / "resized" / "cat" / "img3.png").unlink()
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in result.stdout and "29 already up to date" in result.stdout
    assert snapshot(work) == before
    again = prep("resize", "--size", "8", "--executor", "serial")
    assert "Up to date: 30 images" in again.stdout


def test_labels_rewritten_during_a_run_are_read_again_by_the_next(tmp_path, prep, tree, monkeypatch):
    assert prep("index", tree).exit_code == 0
    labels = tmp_path / "work" / "labels.csv"
    new = save(tree / "cat" / "late.png", Image.new("RGB", (24, 20), (9, 9, 9)), "PNG")
    resize_all = resize._resize_all

    def while_index_runs(cfg, *args):
        done = resize_all(cfg, *args)
        # `prep index` rewrites the labels CSV while this run resizes the rows it read
        rows = workdir.read_csv(labels)
        row = {"path": "cat/late.png", "label": "cat", "sha256": workdir.sha256_file(new), "bytes": new.stat().st_size}
        workdir.write_csv(labels, list(rows[0]), rows + [row])
        return done

    monkeypatch.setattr(resize, "_resize_all", while_index_runs)
    assert "Resized 30 images" in prep("resize", "--size", "8", "--executor", "serial").stdout
    monkeypatch.undo()
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in result.stdout and "30 already up to date" in result.stdout
    assert (tmp_path / "work" / "resized" / "cat" / "late.png").is_file()


def test_a_source_rewritten_after_index_is_rejected_until_indexed_again(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    source = tree / "cat" / "img3.png"
    save(source, Image.new("RGB", (24, 20), (1, 2, 3)), "PNG")
    later = source.stat().st_mtime_ns + 5_000_000_000  # a new mtime whatever the clock resolution
    os.utime(source, ns=(later, later))
    first = prep("resize", "--size", "8", "--executor", "serial")
    assert "1 rejected" in first.stdout
    rejected = (tmp_path / "work" / "rejected.csv").read_text()
    assert "cat/img3.png" in rejected and "file changed since `prep index`" in rejected
    assert prep("index", tree).exit_code == 0
    again = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in again.stdout and "0 rejected" in again.stdout
    pixels = imaging.decode_png((tmp_path / "work" / "resized" / "cat" / "img3.png").read_bytes())
    assert (pixels == (1, 2, 3)).all()


def test_a_source_is_hashed_again_unless_its_size_and_mtime_are_those_index_hashed(tmp_path):
    source = save(tmp_path / "raw" / "cat" / "a.png", Image.new("RGB", (24, 20), (9, 9, 9)), "PNG")
    seen = [source.stat().st_size, source.stat().st_mtime_ns]
    wrong = "0" * 64  # not its sha256: only hashing it again shows that
    spec = imaging.ResizeSpec(width=8, height=8)
    (tmp_path / "out").mkdir()
    outcomes = {
        name: resize.resize_shard([("cat/a.png", wrong, version, "cat/a.png")], str(tmp_path / "raw"), spec,
                                  str(tmp_path / "out"))[0].status
        for name, version in {
            "as indexed": seen,
            "not recorded": None,
            "other mtime": [seen[0], seen[1] + 1],
            "other size": [seen[0] + 1, seen[1]],
        }.items()
    }
    assert outcomes == {"as indexed": "ok", "not recorded": "rejected", "other mtime": "rejected", "other size": "rejected"}


def test_changing_the_size_redoes_everything(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    result = prep("resize", "--size", "6x4", "--executor", "serial")
    assert "Resized 30 images" in result.stdout and "0 already up to date" in result.stdout
    for path in (tmp_path / "work" / "resized").rglob("*.png"):
        assert imaging.decode_png(path.read_bytes()).shape == (4, 6, 3)


def test_a_new_transform_revision_redoes_everything(tmp_path, prep, tree, monkeypatch):
    """A fix that changes some images' pixels bumps the revision: every file is made again."""
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    monkeypatch.setattr(resize, "TRANSFORM_REVISION", resize.TRANSFORM_REVISION + 1)
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 30 images" in result.stdout and "0 already up to date" in result.stdout
    again = prep("resize", "--size", "8", "--executor", "serial")
    assert "Up to date: 30 images" in again.stdout


def test_changing_one_source_redoes_only_that_one(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    work = tmp_path / "work"
    before = snapshot(work)
    age(work)
    aged = mtimes(work)
    save(tree / "cat" / "img3.png", Image.new("RGB", (24, 20), (0, 0, 0)), "PNG")
    (tree / "dog" / "img0.png").unlink()

    # resize follows labels.csv: until RAW is indexed again, there is nothing new to do
    stale = prep("resize", "--size", "8", "--executor", "serial")
    assert "Up to date:" in stale.stdout and mtimes(work) == aged

    assert prep("index", tree).exit_code == 0
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in result.stdout and "28 already up to date" in result.stdout
    after = snapshot(work)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == {"resized/cat/img3.png", "resized/dog/img0.png", "resized.csv"}
    assert "resized/dog/img0.png" not in after  # its source is gone
    assert (imaging.decode_png(after["resized/cat/img3.png"]) == 0).all()
    untouched = {k: v for k, v in mtimes(work).items() if k not in changed and k.startswith("resized/")}
    assert len(untouched) == 28
    assert untouched == {k: aged[k] for k in untouched}


# -- determinism and interruption ------------------------------------------------------------


def test_serial_one_and_two_workers_write_identical_bytes(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 15, "b": 12, "c": 9}, size=(30, 22))
    make_messy_raw(raw)
    runs = {}
    ways = {"serial": ("--executor", "serial"), "one": ("--workers", "1"), "two": ("--workers", "2")}
    for name, args in ways.items():
        work = tmp_path / name
        assert prep("index", raw, workdir=work).exit_code == 0
        result = prep("resize", "--size", "12x10", "--mode", "crop", "--max-pixels", "50000", *args, workdir=work)
        assert result.exit_code == 0, result.output
        runs[name] = snapshot(work)
    assert len(runs["serial"]) == 36 + 13 + 2
    assert runs["serial"] == runs["one"] == runs["two"]


def test_simulated_interruption_then_rerun_matches_a_clean_run(tmp_path, prep, tree):
    clean, work = tmp_path / "clean", tmp_path / "work"
    for wd in (clean, work):
        assert prep("index", tree, workdir=wd).exit_code == 0
        assert prep("resize", "--size", "8", "--executor", "serial", workdir=wd).exit_code == 0
    expected = snapshot(clean)

    # what a killed run leaves: a journal of the first shards (its last line cut short), no
    # resized.csv, later outputs missing or half-written under a temporary name, a temporary CSV
    table = workdir.read_csv(work / "resized.csv")
    lines = [json.dumps(row) for row in table[:10]]
    (work / resize.JOURNAL).write_text("\n".join(lines) + "\n" + json.dumps(table[10])[:25])
    (work / "resized.csv").unlink()
    for row in table[10:]:
        (work / "resized" / row["resized"]).unlink()
    (work / "resized" / "dog" / ".img4.png.999.tmp").write_bytes(b"half a png")
    (work / ".resized.csv.abc123.tmp").write_text("path,label\n")

    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0, result.output
    assert "Resized 20 images" in result.stdout and "10 already up to date" in result.stdout
    assert snapshot(work) == expected
    assert leftovers(work) == []


def killed_after_three_writes(prep, monkeypatch, *args) -> list:
    """``prep ARGS`` stopped (as by Ctrl-C) as it is about to write its fourth output file: the
    three it wrote."""
    write, written = workdir.atomic_write_bytes, []

    def dies_after_three(path, data, **kw):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        write(path, data, **kw)

    with monkeypatch.context() as patched:
        patched.setattr(workdir, "atomic_write_bytes", dies_after_three)
        assert prep(*args).exit_code != 0  # Click: "Aborted!"
    return written


def test_split_after_an_interrupted_resize_says_so(tmp_path, prep, tree, monkeypatch):
    """split reads resized.csv, which an interrupted resize has not rewritten yet: it is "up to
    date" with the run before, while status calls it stale; it says why, and what to do."""
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    assert prep("split").exit_code == 0
    assert "interrupted" not in prep("split").output
    killed_after_three_writes(prep, monkeypatch, "resize", "--size", "6", "--executor", "serial")
    result = prep("split")
    assert result.exit_code == 0, result.output
    assert ("prep resize was interrupted (resized.journal is there): resized.csv is from the run before it;"
            " run the interrupted command again") in result.stderr
    assert prep("resize", "--size", "6", "--executor", "serial").exit_code == 0
    result = prep("split")
    assert result.exit_code == 0 and "interrupted" not in result.output


def test_a_run_with_new_settings_killed_while_writing_leaves_no_file_trusted(tmp_path, prep, tree, monkeypatch):
    clean, work = tmp_path / "clean", tmp_path / "work"
    for wd in (clean, work):
        assert prep("index", tree, workdir=wd).exit_code == 0
        assert prep("resize", "--size", "8", "--executor", "serial", workdir=wd).exit_code == 0
    expected = snapshot(clean)

    # --size 6 overwrites three files of its first shard, then the process is killed: the
    # journal keeps what was flushed, the shard's "pending" line, but not the records buffered
    # after it
    written = killed_after_three_writes(prep, monkeypatch, "resize", "--size", "6", "--executor", "serial")
    journal = (work / resize.JOURNAL).read_text().splitlines()
    assert len(written) == 3 and resize.PENDING in json.loads(journal[0])
    (work / resize.JOURNAL).write_text(journal[0] + "\n")
    assert snapshot(work) != expected  # three 6x6 files where resized.csv says 8x8

    result = prep("resize", "--size", "8", "--executor", "serial")  # back to the first settings
    assert result.exit_code == 0, result.output
    shard = len(json.loads(journal[0])[resize.PENDING])
    assert f"Resized {shard} images" in result.stdout and f"{30 - shard} already up to date" in result.stdout
    assert snapshot(work) == expected


def slowed_prep_half_way(work: Path, *args, env: dict | None = None) -> subprocess.Popen:
    """``prep --workdir WORK ARGS`` in a process group of its own, each image slowed down, once
    its resize journal holds 8 records: a run half way, to be killed or interrupted. (Worker
    processes that are spawned, not forked, are slowed down only by what ``env`` makes them
    import.)"""
    script = (
        "import signal, sys, time\n"
        # as in a terminal: a test run started in the background (nohup, a CI runner) ignores
        # SIGINT, and its children inherit that
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, also under nohup\n"
        "from pipeline import cli, imaging\n"
        "real = imaging.transform\n"
        "imaging.transform = lambda data, spec: (time.sleep(0.2), real(data, spec))[1]\n"
        f"sys.argv = ['prep', '-q', '--workdir', {str(work)!r}, *{[str(a) for a in args]!r}]\n"
        "cli.main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env=env,
    )
    journal = work / resize.JOURNAL
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count('\n{"path"') >= 8:
            return proc
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the run ended, or took a minute, before it was half way: {proc.stderr.read().decode()}")


def test_killed_run_then_rerun_matches_a_clean_run(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 20, "b": 20})
    clean, work = tmp_path / "clean", tmp_path / "work"
    for wd in (clean, work):
        assert prep("index", raw, workdir=wd).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial", workdir=clean).exit_code == 0

    proc = slowed_prep_half_way(work, "resize", "--size", "8", "--workers", "2")
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker processes
    proc.wait()
    assert (work / resize.JOURNAL).exists() and not (work / "resized.csv").exists()
    # records whole (the kill may cut the last line short), not the pending notes
    finished = len({line.split('"', 4)[3] for line in (work / resize.JOURNAL).read_text().splitlines()
                    if line.startswith('{"path"') and line.endswith("}")})
    stages = {s["stage"]: s for s in json.loads(prep("status", "--json").stdout)["stages"]}
    assert stages["resize"]["state"] == "missing"
    assert stages["resize"]["reasons"] == [f"interrupted after {finished} images; run the interrupted command again, with its options, to finish"]

    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0, result.output
    assert snapshot(work) == snapshot(clean)
    assert leftovers(work) == []
    skipped = int(re.search(r"(\d+) already up to date", result.stdout).group(1))
    assert skipped >= 8  # at least the first journaled shard was not done again


def test_an_output_replaced_by_a_dangling_link_is_made_again(tmp_path, prep, tree):
    assert prep("index", tree).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    work = tmp_path / "work"
    target = work / "resized" / "cat" / "img3.png"
    before = target.read_bytes()
    target.unlink()
    target.symlink_to(tmp_path / "gone.png")
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in result.stdout
    assert not target.is_symlink() and target.read_bytes() == before


@pytest.mark.parametrize("n, workers, max_size, min_size", [
    (20_000, 2, 256, 1), (20_000, 8, 64, 8), (1_000, 2, 256, 8), (100, 2, 256, 8), (5, 4, 256, 8), (7, 1, 1, 1), (0, 2, 256, 8),
])
def test_shards_cover_every_item_in_order_and_shrink_towards_the_end(n, workers, max_size, min_size):
    from pipeline import executors

    items = list(range(n))
    shards = executors.chunk(items, workers, max_size=max_size, min_size=min_size)
    assert [i for shard in shards for i in shard] == items
    sizes = [len(s) for s in shards]
    assert all(0 < size <= max_size for size in sizes)
    assert sizes == sorted(sizes, reverse=True)  # largest first, the smallest last
    if n >= 4 * workers * max_size:  # enough for full shards: the work of the last ones is small
        assert sizes[0] == max_size and max(sizes[-workers:]) <= max(min_size, max_size // 8)
        assert len(shards) < 1.5 * n / max_size  # and not many more shards for it


def test_ctrl_c_stops_the_run_with_one_line_and_a_rerun_resumes(tmp_path, prep):
    """Ctrl-C reaches the whole process group: the workers leave it to the main process, which
    says how to resume; no worker prints a traceback."""
    raw = make_tree(tmp_path / "raw", {"a": 20, "b": 20})
    clean, work = tmp_path / "clean", tmp_path / "work"
    assert prep("run", raw, "--size", "8", "--format", "pkl.gz", "--executor", "serial", workdir=clean).exit_code == 0
    proc = slowed_prep_half_way(work, "run", raw, "--size", "8", "--format", "pkl.gz", "--workers", "3")
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the command and its workers
    assert proc.wait(timeout=60) == 130
    stderr = proc.stderr.read().decode()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.splitlines()[-1] == "Interrupted; run the same command again to resume.", stderr

    result = prep("run", raw, "--size", "8", "--format", "pkl.gz", "--executor", "serial")
    assert result.exit_code == 0, result.output
    skipped = int(re.search(r"(\d+) already up to date", result.stdout).group(1))
    assert skipped >= 8
    assert (work / "dataset.pkl.gz").read_bytes() == (clean / "dataset.pkl.gz").read_bytes()


def test_workers_of_a_local_pool_leave_ctrl_c_to_the_main_process():
    with executors.make_executor("local", workers=2) as pool:
        handlers = {pool.submit(signal.getsignal, signal.SIGINT).result() for _ in range(4)}
    assert handlers == {signal.SIG_IGN}
