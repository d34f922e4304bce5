"""pipeline.load_torch (a map-style dataset for torch's DataLoader, without prep importing torch)
and pipeline.load_frame (one pandas row per image of a work directory)."""

from __future__ import annotations

import csv
import gzip
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline
from conftest import make_tree, write_image

CLASSES = {"cat": 14, "dog": 12, "bird": 9}


def prep(work: Path, *args) -> None:
    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["--workdir", str(work), *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torch")
    raw = make_tree(root / "raw", CLASSES, size=(20, 16))
    (raw / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_image(raw / "cat" / "tiny.gif", size=(5, 7), mode="P", color=3)
    prep(root / "work", "run", raw, "--size", "12x10", "--executor", "serial",
         "--format", "pkl.gz", "--format", "h5", "--format", "parquet")
    return root / "work"


@pytest.fixture(scope="module")
def arrays(work: Path) -> dict:
    with gzip.open(work / "dataset.pkl.gz") as f:
        return dict(zip(("train", "valid", "test"), pickle.load(f)))


def collate(samples):
    """What DataLoader's default collate does with (uint8 array, int) pairs, in numpy."""
    images, labels = zip(*samples)
    return np.stack(images), np.array(labels, dtype=np.int64)


def batches(dataset, indices, size):
    for start in range(0, len(indices), size):
        yield collate([dataset[int(i)] for i in indices[start : start + size]])


def in_worker(dataset, indices):
    """One DataLoader worker: it receives the dataset pickled, and reads its share of a batch."""
    return collate([dataset[int(i)] for i in indices])


@pytest.mark.parametrize("source", ["work", "dataset.h5", "data"])
def test_a_dataloader_loop_gives_the_pkl_gz_arrays(work: Path, arrays: dict, source: str):
    target = work if source == "work" else work / source
    for split, (x, y) in arrays.items():
        dataset = pipeline.load_torch(target, split)
        assert len(dataset) == len(y)
        order = np.random.default_rng(0).permutation(len(y))  # shuffle=True
        seen_x, seen_y = zip(*batches(dataset, order, 8))
        assert (np.concatenate(seen_x) == x[order]).all() and (np.concatenate(seen_y) == y[order]).all()


@pytest.mark.parametrize("source", ["dataset.h5", "data"])
def test_the_dataset_pickles_to_worker_processes_after_use(work: Path, arrays: dict, source: str):
    dataset = pipeline.load_torch(work / source, "train")
    dataset[0]  # opened here first: workers must open their own file
    x, y = arrays["train"]
    with ProcessPoolExecutor(2) as pool:
        shares = [np.arange(k, len(y), 2) for k in range(2)]
        for share, (images, labels) in zip(shares, pool.map(in_worker, [dataset] * 2, shares)):
            assert (images == x[share]).all() and (labels == y[share]).all()


def test_parquet_rows_are_read_a_row_group_at_a_time(work: Path):
    dataset = pipeline.load_torch(work / "data", "validation")  # the Hub's name is taken too
    for i in range(len(dataset)):
        dataset[i]
    assert 0 < len(dataset.rows.cache) <= dataset.rows.CACHED
    assert all(len(pngs) <= 100 for pngs, _ in dataset.rows.cache.values())


def test_transform_and_indexing(work: Path, arrays: dict):
    x, y = arrays["test"]
    dataset = pipeline.load_torch(work, "test", transform=lambda image: image.transpose(2, 0, 1))
    image, label = dataset[-1]
    assert image.shape == (3, 10, 12) and (image == x[-1].transpose(2, 0, 1)).all() and label == y[-1]
    assert isinstance(label, int)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_torch_dataloader_with_workers(work: Path, arrays: dict):
    torch = pytest.importorskip("torch")
    x, y = arrays["train"]
    for source in ("dataset.h5", "data"):
        loader = torch.utils.data.DataLoader(pipeline.load_torch(work / source, "train"), batch_size=8, num_workers=2)
        images, labels = zip(*loader)
        assert torch.cat(images).dtype == torch.uint8
        assert (torch.cat(images).numpy() == x).all() and (torch.cat(labels).numpy() == y).all()


def test_tfrecord_is_refused_in_one_line(work: Path, tmp_path: Path):
    from pipeline.errors import PrepError

    prep(work.parent / "records", "run", work.parent / "raw", "--size", "12x10", "--executor", "serial",
         "--format", "tfrecord")
    with pytest.raises(PrepError, match="parquet, h5 or pkl.gz"):
        pipeline.load_torch(work.parent / "records", "train")


def test_load_frame_has_a_row_per_image_with_rejections(work: Path):
    frame = pipeline.load_frame(work)
    assert len(frame) == sum(CLASSES.values()) + 2
    assert {"path", "label", "label_id", "split", "sha256", "format", "mode", "width", "height", "status",
            "reason"} <= set(frame.columns)
    broken = frame.set_index("path").loc["dog/broken.png"]
    assert broken["status"] == "rejected" and broken["reason"] and broken["split"] == ""
    tiny = frame.set_index("path").loc["cat/tiny.gif"]
    assert (tiny["format"], tiny["mode"], tiny["width"], tiny["height"]) == ("GIF", "P", 5, 7)
    ok = frame[frame["status"] == "ok"]
    encoded = list(csv.DictReader((work / "encoded.csv").open(newline="")))
    assert sorted(zip(ok["path"], ok["split"], ok["label_id"].astype(int))) == sorted(
        (row["path"], row["split"], int(row["label_id"])) for row in encoded)
    assert frame.groupby("split", observed=True).size().to_dict()["train"] == len(pipeline.load(work)[0][1])
