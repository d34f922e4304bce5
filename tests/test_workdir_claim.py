"""A folder prep has not worked in is not taken over: its own files at prep's output names stay."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import assert_one_line_error, make_tree, tree_digests


def test_a_project_folder_with_files_at_prep_names_is_refused_untouched(tmp_path: Path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 10, "dog": 10})
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.csv").write_text("x,y\n1,2\n")
    (project / "labels.csv").write_text("my,own\n")
    before = tree_digests(project)
    result = prep("run", raw, "--size", "8", workdir=project)
    assert_one_line_error(result, "data", "labels.csv", "another --workdir")
    assert {k: v for k, v in tree_digests(project).items() if k != ".lock"} == before


def test_prep_claims_a_new_folder_and_a_rerun_or_an_earlier_work_directory_goes_on(tmp_path: Path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 10, "dog": 10})
    work = tmp_path / "work"
    assert prep("index", raw, workdir=work).exit_code == 0
    assert (work / ".stamps").is_dir()
    assert prep("index", raw, workdir=work).exit_code == 0
    # a work directory of an earlier prep: index.json, no .stamps/
    shutil.rmtree(work / ".stamps")
    result = prep("run", raw, "--size", "8", "--format", "h5", workdir=work)
    assert result.exit_code == 0, result.output
    assert (work / "dataset.h5").is_file()


def test_a_refused_folder_keeps_no_lock_file_of_prep_but_its_own_stays(tmp_path: Path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 10, "dog": 10})
    project = tmp_path / "project"
    project.mkdir()
    (project / "labels.csv").write_text("my,own\n")
    before = tree_digests(project)
    assert_one_line_error(prep("index", raw, workdir=project), "labels.csv", "another --workdir")
    assert tree_digests(project) == before and not (project / ".lock").exists()
    (project / ".lock").write_text("")  # one that was there before: not prep's to remove
    assert_one_line_error(prep("index", raw, workdir=project), "labels.csv")
    assert (project / ".lock").is_file()


def test_a_stage_that_cannot_start_leaves_no_new_work_directory(tmp_path, prep):
    work = tmp_path / "new"
    for command in ("resize", "split", "encode"):
        result = prep(command, workdir=work)
        assert_one_line_error(result, "does not exist")
        assert not work.exists(), command


def test_a_stage_given_its_input_from_elsewhere_may_start_a_work_directory(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 10, "dog": 10})
    assert prep("index", raw, workdir=tmp_path / "first").exit_code == 0
    work = tmp_path / "second"
    result = prep("resize", "--labels", tmp_path / "first" / "labels.csv", "--raw", raw, "--size", "8", workdir=work)
    assert result.exit_code == 0, result.output
    assert len(list((work / "resized").rglob("*.png"))) == 20
