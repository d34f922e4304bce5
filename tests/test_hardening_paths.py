"""Paths read from files stay inside their root, only regular files are read, damaged state is
an error or repaired, and resized outputs are checked rather than trusted.

Every test works on real files: a generated RAW tree, the real stages, and crafted rows, journal
lines, manifest entries, links and FIFOs planted where prep reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, make_tree, tree_digests
from PIL import Image

from pipeline import workdir

CLASSES = {"cat": 4, "dog": 4, "bird": 4}


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    # two levels down, so that ../../x/y.png is still inside tmp_path (and its digest is watched)
    return make_tree(tmp_path / "data" / "raw", CLASSES)


@pytest.fixture
def resized(prep, raw: Path, tmp_path: Path) -> Path:
    """The work directory after index and resize."""
    ok(prep("index", raw, "--executor", "serial"))
    ok(prep("resize", "--executor", "serial"))
    return tmp_path / "work"


@pytest.fixture
def packed(prep, resized: Path) -> Path:
    """The work directory after every stage up to pack (pkl.gz)."""
    ok(prep("split"))
    ok(prep("encode"))
    ok(prep("pack", "--format", "pkl.gz", "--executor", "serial"))
    return resized


def outside(tmp_path: Path) -> dict[str, str]:
    """Digests of every file below tmp_path but the work directory's."""
    return {rel: digest for rel, digest in tree_digests(tmp_path).items() if not rel.startswith("work/")}


def stray_pngs(work: Path) -> list[str]:
    """PNGs in the work directory outside resized/ (where a path leaving resized/ would land)."""
    return [p.relative_to(work).as_posix() for p in work.rglob("*.png") if not p.is_relative_to(work / "resized")]


def plant(path: Path, source: Path) -> str:
    """Copy an image to ``path`` (outside RAW); its sha256, for a crafted row to match it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_csv(csv_path: Path, line: int, **values) -> None:
    """Set columns of the row on ``line`` (1 is the header) of a prep CSV."""
    rows = workdir.read_csv(csv_path)
    header = list(rows[0])
    rows[line - 2].update(values)
    workdir.write_csv(csv_path, header, rows)


def line_of(path: Path, column: str, value: str) -> int:
    return next(i for i, row in enumerate(workdir.read_csv(path), start=2) if row[column] == value)


# -- labels.csv, resized.csv, splits.csv, encoded.csv ------------------------------------------


@pytest.mark.parametrize("crafted", ["../secret.png", "../../x/y.png", "ABSOLUTE"])
def test_a_labels_row_leaving_raw_is_refused_and_nothing_is_written_outside(prep, resized, raw, tmp_path, crafted):
    if crafted == "ABSOLUTE":
        crafted = str(tmp_path / "secret.png")
    target = Path(crafted) if os.path.isabs(crafted) else raw / crafted
    sha = plant(target, raw / "cat" / "img0.png")
    labels = resized / "labels.csv"
    line = line_of(labels, "path", "cat/img1.png")
    edit_csv(labels, line, path=crafted, sha256=sha)
    before = outside(tmp_path)

    result = prep("resize", "--executor", "serial")
    assert_one_line_error(result, "labels.csv", f"line {line}", repr(crafted), "leaves RAW")
    assert outside(tmp_path) == before
    assert stray_pngs(resized) == []


def test_a_nul_in_labels_csv_is_one_line_with_its_line_number(prep, resized):
    labels = resized / "labels.csv"
    line = line_of(labels, "path", "dog/img2.png")
    text = labels.read_text(encoding="utf-8").replace("dog/img2.png", "dog/img\0" + "2.png")
    labels.write_text(text, encoding="utf-8")
    assert_one_line_error(prep("resize", "--executor", "serial"), "labels.csv", f"line {line}", "NUL")


def test_a_row_too_short_is_one_line_with_its_line_number(prep, resized):
    labels = resized / "labels.csv"
    lines = labels.read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].split(",")[0]  # the path alone
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_one_line_error(prep("resize", "--executor", "serial"), "labels.csv", "line 4", "1 fields")


def test_a_resized_name_leaving_resized_is_refused_by_split(prep, resized, tmp_path):
    plant(tmp_path / "secret.png", resized / "resized" / "cat" / "img0.png")
    table = resized / "resized.csv"
    line = line_of(table, "resized", "cat/img1.png")
    edit_csv(table, line, resized="../../secret.png")
    before = outside(tmp_path)
    assert_one_line_error(prep("split"), "resized.csv", f"line {line}", "'../../secret.png'", "leaves resized/")
    assert outside(tmp_path) == before


@pytest.mark.parametrize("stage", ["encode", "pack"])
def test_a_resized_name_leaving_resized_is_refused_by_encode_and_pack(prep, packed, tmp_path, stage):
    secret = tmp_path / "secret.png"
    sha = plant(secret, packed / "resized" / "cat" / "img0.png")
    table = packed / ("splits.csv" if stage == "encode" else "encoded.csv")
    line = line_of(table, "resized", "cat/img1.png")
    edit_csv(table, line, resized=str(secret), resized_sha256=sha)
    (packed / "dataset.pkl.gz").unlink()
    before = outside(tmp_path)
    args = ["pack", "--format", "pkl.gz", "--executor", "serial"] if stage == "pack" else ["encode"]
    assert_one_line_error(prep(*args), table.name, f"line {line}", repr(str(secret)), "leaves resized/")
    assert outside(tmp_path) == before
    assert not (packed / "dataset.pkl.gz").exists()


def test_a_resized_folder_linking_elsewhere_is_refused_before_writing(prep, resized, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(resized / "resized" / "dog", elsewhere)
    os.symlink(elsewhere, resized / "resized" / "dog")
    (elsewhere / "img0.png").unlink()  # to be made again, through the link
    before = outside(tmp_path)
    assert_one_line_error(prep("resize", "--executor", "serial"), "'dog/img0.png'", "leaves resized/", "symbolic link")
    assert outside(tmp_path) == before


# -- manifest.json ---------------------------------------------------------------------------


def _craft_manifest(work: Path, key: str, rel: str, value) -> None:
    path = work / "manifest.json"
    data = json.loads(path.read_text())
    data[key][rel] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("key", ["files", "inputs"])
@pytest.mark.parametrize("where", ["../secret.bin", "ABSOLUTE"])
def test_manifest_entries_leaving_the_work_directory_are_refused_before_reading(prep, packed, tmp_path, key, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 12345)
    rel = str(secret) if where == "ABSOLUTE" else where
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    entry = {"format": "pkl.gz", "bytes": 12345, "sha256": digest} if key == "files" else digest
    _craft_manifest(packed, key, rel, entry)

    result = prep("verify", "--executor", "serial")
    assert_one_line_error(result, "manifest.json", f"{key} entry", repr(rel), "leaves the work directory")
    assert "Verified" not in result.output and "12,345" not in result.output


@pytest.mark.parametrize("entry", [5, {"format": "pkl.gz"}, {"format": "pkl.gz", "bytes": "12", "sha256": "ab"}])
def test_a_malformed_manifest_files_entry_is_one_line(prep, packed, entry):
    _craft_manifest(packed, "files", "dataset.pkl.gz", entry)
    assert_one_line_error(prep("verify", "--executor", "serial"), "manifest.json", "files entry 'dataset.pkl.gz'")


# -- links and FIFOs in RAW ------------------------------------------------------------------


def test_follow_links_skips_loops_and_links_out_of_raw(prep, raw, tmp_path):
    os.symlink(raw.parent, raw / "up")  # a class folder that is RAW's parent: RAW again, and more
    os.symlink("loop", raw / "cat" / "loop")  # a link to itself
    os.symlink(raw / "dog", raw / "cat" / "dogs")  # to a folder already listed
    plant(tmp_path / "elsewhere" / "x.png", raw / "cat" / "img0.png")
    os.symlink(tmp_path / "elsewhere" / "x.png", raw / "cat" / "linked.png")

    ok(prep("index", raw, "--follow-links", "--executor", "serial"))
    rows = workdir.read_csv(tmp_path / "work" / "labels.csv")
    assert sorted(r["path"] for r in rows) == sorted(f"{c}/img{i}.png" for c in CLASSES for i in range(4))
    skipped = json.loads((tmp_path / "work" / "index.json").read_text())["skipped_examples"]
    assert sorted(skipped["symlink leaves RAW (use --allow-outside-links)"]) == ["cat/linked.png", "up"]
    assert sorted(skipped["symlink loop"]) == ["cat/dogs", "cat/loop"]

    ok(prep("index", raw, "--follow-links", "--allow-outside-links", "--executor", "serial"))
    paths = {r["path"] for r in workdir.read_csv(tmp_path / "work" / "labels.csv")}
    assert "cat/linked.png" in paths


def test_a_file_link_out_of_raw_is_not_read_by_resize(prep, resized, raw, tmp_path):
    # a labels.csv naming a link that `prep index` would have skipped
    sha = plant(tmp_path / "secret.png", raw / "cat" / "img0.png")
    (raw / "cat" / "img1.png").unlink()
    os.symlink(tmp_path / "secret.png", raw / "cat" / "img1.png")
    edit_csv(resized / "labels.csv", line_of(resized / "labels.csv", "path", "cat/img1.png"), sha256=sha)
    ok(prep("resize", "--executor", "serial"))
    rejected = {r["path"]: r["reason"] for r in workdir.read_csv(resized / "rejected.csv")}
    assert "outside RAW" in rejected["cat/img1.png"]


def _prep_subprocess(work: Path, *args) -> subprocess.CompletedProcess:
    # a FIFO opened for reading waits for a writer: the timeout stops a hung run, and fails
    return subprocess.run([sys.executable, "-m", "pipeline", "--workdir", str(work), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_a_fifo_in_raw_hangs_neither_index_nor_resize(raw, tmp_path):
    work = tmp_path / "work"
    os.mkfifo(raw / "cat" / "fifo.png")
    result = _prep_subprocess(work, "index", raw, "--executor", "serial")
    assert result.returncode == 0, result.stderr
    skipped = json.loads((work / "index.json").read_text())["skipped_examples"]
    assert skipped["not a regular file"] == ["cat/fifo.png"]

    # an indexed file replaced by a FIFO afterwards
    (raw / "dog" / "img3.png").unlink()
    os.mkfifo(raw / "dog" / "img3.png")
    result = _prep_subprocess(work, "resize", "--executor", "serial")
    assert result.returncode == 0, result.stderr
    rejected = {r["path"]: r["reason"] for r in workdir.read_csv(work / "rejected.csv")}
    assert "not a regular file" in rejected["dog/img3.png"]


# -- the resize journal ----------------------------------------------------------------------


def test_a_damaged_journal_is_recovered_from_and_its_images_redone(prep, resized):
    table = workdir.read_csv(resized / "resized.csv")
    lines = [json.dumps(row).encode() for row in table]
    redo = {table[1]["path"], table[4]["path"], table[7]["path"], table[9]["path"]}
    lines[1] = b"\xff\xfe{\x00garbage \x80\x81"  # garbage bytes, not UTF-8
    lines[4] = json.dumps({k: v for k, v in table[4].items() if k != "sha256"}).encode()  # a key missing
    lines[7] = json.dumps({**table[7], "resized": "../../../x.png"}).encode()  # a path leaving resized/
    lines[9] = json.dumps([table[9]]).encode()  # not a record
    (resized / "resized.journal").write_bytes(b"\n".join(lines) + b"\n")
    (resized / "resized.csv").unlink()  # as a run killed before writing it leaves

    status = ok(prep("status"))
    assert f"interrupted after {len(table) - 4} images" in status.output
    result = ok(prep("resize", "--executor", "serial"))
    assert f"Resized {len(redo)} images" in result.output
    assert not (resized / "resized.journal").exists()
    assert {r["path"] for r in workdir.read_csv(resized / "resized.csv")} == {r["path"] for r in table}
    assert "resize        up to date" in ok(prep("status")).output


# -- resized outputs are checked, not trusted ------------------------------------------------


def _edit_png(path: Path) -> None:
    Image.new("RGB", (32, 32), (1, 2, 3)).save(path)  # a valid PNG, other pixels


def _truncate_png(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_edit_png, _truncate_png, Path.unlink], ids=["edited", "truncated", "deleted"])
def test_a_resized_file_changed_after_resize_is_stale_and_made_again(prep, resized, damage):
    png = resized / "resized" / "dog" / "img1.png"
    original = png.read_bytes()
    assert "resize        up to date" in ok(prep("status")).output
    damage(png)
    status = ok(prep("status")).output
    assert "resize        stale" in status and "dog/img1.png" in status
    assert "Resized 1 image " in ok(prep("resize", "--executor", "serial")).output
    assert png.read_bytes() == original
    assert "resize        up to date" in ok(prep("status")).output


def test_a_corrupt_png_pack_reports_is_made_again_by_resize(prep, packed):
    _truncate_png(packed / "resized" / "bird" / "img2.png")
    (packed / "dataset.pkl.gz").unlink()
    assert_one_line_error(prep("pack", "--format", "pkl.gz", "--executor", "serial"), "bird/img2.png", "prep resize")
    assert "Resized 1 image " in ok(prep("resize", "--executor", "serial")).output
    ok(prep("pack", "--format", "pkl.gz", "--executor", "serial"))
    ok(prep("verify", "--executor", "serial"))


def test_verify_fails_on_a_resized_file_edited_after_resize(prep, packed):
    _edit_png(packed / "resized" / "cat" / "img3.png")
    assert_one_line_error(prep("verify", "--executor", "serial"), "resized/cat/img3.png", "changed since `prep resize`")


def test_pack_never_packs_an_edited_resized_file_and_resize_then_redoes_it(prep, packed):
    _edit_png(packed / "resized" / "cat" / "img3.png")
    (packed / "dataset.pkl.gz").unlink()
    assert_one_line_error(prep("pack", "--format", "pkl.gz", "--executor", "serial"),
                          "resized/cat/img3.png", "changed since `prep resize`", "run `prep resize` again")
    assert "Resized 1 image " in ok(prep("resize", "--executor", "serial")).output  # the advice does not loop
    ok(prep("pack", "--format", "pkl.gz", "--executor", "serial"))
    ok(prep("verify", "--executor", "serial"))


def test_a_received_work_directory_with_a_png_of_the_same_size_and_mtime_is_read_again(prep, packed, tmp_path,
                                                                                        monkeypatch):
    """A work directory unpacked from an archive keeps its files' sizes and mtimes: resize's
    record of checked files must not vouch for them, or pack's "run prep resize" would loop."""
    from pipeline.stages import index, resize

    for module in (resize, index, workdir):  # every file counts as settled: cached once checked
        monkeypatch.setattr(module, "SETTLED_NS", -60 * 10**9, raising=False)
    assert "Up to date" in ok(prep("resize", "--executor", "serial")).output
    received = tmp_path / "received"
    shutil.copytree(packed, received)  # copy2: sizes and mtimes kept, new inodes
    png = received / "resized" / "cat" / "img3.png"
    stat = png.stat()
    data = bytearray(png.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes (a damaged IDAT checksum or pixel)
    png.write_bytes(bytes(data))
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (received / "dataset.pkl.gz").unlink()
    assert_one_line_error(prep("pack", "--format", "pkl.gz", "--executor", "serial", workdir=received),
                          "cat/img3.png", "run `prep resize` again")
    assert "Resized 1 image " in ok(prep("resize", "--executor", "serial", workdir=received)).output
    ok(prep("pack", "--format", "pkl.gz", "--executor", "serial", workdir=received))
