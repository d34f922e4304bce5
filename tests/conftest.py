"""Shared fixtures: real image files generated on the fly (no checked-in binaries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB", fmt=None) -> Path:
    """Write a real image file; ``color`` fills it, a little noise keeps hashes distinct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(path, format=fmt)
    return path


def make_tree(root: Path, classes: dict[str, int], size=(24, 20), seed: int = 0) -> Path:
    """``root/<class>/img<i>.png`` with distinct pixel content per file and a colour per class."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220)]
    for c, (label, n) in enumerate(classes.items()):
        for i in range(n):
            base = np.array(palette[c % len(palette)], dtype=np.int16)
            noise = rng.integers(-20, 20, size=(size[1], size[0], 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            path = root / label / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, "RGB").save(path)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "raw", {"cat": 12, "dog": 10, "bird": 8})
