"""Reading the RAW tree: listing files and reading their bytes.

The RAW root is a local folder. Stages name a file by its path relative to the root with
``/`` separators; workers call :func:`read_bytes` with the root and that path, so the same
code runs wherever the files can be reached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


@dataclass
class Listing:
    """What a walk of RAW found: image paths, and what it skipped and why."""

    files: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, rel: str) -> None:
        self.skipped.setdefault(reason, []).append(rel)

    @property
    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_files(root: str | os.PathLike, *, follow_links: bool = False) -> Listing:
    """Every image file below ``root``, as relative ``/`` paths, in walk order (unsorted)."""
    root = Path(root)
    listing = Listing()
    stack = [""]
    seen_dirs = {os.path.realpath(root)} if follow_links else None
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if is_hidden(entry.name):
                    listing.skip("hidden", rel)
                    continue
                if entry.is_symlink() and not follow_links:
                    listing.skip("symlink (use --follow-links)", rel)
                    continue
                if entry.is_dir(follow_symlinks=follow_links):
                    if seen_dirs is not None:
                        real = os.path.realpath(entry.path)
                        if real in seen_dirs:
                            listing.skip("symlink loop", rel)
                            continue
                        seen_dirs.add(real)
                    stack.append(rel)
                elif not entry.is_file(follow_symlinks=follow_links):
                    listing.skip("not a regular file", rel)
                elif not is_image_name(entry.name):
                    listing.skip("not an image extension", rel)
                else:
                    listing.files.append(rel)
    return listing


def read_bytes(root: str | os.PathLike, rel: str) -> bytes:
    with open(os.path.join(root, rel), "rb") as handle:
        return handle.read()


def stat(root: str | os.PathLike, rel: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of one file."""
    st = os.stat(os.path.join(root, rel))
    return st.st_size, st.st_mtime_ns
