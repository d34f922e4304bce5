"""The pure per-image transform: encoded bytes in, a fixed-size 8-bit image (or a reason) out.

Nothing here knows about files, folders or workers. :func:`transform` decodes once, applies
EXIF orientation, converts any Pillow mode to 8-bit RGB (or L) correctly, and resizes;
every problem with the image raises :class:`Rejected` with a one-line reason.

Mode rules (documented in the README):

* ``1``, ``L``, ``P`` and ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversions.
* Anything with alpha (``LA``, ``PA``, ``RGBA``, ``P``/``L``/``RGB`` with a transparent colour):
  composited over ``background``.
* ``I;16*``: 16-bit, scaled to 8-bit (``round(v * 255 / 65535)``), never clipped.
* ``I``: clipped to 0..65535 then scaled as 16-bit.
* ``F``: values in 0..1 are scaled by 255; otherwise clipped to 0..255.
* Animated images: the first frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator

import deflate
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from .nearcopy import perceptual_hashes
from .spec import DEFAULT_MAX_PIXELS, PNG_LEVEL, PNG_STORED_MAX, ResizeSpec, parse_color, parse_size  # noqa: F401  (imaging.X for callers)

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "TIFF", "WEBP"})
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}
_REDUCING_GAP = 3.0  # Pillow: >= 3 is indistinguishable from a full resample
_ORIENTATION = 0x0112  # the EXIF tag
_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Rejected(Exception):
    """The image cannot be used; ``str(err)`` is the reason recorded in rejected.csv, and
    ``messages`` what the codecs said meanwhile (see :func:`transform`)."""

    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceInfo:
    """What the source was, for reports: its format and mode, and its size upright (after
    its EXIF orientation, as a viewer shows it) and before any resizing; and the perceptual
    hashes of that upright 8-bit image, for finding near copies (:mod:`pipeline.nearcopy`); and
    what the codecs said while decoding it (see :func:`transform`)."""

    format: str
    mode: str
    width: int
    height: int
    phash8: str = ""
    phash16: str = ""
    messages: tuple[str, ...] = ()


def transform(data: bytes, spec: ResizeSpec) -> tuple[Image.Image, SourceInfo]:
    """Decode ``data`` once and return the resized 8-bit image (mode RGB or L) and source info.

    What the codecs say about what they work around (libtiff's warnings and errors, Pillow's
    warnings: corrupt EXIF, odd TIFF tags, bad code words) is not written anywhere: it comes back
    in ``info.messages``, or the Rejected error's ``messages``, for the caller to log with the file.
    """
    messages: list[str] = []
    try:
        with _codec_messages(messages):
            img, info = _transform(data, spec)
    except Rejected as err:
        err.messages = tuple(messages)
        raise
    return img, dataclasses.replace(info, messages=tuple(messages))


def _transform(data: bytes, spec: ResizeSpec) -> tuple[Image.Image, SourceInfo]:
    if not data:
        raise Rejected("empty file (0 bytes)")
    with warnings.catch_warnings(), _pixel_limit(spec.max_pixels):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        decoded = _decode_plain_jpeg(data, spec)
        img, info = decoded[:2] if decoded else _open_with_pillow(data, spec)
        try:
            orientation = decoded[2] if decoded else _load_with_pillow(img, spec)
            if orientation in _TRANSPOSE:  # as ImageOps.exif_transpose, without its metadata work
                img = img.transpose(_TRANSPOSE[orientation])
                if orientation >= 5:  # turned by 90 degrees: the size as a viewer shows it
                    info = SourceInfo(info.format, info.mode, info.height, info.width)
            img = _to_8bit(img, spec)
            # a JPEG decoded at a reduced scale (draft) is hashed at that scale: a full decode
            # would cost more than the rest of the transform
            phash8, phash16 = perceptual_hashes(img)
            info = dataclasses.replace(info, phash8=phash8, phash16=phash16)
            img = _resize(img, spec)
        except Rejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise Rejected(_bomb_reason(err, spec)) from None
        except Exception as err:
            raise Rejected(f"corrupt or truncated image data: {_one_line(err)}") from None
    return img, info


def _open_with_pillow(data: bytes, spec: ResizeSpec) -> tuple[Image.Image, SourceInfo]:
    """The image Pillow opens (not yet decoded) and what it is; Rejected if it cannot or may not."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected("not an image Pillow can read (unknown or corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected(_bomb_reason(err, spec)) from None
    except Exception as err:  # Pillow raises many types for malformed headers
        raise Rejected(f"cannot open image: {_one_line(err)}") from None
    if img.format not in SUPPORTED_FORMATS:
        raise Rejected(f"unsupported format {img.format} (expected {', '.join(sorted(SUPPORTED_FORMATS))})")
    return img, SourceInfo(img.format, img.mode, img.width, img.height)


def _load_with_pillow(img: Image.Image, spec: ResizeSpec) -> int:
    """Decode an opened image (a JPEG at its draft scale) and return the EXIF orientation
    still to apply: Pillow applies a TIFF's itself as it loads it, and then drops the tag."""
    if img.format in ("JPEG", "MPO"):
        orientation = img.getexif().get(_ORIENTATION, 1)  # EXIF, else XMP; cached by Pillow
        scale = _draft_scale(img.width, img.height, orientation, spec)
        if scale > 1:
            img.draft(img.mode, (img.width // scale, img.height // scale))
    img.load()
    return img.getexif().get(_ORIENTATION, 1)


def to_array(img: Image.Image) -> np.ndarray:
    """An (H, W, C) uint8 array of an RGB or L image."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode_png(img: Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes of an RGB or L image.

    A standard 8-bit grey or RGB PNG with one IDAT and no ancillary chunks (so no timestamps).
    Its rows are stored uncompressed (filter None) when the file then fits in
    :data:`PNG_STORED_MAX` bytes, one block on disk whatever its compression: a 32x32 RGB image
    takes 3,172 bytes so, against about 2,300 compressed. Larger images have the Sub filter on
    every row, deflated by libdeflate at level 1.

    Written here, not by Pillow: for dataset-sized images Pillow's encoder (Python set-up,
    adaptive filters, zlib level 6) costs several times as much. libdeflate level 1 is three
    times as fast as zlib's level 1 and writes smaller files; like zlib, and unlike ISA-L, it
    gives the same bytes for the same input in every process.
    """
    if img.mode not in _PNG_MODES:
        raise ValueError(f"encode_png takes an L or RGB image (what transform returns); received mode {img.mode}")
    channels, colour = _PNG_MODES[img.mode]
    width, height = img.size
    flat = np.frombuffer(img.tobytes(), np.uint8).reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), np.uint8)
    if rows.size + _STORED_OVERHEAD <= PNG_STORED_MAX:
        rows[:, 0] = _PNG_NONE
        rows[:, 1:] = flat
        idat = deflate.zlib_compress(rows, 0)  # level 0: stored blocks
    else:
        rows[:, 0] = _PNG_SUB
        rows[:, 1 : channels + 1] = flat[:, :channels]
        np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, channels + 1 :])  # wraps mod 256
        idat = deflate.zlib_compress(rows, PNG_LEVEL)
    crc = zlib.crc32(idat, _IDAT_CRC)
    return b"".join((_png_head(width, height, colour), struct.pack(">I", len(idat)), b"IDAT", idat, struct.pack(">I", crc), _IEND))


def decode_png(data: bytes) -> np.ndarray:
    """The (H, W, C) uint8 pixels of an 8-bit L or RGB PNG; ValueError for anything else.

    PNGs laid out as :func:`encode_png` writes them are decoded here directly (a fifth of
    Pillow's time); any other PNG goes through Pillow.
    """
    pixels = _decode_own_png(data)
    if pixels is not None:
        return pixels
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG" or img.mode not in ("L", "RGB"):
                raise ValueError(f"expected an 8-bit L or RGB PNG, found {img.format} {img.mode}")
            return to_array(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"not a readable PNG ({err})") from None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {"L": (1, 0), "RGB": (3, 2)}  # Pillow mode -> (channels, PNG colour type: grey, truecolour)
_PNG_CHANNELS = {colour: channels for channels, colour in _PNG_MODES.values()}
_PNG_NONE = 0  # the row filter types: the bytes as they are,
_PNG_SUB = 1  # or each byte minus the one a pixel to its left
# a stored PNG's bytes besides its rows: signature, IHDR, IDAT and IEND chunks (57), the zlib
# header and checksum (6) and one stored block's header (5; its rows are under 64 KiB)
_STORED_OVERHEAD = 68


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.lru_cache(maxsize=64)  # one size per run
def _png_head(width: int, height: int, colour: int) -> bytes:
    """The signature and IHDR chunk of an 8-bit PNG of this size and colour type."""
    return _PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))


_IEND = _chunk(b"IEND", b"")
_IHDR = struct.Struct(">I4sIIBBBBBI")  # length, type, then IHDR's fields, then its CRC
_IDAT_HEAD = struct.Struct(">I4s")
_MAX_INFLATE = 1032  # deflate expands a byte into at most this many
_IDAT_CRC = zlib.crc32(b"IDAT")  # a chunk's CRC covers its type, then its data


def _decode_own_png(data: bytes) -> np.ndarray | None:
    """Pixels of a PNG laid out as :func:`encode_png` writes it: 8-bit, non-interlaced grey or
    RGB, one IDAT, no other chunk, every row filtered None or every row Sub. None for any other
    PNG, or a damaged one (Pillow then says why)."""
    if len(data) < 57 or not data.startswith(_PNG_SIGNATURE) or not data.endswith(_IEND):
        return None
    length, kind, width, height, depth, colour, compression, filtering, interlace, crc = _IHDR.unpack_from(data, 8)
    channels = _PNG_CHANNELS.get(colour)
    if kind != b"IHDR" or length != 13 or crc != zlib.crc32(data[12:29]) or channels is None or depth != 8:
        return None
    if compression or filtering or interlace or not width or not height:
        return None
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return None  # Pillow's decompression-bomb check decides
    length, kind = _IDAT_HEAD.unpack_from(data, 33)
    end = 41 + length
    if kind != b"IDAT" or end + 16 != len(data):
        return None
    body = memoryview(data)[41:end]
    stride = width * channels + 1  # a row: its filter byte, then its pixels
    size = height * stride
    if size > _MAX_INFLATE * length:  # more than the data can inflate to: a forged header
        return None
    if int.from_bytes(data[end : end + 4], "big") != zlib.crc32(body, _IDAT_CRC):
        return None
    try:  # the stream's own checksum is checked too
        raw = deflate.zlib_decompress(body, size)
    except deflate.DeflateError:
        return None
    if len(raw) != size:
        return None
    pixels = np.frombuffer(raw, np.uint8).reshape(height, stride)[:, 1:].reshape(height, width, channels)
    filters = raw[::stride]  # each row's first byte
    if filters.count(_PNG_SUB) == height:
        return np.cumsum(pixels, axis=1, dtype=np.uint8)  # undo Sub, mod 256
    if filters.count(_PNG_NONE) == height:
        return pixels.copy()
    return None


# -- codec messages -------------------------------------------------------------------------

_libtiff_messages: list[str] | None = None  # where libtiff's handler puts messages (None: nowhere)


@contextlib.contextmanager
def _codec_messages(into: list[str]) -> Iterator[None]:
    """Collect into ``into`` what the codecs say while the block runs: Pillow's warnings, and
    libtiff's warnings and errors, which libtiff writes to stderr itself unless given a handler
    (Pillow sets none): the C library's text would land between prep's lines and bars."""
    global _libtiff_messages

    _capture_libtiff()
    _libtiff_messages = into
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                into.extend(_one_line(w.message) for w in caught)
    finally:
        _libtiff_messages = None


@functools.cache
def _capture_libtiff() -> bool:
    """Hand libtiff (the one Pillow uses) a warning and error handler that keeps the messages in
    :data:`_libtiff_messages`; once per process. False where that library or C's vsnprintf
    cannot be found (libtiff then writes to stderr, as without prep)."""
    import ctypes

    path = _libtiff_path()
    try:
        libtiff = ctypes.CDLL(path) if path else None
        libc = ctypes.CDLL(None)
        vsnprintf = libc.vsnprintf
    except (OSError, AttributeError, TypeError):
        return False
    if libtiff is None or not hasattr(libtiff, "TIFFSetWarningHandler"):
        return False
    # void handler(const char *module, const char *fmt, va_list ap): va_list reaches C code as
    # a pointer on the x86-64 and ARM64 ABIs, so it is handed on to vsnprintf as one
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def handler(module, fmt, args):
        if _libtiff_messages is None:  # libtiff used outside transform: not prep's to show
            return
        text = ctypes.create_string_buffer(512)
        vsnprintf(text, len(text), fmt, args)
        prefix = f"{module.decode(errors='replace')}: " if module else ""
        _libtiff_messages.append(prefix + text.value.decode(errors="replace").strip())

    callback = handler_type(handler)
    for name in ("TIFFSetWarningHandler", "TIFFSetErrorHandler"):
        setter = getattr(libtiff, name)
        setter.argtypes, setter.restype = [handler_type], ctypes.c_void_p
        setter(callback)
    _capture_libtiff.callback = callback  # type: ignore[attr-defined]  # alive as long as libtiff may call it
    return True


def _libtiff_path() -> str | None:
    """The libtiff Pillow's _imaging module loaded (a wheel bundles its own), else the system's."""
    import ctypes.util
    import glob
    import os

    from PIL import _imaging

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:  # Linux: what is loaded
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith("libtiff"):
                    return path
    except OSError:
        pass
    here = os.path.dirname(_imaging.__file__)
    for pattern in (".dylibs/libtiff*", "../pillow.libs/libtiff*"):  # macOS and Linux wheels
        found = sorted(glob.glob(os.path.join(here, pattern)))
        if found:
            return found[0]
    return ctypes.util.find_library("tiff")


# -- steps ----------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextlib.contextmanager
def _pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit for one call; it is a module global, so put it back."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bomb_reason(err: BaseException, spec: ResizeSpec) -> str:
    # Pillow's message names its own threshold, which is twice the limit for the error it
    # raises; name the limit the user set instead.
    size = re.search(r"\(\d+ pixels\)", str(err))
    found = f" {size.group(0)}" if size else ""
    return f"decompression bomb: image size{found} exceeds --max-pixels {spec.max_pixels:,}"


def _draft_scale(width: int, height: int, orientation: int, spec: ResizeSpec) -> int:
    """1, 2, 4 or 8: how much the JPEG decoder may downscale in the DCT domain, keeping at
    least twice the target size (the margin of Image.thumbnail); the scale Pillow's ``draft``
    picks for that size."""
    if spec.interpolation == "nearest":
        return 1
    want_w, want_h = spec.width * 2, spec.height * 2
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: swap axes
        want_w, want_h = want_h, want_w
    if width < 2 * want_w or height < 2 * want_h:
        return 1
    most = min(width // want_w, height // want_h)
    return next(s for s in (8, 4, 2, 1) if most >= s)


def _decode_plain_jpeg(data: bytes, spec: ResizeSpec) -> tuple[Image.Image, SourceInfo, int] | None:
    """(image, source info, EXIF orientation) of a plain 8-bit grey or colour JPEG, decoded by
    libjpeg-turbo through simplejpeg; None for anything else, and for any JPEG it does not
    decode cleanly: Pillow then decides, as for every other image.

    Pillow decodes with libjpeg-turbo too (its own build), here at the same scale and with the
    same settings as its ``draft``, so the pixels are the same (tested against Pillow), in four
    fifths of the time: Pillow parses the JPEG markers in Python first.
    """
    header = _jpeg_header(data)
    if header is None:
        return None
    width, height, components, orientation = header
    if spec.max_pixels is not None and width * height > spec.max_pixels:
        return None  # Pillow's decompression-bomb check says why
    scale = _draft_scale(width, height, orientation, spec)
    out_w, out_h = -(-width // scale), -(-height // scale)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, "GRAY" if components == 1 else "RGB", min_height=out_h, min_width=out_w, min_factor=scale
        )
    except Exception:  # ValueError for a warning (corrupt data) or an error: Pillow's judgement stands
        return None
    if pixels.shape != (out_h, out_w, components):
        return None
    mode = "L" if components == 1 else "RGB"
    img = Image.frombuffer(mode, (out_w, out_h), pixels, "raw", mode, 0, 1)  # as fromarray does, with less around it
    return img, SourceInfo("JPEG", mode, width, height), orientation


_XMP = b"http://ns.adobe.com/xap/1.0/\0"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's own pattern (Image.getexif)


def _jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, orientation) of a baseline, extended or progressive 8-bit
    JPEG with 1 or 3 components, read from its markers; None for anything else, or anything
    Pillow might read otherwise (MPO, several EXIF or XMP blocks, an EXIF block it cannot parse).

    The orientation is found where Pillow looks: the EXIF block's tag, else the XMP block's
    ``tiff:Orientation``."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end = 2, len(data)
    frame, exif, xmp = None, None, None
    while True:
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the image data follows
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            if marker not in (0xC0, 0xC1, 0xC2) or frame is not None or len(segment) < 6 or segment[0] != 8:
                return None
            frame = (int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"), segment[5])
        elif marker == 0xE1 and segment.startswith(b"Exif\0\0"):
            if exif is not None:
                return None  # Pillow joins them
            exif = segment
        elif marker == 0xE1 and segment.startswith(_XMP):
            if xmp is not None:
                return None  # Pillow keeps the last
            xmp = segment[len(_XMP) :]
        elif marker == 0xE2 and segment.startswith(b"MPF\0"):
            return None  # Pillow opens it as MPO
        pos += 2 + length
    if frame is None or frame[2] not in (1, 3) or not frame[0] or not frame[1]:
        return None
    if exif is None and xmp is None:
        return (*frame, 1)
    tags = Image.Exif()
    if exif is not None:
        try:
            tags.load(exif)
        except Exception:  # Pillow fails on it too, and says why
            return None
    if _ORIENTATION in tags:
        orientation = tags[_ORIENTATION]
    else:
        found = _XMP_ORIENTATION.search(xmp) if xmp is not None else None
        orientation = int(found[2]) if found else 1
    if not isinstance(orientation, int):
        return None
    return (*frame, orientation)


def _to_8bit(img: Image.Image, spec: ResizeSpec) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB or L, alpha composited over the background."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535)
        img = Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "1":
        img = img.convert("L")
    elif mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        img = _composite(img.convert("RGBA"), spec.background)
    elif mode not in ("L", "RGB"):
        img = img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX
    target = "L" if spec.channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _resize(img: Image.Image, spec: ResizeSpec) -> Image.Image:
    size = (spec.width, spec.height)
    resample = INTERPOLATIONS[spec.interpolation]
    if spec.mode == "stretch":
        return _scaled(img, size, resample)
    if spec.mode == "crop":
        box = _centre_box(img.size, size)
        return _scaled(img, size, resample, box)
    if spec.mode == "pad":
        scale = min(spec.width / img.width, spec.height / img.height)
        inner = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        content = _scaled(img, inner, resample)
        fill = spec.fill if img.mode == "RGB" else _luma(spec.fill)
        canvas = Image.new(img.mode, size, fill)
        canvas.paste(content, ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2))
        return canvas
    raise ValueError(f"unknown resize mode {spec.mode!r}")


def _scaled(img: Image.Image, size, resample, box=None) -> Image.Image:
    if img.size == size and box is None:
        return img.copy()
    source_w = (box[2] - box[0]) if box else img.width
    gap = _REDUCING_GAP if source_w >= _REDUCING_GAP * size[0] and resample != Image.Resampling.NEAREST else None
    return img.resize(size, resample, box=box, reducing_gap=gap)


def _centre_box(source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float, float, float]:
    """The largest centred box of the target's aspect ratio inside the source."""
    sw, sh = source
    tw, th = target
    if sw * th > sh * tw:  # source wider than target: crop the sides
        w = sh * tw / th
        left = (sw - w) / 2
        return (left, 0.0, left + w, float(sh))
    h = sw * th / tw
    top = (sh - h) / 2
    return (0.0, top, float(sw), top + h)


def _luma(rgb: tuple[int, int, int]) -> int:
    r, g, b = rgb
    return (r * 299 + g * 587 + b * 114 + 500) // 1000
