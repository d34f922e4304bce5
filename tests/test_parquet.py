"""The Parquet format (data/ in the Hugging Face Hub layout), the dataset card the Hub reads, and
the class order option: read back by pyarrow, pandas and `datasets`, against the pkl.gz arrays."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pipeline
from conftest import assert_one_line_error, make_tree

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
yaml = pytest.importorskip("yaml")

CLASSES = {"cat": 14, "dog": 12, "bird": 9}
HUB = {"train": "train", "valid": "validation", "test": "test"}


def prep(work: Path, *args) -> None:
    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["--workdir", str(work), *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def build(root: Path, *run_args) -> Path:
    raw = make_tree(root / "raw", CLASSES, size=(20, 16))
    work = root / "work"
    prep(work, "run", raw, "--size", "12x10", "--executor", "serial", *run_args)
    return work


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("parquet"))


@pytest.fixture(scope="module")
def arrays(work: Path) -> dict:
    with gzip.open(work / "dataset.pkl.gz") as f:
        data = pickle.load(f)
    return dict(zip(("train", "valid", "test"), data))


def shard_files(work: Path, split: str) -> list[Path]:
    return sorted((work / "data").glob(f"{HUB[split]}-*.parquet"))


def test_the_hub_layout_schema_and_row_groups(work: Path):
    names = sorted(p.name for p in (work / "data").iterdir())
    assert names == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet",
                     "validation-00000-of-00001.parquet"]
    manifest = json.loads((work / "manifest.json").read_text())
    assert "parquet" in manifest["settings"]["pack"]["formats"]
    assert {f"data/{n}" for n in names} <= set(manifest["files"])
    f = pq.ParquetFile(work / "data" / "train-00000-of-00001.parquet")
    schema = f.schema_arrow
    assert schema.field("label").type == pa.int64()
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert set(schema.metadata) <= {b"huggingface", b"ARROW:schema"}  # no pandas metadata
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features == {"image": {"_type": "Image"},
                        "label": {"_type": "ClassLabel", "names": manifest["classes"]}}
    assert all(f.metadata.row_group(g).num_rows <= 100 for g in range(f.num_row_groups))


def test_pyarrow_and_pandas_alone_give_the_pkl_gz_pixels_labels_and_paths(work: Path, arrays: dict):
    import pandas as pd

    encoded = list(csv.DictReader((work / "encoded.csv").open(newline="")))
    for split, (x, y) in arrays.items():
        frame = pd.concat([pd.read_parquet(p) for p in shard_files(work, split)], ignore_index=True)
        assert list(frame.columns) == ["image", "label"]
        images = np.stack([np.asarray(Image.open(io.BytesIO(v["bytes"])).convert("RGB")) for v in frame["image"]])
        assert images.shape == x.shape and (images == x).all()
        assert (frame["label"].to_numpy() == y).all()
        assert [v["path"] for v in frame["image"]] == [row["path"] for row in encoded if row["split"] == split]
        # the PNG bytes are the resized files, unchanged
        resized = {row["path"]: row["resized"] for row in encoded}
        first = frame["image"][0]
        assert first["bytes"] == (work / "resized" / resized[first["path"]]).read_bytes()


def test_datasets_loads_the_folder_and_the_data_dir_as_typed_splits(work: Path, arrays: dict):
    datasets = pytest.importorskip("datasets")
    classes = json.loads((work / "manifest.json").read_text())["classes"]
    for ds in (datasets.load_dataset(str(work)), datasets.load_dataset("parquet", data_dir=str(work / "data"))):
        assert sorted(ds) == ["test", "train", "validation"]
        for split, (x, y) in arrays.items():
            part = ds[HUB[split]]
            assert part.features["label"].names == classes
            assert type(part.features["image"]).__name__ == "Image"
            numpy = part.with_format("numpy")
            assert (np.stack(list(numpy["image"])) == x).all()
            assert (numpy["label"] == y).all()


def test_the_card_is_what_the_hub_and_datasets_read(work: Path):
    hub = pytest.importorskip("huggingface_hub")
    card = hub.DatasetCard.load(work / "README.md")
    data = card.data.to_dict()
    manifest = json.loads((work / "manifest.json").read_text())
    assert data["license"] == "unknown" and data["task_categories"] == ["image-classification"]
    assert data["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*"}, {"split": "validation", "path": "data/validation-*"},
        {"split": "test", "path": "data/test-*"}]}]
    info = data["dataset_info"]
    assert info["features"][1]["dtype"]["class_label"]["names"] == {str(i): c for i, c in enumerate(manifest["classes"])}
    assert [(s["name"], s["num_examples"]) for s in info["splits"]] == [
        (HUB[s], manifest["splits"][s]["count"]) for s in ("train", "valid", "test")]
    assert all(s["num_bytes"] > 0 for s in info["splits"])
    datasets = pytest.importorskip("datasets")
    info = datasets.DatasetInfo._from_yaml_dict(data["dataset_info"])
    assert info.splits["validation"].num_examples == manifest["splits"]["valid"]["count"]
    assert info.splits["validation"].num_bytes == data["dataset_info"]["splits"][1]["num_bytes"]


def test_the_card_snippets_for_parquet_run(work: Path, arrays: dict, monkeypatch):
    monkeypatch.chdir(work)
    text = (work / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text.split("## Loading\n", 1)[1], re.S)
    pandas_block = next(b for b in blocks if "pd.read_parquet" in b)
    scope: dict = {}
    exec(pandas_block, scope)
    assert len(scope["train"]) == len(arrays["train"][1])
    assert (np.asarray(scope["image"].convert("RGB")) == arrays["train"][0][0]).all()
    pytest.importorskip("datasets")
    scope = {}
    exec(next(b for b in blocks if "load_dataset" in b), scope)
    assert len(scope["train"]) == len(arrays["train"][1])


def test_a_rerun_writes_the_same_bytes(work: Path, tmp_path: Path):
    again = build(tmp_path)  # another work directory, the same images
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    first = {p.name: digest(p) for p in (work / "data").iterdir()}
    assert first == {p.name: digest(p) for p in (again / "data").iterdir()}


def test_verify_fails_on_an_edited_label(tmp_path: Path, prep):
    work = build(tmp_path)
    path = work / "data" / "validation-00000-of-00001.parquet"
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[2] = (labels[2] + 1) % len(CLASSES)
    table = table.set_column(1, table.schema.field("label"), pa.array(labels, pa.int64()))
    pq.write_table(table, path)
    manifest = json.loads((work / "manifest.json").read_text())  # re-checksummed, as a buggy writer would
    data = path.read_bytes()
    manifest["files"]["data/validation-00000-of-00001.parquet"].update(
        bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (work / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(prep("verify", "--executor", "serial", workdir=work), "data", "split valid, index 2", "label")


def test_an_empty_split_has_no_file_nor_config_and_datasets_and_verify_accept_it(tmp_path: Path, prep):
    work = build(tmp_path, "--ratios", "8:2:0")
    assert not list((work / "data").glob("test-*"))
    assert prep("verify", "--executor", "serial", workdir=work).exit_code == 0
    meta = yaml.safe_load((work / "README.md").read_text().split("---\n")[1])
    assert [f["split"] for f in meta["configs"][0]["data_files"]] == ["train", "validation"]
    assert len(pipeline.load_torch(work, "test")) == 0 and pipeline.load(work / "data")[2][0].shape == (0, 10, 12, 3)
    datasets = pytest.importorskip("datasets")
    assert sorted(datasets.load_dataset(str(work))) == ["train", "validation"]


def test_license_option(tmp_path: Path, prep):
    work = build(tmp_path)
    assert prep("report", "--license", "other", workdir=work).exit_code == 0
    meta = yaml.safe_load((work / "README.md").read_text().split("---\n")[1])
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "raw-license", "LICENSE")
    assert prep("report", "--license", "cc-by-4.0", workdir=work).exit_code == 0
    meta = yaml.safe_load((work / "README.md").read_text().split("---\n")[1])
    assert meta["license"] == "cc-by-4.0" and "license_name" not in meta
    assert_one_line_error(prep("report", "--license", "CC BY 4.0", workdir=work), "--license", "'CC BY 4.0'")


def test_class_order(tmp_path: Path, prep):
    raw = make_tree(tmp_path / "raw", {"1": 4, "2": 4, "10": 4, "B": 4, "a": 4}, size=(8, 8))
    assert prep("run", raw, "--size", "8", "--executor", "serial", "--format", "parquet").exit_code == 0
    natural = json.loads((tmp_path / "work" / "classes.json").read_text())
    assert natural["classes"][:3] == ["1", "2", "10"] and natural["order"] == "natural"

    result = prep("encode", "--class-order", "alphabetical")
    assert result.exit_code == 0
    alphabetical = json.loads((tmp_path / "work" / "classes.json").read_text())
    assert alphabetical["classes"] == sorted(natural["classes"]) == ["1", "10", "2", "B", "a"]
    assert alphabetical["order"] == "alphabetical"
    assert prep("pack", "--format", "parquet", "--executor", "serial").exit_code == 0
    assert prep("report").exit_code == 0
    card = (tmp_path / "work" / "README.md").read_text()
    assert "prep encode --class-order alphabetical\n" in card and "alphabetical order" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    names = meta["dataset_info"]["features"][1]["dtype"]["class_label"]["names"]
    assert list(names.values()) == ["1", "10", "2", "B", "a"]
    # every format numbers the same way, and verify agrees
    assert prep("verify", "--executor", "serial").exit_code == 0

    # prep run passes it through
    assert prep("run", raw, "--size", "8", "--executor", "serial", "--format", "parquet",
                "--class-order", "alphabetical", workdir=tmp_path / "other").exit_code == 0
    assert json.loads((tmp_path / "other" / "classes.json").read_text())["classes"] == ["1", "10", "2", "B", "a"]
