"""`prep sample digits DIR`: write a small real dataset that ships with scikit-learn.

The 1,797 handwritten digits of scikit-learn's ``load_digits`` (8x8, 17 grey levels) become
PNG files in ``DIR/<digit>/digit-NNNN.png``. No network is needed.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from .. import workdir
from ..errors import PrepError

SAMPLES = ("digits",)


@dataclass
class SampleResult:
    out: Path
    images: int
    classes: int

    @property
    def summary(self) -> str:
        return f"Wrote {self.images} images in {self.classes} classes to {self.out}"


def run(name: str, out: Path) -> SampleResult:
    if name not in SAMPLES:
        raise PrepError(f"unknown sample {name!r}; expected one of {', '.join(SAMPLES)}")
    _refuse_other_images(out)
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 grey levels -> 0..255 (light ink on black, as in MNIST)
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    for i, (image, target) in enumerate(zip(pixels, digits.target)):
        folder = out / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image, "L").save(buffer, format="PNG")
        workdir.atomic_write_bytes(folder / f"digit-{i:04d}.png", buffer.getvalue(), fsync=False)
    return SampleResult(out, len(pixels), len(set(digits.target.tolist())))


_SAMPLE_FILE = re.compile(r"digit-[0-9]{4}\.png")


def _refuse_other_images(out: Path) -> None:
    """The sample goes into a new or empty folder, or over an earlier sample: never among a
    user's images, where its classes would mix with theirs."""
    for path in sorted(out.glob("*/**/*")) if out.is_dir() else ():
        rel = path.relative_to(out)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if not (path.is_file() and _SAMPLE_FILE.fullmatch(path.name)):
            raise PrepError(
                f"{out} already holds other files ({rel.as_posix()});"
                f" write the sample into a new or empty folder"
            )
