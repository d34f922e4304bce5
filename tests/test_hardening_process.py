"""The work directory's lock, processes and signals, resource bounds, and files prep did not write.

Signals and processes are tested on real `prep` processes, each in a process group of its own.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import assert_one_line_error, make_tree
from test_resize import slowed_prep_half_way
from pipeline import executors, imaging
from pipeline.workdir import Workdir

INTERRUPTED = "Interrupted; run the same command again to resume."


def prepared(prep, raw: Path, *stages: str) -> None:
    """Run ``stages`` (of index, resize, split, encode, pack) in this process, serially."""
    commands = {
        "index": ["index", raw], "resize": ["resize", "--size", "8", "--executor", "serial"], "split": ["split"],
        "encode": ["encode"], "pack": ["pack", "--format", "pkl.gz", "--executor", "serial"],
    }
    for stage in stages:
        result = prep(*commands[stage])
        assert result.exit_code == 0, result.output


def alive_in_group(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still running (a zombie has ended: it waits to be reaped)."""
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (OSError, psutil.Error):
            pass
    return alive


def left_running(pgid: int, seconds: float = 5) -> list[int]:
    """The processes of group ``pgid`` still running after ``seconds`` (then killed, so that no
    test leaves any behind)."""
    deadline = time.monotonic() + seconds
    while (alive := alive_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive:
        os.killpg(pgid, signal.SIGKILL)
    return alive


# -- the lock ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["index", "status", "verify"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path, prep, tree, command):
    work = tmp_path / "work"
    prepared(prep, tree, "index")
    target = tmp_path / "notes.txt"
    target.write_bytes(b"a file of the user's\n")
    (work / ".lock").unlink(missing_ok=True)
    (work / ".lock").symlink_to(target)

    result = prep(*([command, tree] if command == "index" else [command]))
    assert target.read_bytes() == b"a file of the user's\n"
    assert_one_line_error(result, str(work / ".lock"), "symbolic link")


def test_a_second_first_run_into_a_new_workdir_is_refused_and_the_first_is_intact(tmp_path, prep):
    """The first run makes the work directory and holds it before writing anything."""
    raw = make_tree(tmp_path / "raw", {"a": 12, "b": 12})
    work, hashing = tmp_path / "new" / "work", tmp_path / "hashing"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline import cli, workdir\n"
        "real = workdir.sha256_bytes\n"
        "def slowly(data):\n"
        f"    Path({str(hashing)!r}).touch()\n"
        "    time.sleep(0.1)\n"
        "    return real(data)\n"
        "workdir.sha256_bytes = slowly\n"
        f"sys.argv = ['prep', '-q', '--workdir', {str(work)!r}, 'index', {str(raw)!r}, '--executor', 'serial']\n"
        "cli.main()\n"
    )
    first = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not hashing.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hashing.exists(), first.stderr.read().decode()
        second = subprocess.run([sys.executable, "-m", "pipeline", "--workdir", str(work), "index", str(raw)],
                                capture_output=True, text=True, timeout=120)
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.splitlines() == [f"Error: another prep command (pid {first.pid}) is working in {work}; wait for it"]

    alone = tmp_path / "alone"
    assert prep("index", raw, workdir=alone).exit_code == 0
    assert (work / "labels.csv").read_bytes() == (alone / "labels.csv").read_bytes()
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert not list(work.rglob("*.tmp"))


def test_verify_waits_for_a_writer_and_reads_where_it_cannot_lock(tmp_path, prep, tree, monkeypatch):
    work = tmp_path / "work"
    prepared(prep, tree, "index", "resize", "split", "encode", "pack")
    with Workdir(work).lock():  # a writer (this process) holds the work directory
        verify = subprocess.Popen([sys.executable, "-m", "pipeline", "--workdir", str(work), "verify"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first_line = verify.stderr.readline()  # written before it waits
        assert f"waiting for prep (pid {os.getpid()}) working in {work}" in first_line
        assert verify.poll() is None
    assert verify.wait(timeout=120) == 0, verify.stderr.read()
    assert verify.stdout.read().startswith("Verified pkl.gz")

    # a folder where the lock file cannot be made (another user's, a read-only mount): readers
    # go on without it, a writer says why it cannot
    (work / ".lock").unlink()
    real_open = os.open

    def no_permission(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(".lock") and flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_permission)
    assert prep("verify").exit_code == 0
    assert prep("status").exit_code == 0
    assert_one_line_error(prep("split"), str(work / ".lock"), "Permission denied")


# -- signals and worker processes ---------------------------------------------------------------


def slowed_pack_half_way(work: Path, *args) -> subprocess.Popen:
    """``prep --workdir WORK pack ARGS`` in a process group of its own, each image read slowly,
    once 8 images have been read (as test_resize's slowed_prep_half_way does for resize)."""
    read = work.parent / "read"
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, also under nohup\n"
        "from pipeline import cli, imaging\n"
        "real = imaging.decode_png\n"
        "def slowly(data):\n"
        f"    with open({str(read)!r}, 'a') as done:\n"
        "        done.write('.\\n')\n"
        "    time.sleep(0.2)\n"
        "    return real(data)\n"
        "imaging.decode_png = slowly\n"
        f"sys.argv = ['prep', '-q', '--workdir', {str(work)!r}, 'pack', *{[str(a) for a in args]!r}]\n"
        "cli.main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if read.exists() and read.read_text().count("\n") >= 8:
            return proc
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the pack ended, or took a minute, before it was half way: {proc.stderr.read().decode()}")


STOPS = [("SIGTERM", 143), ("SIGHUP", 129), ("SIGKILL", -signal.SIGKILL)]


@pytest.mark.parametrize("stage", ["resize", "pack"])
@pytest.mark.parametrize("name, code", STOPS)
def test_a_stopped_command_leaves_no_process_behind(tmp_path, prep, stage, name, code):
    """The main process alone gets the signal (as from systemd, `docker stop`, a closed ssh
    session or the out-of-memory killer): its workers end with it, and a SIGTERM or SIGHUP says
    what Ctrl-C says."""
    raw = make_tree(tmp_path / "raw", {"a": 20, "b": 20})
    work = tmp_path / "work"
    if stage == "resize":
        prepared(prep, raw, "index")
        proc = slowed_prep_half_way(work, "resize", "--size", "8", "--workers", "2")
    else:
        prepared(prep, raw, "index", "resize", "split", "encode")
        proc = slowed_pack_half_way(work, "--format", "pkl.gz", "--workers", "2")
    assert len(psutil.Process(proc.pid).children()) == 2  # the workers, running

    os.kill(proc.pid, getattr(signal, name))
    assert proc.wait(timeout=60) == code
    assert left_running(proc.pid) == []
    if name != "SIGKILL":
        assert proc.stderr.read().decode().splitlines() == [INTERRUPTED]
        assert not list(work.rglob("*.tmp"))


def test_the_workers_of_a_local_pool_leave_signals_to_it_and_die_with_it():
    with executors.make_executor("local", workers=2) as pool:
        handlers = {pool.submit(signal.getsignal, s).result() for s in (signal.SIGTERM, signal.SIGHUP) for _ in range(4)}
        on_its_death = {pool.submit(_parent_death_signal).result() for _ in range(4)}
    assert handlers == {signal.SIG_IGN}
    assert on_its_death == {signal.SIGKILL}


def _parent_death_signal() -> int:
    import ctypes

    value = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    return value.value


# -- resource bounds ------------------------------------------------------------------------------


def test_workers_are_at_most_four_per_core(tmp_path, prep, monkeypatch):
    bound = 4 * executors.cpu_count()
    raw = make_tree(tmp_path / "raw", {"a": 20, "b": 20})
    prepared(prep, raw, "index")
    proc = slowed_prep_half_way(tmp_path / "work", "resize", "--size", "8", "--workers", str(bound + 3))
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < len(workers) <= bound
    assert left_running(proc.pid) == []

    # a local Dask cluster is bounded alike; an external one is as large as it is
    assert executors.bounded_workers("dask", 10 * bound) == bound
    assert executors.bounded_workers("dask", 10 * bound, "tcp://cluster:8786") == 10 * bound
    monkeypatch.setattr(executors, "cpu_count", lambda: 1)
    result = prep("resize", "--size", "9", "--workers", "5")
    assert result.exit_code == 0, result.output
    assert "--workers 5 is more than 4 per core on 1 core: using 4" in result.stderr


def test_running_out_of_memory_is_one_line_naming_the_stage(tmp_path, prep, tree, monkeypatch):
    from pipeline.stages import pack

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(pack, "_pack", no_memory)
    result = prep("run", tree, "--size", "8", "--format", "pkl.gz", "--executor", "serial")
    assert_one_line_error(result, "prep pack ran out of memory", "--workers", "h5", "--size")


def test_a_worker_killed_by_the_system_is_one_line(tmp_path, prep, tree, monkeypatch):
    main, real = os.getpid(), imaging.transform

    def killed(data, spec):
        if os.getpid() != main:  # in a worker, as the out-of-memory killer would
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, spec)

    prepared(prep, tree, "index")
    monkeypatch.setattr(imaging, "transform", killed)
    result = prep("resize", "--size", "8", "--workers", "2")
    assert_one_line_error(result, "a worker process of prep resize was killed", "fewer --workers")


@pytest.mark.parametrize("end, said", [("crash", "crashed (SIGSEGV)"), ("exit", "exited with code 3"),
                                       ("exit 0", "exited unexpectedly (with code 0)")])
def test_a_worker_that_crashes_is_one_line_saying_how(tmp_path, prep, tree, monkeypatch, end, said):
    main, real = os.getpid(), imaging.transform

    def dies(data, spec):
        if os.getpid() != main:  # in a worker: a decoder's bug, or a library ending the process
            if end == "crash":
                import ctypes
                import faulthandler

                faulthandler.disable()  # no dump of the stacks on the test's stderr
                ctypes.string_at(0)  # reads address 0: SIGSEGV
            os._exit(0 if end == "exit 0" else 3)
        return real(data, spec)

    prepared(prep, tree, "index")
    monkeypatch.setattr(imaging, "transform", dies)
    result = prep("resize", "--size", "8", "--workers", "2")
    assert_one_line_error(result, f"a worker process of prep resize {said}", "run the same command again")
    assert "out of memory" not in result.stderr
    assert prep("resize", "--size", "8", "--executor", "serial").exit_code == 0  # and it resumes


# -- files prep did not write -----------------------------------------------------------------------


OLD_CARD = """---
pretty_name: "raw"
task_categories:
- image-classification
license: other  # TODO: the license of the source images (an SPDX id such as cc-by-4.0)
---
# raw
"""


def test_a_project_folder_keeps_its_own_readme_and_report(tmp_path, prep, monkeypatch):
    project = tmp_path / "project"
    make_tree(project / "raw", {"a": 12, "b": 12})
    own = {"README.md": b"# My project\n\nNotes of my own.\n", "report/index.html": b"<html>my report</html>\n"}
    for name, data in own.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes(data)
    monkeypatch.chdir(project)

    result = prep("run", "raw", "--size", "8", "--format", "pkl.gz", "--executor", "serial", workdir=Path("."))
    assert result.exit_code == 0, result.output
    again = prep("report", workdir=Path("."))
    assert again.exit_code == 0, again.output
    for name, data in own.items():
        assert (project / name).read_bytes() == data, name
    assert "README.md was not written by prep" in again.stderr and "DATASET_CARD.md" in again.stderr
    assert (project / "DATASET_CARD.md").read_text().startswith("---\n")
    assert b'<meta name="generator" content="prep ' in (project / "report" / "prep.html").read_bytes()


def test_a_card_prep_wrote_is_updated_in_place(tmp_path, prep, tree):
    work = tmp_path / "work"
    assert prep("run", tree, "--size", "8", "--format", "pkl.gz", "--executor", "serial").exit_code == 0
    card = (work / "README.md").read_text()
    assert card.splitlines()[-1].startswith("<!-- written by prep report")  # an HTML comment: not shown

    (work / "README.md").write_text(card.replace("# ", "# Edited: ", 1))
    assert prep("report").exit_code == 0
    assert (work / "README.md").read_text() == card
    (work / "README.md").write_text(OLD_CARD)  # a card of an earlier prep, without the mark
    assert prep("report").exit_code == 0
    assert (work / "README.md").read_text() == card
    assert not (work / "DATASET_CARD.md").exists()


def test_verify_train_leaves_a_verify_folder_of_the_users_alone(tmp_path, prep, tree):
    work = tmp_path / "work"
    prepared(prep, tree, "index", "resize", "split", "encode", "pack")
    mine = work / "verify" / "metrics.json"
    mine.parent.mkdir()
    mine.write_text(json.dumps({"precision": 0.9}))
    result = prep("verify-train", "--model", "mlp", "--epochs", "1")
    assert_one_line_error(result, str(mine), "not written by prep")
    assert json.loads(mine.read_text()) == {"precision": 0.9}
