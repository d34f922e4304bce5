"""`prep pack`: outputs, manifest.json, determinism, up-to-date skips, atomicity and errors.

Work directories are made by running the real index, resize, split and encode stages on a
generated tree; the helpers here are shared with test_formats.py and test_verify.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import assert_one_line_error, make_tree, tree_digests
from PIL import Image

from pipeline.cli import cli
from pipeline.errors import PrepError
from pipeline.stages import pack

CLASSES = {"cat": 12, "dog": 10, "bird": 8}
OUTPUTS = ("dataset.pkl.gz", "dataset.h5", "tfrecord", "manifest.json")


def cli_run(work: Path, *args) -> Result:
    """``prep --workdir WORK ARGS`` in this process."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        return CliRunner().invoke(cli, ["--workdir", str(work), *map(str, args)], catch_exceptions=False)
    finally:  # the CLI points logging at the runner's stream, closed once it returns
        root.handlers[:], root.level = saved


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def prepare(folder: Path, size: str = "12x8", channels: str = "3", ratios: str = "6:2:2") -> Path:
    """A work directory after index, resize, split and encode of a generated tree."""
    raw = make_tree(folder / "raw", CLASSES)
    work = folder / "work"
    ok(cli_run(work, "index", raw, "--executor", "serial"))
    ok(cli_run(work, "resize", "--size", size, "--channels", channels, "--executor", "serial"))
    ok(cli_run(work, "split", "--ratios", ratios))
    ok(cli_run(work, "encode"))
    return work


def encoded_rows(work: Path) -> list[dict]:
    with open(work / "encoded.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def outputs(work: Path) -> dict[str, str]:
    """sha256 of every packaged file, by path relative to the work directory."""
    found = {}
    for name in OUTPUTS:
        path = work / name
        if path.is_dir():
            found.update({f"{name}/{rel}": digest for rel, digest in tree_digests(path).items()})
        elif path.exists():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("encoded"))


@pytest.fixture
def work(encoded: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(encoded, tmp_path / "work"))


@pytest.fixture(scope="module")
def packed_all(encoded: Path, tmp_path_factory) -> Path:
    """All three formats, several gzip-compressed TFRecord shards per split."""
    work = Path(shutil.copytree(encoded, tmp_path_factory.mktemp("packed") / "work"))
    ok(cli_run(work, "pack", "--executor", "serial", "--shard-mb", "0.002", "--tfrecord-compression", "gzip"))
    return work


def test_pack_format_pkl_gz_writes_only_it_and_the_manifest(work):
    result = ok(cli_run(work, "pack", "--format", "pkl.gz"))
    assert (work / "dataset.pkl.gz").is_file()
    assert not (work / "dataset.h5").exists() and not (work / "tfrecord").exists()
    manifest = json.loads((work / "manifest.json").read_text())
    assert list(manifest["files"]) == ["dataset.pkl.gz"]
    assert manifest["settings"]["pack"]["formats"] == ["pkl.gz"]
    counts = Counter(r["split"] for r in encoded_rows(work))
    expected = f"train {counts['train']}, valid {counts['valid']}, test {counts['test']}; shape (8, 12, 3); 3 classes"
    assert f"Packed {sum(CLASSES.values())} images ({expected})" in result.stdout


def test_manifest_checksums_counts_and_settings(work):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--executor", "serial"))
    manifest = json.loads((work / "manifest.json").read_text())
    assert set(manifest["files"]) == {"dataset.pkl.gz", "dataset.h5"}
    for rel, entry in manifest["files"].items():
        data = (work / rel).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    rows = encoded_rows(work)
    per_split = Counter(r["split"] for r in rows)
    per_class = Counter((r["split"], r["label"]) for r in rows)
    for split, entry in manifest["splits"].items():
        assert entry["count"] == per_split[split]
        assert entry["classes"] == {label: n for (s, label), n in per_class.items() if s == split}
    assert manifest["classes"] == json.loads((work / "classes.json").read_text())["classes"]
    assert manifest["image"] == {"height": 8, "width": 12, "channels": 3}
    settings = manifest["settings"]
    assert (settings["resize"]["width"], settings["resize"]["height"], settings["resize"]["mode"]) == (12, 8, "stretch")
    split = {k: settings["split"][k] for k in ("ratios", "seed", "drop_small", "dropped_classes", "near_copies")}
    assert split == {"ratios": [0.6, 0.2, 0.2], "seed": 42, "drop_small": False, "dropped_classes": {},
                     "near_copies": "default"}
    assert settings["pack"]["pkl.gz"] == {"flat": False, "as_float": False}
    assert manifest["inputs"]["encoded.csv"] == hashlib.sha256((work / "encoded.csv").read_bytes()).hexdigest()


def test_rerun_gives_identical_bytes_whatever_the_executor(packed_all, tmp_path):
    shards = [name for name in outputs(packed_all) if name.startswith("tfrecord/train-")]
    assert len(shards) > 1, "the tiny --shard-mb should give several train shards"
    again = Path(shutil.copytree(packed_all, tmp_path / "again"))
    for name in ("dataset.pkl.gz", "dataset.h5", "tfrecord", "manifest.json", ".stamps"):
        target = again / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    ok(cli_run(again, "pack", "--executor", "local", "--workers", "2", "--shard-mb", "0.002",
               "--tfrecord-compression", "gzip"))
    assert outputs(again) == outputs(packed_all)


def test_up_to_date_pack_skips_without_importing_tensorflow_h5py_numpy_or_the_decoders(work):
    ok(cli_run(work, "pack", "--executor", "serial", "--shard-mb", "0.002", "--tfrecord-compression", "gzip"))
    before = {p: os.stat(work / p).st_mtime_ns for p in outputs(work)}
    script = (
        "import sys\nfrom pipeline.cli import main\n"
        f"sys.argv = ['prep', '--workdir', {str(work)!r}, 'pack', '--shard-mb', '0.002',"
        " '--tfrecord-compression', 'gzip']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('tensorflow', 'h5py', 'numpy', 'PIL.Image', 'simplejpeg', 'multiprocessing')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Up to date: {sum(CLASSES.values())} images")
    assert result.stdout.strip().endswith("[]")
    assert {p: os.stat(work / p).st_mtime_ns for p in outputs(work)} == before

    # a changed pkl.gz option repacks pkl.gz only
    result = ok(cli_run(work, "pack", "--flat", "--shard-mb", "0.002", "--tfrecord-compression", "gzip"))
    changed = {p for p in outputs(work) if os.stat(work / p).st_mtime_ns != before[p]}
    assert changed == {"dataset.pkl.gz", "manifest.json"}
    assert "dataset.pkl.gz" in result.stdout and "(written)" in result.stdout


def test_another_compressor_version_repacks_pkl_gz(work, monkeypatch):
    from pipeline.formats import pickle_gz

    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5"))
    assert "Up to date" in ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5")).stdout
    monkeypatch.setattr(pickle_gz, "ENCODING", pickle_gz.ENCODING + "-another-libdeflate")
    result = ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5"))
    assert re.search(r"dataset\.pkl\.gz [\d.]+ [KM]?B \(written\), dataset\.h5 [\d.]+ [KM]?B \(up to date\)",
                     result.stdout), result.stdout


def test_failed_pack_leaves_the_previous_outputs_intact(work):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--executor", "serial"))
    before = outputs(work)
    shutil.rmtree(work / ".stamps")
    broken = work / "resized" / encoded_rows(work)[-1]["resized"]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--flat", "--executor", "serial")
    assert_one_line_error(result, str(broken))
    assert outputs(work) == before
    assert not [p for p in work.rglob("*.tmp")]


def test_run_ends_with_pack_and_verify(tmp_path):
    raw = make_tree(tmp_path / "raw", {"a": 5, "b": 6})
    result = ok(cli_run(tmp_path / "work", "run", raw, "--size", "8", "--format", "pkl.gz", "--executor", "serial"))
    assert (tmp_path / "work" / "dataset.pkl.gz").is_file()
    assert "Packed 11 images" in result.stdout and "Verified pkl.gz" in result.stdout


def test_a_format_not_repacked_after_its_inputs_changed_leaves_the_manifest(work):
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--format", "h5", "--executor", "serial"))
    ok(cli_run(work, "split", "--ratios", "6:2:2", "--seed", "7"))
    ok(cli_run(work, "encode"))
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    manifest = json.loads((work / "manifest.json").read_text())
    assert list(manifest["files"]) == ["dataset.pkl.gz"]
    assert (work / "dataset.h5").exists()
    assert "Verified pkl.gz:" in ok(cli_run(work, "verify", "--executor", "serial")).stdout


# -- errors ---------------------------------------------------------------------------------


def test_missing_encoded_csv(work):
    (work / "encoded.csv").unlink()
    assert_one_line_error(cli_run(work, "pack"), "encoded.csv", "prep encode")


def test_a_split_or_encode_older_than_its_inputs_is_named_and_nothing_is_packed(work, tmp_path):
    """Packing an encoded.csv older than splits.csv would pack the split before, silently; one
    older than resized.csv named resize as the fault."""
    ok(cli_run(work, "split", "--ratios", "6:2:2", "--seed", "7"))
    assert_one_line_error(cli_run(work, "pack", "--format", "pkl.gz"),
                          "encoded.csv is out of date", "splits.csv changed since `prep encode`", "run `prep encode`")
    assert not (work / "dataset.pkl.gz").exists()
    ok(cli_run(work, "encode"))
    ok(cli_run(work, "resize", "--size", "10x8", "--executor", "serial"))  # resized.csv changes
    assert_one_line_error(cli_run(work, "pack", "--format", "pkl.gz"), "splits.csv is out of date",
                          "resized.csv changed since `prep split`", "run `prep split` and `prep encode`")
    assert not (work / "dataset.pkl.gz").exists()
    ok(cli_run(work, "split", "--ratios", "6:2:2", "--seed", "7"))
    ok(cli_run(work, "encode"))
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    fresh = prepare(tmp_path / "fresh", size="10x8")  # the same steps in one go
    ok(cli_run(fresh, "split", "--ratios", "6:2:2", "--seed", "7"))
    ok(cli_run(fresh, "encode"))
    ok(cli_run(fresh, "pack", "--format", "pkl.gz", "--executor", "serial"))
    assert (work / "dataset.pkl.gz").read_bytes() == (fresh / "dataset.pkl.gz").read_bytes()


def test_verify_after_a_new_split_names_every_stage_to_run(work):
    """verify found the packed files older than the split, and said to pack again, which pack
    then refused until encode had run."""
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    assert "Verified pkl.gz: 1 file," in ok(cli_run(work, "verify", "--executor", "serial")).stdout
    ok(cli_run(work, "split", "--ratios", "6:2:2", "--seed", "7"))
    assert_one_line_error(cli_run(work, "verify", "--executor", "serial"), "changed since `prep pack`",
                          "splits.csv changed since `prep encode`; run `prep encode`, then `prep pack`")
    ok(cli_run(work, "encode"))
    assert_one_line_error(cli_run(work, "verify", "--executor", "serial"), "changed since `prep pack`",
                          "run `prep pack` again")
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    ok(cli_run(work, "verify", "--executor", "serial"))


def test_a_groups_file_outside_the_work_directory_may_be_gone_when_packing(work, tmp_path):
    """A file given to split once (--groups) and since deleted, or left on another machine, is
    not a change that makes the split older than its inputs."""
    groups = tmp_path / "groups.csv"
    first = encoded_rows(work)[0]["path"]
    groups.write_text(f"path,group\n{first},g1\n")
    ok(cli_run(work, "split", "--ratios", "6:2:2", "--groups", groups))
    ok(cli_run(work, "encode"))
    groups.unlink()
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    (work / "resized.csv").unlink()  # one in the work directory is another matter
    assert_one_line_error(cli_run(work, "pack", "--format", "pkl.gz"), "resized.csv is gone since `prep split`")


def test_a_stamp_someone_else_wrote_opens_no_fifo_and_reads_nothing_outside(work, tmp_path, monkeypatch):
    """The inputs a stamp records are read to tell whether they changed: from a work directory
    someone sent, a name leading out of it is passed over, and a FIFO (which would block a read)
    is no file."""
    from pipeline import workdir

    outside = tmp_path / "secret.txt"
    outside.write_text("not the work directory's")
    os.mkfifo(work / "fifo")
    (work / "out").symlink_to(tmp_path)
    stamp = json.loads((work / ".stamps" / "encode.json").read_text())
    stamp["inputs"].update({"../secret.txt": "0" * 64, "out/secret.txt": "0" * 64, "fifo": "0" * 64,
                            str(tmp_path / "nothing-here"): "0" * 64})
    (work / ".stamps" / "encode.json").write_text(json.dumps(stamp))
    hashed = []
    real = workdir.FileHashes.sha256
    monkeypatch.setattr(workdir.FileHashes, "sha256", lambda self, path: hashed.append(Path(path)) or real(self, path))
    assert workdir.Stamp(workdir.Workdir(work), "encode").changed_inputs() == ["fifo is gone"]
    assert outside not in hashed and not [p for p in hashed if "secret" in p.name or p.name == "fifo"]
    assert_one_line_error(cli_run(work, "pack", "--format", "pkl.gz"), "encoded.csv is out of date: fifo is gone")


def test_a_work_directory_without_stamps_still_packs(work):
    """Stamps are prep's own bookkeeping: a work directory sent without them is packed as it is."""
    shutil.rmtree(work / ".stamps")
    ok(cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"))
    assert (work / "dataset.pkl.gz").exists()


@pytest.mark.parametrize("fmt", ["h5", "pkl.gz", "tfrecord"])
@pytest.mark.parametrize("row", [0, 4])  # the first file gives the shape; a later one is read by a worker
def test_missing_resized_file_is_named(work, fmt, row):
    missing = work / "resized" / encoded_rows(work)[row]["resized"]
    missing.unlink()
    assert_one_line_error(cli_run(work, "pack", "--format", fmt), str(missing), "missing", "prep resize")
    assert not list(work.glob("dataset*")) and not (work / "tfrecord").exists()


def test_mixed_shapes_name_the_first_odd_file(work):
    rows = encoded_rows(work)
    for row in (rows[7], rows[9]):
        Image.new("RGB", (5, 5), (1, 2, 3)).save(work / "resized" / row["resized"])
        row["resized_sha256"] = hashlib.sha256((work / "resized" / row["resized"]).read_bytes()).hexdigest()
    with open(work / "encoded.csv", "w", encoding="utf-8", newline="") as handle:  # as if resize made them so
        writer = csv.DictWriter(handle, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert_one_line_error(
        cli_run(work, "pack", "--format", "pkl.gz", "--executor", "serial"),
        str(work / "resized" / rows[7]["resized"]), "5x5", f"but {work / 'resized' / rows[0]['resized']} is 12x8",
    )


def test_unknown_format_lists_the_valid_ones(work):
    result = cli_run(work, "pack", "--format", "zip")
    assert result.exit_code == 2
    for name in ("'pkl.gz'", "'h5'", "'tfrecord'", "'all'"):
        assert name in result.stderr
    with pytest.raises(PrepError, match="unknown format 'zip'; expected one of pkl.gz, h5, tfrecord"):
        pack.parse_formats(["zip"])
