"""A work directory given as a URL (``--workdir s3://bucket/work``), on an S3-compatible server
on 127.0.0.1 (moto): every stage runs against it, the bucket ends up holding what a local work
directory holds, and a second machine (a fresh mirror) resumes from the bucket alone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import assert_one_line_error, make_tree, tree_digests
from pipeline import remote
from test_sources import s3  # noqa: F401  (a fixture)

STAGES = [("resize", "--size", "12"), ("split",), ("encode",), ("pack", "--format", "pkl.gz"),
          ("pack", "--format", "h5")]


def bucket_files(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def synced_names(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not remote.SKIP.search(p.relative_to(root).as_posix())}


def on_bucket(tmp_path, prep, bucket: str, per_class: int, *commands: tuple) -> str:
    """The work directory URL of ``bucket`` after `prep index` of a tree of two classes of
    ``per_class`` images, then ``commands``, each of which must succeed."""
    url = f"s3://{bucket}/work"
    for args in [("index", make_tree(tmp_path / "raw", {"cat": per_class, "dog": per_class})), *commands]:
        result = prep(*args, workdir=url)
        assert result.exit_code == 0, result.output
    return url


def assert_same_pickles(a: Path, b: Path) -> None:
    """Two mnist-style pkl.gz files hold the same arrays."""
    import gzip
    import pickle

    with gzip.open(a) as one, gzip.open(b) as other:
        for (x1, y1), (x2, y2) in zip(pickle.load(one), pickle.load(other)):
            assert (x1 == x2).all() and (y1 == y2).all()


@pytest.fixture
def bucket(s3, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    name = f"work-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def test_every_stage_on_a_bucket_matches_a_local_work_directory(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 8, "dog": 7})
    url = f"s3://{bucket}/work"
    for args in [("index", raw), *STAGES, ("verify",)]:
        assert prep(*args, workdir=tmp_path / "local").exit_code == 0
        result = prep(*args, workdir=url)
        assert result.exit_code == 0, result.output
    stored = bucket_files(s3, bucket, "work")
    mirror = remote.mirror_of(url)
    assert set(stored) == synced_names(mirror)  # every file, no lock or temporary
    assert ".lock" not in stored
    local = tree_digests(tmp_path / "local")
    for name in ("labels.csv", "splits.csv", "encoded.csv", "classes.json", "resized.csv"):
        assert stored[name] == (tmp_path / "local" / name).read_bytes(), name
    pngs = [name for name in stored if name.startswith("resized/")]
    assert len(pngs) == 15
    assert all(remote.hashlib.sha256(stored[n]).hexdigest() == local[n] for n in pngs)
    (tmp_path / "from-bucket.pkl.gz").write_bytes(stored["dataset.pkl.gz"])
    assert_same_pickles(tmp_path / "local" / "dataset.pkl.gz", tmp_path / "from-bucket.pkl.gz")


def test_a_fresh_mirror_resumes_from_the_bucket_alone(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 6, "dog": 6})
    url = f"s3://{bucket}/work"
    for args in [("index", raw), ("resize", "--size", "12")]:
        assert prep(*args, workdir=url).exit_code == 0
    shutil.rmtree(remote.mirror_of(url).parent)  # another machine: nothing but the bucket
    for args in [("split",), ("encode",), ("pack", "--format", "pkl.gz")]:
        result = prep(*args, workdir=url)
        assert result.exit_code == 0, result.output
    stored = bucket_files(s3, bucket, "work")
    assert "dataset.pkl.gz" in stored and "splits.csv" in stored
    before = stored["resized.csv"]
    result = prep("resize", "--size", "12", workdir=url)  # up to date from the fetched files
    assert result.exit_code == 0 and bucket_files(s3, bucket, "work")["resized.csv"] == before



def test_verify_takes_the_url_as_its_workdir_argument(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 6, "dog": 6})
    url = f"s3://{bucket}/work"
    for args in [("index", raw), *STAGES[:4]]:
        assert prep(*args, workdir=url).exit_code == 0
    shutil.rmtree(remote.mirror_of(url).parent)  # another machine: nothing but the bucket
    result = prep("verify", url, "--executor", "serial", workdir=None)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Verified pkl.gz: 1 file")
    assert (remote.mirror_of(url) / "dataset.pkl.gz").is_file()  # fetched into its copy, as with --workdir
    assert_one_line_error(prep("verify", url, "--workdir", tmp_path / "other", workdir=None),
                          f"two work directories: {url} and --workdir {tmp_path / 'other'}")


def test_a_file_removed_by_a_command_is_deleted_from_the_bucket_and_a_changed_one_fetched(
        tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 5, "dog": 5})
    url = f"s3://{bucket}/work"
    assert prep("index", raw, workdir=url).exit_code == 0
    mirror = remote.Mirror(url, remote.mirror_of(url))
    s3.put_object(Bucket=bucket, Key="work/notes/extra.txt", Body=b"from elsewhere")
    assert mirror.pull() == 1
    assert (mirror.root / "notes" / "extra.txt").read_bytes() == b"from elsewhere"
    assert mirror.pull() == 0  # nothing changed since
    (mirror.root / "notes" / "extra.txt").unlink()
    assert mirror.push() == 0
    assert "notes/extra.txt" not in bucket_files(s3, bucket, "work")


def test_a_key_leaving_the_work_directory_is_refused(tmp_path, prep, s3, bucket):  # noqa: F811
    s3.put_object(Bucket=bucket, Key="work/a/../../escape.txt", Body=b"x")
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    if "work/a/../../escape.txt" not in keys:
        pytest.skip("the server normalised the key")
    result = prep("status", workdir=f"s3://{bucket}/work")
    assert_one_line_error(result, "..")
    assert not (tmp_path / "cache" / "escape.txt").exists()


def test_an_unknown_protocol_is_one_line(prep):
    result = prep("status", workdir="nosuchfs://bucket/work")
    assert_one_line_error(result, "nosuchfs://bucket/work")


def test_a_file_url_is_the_folder_itself(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    result = prep("index", raw, workdir=f"file://{tmp_path / 'w'}")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "labels.csv").is_file()


@pytest.mark.parametrize("command", [("status",), ("index", "raw")])
def test_a_cache_folder_that_cannot_hold_the_copy_is_named(tmp_path, prep, monkeypatch, command):
    """$PREP_CACHE a file: the error names it (the copy's own path is shown as the URL, which
    said only "s3://bucket/work: Not a directory")."""
    make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    result = prep(*command, workdir="s3://bucket/work")
    assert_one_line_error(result, "local copy of s3://bucket/work", f"in {tmp_path / 'cache'}:", "Not a directory",
                          "$PREP_CACHE")
    assert (tmp_path / "cache").read_text() == "a file, not a folder"


def test_messages_name_the_url_not_the_local_copy(tmp_path, prep, bucket):
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    url = f"s3://{bucket}/work"
    assert prep("index", raw, workdir=url).exit_code == 0
    result = prep("pack", workdir=url)  # encode has not run
    assert_one_line_error(result, url)
    assert str(remote.mirror_of(url)) not in result.output


def test_status_beside_a_writer_fetches_nothing_over_its_work(tmp_path, prep, s3, bucket):  # noqa: F811
    import subprocess
    import sys
    import textwrap

    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    url = f"s3://{bucket}/work"
    assert prep("index", raw, workdir=url).exit_code == 0
    mirror = remote.mirror_of(url)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pipeline.workdir import Workdir
        with Workdir(Path({str(mirror)!r})).lock():
            labels = Path({str(mirror)!r}) / "labels.csv"
            labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))  # one image fewer
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    before = (mirror / "labels.csv").read_text()
    try:
        assert writer.stdout.readline().strip() == "held"
        result = prep("status", workdir=url)
        assert result.exit_code == 0, result.output
        assert (mirror / "labels.csv").read_text() == "".join(before.splitlines(keepends=True)[:-1])
    finally:
        writer.communicate("")


def test_a_bucket_holding_files_prep_did_not_write_is_not_taken_over(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    s3.put_object(Bucket=bucket, Key="proj/labels.csv", Body=b"mine")
    result = prep("index", raw, workdir=f"s3://{bucket}/proj")
    assert_one_line_error(result, "labels.csv", "prep did not write")
    assert bucket_files(s3, bucket, "proj") == {"labels.csv": b"mine"}


def test_raw_and_the_work_directory_may_not_overlap_as_urls(tmp_path, prep, s3, bucket):  # noqa: F811
    assert_one_line_error(prep("index", f"s3://{bucket}/work", workdir=f"s3://{bucket}/work"), "inside RAW")
    assert_one_line_error(prep("index", f"s3://{bucket}/work/raw", workdir=f"s3://{bucket}/work"),
                          "inside the work directory")


def test_a_tampered_record_removes_nothing_outside_the_copy(tmp_path, prep, s3, bucket):  # noqa: F811
    import sqlite3

    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    url = f"s3://{bucket}/work"
    assert prep("index", raw, workdir=url).exit_code == 0
    s3.put_object(Bucket=bucket, Key="precious.txt", Body=b"keep")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    with sqlite3.connect(remote.mirror_of(url).parent / remote.RECORD) as db:
        for rel, removed in ((str(precious), 0), ("../../precious.txt", 0), ("../precious.txt", 1)):
            db.execute("INSERT INTO files VALUES (?, 1, 2, 3, 'x', ?, 0)", (rel, removed))
    assert prep("status", workdir=url).exit_code == 0
    assert prep("split", workdir=url).exit_code == 0  # a command whose push deletes what was removed
    assert precious.read_text() == "keep"
    assert s3.get_object(Bucket=bucket, Key="precious.txt")["Body"].read() == b"keep"


def test_folder_markers_are_skipped_and_renaming_keys_refused(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    url = f"s3://{bucket}/work"
    s3.put_object(Bucket=bucket, Key="work/resized/", Body=b"")  # what a console's "create folder" makes
    assert prep("index", raw, workdir=url).exit_code == 0
    result = prep("resize", "--size", "8", workdir=url)
    assert result.exit_code == 0, result.output
    assert (remote.mirror_of(url) / "resized").is_dir()
    s3.put_object(Bucket=bucket, Key="work/notes//readme", Body=b"x")
    assert_one_line_error(prep("status", workdir=url), "notes//readme")
    s3.delete_object(Bucket=bucket, Key="work/notes//readme")
    s3.put_object(Bucket=bucket, Key="work/a", Body=b"x")
    s3.put_object(Bucket=bucket, Key="work/a/b", Body=b"y")
    assert_one_line_error(prep("status", workdir=url), "both a file and a folder")


def test_what_a_command_could_not_upload_goes_up_before_the_next_fetch(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    url = f"s3://{bucket}/work"
    assert prep("index", raw, workdir=url).exit_code == 0
    mirror = remote.mirror_of(url)
    (mirror / "notes.txt").write_text("written, never uploaded")  # as after a failed upload
    (mirror / ".split.123-4.tmp").mkdir()
    (mirror / ".split.123-4.tmp" / "part").write_text("a temporary's content")
    assert prep("status", workdir=url).exit_code == 0
    stored = bucket_files(s3, bucket, "work")
    assert stored["notes.txt"] == b"written, never uploaded"
    assert not any(".tmp" in name for name in stored)


def test_a_large_file_goes_up_alone_in_parts_and_comes_back_whole(tmp_path, s3, bucket, monkeypatch):  # noqa: F811
    # the tables of millions of images: in parts of 8 MiB, 2 at a time, not read whole (as s3fs
    # does up to 100 MiB) nor 10 parts of 50 MiB at a time
    url = f"s3://{bucket}/work"
    mirror = remote.Mirror(url, tmp_path / "copy" / "work")
    mirror.pull()
    big = os.urandom(remote.PART * 2 + 12345)
    (mirror.root / "resized.csv").write_bytes(big)
    (mirror.root / "labels.csv").write_bytes(b"path,label\n")
    sent = []
    put_file = mirror.fs.put_file
    monkeypatch.setattr(mirror.fs, "put_file", lambda *a, **kw: sent.append(kw) or put_file(*a, **kw))
    assert mirror.push() == 2
    assert sent == [{"chunksize": remote.PART, "max_concurrency": 2}]  # the large one alone, in parts
    stored = bucket_files(s3, bucket, "work")
    assert stored["resized.csv"] == big and stored["labels.csv"] == b"path,label\n"
    again = remote.Mirror(url, tmp_path / "another" / "work")
    assert again.pull() == 2 and (again.root / "resized.csv").read_bytes() == big


def test_stamps_go_up_after_every_output_however_large(tmp_path, s3, bucket, monkeypatch):  # noqa: F811
    mirror = remote.Mirror(f"s3://{bucket}/work", tmp_path / "copy" / "work")
    mirror.pull()
    (mirror.root / ".stamps").mkdir()
    (mirror.root / ".stamps" / "pack-h5.json").write_text("{}")
    (mirror.root / "manifest.json").write_text("{}")
    (mirror.root / "dataset.h5").write_bytes(os.urandom(remote.BIG + 1))
    (mirror.root / "labels.csv").write_text("path,label\n")
    order = []
    put, put_file = mirror.fs.put, mirror.fs.put_file
    monkeypatch.setattr(mirror.fs, "put", lambda local, keys, **kw: order.extend(keys) or put(local, keys, **kw))
    monkeypatch.setattr(mirror.fs, "put_file", lambda local, key, **kw: order.append(key) or put_file(local, key, **kw))
    assert mirror.push() == 4
    names = [key.rsplit("/work/", 1)[1] for key in order]
    assert sorted(names[:2]) == ["dataset.h5", "labels.csv"]
    assert sorted(names[2:]) == [".stamps/pack-h5.json", "manifest.json"]


def test_a_file_removed_is_deleted_by_its_exact_name_not_as_a_pattern(tmp_path, s3, bucket):  # noqa: F811
    mirror = remote.Mirror(f"s3://{bucket}/work", tmp_path / "copy" / "work")
    mirror.pull()
    names = ["resized/cat/b.png", "resized/cat/b*.png", "resized/cat/a1.png", "resized/cat/a[1].png",
             "resized/cat/q?.png", "resized/cat/qx.png"]
    for name in names:
        (mirror.root / name).parent.mkdir(parents=True, exist_ok=True)
        (mirror.root / name).write_text(name)
    assert mirror.push() == len(names)
    for name in ("resized/cat/b*.png", "resized/cat/a[1].png", "resized/cat/q?.png"):
        (mirror.root / name).unlink()
    mirror.push()
    stored = bucket_files(s3, bucket, "work")
    assert sorted(stored) == ["resized/cat/a1.png", "resized/cat/b.png", "resized/cat/qx.png"]


def test_names_a_bucket_would_change_are_refused_in_one_line(tmp_path, prep, s3, bucket):  # noqa: F811
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 3})
    url = f"s3://{bucket}/work"
    shutil.copy(raw / "dog" / "img0.png", raw / "dog" / "q?versionId=1.png")
    assert prep("index", raw, workdir=url).exit_code == 0
    assert_one_line_error(prep("resize", "--size", "8", workdir=url), "q?versionId=1.png", "rename the file in RAW")
    (raw / "dog" / "q?versionId=1.png").unlink()
    assert prep("index", raw, workdir=url).exit_code == 0
    labels = remote.mirror_of(url) / "labels.csv"
    lines = labels.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace("/", "//", 1)  # a path a folder would read as another (crafted)
    labels.write_text("".join(lines))
    for executor in ("serial", "local"):  # refused alike, before any file is written
        result = prep("resize", "--size", "8", "--executor", executor, workdir=url)
        assert_one_line_error(result, "empty or '.' part")
    assert not [key for key in bucket_files(s3, bucket, "work") if key.startswith("resized/")]


def recorded(url: str) -> list[str]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(remote.mirror_of(url).parent / remote.RECORD)) as db:
        return [row[0] for row in db.execute("SELECT rel FROM files ORDER BY rel")]


def test_commands_that_read_no_resized_file_leave_that_folder_alone(tmp_path, prep, s3, bucket, monkeypatch):  # noqa: F811
    # split and encode of millions of images: neither list, fetch nor record resized/; pack,
    # which reads the PNGs, fetches them then
    raw = make_tree(tmp_path / "raw", {"cat": 6, "dog": 6})
    url = f"s3://{bucket}/work"
    for args in [("index", raw), ("resize", "--size", "12")]:
        assert prep(*args, workdir=url).exit_code == 0
        assert prep(*args, workdir=tmp_path / "local").exit_code == 0
    copy = remote.mirror_of(url)
    assert sum(rel.startswith("resized/") for rel in recorded(url)) == 12
    shutil.rmtree(copy.parent)  # another machine: nothing but the bucket
    listed = []
    objects = remote.Mirror._objects
    monkeypatch.setattr(remote.Mirror, "_objects", lambda self: (listed.append(rel) or (rel, info)
                                                                 for rel, info in objects(self)))
    for args in [("split",), ("encode",)]:
        result = prep(*args, workdir=url)
        assert result.exit_code == 0, result.output
        assert prep(*args, workdir=tmp_path / "local").exit_code == 0
    assert listed and not [rel for rel in listed if rel.startswith("resized/")]  # not even listed
    assert not (copy / "resized").exists() and not [rel for rel in recorded(url) if rel.startswith("resized/")]
    stored = bucket_files(s3, bucket, "work")
    assert sum(name.startswith("resized/") for name in stored) == 12  # nor deleted there
    assert stored["encoded.csv"] == (tmp_path / "local" / "encoded.csv").read_bytes()
    for args in [("pack", "--format", "pkl.gz"), ("pack", "--format", "pkl.gz")]:
        result = prep(*args, workdir=url)
        assert result.exit_code == 0, result.output
    assert len(list((copy / "resized").rglob("*.png"))) == 12
    assert sum(rel.startswith("resized/") for rel in recorded(url)) == 12
    assert prep("pack", "--format", "pkl.gz", workdir=tmp_path / "local").exit_code == 0
    assert_same_pickles(tmp_path / "local" / "dataset.pkl.gz", copy / "dataset.pkl.gz")


def test_an_earlier_preps_record_is_taken_over_and_nothing_fetched_again(tmp_path, prep, s3, bucket):  # noqa: F811
    import sqlite3

    url = on_bucket(tmp_path, prep, bucket, 4, ("resize", "--size", "12"))
    copy = remote.mirror_of(url)
    record = copy.parent / remote.RECORD
    with contextlib.closing(sqlite3.connect(record)) as db:
        files = {rel: [size, mtime, ino, version]
                 for rel, size, mtime, ino, version in db.execute("SELECT rel, size, mtime, ino, version FROM files")}
    record.unlink()
    (copy.parent / "state.json").write_text(json.dumps({"url": url, "files": files}))  # as it kept it
    inodes = {p: p.stat().st_ino for p in copy.rglob("*") if p.is_file()}
    assert remote.Mirror(url, copy).pull() == 0  # nothing fetched again
    assert {p: p.stat().st_ino for p in copy.rglob("*") if p.is_file()} == inodes
    assert not (copy.parent / "state.json").exists() and len(recorded(url)) == len(files)


def test_a_copy_deleted_by_hand_is_fetched_again_and_the_bucket_keeps_everything(tmp_path, prep, s3, bucket):  # noqa: F811
    # "deleting the local copy only costs a fetch": its record, beside it, does not make the
    # next command delete at the URL every file it no longer finds here
    url = on_bucket(tmp_path, prep, bucket, 4, ("resize", "--size", "12"), ("split",))
    before = bucket_files(s3, bucket, "work")
    copy = remote.mirror_of(url)
    shutil.rmtree(copy / "resized")  # disk freed: split and encode do not need it
    assert prep("encode", workdir=url).exit_code == 0
    result = prep("pack", "--format", "pkl.gz", workdir=url)
    assert result.exit_code == 0, result.output
    assert len(list((copy / "resized").rglob("*.png"))) == 8  # fetched again
    shutil.rmtree(copy)
    result = prep("encode", workdir=url)
    assert result.exit_code == 0, result.output
    after = bucket_files(s3, bucket, "work")
    assert {name: data for name, data in after.items() if name in before} == before


def test_a_command_after_one_that_could_not_upload_puts_its_pngs_before_its_stamp(tmp_path, prep, s3, bucket,  # noqa: F811
                                                                                 monkeypatch):
    # resize's upload did not happen (a network failure, a kill): the next command, even one
    # that leaves resized/ alone, uploads the new PNGs with resized.csv and resize's stamp
    url = on_bucket(tmp_path, prep, bucket, 4, ("resize", "--size", "12"))

    @contextlib.contextmanager
    def no_upload(mirror, writes):
        yield

    with monkeypatch.context() as patched:
        patched.setattr(remote, "synced", no_upload)
        assert prep("resize", "--size", "16", workdir=url).exit_code == 0
    assert prep("split", workdir=url).exit_code == 0
    stored = bucket_files(s3, bucket, "work")
    copy = remote.mirror_of(url)
    pngs = [name for name in stored if name.startswith("resized/")]
    assert len(pngs) == 8 and all(stored[name] == (copy / name).read_bytes() for name in pngs)
    assert stored["resized.csv"] == (copy / "resized.csv").read_bytes()
    assert stored[".stamps/resize.json"] == (copy / ".stamps" / "resize.json").read_bytes()
    shutil.rmtree(copy.parent)  # another machine packs what the bucket holds
    for args in [("encode",), ("pack", "--format", "pkl.gz")]:
        result = prep(*args, workdir=url)
        assert result.exit_code == 0, result.output


def test_report_reads_its_thumbnails_at_the_url_and_fetches_no_resized_file(tmp_path, prep, s3, bucket):  # noqa: F811
    import re

    raw = make_tree(tmp_path / "raw", {"cat": 5, "dog": 5})
    url = f"s3://{bucket}/work"
    for args in [("index", raw), ("resize", "--size", "12"), ("split",), ("encode",)]:
        assert prep(*args, workdir=url).exit_code == 0
        assert prep(*args, workdir=tmp_path / "local").exit_code == 0
    copy = remote.mirror_of(url)
    shutil.rmtree(copy.parent)  # another machine: nothing but the bucket
    result = prep("report", workdir=url)
    assert result.exit_code == 0, result.output
    assert not (copy / "resized").exists()
    assert prep("report", workdir=tmp_path / "local").exit_code == 0

    def thumbnails(page: bytes) -> list[bytes]:
        return re.findall(rb"data:image/png;base64,[A-Za-z0-9+/=]+", page)

    page = bucket_files(s3, bucket, "work")["report/index.html"]
    assert len(thumbnails(page)) >= 10  # every image's, as in a folder
    assert url.encode() in page and str(copy).encode() not in page  # the work directory as the user named it
    assert sorted(thumbnails(page)) == sorted(thumbnails((tmp_path / "local" / "report" / "index.html").read_bytes()))


def test_a_record_that_cannot_be_written_is_one_line(tmp_path, prep, s3, bucket, monkeypatch):  # noqa: F811
    import sqlite3

    url = on_bucket(tmp_path, prep, bucket, 3)

    def full(self, *args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(remote.Record, "put", full)
    (remote.mirror_of(url) / "notes.txt").write_text("to upload")
    assert_one_line_error(prep("split", workdir=url), "record.sqlite: database or disk is full")


def test_what_a_command_removed_is_deleted_by_the_next_one_if_its_upload_failed(tmp_path, prep, s3, bucket,  # noqa: F811
                                                                               monkeypatch):
    # noted before anything is sent: a file that became a folder (x, then x/y) and a stale PNG
    # removed by the command are deleted at the URL by the next command, not fetched back
    url = on_bucket(tmp_path, prep, bucket, 3)
    s3.put_object(Bucket=bucket, Key="work/x", Body=b"a file")
    s3.put_object(Bucket=bucket, Key="work/resized/cat/stale.png", Body=b"old")
    copy = remote.mirror_of(url)
    mirror = remote.Mirror(url, copy)
    mirror.pull()
    (copy / "x").unlink()
    (copy / "x").mkdir()
    (copy / "x" / "y").write_text("inside")
    (copy / "resized" / "cat" / "stale.png").unlink()
    (copy / "big.bin").write_bytes(os.urandom(remote.BIG + 1))
    with monkeypatch.context() as patched:
        patched.setattr(mirror.fs, "put_file", lambda *a, **kw: (_ for _ in ()).throw(OSError("connection reset")))
        with pytest.raises(remote.PrepError, match="connection reset"):
            mirror.push()
    mirror.record.db.close()
    result = prep("status", workdir=url)  # the next command, the network back
    assert result.exit_code == 0, result.output
    stored = bucket_files(s3, bucket, "work")
    assert "x" not in stored and stored["x/y"] == b"inside" and "resized/cat/stale.png" not in stored
    assert not (copy / "resized" / "cat" / "stale.png").exists() and len(stored["big.bin"]) == remote.BIG + 1


def test_a_file_that_became_a_folder_at_the_url_is_replaced_here(tmp_path, prep, s3, bucket):  # noqa: F811
    url = on_bucket(tmp_path, prep, bucket, 3)
    s3.put_object(Bucket=bucket, Key="work/notes", Body=b"a file")
    assert prep("status", workdir=url).exit_code == 0
    s3.delete_object(Bucket=bucket, Key="work/notes")  # another machine made it a folder
    s3.put_object(Bucket=bucket, Key="work/notes/a.txt", Body=b"x")
    result = prep("status", workdir=url)
    assert result.exit_code == 0, result.output
    assert (remote.mirror_of(url) / "notes" / "a.txt").read_bytes() == b"x"


def test_an_empty_object_named_as_a_folder_left_alone_is_a_marker(tmp_path, prep, s3, bucket):  # noqa: F811
    url = on_bucket(tmp_path, prep, bucket, 3, ("resize", "--size", "8"))
    s3.put_object(Bucket=bucket, Key="work/resized", Body=b"")  # a tool's folder marker, without "/"
    assert prep("split", workdir=url).exit_code == 0  # leaves resized/
    assert len(list((remote.mirror_of(url) / "resized").rglob("*.png"))) == 6
    s3.put_object(Bucket=bucket, Key="work/resized", Body=b"not empty")
    assert_one_line_error(prep("split", workdir=url), "resized is both a file and a folder")


def test_a_locked_record_is_one_line_and_kept(tmp_path, prep, s3, bucket, monkeypatch):  # noqa: F811
    import sqlite3

    url = on_bucket(tmp_path, prep, bucket, 3)
    copy = remote.mirror_of(url)
    (copy / "notes.txt").write_text("written, never uploaded")  # as after a failed upload
    other = sqlite3.connect(copy.parent / remote.RECORD)
    other.execute("BEGIN EXCLUSIVE")
    connect = sqlite3.connect
    monkeypatch.setattr(remote.sqlite3, "connect", lambda path, timeout: connect(path, timeout=0.2))
    try:
        assert_one_line_error(prep("split", workdir=url), "record.sqlite: database is locked")
    finally:
        other.rollback()
        other.close()
    assert (copy / "notes.txt").exists() and (copy.parent / remote.RECORD).exists()


def test_a_copys_file_name_that_is_not_utf8_is_one_line(tmp_path, prep, s3, bucket):  # noqa: F811
    url = on_bucket(tmp_path, prep, bucket, 3)
    with open(os.path.join(os.fsencode(remote.mirror_of(url)), b"caf\xe9.txt"), "wb") as handle:
        handle.write(b"x")
    assert_one_line_error(prep("split", workdir=url), "not UTF-8")


def test_two_commands_sharing_the_copy_sync_it_one_at_a_time(tmp_path, s3, bucket):  # noqa: F811
    # verify and status share the copy's lock: each pull or push holds the record's own lock,
    # so that neither's pass over the files is mixed with the other's
    import subprocess
    import sys
    import textwrap
    import time

    url = f"s3://{bucket}/work"
    mirror = remote.Mirror(url, tmp_path / "copy" / "work")
    mirror.pull()
    (mirror.root / "labels.csv").write_text("path,label\n")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(mirror.root.parent / remote.SYNC_LOCK)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(1.5)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert mirror.push() == 1
        assert time.monotonic() - started >= 1.0  # waited for the other's sync to end
    finally:
        holder.wait()


def test_a_damaged_record_says_how_to_start_afresh(tmp_path, prep, s3, bucket):  # noqa: F811
    import sqlite3

    url = on_bucket(tmp_path, prep, bucket, 3)
    record = remote.mirror_of(url).parent / remote.RECORD
    with contextlib.closing(sqlite3.connect(record)) as db:
        db.execute("DROP TABLE files")
        db.execute("CREATE TABLE files (rel TEXT)")  # a layout it cannot use
        db.commit()
    assert_one_line_error(prep("split", workdir=url), "record.sqlite", "delete it to start the copy afresh")
    record.unlink()
    result = prep("split", workdir=url)
    assert result.exit_code == 0, result.output
