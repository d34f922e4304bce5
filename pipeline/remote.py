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
copy does not have them until the next command that reads them fetches them, as it fetches any
object that changed there. A command that reads no file of ``resized/`` here (:func:`leaves`:
``index``, ``split``, ``encode``, ``verify-train``, ``report``, which reads its few thumbnails at
the URL, and a ``pack`` whose Dask workers read them there) leaves that folder alone, here and
there: it neither lists, fetches, uploads nor deletes a file of it, and does not load its record
(kept apart, in ``state.resized.json``), so its memory and time do not grow with the images.

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
# folders whose record is kept apart (state.<folder>.json), for the commands that leave them alone
APART = (workdir.RESIZED_DIR,)
# commands that read no file of these folders: their copy neither fetches nor records them
LEAVES = {**dict.fromkeys(("index", "split", "encode", "verify-train"), APART),
          "report": APART}  # its few thumbnails are read at the URL (Workdir.at)


def leaves(command: str, options: dict) -> tuple[str, ...]:
    """The folders of :data:`APART` that ``command``, given ``options``, leaves alone: those of
    :data:`LEAVES`, and ``resized/`` for a `pack` whose Dask workers read it at the URL."""
    if command == "pack" and options.get("executor") == "dask":
        return (workdir.RESIZED_DIR,)
    return LEAVES.get(command, ())
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

    def __init__(self, url: str, root: Path, leave: tuple[str, ...] = ()):
        """``leave``: folders of :data:`APART` this command leaves alone (see :data:`LEAVES`)."""
        from .sources import filesystem

        self.url = clean(url)
        self.root = root
        self.fs, self.base = filesystem(self.url)
        if not self.base.strip("/"):
            raise PrepError(f"work directory {self.url}: expected a bucket or folder in the URL")
        self.state_path = root.parent / STATE
        self.names = workdir.Confined(None, self.url)
        self.leave = tuple(leave)
        self._left = tuple(f"{folder}/" for folder in self.leave)
        self.changed: set[str] = set()  # the parts of the record to save
        self.recorded = False  # whether a record was found: else the copy starts afresh
        self.state: dict[str, list] = self._read_state()
        self.pulled = False
        self._saved = time.monotonic()
        self._save_took = 0.0

    # -- the record: rel -> [size, mtime_ns, inode, version at the URL (None: not known yet)] --
    # in parts: state.json, and state.<folder>.json for each folder of APART

    @staticmethod
    def _part(rel: str) -> str:
        """The part of the record that holds ``rel``: a folder of :data:`APART`, or ''."""
        top = rel.partition("/")[0]
        return top if top != rel and top in APART else ""

    def _part_path(self, part: str) -> Path:
        return self.state_path.with_name(f"state.{part}.json") if part else self.state_path

    def _read_part(self, part: str) -> dict[str, list] | None:
        try:
            state = workdir.read_json(self._part_path(part))
        except (OSError, PrepError, UnicodeDecodeError):
            return None
        if not (isinstance(state, dict) and state.get("url") == self.url and isinstance(state.get("files"), dict)):
            return None
        return {rel: entry for rel, entry in state["files"].items()
                if self._name_problem(rel) is None and isinstance(entry, list) and len(entry) == 4}

    def _read_state(self) -> dict[str, list]:
        main = self._read_part("")
        self.recorded = main is not None
        state: dict[str, list] = {}
        for part in APART:
            if part not in self.leave:
                state.update(self._read_part(part) or {})
        # a record from a prep that kept one file holds the other parts' entries too: they are
        # the latest of their part, saved there (also for a part this command leaves alone)
        for rel, entry in (main or {}).items():
            part = self._part(rel)
            if part and part not in self.changed:
                self.changed.add(part)
                state = {r: e for r, e in state.items() if self._part(r) != part}
            state[rel] = entry
        return state

    def _save_state(self, *, now: bool = True) -> None:
        if now or time.monotonic() - self._saved > max(SAVE_EVERY, 10 * self._save_took):
            started = time.monotonic()
            parts: dict[str, dict] = {"": {}, **{part: {} for part in self.changed}}
            for rel, entry in self.state.items():
                part = parts.get(self._part(rel))
                if part is not None:
                    part[rel] = entry
            for part, files in parts.items():  # the main part always: small, and it marks the record
                workdir.write_json(self._part_path(part), {"url": self.url, "files": files}, indent=None)
            self.changed.clear()
            self.recorded = True
            self._saved = time.monotonic()
            self._save_took = self._saved - started

    def _set(self, rel: str, entry: list | None) -> None:
        """Record ``entry`` for ``rel`` (None: remove it)."""
        if entry is None:
            del self.state[rel]
        else:
            self.state[rel] = entry
        part = self._part(rel)
        if part:
            self.changed.add(part)

    def _mine(self, rel: str) -> bool:
        """Whether ``rel`` is this command's to fetch, upload or delete (not in a folder it leaves)."""
        return not rel.startswith(self._left) if self._left else True

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
            found = self._find() if self.fs.exists(self.base) else {}
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

    def _find(self) -> dict[str, dict]:
        """fsspec's ``find(base, detail=True)``, without the folders this command leaves: a
        listing of the top level, then of each folder in it."""
        if not self.leave:
            return self.fs.find(self.base, detail=True)
        found = {}
        top = self.base.rstrip("/")
        for info in self.fs.ls(self.base, detail=True):
            name = str(info.get("name", "")).rstrip("/")
            if info.get("type") != "directory":
                found[name] = info
            elif name[len(top):].lstrip("/") not in self.leave:
                found.update(self.fs.find(name, detail=True))
        return found

    def _local_files(self) -> Iterator[str]:
        for folder, dirs, files in os.walk(self.root):
            if folder == str(self.root):
                dirs[:] = [d for d in dirs if d not in self.leave]
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
        if self.recorded or self.pulled:
            self.push()  # a change an earlier command (or stage) could not upload is not overwritten
        else:  # no record of what it holds (a new mirror, or its record lost): start it afresh
            for entry in self.root.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            for part in APART:  # the record of files no longer here
                with contextlib.suppress(FileNotFoundError):
                    self._part_path(part).unlink()
            self.state.clear()
        remote = self._remote()
        fetch = []
        for rel, (size, version) in remote.items():
            entry, now = self.state.get(rel), self._stat(rel)
            if entry is not None and now == entry[:3] and (entry[3] == version or entry[3] is None and size == now[0]):
                if entry[3] != version:
                    self._set(rel, [*entry[:3], version])  # unchanged here and there: its version learnt
            else:
                fetch.append(rel)
        for rel in [rel for rel in self.state if rel not in remote and self._mine(rel)]:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(self.root / rel)
            self._set(rel, None)
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
                    self._set(rel, [*self._stat(rel), remote[rel][1]])
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
                            self._set(rel, [*st, None])  # its version: learnt at the next pull
                    self._save_state(now=False)
            gone = [rel for rel in self.state if rel not in present and self._mine(rel)]
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
                self._set(rel, None)
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
