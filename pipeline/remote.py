"""A work directory on an object store or any fsspec filesystem: ``--workdir s3://bucket/work``.

prep's stages work on a local folder (locks, atomic renames, inodes), so a work directory given
as a URL is kept in a local copy, the mirror, one per URL under the user's cache folder
(``$PREP_CACHE``, else ``$XDG_CACHE_HOME/prep``, else ``~/.cache/prep``), and kept in step with
the URL around each command:

- before it, every object that changed there since this mirror last saw it is fetched (its ETag,
  else its modification time and size, tells), and a file this mirror had that is gone there is
  removed: the command starts from what the bucket holds, whichever machine wrote it;
- after it, also when it failed or was interrupted (so that a rerun anywhere resumes), every file
  the command created or changed is uploaded (one PUT each: an object appears whole or not at all),
  then every file it removed is deleted there. Stage stamps (``.stamps/``) and ``manifest.json``
  go last: a reader of the bucket sees a stage's stamp only after its outputs.

A mirror is a cache: deleting it costs a fetch. A fresh mirror has new inodes everywhere, so the
stages check their inputs' contents again before trusting them (see workdir.Stamp), and every key
fetched is confined to the mirror (a key leaving it, as ``a/../../x``, is refused in one line).
One machine writes to a work directory URL at a time: the bucket has no lock (the mirror has
prep's usual one).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import workdir
from .errors import PrepError

STATE = "state.json"  # beside the mirror: what it holds, as fetched or uploaded
LAST = (workdir.STAMPS_DIR + "/", "manifest.json")  # uploaded after everything else
SKIP = re.compile(r"(^|/)(\.lock|\.[^/]*\.tmp|[^/]*\.tmp-\d+)$")  # never synced: the lock, temporaries


def is_remote(text: str | os.PathLike) -> bool:
    """Whether a --workdir value is a URL to mirror (``file://`` is a local folder)."""
    text = os.fspath(text)
    return "://" in text and not text.lower().startswith("file://")


def local(text: str | os.PathLike) -> Path:
    """A --workdir value as a local folder: ``file://`` URLs as their path."""
    text = os.fspath(text)
    if text.lower().startswith("file://"):
        from .sources import local_path

        return Path(local_path(text))
    return Path(text)


def cache_root() -> Path:
    if os.environ.get("PREP_CACHE"):
        return Path(os.environ["PREP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prep"


def mirror_of(url: str) -> Path:
    """The local copy of the work directory at ``url`` (its folder name tells which one)."""
    url = url.rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[1])[-60:].strip("-.") or "root"
    return cache_root() / "workdirs" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}" / "work"


@dataclass
class Mirror:
    """The work directory at ``url`` and its local copy ``root``."""

    url: str
    root: Path

    def __post_init__(self) -> None:
        from .sources import _filesystem

        self.url = self.url.rstrip("/")
        self.fs, self.base = _filesystem(self.url)
        self.state_path = self.root.parent / STATE
        self.names = workdir.Confined(None, self.url)
        self.state: dict[str, list] = self._read_state()

    def _read_state(self) -> dict[str, list]:
        try:
            state = workdir.read_json(self.state_path)
        except (OSError, PrepError):
            return {}
        ok = isinstance(state, dict) and state.get("url") == self.url and isinstance(state.get("files"), dict)
        return {k: v for k, v in state["files"].items() if isinstance(v, list) and len(v) == 4} if ok else {}

    def _save_state(self) -> None:
        workdir.write_json(self.state_path, {"url": self.url, "files": self.state}, indent=None)

    def _remote(self) -> dict[str, tuple[int, Any]]:
        """Every object under the URL: relative name -> (size, version)."""
        try:
            self.fs.invalidate_cache(self.base)
            found = self.fs.find(self.base, detail=True) if self.fs.exists(self.base) else {}
        except (OSError, ValueError) as err:
            raise PrepError(f"cannot list the work directory {self.url}: {err}") from None
        out = {}
        for key, info in found.items():
            if info.get("type") == "directory":
                continue
            rel = key[len(self.base):].lstrip("/")
            if not rel or SKIP.search(rel):
                continue
            self.names(rel, "the work directory's objects")  # refuses a key leaving the mirror
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            out[rel] = (int(info.get("size") or 0), str(version))
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

    def pull(self) -> int:
        """Fetch what changed at the URL; remove what is gone there. Returns the files fetched."""
        self.root.mkdir(parents=True, exist_ok=True)
        remote = self._remote()
        fetch = [rel for rel, (_, version) in remote.items()
                 if (entry := self.state.get(rel)) is None or entry[3] != version or self._stat(rel) != entry[:3]]
        for rel in [rel for rel in self.state if rel not in remote]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / rel)
            del self.state[rel]
        for start in range(0, len(fetch), 256):
            batch = fetch[start:start + 256]
            temps = []
            for rel in batch:
                target = self.root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                temps.append(str(target.with_name(f".{target.name}.{os.getpid()}.tmp")))
            try:
                self.fs.get([f"{self.base}/{rel}" for rel in batch], temps)
                for rel, tmp in zip(batch, temps):
                    os.replace(tmp, self.root / rel)
                    self.state[rel] = [*self._stat(rel), remote[rel][1]]
            except (OSError, ValueError) as err:
                raise PrepError(f"cannot fetch from the work directory {self.url}: {err}") from None
            finally:
                for tmp in temps:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            self._save_state()
        self._save_state()
        return len(fetch)

    def push(self) -> int:
        """Upload what the command created or changed, then delete what it removed. Returns the
        files uploaded."""
        present = set()
        changed = []
        for rel in self._local_files():
            present.add(rel)
            entry = self.state.get(rel)
            if entry is None or self._stat(rel) != entry[:3]:
                changed.append(rel)
        changed.sort(key=lambda rel: rel.startswith(LAST))  # stamps and the manifest last
        for start in range(0, len(changed), 256):
            batch = changed[start:start + 256]
            stats = [self._stat(rel) for rel in batch]  # as uploaded (a file changed meanwhile is sent again)
            try:
                self.fs.put([str(self.root / rel) for rel in batch], [f"{self.base}/{rel}" for rel in batch])
            except (OSError, ValueError) as err:
                raise PrepError(f"cannot upload to the work directory {self.url}: {err}") from None
            for rel, st in zip(batch, stats):
                self.state[rel] = [*st, None]  # its version, from the listing below
            self._save_state()
        gone = [rel for rel in self.state if rel not in present]
        if gone:
            try:
                self.fs.rm([f"{self.base}/{rel}" for rel in gone])
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as err:
                raise PrepError(f"cannot delete from the work directory {self.url}: {err}") from None
            for rel in gone:
                del self.state[rel]
        if changed:
            remote = self._remote()
            for rel in changed:
                if rel in remote and rel in self.state:
                    self.state[rel][3] = remote[rel][1]
        self._save_state()
        return len(changed)


@contextlib.contextmanager
def synced(url: str, *, writes: bool) -> Iterator[None]:
    """Around a command that holds the lock of ``mirror_of(url)``: fetch what changed at
    ``url`` before it; after it (if it ``writes``), whatever way it ends, upload what it did."""
    mirror = Mirror(url, mirror_of(url))
    mirror.pull()
    try:
        yield
    finally:
        if writes:
            mirror.push()
