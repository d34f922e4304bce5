"""`prep report`: the HTML page, parsed, against the work directory it was made from."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.stages import report
from tests.conftest import make_tree, write_image

ODD_CLASS = 'bird: "tweet" é'  # quotes, a colon and a non-ASCII letter, for HTML and YAML escaping


def prep(work: Path, *args, quiet: bool = True) -> str:
    """Run `prep --workdir WORK ARGS`; fail the test on a non-zero exit."""
    argv = ["--workdir", str(work), *(["-q"] if quiet else []), *map(str, args)]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def make_raw(root: Path) -> Path:
    """A tree with something for every section: odd sizes, a broken file, duplicates, a conflict."""
    raw = make_tree(root, {"cat": 12, "dog": 10, ODD_CLASS: 8}, size=(24, 20))
    write_image(raw / "cat" / "wide.png", size=(60, 20), color=(200, 30, 30))
    write_image(raw / "cat" / "tall.png", size=(20, 50), color=(190, 40, 30))
    shutil.copy(raw / "cat" / "img0.png", raw / "cat" / "copy-of-img0.png")  # a duplicate
    shutil.copy(raw / "cat" / "img1.png", raw / "dog" / "cat-or-dog.png")  # a label conflict
    (raw / "dog" / "broken.jpg").write_bytes(b"not an image at all")  # rejected by resize
    (raw / "notes.txt").write_text("not an image")  # skipped by index
    write_image(raw / "stray.png", size=(10, 10))  # skipped by index: not in a class folder
    (raw / "empty").mkdir()  # a class folder without images
    return raw


def build_workdir(root: Path, *, formats=("pkl.gz", "h5")) -> Path:
    """Every stage up to pack, then `prep report`, on :func:`make_raw`'s tree."""
    raw = make_raw(root / "raw")
    work = root / "work"
    prep(work, "index", raw, "--executor", "serial")
    prep(work, "resize", "--size", "8", "--executor", "serial")
    prep(work, "split")
    prep(work, "encode")
    prep(work, "pack", *(a for f in formats for a in ("--format", f)), "--executor", "serial")
    prep(work, "report")
    return work


class Page(HTMLParser):
    """What the tests look at: sections, images, links, tables (by id) and thumbnails (by class)."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.near_images: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.tables: dict[str, list[tuple[dict, list[str]]]] = {}
        self.thumbs: dict[str, int] = {}
        self._table: str | None = None
        self._row: tuple[dict, list[str]] | None = None
        self._cell: list[str] | None = None
        self._thumbs: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "img":  # the near-copy section's thumbnails apart: the others are in page order
            (self.near_images if self.sections[-1:] == ["near"] else self.images).append(attrs["src"])
            if self._thumbs is not None:
                self.thumbs[self._thumbs] += 1
        elif tag == "table":
            self._table = attrs.get("id")
            if self._table:
                self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = (attrs, [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "div" and "thumbs" in (attrs.get("class") or "").split():
            self._thumbs = attrs["data-class"]
            self.thumbs[self._thumbs] = 0

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "div":
            self._thumbs = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table: str) -> list[list[str]]:
        return [cells for _, cells in self.tables[table]]


def decode(uri: str) -> Image.Image:
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64", head[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    return image


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(work: Path) -> Page:
    return Page((work / "report" / "index.html").read_text(encoding="utf-8"))


def test_every_section_is_there_and_self_contained(page: Page):
    assert page.sections == [sid for sid, _ in report.SECTIONS]
    assert not page.tags & {"script", "link", "iframe", "object"}
    assert all(url.startswith(("data:image/png;base64,", "#")) for url in page.urls)
    # the split chart, the two size charts and 3 classes x 8 samples
    assert len(page.images) == 3 + 3 * 8
    for uri in page.images:
        assert decode(uri).format == "PNG"


def test_class_split_table_equals_the_manifest(work: Path, page: Page):
    manifest = json.loads((work / "manifest.json").read_text())
    rows = {attrs["data-class"]: cells for attrs, cells in page.tables["class-split"] if "data-class" in attrs}
    total = rows.pop("")
    assert list(rows) == manifest["classes"]
    for i, label in enumerate(manifest["classes"]):
        ident, name, *counts, overall = rows[label]
        assert (int(ident), name) == (i, label)
        expected = [manifest["splits"][s]["classes"].get(label, 0) for s in report.SPLITS]
        assert list(map(int, counts)) == expected and int(overall) == sum(expected)
    assert [int(n) for n in total[2:5]] == [manifest["splits"][s]["count"] for s in report.SPLITS]


def test_samples_are_the_resized_images_per_class(page: Page, work: Path):
    assert page.thumbs == {"cat": 8, "dog": 8, ODD_CLASS: 8}
    thumbs = [decode(uri) for uri in page.images[1:-2]]  # between the split chart and the size charts
    assert {t.size for t in thumbs} == {(8, 8)}


def test_sizes_rejected_duplicates_and_conflicts(page: Page):
    stats = {cells[0]: cells[1:] for cells in page.rows("size-stats")}
    assert stats["width (px)"] == ["20", "24", "60"] and stats["height (px)"] == ["20", "20", "50"]
    assert [cells[0] for cells in page.rows("rejected-files")[1:]] == ["dog/broken.jpg"]
    assert "not an image" in page.rows("rejected-files")[1][2]
    skipped = {cells[0]: (cells[1], cells[2]) for cells in page.rows("skipped")[1:]}
    assert skipped == {"not an image extension": ("1", "notes.txt"), "not in a class folder": ("1", "stray.png")}
    conflicts = page.rows("conflicts")[1:]
    assert len(conflicts) == 1
    assert "cat/img1.png (cat)" in conflicts[0][2] and "dog/cat-or-dog.png (dog)" in conflicts[0][2]
    groups = page.rows("duplicates")[1:]
    assert sorted(int(g[1]) for g in groups) == [2, 2]
    assert any("cat/copy-of-img0.png" in g[2] for g in groups)


def test_summary_shows_source_settings_and_formats(page: Page, work: Path):
    summary = dict(page.rows("summary-table"))
    assert summary["source"] == str((work.parent / "raw").resolve())
    assert summary["image size"] == "8 x 8 pixels, RGB"
    assert "pkl.gz: 1 file" in summary["packaged"] and "h5: 1 file" in summary["packaged"]
    settings = dict(page.rows("settings")[1:])
    assert settings["resize.width"] == "8" and settings["split.seed"] == "42"
    assert settings["pack.formats"] == "pkl.gz, h5"


def test_rerun_gives_the_same_bytes(work: Path):
    before = (work / "report" / "index.html").read_bytes()
    prep(work, "report")
    assert (work / "report" / "index.html").read_bytes() == before


def test_missing_stages_say_what_to_run(tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3}, size=(10, 10))
    work = tmp_path / "work"
    prep(work, "index", raw, "--executor", "serial")
    output = prep(work, "report", "--out", "elsewhere.html", quiet=False)
    assert "not run yet: `prep resize`, `prep split`" in output
    text = (work / "elsewhere.html").read_text(encoding="utf-8")
    page = Page(text)
    assert page.sections == [sid for sid, _ in report.SECTIONS]
    for command in ("resize", "split", "pack", "verify-train"):
        assert f"Not run yet: run <code>prep {command}</code>" in text
    assert not (work / "README.md").exists()  # no card before the data is split


def test_missing_workdir_is_a_one_line_error(tmp_path: Path):
    result = CliRunner().invoke(cli, ["--workdir", str(tmp_path / "nope"), "report"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "does not exist" in result.output and not (tmp_path / "nope").exists()


def test_run_writes_the_report_last(tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"a": 6, "b": 6}, size=(10, 10))
    work = tmp_path / "work"
    prep(work, "run", raw, "--size", "8", "--format", "pkl.gz", "--executor", "serial")
    page = Page((work / "report" / "index.html").read_text(encoding="utf-8"))
    manifest = json.loads((work / "manifest.json").read_text())
    totals = {cells[1]: int(cells[-1]) for cells in page.rows("class-split")[1:]}
    assert totals == {"a": 6, "b": 6, "total": sum(manifest["splits"][s]["count"] for s in report.SPLITS)}
    assert (work / "README.md").is_file()


def test_verify_train_results_are_shown(work: Path, tmp_path: Path):
    pytest.importorskip("tensorflow")
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    # a tiny test split may not pass the verdict; the report shows whichever it is
    CliRunner().invoke(cli, ["--workdir", str(copy), "-q", "verify-train", "--model", "mlp", "--epochs", "2"])
    metrics = json.loads((copy / "verify" / "metrics.json").read_text())
    prep(copy, "report")
    page = Page((copy / "report" / "index.html").read_text(encoding="utf-8"))
    shown = dict(page.rows("metrics"))
    assert shown["verdict"] == metrics["verdict"]
    assert float(shown["test accuracy"]) == pytest.approx(metrics["test_accuracy"], abs=1e-4)
    per_class = {cells[0]: cells[1:] for cells in page.rows("per-class")[1:]}
    assert list(per_class) == metrics["classes"]
    plots = [decode(uri) for uri in page.images[-3:]]
    for plot, name in zip(plots, ("training_curves.png", "confusion_matrix.png", "predictions.png"), strict=True):
        with Image.open(copy / "verify" / name) as original:
            assert plot.size == original.size
    assert "packed again" not in (copy / "report" / "index.html").read_text(encoding="utf-8")

    later = (copy / "verify" / "metrics.json").stat().st_mtime + 10
    os.utime(copy / "manifest.json", (later, later))  # as if packed after verify-train
    prep(copy, "report")
    assert "packed again after this run" in (copy / "report" / "index.html").read_text(encoding="utf-8")
