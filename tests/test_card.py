"""The dataset card (WORKDIR/README.md): YAML front matter and body against manifest.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.stages import card
from tests.test_report import ODD_CLASS, build_workdir

yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("card"))


@pytest.fixture(scope="module")
def manifest(work: Path) -> dict:
    return json.loads((work / "manifest.json").read_text())


@pytest.fixture(scope="module")
def text(work: Path) -> str:
    return (work / "README.md").read_text(encoding="utf-8")


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table(markdown: str) -> list[list[str]]:
    """The cells of the first Markdown table, without the header and rule rows."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


def test_front_matter_follows_the_hugging_face_shape(text: str, manifest: dict):
    meta = front_matter(text)
    assert meta["pretty_name"] == "raw"
    assert meta["task_categories"] == ["image-classification"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["license"] == "unknown"
    # no Parquet shards packed: no file would provide the features, so no configs nor dataset_info
    # (tests/test_parquet.py checks them)
    assert "configs" not in meta and "dataset_info" not in meta
    assert ODD_CLASS in section(text, "Classes")


def test_counts_and_checksums_equal_the_manifest(text: str, manifest: dict):
    rows = table(section(text, "Classes"))
    for i, label in enumerate(manifest["classes"]):
        ident, name, *counts, total = rows[i]
        expected = [manifest["splits"][s]["classes"].get(label, 0) for s in ("train", "valid", "test")]
        assert (int(ident), name, list(map(int, counts)), int(total)) == (i, label, expected, sum(expected))
    checksums = {path.strip("`"): (int(size), sha.strip("`")) for path, size, sha in table(section(text, "Checksums"))}
    assert checksums == {path: (info["bytes"], info["sha256"]) for path, info in manifest["files"].items()}


def test_commands_and_image_description(text: str, work: Path):
    made = section(text, "How it was made")
    raw = (work.parent / "raw").resolve()
    assert f"prep index {raw}\n" in made
    assert "prep resize --size 8x8\n" in made
    assert "prep split --ratios 0.7:0.2:0.1 --seed 42\n" in made
    assert "prep pack --format pkl.gz --format h5\n" in made
    assert "(N, 8, 8, 3)" in section(text, "Images")


def test_loading_snippets_run(text: str, work: Path, manifest: dict, monkeypatch):
    monkeypatch.chdir(work)
    blocks = re.findall(r"```python\n(.*?)```", section(text, "Loading"), re.S)
    assert any("pickle.load(gzip.open" in b for b in blocks) and any("h5py.File" in b for b in blocks)
    assert any("load_tf(" in b for b in blocks)
    for block in blocks:
        if "load_tf(" in block or "load_torch(" in block:  # tensorflow, torch: covered by the loaders' own tests
            continue
        scope: dict = {}
        exec(block, scope)
        assert scope["x_train"].shape == (manifest["splits"]["train"]["count"], 8, 8, 3)
        assert scope["y_train"].dtype == np.int64
        if "classes" in scope:
            assert list(scope["classes"]) == manifest["classes"]


@pytest.mark.parametrize("n, bucket", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (1797, "1K<n<10K"),
                                       (10_000, "10K<n<100K"), (2_000_000_000, "n>1B")])
def test_size_category(n: int, bucket: str):
    assert card.size_category(n) == bucket


def test_classes_left_out_by_drop_small_are_recorded_and_the_card_commands_redo_them(tmp_path, prep):
    from conftest import make_tree

    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 10, "tiny": 2})
    result = prep("run", raw, "--size", "8", "--format", "pkl.gz", "--drop-small", "--executor", "serial")
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    assert json.loads((work / "split.json").read_text())["dropped_classes"] == {"tiny": 2}
    assert json.loads((work / "manifest.json").read_text())["settings"]["split"]["dropped_classes"] == {"tiny": 2}
    text = (work / "README.md").read_text(encoding="utf-8")
    assert "Left out by `prep split --drop-small`, too small for the ratios: `tiny` (2 images)." in text
    page = (work / "report" / "index.html").read_text(encoding="utf-8")
    dropped = page.split('id="dropped"', 1)[1].split("</table>", 1)[0]
    assert "tiny" in dropped and ">2<" in dropped

    # the card's commands, typed in another work directory, give the same splits
    again = tmp_path / "again"
    for line in section(text, "How it was made").split("```sh\n", 1)[1].split("\n```", 1)[0].splitlines()[:3]:
        args = line.split()[1:]
        if args[0] == "resize":
            args += ["--executor", "serial"]
        assert prep(*args, workdir=again).exit_code == 0, line
    assert (again / "splits.csv").read_bytes() == (work / "splits.csv").read_bytes()


def test_the_tfrecord_snippet_reads_the_records_without_prep(tmp_path, prep, monkeypatch):
    from conftest import make_tree

    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 10})
    result = prep("run", raw, "--size", "8", "--format", "tfrecord", "--executor", "serial")
    assert result.exit_code == 0, result.output
    work = tmp_path / "work"
    text = (work / "README.md").read_text(encoding="utf-8")
    block = text.split("**tfrecord**\n\n```python\n", 1)[1].split("```", 1)[0]
    assert "pipeline" not in block
    monkeypatch.chdir(work)
    scope: dict = {}
    exec(block, scope)
    pairs = [(image.numpy(), int(label)) for image, label in scope["train"]]
    manifest = json.loads((work / "manifest.json").read_text())
    assert len(pairs) == manifest["splits"]["train"]["count"]
    assert all(image.shape == (8, 8, 3) for image, _ in pairs)
    assert {label for _, label in pairs} == {0, 1}


def test_the_images_section_says_how_pkl_gz_stores_them_when_flat_or_float(tmp_path, prep):
    from conftest import make_tree

    raw = make_tree(tmp_path / "raw", {"cat": 6, "dog": 6})
    assert prep("run", raw, "--size", "8x4", "--format", "pkl.gz", "--flat", "--executor", "serial").exit_code == 0
    text = (tmp_path / "work" / "README.md").read_text(encoding="utf-8")
    assert "uint8 arrays of shape (N, 4, 8, 3)" in section(text, "Images")
    assert "dataset.pkl.gz holds them flat, (N, 96).\n" in section(text, "Images")
    assert "prep pack --format pkl.gz --flat\n" in section(text, "How it was made")
