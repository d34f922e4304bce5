"""A work directory on an object store or any fsspec filesystem: ``--workdir s3://bucket/work``.

prep's stages work on a local folder (locks, atomic renames, inodes), so a work directory given
as a URL is kept in a local copy, the mirror, one per URL under the user's cache folder
(``$PREP_CACHE``, else ``$XDG_CACHE_HOME/prep``, else ``~/.cache/prep``), and kept in step with
the URL around each command, while the command holds the mirror's lock:

- before it, what an earlier command here wrote but could not upload is uploaded (and what it
  removed, deleted); then every object that changed at the URL since this mirror last saw it,
  or that is missing here, is fetched (its ETag, else its modification time, tells; the file
  takes the object's time), and a file this mirror had that is gone there is removed: the
  command starts from what the bucket holds, whichever machine wrote it;
- after it, also when it failed or was interrupted (so that a rerun anywhere resumes), every file
  it removed is deleted there (first: a file that became a folder is never both there), then
  every file it created or changed is uploaded (one PUT each, a large file in parts: an object
  appears whole or not at all). Stage stamps (``.stamps/``) and ``manifest.json`` go last: a
  reader of the bucket sees a stage's stamp only after its outputs.

What the mirror holds is recorded beside it in SQLite (:class:`pipeline.record.Record`), and the URL is listed a
page at a time (on S3): the memory of a pull or a push does not grow with the files, and what a
stopped transfer moved stays recorded.

A Dask cluster's workers write resize's PNGs to the URL themselves (``Workdir.for_workers``): this
copy does not have them until the next command that reads them fetches them, as it fetches any
object that changed there. A command that reads no file of ``resized/`` here (:func:`leaves`:
``index``, ``split``, ``encode``, ``verify-train``, ``report``, which reads its few thumbnails at
the URL, and a ``pack`` or ``verify`` whose Dask workers read them there) leaves that folder
alone, here and there: the sync neither lists, fetches, uploads nor deletes a file of it, so its
time does not grow with the images (``verify`` lists them itself, to key its check). Unless a command before it may have changed that folder and not uploaded it:
then it uploads it first (a stamp never goes up before the files it vouches for).

A mirror is a cache: deleting it, or a folder of it, costs a fetch (a file missing here is
deleted at the URL only when a command removed it). A fresh mirror has new inodes everywhere, so
the stages check their inputs' contents again before trusting them (see workdir.Stamp). Every key
fetched, and every name in the mirror's record, is confined to the mirror: a key leaving it
(``a/../../x``), or one that a filesystem would rename (``a//b``, ``a/./b``), is refused in one
line. One machine writes to a work directory URL at a time: the bucket has no lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import os
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from . import sources, workdir
from .errors import PrepError
from .record import Record

log = logging.getLogger(__name__)

RECORD = "record.sqlite"  # beside the mirror: what it holds, as fetched or uploaded
SYNC_LOCK = "sync.lock"  # beside the mirror: held while it is pulled or pushed
# folders that commands which read none of their files leave alone: in the bucket, in the copy
# and in the record (see leaves)
APART = (workdir.RESIZED_DIR,)
LEAVES = {"index", "split", "encode", "verify-train", "report"}  # report reads its thumbnails at the URL
INCOMING = "incoming"  # beside the mirror: downloads in progress, one folder per process
# never synced: the lock, and temporary files and folders (and anything inside them)
SKIP = re.compile(r"(^|/)(\.lock|\.[^/]*\.tmp|[^/]*\.tmp-\d+|\.[^/]*\.old)(/|$)")
BATCH = 256  # files per fsspec call (it runs each call's transfers concurrently)
# s3fs sends a file under 100 MiB in one PUT, read whole (and copied: 180 MB of peak memory for a
# file of 90 MB, measured), a larger one in parts of 50 MiB, 10 at a time: the tables of millions
# of images would take hundreds of MB. A file over BIG goes up alone, in parts of PART, 2 at a
# time (one PUT under twice PART; about 32 MB whatever the size; S3 allows 10,000 parts, so
# larger ones for a file over 80 GB)
BIG = PART = 8 << 20


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


def leaves(command: str, options: dict) -> tuple[str, ...]:
    """The folders of :data:`APART` that ``command``, given ``options``, leaves alone: all of
    them for :data:`LEAVES`, and for a ``pack`` or ``verify`` whose Dask workers read them at
    the URL."""
    if command in LEAVES or command in ("pack", "verify") and options.get("executor") == "dask":
        return APART
    return ()


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


def _recorded(method):
    """``method`` of a Mirror (a pull or a push), run alone: two commands that share the copy's
    lock (`verify` and `status`) sync it one after the other. The record's errors (a damaged
    file, a full disk) are one line naming it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        import fcntl

        self.root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root.parent / SYNC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            return method(self, *args, **kwargs)
        except sqlite3.Error as err:  # locked, a full disk, damaged
            raise PrepError(f"{self.root.parent / RECORD}: {err} (the record of the work directory's local copy;"
                            " if it is damaged, delete it to start the copy afresh from the bucket, losing what"
                            " the copy did not upload)") from None
        except UnicodeEncodeError as err:
            raise PrepError(f"a file name of the work directory's local copy is not UTF-8 ({err.object!r});"
                            " a bucket's names are") from None
        finally:
            os.close(fd)

    return wrapper


class Mirror:
    """The work directory at ``url`` and its local copy ``root``; ``pull`` and ``push`` are
    called with the copy's lock held. ``leave``: folders of :data:`APART` this command leaves
    alone (see :func:`leaves`), unless a command before it may have changed them and not
    uploaded them all."""

    def __init__(self, url: str, root: Path, leave: tuple[str, ...] = (), writes: bool = True):
        """``writes``: whether the command may change the copy (False for `status`)."""
        from .sources import filesystem

        self.url = clean(url)
        self.root = root
        self.fs, self.base = filesystem(self.url)
        if not self.base.strip("/"):
            raise PrepError(f"work directory {self.url}: expected a bucket or folder in the URL")
        self.names = workdir.Confined(None, self.url)
        self.leave = tuple(leave)
        self.left: tuple[str, ...] = ()  # what this command leaves, decided when it pulls
        self.writes = writes
        self.pulled = False

    @functools.cached_property
    def record(self) -> Record:
        """The record, opened once the copy's lock is held (its first pull or push)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        return Record(self.root.parent / RECORD, self.url, self._name_problem, APART)

    def _name_problem(self, rel: Any) -> str | None:
        """Why ``rel`` cannot be a file of the mirror, or None."""
        try:
            self.names(rel, "the work directory's objects")  # no '..', nor an empty or '.' part
        except PrepError as err:
            return str(err)
        return None

    # -- what is where --------------------------------------------------------------------------

    def _listing(self) -> Iterator[tuple[str, int, str, int | None]]:
        """Every object under the URL but in the folders left: (relative name, size, version,
        mtime_ns or None), a page at a time; folder markers and temporaries left out. A name
        that cannot be a file of the copy, or that is both a file and a folder, is a one-line
        error."""
        top = self.base.lstrip("/").split("/", 1)[0]
        try:
            self.fs.invalidate_cache(self.base)
            if top and self.fs.protocol not in ("file", "local") and not self.fs.exists(top):
                raise PrepError(f"work directory {self.url}: {top} does not exist or cannot be reached; create it"
                                " first, or check the endpoint and credentials")
            if self.fs.exists(self.base):
                yield from self._without_markers(self._objects())
        except (OSError, ValueError) as err:
            raise PrepError(f"cannot list the work directory {self.url}: {err}") from None

    def _objects(self) -> Iterator[tuple[str, dict]]:
        """(relative name, fsspec's or S3's details) of the objects under the URL but in the
        folders left, in the order of their names: on S3 a page of 1,000 at a time; elsewhere
        as fsspec's find lists them (all at once)."""
        base = self.base.rstrip("/")
        if self._is_s3():
            bucket, key, _ = self.fs.split_path(base)
            prefix = f"{key}/" if key else ""
            top = []
            for page in self._pages(bucket, prefix, "/"):
                top += [(c["Key"][len(prefix):], c) for c in page.get("Contents", [])]
                top += [(d["Prefix"][len(prefix):], None) for d in page.get("CommonPrefixes", [])]
            folders = {rel.rstrip("/") for rel, info in top if info is None}
            for rel, info in sorted(top, key=lambda item: item[0]):
                if info is not None and rel in folders & set(self.left):  # its folder is not listed: said here
                    if int(info.get("Size") or 0):
                        raise PrepError(f"work directory {self.url}: {rel} is both a file and a folder")
                elif info is not None:
                    yield rel, info
                elif rel.rstrip("/") not in self.left:
                    for page in self._pages(bucket, prefix + rel):
                        yield from ((c["Key"][len(prefix):], c) for c in page.get("Contents", []))
            return
        if self.left:  # the top level, then each folder in it not left
            found = {}
            for info in self.fs.ls(self.base, detail=True):
                name = str(info.get("name", "")).rstrip("/")
                if info.get("type") != "directory":
                    found[name] = info
                elif name[len(base):].lstrip("/") not in self.left:
                    found.update(self.fs.find(name, detail=True))
        else:
            found = self.fs.find(self.base, detail=True)
        for key in sorted(found):
            yield key[len(base):].lstrip("/"), found[key]

    def _is_s3(self) -> bool:
        return sources.is_s3(self.fs)

    def _pages(self, bucket: str, prefix: str, delimiter: str = "") -> Iterator[dict]:
        return sources.s3_pages(self.fs, bucket, prefix, delimiter)

    def _without_markers(self, objects: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, int, str, int | None]]:
        """The files among ``objects`` (in the order of their names) as (rel, size, version,
        mtime_ns): an empty object named as a folder of later ones (what a console's "create
        folder" makes) is left out, and a larger one is an error. Each object waits until no
        later name can be inside it: those are the names that start with it and "/", and come
        before any name after it that does not start with it, or goes on with a character
        after "/" (a few wait at a time)."""
        waiting: list[tuple[str, int, str, int | None]] = []
        for rel, info in objects:
            if (info.get("type") == "directory" or str(info.get("Key") or info.get("name") or rel).endswith("/")
                    or not rel or SKIP.search(rel)):
                continue  # a folder, a folder marker ending with "/", a temporary
            problem = self._name_problem(rel)
            if problem:
                raise PrepError(problem)
            while waiting:
                held = waiting[-1][0]
                if rel.startswith(held + "/"):
                    if waiting[-1][1]:
                        raise PrepError(f"work directory {self.url}: {held} is both a file and a folder")
                    waiting.pop()  # an empty object named as a folder: a marker
                elif rel.startswith(held) and rel[len(held)] < "/":
                    break  # a later name may still be inside it
                else:
                    yield waiting.pop()
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            waiting.append((rel, int(info.get("Size") or info.get("size") or 0), str(version), _mtime_ns(info)))
        yield from reversed(waiting)

    def _local_files(self) -> Iterator[str]:
        for folder, dirs, files in os.walk(self.root):
            if folder == str(self.root):
                dirs[:] = [d for d in dirs if d not in self.left]
            dirs.sort()
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, "/")
                if not SKIP.search(rel):
                    yield rel

    def _stat(self, rel: str) -> list | None:
        try:
            st = os.lstat(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):
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
        if not self._is_s3():
            return {}
        return {"chunksize": max(PART, -(-size // 9_000)), "max_concurrency": 2}

    # -- the two directions ---------------------------------------------------------------------

    @_recorded
    def pull(self) -> int:
        """Upload what is left from before, then fetch what changed at the URL (and what is
        missing here) and remove what is gone there. Returns the files fetched."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._clear_incoming()
        # a folder that a command before this one may have changed and not uploaded whole is not
        # left: its files go up before anything of it is trusted at the URL (a stamp, a table)
        self.left = tuple(folder for folder in self.leave if folder not in self.record.dirty)
        if self.record.found or self.pulled:
            self._push()  # a change an earlier command (or stage) could not upload is not overwritten
        else:  # no record of what it holds (a new mirror, or its record lost): start it afresh
            for entry in self.root.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            self.record.clear()
        seen = self.record.next_pass()
        fetched = 0
        batch: list[tuple[str, str, int | None]] = []
        asyncio_log = logging.getLogger("asyncio")
        level = asyncio_log.level
        asyncio_log.setLevel(logging.CRITICAL)  # a transfer cut short by Ctrl-C: no page of warnings
        try:
            for rel, size, version, mtime in self._listing():
                entry, now = self.record.get(rel), self._stat(rel)
                if entry is not None and now == list(entry[:3]) and (
                        entry[3] == version or entry[3] is None and size == now[0]):
                    self.record.see(rel, version, seen)  # unchanged here and there (after an upload: its version learnt)
                    continue
                batch.append((rel, version, mtime))
                if len(batch) == BATCH:
                    fetched += self._fetch(batch, seen)
                    batch = []
            fetched += self._fetch(batch, seen)
            for rel in self.record.unseen(seen, self.left):  # gone there
                if self._name_problem(rel) is None:  # a damaged record's name: nothing removed for it
                    with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
                        os.unlink(self.root / rel)
                self.record.drop(rel)
            if self.writes:  # until its upload after the command, what it may change here is not what the URL has
                self.record.set_dirty(set(APART) - set(self.left))
        finally:
            asyncio_log.setLevel(level)
            self.record.commit()
        self.pulled = True
        return fetched

    def _fetch(self, batch: list[tuple[str, str, int | None]], seen: int) -> int:
        """Fetch the objects ``batch`` (rel, version, mtime) into the copy, each in place whole
        once it has come, with the object's time as its mtime."""
        if not batch:
            return 0
        incoming = self.root.parent / INCOMING / str(os.getpid())
        incoming.mkdir(parents=True, exist_ok=True)
        temps = [str(incoming / f"{i}") for i in range(len(batch))]
        try:
            self.fs.get([f"{self.base}/{rel}" for rel, _, _ in batch], temps)
        except (OSError, ValueError) as err:
            raise PrepError(f"cannot fetch from the work directory {self.url}: {err}") from None
        try:
            for (rel, version, mtime), tmp in zip(batch, temps):
                target = self.root / rel
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                self._make_folder(rel)
                if mtime is not None:
                    os.utime(tmp, ns=(mtime, mtime))
                os.replace(tmp, target)
                self.record.put(rel, self._stat(rel), version, seen)
        finally:
            self.record.commit()
            shutil.rmtree(incoming, ignore_errors=True)
        return len(batch)

    def _make_folder(self, rel: str) -> None:
        """The folders of ``rel`` here; a file in their place (a folder at the URL now) is removed."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            path = self.root / folder
            if path.is_symlink() or path.exists() and not path.is_dir():
                path.unlink()
                self.record.drop(folder)
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)

    def _clear_incoming(self) -> None:
        """Remove downloads that processes no longer running left behind."""
        folder = self.root.parent / INCOMING
        if folder.is_dir():
            for entry in folder.iterdir():
                if not (entry.name.isdigit() and workdir._alive(int(entry.name))):
                    shutil.rmtree(entry, ignore_errors=True)

    @_recorded
    def push(self) -> int:
        """See :meth:`_push`."""
        return self._push()

    def _push(self) -> int:
        """Delete at the URL what a command removed here (after it: once this copy has been
        pulled), then upload what was created or changed here. Before one, only what an earlier
        command removed and could not delete there is deleted: a file missing here otherwise
        (the copy, or a folder of it, deleted by hand) is fetched again, not deleted there.
        What to upload, and what was removed, is noted in the record before anything is sent:
        an upload that fails leaves both for the next command. Returns the files uploaded."""
        after = self.pulled
        seen = self.record.next_pass()
        try:
            for rel in self._local_files():
                entry, now = self.record.get(rel), self._stat(rel)
                if entry is not None:
                    self.record.see(rel, entry[3], seen)
                if entry is None or now != list(entry[:3]) or entry[4]:
                    self.record.add_pending(rel)
            if after:
                for rel in self.record.unseen(seen, self.left):
                    self.record.mark_removed(rel)
            self.record.commit()
            # deleted first: a file that became a folder here (x, then x/y) is never both there
            self._delete(self.record.unseen(seen, self.left, removed=True))
            sent = 0
            for last in (False, True):  # stamps and the manifest after everything else (large files too)
                batch: list[str] = []
                for rel in itertools.chain(self.record.pending(last), [None]):
                    if rel is not None:
                        batch.append(rel)
                        if len(batch) < BATCH:
                            continue
                    sent += self._send(batch, seen)
                    batch = []
            if after:
                self.record.set_dirty(set())
        finally:
            self.record.commit()
        return sent

    def _send(self, batch: list[str], seen: int) -> int:
        if batch:
            stats = [self._stat(rel) for rel in batch]  # as sent: a file changed meanwhile goes again
            self.record.commit()  # no transaction open across the network
            self._upload(batch, stats)
            for rel, st in zip(batch, stats):
                if st is not None:
                    self.record.put(rel, st, None, seen)  # its version: learnt at the next pull
            self.record.commit()
        return len(batch)

    def _delete(self, gone: Iterator[str]) -> None:
        """Delete the files ``gone`` at the URL, by their exact names, and from the record. Not
        with fsspec's rm, which takes a name with * ? or [ for a pattern (b*.png would delete
        b.png too), and a name that is also a folder there for that folder: on S3, up to 1,000
        names per request; elsewhere one at a time."""
        batch: list[str] = []
        for rel in itertools.chain(gone, [None]):
            if rel is not None:
                batch.append(rel)
                if len(batch) < 1000:
                    continue
            keys = [f"{self.base}/{name}" for name in batch if self._name_problem(name) is None]
            self.record.commit()  # no transaction open across the network
            try:
                if keys and self._is_s3():
                    from fsspec.asyn import sync

                    bucket = self.fs.split_path(keys[0])[0]
                    names = [{"Key": self.fs.split_path(key)[1]} for key in keys]
                    done = sync(self.fs.loop, self.fs._call_s3, "delete_objects", Bucket=bucket,
                                Delete={"Objects": names, "Quiet": True})
                    for error in done.get("Errors") or []:
                        raise OSError(f"{error.get('Key')}: {error.get('Code')} {error.get('Message') or ''}".strip())
                else:
                    for key in keys:
                        with contextlib.suppress(FileNotFoundError):
                            self.fs.rm_file(key)
            except (OSError, ValueError) as err:
                raise PrepError(f"cannot delete from the work directory {self.url}: {err}") from None
            for name in batch:
                self.record.drop(name)
            self.record.commit()
            batch = []


def _mtime_ns(info: dict) -> int | None:
    """An object's time of last change as nanoseconds, from fsspec's or S3's details (None if
    they give none)."""
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
    if hasattr(value, "timestamp"):
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    return None


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
