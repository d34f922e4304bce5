"""manifest.json: what `prep pack` produced, from which inputs and settings, with checksums.

::

    {
      "prep_version": "0.1.0",
      "settings": {"resize": {width, height, mode, channels, ...},   (resize.json)
                   "split": {"ratios": [...], "seed": 42},            (split.json)
                   "pack": {"formats": [...], "pkl.gz": {...}, "h5": {}, "tfrecord": {...}}},
      "image": {"height": H, "width": W, "channels": C},
      "classes": ["name", ...],                      (label id = position)
      "splits": {"train": {"count": N, "classes": {"name": n, ...}}, "valid": ..., "test": ...},
      "inputs": {"encoded.csv": sha256, "classes.json": sha256, ...},
      "files": {"dataset.h5": {"format": "h5", "bytes": n, "sha256": ...},
                "tfrecord/train-00000-of-00001.tfrecord": {...}, ...}
    }

It holds no timestamps, so packing the same data twice gives the same manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from . import __version__, workdir
from .errors import PrepError, StageInputMissing
from .formats import FORMATS, SPLITS, Layout

RESIZE_SETTINGS = workdir.RESIZE_SETTINGS  # written by `prep resize`: the ResizeSpec fields
SPLIT_SETTINGS = workdir.SPLIT_SETTINGS  # written by `prep split`: ratios and seed


def output_files(root: Path, name: str) -> list[str]:
    """The files of format ``name``'s output, relative to ``root`` with ``/`` separators, sorted."""
    output = root / FORMATS[name].OUTPUT
    if output.is_dir():
        return sorted(p.relative_to(root).as_posix() for p in output.rglob("*") if p.is_file())
    return [output.relative_to(root).as_posix()] if output.is_file() else []


def describe_files(root: Path, formats: Iterable[str]) -> dict[str, dict]:
    """{relative path: {format, bytes, sha256}} for every output file of ``formats``."""
    files = {}
    for name in formats:
        for rel in output_files(root, name):
            path = root / rel
            files[rel] = {"format": name, "bytes": path.stat().st_size, "sha256": workdir.sha256_file(path)}
    return files


def optional_json(path: Path) -> dict | None:
    """The content of a settings file an earlier stage may have written, or None."""
    return workdir.read_json(path) if path.exists() else None


def build(
    wd: workdir.Workdir,
    layout: Layout,
    per_class: dict[str, dict[str, int]],
    inputs: Iterable[Path],
    pack_settings: dict[str, dict],
) -> dict:
    """The manifest of the formats in ``pack_settings`` (name -> options) as they are on disk now."""
    formats = [name for name in FORMATS if name in pack_settings]
    return {
        "prep_version": __version__,
        "settings": {
            "resize": optional_json(wd.path(RESIZE_SETTINGS)),
            "split": optional_json(wd.path(SPLIT_SETTINGS)),
            "pack": {"formats": formats, **{name: pack_settings[name] for name in formats}},
        },
        "image": {"height": layout.height, "width": layout.width, "channels": layout.channels},
        "classes": list(layout.classes),
        "splits": {s: {"count": layout.counts.get(s, 0), "classes": per_class.get(s, {})} for s in SPLITS},
        "inputs": {os.path.relpath(p, wd.root): workdir.sha256_file(p) for p in inputs},
        "files": describe_files(wd.root, formats),
    }


def write(wd: workdir.Workdir, manifest: dict) -> Path:
    path = wd.path(workdir.MANIFEST)
    workdir.write_json(path, manifest)
    return path


def read(wd: workdir.Workdir) -> dict:
    """The manifest of ``wd``; a clear error when there is none or it is not one."""
    path = wd.path(workdir.MANIFEST)
    if not path.exists():
        raise StageInputMissing(f"{path} does not exist; run `prep pack` first")
    data = workdir.read_json(path)
    required = ("settings", "image", "classes", "splits", "inputs", "files")
    if not isinstance(data, dict) or any(key not in data for key in required):
        raise PrepError(f"{path}: not a prep manifest (expected keys {', '.join(required)})")
    return data


def layout(manifest: dict) -> Layout:
    """The Layout a manifest describes (what verify expects every format to hold)."""
    image = manifest["image"]
    return Layout(
        height=int(image["height"]),
        width=int(image["width"]),
        channels=int(image["channels"]),
        classes=tuple(manifest["classes"]),
        counts={s: int(manifest["splits"][s]["count"]) for s in SPLITS},
        version=manifest.get("prep_version", ""),
    )
