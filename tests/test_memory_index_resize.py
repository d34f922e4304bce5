"""`prep index` and `prep resize` hold per-image state in arrays (paths packed, hashes as
bytes), read files again rather than hold them, and get a shard's records back as one packed
blob; their outputs stay byte for byte those of a plain implementation, on every executor."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import hash_entries, make_tree, received, tree_digests, write_image
from pipeline import __version__, checks, executors, sources, workdir
from pipeline.executors import Execution
from pipeline.stages import index, resize

# what `prep resize` journals of a record, in this order (a JSONEncoder(ensure_ascii=False) line)
JOURNAL_KEYS = ["path", "label", "sha256", "settings", "status", "reason", "resized", "resized_sha256", "format",
                "mode", "width", "height", "phash8", "phash16"]
RECORD_BYTES = 200  # the most the client receives per image


# -- the containers ---------------------------------------------------------------------------


ODD = ["cat/a.png", "é/ß.JPG", "dog/\udcff-undecodable.png", "a,b\"c\nd.png", "", "zz/10.png", "zz/9.png"]


def test_packed_paths_give_back_any_text_and_sort_as_text_does():
    paths = sources.Paths(ODD)
    assert list(paths) == ODD and [paths[i] for i in range(len(ODD))] == ODD
    assert paths[-1] == ODD[-1] and paths[1:3] == ODD[1:3] and paths.items([3, 0]) == [ODD[3], ODD[0]]
    # as bytes they compare as the text does, surrogates included
    assert sorted(ODD, key=lambda text: text.encode("utf-8", "surrogatepass")) == sorted(ODD)
    data, ends = paths.buffers()
    assert list(sources.Paths.from_buffers(data, ends)) == ODD
    for bad in ([3, 2, 5], [-1, 5], [2, 4]):  # ends that go back, start before the data, stop short of it
        with pytest.raises(ValueError):
            sources.Paths.from_buffers(b"abcde", bad)


def test_a_listing_keeps_each_file_s_size_and_version(tmp_path):
    listing = sources.Listing()
    for k, rel in enumerate(["b.png", "c.png", "a.png"]):
        listing.add(rel, 10 + k, 1000 + k)
    assert list(listing.entries()) == [("b.png", 10, 1000), ("c.png", 11, 1001), ("a.png", 12, 1002)]
    remote = sources.Listing()
    remote.add("x.png", 3, "etag-1")
    remote.add("y.png", 4, None)
    assert (remote.version(0), remote.version(1), remote.mtimes) == ("etag-1", None, None)


def test_a_path_index_tells_apart_paths_whose_hashes_are_equal():
    paths = sources.Paths([f"d{k % 3}/img{k}.png" for k in range(50)])
    for key in (hash, lambda text: len(text) % 2):  # the second: every path shares its hash with many
        found = sources.PathIndex(paths, key=key)
        assert [found.find(p) for p in paths] == list(range(50))
        assert found.find_all(list(paths) + ["gone.png"]) == list(range(50)) + [-1]
        assert found.find("gone.png") == -1 and found.twice() is None
        twice = sources.PathIndex(sources.Paths(["a", "b", "c", "b", "a"]), key=key)
        assert twice.twice() == "a"  # the first of those listed twice, in their order
        some = sources.PathIndex(paths, rows=[3, 7], key=key)
        assert (some.find(paths[3]), some.find(paths[7]), some.find(paths[4])) == (3, 7, -1)


# -- index ------------------------------------------------------------------------------------


def test_the_listing_digest_is_the_sha256_of_the_sorted_listing_s_json(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "SORT_CHUNK", 2)  # sorted a few at a time, and merged
    wd = workdir.Workdir(tmp_path / "work")
    cfg = index.IndexConfig(raw="/data/raw", workdir=wd, out=wd.path("labels.csv"))
    settings = [__version__, "/data/raw", "folder", None, False, False, workdir.NATURAL_ORDER, index.LABEL_COLUMNS,
                "labels.csv"]
    local, remote = sources.Listing(), sources.Listing()
    rels = [rel for rel in ODD if rel] + [f"cat/img{k}.png" for k in range(9)]
    random.Random(1).shuffle(rels)
    for k, rel in enumerate(rels):
        local.add(rel, 100 + k, 1_000_000 + k)
        remote.add(rel, 100 + k, f'"etag-{k}"')
    for listing in (local, remote):
        listing.skip("hidden", ".git/")
        listing.folders.extend(["dog", "cat"])
        text = json.dumps([settings, sorted(listing.entries()),
                           [["hidden", [".git/"]]], ["cat", "dog"]], separators=(",", ":"))
        expected = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
        assert index._listing_digest(cfg, "/data/raw", listing, 10**19, None) == expected
    remote.add("late.png", 1, None)  # an object without a version: no digest
    assert index._listing_digest(cfg, "/data/raw", remote, 10**19, None) is None


def test_rows_in_natural_order_whatever_size_of_chunk_the_sort_takes(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for label in ("10", "9", "b", "A"):
        for name in ("img1.png", "img01.png", "img10.png", "img9.png", "x.y.png", "deep/img2.png"):
            write_image(raw / label / name, color=(len(label) * 40, len(name) * 9, 9))
    outputs = []
    for chunk in (1 << 14, 5, 1):
        monkeypatch.setattr(index, "SORT_CHUNK", chunk)
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
        index.run(index.IndexConfig(raw=raw, workdir=workdir.Workdir(tmp_path / "work"),
                                    out=tmp_path / "work" / "labels.csv", execution=Execution("serial", False)))
        outputs.append((tmp_path / "work" / "labels.csv").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    rows = [line.split(",")[:2] for line in outputs[0].decode().splitlines()[1:]]
    key = workdir.natural_key
    assert rows == sorted(rows, key=lambda row: (key(row[1]), key(row[0])))


def test_the_hash_cache_is_of_the_rows_of_the_labels_csv_it_was_written_beside(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 2})
    assert prep("index", raw).exit_code == 0
    wd = workdir.Workdir(tmp_path / "work")
    labels = wd.path("labels.csv")
    cache = workdir.HashCache.read(wd, str(raw.resolve()), workdir.sha256_file(labels))
    rows = workdir.read_csv(labels)
    assert cache is not None and len(cache) == len(rows) == 5
    for row, record in enumerate(rows):
        st = (raw / record["path"]).stat()
        assert (cache.sizes[row], cache.versions[row]) == (st.st_size, st.st_mtime_ns)
    assert [entry[:4] for entry in hash_entries(wd, str(raw.resolve()))] == [
        (r["path"], int(r["bytes"]), (raw / r["path"]).stat().st_mtime_ns, r["sha256"]) for r in rows]
    assert workdir.HashCache.read(wd, str(raw.resolve()), "0" * 64) is None  # beside another CSV: none
    assert workdir.HashCache.read(wd, "/elsewhere", workdir.sha256_file(labels)) is None



class _RunsCode:
    def __reduce__(self):
        return os.system, ("touch marker-from-the-cache",)


def hostile_caches(meta: bytes, n: int) -> dict[str, dict]:
    """Hash caches a work directory someone sent could hold, each beside the right labels.csv."""
    import numpy as np

    good = {"meta": np.frombuffer(meta, np.uint8), "sizes": np.zeros(n, np.int64), "settled": np.ones(n, np.bool_),
            "mtimes": np.zeros(n, np.int64)}
    return {
        "a pickled object": {**good, "sizes": np.array([_RunsCode()] * n, dtype=object)},
        "short arrays": {**good, "settled": np.ones(n - 1, np.bool_)},
        "text for numbers": {**good, "mtimes": np.array(["x"] * n)},
        "two dimensions": {**good, "sizes": np.zeros((n, 2), np.int64)},
        "meta not JSON": {**good, "meta": np.frombuffer(b"\xff{", np.uint8)},
        "meta a list": {**good, "meta": np.frombuffer(b"[1]", np.uint8)},
        "tags that end past their data": {key: v for key, v in good.items() if key != "mtimes"}
        | {"tag_data": np.zeros(3, np.uint8), "tag_ends": np.array([2, 9] + [9] * (n - 2), np.int64)},
        "tags not UTF-8": {key: v for key, v in good.items() if key != "mtimes"}
        | {"tag_data": np.full(n, 0xFF, np.uint8), "tag_ends": np.arange(1, n + 1, dtype=np.int64)},
        "tags whose ends go back": {key: v for key, v in good.items() if key != "mtimes"}
        | {"tag_data": np.zeros(n, np.uint8), "tag_ends": np.array([3, 1] + list(range(3, n + 1)), np.int64)},
        "meta nested too deeply": {**good, "meta": np.frombuffer(b"[" * 100_000, np.uint8)},
    }


def test_a_hostile_hash_cache_runs_no_code_and_is_hashed_again(tmp_path, prep, monkeypatch):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    raw = make_tree(tmp_path / "raw", {"cat": 3, "dog": 2})
    assert prep("index", raw).exit_code == 0
    wd = workdir.Workdir(tmp_path / "work")
    expected = wd.path("labels.csv").read_bytes()
    meta = json.dumps({"root": str(raw.resolve()), "labels_sha256": workdir.sha256_file(wd.path("labels.csv"))})
    cases = hostile_caches(meta.encode(), 5)
    cases["not a zip"] = b"PK\x03\x04 not really"
    cases["a pickle"] = pickle.dumps(_RunsCode())
    cases["one array, not a zip of them"] = b"\x93NUMPY" + bytes(100)
    cases["a member that inflates"] = "compressed"
    cases["a FIFO"] = "fifo"
    hashed = []
    real = index._hash_shard
    monkeypatch.setattr(index, "_hash_shard", lambda shard, root: hashed.extend(shard) or real(shard, root))
    for case, arrays in cases.items():
        path = wd.path(workdir.HASH_CACHE)
        path.unlink(missing_ok=True)
        if isinstance(arrays, bytes):
            path.write_bytes(arrays)
        elif arrays == "fifo":
            os.mkfifo(path)  # a plain open() of it would wait for a writer forever
        else:
            compressed = arrays == "compressed"
            arrays = hostile_caches(meta.encode(), 5)["short arrays"] | {"settled": np.ones(5, np.bool_)} \
                if compressed else arrays
            with open(path, "wb") as handle:
                (np.savez_compressed if compressed else np.savez)(handle, **arrays)
        assert workdir.HashCache.read(wd, str(raw.resolve()), workdir.sha256_file(wd.path("labels.csv"))) is None, case
        assert list(hash_entries(wd, str(raw.resolve()))) == [], case
        (raw / "cat" / "img0.png").touch()  # the listing changed: index looks at its cache
        hashed.clear()
        result = prep("index", raw, "--executor", "serial")
        assert result.exit_code == 0, (case, result.output)
        assert len(hashed) == 5, case  # nothing trusted from that cache
        assert wd.path("labels.csv").read_bytes() == expected, case
        assert not (tmp_path / "marker-from-the-cache").exists(), case
        assert prep("status").exit_code == 0, case


# -- resize -----------------------------------------------------------------------------------


def reference_output_names(rels: list[str]) -> dict[str, str]:
    """Output names as a plain implementation gives them: a Counter of all names, twice."""
    names = [os.path.splitext(rel)[0] + ".png" for rel in rels]
    taken = Counter(n.casefold() for n in names)
    names = [rel + ".png" if taken[n.casefold()] > 1 else n for rel, n in zip(rels, names)]
    taken = Counter(n.casefold() for n in names)
    names = [f"{n[:-4]}-{workdir.sha256_bytes(rel.encode())[:8]}.png" if taken[n.casefold()] > 1 else n
             for rel, n in zip(rels, names)]
    assert len({n.casefold() for n in names}) == len(names)
    return dict(zip(rels, names))


def test_output_names_are_those_of_a_plain_implementation():
    tricky = ["a/x.jpg", "a/x.png", "a/X.JPG", "a/x.jpg.png", "a/x.png.jpg", "a/.png", "a/..jpg", "a/x.", "a/x",
              "a/.hidden", "b.c/d", "b.c/d.e.f", "Straße/a.jpg", "STRASSE/a.jpg", "strasse/a.jpg", "c/y.tar.gz",
              "c/y.tar.png"]
    for seed in range(5):
        random.Random(seed).shuffle(tricky)
        assert resize.output_names(tricky) == reference_output_names(tricky)


def test_a_shard_s_outcomes_travel_as_one_packed_blob():
    outcomes = [
        resize.Outcome("ok", "", b"\x01" * 32, "JPEG", "RGB", 640, 480, b"\x02" * 8, b"\x03" * 32, 1234, 10**18),
        resize.Outcome("rejected", "corrupt or truncated image data: broken"),
        resize.Outcome("ok", "", b"\x04" * 32, "PNG", "L", 1, 1, b"\x05" * 8, b"\x06" * 32, 99, 5, ("a warning",)),
        resize.Outcome("rejected", "empty file (0 bytes)", messages=("libtiff: x", "y")),
    ] * 50
    packed = resize.Outcomes()
    for outcome in outcomes:
        packed.append(outcome)
    back = pickle.loads(pickle.dumps(packed))
    assert list(back) == outcomes and len(back) == len(outcomes)
    assert len(pickle.dumps(packed)) < 110 * len(outcomes) + 200  # 105 bytes an image, and the shard's strings


def reference_size_warnings(rows, width: int, height: int) -> list[dict]:
    """Size warnings as a plain implementation gives them: a dict of every image's size."""
    sizes = {row["path"]: (int(row["width"]), int(row["height"])) for row in rows}
    if not sizes:
        return []
    found = []
    median = statistics.median(max(s) for s in sizes.values())
    large = [p for p, s in sizes.items() if max(s) > checks.OUTLIER * median]
    small = [p for p, s in sizes.items() if max(s) < median / checks.OUTLIER]
    if large or small:
        parts = [f"{len(ps)} {what} (e.g. {ps[0]}, {sizes[ps[0]][0]}x{sizes[ps[0]][1]})"
                 for what, ps in (("larger", large), ("smaller", small)) if ps]
        found.append({
            "kind": "size_outliers",
            "message": f"{len(large) + len(small)} image{'s are' if len(large) + len(small) != 1 else ' is'} far"
                       f" from the others' size (longest side: median {median:g} px; {' and '.join(parts)});"
                       " another kind of image, or one in the wrong folder?",
            "median_longest": median, "larger": large[:20], "smaller": small[:20], "count": len(large) + len(small),
        })
    tiny = [p for p, (w, h) in sizes.items() if 2 * w < width and 2 * h < height]
    if len(tiny) > checks.UPSCALED_SHARE * len(sizes):
        w, h = sizes[tiny[0]]
        found.append({
            "kind": "upscaled",
            "message": f"{len(tiny)} of {len(sizes)} images are under half of --size {width}x{height} on both"
                       f" sides (e.g. {tiny[0]}, {w}x{h}): enlarging adds no detail; a smaller --size may do",
            "count": len(tiny), "images": len(sizes), "size": [width, height],
        })
    return found


@pytest.mark.parametrize("seed", range(6))
def test_size_warnings_from_arrays_are_those_of_a_plain_implementation(seed):
    import array

    rng = random.Random(seed)
    n = rng.choice([1, 2, 7, 40, 41, 300])
    sides = [8, 16, 64, 65, 300, 2000, 7] if seed < 4 else [-10, -5, -10, 3, -400]  # a resized.csv someone sent
    sizes = [(rng.choice(sides), rng.choice([8, 16, 64, 90, 3000, 1] if seed < 4 else [-10, -5])) for _ in range(n)]
    rows = [{"path": f"c/img{k}.png", "width": w, "height": h} for k, (w, h) in enumerate(sizes)]
    flat = array.array("q", [v for size in sizes for v in size])
    asked = []

    def paths(ks):
        asked.extend(ks)
        return [f"c/img{k}.png" for k in ks]

    for width, height in ((32, 32), (300, 300), (4000, 4000)):
        found = checks.size_warnings(flat, width, height, paths)
        expected = reference_size_warnings(rows, width, height)
        assert found == expected
        for got, want in zip(found, expected):  # an int, or a float halfway, as statistics.median
            assert type(got.get("median_longest")) is type(want.get("median_longest"))
    assert len(asked) <= 3 * 41  # only the images the warnings name


def test_size_warnings_hold_a_count_per_distinct_size():
    import array
    import tracemalloc

    peaks = []
    for n in (100, 5_000, 50_000):  # the first imports what it needs
        flat = array.array("q", [v for i in range(n) for v in (640 + i % 50, 480)])
        tracemalloc.start()
        checks.size_warnings(flat, 64, 64, lambda ks: [f"c/{k}.png" for k in ks])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] - peaks[1] < 20_000  # not a byte per image: 45,000 more images


def test_csv_rows_are_read_again_where_they_start(tmp_path):
    path = tmp_path / "t.csv"
    rows = [("a", "one\nline more"), ("b", 'say "hi", twice'), ("", ""), ("c", "é")]
    workdir.write_csv_rows(path, ["path", "note"], rows)
    with open(path, "rb") as handle:
        for (offset, row), expected in zip(workdir.iter_csv(path, ["path", "note"], offsets=True), rows, strict=True):
            handle.seek(offset)
            assert row == expected == tuple(next(csv.reader(line.decode() for line in handle)))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    raw = make_tree(tmp_path / "raw", {"cat": 9, "dog": 7, "bird": 5}, size=(48, 40))
    (raw / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (raw / "dog" / "img1.jpg").write_bytes((raw / "dog" / "img2.png").read_bytes())  # two names, one output stem
    (raw / "bird" / 'odd, "name".png').write_bytes((raw / "bird" / "img0.png").read_bytes())  # quoted in the CSVs
    past = time.time_ns() - 100 * 10**9  # settled: index trusts the listing, on every run
    for path in raw.rglob("*"):
        os.utime(path, ns=(past, past))
    return raw


def outputs(work: Path) -> dict:
    return {**tree_digests(work / "resized"),
            **{name: (work / name).read_bytes() for name in ("labels.csv", "resized.csv", "rejected.csv")}}


def keep_journal(monkeypatch, into: list) -> None:
    """Keep the journal's text as it is when the run has written its tables (it then removes it)."""
    write_json = workdir.write_json

    def writing(path, *args, **kw):
        if Path(path).name == workdir.RESIZE_SETTINGS and Path(path).parent.name != workdir.STAMPS_DIR:
            into.append(Path(path).with_name(resize.JOURNAL).read_text(encoding="utf-8"))
        return write_json(path, *args, **kw)

    monkeypatch.setattr(workdir, "write_json", writing)


def assert_journal_as_written_before(journal: str, table: Path) -> None:
    """Each record line as a JSONEncoder(ensure_ascii=False) of the record, in the old key order,
    sizes as numbers; each pending line before the records it names."""
    encode = json.JSONEncoder(ensure_ascii=False).encode
    rows = {r["path"]: r for r in workdir.read_csv(table)}
    pending: set[str] = set()
    for line in journal.splitlines():
        entry = json.loads(line)
        assert encode(entry) == line
        if resize.PENDING in entry:
            pending.update(entry[resize.PENDING])
            continue
        assert entry["path"] in pending
        keys = JOURNAL_KEYS if entry["status"] == "ok" else JOURNAL_KEYS[:7]
        assert list(entry) == keys
        row = rows[entry["path"]]
        assert {k: str(v) for k, v in entry.items()} == {k: row[k] for k in keys}


def records(journal: str) -> list[str]:
    """The journal's record lines, sorted (the shards, and so the pending notes, depend on the workers)."""
    return sorted(line for line in journal.splitlines() if resize.PENDING not in json.loads(line))


def test_every_executor_writes_the_same_bytes_and_the_client_receives_little(tmp_path, corpus, prep, monkeypatch):
    seen = received(monkeypatch)
    journals: list[str] = []
    keep_journal(monkeypatch, journals)
    runs = {}
    for name, args in {"serial": ("--executor", "serial"), "local": ("--workers", "2")}.items():
        work = tmp_path / name
        assert prep("index", corpus, workdir=work).exit_code == 0
        result = prep("resize", "--size", "12x10", *args, workdir=work)
        assert result.exit_code == 0, result.output
        runs[name] = outputs(work)
        assert_journal_as_written_before(journals[-1], work / "resized.csv")
    assert runs["serial"] == runs["local"] and records(journals[0]) == records(journals[1])
    assert {"dog/img1.jpg.png", "dog/img2.png"} <= runs["serial"].keys()  # two names, one stem: both kept
    assert '"bird/odd, ""name"".png"' in runs["serial"]["resized.csv"].decode()  # quoted as csv.writer does
    assert all(isinstance(shard, resize.Outcomes) for shard in seen)
    images = sum(len(shard) for shard in seen)
    assert images == 2 * 24 and sum(len(pickle.dumps(shard)) for shard in seen) < RECORD_BYTES * images


def test_a_dask_run_writes_the_same_bytes_and_its_client_receives_one_blob_a_shard(tmp_path, corpus, prep,
                                                                                  monkeypatch):
    distributed = pytest.importorskip("distributed")
    journals: list[str] = []
    keep_journal(monkeypatch, journals)
    work = tmp_path / "serial"
    assert prep("index", corpus, workdir=work).exit_code == 0
    assert prep("resize", "--size", "12x10", "--executor", "serial", workdir=work).exit_code == 0
    seen = received(monkeypatch)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster:
        dask = tmp_path / "dask"
        assert prep("index", corpus, "--executor", "dask", "--scheduler", cluster.scheduler_address,
                    workdir=dask).exit_code == 0
        result = prep("resize", "--size", "12x10", "--executor", "dask", "--scheduler", cluster.scheduler_address,
                      workdir=dask)
    assert result.exit_code == 0, result.output
    assert outputs(dask) == outputs(work) and records(journals[0]) == records(journals[1])
    assert (dask / "index.json").read_bytes() == (work / "index.json").read_bytes()
    assert all(isinstance(shard, resize.Outcomes) and isinstance(shard.data, (bytes, bytearray)) for shard in seen)
    assert sum(len(shard) for shard in seen) == 24
    assert sum(len(pickle.dumps(shard)) for shard in seen) < RECORD_BYTES * 24


def test_records_kept_from_a_shuffled_table_and_journal_are_read_again_where_they_are(tmp_path, corpus, prep):
    """resized.csv in another order than labels.csv, and a journal of two interrupted runs whose
    records come in any order: what a rerun keeps is read back from both, and it matches a clean
    run without resizing those images again."""
    clean, work = tmp_path / "clean", tmp_path / "work"
    for wd in (clean, work):
        assert prep("index", corpus, workdir=wd).exit_code == 0
        assert prep("resize", "--size", "8", "--executor", "serial", workdir=wd).exit_code == 0
    expected = outputs(clean)
    rows = workdir.read_csv(work / "resized.csv")
    random.Random(3).shuffle(rows)
    table, journaled = rows[:12], rows[12:]
    workdir.write_csv(work / "resized.csv", resize.RESIZED_COLUMNS, table)
    lines = [json.dumps({resize.PENDING: [r["path"] for r in journaled]})]
    lines += [json.dumps(r) for r in journaled[::-1]]  # records in any order, after their pending note
    lines += [json.dumps({resize.PENDING: [journaled[0]["path"]]}), json.dumps(journaled[0])]  # a second run
    (work / resize.JOURNAL).write_text("\n".join(lines) + "\n")
    result = prep("resize", "--size", "8", "--executor", "serial", workdir=work)
    assert result.exit_code == 0, result.output
    assert "Up to date: 24 images" in result.stdout
    assert outputs(work) == expected and not (work / resize.JOURNAL).exists()


def reference_iter_csv(path: Path, columns: list[str], required: list[str] | None = None) -> list[tuple]:
    """What iter_csv gives, read with the csv module alone (or the one-line error it raises)."""
    from pipeline.errors import PrepError

    required = columns if required is None else required
    with open(path, "rb") as handle:
        lines = [data.decode("utf-8") for data in handle]
    reader = csv.reader(lines)
    try:
        header = next(reader, [])
        if any(c not in header for c in required):
            return ["missing"]
        at = [header.index(c) if c in header else None for c in columns]
        needed = max((header.index(c) + 1 for c in required), default=0)
        rows = []
        for line in reader:
            if not line:
                continue
            if len(line) < needed:
                raise PrepError(f"{path} line {reader.line_num}: {len(line)} fields; expected {len(header)}"
                                f" ({','.join(header)})")
            rows.append(tuple("" if i is None or i >= len(line) else line[i] for i in at))
        return rows
    except csv.Error as err:
        raise PrepError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None


@pytest.mark.parametrize("seed", range(40))
def test_csv_rows_read_as_the_csv_module_reads_them(tmp_path, seed):
    """iter_csv splits a line without quotes itself: the same rows, and the same errors, as
    the csv module's on any text."""
    from pipeline.errors import PrepError

    rng = random.Random(seed)
    alphabet = ["a", "b", "é", ",", '"', "\n", "\r", " ", "\x85", "\u2028", "1"]
    lines = ["path,label,sha256"]
    for _ in range(rng.randint(0, 30)):
        kind = rng.random()
        if kind < 0.5:  # a row as csv.writer writes it
            buffer = io.StringIO()
            fields = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 4))]
            csv.writer(buffer, lineterminator="\n").writerow(fields)
            lines.append(buffer.getvalue()[:-1])
        else:  # any text: blank, short, stray quotes, a carriage return
            lines.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))))
    path = tmp_path / "t.csv"
    path.write_bytes(("\n".join(lines) + rng.choice(["", "\n", "\r\n"])).encode())
    for columns, required in ((["path", "label"], None), (["label", "gone"], ["label"]), (["sha256"], None)):
        try:
            expected = reference_iter_csv(path, columns, required)
        except PrepError as err:
            expected = str(err)
        try:
            found = list(workdir.iter_csv(path, columns, required))
        except PrepError as err:
            found = "missing" if "missing" in str(err) else str(err)
        if expected == ["missing"]:
            expected = "missing"
        assert found == expected


def test_sha256s_that_are_not_index_s_hex_reach_resized_csv_as_they_are(tmp_path, corpus, prep):
    """labels.csv made by hand: a sha256 in capitals, short, or any text is kept as text (those
    index writes are held as 32 bytes); none matches its file, so each is rejected, as before."""
    assert prep("index", corpus).exit_code == 0
    labels = tmp_path / "work" / "labels.csv"
    rows = workdir.read_csv(labels)
    odd = {0: rows[0]["sha256"].upper(), 3: "abc", 4: "", 7: "z" * 64, 9: rows[9]["sha256"][:-1] + "G"}
    for k, sha in odd.items():
        rows[k]["sha256"] = sha
    workdir.write_csv(labels, list(rows[0]), rows)
    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0, result.output
    table = workdir.read_csv(tmp_path / "work" / "resized.csv")
    assert [r["sha256"] for r in table] == [r["sha256"] for r in rows]
    rejected = {r["path"]: r["reason"] for r in workdir.read_csv(tmp_path / "work" / "rejected.csv")}
    assert all("file changed since" in rejected[rows[k]["path"]] for k in odd)
