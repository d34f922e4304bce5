"""Reading the RAW tree: listing files and reading their bytes, from a folder or a URL.

RAW is a local folder or an fsspec URL (``s3://bucket/raw``, ``gs://bucket/raw``,
``file:///data/raw``). Stages name a file by its path relative to the root with ``/``
separators; workers call :func:`read_bytes` with the root and that path, so the same code runs
wherever the files can be reached. Local roots (plain paths and ``file://`` URLs) go straight
through ``os``: it is faster, and symbolic links need its rules. Every other URL goes through
fsspec, whose cloud filesystems come from optional extras (``prep[s3]``, ``prep[gcs]``) and take
their credentials and endpoint from the usual environment (see docs/cluster.md).
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import workdir
from .errors import PrepError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}  # URL protocol -> the fsspec package for it


@dataclass
class Listing:
    """What a walk of RAW found: image paths, and what it skipped and why.

    ``versions`` maps each image to ``(size, version)``, where the version tells a changed file
    from an unchanged one without reading it (mtime in ns locally, the ETag or modification time
    of an object; None when the filesystem gives neither). ``folders`` are the first-level
    folders the walk entered, i.e. the candidate classes.
    """

    files: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    versions: dict[str, tuple[int, Any]] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)

    def skip(self, reason: str, rel: str) -> None:
        self.skipped.setdefault(reason, []).append(rel)

    @property
    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    @property
    def skipped_folders(self) -> int:
        """Skipped entries that are folders (recorded with a trailing ``/``), each skipped whole."""
        return sum(rel.endswith("/") for items in self.skipped.values() for rel in items)


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in JUNK_NAMES


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")  # as os.path.splitext, for a name that does not start with a dot
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def is_url(root: str | os.PathLike) -> bool:
    return "://" in os.fspath(root)


def _filesystem(url: str):
    """(fsspec filesystem, path inside it) for ``url``; a one-line error if it cannot be used."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as err:  # fsspec names the missing package, e.g. "Install s3fs to access S3"
        package = PACKAGES.get(url.split("://", 1)[0].lower())
        hint = f": pip install {package}" if package else ""
        raise PrepError(f"cannot open {url}: {err}{hint}") from None
    except ValueError as err:  # "Protocol not known: ..."
        raise PrepError(f"cannot open {url}: {err}") from None
    except Exception as err:  # a filesystem that connects as it starts (ftp, sftp): host, login, ...
        raise PrepError(f"cannot open {url}: {type(err).__name__}: {err}") from None
    return fs, path.rstrip("/")


@functools.lru_cache(maxsize=64)
def local_path(root: str | os.PathLike) -> str | None:
    """The local folder behind ``root`` (a path or a ``file://`` URL), or None for a remote URL."""
    root = os.fspath(root)
    if not is_url(root):
        return root
    from fsspec.implementations.local import LocalFileSystem

    fs, path = _filesystem(root)
    return path if isinstance(fs, LocalFileSystem) else None


def canonical(root: str | os.PathLike) -> str:
    """RAW as index.json records it: an absolute path for a path, the URL itself for a URL."""
    root = os.fspath(root)
    if is_url(root):
        return root if root.endswith("://") else root.rstrip("/")
    return str(Path(root).resolve())


def _remote(root: str, what: str, call):
    """Run ``call(fs, path)`` on a remote root; any failure is a one-line error naming the URL."""
    fs, path = _filesystem(root)
    try:
        return call(fs, path)
    except PrepError:
        raise
    except Exception as err:  # credentials, endpoint, permissions: a setup problem, said in one line
        raise PrepError(f"cannot {what} {root}: {type(err).__name__}: {err}") from None


def exists(root: str | os.PathLike) -> bool:
    """Whether RAW exists (a folder, a file, or for an object store, a prefix with objects)."""
    path = local_path(root)
    if path is not None:
        return os.path.exists(path)
    return _remote(os.fspath(root), "read", lambda fs, p: fs.exists(p))


def is_dir(root: str | os.PathLike) -> bool:
    """Whether RAW is a folder (for an object store: a bucket or a prefix with objects below it)."""
    path = local_path(root)
    if path is not None:
        return os.path.isdir(path)
    return _remote(os.fspath(root), "read", lambda fs, p: fs.isdir(p))


def list_files(root: str | os.PathLike, *, follow_links: bool = False, outside_links: bool = False) -> Listing:
    """Every image file below ``root``, as relative ``/`` paths, in walk order (unsorted).

    Hidden files and folders, junk names, other extensions and anything but regular files (FIFOs,
    sockets, devices) are skipped with a reason, by the same rules for a folder and a URL; a
    hidden folder is skipped whole, without listing it. Symbolic links are skipped unless
    ``follow_links``, and then still a link that loops, is broken, or leads out of ``root``
    (unless ``outside_links``).
    """
    path = local_path(root)
    if path is not None:
        return _list_local(path, follow_links, outside_links)
    return _remote(os.fspath(root), "list", _list_remote)


LEAVES_RAW = "symlink leaves RAW (use --allow-outside-links)"


def _link_problem(path: str, real_root: str, outside_links: bool) -> str | None:
    """Why the symbolic link ``path`` is not followed, or None."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop"
        return "broken symlink" if err.errno == errno.ENOENT else f"unreadable symlink ({err.strerror})"
    if not outside_links and not workdir.is_below(os.path.realpath(path), real_root):
        return LEAVES_RAW
    return None


def _list_local(root: str, follow_links: bool, outside_links: bool) -> Listing:
    listing = Listing()
    stack = [""]
    real_root = os.path.realpath(root)
    seen_dirs = {real_root} if follow_links else None
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(root, rel_dir) if rel_dir else root
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise PrepError(f"cannot list {folder}: {err.strerror or err}") from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if is_hidden(entry.name):
                listing.skip("hidden", rel + "/" if entry.is_dir(follow_symlinks=False) else rel)
                continue
            if entry.is_symlink():
                problem = "symlink (use --follow-links)" if not follow_links else _link_problem(
                    entry.path, real_root, outside_links)
                if problem:
                    listing.skip(problem, rel)
                    continue
            if entry.is_dir(follow_symlinks=follow_links):
                if seen_dirs is not None:
                    real = os.path.realpath(entry.path)
                    if real in seen_dirs:
                        listing.skip("symlink loop", rel)
                        continue
                    seen_dirs.add(real)
                stack.append(rel)
                if not rel_dir:
                    listing.folders.append(entry.name)
            elif not entry.is_file(follow_symlinks=follow_links):
                listing.skip("not a regular file", rel)
            elif not is_image_name(entry.name):
                listing.skip("not an image extension", rel)
            else:
                st = entry.stat(follow_symlinks=follow_links)
                listing.files.append(rel)
                listing.versions[rel] = (st.st_size, st.st_mtime_ns)
    return listing


def _list_remote(fs, root: str) -> Listing:
    # One listing per folder, like the local walk: a hidden folder is never listed.
    listing = Listing()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        folder = f"{root}/{rel_dir}" if rel_dir else root
        fs.invalidate_cache(folder)  # not a listing an earlier call in this process cached
        for info in fs.ls(folder, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info["name"].rstrip("/") == folder or not name:
                continue  # an object store's placeholder for the folder itself
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if is_hidden(name):
                listing.skip("hidden", rel + "/" if info["type"] == "directory" else rel)
            elif info["type"] == "directory":
                stack.append(rel)
                if not rel_dir:
                    listing.folders.append(name)
            elif info["type"] != "file":
                listing.skip("not a regular file", rel)
            elif not is_image_name(name):
                listing.skip("not an image extension", rel)
            else:
                listing.files.append(rel)
                listing.versions[rel] = (int(info.get("size") or 0), _version(info))
    return listing


def _version(info: dict) -> str | None:
    """What changes when an object is rewritten: its ETag, else its modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "updated"):
        if info.get(key):
            return str(info[key])
    return None


def read_versioned(
    root: str | os.PathLike, rel: str, *, outside_links: bool = False
) -> tuple[bytes, tuple[int, Any] | None]:
    """The bytes of ``rel`` and, for a local root, its (size, mtime in ns) as the listing records
    them, read after the bytes (a file rewritten meanwhile shows a new version); None for a URL.
    Locally, only a regular file is read, and a symbolic link only to one inside ``root`` (or
    anywhere with ``outside_links``, as `prep index --allow-outside-links` follows them): an
    OSError otherwise. (The folders of ``rel`` are the caller's to check, with
    :class:`workdir.Confined`: once per folder, not per file.)"""
    path = local_path(root)
    if path is None:
        return read_bytes(root, rel), None
    full = os.path.join(path, rel)
    try:
        data, seen = workdir.read_file(full, follow_links=outside_links)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        # a link (as `prep index --follow-links` takes them): where it leads decides
        if not workdir.is_below(os.path.realpath(full), os.path.realpath(path)):
            raise OSError(errno.EINVAL, "symbolic link to a file outside RAW", full) from None
        data, seen = workdir.read_file(full)
    return data, (seen.st_size, seen.st_mtime_ns)


def read_bytes(root: str | os.PathLike, rel: str) -> bytes:
    """The bytes of ``rel`` below ``root``; OSError (e.g. FileNotFoundError) if it cannot be read."""
    path = local_path(root)
    if path is not None:
        return workdir.read_file(os.path.join(path, rel))[0]
    fs, base = _filesystem(os.fspath(root))
    return fs.cat_file(f"{base}/{rel}")
