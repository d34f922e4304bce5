"""RAW as a folder or a URL: the same listing rules, index and resize outputs from s3:// and file://.

The S3 tests run against an S3-compatible server (moto) on 127.0.0.1, reached by s3fs through the
standard AWS environment variables, as a user would point prep at MinIO or Ceph.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import assert_one_line_error, make_tree, tree_digests, write_image
from pipeline import sources
from pipeline.executors import Execution
from pipeline.stages import index

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask a metadata address for credentials
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="module")
def s3():
    """A boto3 client of an S3-compatible server on 127.0.0.1; s3fs finds it via AWS_ENDPOINT_URL."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            mp.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would keep its endpoint
        yield boto3.client("s3")
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def upload(client, tree: Path) -> str:
    """Copy ``tree`` (empty folders as placeholder keys) into a fresh bucket; return its s3:// URL."""
    bucket = f"raw-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for dirpath, dirnames, filenames in os.walk(tree):
        rel_dir = Path(dirpath).relative_to(tree).as_posix()
        prefix = "data/" if rel_dir == "." else f"data/{rel_dir}/"
        if not dirnames and not filenames:
            client.put_object(Bucket=bucket, Key=prefix, Body=b"")
        for name in filenames:
            client.put_object(Bucket=bucket, Key=prefix + name, Body=(Path(dirpath) / name).read_bytes())
    return f"s3://{bucket}/data"


def copy_to_memory(tree: Path) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/{uuid.uuid4().hex[:12]}"
    for dirpath, dirnames, filenames in os.walk(tree):
        rel_dir = Path(dirpath).relative_to(tree).as_posix()
        folder = root if rel_dir == "." else f"{root}/{rel_dir}"
        fs.makedirs(folder, exist_ok=True)
        for name in filenames:
            fs.pipe_file(f"{folder}/{name}", (Path(dirpath) / name).read_bytes())
    return f"memory://{root}"


@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    """Classes, plus every kind of file the listing must skip, a nested folder and an empty class."""
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 2})
    write_image(raw / "dog" / "2021" / "deep.jpg")
    write_image(raw / "cat" / ".hidden.png")
    write_image(raw / ".git" / "inside.png")
    write_image(raw / "__MACOSX" / "cat" / "img0.png")
    (raw / "cat" / "Thumbs.db").write_bytes(b"junk")
    (raw / "cat" / "notes.txt").write_text("not an image")
    write_image(raw / "loose.png")
    (raw / "empty").mkdir()
    return raw


def summary(listing: sources.Listing) -> tuple:
    return (
        sorted(listing.files),
        {reason: sorted(items) for reason, items in listing.skipped.items()},
        sorted(listing.folders),
        {rel: size for rel, size, _ in listing.entries()},
    )


def test_a_url_is_listed_by_the_same_rules_as_a_folder(odd_tree, s3):
    expected = summary(sources.list_files(odd_tree))
    assert expected[0] == ["cat/img0.png", "cat/img1.png", "cat/img2.png", "dog/2021/deep.jpg",
                           "dog/img0.png", "dog/img1.png", "loose.png"]
    assert expected[1] == {
        "hidden": [".git/", "__MACOSX/", "cat/.hidden.png", "cat/Thumbs.db"],
        "not an image extension": ["cat/notes.txt"],
    }
    assert expected[2] == ["cat", "dog", "empty"]
    for url in (odd_tree.as_uri(), copy_to_memory(odd_tree), upload(s3, odd_tree)):
        assert summary(sources.list_files(url)) == expected, url


def test_local_roots_and_remote_urls():
    assert sources.local_path("raw") == "raw"
    assert sources.local_path("file:///data/raw/") == "/data/raw"
    assert sources.local_path("memory://data/raw") is None
    assert sources.canonical("s3://bucket/raw/") == "s3://bucket/raw"
    assert sources.canonical("raw") == str(Path("raw").resolve())


def index_and_resize(prep, raw, workdir: Path, *options) -> None:
    for args in (("index", raw), ("resize", "--size", "16")):
        result = prep(*args, *options, workdir=workdir)
        assert result.exit_code == 0, result.output


def assert_same_outputs(a: Path, b: Path) -> None:
    for name in ("labels.csv", "resized.csv", "rejected.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert tree_digests(a / "resized") == tree_digests(b / "resized")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small tree with one file that is not an image, so rejected.csv is not empty."""
    raw = make_tree(tmp_path / "raw", {"cat": 9, "dog": 7, "bird": 5})
    (raw / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return raw


def test_index_and_resize_from_s3_give_the_outputs_of_the_local_folder(tmp_path, corpus, s3, prep):
    url = upload(s3, corpus)
    index_and_resize(prep, corpus, tmp_path / "local", "--executor", "serial")
    # local worker processes (forked) read the bucket: s3fs must work in a child process. prep
    # runs as its own process, as from a shell: not forked from this one, with its threads (the
    # S3 server's, fsspec's, tensorflow's when an earlier test imported it)
    for args in (("index", url), ("resize", "--size", "16")):
        done = subprocess.run([sys.executable, "-m", "pipeline", "-q", "--workdir", str(tmp_path / "s3"), *args,
                               "--executor", "local", "--workers", "2"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert_same_outputs(tmp_path / "local", tmp_path / "s3")
    assert json.loads((tmp_path / "s3" / "index.json").read_text())["raw"] == url
    rejected = (tmp_path / "s3" / "rejected.csv").read_text()
    assert "dog/broken.png" in rejected


def test_index_rehashes_an_object_only_when_its_etag_changes(tmp_path, s3, monkeypatch):
    url = upload(s3, make_tree(tmp_path / "raw", {"cat": 3, "dog": 3}))
    wd = index.workdir.Workdir(tmp_path / "work")
    cfg = index.IndexConfig(raw=url, workdir=wd, out=wd.path("labels.csv"), execution=Execution("serial", progress=False))
    index.run(cfg)
    reads = []
    read_bytes = sources.read_bytes
    monkeypatch.setattr(sources, "read_bytes", lambda root, rel: reads.append(rel) or read_bytes(root, rel))
    index.run(cfg)
    assert reads == []
    new = (tmp_path / "raw" / "dog" / "img0.png").read_bytes()  # same size, new content
    bucket, prefix = url[len("s3://"):].split("/", 1)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/cat/img1.png", Body=new)
    index.run(cfg)
    assert reads == ["cat/img1.png"]
    rows = {r["path"]: r["sha256"] for r in index.workdir.read_csv(wd.path("labels.csv"))}
    assert rows["cat/img1.png"] == rows["dog/img0.png"]


def test_file_url_gives_the_outputs_of_the_path_and_is_recorded_as_given(tmp_path, corpus, prep):
    index_and_resize(prep, corpus, tmp_path / "path", "--executor", "serial")
    index_and_resize(prep, corpus.as_uri(), tmp_path / "url", "--executor", "serial")
    assert_same_outputs(tmp_path / "path", tmp_path / "url")
    assert json.loads((tmp_path / "url" / "index.json").read_text())["raw"] == corpus.as_uri()


def test_resize_raw_option_takes_a_url(tmp_path, corpus, prep):
    index_and_resize(prep, corpus, tmp_path / "path", "--executor", "serial")
    assert prep("index", corpus, "--executor", "serial", workdir=tmp_path / "url").exit_code == 0
    result = prep("resize", "--size", "16", "--raw", corpus.as_uri(), "--executor", "serial", workdir=tmp_path / "url")
    assert result.exit_code == 0, result.output
    assert_same_outputs(tmp_path / "path", tmp_path / "url")
    missing = (tmp_path / "nowhere").as_uri()
    assert_one_line_error(prep("resize", "--raw", missing, workdir=tmp_path / "url"), "--raw", missing)


def test_a_missing_prefix_in_a_bucket_is_a_one_line_error(tmp_path, corpus, s3, prep):
    url = upload(s3, corpus)
    assert_one_line_error(prep("index", url + "-typo"), "does not exist", url + "-typo")


def test_an_unknown_protocol_is_a_one_line_error(prep):
    assert_one_line_error(prep("index", "nosuch://bucket/raw"), "nosuch://bucket/raw", "Protocol not known")


def test_a_missing_filesystem_package_names_the_extra_to_install(monkeypatch, prep):
    import fsspec

    if "gs" in fsspec.registry:
        pytest.skip("gcsfs was imported by an earlier test")
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    assert_one_line_error(prep("index", "gs://bucket/raw"), "gs://bucket/raw", "pip install gcsfs")


def test_a_filesystem_that_cannot_connect_is_a_one_line_error_naming_the_url(prep):
    assert_one_line_error(prep("index", "ftp://127.0.0.1:1/raw"), "cannot open ftp://127.0.0.1:1/raw", "refused")


@pytest.mark.parametrize("size", [0, 1, 4096, (3 << 20) + 7])
@pytest.mark.parametrize("most_per_read", [None, 1000])  # a filesystem that returns short reads
def test_read_file_returns_every_byte_and_the_status_after_reading(tmp_path, monkeypatch, size, most_per_read):
    from pipeline import workdir

    if most_per_read:
        real = os.read
        monkeypatch.setattr(workdir.os, "read", lambda fd, n: real(fd, min(n, most_per_read)))
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    read, seen = workdir.read_file(path)
    assert read == data and seen.st_size == size and seen.st_mtime_ns == path.stat().st_mtime_ns
    assert sources.read_versioned(str(tmp_path), "f.bin") == (data, (size, path.stat().st_mtime_ns))
    with pytest.raises(FileNotFoundError):
        workdir.read_file(tmp_path / "missing")


def _unnamed_files_work_in(folder) -> bool:
    from pipeline import workdir

    fd = workdir._unnamed_file(str(folder))
    if fd is not None:
        os.close(fd)
    return fd is not None


@pytest.mark.parametrize("unnamed", [True, False])  # Linux's unnamed files, or a named temporary file
@pytest.mark.parametrize("size", [0, 3172, (1 << 20) + 3])
def test_atomic_write_bytes_makes_replaces_and_leaves_nothing_else(tmp_path, monkeypatch, unnamed, size):
    from pipeline import workdir

    if unnamed and not _unnamed_files_work_in(tmp_path):
        pytest.skip("no unnamed files (O_TMPFILE and /proc) here")
    if not unnamed:
        monkeypatch.setattr(workdir, "_unnamed_file", lambda folder: None)
    renamed, opened = [], []
    real_replace, real_open = os.replace, os.open
    monkeypatch.setattr(workdir.os, "replace", lambda a, b: (renamed.append(b), real_replace(a, b)))
    monkeypatch.setattr(workdir.os, "open", lambda p, *a: (opened.append(str(p)), real_open(p, *a))[1])
    umask = os.umask(0o027)
    try:
        first = tmp_path / "new folder" / "first.png"
        workdir.atomic_write_bytes(first, b"first")  # makes the folder, through a named file
        assert first.read_bytes() == b"first" and renamed == [str(first)]
        data = os.urandom(size)
        target = first.with_name("a.png")
        workdir.atomic_write_bytes(target, data, fsync=False)
        assert target.read_bytes() == data and target.stat().st_mode & 0o777 == 0o640
        assert renamed[1:] == ([] if unnamed else [str(target)])  # linked in, not renamed
        opened.clear()
        workdir.atomic_write_bytes(target, b"replaced")  # a link never replaces: a rename does
        assert target.read_bytes() == b"replaced" and renamed[-1] == str(target)
        assert len(opened) == 1  # one file written: the unnamed one is renamed over, not written again
        assert target.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.png", "first.png", "new folder"]


def test_atomic_write_bytes_falls_back_when_unnamed_files_cannot_be_linked(tmp_path, monkeypatch):
    from pipeline import workdir

    if not _unnamed_files_work_in(tmp_path):
        pytest.skip("no unnamed files (O_TMPFILE and /proc) here")
    monkeypatch.setattr(workdir, "_unnamed_broken", False)
    real_link = os.link

    def no_proc(src, *args, **kwargs):  # as in a sandbox whose /proc shows another process
        if str(src).startswith("/proc/"):
            raise PermissionError(1, "Operation not permitted")
        return real_link(src, *args, **kwargs)

    monkeypatch.setattr(workdir.os, "link", no_proc)
    before = set(os.listdir("/proc/self/fd"))
    for name in ("a.png", "b.png", "a.png"):
        workdir.atomic_write_bytes(tmp_path / name, name.encode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert (tmp_path / "b.png").read_bytes() == b"b.png" and workdir._unnamed_broken
    assert set(os.listdir("/proc/self/fd")) <= before  # no file left open


@pytest.mark.parametrize("fieldnames", [["path", "label", "bytes"], ["path"], ["path", "absent", "empty"]])
def test_csv_bytes_are_what_csv_dictwriter_writes(fieldnames):
    import csv
    import io

    from pipeline import workdir

    rows = [
        {"path": "cat/a b.jpg", "label": "cat", "bytes": 12, "extra": "ignored", "empty": None},
        {"path": 'odd "quoted",\nname.png', "label": "é, ü", "bytes": 0},  # no "empty": written as ""
        {"path": "dog/c.jpg", "label": "", "bytes": -1, "empty": ""},
    ]
    expected = io.StringIO()
    writer = csv.DictWriter(expected, fieldnames=fieldnames, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    assert workdir.csv_bytes(fieldnames, rows) == expected.getvalue().encode("utf-8")
    assert workdir.csv_bytes(fieldnames, []) == (",".join(fieldnames) + "\n").encode()


@pytest.mark.parametrize("store", ["s3", "file"])
def test_a_listing_digest_changes_with_any_object_and_only_then(tmp_path, s3, store):
    """What verify keys its check of the PNGs on where they are at a URL (no folder has a time):
    S3 listed a page at a time, another store through fsspec's find; one that gives no version
    (fsspec's memory store) gives none, and is checked every time."""
    import fsspec

    tree = make_tree(tmp_path / "tree", {"a": 3, "b": 2})
    assert sources.listing_digest(f"memory://{copy_to_memory(tree)}") is None
    url = upload(s3, tree) if store == "s3" else f"file://{tree}"
    fs, base = fsspec.core.url_to_fs(url)
    first = sources.listing_digest(url)
    assert first is not None and sources.listing_digest(url) == first
    rewritten = f"{base}/a/img0.png"
    fs.pipe_file(rewritten, fs.cat_file(f"{base}/b/img1.png"))  # another object's bytes, same name
    second = sources.listing_digest(url)
    assert second not in (None, first)
    fs.pipe_file(f"{base}/a/new.png", b"x")
    third = sources.listing_digest(url)
    assert third not in (None, first, second)
    fs.rm_file(f"{base}/a/new.png")
    assert sources.listing_digest(url) == second
