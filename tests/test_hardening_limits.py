"""A file size limit (EFBIG, as a full disk gives ENOSPC) during `prep resize` and during a
Parquet pack: one line naming the file, a non-zero exit, the earlier outputs as they were and
no temporary file left. (The other formats: test_hardening_formats.)"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import make_tree, tree_digests
from test_hardening_formats import file_size_limit, leftovers, one_error_line, prep_process
from test_pack import cli_run, ok, outputs, prepare


def test_a_file_size_limit_during_a_parquet_pack_is_one_line_and_leaves_the_previous_outputs(tmp_path):
    work = prepare(tmp_path)
    ok(cli_run(work, "pack", "--format", "parquet", "--executor", "serial"))
    before = packed_parquet(work)
    assert any(name.endswith(".parquet") for name in before)
    (work / ".stamps" / "pack-parquet.json").unlink()  # pack it again
    result = prep_process(work, "pack", "--format", "parquet", preexec_fn=file_size_limit(4096))
    assert result.returncode == 1, result.stderr
    one_error_line(result.stderr, os.strerror(27))
    assert packed_parquet(work) == before
    assert leftovers(work) == []


def packed_parquet(work: Path) -> dict[str, str]:
    return {**outputs(work), **tree_digests(work / "data")}


def test_a_file_size_limit_during_resize_is_one_line_and_a_rerun_finishes(tmp_path):
    raw = make_tree(tmp_path / "raw", {"cat": 6, "dog": 6})
    work = tmp_path / "work"
    ok(cli_run(work, "index", raw, "--executor", "serial"))
    # a 32x32 RGB PNG is about 3 KB: the first one written fails with EFBIG
    result = prep_process(work, "resize", "--size", "32", preexec_fn=file_size_limit(1024))
    assert result.returncode == 1, result.stderr
    one_error_line(result.stderr, f"{work / 'resized'}", f".png: {os.strerror(27)}")
    assert leftovers(work) == []
    assert not list((work / "resized").rglob("*.png")) if (work / "resized").exists() else True
    ok(cli_run(work, "resize", "--size", "32"))
    assert len(list((work / "resized").rglob("*.png"))) == 12
    assert leftovers(work) == []
