"""verify-train on small generated datasets whose classes are (or are not) learnable."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.stages import status, train
from pipeline.workdir import Workdir
from tests.conftest import make_tree

pytest.importorskip("tensorflow")


def _prep(runner: CliRunner, work: Path, *args: str):
    result = runner.invoke(cli, ["--workdir", str(work), "-q", *args], catch_exceptions=False)
    return result


def _packaged(tmp_path: Path, shuffle_labels: bool = False, formats: str = "all") -> Path:
    """A learnable 3-class dataset (red, green, blue noise) run through every stage up to pack."""
    raw = make_tree(tmp_path / "raw", {"red": 40, "green": 40, "blue": 40}, size=(12, 12))
    work = tmp_path / "work"
    runner = CliRunner()
    for args in (["index", str(raw)], ["resize", "--size", "8", "--workers", "1"], ["split"], ["encode"]):
        assert _prep(runner, work, *args).exit_code == 0
    if shuffle_labels:  # each image gets another image's (label, label_id): misaligned, but consistent
        encoded = work / "encoded.csv"
        with open(encoded, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields, rows = reader.fieldnames, list(reader)
        pairs = [(r["label"], r["label_id"]) for r in rows]
        random.Random(0).shuffle(pairs)
        for row, (label, label_id) in zip(rows, pairs):
            row["label"], row["label_id"] = label, label_id
        with open(encoded, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    assert _prep(runner, work, "pack", "--format", formats).exit_code == 0
    return work


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return _packaged(tmp_path_factory.mktemp("learnable"))


def test_learnable_data_passes_and_writes_every_output(learnable: Path):
    result = CliRunner().invoke(
        cli, ["--workdir", str(learnable), "verify-train", "--model", "small", "--epochs", "15", "--patience", "5",
              "--save-model"]
    )
    assert result.exit_code == 0, result.output
    out = learnable / "verify"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["verdict"] == "learned"
    assert metrics["test_accuracy"] >= metrics["required_accuracy"] > metrics["baseline_accuracy"]
    assert metrics["format"] == "pkl.gz"  # the first format found
    assert set(metrics["per_class"]) == {"red", "green", "blue"}
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 3 and sum(map(sum, matrix)) == metrics["counts"]["test"]
    assert (out / "model.keras").stat().st_size > 0
    for name in ("training_curves.png", "confusion_matrix.png", "predictions.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 100
    assert "learned" in result.output


@pytest.mark.parametrize("fmt", ["h5", "tfrecord"])
def test_each_format_gives_the_same_verdict(learnable: Path, fmt: str):
    result = CliRunner().invoke(
        cli, ["--workdir", str(learnable), "-q", "verify-train", "--format", fmt, "--model", "mlp", "--epochs", "15"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((learnable / "verify" / "metrics.json").read_text())
    assert metrics["format"] == fmt and metrics["verdict"] == "learned"


def test_shuffled_labels_fail(tmp_path: Path, monkeypatch):
    work = _packaged(tmp_path, shuffle_labels=True, formats="pkl.gz")
    result = CliRunner().invoke(cli, ["--workdir", str(work), "-q", "verify-train", "--model", "mlp", "--epochs", "8"])
    assert result.exit_code != 0
    assert "did not learn" in result.output and "labels" in result.output
    assert json.loads((work / "verify" / "metrics.json").read_text())["verdict"] == "did not learn"
    monkeypatch.setattr(train, "build_model", _no_training)
    again = CliRunner().invoke(cli, ["--workdir", str(work), "-q", "verify-train", "--model", "mlp", "--epochs", "8"])
    assert again.exit_code != 0 and "Up to date" in again.output and "did not learn" in again.output


def _no_training(*args):
    raise AssertionError("trained again")


def test_a_rerun_with_the_same_data_and_settings_reports_the_last_verdict(tmp_path: Path, monkeypatch):
    work = _packaged(tmp_path, formats="pkl.gz")
    args = ["--workdir", str(work), "verify-train", "--model", "mlp", "--epochs", "6"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    metrics = (work / "verify" / "metrics.json").read_bytes()
    real = train.build_model
    monkeypatch.setattr(train, "build_model", _no_training)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "Up to date: verify-train (pkl.gz, model mlp" in again.output
    assert (work / "verify" / "metrics.json").read_bytes() == metrics

    # other settings, or other data, train again
    monkeypatch.setattr(train, "build_model", real)
    assert "Up to date" not in CliRunner().invoke(cli, args + ["--seed", "7"]).output
    packed = work / "dataset.pkl.gz"
    packed.write_bytes(packed.read_bytes())  # the same bytes: still up to date
    monkeypatch.setattr(train, "build_model", _no_training)
    assert "Up to date" in CliRunner().invoke(cli, args + ["--seed", "7"]).output
    (work / "verify" / "metrics.json").unlink()  # an output gone: train again
    monkeypatch.setattr(train, "build_model", real)
    assert "Up to date" not in CliRunner().invoke(cli, args + ["--seed", "7"]).output

    # packing another format leaves the data it trained on, and so its status, as they were
    assert _prep(CliRunner(), work, "pack", "--format", "h5").exit_code == 0
    assert (status.train_status(Workdir(work)).state, status.train_status(Workdir(work)).reasons) == ("up to date", [])

    # other bytes of the same data (another gzip level): trained again, and status says so first
    import gzip

    data = gzip.decompress(packed.read_bytes())
    packed.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
    assert status.train_status(Workdir(work)).reasons == ["dataset.pkl.gz changed"]
    assert "Up to date" not in CliRunner().invoke(cli, args + ["--seed", "7"]).output


def test_nothing_packaged_is_a_clear_error(tmp_path: Path):
    result = CliRunner().invoke(cli, ["--workdir", str(tmp_path), "verify-train"])
    assert result.exit_code == 1
    assert "run `prep pack` first" in result.output
    assert "Traceback" not in result.output


def test_missing_requested_format_is_a_clear_error(learnable: Path, tmp_path: Path):
    work = tmp_path / "only-pkl"
    work.mkdir()
    (work / "dataset.pkl.gz").write_bytes((learnable / "dataset.pkl.gz").read_bytes())
    result = CliRunner().invoke(cli, ["--workdir", str(work), "verify-train", "--format", "h5"])
    assert result.exit_code == 1 and "prep pack --format h5" in result.output


def test_empty_split_is_a_clear_error(tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"a": 6, "b": 6}, size=(8, 8))
    work = tmp_path / "work"
    runner = CliRunner()
    for args in (["index", str(raw)], ["resize", "--size", "8", "--workers", "1"], ["split", "--ratios", "8:2:0"],
                 ["encode"], ["pack", "--format", "pkl.gz"]):
        assert _prep(runner, work, *args).exit_code == 0
    result = runner.invoke(cli, ["--workdir", str(work), "verify-train"])
    assert result.exit_code == 1 and "test split" in result.output and "empty" in result.output


def test_verdict_needs_margin_and_significance():
    assert train.verdict(0.95, 0.1, 200, 0.2)[0]
    assert not train.verdict(0.2, 0.1, 200, 0.2)[0]  # below baseline + 20% of the headroom
    learned, required, p = train.verdict(1.0, 0.5, 4, 0.2)  # perfect, but 4 samples prove nothing
    assert not learned and required == pytest.approx(0.6) and p > 0.01


def test_model_shapes_follow_the_data():
    model = train.build_model("cnn", (32, 24, 1), 7)
    assert model.input_shape == (None, 32, 24, 1) and model.output_shape == (None, 7)
    assert [type(layer).__name__ for layer in model.layers][:3] == ["Conv2D", "Conv2D", "MaxPooling2D"]
    with pytest.raises(Exception, match="too small"):
        train.build_model("small", (2, 2, 3), 2)
