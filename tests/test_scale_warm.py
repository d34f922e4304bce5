"""Asked again with nothing changed, `prep status` and `prep report` do no per-image work: no
CSV row parsed, no image read, no file hashed; a change makes them look again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline import workdir
from pipeline.stages import index, report, resize
from tests.conftest import make_tree


class Work:
    """Counts of the per-image work done: CSVs parsed, files hashed, images read."""

    def __init__(self, monkeypatch):
        self.csv, self.hashed, self.images = [], [], []
        read_csv, iter_csv = workdir.read_csv, workdir.iter_csv
        sha256_file, read_file = workdir.sha256_file, workdir.read_file
        image_open, read_bytes = Image.open, Path.read_bytes

        def counted(log, call, is_image=lambda path: False):
            def wrapper(path, *args, **kwargs):
                (self.images if is_image(path) else log).append(Path(path).name)
                return call(path, *args, **kwargs)
            return wrapper

        png = lambda path: str(path).endswith(".png")  # noqa: E731
        monkeypatch.setattr(workdir, "read_csv", counted(self.csv, read_csv))
        monkeypatch.setattr(workdir, "iter_csv", counted(self.csv, iter_csv))
        monkeypatch.setattr(workdir, "sha256_file", counted(self.hashed, sha256_file))
        monkeypatch.setattr(workdir, "read_file", counted([], read_file, png))
        monkeypatch.setattr(Image, "open", counted(self.images, image_open))
        monkeypatch.setattr(Path, "read_bytes", counted([], read_bytes, png))

    def none(self) -> bool:
        return not (self.csv or self.hashed or self.images)


@pytest.fixture
def settled(monkeypatch):
    """Every file counts as settled at once (in use, 2 s after its last change), so that a test
    need not wait for the caches to trust what it just wrote."""
    for module in (workdir, index, resize):
        monkeypatch.setattr(module, "SETTLED_NS", -60 * 10**9, raising=False)


@pytest.fixture
def packed(prep, tmp_path: Path) -> Path:
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 12, "bird": 9})
    for args in (["index", raw], ["resize", "--executor", "serial"], ["split"], ["encode"],
                 ["pack", "--format", "pkl.gz", "--executor", "serial"]):
        result = prep(*args)
        assert result.exit_code == 0, result.output
    return tmp_path / "work"


def states(result) -> dict[str, str]:
    return {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.strip()}


def test_the_file_hash_cache_trusts_a_settled_unchanged_file_only(tmp_path: Path, monkeypatch):
    wd = workdir.Workdir(tmp_path)
    data = tmp_path / "labels.csv"
    data.write_text("path,label\na.png,cat\n")
    work = Work(monkeypatch)
    hashes = workdir.FileHashes(wd)
    digest = workdir.sha256_bytes(data.read_bytes())
    assert hashes.sha256(data) == hashes.sha256(data) == digest
    assert len(work.hashed) == 2  # just written: a rewrite in the same clock tick would keep its times
    hashes.save()
    assert not wd.path(workdir.FILE_HASHES).exists()

    monkeypatch.setattr(workdir, "SETTLED_NS", -60 * 10**9)
    hashes.sha256(data)
    hashes.save()
    work.hashed.clear()
    assert workdir.FileHashes(wd).sha256(data) == digest and work.hashed == []

    # the same size, the mtime put back: its ctime tells
    st = data.stat()
    data.write_text("path,label\nb.png,cat\n")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert workdir.FileHashes(wd).sha256(data) == workdir.sha256_bytes(data.read_bytes()) != digest
    assert work.hashed == ["labels.csv"]


def test_warm_status_reads_no_row_and_no_image_and_a_change_is_seen(prep, packed: Path, settled, monkeypatch):
    first = prep("status")
    assert list(states(first).values())[:5] == ["up", "up", "up", "up", "up"], first.stdout
    work = Work(monkeypatch)
    again = prep("status")
    assert again.stdout == first.stdout
    assert work.none(), (work.csv, work.hashed, work.images)

    png = packed / "resized" / "dog" / "img1.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png)  # in place: resized/dog/ itself is unchanged
    changed = prep("status")
    assert states(changed)["resize"] == "stale" and "dog/img1.png" in changed.stdout
    assert "resized.csv" in work.csv and "img1.png" in work.images

    labels = packed / "labels.csv"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))  # an image fewer
    work.csv.clear()
    result = prep("status")
    assert states(result)["index"] == "stale" and "1 image no longer in labels.csv" in result.stdout
    assert "labels.csv" in work.csv


def test_warm_report_is_up_to_date_without_reading_and_a_change_redoes_it(prep, packed: Path, settled, monkeypatch):
    first = prep("report")
    assert first.exit_code == 0 and "Wrote" in first.stdout
    page, card = packed / "report" / "index.html", packed / "README.md"
    written = page.read_bytes(), card.read_bytes(), page.stat().st_mtime_ns

    work = Work(monkeypatch)
    again = prep("report")
    assert again.exit_code == 0 and again.stdout.startswith("Up to date:"), again.stdout
    assert "README.md" in again.stdout
    assert work.none(), (work.csv, work.hashed, work.images)
    assert (page.read_bytes(), card.read_bytes(), page.stat().st_mtime_ns) == written

    assert prep("report", "--samples", "2").stdout.startswith("Wrote")  # another option
    assert "splits.csv" in work.csv
    assert prep("report").stdout.startswith("Wrote")
    assert page.read_bytes() == written[0]

    card.unlink()  # an output gone
    assert prep("report").stdout.startswith("Wrote") and card.read_bytes() == written[1]

    assert prep("split", "--seed", "7").exit_code == 0  # an input changed
    work.csv.clear()
    assert prep("report").stdout.startswith("Wrote") and "splits.csv" in work.csv
    assert page.read_bytes() != written[0]


def test_report_up_to_date_names_what_it_keeps(prep, packed: Path, settled):
    prep("report")
    result = prep("report", "--json")
    assert '"up_to_date": true' in result.stdout
    assert report.STAMP and (packed / workdir.STAMPS_DIR / f"{report.STAMP}.json").exists()
