"""`prep sample digits`: scikit-learn's digits written as PNG files, pixel for pixel."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def test_sample_digits_writes_every_digit_as_a_png(tmp_path, prep):
    out = tmp_path / "digits"
    result = prep("sample", "digits", out)
    assert result.exit_code == 0, result.output
    assert "Wrote 1797 images in 10 classes" in result.stdout

    digits = load_digits()
    files = sorted(out.rglob("*"))
    pngs = [p for p in files if p.is_file()]
    assert len(pngs) == 1797 == len(digits.images)
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)
    for path in pngs:
        i = int(re.fullmatch(r"digit-(\d{4})\.png", path.name).group(1))
        assert path.parent.name == str(digits.target[i])
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)
            np.testing.assert_array_equal(np.asarray(img), expected[i])
    # 0 and 16 grey levels map to black and white
    assert expected.min() == 0 and expected.max() == 255

    result = prep("index", out, "--executor", "serial")
    assert result.exit_code == 0
    assert "Found 1797 images in 10 classes (skipped 0 files)" in result.stdout


def test_unknown_sample_is_refused(tmp_path, prep):
    result = prep("sample", "mnist", tmp_path / "raw")
    assert result.exit_code == 2
    assert "'mnist'" in result.stderr and not (tmp_path / "raw").exists()
