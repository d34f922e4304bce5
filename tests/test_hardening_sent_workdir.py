"""A work directory someone sent, or a RAW with odd bytes: files that point elsewhere, JSON nested
past the parser's depth, file names that are not UTF-8. Each is refused in one line, skipped, or
costs a recomputation; none is written through, and none ends in a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_one_line_error, make_tree
from pipeline import workdir
from pipeline.stages import resize


@pytest.fixture
def resized(tmp_path: Path, prep) -> Path:
    raw = make_tree(tmp_path / "raw", {"cat": 4, "dog": 4})
    for args in (("index", raw), ("resize", "--size", "8", "--executor", "serial")):
        assert prep(*args).exit_code == 0
    return tmp_path / "work"


def test_a_journal_that_is_a_link_is_refused_and_its_target_left_alone(tmp_path, prep, resized):
    target = tmp_path / "outside.txt"
    target.write_text("someone's file\n")
    (resized / resize.JOURNAL).symlink_to(target)
    (resized / "resized" / "cat" / "img0.png").unlink()  # something to redo, so the journal is opened
    assert_one_line_error(prep("resize", "--size", "8", "--executor", "serial"),
                          f"{resized / resize.JOURNAL} is a symbolic link", "remove the link")
    assert target.read_text() == "someone's file\n"


@pytest.mark.parametrize("folder", [".cache", ".stamps"])
def test_prep_s_own_folders_as_links_are_refused_and_nothing_is_written_there(tmp_path, prep, resized, folder):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(resized / folder, tmp_path / "moved")
    (resized / folder).symlink_to(elsewhere)
    for args in (("resize", "--size", "8", "--executor", "serial"), ("status",)):
        assert_one_line_error(prep(*args), f"{resized / folder} is a symbolic link", "remove the link")
    # a reader that may not open the lock (a read-only folder someone else owns) still writes caches
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workdir.Workdir, "_open_lock", lambda self, shared: None)
        for args in (("status",), ("verify", "--executor", "serial")):
            assert_one_line_error(prep(*args), f"{resized / folder} is a symbolic link", "remove the link")
    assert list(elsewhere.iterdir()) == []


def test_a_journal_that_is_a_fifo_is_one_line_not_a_wait(tmp_path, resized):
    os.mkfifo(resized / resize.JOURNAL)
    for args in (["status"], ["resize", "--size", "8", "--executor", "serial"]):
        done = subprocess.run([sys.executable, "-m", "pipeline", "--workdir", str(resized), *args],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert f"{resized / resize.JOURNAL}: not a regular file" in done.stderr.strip().splitlines()[-1]


def test_json_nested_past_the_parser_s_depth_is_damage_not_a_traceback(tmp_path, prep, resized):
    deep = "[" * 100_000
    with open(resized / resize.JOURNAL, "w") as journal:  # an interrupted run's journal, with a line of it
        journal.write(deep + "\n")
    (resized / "resized" / "dog" / "img1.png").unlink()
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0, result.output
    assert (resized / "resized" / "dog" / "img1.png").is_file()
    (resized / "index.json").write_text(deep)
    assert_one_line_error(prep("status"), "index.json", "nested too deeply")


def test_a_file_name_that_is_not_utf8_is_skipped_with_its_reason(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 4, "dog": 4})
    name = os.fsdecode(b"caf\xe9.png")
    (raw / "cat" / name).write_bytes((raw / "cat" / "img0.png").read_bytes())
    os.mkdir(raw / os.fsdecode(b"\xffbad"))
    result = prep("index", raw)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "work" / "index.json").read_text())
    assert meta["skipped"]["name not UTF-8"] == 2 and meta["images"] == 8
    assert sorted(meta["skipped_examples"]["name not UTF-8"]) == ["\\xffbad/", "cat/caf\\xe9.png"]
    assert "caf" not in (tmp_path / "work" / "labels.csv").read_text()
    stages = {line.split()[0]: line for line in prep("status").stdout.splitlines()}
    assert stages["index"].split()[1:] == ["up", "to", "date"]  # status skips them as index did
    other = tmp_path / os.fsdecode(b"r\xff")
    shutil.copytree(raw, other)
    assert_one_line_error(prep("index", other, workdir=tmp_path / "w2"), "r\\xff is not UTF-8 text", "rename")


def test_an_empty_workdir_argument_is_one_line(tmp_path, prep):
    assert_one_line_error(prep("verify", "", workdir=None), "manifest.json does not exist")


@pytest.mark.parametrize("damage", ["garbage", "nested", "fifo", "wrong types", "link"])
def test_a_damaged_record_of_verify_costs_a_full_check(tmp_path, prep, resized, damage):
    from pipeline.stages import verify

    for args in (("split",), ("encode",), ("pack", "--format", "pkl.gz", "--executor", "serial")):
        assert prep(*args).exit_code == 0
    assert prep("verify", "--executor", "serial").exit_code == 0
    record = resized / verify.VERIFIED
    record.unlink()
    if damage == "fifo":
        os.mkfifo(record)
    elif damage == "link":
        (tmp_path / "elsewhere.json").write_text("{}")
        record.symlink_to(tmp_path / "elsewhere.json")
    else:
        record.write_text({"garbage": "\x00{not json", "nested": "[" * 100_000,
                           "wrong types": '{"files": {"dataset.pkl.gz": [1, "x", null, 5, true]}, "units": [],'
                                          ' "folders": 3}'}[damage])
    result = prep("verify", "--executor", "serial")
    assert result.exit_code == 0, result.output
    assert "unchanged since" not in result.stdout  # checked again, in full
    if damage == "link":
        assert (tmp_path / "elsewhere.json").read_text() == "{}"  # replaced, not written through

