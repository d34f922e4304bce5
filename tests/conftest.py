"""Shared fixtures: real image files generated on the fly (no checked-in binaries)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image


def write_image(path: Path, size=(40, 30), color=(200, 30, 30), mode="RGB", fmt=None) -> Path:
    """Write a real image file filled with ``color`` (``fmt`` defaults to the extension's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(path, format=fmt)
    return path


def make_tree(root: Path, classes: dict[str, int], size=(24, 20), seed: int = 0) -> Path:
    """``root/<class>/img<i>.png`` with distinct pixel content per file and a colour per class."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220)]
    for c, (label, n) in enumerate(classes.items()):
        for i in range(n):
            base = np.array(palette[c % len(palette)], dtype=np.int16)
            noise = rng.integers(-20, 20, size=(size[1], size[0], 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            path = root / label / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr, "RGB").save(path)
    return root


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones included) below ``root``, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "raw", {"cat": 12, "dog": 10, "bird": 8})


@pytest.fixture
def prep(tmp_path: Path, monkeypatch):
    """Run the `prep` CLI in-process with ``--workdir tmp_path/work``: ``prep("index", raw)``.

    The working directory is ``tmp_path``, so relative paths stay inside the test's folder.
    """
    from pipeline.cli import cli

    root_logger = logging.getLogger()
    saved = (root_logger.handlers[:], root_logger.level)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREP_WORKDIR", raising=False)
    runner = CliRunner()

    def invoke(*args, workdir: Path | None = tmp_path / "work", env: dict | None = None) -> Result:
        argv = (["--workdir", str(workdir)] if workdir is not None else []) + [str(a) for a in args]
        return runner.invoke(cli, argv, env=env, catch_exceptions=False)

    yield invoke
    # the CLI configures logging onto the runner's (now closed) stderr; undo that
    root_logger.handlers[:], root_logger.level = saved


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """A user mistake: non-zero exit, one `Error:` line naming ``fragments``, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def received(monkeypatch) -> list:
    """Every shard result this process receives from resize_shard (not index's), as it arrives."""
    from pipeline import executors
    from pipeline.stages import resize

    seen = []
    map_shards = executors.map_shards

    def counting(pool, fn, shards, *args, **kw):
        for result in map_shards(pool, fn, shards, *args, **kw):
            if fn is resize.resize_shard:
                seen.append(result)
            yield result

    monkeypatch.setattr(executors, "map_shards", counting)
    return seen


def hash_entries(wd, root: str) -> list[tuple]:
    """(path, size, version, sha256, settled) of each row of the labels CSV that index's hash
    cache of ``root`` was written beside (nothing if there is none): what the cache holds."""
    from pipeline import workdir
    from pipeline.errors import PrepError

    try:
        labels = wd.labels()
        cache = workdir.HashCache.read(wd, root, workdir.sha256_file(labels))
        if cache is None:
            return []
        rows = list(workdir.iter_csv(labels, ["path", "sha256"]))
    except (OSError, PrepError):
        return []
    return [(path, *cache.listed(row), sha, bool(cache.settled[row]))
            for row, (path, sha) in enumerate(rows[: len(cache)])]
