"""The resize settings: what decides the pixels and bytes of every resized file.

Kept apart from :mod:`pipeline.imaging` (numpy, Pillow, the JPEG decoder) so that the commands
that only compare settings, such as a resize with nothing to do, start without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import deflate

RESIZE_MODES = ("stretch", "crop", "pad")
INTERPOLATION_NAMES = ("bilinear", "nearest", "bicubic", "lanczos", "area", "box")
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
PNG_LEVEL = 1
# A PNG whose rows stored uncompressed fit in this many bytes takes one block of a file system
# of 4 KiB blocks (ext4, XFS, APFS and NTFS by default) however well it compresses: it is
# stored, which costs no disk space and saves the compression when writing and reading it.
PNG_STORED_MAX = 4096
# how encode_png lays out and compresses its files: part of the resize settings, so files
# another layout or another libdeflate wrote are made again (and every file matches)
PNG_ENCODING = f"sub-libdeflate{PNG_LEVEL}-stored{PNG_STORED_MAX}-{deflate.__version__}"
# bumped when a fix changes the pixels some images get: part of the resize settings too, so a
# rerun makes those files again (2: a TIFF's EXIF orientation is applied once, not twice)
TRANSFORM_REVISION = 2


@dataclass(frozen=True)
class ResizeSpec:
    """Everything that decides the output pixels; its fields make up the resize settings."""

    width: int = 32
    height: int = 32
    mode: str = "stretch"
    interpolation: str = "bilinear"
    channels: int = 3
    background: tuple[int, int, int] = (255, 255, 255)
    fill: tuple[int, int, int] = (0, 0, 0)
    max_pixels: int | None = DEFAULT_MAX_PIXELS


def parse_size(text: str) -> tuple[int, int]:
    """``"32"`` -> (32, 32); ``"64x48"`` -> (64, 48) as (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1 or max(values) > 16384:
        raise ValueError(f"expected N or WxH with whole numbers from 1 to 16384 (e.g. 32 or 64x48); received {text!r}")
    return values[0], values[1]


def parse_color(text: str) -> tuple[int, int, int]:
    """``"white"``, ``"#ff8800"`` or ``"255,136,0"`` -> an RGB tuple."""
    from PIL import ImageColor

    try:
        if "," in text:
            values = tuple(int(v) for v in text.split(","))
            if len(values) != 3 or not all(0 <= v <= 255 for v in values):
                raise ValueError
            return values  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(f"expected a colour name, #rrggbb or r,g,b; received {text!r}") from None
