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

import array
import errno
import functools
import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import workdir
from .errors import PrepError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}  # URL protocol -> the fsspec package for it


class Paths(Sequence[str]):
    """Strings (paths) packed in one buffer, as UTF-8, and where each ends: a path costs its
    bytes and 8 more, where a list holds a str object of some 60 bytes more for each.
    (``surrogatepass``: any str goes in and comes back as it was, and the bytes of two paths
    compare as the paths do.)"""

    __slots__ = ("_data", "_ends")

    def __init__(self, items: Iterable[str] = ()):
        self._data = bytearray()
        self._ends = array.array("q")
        for item in items:
            self.append(item)

    @classmethod
    def from_buffers(cls, data, ends) -> "Paths":
        """The paths :meth:`buffers` gave."""
        paths = cls()
        paths._data = bytearray(data)
        paths._ends = array.array("q", bytes(ends.astype("<i8").data) if hasattr(ends, "astype") else ends)
        ends = paths._ends
        if ends and (ends[-1] != len(paths._data) or ends[0] < 0 or any(a > b for a, b in zip(ends, ends[1:]))):
            raise ValueError("damaged paths")
        return paths

    def buffers(self):
        """The packed bytes and where each path ends, as numpy arrays (to save them)."""
        import numpy as np

        return np.frombuffer(self._data, np.uint8), np.frombuffer(self._ends, np.int64)

    def append(self, text: str) -> None:
        self._data += text.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._data))

    def extend(self, texts: Iterable[str]) -> None:
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
        self._ends.extend(itertools.islice(itertools.accumulate(map(len, encoded), initial=len(self._data)), 1, None))
        self._data += b"".join(encoded)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ends = self._ends
        if i < 0:
            i += len(ends)
        return self._data[ends[i - 1] if i > 0 else 0 : ends[i]].decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        data, start = self._data, 0
        for end in self._ends:
            yield data[start:end].decode("utf-8", "surrogatepass")
            start = end

    def items(self, positions: Iterable[int]) -> list[str]:
        """The paths at ``positions``."""
        data, ends = self._data, self._ends
        return [data[ends[i - 1] if i else 0 : ends[i]].decode("utf-8", "surrogatepass") for i in positions]


@dataclass
class Listing:
    """What a walk of RAW found: image paths, and what it skipped and why.

    Each image has a size and a version, which tells a changed file from an unchanged one
    without reading it: its mtime in ns locally, the ETag or modification time of an object
    (None when the filesystem gives neither), in arrays (``sizes``; :meth:`version`) by the
    image's position in ``files``. ``folders`` are the first-level folders the walk entered,
    i.e. the candidate classes.
    """

    files: Paths = field(default_factory=Paths)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)
    sizes: array.array = field(default_factory=lambda: array.array("q"))
    mtimes: array.array | None = field(default_factory=lambda: array.array("q"))  # None: versions as text
    tags: Paths | None = None  # the versions of a listing of objects ("": none)

    def add(self, rel: str, size: int, version) -> None:
        self.files.append(rel)
        self.sizes.append(size)
        if type(version) is int and self.mtimes is not None:
            self.mtimes.append(version)
            return
        if self.tags is None:  # from now on, every version as text (an object store's)
            self.tags = Paths(str(v) for v in self.mtimes or ())
            self.mtimes = None
        self.tags.append("" if version is None else str(version))

    def version(self, i: int):
        return self.mtimes[i] if self.mtimes is not None else (self.tags[i] or None)

    def entries(self) -> Iterator[tuple[str, int, Any]]:
        """(path, size, version) of each file, in the listing's order."""
        for i, rel in enumerate(self.files):
            yield rel, self.sizes[i], self.version(i)

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


def is_utf8(name: str) -> bool:
    """Whether ``name`` is text, not bytes the file system holds that are not UTF-8 (which Python
    gives as surrogates): prep records paths in UTF-8 files."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """``name`` with the bytes that are not UTF-8 shown as ``\\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")  # as os.path.splitext, for a name that does not start with a dot
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def is_url(root: str | os.PathLike) -> bool:
    return "://" in os.fspath(root)


def filesystem(url: str):
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


def read_below(folder: str, names: Sequence[str]) -> Iterator[bytes | OSError]:
    """The bytes of each file ``folder``/name, or the OSError reading it raised: a folder's
    regular files, one at a time, links not followed (:func:`workdir.read_file`); a URL's
    objects, fetched together (fsspec runs one call's requests concurrently). An error of the
    storage itself (no credentials, ...) is a one-line error, not a file's."""
    if not is_url(folder):
        for name in names:
            try:
                yield workdir.read_file(os.path.join(folder, name), follow_links=False)[0]
            except OSError as err:
                yield err
        return
    fs, base = filesystem(folder)
    paths = [f"{base}/{name}" for name in names]
    # whole objects by their exact names (``cat`` would take ``[`` or ``*`` in a name as a pattern)
    for value in fs.cat_ranges(paths, None, None, on_error="return") if paths else []:
        if isinstance(value, Exception) and not isinstance(value, OSError):
            raise PrepError(f"cannot read the resized files at {folder}: {value}")
        yield value


def sizes_below(folder: str, names: Sequence[str]) -> Iterator[int | OSError]:
    """The size of each file ``folder``/name, or the OSError asking for it raised: a folder's
    files by a stat each; a URL's objects asked together (fsspec runs the requests concurrently).
    An error of the storage itself is a one-line error, as in :func:`read_below`."""
    if not is_url(folder):
        for name in names:
            try:
                yield os.stat(os.path.join(folder, name)).st_size
            except OSError as err:
                yield err
        return
    fs, base = filesystem(folder)
    paths = [f"{base}/{name}" for name in names]
    if not paths:
        return
    if getattr(fs, "async_impl", False):
        from fsspec.asyn import _run_coros_in_chunks, sync

        values = sync(fs.loop, _run_coros_in_chunks, [fs._size(p) for p in paths], return_exceptions=True)
    else:
        values = []
        for path in paths:
            try:
                values.append(fs.size(path))
            except Exception as err:  # noqa: BLE001  (sorted out below, as the asynchronous ones)
                values.append(err)
    for value in values:
        if isinstance(value, Exception) and not isinstance(value, OSError):
            raise PrepError(f"cannot read the resized files at {folder}: {value}")
        yield value


@functools.lru_cache(maxsize=64)
def local_path(root: str | os.PathLike) -> str | None:
    """The local folder behind ``root`` (a path or a ``file://`` URL), or None for a remote URL."""
    root = os.fspath(root)
    if not is_url(root):
        return root
    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem(root)
    return path if isinstance(fs, LocalFileSystem) else None


def canonical(root: str | os.PathLike) -> str:
    """RAW as index.json records it: an absolute path for a path, the URL itself for a URL."""
    root = os.fspath(root)
    if is_url(root):
        return root if root.endswith("://") else root.rstrip("/")
    return str(Path(root).resolve())


def _remote(root: str, what: str, call):
    """Run ``call(fs, path)`` on a remote root; any failure is a one-line error naming the URL."""
    fs, path = filesystem(root)
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


def is_s3(fs) -> bool:
    """Whether ``fs`` is s3fs's, whose listing can be asked a page at a time."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"s3", "s3a"} & set(protocols)) and hasattr(fs, "_call_s3")


def s3_pages(fs, bucket: str, prefix: str, delimiter: str = "") -> Iterator[dict]:
    """The pages of S3's listing of ``prefix`` (1,000 objects each; s3fs keeps none of them)."""
    from fsspec.asyn import sync

    kwargs = {"Bucket": bucket, "Prefix": prefix, **getattr(fs, "req_kw", {})}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        yield page
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def listing_digest(url: str) -> str | None:
    """A digest of every object below ``url`` (its name, size and version), which changes when
    one is added, removed or rewritten; None when the store gives no version. On S3 a page of
    1,000 at a time, so memory does not grow with the objects; elsewhere as fsspec's find lists
    them."""

    def digest(fs, base: str) -> str | None:
        sha = hashlib.sha256()
        if is_s3(fs):
            bucket, key, _ = fs.split_path(base.rstrip("/"))
            prefix = f"{key}/" if key else ""
            objects = ((c["Key"][len(prefix):], c.get("Size"), c.get("ETag")) for page in s3_pages(fs, bucket, prefix)
                       for c in page.get("Contents", []))
        else:
            found = fs.find(base, detail=True)
            objects = ((name[len(base):].lstrip("/"), found[name].get("size"), _version(found[name]))
                       for name in sorted(found))
        for rel, size, version in objects:
            if version is None:
                return None
            sha.update(f"{rel}\0{size}\0{version}\n".encode("utf-8", "surrogateescape"))
        return sha.hexdigest()

    return _remote(url, "list", digest)


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
            if not is_utf8(entry.name):
                shown = printable(rel)
                listing.skip("name not UTF-8", shown + "/" if entry.is_dir(follow_symlinks=False) else shown)
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
                listing.add(rel, st.st_size, st.st_mtime_ns)
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
                listing.add(rel, int(info.get("size") or 0), _version(info))
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
    fs, base = filesystem(os.fspath(root))
    return fs.cat_file(f"{base}/{rel}")


class PathIndex:
    """Where each path of a sequence is: 64-bit hashes of the paths, sorted, and their positions
    (16 bytes a path; the paths stay where they are, and a hash found is checked against the
    path itself). ``keys``: the hash of each path, if known; ``rows``: the positions to index,
    if not all; ``key``: the hash of a path (another hash than ``hash``: one of its case-folded
    text, say, where that hash is known)."""

    def __init__(self, paths: Sequence[str], keys=None, rows=None, key: Callable[[str], int] = hash):
        import numpy as np

        self.key = key
        if keys is None:
            keys = np.fromiter(map(key, paths), np.int64, len(paths))
        if rows is None:
            self.rows = np.argsort(keys, kind="stable")
        else:
            rows = np.asarray(rows, np.int64)
            self.rows = rows[np.argsort(keys[rows], kind="stable")]
        self.keys = keys[self.rows]
        self.paths = paths

    def find(self, path: str) -> int:
        """The position of ``path``, or -1."""
        key = self.key(path)
        keys, j = self.keys, int(self.keys.searchsorted(key))
        while j < len(keys) and keys[j] == key:
            row = int(self.rows[j])
            if self.paths[row] == path:
                return row
            j += 1
        return -1

    def find_all(self, paths: list[str]) -> list[int]:
        """:meth:`find` of each of ``paths``, the hashes looked up together."""
        import numpy as np

        found = [-1] * len(paths)
        if not len(self.keys) or not paths:
            return found
        keys = np.fromiter(map(self.key, paths), np.int64, len(paths))
        at = self.keys.searchsorted(keys).clip(max=len(self.keys) - 1)
        hits = np.flatnonzero(self.keys[at] == keys)
        rows = self.rows[at[hits]].tolist()
        stored = self.paths.items(rows) if hasattr(self.paths, "items") else [self.paths[row] for row in rows]
        for k, row, path in zip(hits.tolist(), rows, stored):
            found[k] = row if path == paths[k] else self.find(paths[k])  # another path of that hash: rare
        return found

    def twice(self) -> str | None:
        """The first path (in their order) that is there twice, or None."""
        import numpy as np

        same = np.flatnonzero(self.keys[1:] == self.keys[:-1])  # j: keys[j] == keys[j + 1]
        first: dict[str, int] = {}
        seen_twice: set[str] = set()
        for j in dict.fromkeys(np.concatenate([same, same + 1]).tolist()):
            row = int(self.rows[j])
            path = self.paths[row]
            if path in first:
                seen_twice.add(path)
            first[path] = min(first.get(path, row), row)
        return min(seen_twice, key=first.__getitem__) if seen_twice else None
