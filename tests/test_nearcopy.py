"""Near copies: perceptual hashes as imagehash computes them, the pair search, and `prep split`
keeping near copies and user groups in one split, with one picture under two labels reported."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import tempfile
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import imagehash
import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images

from pipeline import imaging, nearcopy, workdir
from pipeline.spec import ResizeSpec
from pipeline.stages.index import LABEL_COLUMNS

CHINA, FLOWER = (Image.fromarray(a) for a in load_sample_images().images)  # 640 x 427 photos
COPIES = ["china.jpg", "china-q60.jpg", "china-90pct.jpg", "china-bright.jpg", "china-shift.jpg", "china.png"]


def save(img: Image.Image, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)


def dot(x: int, y: int) -> Image.Image:
    """One solid background with a small square of another colour at (x, y)."""
    img = Image.new("RGB", (320, 240), (90, 140, 200))
    img.paste((250, 220, 30), (x, y, x + 30, y + 30))
    return img


def make_photos(raw: Path) -> Path:
    """pagoda/: one photo saved six ways, and crops of four other regions of it; flower/: the
    other photo and crops of it; dot/: a small square in five places on one background."""
    pagoda, flower = raw / "pagoda", raw / "flower"
    save(CHINA, pagoda / "china.jpg", quality=95)
    save(CHINA, pagoda / "china-q60.jpg", quality=60)
    save(CHINA.resize((576, 384), Image.Resampling.LANCZOS), pagoda / "china-90pct.jpg", quality=90)
    save(ImageEnhance.Brightness(CHINA).enhance(1.1), pagoda / "china-bright.jpg", quality=90)
    save(Image.fromarray(np.roll(np.asarray(CHINA), 2, axis=1)), pagoda / "china-shift.jpg", quality=90)
    save(CHINA, pagoda / "china.png")
    save(FLOWER, flower / "flower.jpg", quality=90)
    for i, (x, y) in enumerate([(0, 0), (320, 0), (0, 200), (320, 200)]):
        save(CHINA.crop((x, y, x + 320, y + 227)), pagoda / f"crop{i}.jpg", quality=90)
        save(FLOWER.crop((x, y, x + 320, y + 227)), flower / f"crop{i}.jpg", quality=90)
    for i, (x, y) in enumerate([(10, 10), (200, 150), (100, 190), (250, 30), (150, 100)]):
        save(dot(x, y), raw / "dot" / f"dot{i}.png")
    return raw


def prepared(prep, raw: Path, *split_args, resize=("--size", "16", "--executor", "serial")):
    assert prep("index", raw).exit_code == 0
    assert prep("resize", *resize).exit_code == 0
    result = prep("split", "--ratios", "1:1:1", *split_args)
    return result


def open_unnamed_files(folder: Path) -> list[str]:
    """The files in ``folder`` this process holds open that have no name (as the near-copy pairs'):
    none known where /proc/self/fd is not."""
    found = []
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed since
            continue
        if target.startswith(f"{folder}/") and target.endswith(" (deleted)"):
            found.append(target)
    return found


def read(work: Path, name: str) -> list[dict]:
    return workdir.read_csv(work / name)


# -- the hashes ------------------------------------------------------------------------------


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def hashes_of(data: bytes) -> tuple[str, str]:
    # an output size at least half the source's: no JPEG draft scaling, the full image is hashed
    info = imaging.transform(data, ResizeSpec(width=400, height=400))[1]
    return info.phash8, info.phash16


def reference(img: Image.Image) -> tuple[str, str]:
    return str(imagehash.phash(img)), str(imagehash.phash(img, hash_size=16))


def _cases() -> dict[str, tuple[bytes, Image.Image]]:
    """name -> (file bytes, the upright 8-bit RGB image prep should hash)."""
    small = CHINA.resize((320, 213), Image.Resampling.LANCZOS)
    rgba = small.convert("RGBA")
    alpha = np.asarray(rgba).copy()
    alpha[:, :, 3] = np.linspace(0, 255, alpha.shape[1], dtype=np.uint8)[None, :]
    rgba = Image.fromarray(alpha, "RGBA")
    over_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    palette = FLOWER.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    deep = (np.asarray(small.convert("L"), dtype=np.uint32) * 257 + 100).clip(0, 65535).astype(np.uint16)
    i16 = Image.frombytes("I;16", (deep.shape[1], deep.shape[0]), deep.astype("<u2").tobytes())
    eight = Image.fromarray(((deep.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8), "L")
    cmyk = encoded(small.convert("CMYK"), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    turned = encoded(FLOWER, "JPEG", quality=95, exif=exif)
    return {
        "china jpeg": (encoded(CHINA, "JPEG", quality=95), Image.open(io.BytesIO(encoded(CHINA, "JPEG", quality=95)))),
        "flower png": (encoded(FLOWER, "PNG"), FLOWER),
        "RGBA over white": (encoded(rgba, "PNG"), over_white),
        "P": (encoded(palette, "PNG"), palette.convert("RGB")),
        "L": (encoded(small.convert("L"), "PNG"), small.convert("L")),
        "I;16": (encoded(i16, "PNG"), eight),
        "CMYK jpeg": (cmyk, Image.open(io.BytesIO(cmyk)).convert("RGB")),
        "EXIF-turned jpeg": (turned, Image.open(io.BytesIO(turned)).transpose(Image.Transpose.ROTATE_270)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_the_hashes_are_imagehash_phash_of_the_upright_image(name):
    data, upright = CASES[name]
    assert hashes_of(data) == reference(upright)


def test_resized_csv_records_the_hashes(tmp_path, prep):
    make_photos(tmp_path / "raw")
    prepared(prep, tmp_path / "raw")
    rows = {r["path"]: r for r in read(tmp_path / "work", "resized.csv")}
    png = rows["pagoda/china.png"]
    assert (png["phash8"], png["phash16"]) == reference(CHINA)  # a PNG is never decoded at a reduced scale
    assert all(len(r["phash8"]) == 16 and len(r["phash16"]) == 64 for r in rows.values())


# -- the pair search -------------------------------------------------------------------------


def columns_of(pairs: nearcopy.Pairs) -> tuple[np.ndarray, ...]:
    """Every pair at once, as arrays (a, b, d8, d16)."""
    records = np.concatenate([np.zeros(0, nearcopy.Pairs.RECORD), *pairs.chunks()])
    return records["a"], records["b"], records["d8"], records["d16"]


@pytest.mark.parametrize("search", ["tables", "all pairs"])
@pytest.mark.parametrize("rule", ["strict", "default"])
def test_the_pair_search_finds_what_comparing_every_pair_finds(rule, search, monkeypatch, tmp_path):
    # 1,500 hashes: the tables, as for a large dataset, or every pair compared, as for a small one
    monkeypatch.setattr(nearcopy, "_ALL_PAIRS", 0 if search == "tables" else 10_000)
    rng = np.random.default_rng(3)
    bases8 = rng.integers(0, 2**64, 40, dtype=np.uint64)
    bases16 = rng.integers(0, 2**64, (40, 4), dtype=np.uint64)
    pick = rng.integers(0, 40, 1500)
    h8, h16 = bases8[pick].copy(), bases16[pick].copy()
    for i in range(len(pick)):  # 0-9 bits of the 64 and 0-60 of the 256 flipped: every band of the rule
        for bit in rng.choice(64, rng.integers(0, 10), replace=False):
            h8[i] ^= np.uint64(1) << np.uint64(bit)
        for bit in rng.choice(256, rng.integers(0, 61), replace=False):
            h16[i, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    h8[7], h16[7] = h8[8], h16[8]  # identical hashes are a pair too
    pairs = nearcopy.near_pairs(h8, h16, rule, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []  # on disk, but under no name: nothing is left behind
    columns = columns_of(pairs)
    got = {(int(a), int(b), int(d8), int(d16)) for a, b, d8, d16 in zip(*columns)}
    assert len(got) == len(pairs) == len(columns[0])  # each pair once
    # read back in chunks, again and again: the same pairs
    for _ in range(2):
        again = np.concatenate(list(pairs.chunks(size=97)))
        assert len(again) == len(pairs) and all((again[f] == c).all() for f, c in zip("a b d8 d16".split(), columns))

    expected = set()
    for a, b in combinations(range(len(h8)), 2):
        d8 = bin(int(h8[a]) ^ int(h8[b])).count("1")
        d16 = sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(h16[a], h16[b]))
        if d8 <= 4 or rule == "default" and d8 <= 8 and d16 <= 40:
            expected.add((a, b, d8, d16))
    assert got == expected
    assert any(5 <= d8 <= 8 for _, _, d8, _ in expected) == (rule == "default")


def test_pairs_added_while_reading_go_after_the_others(tmp_path):
    pairs = nearcopy.Pairs(tmp_path)
    assert list(pairs.chunks()) == [] and list(tmp_path.iterdir()) == []  # no file for no pairs
    one = np.arange(10, dtype=np.int32)
    pairs.add(one, one + 1, one.astype(np.uint8), one.astype(np.uint16))
    for chunk in pairs.chunks(size=4):  # an add in the middle of a read, and a read stopped early
        pairs.add(chunk["a"] + 100, chunk["b"] + 100, chunk["d8"], chunk["d16"])
        break
    a, b, d8, d16 = columns_of(pairs)
    assert a.tolist() == [*range(10), 100, 101, 102, 103] and (b == a + 1).all()
    assert d16.tolist() == [*range(10), 0, 1, 2, 3]
    assert len(open_unnamed_files(tmp_path)) == (1 if os.path.isdir("/proc/self/fd") else 0)
    pairs.close()
    assert open_unnamed_files(tmp_path) == []


# -- split -----------------------------------------------------------------------------------


def test_a_full_disk_while_split_keeps_its_pairs_is_one_line_naming_the_work_directory(tmp_path, prep, monkeypatch):
    make_photos(tmp_path / "raw")
    assert prep("index", tmp_path / "raw").exit_code == 0
    assert prep("resize", "--size", "16", "--executor", "serial").exit_code == 0
    made, real = [], tempfile.TemporaryFile

    def full_disk(**kw):
        made.append(kw["dir"])
        handle = real(dir=kw["dir"])
        handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return handle

    monkeypatch.setattr(nearcopy.tempfile, "TemporaryFile", full_disk)
    result = prep("split", "--ratios", "1:1:1")
    assert_one_line_error(result, f"{tmp_path / 'work'}: No space left on device (the temporary file of near-copy pairs)")
    assert made == [tmp_path / "work"]  # beside the work directory's files, not in the system's temporary folder
    assert not (tmp_path / "work" / "splits.csv").exists()
    assert sorted(p.name for p in (tmp_path / "work").iterdir() if p.is_file()) == [
        ".lock", "index.json", "labels.csv", "rejected.csv", "resize.json", "resized.csv"]  # nothing half-written




def test_near_copies_are_found_and_kept_in_one_split_and_other_pictures_are_not(tmp_path, prep):
    make_photos(tmp_path / "raw")
    result = prepared(prep, tmp_path / "raw")
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    rows = {r["path"]: r for r in read(work, "splits.csv")}
    copies = [rows[f"pagoda/{name}"] for name in COPIES]
    assert {r["split"] for r in copies} == {copies[0]["split"]}
    assert {r["group"] for r in copies} == {"pagoda/china.jpg"}  # named by its first image
    others = [r for path, r in rows.items() if not path.startswith("pagoda/china")]
    assert len(others) == 2 * 4 + 1 + 5 and all(r["group"] == "" for r in others)  # crops, flower, dots
    near = read(work, "near_copies.csv")
    assert {r["path_a"] for r in near} | {r["path_b"] for r in near} == {f"pagoda/{n}" for n in COPIES}
    assert all(int(r["distance8"]) <= 8 for r in near)
    assert "Kept together: 6 images in 1 group of" in result.stdout
    recorded = json.loads((work / "split.json").read_text())
    assert recorded["near_copies"] == "default" and recorded["grouped"]["largest"] == 6


def test_near_copies_off_and_strict(tmp_path, prep):
    make_photos(tmp_path / "raw")
    assert prepared(prep, tmp_path / "raw", "--near-copies", "off").exit_code == 0
    assert all(r["group"] == "" for r in read(tmp_path / "work", "splits.csv"))
    assert read(tmp_path / "work", "near_copies.csv") == []
    assert prep("split", "--ratios", "1:1:1", "--near-copies", "strict").exit_code == 0
    grouped = {r["path"] for r in read(tmp_path / "work", "splits.csv") if r["group"]}
    assert grouped and grouped <= {f"pagoda/{name}" for name in COPIES}


def test_the_same_picture_under_two_labels_is_reported(tmp_path, prep):
    raw = make_photos(tmp_path / "raw")
    save(CHINA, raw / "flower" / "not-a-flower.jpg", quality=80)
    result = prepared(prep, raw)
    assert result.exit_code == 0
    conflicts = read(tmp_path / "work", "conflicts.csv")
    # each image with a near copy under another label, with its closest one
    assert [(c["path_a"], c["label_a"], c["label_b"]) for c in conflicts] == [
        ("flower/not-a-flower.jpg", "flower", "pagoda")] * len(COPIES)
    assert {c["path_b"] for c in conflicts} == {f"pagoda/{name}" for name in COPIES}
    assert all(int(c["distance8"]) <= 8 for c in conflicts)
    assert list(conflicts[0]) == ["path_a", "label_a", "path_b", "label_b", "distance8", "distance16"]
    assert "the same picture under two labels" in result.stderr and "flower/not-a-flower.jpg" in result.stderr
    rows = {r["path"]: r for r in read(tmp_path / "work", "splits.csv")}
    assert rows["flower/not-a-flower.jpg"]["split"] == rows["pagoda/china.jpg"]["split"]

    assert_one_line_error(prep("split", "--ratios", "1:1:1", "--on-conflict", "error"),
                          "flower/not-a-flower.jpg", "two labels", "conflicts.csv")
    assert open_unnamed_files(tmp_path / "work") == []  # the pairs' file is closed when split stops too
    assert prep("split", "--ratios", "1:1:1", "--on-conflict", "drop").exit_code == 0
    kept = {r["path"] for r in read(tmp_path / "work", "splits.csv")}
    assert {f"pagoda/{name}" for name in COPIES} | {"flower/not-a-flower.jpg"} == set(rows) - kept
    recorded = json.loads((tmp_path / "work" / "split.json").read_text())
    assert recorded["on_conflict"] == "drop" and recorded["dropped_conflicts"] == len(COPIES) + 1


def test_user_groups_from_a_regex_and_from_a_csv_never_cross_splits(tmp_path, prep):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    for label in ("ill", "well"):
        for patient in range(6):
            for scan in range(3):  # unrelated pictures: only the patient ties them
                pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                save(Image.fromarray(pixels), raw / label / f"p{patient}{label}_scan{scan}.png")
    assert prep("index", raw).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0

    def patients_in_one_split():
        rows = read(tmp_path / "work", "splits.csv")
        by_patient = defaultdict(set)
        for r in rows:
            by_patient[r["path"].split("/")[1].split("_")[0]].add(r["split"])
        assert all(len(s) == 1 for s in by_patient.values()), by_patient
        assert {r["split"] for r in rows} == {"train", "valid", "test"}
        return rows

    result = prep("split", "--ratios", "1:1:1", "--group-by", r"/(?P<group>p\d+\w+)_")
    assert result.exit_code == 0, result.output
    assert "Achieved train" in result.stdout
    assert all(r["group"] for r in patients_in_one_split())

    groups = tmp_path / "groups.csv"
    paths = [r["path"] for r in read(tmp_path / "work", "labels.csv")]
    workdir.write_csv(groups, ["path", "group"], [{"path": p, "group": p.split("/")[1].split("_")[0]} for p in paths])
    assert prep("split", "--ratios", "1:1:1", "--groups", groups).exit_code == 0
    patients_in_one_split()
    assert json.loads((tmp_path / "work" / "split.json").read_text())["grouped"]["groups"] == 12

    assert_one_line_error(prep("split", "--group-by", r"p\d+"), "--group-by", "(?P<group>")
    assert_one_line_error(prep("split", "--group-by", r"(?P<group>p\d+"), "--group-by", "not a regular expression")
    workdir.write_csv(groups, ["path", "group"], [{"path": "ill/p0ill_scan0.png", "group": "a"},
                                                  {"path": "../raw/ill/p0ill_scan1.png", "group": "a"}])
    assert_one_line_error(prep("split", "--groups", groups), "groups.csv, row 2", "not relative to RAW")


def test_the_split_does_not_depend_on_row_order_or_executor(tmp_path, prep):
    raw = make_photos(tmp_path / "raw")
    assert prepared(prep, raw, resize=("--size", "16", "--executor", "local", "--workers", "2")).exit_code == 0
    work = tmp_path / "work"
    local = {name: (work / name).read_bytes() for name in ("resized.csv", "splits.csv", "near_copies.csv")}
    rows = read(work, "labels.csv")
    random.Random(1).shuffle(rows)
    workdir.write_csv(work / "labels.csv", LABEL_COLUMNS, rows)
    assert prep("resize", "--size", "16", "--executor", "serial").exit_code == 0
    assert prep("split", "--ratios", "1:1:1").exit_code == 0
    assert (work / "splits.csv").read_bytes() == local["splits.csv"]
    assert (work / "near_copies.csv").read_bytes() == local["near_copies.csv"]
    (work / "resized.csv").unlink()  # every image hashed again, serially
    assert prep("resize", "--size", "16", "--executor", "serial").exit_code == 0
    serial = {r["path"]: (r["phash8"], r["phash16"]) for r in read(work, "resized.csv")}
    local_rows = csv.DictReader(io.StringIO(local["resized.csv"].decode()))
    assert serial == {r["path"]: (r["phash8"], r["phash16"]) for r in local_rows}


def test_a_resize_from_before_the_hashes_is_redone_and_split_warns_without_them(tmp_path, prep):
    raw = make_photos(tmp_path / "raw")
    assert prepared(prep, raw).exit_code == 0
    work = tmp_path / "work"
    rows = read(work, "resized.csv")
    old = [c for c in rows[0] if c not in ("phash8", "phash16")]
    workdir.write_csv(work / "resized.csv", old, rows)  # as an earlier prep wrote it
    result = prep("split", "--ratios", "1:1:1")
    assert "have no perceptual hash" in result.stderr and "run `prep resize`" in result.stderr
    assert prep("resize", "--size", "16", "--executor", "serial").exit_code == 0
    assert all(r["phash8"] and r["phash16"] for r in read(work, "resized.csv"))
    assert prep("split", "--ratios", "1:1:1").exit_code == 0
    groups = {r["group"] for r in read(work, "splits.csv") if r["path"].startswith("pagoda/china")}
    assert groups == {"pagoda/china.jpg"}


def test_digits_stay_stratified(tmp_path, prep):
    assert prep("sample", "digits", tmp_path / "raw").exit_code == 0
    assert prep("index", tmp_path / "raw").exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    result = prep("split")
    assert result.exit_code == 0
    rows = read(tmp_path / "work", "splits.csv")
    per_class = Counter(r["label"] for r in rows)
    tests = Counter(r["label"] for r in rows if r["split"] == "test")
    for label, n in per_class.items():  # each class keeps its share of test images, give or take one
        assert abs(tests[label] - n / 10) <= 1.5, (label, tests[label], n)
    groups = Counter(r["group"] for r in rows if r["group"])
    assert groups and max(groups.values()) < 0.1 * min(per_class.values())


def test_verify_catches_a_group_in_two_splits(tmp_path, prep):
    make_photos(tmp_path / "raw")
    assert prepared(prep, tmp_path / "raw").exit_code == 0
    work = tmp_path / "work"
    assert prep("encode").exit_code == 0
    assert prep("pack", "--format", "pkl.gz", "--executor", "serial").exit_code == 0
    assert prep("verify", "--executor", "serial").exit_code == 0
    rows = read(work, "encoded.csv")
    moved = next(r for r in rows if r["path"] == "pagoda/china-q60.jpg")
    moved["split"] = next(s for s in ("train", "valid", "test") if s != moved["split"])
    workdir.write_csv(work / "encoded.csv", list(rows[0]), rows)
    assert prep("pack", "--format", "pkl.gz", "--executor", "serial").exit_code == 0
    assert_one_line_error(prep("verify", "--executor", "serial"), "group pagoda/china.jpg", "two splits")


def test_the_report_shows_near_copies_and_two_label_pairs(tmp_path, prep):
    raw = make_photos(tmp_path / "raw")
    save(CHINA, raw / "flower" / "not-a-flower.jpg", quality=80)
    assert prepared(prep, raw).exit_code == 0
    assert prep("report").exit_code == 0
    page = (tmp_path / "work" / "report" / "index.html").read_text()
    section = page[page.index('<section id="near">'):]
    section = section[: section.index("</section>")]
    assert 'id="two-labels"' in section and "flower/not-a-flower.jpg" in section
    assert 'id="near-pairs"' in section and "pagoda/china-q60.jpg" in section
    assert 'id="largest-groups"' in section
    box = page[page.index('id="check-first"'):page.index("</aside>")]  # up front, linking to the section
    assert "One picture under two labels" in box and f"{len(COPIES)} images with a copy" in box
    assert 'href="#near"' in box
    card = (tmp_path / "work" / "README.md").read_text()
    assert "near copies" in card
