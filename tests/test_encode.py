"""`prep encode`: one label -> id map for all splits, in natural order, or pinned."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_one_line_error
from pipeline import workdir
from pipeline.errors import PrepError
from pipeline.stages import encode
from pipeline.stages.split import SPLIT_COLUMNS


def write_splits(tmp_path, assignments: list[tuple[str, str]]) -> workdir.Workdir:
    """splits.csv with one image per (label, split)."""
    wd = workdir.Workdir(tmp_path / "work")
    rows = [
        {"path": f"{label}/img{i}.png", "label": label, "sha256": f"{i:064x}", "resized": f"{label}/img{i}.png",
         "split": part}
        for i, (label, part) in enumerate(assignments)
    ]
    workdir.write_csv(wd.path("splits.csv"), SPLIT_COLUMNS, rows)
    return wd


def run_encode(wd: workdir.Workdir, pinned=None) -> encode.EncodeResult:
    return encode.run(encode.EncodeConfig(
        workdir=wd, splits=wd.path("splits.csv"), classes_out=wd.path("classes.json"), out=wd.path("encoded.csv"),
        pinned=pinned,
    ))


def encoded_ids(wd: workdir.Workdir) -> dict[str, int]:
    return {r["label"]: int(r["label_id"]) for r in workdir.read_csv(wd.path("encoded.csv"))}


def test_ids_follow_natural_order(tmp_path):
    labels = ["img10", "img2", "img1", "고양이", "강아지", "Zebra", "img10b"]
    wd = write_splits(tmp_path, [(label, "train") for label in labels])
    result = run_encode(wd)
    expected = ["Zebra", "img1", "img2", "img10", "img10b", "강아지", "고양이"]
    assert result.classes == expected
    assert json.loads(wd.path("classes.json").read_text(encoding="utf-8")) == {"classes": expected, "order": "natural"}
    assert encoded_ids(wd) == {c: i for i, c in enumerate(expected)}
    assert "고양이" in wd.path("classes.json").read_text(encoding="utf-8")  # not \\u-escaped


def test_encoded_csv_keeps_the_split_rows_and_adds_label_id(tmp_path):
    wd = write_splits(tmp_path, [("b", "train"), ("a", "valid"), ("b", "test")])
    run_encode(wd)
    rows = workdir.read_csv(wd.path("encoded.csv"))
    assert list(rows[0]) == SPLIT_COLUMNS + ["label_id"]
    splits = workdir.read_csv(wd.path("splits.csv"))
    assert [{k: r[k] for k in SPLIT_COLUMNS} for r in rows] == splits
    assert [r["label_id"] for r in rows] == ["1", "0", "1"]


def test_fitted_on_all_splits_so_a_split_lacking_a_class_does_not_shift_ids(tmp_path):
    # "b" is only in test; "a" never in train: ids are still a=0, b=1, c=2 in every split
    wd = write_splits(tmp_path, [("c", "train"), ("c", "valid"), ("a", "valid"), ("b", "test"), ("a", "test")])
    run_encode(wd)
    rows = workdir.read_csv(wd.path("encoded.csv"))
    assert {(r["split"], r["label"], r["label_id"]) for r in rows} == {
        ("train", "c", "2"), ("valid", "c", "2"), ("valid", "a", "0"), ("test", "b", "1"), ("test", "a", "0"),
    }


def test_pinned_classes_keep_their_ids(tmp_path):
    pinned = tmp_path / "old_classes.json"
    pinned.write_text(json.dumps({"classes": ["dog", "cat", "bird", "fish"]}))
    wd = write_splits(tmp_path, [("cat", "train"), ("bird", "valid"), ("dog", "test")])
    result = run_encode(wd, pinned=pinned)
    assert result.classes == ["dog", "cat", "bird", "fish"]
    assert encoded_ids(wd) == {"dog": 0, "cat": 1, "bird": 2}
    assert json.loads(wd.path("classes.json").read_text())["classes"] == ["dog", "cat", "bird", "fish"]


def test_a_label_missing_from_the_pinned_map_is_an_error_naming_it(tmp_path):
    pinned = tmp_path / "classes.json"
    pinned.write_text(json.dumps({"classes": ["cat", "dog"]}))
    wd = write_splits(tmp_path, [("cat", "train"), ("hamster", "valid"), ("dog", "test")])
    with pytest.raises(PrepError, match="'hamster'"):
        run_encode(wd, pinned=pinned)
    assert not wd.path("encoded.csv").exists()


@pytest.mark.parametrize("content", ['{"classes": []}', '["a", "a"]', '{"classes": [1, 2]}', "not json"])
def test_a_malformed_pinned_map_is_an_error(tmp_path, content):
    pinned = tmp_path / "classes.json"
    pinned.write_text(content)
    wd = write_splits(tmp_path, [("a", "train")])
    with pytest.raises(PrepError, match="classes.json"):
        run_encode(wd, pinned=pinned)


def test_pinned_map_through_the_cli(tmp_path, prep):
    (tmp_path / "pinned.json").write_text(json.dumps({"classes": ["cat"]}))
    write_splits(tmp_path, [("cat", "train"), ("dog", "test")])
    assert_one_line_error(prep("encode", "--classes", "pinned.json"), "'dog'", "pinned.json")
    (tmp_path / "pinned.json").write_text(json.dumps({"classes": ["dog", "cat"]}))
    result = prep("encode", "--classes", "pinned.json")
    assert result.exit_code == 0, result.output
    assert "Encoded 2 classes: 0=dog, 1=cat" in result.stdout


def test_encode_skips_when_up_to_date_and_redoes_when_an_input_changes(tmp_path):
    wd = write_splits(tmp_path, [("a", "train"), ("b", "valid")])
    assert run_encode(wd).up_to_date is False
    out = wd.path("encoded.csv")
    past = out.stat().st_mtime_ns - 10_000_000_000
    os.utime(out, ns=(past, past))

    again = run_encode(wd)
    assert again.up_to_date is True and again.classes == ["a", "b"]
    assert again.summary == "Up to date: encoded 2 classes: 0=a, 1=b"
    assert out.stat().st_mtime_ns == past

    write_splits(tmp_path, [("a", "train"), ("b", "valid"), ("c", "test")])
    third = run_encode(wd)
    assert third.up_to_date is False and third.classes == ["a", "b", "c"]
    assert encoded_ids(wd) == {"a": 0, "b": 1, "c": 2}

    # an edited output is rebuilt
    out.write_text("path\n")
    assert run_encode(wd).up_to_date is False
    assert encoded_ids(wd) == {"a": 0, "b": 1, "c": 2}


def test_encode_with_no_rows_is_an_error(tmp_path):
    wd = write_splits(tmp_path, [])
    with pytest.raises(PrepError, match="no rows"):
        run_encode(wd)
