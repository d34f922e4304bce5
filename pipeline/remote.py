"""A work directory on an object store or any fsspec filesystem: ``--workdir s3://bucket/work``.

prep's stages work on a local folder (locks, atomic renames, inodes), so a work directory given
as a URL is kept in a local copy, the mirror, one per URL under the user's cache folder
(``$PREP_CACHE``, else ``$XDG_CACHE_HOME/prep``, else ``~/.cache/prep``), and kept in step with
the URL around each command, while the command holds the mirror's lock:

- before it, what an earlier command here wrote but could not upload is uploaded; then every
  object that changed at the URL since this mirror last saw it is fetched (its ETag, else its
  modification time, tells), and a file this mirror had that is gone there is removed: the command
  starts from what the bucket holds, whichever machine wrote it;
- after it, also when it failed or was interrupted (so that a rerun anywhere resumes), every file
  the command created or changed is uploaded (one PUT each, a large file in parts: an object
  appears whole or not at all), then every file it removed is deleted there. Stage stamps
  (``.stamps/``) and ``manifest.json`` go last: a reader of the bucket sees a stage's stamp only
  after its outputs.

A Dask cluster's workers write resize's PNGs to the URL themselves (``Workdir.for_workers``): this
copy does not have them until the next command fetches them, as it fetches any object that
changed there.

A mirror is a cache: deleting it costs a fetch. A fresh mirror has new inodes everywhere, so the
stages check their inputs' contents again before trusting them (see workdir.Stamp). Every key
fetched, and every name in the mirror's record, is confined to the mirror: a key leaving it
(``a/../../x``), or one that a filesystem would rename (``a//b``, ``a/./b``), is refused in one
line. One machine writes to a work directory URL at a time: the bucket has no lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from . import workdir
from .errors import PrepError

log = logging.getLogger(__name__)

STATE = "state.json"  # beside the mirror: what it holds, as fetched or uploaded
INCOMING = "incoming"  # beside the mirror: downloads in progress, one folder per process
LAST = (workdir.STAMPS_DIR + "/", "manifest.json")  # uploaded after everything else
# never synced: the lock, and temporary files and folders (and anything inside them)
SKIP = re.compile(r"(^|/)(\.lock|\.[^/]*\.tmp|[^/]*\.tmp-\d+|\.[^/]*\.old)(/|$)")
# seconds between saves of the record while files go up or come down, and at least 10 times what
# the last save took: the record of millions of files takes seconds to write
SAVE_EVERY = 10.0
BATCH = 256  # files per fsspec call (it runs each call's transfers concurrently)
# s3fs sends a file under 100 MiB in one PUT, read whole (and copied: 180 MB of peak memory for a
# file of 90 MB, measured), a larger one in parts of 50 MiB, 10 at a time: the tables of millions
# of images would take hundreds of MB. A file over BIG goes up alone, in parts of PART, 2 at a
# time (one PUT under twice PART; about 32 MB whatever the size; S3 allows 10,000 parts, so
# larger ones for a file over 80 GB)
BIG = PART = 8 << 20
_PATTERN = re.compile(r"[*?\[]")  # what fsspec's rm would take for a pattern


def is_remote(text: str | os.PathLike) -> bool:
    """Whether a --workdir value is a URL to mirror: one whose filesystem is not this machine's."""
    from .sources import is_url, local_path

    text = os.fspath(text)
    if not is_url(text):
        return False
    try:
        return local_path(text) is None
    except PrepError:  # an unknown protocol, a missing package: the command says so, in one line
        return True


def local(text: str | os.PathLike) -> Path:
    """A --workdir value that is not remote, as a local folder (``file://`` URLs as their path)."""
    from .sources import is_url, local_path

    text = os.fspath(text)
    return Path(local_path(text)) if is_url(text) else Path(text)


def clean(url: str) -> str:
    """``url`` without trailing slashes (but its ``scheme://``)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rstrip('/')}"


def cache_root() -> Path:
    if os.environ.get("PREP_CACHE"):
        return Path(os.environ["PREP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prep"


def mirror_of(url: str) -> Path:
    """The local copy of the work directory at ``url`` (its folder name tells which one)."""
    url = clean(url)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[-1])[-60:].strip("-.") or "root"
    return cache_root() / "workdirs" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}" / "work"


def overlap(url: str, raw: str | None) -> None:
    """Refuse a RAW URL inside the work directory ``url``, or the other way round."""
    from .sources import is_url

    if raw is None or not is_url(os.fspath(raw)):
        return
    a, b = clean(url), clean(os.fspath(raw))
    if a == b or a.startswith(b + "/"):
        raise PrepError(f"the work directory {a} is inside RAW {b}; prep never writes into RAW")
    if b.startswith(a + "/"):
        raise PrepError(f"RAW {b} is inside the work directory {a}; give RAW and the work directory apart")


class Mirror:
    """The work directory at ``url`` and its local copy ``root``; ``pull`` and ``push`` are
    called with the copy's lock held."""

    def __init__(self, url: str, root: Path):
        from .sources import filesystem

        self.url = clean(url)
        self.root = root
        self.fs, self.base = filesystem(self.url)
        if not self.base.strip("/"):
            raise PrepError(f"work directory {self.url}: expected a bucket or folder in the URL")
        self.state_path = root.parent / STATE
        self.names = workdir.Confined(None, self.url)
        self.state: dict[str, list] = self._read_state()
        self.pulled = False
        self._saved = time.monotonic()
        self._save_took = 0.0

    # -- the record: rel -> [size, mtime_ns, inode, version at the URL (None: not known yet)] --

    def _read_state(self) -> dict[str, list]:
        try:
            state = workdir.read_json(self.state_path)
        except (OSError, PrepError, UnicodeDecodeError):
            return {}
        if not (isinstance(state, dict) and state.get("url") == self.url and isinstance(state.get("files"), dict)):
            return {}
        return {rel: entry for rel, entry in state["files"].items()
                if self._name_problem(rel) is None and isinstance(entry, list) and len(entry) == 4}

    def _save_state(self, *, now: bool = True) -> None:
        if now or time.monotonic() - self._saved > max(SAVE_EVERY, 10 * self._save_took):
            started = time.monotonic()
            workdir.write_json(self.state_path, {"url": self.url, "files": self.state}, indent=None)
            self._saved = time.monotonic()
            self._save_took = self._saved - started

    def _name_problem(self, rel: Any) -> str | None:
        """Why ``rel`` cannot be a file of the mirror, or None."""
        try:
            self.names(rel, "the work directory's objects")  # no '..', nor an empty or '.' part
        except PrepError as err:
            return str(err)
        return None

    # -- what is where --------------------------------------------------------------------------

    def _remote(self) -> dict[str, tuple[int, str]]:
        """Every object under the URL: relative name -> (size, version)."""
        top = self.base.lstrip("/").split("/", 1)[0]
        try:
            self.fs.invalidate_cache(self.base)
            if top and self.fs.protocol not in ("file", "local") and not self.fs.exists(top):
                raise PrepError(f"work directory {self.url}: {top} does not exist; create it first")
            found = self.fs.find(self.base, detail=True) if self.fs.exists(self.base) else {}
        except (OSError, ValueError) as err:
            raise PrepError(f"cannot list the work directory {self.url}: {err}") from None
        out = {}
        for key, info in found.items():
            rel = key[len(self.base.rstrip("/")):].lstrip("/")
            raw_key = str(info.get("Key") or info.get("name") or key)
            if info.get("type") == "directory" or raw_key.endswith("/") or not rel or SKIP.search(rel):
                continue  # a folder, a folder marker (what "create folder" makes), a temporary
            problem = self._name_problem(rel)
            if problem:
                raise PrepError(problem)
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            out[rel] = (int(info.get("size") or 0), str(version))
        folders = {rel.rsplit("/", 1)[0] for rel in out if "/" in rel}
        folders = {"/".join(f.split("/")[:i]) for f in folders for i in range(1, f.count("/") + 2)}
        for rel in sorted(folders & out.keys()):
            if out[rel][0] == 0:
                del out[rel]  # an empty object named as a folder: a marker
            else:
                raise PrepError(f"work directory {self.url}: {rel} is both a file and a folder")
        return out

    def _local_files(self) -> Iterator[str]:
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, "/")
                if not SKIP.search(rel):
                    yield rel

    def _stat(self, rel: str) -> list | None:
        try:
            st = os.lstat(self.root / rel)
        except FileNotFoundError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _upload(self, batch: list[str], stats: list) -> None:
        """Upload the files ``batch`` (their sizes in ``stats``): together, but each one over
        :data:`BIG` alone, in parts."""
        small = [rel for rel, st in zip(batch, stats) if st is None or st[0] <= BIG]
        try:
            self.fs.put([str(self.root / rel) for rel in small], [f"{self.base}/{rel}" for rel in small])
            for rel, st in zip(batch, stats):
                if st is not None and st[0] > BIG:
                    self.fs.put_file(str(self.root / rel), f"{self.base}/{rel}", **self._parts(st[0]))
        except (OSError, ValueError) as err:
            raise PrepError(f"cannot upload to the work directory {self.url}: {err}") from None

    def _parts(self, size: int) -> dict:
        """The options that upload a file of ``size`` bytes in parts of :data:`PART` (s3fs only:
        other filesystems choose their own)."""
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if not {"s3", "s3a"} & set(protocols):
            return {}
        return {"chunksize": max(PART, -(-size // 9_000)), "max_concurrency": 2}

    # -- the two directions ---------------------------------------------------------------------

    def pull(self) -> int:
        """Upload what is left from before, then fetch what changed at the URL and remove what is
        gone there. Returns the files fetched."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._clear_incoming()
        if self.state or self.pulled:
            self.push()  # a change an earlier command (or stage) could not upload is not overwritten
        else:  # no record of what it holds (a new mirror, or its record lost): start it afresh
            for entry in self.root.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        remote = self._remote()
        fetch = []
        for rel, (size, version) in remote.items():
            entry, now = self.state.get(rel), self._stat(rel)
            if entry is not None and now == entry[:3] and (entry[3] == version or entry[3] is None and size == now[0]):
                entry[3] = version  # unchanged here and there (after an upload, its version is learnt now)
            else:
                fetch.append(rel)
        for rel in [rel for rel in self.state if rel not in remote]:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(self.root / rel)
            del self.state[rel]
        incoming = self.root.parent / INCOMING / str(os.getpid())
        asyncio_log = logging.getLogger("asyncio")
        level = asyncio_log.level
        asyncio_log.setLevel(logging.CRITICAL)  # a transfer cut short by Ctrl-C: no page of warnings
        try:
            for start in range(0, len(fetch), BATCH):
                batch = fetch[start:start + BATCH]
                temps = [str(incoming / f"{i}") for i in range(len(batch))]
                incoming.mkdir(parents=True, exist_ok=True)
                try:
                    self.fs.get([f"{self.base}/{rel}" for rel in batch], temps)
                except (OSError, ValueError) as err:
                    raise PrepError(f"cannot fetch from the work directory {self.url}: {err}") from None
                for rel, tmp in zip(batch, temps):
                    target = self.root / rel
                    if target.is_dir():
                        shutil.rmtree(target)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, target)
                    self.state[rel] = [*self._stat(rel), remote[rel][1]]
                self._save_state(now=False)
        finally:
            asyncio_log.setLevel(level)
            shutil.rmtree(incoming, ignore_errors=True)
            self._save_state()
        self.pulled = True
        return len(fetch)

    def _clear_incoming(self) -> None:
        """Remove downloads that processes no longer running left behind."""
        folder = self.root.parent / INCOMING
        if folder.is_dir():
            for entry in folder.iterdir():
                if not (entry.name.isdigit() and workdir._alive(int(entry.name))):
                    shutil.rmtree(entry, ignore_errors=True)

    def push(self) -> int:
        """Upload what was created or changed here, then delete at the URL what was removed here.
        Returns the files uploaded."""
        present = set()
        changed = []
        for rel in self._local_files():
            present.add(rel)
            entry = self.state.get(rel)
            if entry is None or self._stat(rel) != entry[:3]:
                changed.append(rel)
        # stamps and the manifest after everything else (not only later in a batch: a batch's
        # large files go up after its small ones)
        groups = [[rel for rel in changed if not rel.startswith(LAST)], [rel for rel in changed if rel.startswith(LAST)]]
        try:
            for group in groups:
                for start in range(0, len(group), BATCH):
                    batch = group[start:start + BATCH]
                    stats = [self._stat(rel) for rel in batch]  # as sent: a file changed meanwhile goes again
                    self._upload(batch, stats)
                    for rel, st in zip(batch, stats):
                        if st is not None:
                            self.state[rel] = [*st, None]  # its version: learnt at the next pull
                    self._save_state(now=False)
            gone = [rel for rel in self.state if rel not in present]
            keys = [f"{self.base}/{rel}" for rel in gone]
            try:
                # by exact name: fsspec's rm takes a name with * ? or [ as a pattern (b*.png would
                # delete b.png too), so those go one at a time
                plain = [key for key in keys if not _PATTERN.search(key)]
                if plain:
                    self.fs.rm(plain)
                for key in keys:
                    if _PATTERN.search(key):
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(key)
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as err:
                raise PrepError(f"cannot delete from the work directory {self.url}: {err}") from None
            for rel in gone:
                del self.state[rel]
        finally:
            self._save_state()
        return len(changed)


@contextlib.contextmanager
def synced(mirror: Mirror, *, writes: bool) -> Iterator[None]:
    """After a command that fetched ``mirror`` (under its lock), upload what it did (if it
    ``writes``), whatever way it ended: an upload that fails after the command failed is a
    warning, so that the command's own error is the one shown."""
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if writes and mirror.pulled:
            try:
                mirror.push()
            except (PrepError, KeyboardInterrupt) as err:
                if not failed:
                    raise
                log.warning("%s; run the command again to upload what it did", err or "upload interrupted")
