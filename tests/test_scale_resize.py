"""`prep resize` at scale: the workers write the resized files themselves, on every executor, and
send back only small records; the client writes none of them, and its outputs stay the same."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from conftest import assert_one_line_error, make_tree, received, tree_digests
from pipeline import executors, workdir
from pipeline.errors import PrepError
from pipeline.spec import ResizeSpec
from pipeline.stages import resize

RECORD_BYTES = 200  # the most a worker sends back per image, pickled


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    raw = make_tree(tmp_path / "raw", {"cat": 9, "dog": 7, "bird": 5}, size=(48, 40))
    (raw / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (raw / "dog" / "img1.jpg").write_bytes((raw / "dog" / "img2.png").read_bytes())  # two names, one output stem
    return raw


def outputs(work: Path) -> dict:
    return {**tree_digests(work / "resized"),
            **{name: (work / name).read_bytes() for name in ("resized.csv", "rejected.csv")}}


def test_a_dask_run_writes_no_file_in_the_client_and_matches_serial(tmp_path, corpus, prep, monkeypatch):
    distributed = pytest.importorskip("distributed")
    work = tmp_path / "serial"
    assert prep("index", corpus, workdir=work).exit_code == 0
    assert prep("resize", "--size", "12x10", "--executor", "serial", workdir=work).exit_code == 0
    seen = received(monkeypatch)
    write = workdir.atomic_write_bytes

    def not_here(path, *args, **kw):
        assert Path(path).parent.parent.name != "resized", f"the client wrote {path}"
        write(path, *args, **kw)

    monkeypatch.setattr(workdir, "atomic_write_bytes", not_here)  # in this process only, not in the workers
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster:
        dask = tmp_path / "dask"
        assert prep("index", corpus, workdir=dask).exit_code == 0
        result = prep("resize", "--size", "12x10", "--executor", "dask", "--scheduler", cluster.scheduler_address,
                      workdir=dask)
    assert result.exit_code == 0, result.output
    assert outputs(dask) == outputs(work)
    records = [record for shard in seen for record in shard]
    assert len(records) == 23 and len(pickle.dumps(records)) < RECORD_BYTES * len(records)


def test_a_shard_writes_its_files_and_refuses_a_name_leaving_its_folder(tmp_path, corpus):
    out = tmp_path / "resized"
    out.mkdir()
    rel = "cat/img0.png"
    sha = workdir.sha256_file(corpus / rel)
    spec = ResizeSpec(width=8, height=8)
    [record] = resize.resize_shard([(rel, sha, None, "cat/img0.png")], str(corpus), spec, str(out))
    data = (out / "cat" / "img0.png").read_bytes()
    assert record.status == "ok" and record.digest.hex() == workdir.sha256_bytes(data)
    assert (record.size, record.width, record.height) == (len(data), 48, 40)
    with pytest.raises(PrepError, match=r"\.\./escape\.png"):
        resize.resize_shard([(rel, sha, None, "../escape.png")], str(corpus), spec, str(out))
    assert not (tmp_path / "escape.png").exists()
    # a worker that does not see the work directory fails the run rather than write elsewhere
    with pytest.raises(PrepError, match="mounts at the same path"):
        resize.resize_shard([(rel, sha, None, "cat/img0.png")], str(corpus), spec, str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()


def test_files_a_killed_run_wrote_but_never_journaled_are_made_again(tmp_path, corpus, prep):
    clean, work = tmp_path / "clean", tmp_path / "work"
    for wd in (clean, work):
        assert prep("index", corpus, workdir=wd).exit_code == 0
        assert prep("resize", "--size", "8", "--executor", "serial", workdir=wd).exit_code == 0
    expected = outputs(clean)
    # a run with --size 6, killed after its workers wrote three files and before the client
    # journaled them: resized.csv still speaks of the 8x8 files
    rows = workdir.read_csv(work / "labels.csv")[:3]
    shard = [(r["path"], r["sha256"], None, resize.output_names([r["path"]])[r["path"]]) for r in rows]
    resize.resize_shard(shard, str(corpus), ResizeSpec(width=6, height=6), str(work / "resized"))
    stray = work / "resized" / "cat" / "never-journaled.png"
    stray.write_bytes(b"a file of an image no longer listed")
    assert outputs(work) != expected

    result = prep("resize", "--size", "8", "--executor", "serial", workdir=work)
    assert result.exit_code == 0, result.output
    assert "Resized 3 images" in result.stdout
    assert outputs(work) == expected and not stray.exists()


def test_a_path_listed_twice_in_labels_csv_is_a_one_line_error(tmp_path, corpus, prep):
    assert prep("index", corpus).exit_code == 0
    labels = tmp_path / "work" / "labels.csv"
    rows = workdir.read_csv(labels)
    workdir.write_csv(labels, list(rows[0]), rows + rows[:1])
    assert_one_line_error(prep("resize", "--executor", "serial"), "labels.csv", rows[0]["path"], "twice")


def test_csv_rows_stream_out_and_back_as_tuples(tmp_path):
    path = tmp_path / "t.csv"
    rows = [("a/1.png", "x,y", ""), ("b/2.png", 'say "hi"', "line\nbreak")]
    workdir.write_csv_rows(path, ["path", "label", "note"], rows)
    assert path.read_bytes() == workdir.csv_bytes(["path", "label", "note"],
                                                  [dict(zip(["path", "label", "note"], r)) for r in rows])
    before = path.stat().st_mtime_ns
    workdir.write_csv_rows(path, ["path", "label", "note"], iter(rows))  # unchanged: left as it is
    assert path.stat().st_mtime_ns == before
    assert list(workdir.iter_csv(path, ["label", "path"])) == [(r[1], r[0]) for r in rows]
    assert list(workdir.iter_csv(path, ["path", "gone"], required=["path"])) == [(r[0], "") for r in rows]
    with pytest.raises(PrepError, match="missing gone"):
        list(workdir.iter_csv(path, ["path", "gone"]))
    path.write_bytes(b"path,label\na,b\nc\xff,d\n")
    with pytest.raises(PrepError, match="line 3: not UTF-8"):
        list(workdir.iter_csv(path, ["path", "label"]))
    path.write_bytes(b"path,label\na,b\nc\n")
    with pytest.raises(PrepError, match="line 3: 1 fields"):
        list(workdir.iter_csv(path, ["path", "label"]))


def check_outputs(wd: workdir.Workdir, records: list[dict]) -> tuple[set[str], int]:
    """The resized files of ``records`` (resized.csv's rows with status ok) that hold the bytes
    resize wrote, and how many files were read to tell."""
    files = resize._OutputFiles(wd)
    intact = {r["resized"] for r in records if files.check(r["resized"], r["resized_sha256"]) is not None}
    return intact, files.hashed


def test_files_checked_once_are_not_read_again_when_images_come_and_go(tmp_path, corpus, prep):
    """The record of checked files is read beside resized.csv: an image added or removed in the
    middle costs a read of its own file only."""
    work = tmp_path / "work"
    wd = workdir.Workdir(work)
    assert prep("index", corpus).exit_code == 0
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0
    ok = [r for r in workdir.read_csv(work / "resized.csv") if r["status"] == "ok"]
    past = 1_000_000_000  # long settled
    for row in ok:
        os.utime(work / "resized" / row["resized"], ns=(past, past))
    assert check_outputs(wd, ok)[1] == len(ok)  # new times: every file read
    assert "Up to date" in prep("resize", "--size", "8", "--executor", "serial").stdout  # and recorded so
    assert check_outputs(wd, ok)[1] == 0

    make_tree(tmp_path / "more", {"cat": 1})
    os.replace(tmp_path / "more" / "cat" / "img0.png", corpus / "cat" / "img5a.png")  # between img5 and img6
    (corpus / "dog" / "img3.png").unlink()
    assert prep("index", corpus).exit_code == 0
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert "Resized 1 image " in result.stdout, result.output
    ok = [r for r in workdir.read_csv(work / "resized.csv") if r["status"] == "ok"]
    intact, hashed = check_outputs(wd, ok)
    assert hashed == 1 and len(intact) == len(ok)  # the new file, written just now, is not settled yet
