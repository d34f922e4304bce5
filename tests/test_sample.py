"""`prep sample digits DIR`: scikit-learn's digits as class folders, never mixed into other images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.cli import cli


def sample(out: Path):
    return CliRunner().invoke(cli, ["sample", "digits", str(out)])


def test_digits_become_class_folders_of_their_pixels(tmp_path):
    result = sample(tmp_path / "raw")
    assert result.exit_code == 0, result.output
    digits = load_digits()
    files = sorted((tmp_path / "raw").glob("*/*.png"))
    assert len(files) == len(digits.images) == 1797
    assert {f.parent.name for f in files} == {str(d) for d in range(10)}
    for i in (0, 1, 1796):
        path = tmp_path / "raw" / str(digits.target[i]) / f"digit-{i:04d}.png"
        pixels = np.asarray(Image.open(path))
        assert (pixels == np.rint(digits.images[i] * 255 / 16)).all()


def test_it_writes_over_an_earlier_sample_and_beside_top_level_and_hidden_files(tmp_path):
    out = tmp_path / "raw"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref")
    (out / "README.md").write_text("put class folders here")
    assert sample(out).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    assert sample(out).exit_code == 0
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before


def test_it_refuses_a_folder_that_holds_other_images(tmp_path):
    out = tmp_path / "raw"
    (out / "1").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(out / "1" / "holiday.jpg")
    result = sample(out)
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {out} already holds other files (1/holiday.jpg); write the sample into a new or empty folder"
    )
    assert sorted(p.name for p in out.rglob("*")) == ["1", "holiday.jpg"]  # nothing written


def test_it_refuses_a_file(tmp_path):
    (tmp_path / "raw").write_text("not a folder")
    result = sample(tmp_path / "raw")
    assert result.exit_code == 2 and "raw' is a file" in result.output
