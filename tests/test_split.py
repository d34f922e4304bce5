"""`prep split`: ratios, stratified leak-free assignment, duplicates, small classes, rejects."""

from __future__ import annotations

import hashlib
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error
from pipeline import workdir
from pipeline.errors import PrepError
from pipeline.stages import split
from pipeline.stages.index import LABEL_COLUMNS
from pipeline.stages.resize import RESIZED_COLUMNS

RATIOS = [(7, 2, 1), (8, 1, 1), (8, 2, 0), (1, 1, 1), (6, 0, 4), (1, 0, 0), (5, 3, 2)]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_rows(class_sizes: dict[str, int], dup_of: dict[str, str] | None = None) -> list[dict]:
    """labels.csv rows with unique content, except ``path -> other path`` pairs in ``dup_of``."""
    rows = []
    for label, n in class_sizes.items():
        for i in range(n):
            path = f"{label}/img{i}.png"
            rows.append({"path": path, "label": label, "sha256": sha(path), "bytes": "1"})
    by_path = {r["path"]: r for r in rows}
    for path, other in (dup_of or {}).items():
        by_path[path]["sha256"] = by_path[other]["sha256"]
    return rows


def fractions(ratios):
    total = sum(ratios)
    return tuple(r / total for r in ratios)


def counts(assignment: dict[str, str], rows: list[dict]) -> dict[str, list[int]]:
    table: dict[str, list[int]] = {}
    for row in rows:
        table.setdefault(row["label"], [0, 0, 0])[split.SPLITS.index(assignment[row["path"]])] += 1
    return table


# -- ratios ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7:2:1", (0.7, 0.2, 0.1)),
        ("70:20:10", (0.7, 0.2, 0.1)),
        ("0.7,0.2,0.1", (0.7, 0.2, 0.1)),
        ("8:2:0", (0.8, 0.2, 0.0)),
        ("1:1:1", (1 / 3, 1 / 3, 1 / 3)),
        (" 6 : 3 : 1 ", (0.6, 0.3, 0.1)),
    ],
)
def test_parse_ratios(text, expected):
    assert split.parse_ratios(text) == pytest.approx(expected)


def test_ratios_written_any_way_give_the_same_fractions_and_so_the_same_split():
    # 0.7 + 0.2 + 0.1 is 0.9999999999999999 in floats: dividing by it would give another split
    same = {split.parse_ratios(t) for t in ("7:2:1", "70:20:10", "0.7:0.2:0.1", ".7,.2,.1", "3.5:1:0.5")}
    assert same == {(0.7, 0.2, 0.1)}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("-1:2:1", "negative"),
        ("7:-2:1", "negative"),
        ("0:0:0", "zero"),
        ("0,0,0", "zero"),
        ("7:2", "three numbers"),
        ("7:2:1:1", "three numbers"),
        ("a:b:c", "three numbers"),
        ("", "three numbers"),
        ("nan:1:1", "finite"),
        ("0:5:5", "train"),
    ],
)
def test_bad_ratios_are_clear_errors(text, fragment):
    with pytest.raises(PrepError, match=fragment) as err:
        split.parse_ratios(text)
    assert repr(text) in str(err.value)


def test_allocate_is_exact_when_it_can_be():
    assert split.allocate(10, (0.7, 0.2, 0.1)) == [7, 2, 1]
    assert split.allocate(100, (0.8, 0.2, 0.0)) == [80, 20, 0]
    assert split.allocate(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split.allocate(2, (0.8, 0.1, 0.1)) == [2, 0, 0]
    assert split.allocate(0, (0.7, 0.2, 0.1)) == [0, 0, 0]


# -- properties of the assignment ------------------------------------------------------------

class_sizes = st.dictionaries(
    st.sampled_from(["a", "b", "class10", "class2", "고양이", "with,comma"]), st.integers(1, 60), min_size=1
)


@settings(max_examples=60, deadline=None)
@given(sizes=class_sizes, ratios=st.sampled_from(RATIOS), seed=st.integers(0, 2**32))
def test_assignment_is_disjoint_complete_and_stratified(sizes, ratios, seed):
    rows = make_rows(sizes)
    fr = fractions(ratios)
    assignment = split.assign(rows, fr, seed)
    assert set(assignment) == {r["path"] for r in rows}  # complete, and a dict: one split each
    assert set(assignment.values()) <= {s for s, r in zip(split.SPLITS, fr) if r > 0}
    needed = sum(1 for r in fr if r > 0)
    for label, got in counts(assignment, rows).items():
        n = sizes[label]
        assert sum(got) == n
        if n >= needed:
            assert all(g > 0 for g, r in zip(got, fr) if r > 0), (label, got)
        if all(n * r >= 1 for r in fr if r > 0):  # the one-per-split rule has nothing to fix
            assert all(abs(g - n * r) < 1 for g, r in zip(got, fr)), (label, n, got)


@settings(max_examples=40, deadline=None)
@given(sizes=class_sizes, ratios=st.sampled_from(RATIOS), seed=st.integers(0, 2**32), shuffle=st.randoms())
def test_assignment_does_not_depend_on_row_order(sizes, ratios, seed, shuffle):
    rows = make_rows(sizes)
    shuffled = rows[:]
    shuffle.shuffle(shuffled)
    assert split.assign(shuffled, fractions(ratios), seed) == split.assign(rows, fractions(ratios), seed)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 40),
    data=st.data(),
    ratios=st.sampled_from(RATIOS),
    seed=st.integers(0, 1000),
)
def test_exact_duplicates_always_share_a_split(n, data, ratios, seed):
    rows = make_rows({"a": n, "b": n})
    paths = [r["path"] for r in rows]
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(paths), st.sampled_from(paths)), max_size=10))
    by_path = {r["path"]: r for r in rows}
    for x, y in pairs:  # chains of pairs give groups of three or more identical files
        by_path[x]["sha256"] = by_path[y]["sha256"]
    assignment = split.assign(rows, fractions(ratios), seed)
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["sha256"], set()).add(assignment[row["path"]])
    assert all(len(g) == 1 for g in groups.values())


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 12), data=st.data(), ratios=st.sampled_from(RATIOS), seed=st.integers(0, 2**32))
def test_a_class_with_enough_different_images_reaches_every_split_whatever_its_duplicates(n, data, ratios, seed):
    rows = make_rows({"a": n})
    group = data.draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))  # image i has content group[i]
    for row, g in zip(rows, group):
        row["sha256"] = sha(f"content {g}")
    fr = fractions(ratios)
    got = counts(split.assign(rows, fr, seed), rows)["a"]
    if len(set(group)) >= sum(1 for r in fr if r > 0):
        assert all(g > 0 for g, r in zip(got, fr) if r > 0), (group, got)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), ratios=st.sampled_from(RATIOS), seed=st.integers(0, 2**32))
def test_every_class_the_check_lets_through_reaches_every_split_with_copies_across_classes(data, ratios, seed):
    rows = make_rows({"a": data.draw(st.integers(1, 8)), "b": data.draw(st.integers(1, 8))})
    for row in rows:  # contents drawn from one pool: copies within and across the two classes
        row["sha256"] = sha(f"content {data.draw(st.integers(0, 9))}")
    fr = fractions(ratios)
    needed = sum(1 for r in fr if r > 0)
    owned = split.units_by_class(rows)[1]
    table = counts(split.assign(rows, fr, seed), rows)
    for label, got in table.items():
        if len(owned.get(label, ())) >= needed:
            assert all(g > 0 for g, r in zip(got, fr) if r > 0), (label, got)


def test_duplicates_in_a_class_no_longer_empty_a_split(tmp_path, prep):
    # 4 images, 3 different (two copies of one): one in each split, whatever the seed; 3 copies
    # of one image cannot be split three ways: an error naming the class, unless dropped
    rows = make_rows({"a": 4, "b": 3}, dup_of={"a/img1.png": "a/img0.png", "b/img1.png": "b/img0.png",
                                               "b/img2.png": "b/img0.png"})
    wd = write_labels(tmp_path, rows)
    assert_one_line_error(prep("split"), "'b' has 3 images, 1 different", "--drop-small")
    # copies of another class's images do not count: that class's split holds them
    other = make_rows({"a": 6, "b": 3}, dup_of={"b/img1.png": "a/img1.png", "b/img2.png": "a/img2.png"})
    assert_one_line_error(prep("split", workdir=write_labels(tmp_path / "other", other).root),
                          "'b' has 3 images, 1 different")
    for seed in range(12):
        table = run_split(wd, seed=seed, drop_small=True).table
        assert set(table) == {"a"} and all(table["a"][s] > 0 for s in split.SPLITS), (seed, table)


def test_a_different_seed_gives_a_different_split():
    rows = make_rows({"a": 50, "b": 40})
    first = split.assign(rows, (0.7, 0.2, 0.1), 1)
    assert split.assign(rows, (0.7, 0.2, 0.1), 1) == first
    second = split.assign(rows, (0.7, 0.2, 0.1), 2)
    assert second != first
    assert counts(first, rows) == counts(second, rows)


# -- the stage -------------------------------------------------------------------------------


def write_labels(tmp_path, rows) -> workdir.Workdir:
    wd = workdir.Workdir(tmp_path / "work")
    workdir.write_csv(wd.path("labels.csv"), LABEL_COLUMNS, rows)
    return wd


def run_split(wd: workdir.Workdir, **kw) -> split.SplitResult:
    cfg = split.SplitConfig(workdir=wd, labels=wd.path("labels.csv"), out=wd.path("splits.csv"), **kw)
    return split.run(cfg)


def test_the_same_labels_in_any_row_order_give_the_same_splits_csv(tmp_path):
    rows = make_rows({"cat": 20, "dog": 13, "고양이": 7})
    outputs = []
    for attempt in range(3):
        shuffled = rows[:]
        random.Random(attempt).shuffle(shuffled)
        wd = write_labels(tmp_path / str(attempt), shuffled)
        run_split(wd, seed=7)
        outputs.append(wd.path("splits.csv").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    read = workdir.read_csv(tmp_path / "0" / "work" / "splits.csv")
    assert [r["path"] for r in read] == [r["path"] for r in rows]  # index order: class, then path


def test_split_table_and_csv(tmp_path):
    wd = write_labels(tmp_path, make_rows({"cat": 10, "dog": 20}))
    result = run_split(wd, ratios=(0.7, 0.2, 0.1))
    assert result.table == {"cat": {"train": 7, "valid": 2, "test": 1}, "dog": {"train": 14, "valid": 4, "test": 2}}
    rows = workdir.read_csv(wd.path("splits.csv"))
    assert list(rows[0]) == split.SPLIT_COLUMNS
    assert len(rows) == 30
    assert result.summary == "Split train 21, valid 6, test 3 across 2 classes"


def test_same_content_under_two_labels_is_reported_and_kept_together(tmp_path, caplog):
    rows = make_rows({"cat": 10, "dog": 10}, dup_of={"dog/img3.png": "cat/img5.png"})
    wd = write_labels(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        result = run_split(wd)
    assert result.conflicts == [("cat/img5.png", "cat", "dog/img3.png", "dog")]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cat/img5.png" in m and "dog/img3.png" in m for m in messages), messages
    out = {r["path"]: r["split"] for r in workdir.read_csv(wd.path("splits.csv"))}
    assert out["cat/img5.png"] == out["dog/img3.png"]


def test_a_class_too_small_is_an_error_naming_it_unless_dropped(tmp_path, caplog):
    wd = write_labels(tmp_path, make_rows({"cat": 10, "tiny": 2, "dog": 10}))
    with pytest.raises(PrepError, match=r"class 'tiny' has 2 images.*at least 3.*--drop-small"):
        run_split(wd, ratios=(0.7, 0.2, 0.1))
    assert not wd.path("splits.csv").exists()

    # two non-zero splits need only two images
    assert "tiny" in run_split(wd, ratios=(0.8, 0.2, 0.0)).table

    with caplog.at_level(logging.WARNING):
        result = run_split(wd, ratios=(0.7, 0.2, 0.1), drop_small=True)
    assert result.dropped_classes == {"tiny": 2}
    assert set(result.table) == {"cat", "dog"}
    assert {r["label"] for r in workdir.read_csv(wd.path("splits.csv"))} == {"cat", "dog"}
    assert any("tiny" in r.getMessage() for r in caplog.records)


def test_dropping_every_class_is_an_error(tmp_path):
    wd = write_labels(tmp_path, make_rows({"a": 1, "b": 2}))
    with pytest.raises(PrepError, match="every class"):
        run_split(wd, drop_small=True)


def test_small_class_error_through_the_cli(tmp_path, prep):
    wd = write_labels(tmp_path, make_rows({"cat": 10, "tiny": 1}))
    assert_one_line_error(prep("split"), "'tiny'", "1 image")
    result = prep("split", "--drop-small")
    assert result.exit_code == 0
    assert "tiny" not in wd.path("splits.csv").read_text()


def test_images_resize_rejected_are_left_out(tmp_path):
    rows = make_rows({"cat": 10, "dog": 10})
    wd = write_labels(tmp_path, rows)
    resized = []
    for row in rows:
        bad = row["path"] in ("cat/img2.png", "dog/img7.png")
        resized.append({
            **row, "status": "rejected" if bad else "ok", "reason": "truncated" if bad else "",
            "resized": "" if bad else row["path"],
        })
    workdir.write_csv(wd.path("resized.csv"), RESIZED_COLUMNS, resized)
    result = run_split(wd)
    out = workdir.read_csv(wd.path("splits.csv"))
    assert len(out) == 18 and result.excluded == 2
    assert {"cat/img2.png", "dog/img7.png"}.isdisjoint(r["path"] for r in out)
    assert all(r["resized"] == r["path"] for r in out)


def test_an_out_of_date_resized_csv_is_an_error(tmp_path):
    rows = make_rows({"cat": 5})
    wd = write_labels(tmp_path, rows)
    stale = [{**r, "status": "ok", "resized": r["path"]} for r in rows]
    stale[0]["sha256"] = sha("old content")
    workdir.write_csv(wd.path("resized.csv"), RESIZED_COLUMNS, stale)
    with pytest.raises(PrepError, match="prep resize"):
        run_split(wd)


def test_labels_index_wrote_and_the_same_rows_shuffled_give_the_same_splits(tmp_path, prep):
    # split takes the rows of the CSV `prep index` wrote in their order (it is natural order
    # already) and sorts any other CSV: both ways must agree
    from conftest import make_tree

    make_tree(tmp_path / "raw", {"b10": 3, "b2": 12, "a": 11})
    assert prep("index", tmp_path / "raw").exit_code == 0
    labels = tmp_path / "work" / "labels.csv"
    meta = workdir.read_json(tmp_path / "work" / workdir.INDEX_META)
    assert meta["labels_sha256"] == workdir.sha256_file(labels)
    paths = [r["path"] for r in workdir.read_csv(labels)]
    assert paths[:3] == ["a/img0.png", "a/img1.png", "a/img2.png"] and paths[10:12] == ["a/img10.png", "b2/img0.png"]
    assert prep("split", "--seed", "5").exit_code == 0
    by_index = (tmp_path / "work" / "splits.csv").read_bytes()

    rows = workdir.read_csv(labels)
    random.Random(2).shuffle(rows)
    workdir.write_csv(labels, LABEL_COLUMNS, rows)
    assert prep("split", "--seed", "5").exit_code == 0
    assert (tmp_path / "work" / "splits.csv").read_bytes() == by_index

    # indexing again sorts the edited CSV back (it does not trust an order it did not write)
    assert prep("index", tmp_path / "raw").exit_code == 0
    assert [r["path"] for r in workdir.read_csv(labels)] == paths
    assert prep("split", "--seed", "5").exit_code == 0
    assert (tmp_path / "work" / "splits.csv").read_bytes() == by_index


def test_an_up_to_date_rerun_reports_the_table_without_reading_splits_csv(tmp_path, monkeypatch):
    wd = write_labels(tmp_path, make_rows({"Zebra": 10, "class2": 20, "class10": 4}))  # natural order is not sorted()
    first = run_split(wd, ratios=(0.7, 0.2, 0.1))
    before = wd.path("splits.csv").read_bytes()

    def no_reading(*args, **kw):
        raise AssertionError("an up-to-date split read its CSVs")

    monkeypatch.setattr(workdir, "read_csv", no_reading)
    again = run_split(wd, ratios=(0.7, 0.2, 0.1))
    assert again.up_to_date and again.table == first.table and list(again.table) == ["Zebra", "class2", "class10"]
    assert all(list(counts) == list(split.SPLITS) for counts in again.table.values())
    assert again.summary == "Up to date: " + first.summary[0].lower() + first.summary[1:]
    assert wd.path("splits.csv").read_bytes() == before
