"""Without TensorFlow and Keras (prep's `train` extra), every command but verify-train works, and
verify-train says in one line how to install them. Real subprocesses in which importing
tensorflow or keras fails, as on a machine that installed prep with `pip install .`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tree

BLOCKER = '''
import sys


class Blocked:
    """Fails the import of tensorflow and keras, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocked())
'''


def run(tmp_path: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    site = tmp_path / "no-tensorflow"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_run_verify_and_report_without_tensorflow_and_the_one_line_hint(tmp_path: Path):
    blocked = run(tmp_path, code="import tensorflow")
    assert blocked.returncode != 0 and "No module named 'tensorflow'" in blocked.stderr
    raw = make_tree(tmp_path / "raw", {"cat": 12, "dog": 10, "bird": 8}, size=(20, 16))
    result = run(tmp_path, "--workdir", "work", "run", str(raw), "--size", "12x10", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "Verified pkl.gz, h5, tfrecord, parquet" in result.stderr + result.stdout
    assert (tmp_path / "work" / "README.md").is_file() and (tmp_path / "work" / "report" / "index.html").is_file()
    assert "Traceback" not in result.stderr

    code = ("import pipeline; x = pipeline.load('work/tfrecord'); t = pipeline.load_torch('work', 'train');"
            " print(len(x[0][1]), len(t))")
    loaded = run(tmp_path, code=code)
    assert loaded.returncode == 0, loaded.stderr
    counts = loaded.stdout.split()
    assert counts[0] == counts[1] and int(counts[0]) > 0

    for args in (["verify-train"], ["verify-train", "--format", "tfrecord"]):
        result = run(tmp_path, "--workdir", "work", *args)
        assert result.returncode == 1
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert "pip install '.[train]'" in result.stderr and "pip install tensorflow" in result.stderr

    result = run(tmp_path, code="import pipeline; pipeline.load_tf('work', 'train')")
    assert result.returncode == 1 and "pip install '.[train]'" in result.stderr.splitlines()[-1]
