"""The per-image transform: every kind of input to the right 8-bit pixels, or a reason."""

from __future__ import annotations

import io
import re
import os
import struct
import tracemalloc
import warnings
import zlib

import deflate
import numpy as np
import pytest
from PIL import Image

from pipeline import imaging, spec
from pipeline.imaging import Rejected, ResizeSpec

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pixels(data: bytes, **spec) -> np.ndarray:
    img, _ = imaging.transform(data, ResizeSpec(**spec))
    return imaging.to_array(img).astype(int)


def quadrants(width: int, height: int) -> np.ndarray:
    """An (H, W, 3) image: red, green / blue, white quadrants, so every flip and turn shows."""
    arr = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    arr[:h, :w], arr[:h, w:], arr[h:, :w], arr[h:, w:] = RED, GREEN, BLUE, WHITE
    return arr


def quadrant_means(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[0] // 2, arr.shape[1] // 2
    # the centre of each quadrant, away from JPEG and resampling blur at the borders
    return np.array([
        arr[y0 + h // 4: y0 + 3 * h // 4, x0 + w // 4: x0 + 3 * w // 4].reshape(-1, arr.shape[2]).mean(0)
        for y0 in (0, h) for x0 in (0, w)
    ])


# EXIF orientation -> what a viewer shows, written independently of Pillow
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


ORIENTABLE = {  # every format whose files carry an EXIF orientation, as Pillow writes it
    "jpeg": ("JPEG", {"quality": 95}),
    "png": ("PNG", {}),
    "webp": ("WEBP", {"lossless": True}),
    "tiff": ("TIFF", {}),
    "tiff-deflate": ("TIFF", {"compression": "tiff_adobe_deflate"}),  # decoded by libtiff
}


@pytest.mark.parametrize("fmt", sorted(ORIENTABLE))
@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied_once(orientation, fmt):
    stored = quadrants(160, 96)
    exif = Image.Exif()
    exif[0x0112] = orientation
    name, options = ORIENTABLE[fmt]
    data = encode(Image.fromarray(stored), name, exif=exif, **options)
    expected = ORIENTED[orientation](stored)
    height, width = expected.shape[:2]
    img, info = imaging.transform(data, ResizeSpec(width=width // 4, height=height // 4))
    out = imaging.to_array(img).astype(int)
    assert out.shape == (height // 4, width // 4, 3)
    assert np.abs(quadrant_means(out) - quadrant_means(expected)).max() < 20
    assert (info.width, info.height) == (width, height)  # the source's size upright, in every format


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: what a JPEG encoder sees in a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width), y * 255 // max(1, height), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


PLAIN_JPEGS = [  # (width, height, mode, save options, EXIF orientation)
    (640, 427, "RGB", {"quality": 90}, 1),
    (427, 640, "RGB", {"quality": 75, "subsampling": 0}, 6),
    (300, 301, "RGB", {"progressive": True, "subsampling": 1}, 3),
    (129, 700, "L", {"quality": 95}, 8),
    (1000, 70, "RGB", {"subsampling": 2}, 5),
    (63, 64, "RGB", {}, 1),
    (7, 3, "L", {"progressive": True}, 2),
    (1, 1, "RGB", {}, 1),
]
SPECS = [
    ResizeSpec(),
    ResizeSpec(width=48, height=16, interpolation="bicubic"),  # not square: a turned image drafts the other way
    ResizeSpec(width=64, height=48, mode="crop", interpolation="nearest"),
    ResizeSpec(width=16, height=16, mode="pad", channels=1, interpolation="lanczos"),
]


@pytest.mark.parametrize("spec", SPECS, ids=["stretch", "wide-bicubic", "crop-nearest", "pad-grey"])
@pytest.mark.parametrize("width, height, mode, options, orientation", PLAIN_JPEGS)
def test_plain_jpegs_give_the_pixels_pillow_gives(monkeypatch, spec, width, height, mode, options, orientation):
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    img = Image.fromarray(photo_like(width, height, seed=width * height)).convert(mode)
    data = encode(img, "JPEG", exif=exif, **options)
    assert imaging._decode_plain_jpeg(data, spec) is not None  # the fast decoder takes it
    fast, fast_info = imaging.transform(data, spec)
    monkeypatch.setattr(imaging, "_decode_plain_jpeg", lambda data, spec: None)
    slow, slow_info = imaging.transform(data, spec)
    assert (fast.mode, fast.size, fast_info) == (slow.mode, slow.size, slow_info)
    assert fast.tobytes() == slow.tobytes()


def _xmp_orientation(orientation: int) -> bytes:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def test_xmp_orientation_is_read_as_pillow_reads_it(monkeypatch):
    stored = quadrants(160, 96)
    exif = Image.Exif()
    exif[0x0112] = 3
    cases = {  # the EXIF tag wins over XMP; XMP alone counts
        "xmp": (encode(Image.fromarray(stored), "JPEG", xmp=_xmp_orientation(6)), 6),
        "exif and xmp": (encode(Image.fromarray(stored), "JPEG", exif=exif, xmp=_xmp_orientation(6)), 3),
    }
    for name, (data, orientation) in cases.items():
        assert imaging._jpeg_header(data) == (160, 96, 3, orientation), name
        fast, _ = imaging.transform(data, ResizeSpec(width=24, height=40))
        with monkeypatch.context() as patched:
            patched.setattr(imaging, "_decode_plain_jpeg", lambda data, spec: None)
            slow, _ = imaging.transform(data, ResizeSpec(width=24, height=40))
        assert fast.tobytes() == slow.tobytes(), name
    turned = pixels(cases["xmp"][0], width=24, height=40)
    assert np.abs(quadrant_means(turned) - quadrant_means(ORIENTED[6](stored)[::4, ::4])).max() < 20


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def test_jpeg_header_reads_markers_as_the_standard_lays_them_out():
    data = encode(Image.fromarray(photo_like(40, 30, seed=2)), "JPEG")
    assert imaging._jpeg_header(data) == (40, 30, 3, 1)
    soi, rest = data[:2], data[2:]
    sof = rest.index(b"\xff\xc0")
    exif = Image.Exif()
    exif[0x0112] = 8
    cases = {
        "fill bytes": (soi + b"\xff\xff\xff" + rest, (40, 30, 3, 1)),
        "an empty comment": (soi + _segment(0xFE, b"") + rest, (40, 30, 3, 1)),
        "another APP1 block": (soi + _segment(0xE1, b"http://ns.adobe.com/xmp/extension/\0x") + rest, (40, 30, 3, 1)),
        "exif": (soi + _segment(0xE1, b"Exif\0\0" + exif.tobytes()) + rest, (40, 30, 3, 8)),
        "two exif blocks": (soi + _segment(0xE1, b"Exif\0\0" + exif.tobytes()) * 2 + rest, None),
        "two frames": (soi + rest[sof:].split(b"\xff\xda")[0][: 2 + int.from_bytes(rest[sof + 2 : sof + 4], "big")] + rest, None),
        "a restart marker before the scan": (soi + b"\xff\xd0" + rest, None),
        "height 0 (set by a later DNL)": (soi + rest[: sof + 5] + b"\0\0" + rest[sof + 7 :], None),
        "a cut segment": (soi + rest[: sof + 6], None),
        "not a JPEG": (b"\x89PNG" + rest, None),
        "12-bit samples": (soi + rest[: sof + 4] + b"\x0c" + rest[sof + 5 :], None),
    }
    for name, (variant, expected) in cases.items():
        assert imaging._jpeg_header(variant) == expected, name


def test_jpegs_pillow_reads_its_own_way_are_left_to_pillow():
    stored = quadrants(160, 96)
    second = Image.fromarray(quadrants(80, 48))
    whole = encode(Image.fromarray(photo_like(160, 96, seed=1)), "JPEG")
    cases = {
        "cmyk": encode(Image.fromarray(stored).convert("CMYK"), "JPEG"),
        "mpo": encode(Image.fromarray(stored), "MPO", save_all=True, append_images=[second]),
        "truncated": whole[: len(whole) // 2],
        "two xmp blocks": whole[:2] + (_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + _xmp_orientation(6))) * 2 + whole[2:],
    }
    for name, data in cases.items():
        assert imaging._decode_plain_jpeg(data, ResizeSpec()) is None, name
    assert imaging.transform(cases["cmyk"], ResizeSpec())[1].mode == "CMYK"
    assert imaging.transform(cases["mpo"], ResizeSpec())[1].format == "MPO"
    with pytest.raises(Rejected, match="truncated"):
        imaging.transform(cases["truncated"], ResizeSpec())


def test_16_bit_gradient_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    img = Image.fromarray(np.tile(ramp, (4, 1)))
    assert img.mode == "I;16"
    out = pixels(encode(img, "PNG"), width=256, height=4, channels=1)[0, :, 0]
    expected = np.rint(ramp.astype(np.int64) * 255 / 65535)
    assert out.max() == 255 and out.min() == 0
    np.testing.assert_allclose(out, expected, atol=1)
    assert np.all(np.diff(out) >= 0)
    assert abs(out[128] - 128) <= 1  # mid-grey stays mid-grey


def test_16_bit_big_endian_tiff():
    arr = np.full((4, 4), 32768, np.uint16)
    img = Image.frombytes("I;16B", (4, 4), arr.astype(">u2").tobytes())
    out = pixels(encode(img, "TIFF"), width=4, height=4, channels=1)
    assert np.all(np.abs(out - 128) <= 1)


def test_palette_with_transparency_becomes_the_background():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, *RED, *GREEN] + [0] * (256 - 3) * 3)
    for x in range(4):
        for y in range(8):
            img.putpixel((x, y), 0)  # left half: palette entry 0, marked transparent
    data = encode(img, "PNG", transparency=0)
    out = pixels(data, width=8, height=8, interpolation="nearest")
    assert (out[:, :4] == WHITE).all() and (out[:, 4:] == RED).all()
    out = pixels(data, width=8, height=8, interpolation="nearest", background=BLUE)
    assert (out[:, :4] == BLUE).all() and (out[:, 4:] == RED).all()


def test_palette_without_transparency_keeps_its_colours():
    img = Image.new("P", (4, 4), 2)
    img.putpalette([0, 0, 0, *RED, *GREEN] + [0] * (256 - 3) * 3)
    assert (pixels(encode(img, "PNG"), width=4, height=4) == GREEN).all()


@pytest.mark.parametrize("mode, opaque, clear", [("LA", (90, 255), (200, 0)), ("RGBA", (*GREEN, 255), (*RED, 0))])
def test_alpha_is_composited_over_the_background(mode, opaque, clear):
    img = Image.new(mode, (8, 8), clear)
    img.paste(Image.new(mode, (4, 8), opaque), (4, 0))
    half = Image.new(mode, (8, 1), opaque[:-1] + (128,))
    img.paste(half, (0, 7))
    data = encode(img, "PNG")
    out = pixels(data, width=8, height=8, interpolation="nearest")
    expected_opaque = (opaque[0],) * 3 if mode == "LA" else opaque[:3]
    assert (out[:7, :4] == WHITE).all()  # default background: white
    assert (out[:7, 4:] == expected_opaque).all()
    # half transparent over white
    blended = np.rint(np.array(expected_opaque) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(out[7, 0] - blended).max() <= 1
    out = pixels(data, width=8, height=8, interpolation="nearest", background=BLACK)
    assert (out[:7, :4] == BLACK).all()


def test_rgb_png_with_a_transparent_colour():
    img = Image.new("RGB", (4, 4), GREEN)
    img.putpixel((0, 0), RED)
    out = pixels(encode(img, "PNG", transparency=RED), width=4, height=4, interpolation="nearest")
    assert tuple(out[0, 0]) == WHITE and tuple(out[1, 1]) == GREEN


def test_cmyk_jpeg_is_converted_to_rgb():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no black, full magenta and yellow: red
    img.paste((255, 0, 255, 0), (8, 0, 16, 16))  # cyan + yellow: green
    out, info = imaging.transform(encode(img, "JPEG", quality=95), ResizeSpec(width=16, height=16))
    assert info.mode == "CMYK"
    arr = imaging.to_array(out).astype(int)
    assert np.abs(arr[4:12, 1:6] - RED).max() < 30
    assert np.abs(arr[4:12, 10:15] - GREEN).max() < 30


def test_mode_1_bilevel():
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    out = pixels(encode(img, "PNG"), width=8, height=8, interpolation="nearest")
    assert (out[:, :4] == WHITE).all() and (out[:, 4:] == BLACK).all()
    assert pixels(encode(img, "TIFF"), width=8, height=8, channels=1, interpolation="nearest").shape == (8, 8, 1)


def test_float_tiff_in_0_1_is_scaled_and_others_clipped():
    ramp = np.linspace(0.0, 1.0, 11, dtype=np.float32).reshape(1, 11)
    out = pixels(encode(Image.fromarray(ramp), "TIFF"), width=11, height=1, channels=1, interpolation="nearest")
    np.testing.assert_array_equal(out[0, :, 0], np.rint(ramp[0].astype(np.float64) * 255))
    wide = np.array([[-5.0, 0.0, 100.0, 300.0, np.nan]], np.float32)
    out = pixels(encode(Image.fromarray(wide), "TIFF"), width=5, height=1, channels=1, interpolation="nearest")
    assert list(out[0, :, 0]) == [0, 0, 100, 255, 0]


def test_int32_tiff_is_treated_as_16_bit():
    arr = np.array([[0, 65535, 32768, 70000, -4]], np.int32)
    img = Image.fromarray(arr)
    assert img.mode == "I"
    out = pixels(encode(img, "TIFF"), width=5, height=1, channels=1, interpolation="nearest")
    assert list(out[0, :, 0]) == [0, 255, 128, 255, 0]


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    assert (pixels(data, width=4, height=4) == RED).all()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n", "not an image"),
        (encode(Image.new("RGB", (8, 8)), "PDF"), "not an image"),
    ],
)
def test_unreadable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected, match=reason):
        imaging.transform(data, ResizeSpec())


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_jpeg_is_rejected(keep):
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(Rejected, match="truncated|corrupt|cannot open"):
        imaging.transform(data[: int(len(data) * keep)], ResizeSpec())


def test_truncated_png_is_rejected():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(Rejected, match="truncated|corrupt"):
        imaging.transform(data[: len(data) // 2], ResizeSpec())


def test_decompression_bomb_is_rejected_against_max_pixels():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    for limit in (1000, 6000):  # Pillow errors above 2x its limit and warns above 1x: both rejected
        with pytest.raises(Rejected, match=rf"decompression bomb.*10,?000 pixels.*{limit:,}"):
            imaging.transform(data, ResizeSpec(max_pixels=limit))
    img, _ = imaging.transform(data, ResizeSpec(max_pixels=10_000))
    assert img.size == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == imaging.DEFAULT_MAX_PIXELS  # the global is put back


@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
@pytest.mark.parametrize("size", ["32", "64x48"])
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("source", [(50, 20), (20, 50), (7, 7)])
def test_output_shape(mode, size, channels, source):
    width, height = imaging.parse_size(size)
    data = encode(Image.fromarray(quadrants(*source)), "PNG")
    img, info = imaging.transform(data, ResizeSpec(width=width, height=height, mode=mode, channels=channels))
    assert img.mode == ("L" if channels == 1 else "RGB") and img.size == (width, height)
    assert (info.width, info.height) == source
    decoded = imaging.decode_png(imaging.encode_png(img))
    assert decoded.shape == (height, width, channels) and decoded.dtype == np.uint8


def test_pad_letterboxes_with_the_fill_colour():
    data = encode(Image.new("RGB", (40, 20), RED), "PNG")
    out = pixels(data, width=32, height=32, mode="pad", fill=BLUE)
    assert (out[8:24] == RED).all()  # 40x20 scaled to 32x16, centred
    assert (out[:8] == BLUE).all() and (out[24:] == BLUE).all()
    tall = pixels(encode(Image.new("RGB", (10, 40), GREEN), "PNG"), width=16, height=16, mode="pad", fill=WHITE)
    assert (tall[:, 6:10] == GREEN).all() and (tall[:, :6] == WHITE).all() and (tall[:, 10:] == WHITE).all()
    grey = pixels(data, width=32, height=32, mode="pad", fill=(255, 255, 255), channels=1)
    assert (grey[:8] == 255).all()


def test_crop_keeps_the_centre():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = RED
    arr[:, 20:40] = GREEN
    arr[:, 40:] = BLUE
    out = pixels(encode(Image.fromarray(arr), "PNG"), width=10, height=10, mode="crop")
    assert (out[:, 1:-1] == GREEN).all()
    stretched = pixels(encode(Image.fromarray(arr), "PNG"), width=12, height=10, mode="stretch")
    assert (stretched[:, 0] == RED).all() and (stretched[:, -1] == BLUE).all()


def test_transform_is_deterministic():
    noise = np.random.default_rng(1).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    spec = ResizeSpec(width=16, height=24, mode="crop", interpolation="lanczos")
    first = imaging.encode_png(imaging.transform(data, spec)[0])
    assert imaging.encode_png(imaging.transform(data, spec)[0]) == first


@pytest.mark.parametrize("shape", [(32, 32, 3), (5, 7, 1), (1, 1, 3), (3, 40, 3), (38, 105, 1), (38, 106, 1), (40, 40, 3)])
def test_encode_png_is_a_standard_png_of_the_exact_pixels(shape):
    arr = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if shape[2] == 1 else arr)
    data = imaging.encode_png(img)
    with Image.open(io.BytesIO(data)) as decoded:  # an independent decoder reads it back
        assert decoded.format == "PNG" and decoded.mode == img.mode and not decoded.info
        assert (np.asarray(decoded).reshape(shape) == arr).all()
    assert (imaging.decode_png(data) == arr).all()
    assert (imaging._decode_own_png(data) == arr).all()  # the fast path reads it, not Pillow
    assert [data[i + 4 : i + 8] for i in _chunk_offsets(data)] == [b"IHDR", b"IDAT", b"IEND"]
    # the deflate stream is libdeflate's at the recorded level: the same bytes in every process;
    # rows stored (level 0, filter None) exactly when that fits the limit
    idat_at = _chunk_offsets(data)[1]
    idat = data[idat_at + 8 : idat_at + 8 + int.from_bytes(data[idat_at : idat_at + 4], "big")]
    rows = zlib.decompress(idat)
    stored = 68 + len(rows) <= imaging.PNG_STORED_MAX
    assert idat == deflate.zlib_compress(rows, 0 if stored else imaging.PNG_LEVEL)
    assert (len(data) <= imaging.PNG_STORED_MAX) == stored
    stride = shape[1] * shape[2] + 1
    assert set(rows[::stride]) == {0 if stored else 1}


def _chunk_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 8
    while pos < len(data):
        offsets.append(pos)
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return offsets


def test_decode_png_reads_pngs_other_tools_wrote():
    arr = np.random.default_rng(3).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "another tool")
    for params in ({"optimize": True}, {"compress_level": 9, "pnginfo": text}):  # adaptive filters, a text chunk
        assert (imaging.decode_png(encode(Image.fromarray(arr), "PNG", **params)) == arr).all()
    grey = arr[:, :, 0]
    assert (imaging.decode_png(encode(Image.fromarray(grey), "PNG")) == grey[:, :, None]).all()


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "I;16", "1"])
def test_encode_png_takes_only_what_transform_returns(mode):
    with pytest.raises(ValueError, match=f"received mode {re.escape(mode)}"):
        imaging.encode_png(Image.new(mode, (4, 3)))


def _with_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


@pytest.mark.parametrize("damage", ["idat byte", "truncated", "rgba", "jpeg", "short ihdr"])
def test_decode_png_refuses_damaged_or_other_images(damage):
    arr = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = imaging.encode_png(Image.fromarray(arr))
    if damage == "short ihdr":  # checksums right, header a byte short
        data = data[:8] + _with_chunk(b"IHDR", data[16:28]) + data[33:]
    elif damage == "idat byte":
        data = bytearray(data)
        data[_chunk_offsets(bytes(data))[1] + 10] ^= 0xFF
        data = bytes(data)
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "rgba":
        data = encode(Image.fromarray(arr).convert("RGBA"), "PNG")
    else:
        data = encode(Image.fromarray(arr), "JPEG")
    with pytest.raises(ValueError):
        imaging.decode_png(data)


def test_a_png_mixing_row_filters_goes_to_pillow():
    arr = np.random.default_rng(5).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    stored = imaging.encode_png(Image.fromarray(arr))  # every row filter None
    idat, iend = _chunk_offsets(stored)[1:]
    rows = bytearray(zlib.decompress(stored[idat + 8 : iend - 4]))
    stride = 5 * 3 + 1
    rows[stride : 2 * stride] = bytes([1, *rows[stride + 1 : stride + 4]]) + bytes(
        (rows[stride + 1 + i] - rows[stride + 1 + i - 3]) % 256 for i in range(3, 15))  # row 1 as Sub
    mixed = stored[:idat] + _with_chunk(b"IDAT", zlib.compress(bytes(rows))) + stored[iend:]
    assert imaging._decode_own_png(mixed) is None  # neither all None nor all Sub
    assert (imaging.decode_png(mixed) == arr).all()  # Pillow reads it, the same pixels


def test_decode_png_inflates_no_more_than_the_header_promises():
    arr = np.zeros((8, 8, 3), np.uint8)
    data = imaging.encode_png(Image.fromarray(arr))
    idat, iend = _chunk_offsets(data)[1:]
    bomb = data[:idat] + _with_chunk(b"IDAT", zlib.compress(b"\x01" * 50_000_000)) + data[iend:]  # 50 MB
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        assert imaging._decode_own_png(bomb) is None  # stopped after 8 rows' worth, then left to Pillow
        assert tracemalloc.get_traced_memory()[1] < 1_000_000  # peak: the 50 MB were never inflated
    finally:
        tracemalloc.stop()
    assert imaging.decode_png(bomb).shape == (8, 8, 3)  # which reads what the header promises, too


def test_every_interpolation_name_has_a_filter():
    assert set(imaging.INTERPOLATIONS) == set(spec.INTERPOLATION_NAMES)


def test_default_pixel_limit_is_pillows():
    assert imaging.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("text, expected", [("32", (32, 32)), ("64x48", (64, 48)), ("64X48", (64, 48))])
def test_parse_size(text, expected):
    assert imaging.parse_size(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "32x", "axb", "1x2x3", "", "99999"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match=repr(text)):
        imaging.parse_size(text)


@pytest.mark.parametrize("text, expected", [("white", WHITE), ("#ff0000", RED), ("0,255,0", GREEN)])
def test_parse_color(text, expected):
    assert imaging.parse_color(text) == expected


@pytest.mark.parametrize("text", ["nope", "1,2", "0,0,256", "#12"])
def test_parse_color_rejects(text):
    with pytest.raises(ValueError, match=repr(text)):
        imaging.parse_color(text)


def test_pillow_warnings_about_what_it_works_around_stay_quiet():
    # EXIF whose orientation tag points past the end of the data: Pillow warns and skips the tag
    exif = b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x04\x00\x08\x00\x00\x00\xf0\x00\x00\x00\x00\x00\x00\x00"
    data = encode(Image.new("RGB", (40, 30), "red"), "PNG", exif=exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img, info = imaging.transform(data, ResizeSpec())
    assert caught == [] and img.size == (32, 32) and info.width == 40
    assert (imaging.to_array(img) == (255, 0, 0)).all()


def test_decode_png_does_not_trust_a_header_for_more_than_its_data_can_hold():
    data = imaging.encode_png(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    forged = data[:8] + _with_chunk(b"IHDR", struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)) + data[33:]
    tracemalloc.start()
    try:
        assert imaging._decode_own_png(forged) is None  # 10 GB promised by a few hundred bytes
        assert tracemalloc.get_traced_memory()[1] < 1_000_000
    finally:
        tracemalloc.stop()
    with pytest.raises(ValueError):
        imaging.decode_png(forged)


def test_decode_png_leaves_an_image_over_the_pixel_limit_to_pillows_bomb_check():
    data = imaging.encode_png(Image.fromarray(np.zeros((8, 8, 3), np.uint8)))
    width, height = 20_000, 10_000  # 600 MB of pixels, over twice Pillow's limit of 89 million
    body = zlib.compress(os.urandom(600_000), 0)  # enough data for deflate to expand that far
    forged = (data[:8] + _with_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
              + _with_chunk(b"IDAT", body) + data[-12:])
    tracemalloc.start()
    try:
        assert imaging._decode_own_png(forged) is None
        assert tracemalloc.get_traced_memory()[1] < 10_000_000
    finally:
        tracemalloc.stop()
    with pytest.raises(ValueError, match="decompression bomb"):
        imaging.decode_png(forged)
