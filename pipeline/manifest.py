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
      "class_weights": {"name": w, ...},             (balanced, from train: what verify-train uses)
      "inputs": {"encoded.csv": sha256, "classes.json": sha256, ...},
      "files": {"dataset.h5": {"format": "h5", "bytes": n, "sha256": ...},
                "tfrecord/train-00000-of-00001.tfrecord": {...}, ...}
    }

It holds no timestamps, so packing the same data twice gives the same manifest.
"""

from __future__ import annotations

import json
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


def class_weights(counts: dict[str, int]) -> dict[str, float]:
    """The weights that balance classes of ``counts`` images (classes without any are left out):
    n_samples / (n_classes * n_c), scikit-learn's ``compute_class_weight("balanced")``."""
    present = {name: n for name, n in counts.items() if n > 0}
    total = sum(present.values())
    return {name: round(total / (len(present) * n), 6) for name, n in present.items()}


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
        "class_weights": class_weights(per_class.get("train", {})),
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
    _check_entries(wd, path, data)
    return data


def _check_entries(wd: workdir.Workdir, path: Path, data: dict) -> None:
    """Each ``files`` and ``inputs`` entry names a file inside the work directory (links
    resolved) and holds what :func:`build` writes: a one-line PrepError naming the first that
    does not, before any of them is read."""
    inside = workdir.Confined(wd.root, "the work directory")
    for key, shape in (("files", '{"format": ..., "bytes": n, "sha256": ...}'), ("inputs", "its sha256")):
        if not isinstance(data[key], dict):
            raise PrepError(f"{path}: {key} is {_short(data[key])}; expected {{path: {shape}, ...}}")
        for rel, entry in data[key].items():
            inside(rel, f"{path} {key} entry", whole=True)
            if key == "files":
                ok = (isinstance(entry, dict) and isinstance(entry.get("format"), str)
                      and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str))
            else:
                ok = isinstance(entry, str)
            if not ok:
                raise PrepError(f"{path}: {key} entry {rel!r} is {_short(entry)}; expected {shape}")


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


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
