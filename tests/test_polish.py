"""The everyday polish: warnings for the usual folder mistakes, status wording, --json on stdout
only, options after the command, suggestions, codec messages kept off the terminal, and
verify-train's progress, class weights and model file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tree, write_image


def warnings_of(work: Path) -> dict[str, dict]:
    found = json.loads((work / "index.json").read_text())["warnings"]
    for warning in found:
        assert isinstance(warning["message"], str) and "\n" not in warning["message"]
    return {w["kind"]: w for w in found}


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING:")]


# -- warnings for the usual mistakes ---------------------------------------------------------


def test_a_folder_of_datasets_is_raw_one_level_too_high(prep, tmp_path: Path):
    raw = tmp_path / "raw"
    make_tree(raw / "flowers", {"rose": 12, "tulip": 12})
    make_tree(raw / "pets", {"cat": 12, "dog": 12}, seed=1)
    result = prep("index", raw)
    assert result.exit_code == 0, result.output
    lines = [line for line in warning_lines(result.stderr) if "one level too high" in line]
    assert len(lines) == 1 and f"{raw}/flowers" in lines[0]
    warning = warnings_of(tmp_path / "work")["raw_too_high"]
    assert warning["folders"] == {"flowers": ["rose", "tulip"], "pets": ["cat", "dog"]}


def test_class_folders_with_dated_subfolders_of_few_images_are_not_flagged(prep, tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12})
    make_tree(raw / "cat", {"2019": 1})  # one image in one sub-folder
    assert prep("index", raw).exit_code == 0
    assert warnings_of(tmp_path / "work") == {}


def test_a_one_image_class_is_a_small_class(prep, tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12, "owl": 1})
    result = prep("index", raw)
    assert result.exit_code == 0
    assert any("fewer than 10 images: owl (1)" in line for line in warning_lines(result.stderr)), result.stderr
    assert warnings_of(tmp_path / "work")["small_class"]["classes"] == {"owl": 1}


def test_a_five_to_one_imbalance_warns_and_pack_writes_balanced_class_weights(prep, tmp_path: Path):
    from sklearn.utils.class_weight import compute_class_weight

    raw = make_tree(tmp_path / "raw", {"many": 50, "few": 10}, size=(8, 8))
    result = prep("index", raw)
    assert any("imbalanced 5.0x" in line for line in warning_lines(result.stderr)), result.stderr
    warning = warnings_of(tmp_path / "work")["imbalance"]
    assert (warning["largest"], warning["smallest"], warning["ratio"]) == ("many", "few", 5.0)
    assert warning["class_weights"] == {"many": 0.6, "few": 3.0}
    for args in (["resize", "--size", "8", "--workers", "1"], ["split"], ["encode"], ["pack", "--format", "pkl.gz"]):
        assert prep(*args).exit_code == 0
    manifest = json.loads((tmp_path / "work" / "manifest.json").read_text())
    train = manifest["splits"]["train"]["classes"]
    labels = np.array([name for name, n in train.items() for _ in range(n)])
    expected = compute_class_weight("balanced", classes=np.array(sorted(train)), y=labels)
    assert manifest["class_weights"] == pytest.approx(dict(zip(sorted(train), expected)))


def test_a_small_image_among_large_ones_is_a_size_outlier(prep, tmp_path: Path):
    raw = tmp_path / "raw"
    for i in range(6):
        write_image(raw / "cat" / f"c{i}.png", size=(400, 400), color=(200, 10 * i, 0))
        write_image(raw / "dog" / f"d{i}.png", size=(400, 400), color=(0, 10 * i, 200))
    write_image(raw / "dog" / "tiny.png", size=(40, 40), color=(0, 0, 100))
    assert prep("index", raw).exit_code == 0
    result = prep("resize", "--workers", "1")
    assert result.exit_code == 0
    lines = [line for line in warning_lines(result.stderr) if "far from the others' size" in line]
    assert len(lines) == 1 and "dog/tiny.png, 40x40" in lines[0] and "median 400 px" in lines[0]
    warning = warnings_of(tmp_path / "work")["size_outliers"]
    assert warning["smaller"] == ["dog/tiny.png"] and warning["larger"] == []
    assert "upscaled" not in warnings_of(tmp_path / "work")


def test_images_much_smaller_than_the_size_are_upscaled_and_a_rerun_keeps_the_warning(prep, tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12}, size=(10, 10))
    assert prep("index", raw).exit_code == 0
    assert prep("resize", "--size", "16", "--workers", "1").stderr.count("WARNING") == 0  # not under half of 16
    result = prep("resize", "--size", "64", "--workers", "1")
    assert any("24 of 24 images are under half of --size 64x64" in line for line in warning_lines(result.stderr))
    assert warnings_of(tmp_path / "work")["upscaled"]["count"] == 24
    again = prep("resize", "--size", "64", "--workers", "1")  # nothing to do: still said, still recorded
    assert "Up to date" in again.stdout and "under half of --size" in again.stderr
    assert prep("index", raw).exit_code == 0  # index's own kinds are refreshed, resize's are kept...
    assert set(warnings_of(tmp_path / "work")) == {"upscaled"}


def test_an_ordinary_folder_gives_no_warning(prep, tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12})
    assert warning_lines(prep("index", raw).stderr) == []
    assert warning_lines(prep("resize", "--workers", "1").stderr) == []
    assert warnings_of(tmp_path / "work") == {}


# -- the command line ------------------------------------------------------------------------


def test_status_names_the_value_it_ran_with_the_value_now_and_where_that_comes_from(prep, tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12})
    assert prep("index", raw).exit_code == 0
    assert prep("resize", "--size", "48", "--workers", "1").exit_code == 0
    result = prep("status")
    assert "resize        stale  (size 48 when run; 32 now, from defaults)" in result.stdout.splitlines()
    (tmp_path / "prep.toml").write_text('[resize]\nsize = "40x30"\n')
    states = {s["stage"]: s for s in json.loads(prep("status", "--json").stdout)["stages"]}
    assert states["resize"]["reasons"] == ["size 48 when run; 40x30 now, from prep.toml"]


def test_json_alone_on_stdout_for_every_stage_and_options_after_the_command(tmp_path: Path, monkeypatch, prep):
    monkeypatch.chdir(tmp_path)
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12, "owl": 3})  # a warning to print, too
    work = tmp_path / "elsewhere"
    for args in (["index", raw], ["resize", "--workers", "1"], ["split", "--drop-small"], ["encode"],
                 ["pack", "--format", "pkl.gz"], ["verify"], ["status"]):
        result = prep(*args, "--json", "-v", "--workdir", work, workdir=None)
        assert result.exit_code == 0, result.output
        assert isinstance(json.loads(result.stdout), dict), result.stdout  # one JSON document, nothing else
        assert result.stderr.strip(), "the human messages went to stderr"
    assert (work / "manifest.json").exists() and not (tmp_path / "processed").exists()


def test_global_options_after_the_command(prep, tmp_path: Path):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12})
    result = prep("index", raw, "--workdir", tmp_path / "w", "-q", workdir=None)
    assert result.exit_code == 0 and result.output == ""
    assert (tmp_path / "w" / "labels.csv").exists()
    # after the command, it wins over the one before it, as a later flag does
    assert prep("resize", "--workers", "1", "--workdir=" + str(tmp_path / "w")).exit_code == 0
    assert (tmp_path / "w" / "resized.csv").exists() and not (tmp_path / "work").exists()


def test_a_mistyped_option_suggests_the_commands_own(prep):
    result = prep("resize", "--sise", "48")
    assert result.exit_code == 2
    assert "No such option '--sise'. Did you mean '--size'?" in result.stderr
    assert "--quiet" not in result.stderr


# -- codec messages --------------------------------------------------------------------------


def broken_fax_tiff() -> bytes:
    """A CCITT Group 4 TIFF whose coded data is damaged: libtiff says "Bad code word" (to stderr,
    by itself) and Pillow still returns an image."""
    bits = np.random.default_rng(0).random((64, 64)) > 0.5
    buffer = io.BytesIO()
    Image.fromarray(bits).convert("1").save(buffer, "TIFF", compression="group4")
    data = bytearray(buffer.getvalue())
    for i in range(8, 300, 3):
        data[i] ^= 0x5A
    return bytes(data)


def test_the_transform_returns_libtiffs_messages_instead_of_printing_them(capfd):
    from pipeline import imaging
    from pipeline.spec import ResizeSpec

    _, info = imaging.transform(broken_fax_tiff(), ResizeSpec())
    assert any("Bad code word" in m for m in info.messages), info.messages
    assert "Bad code word" not in capfd.readouterr().err


@pytest.mark.parametrize("workers", ["1", "2"])  # this process, and worker processes
def test_libtiff_messages_reach_the_terminal_only_with_verbose(tmp_path: Path, workers: str):
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12})
    (raw / "cat" / "fax.tif").write_bytes(broken_fax_tiff())

    def prep(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        command = [sys.executable, "-m", "pipeline", "--workdir", str(tmp_path / "work"), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=True)

    prep("index", str(raw))
    quiet = prep("resize", "--workers", workers)
    assert "Bad code word" not in quiet.stderr + quiet.stdout, quiet.stderr
    assert "Fax4Decode" not in quiet.stderr
    verbose = prep("resize", "--workers", workers, "--size", "16", "-v")
    lines = [line for line in verbose.stderr.splitlines() if "Bad code word" in line]
    assert lines and all(line.startswith("INFO: cat/fax.tif: Fax4Decode: ") for line in lines), verbose.stderr


# -- verify-train ----------------------------------------------------------------------------


def test_verify_train_keeps_the_model_only_when_asked_and_uses_balanced_class_weights(prep, tmp_path: Path):
    pytest.importorskip("tensorflow")
    raw = make_tree(tmp_path / "raw", {"many": 50, "few": 10}, size=(8, 8))
    for args in (["index", raw], ["resize", "--size", "8", "--workers", "1"], ["split"], ["encode"],
                 ["pack", "--format", "pkl.gz"]):
        assert prep(*args).exit_code == 0
    work, train = tmp_path / "work", ["verify-train", "--model", "mlp", "--epochs", "1", "--margin", "0"]

    first = prep(*train, "--class-weight", "balanced", "-v")
    assert (work / "verify" / "metrics.json").exists() and not (work / "verify" / "model.keras").exists()
    assert "epoch 1/1: " in first.stderr and "Epoch" not in first.stdout  # the epoch, logged with -v
    manifest = json.loads((work / "manifest.json").read_text())
    metrics = json.loads((work / "verify" / "metrics.json").read_text())
    assert metrics["class_weights"] == manifest["class_weights"] == {"many": 0.6, "few": 3.0}

    second = prep(*train, "--save-model")  # the same run, but its model is wanted: trained again
    assert "Up to date" not in second.output and "epoch 1/1:" not in second.output
    assert (work / "verify" / "model.keras").stat().st_size > 0
    assert json.loads((work / "verify" / "metrics.json").read_text())["class_weights"] is None
