"""The command line: help, lazy imports, the work directory, one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import click
import pytest

from conftest import assert_one_line_error, make_tree
from pipeline.cli import cli

HEAVY = ("tensorflow", "keras", "sklearn", "pandas", "numpy", "h5py", "matplotlib", "dask", "PIL")


def test_python_dash_m_pipeline_help():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: prep")
    for name in ("index", "resize", "split", "encode", "sample"):
        assert f"  {name} " in result.stdout


def test_help_of_every_command_imports_no_heavy_library():
    script = f"""
import json, sys
from pipeline import cli
heavy = {HEAVY!r}
found = {{}}
for argv in [[]] + [[name] for name in sorted(cli.cli.commands)]:
    sys.argv = ["prep", *argv, "--help"]
    try:
        cli.main()
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
    found[" ".join(argv)] = sorted(m for m in heavy if m in sys.modules)
sys.stderr.write(json.dumps(found))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stderr)
    assert set(found) >= {"", "index", "resize", "split", "encode", "sample", "run"}
    assert {argv: mods for argv, mods in found.items() if mods} == {}


def test_a_resize_with_nothing_to_do_imports_neither_numpy_nor_the_decoders(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    work = tmp_path / "work"
    for args in (("index", raw), ("resize", "--size", "8")):
        assert prep(*args, workdir=work).exit_code == 0
    script = f"""
import sys
from pipeline import cli
sys.argv = ["prep", "--workdir", {str(work)!r}, "resize", "--size", "8"]
try:
    cli.main()
except SystemExit as exit:
    assert not exit.code, exit.code
sys.stderr.write(" ".join(m for m in ("numpy", "PIL.JpegImagePlugin", "simplejpeg") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Up to date: 6 images" in result.stdout
    assert result.stderr == ""


def test_a_run_without_a_terminal_shows_no_bar_and_imports_no_tqdm(tmp_path):
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    script = f"""
import sys
from pipeline import cli
sys.argv = ["prep", "--workdir", {str(tmp_path / "work")!r}, "index", {str(raw)!r}]
try:
    cli.main()
except SystemExit as exit:
    assert not exit.code, exit.code
print("tqdm" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)  # stderr: a pipe
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"
    assert "hash" not in result.stderr and "it/s" not in result.stderr


def test_a_run_in_a_terminal_shows_the_progress_bar(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    try:
        result = subprocess.run([sys.executable, "-m", "pipeline", "--workdir", str(tmp_path / "work"), "index", str(raw)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, timeout=60)
        os.close(follower)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything written is read
            while chunk := os.read(leader, 1 << 16):
                shown += chunk
    finally:
        os.close(leader)
    assert result.returncode == 0
    assert b"hash:" in shown and b"/6 [" in shown  # tqdm's bar ("hash:   0%| | 0/6 [..."), on the terminal


def test_every_command_and_option_has_help_text():
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), f"`prep {name}` has no help text"
        assert command.get_short_help_str().strip()
    for name in ("sample", "index", "resize", "split", "encode", "run"):
        for param in cli.commands[name].params:
            if isinstance(param, click.Option):
                assert param.help, f"`prep {name} {param.opts[0]}` has no help text"


def test_workdir_option_and_env_var(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 3, "b": 3})
    result = prep("index", raw, workdir=tmp_path / "w1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w1" / "labels.csv").is_file()

    result = prep("index", raw, workdir=None, env={"PREP_WORKDIR": str(tmp_path / "w2")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w2" / "labels.csv").is_file()
    assert (tmp_path / "w1" / "labels.csv").read_bytes() == (tmp_path / "w2" / "labels.csv").read_bytes()

    # the option wins over the variable
    result = prep("index", raw, workdir=tmp_path / "w3", env={"PREP_WORKDIR": str(tmp_path / "w4")})
    assert result.exit_code == 0
    assert (tmp_path / "w3" / "labels.csv").is_file() and not (tmp_path / "w4").exists()

    # the default is ./processed
    result = prep("index", raw, workdir=None)
    assert result.exit_code == 0
    assert (tmp_path / "processed" / "labels.csv").is_file()


def test_relative_out_lands_in_the_workdir_and_next_stages_find_it(tmp_path, prep):
    raw = make_tree(tmp_path / "raw", {"a": 4, "b": 4})
    work = tmp_path / "work"
    assert prep("index", "raw/", "--out", "labels.csv").exit_code == 0
    assert (work / "labels.csv").is_file()
    assert not (tmp_path / "labels.csv").exists()

    result = prep("resize", "--size", "8", "--executor", "serial")
    assert result.exit_code == 0, result.output
    assert len(list((work / "resized").rglob("*.png"))) == 8
    assert prep("split", "--ratios", "2:1:1").exit_code == 0
    assert prep("encode").exit_code == 0
    assert json.loads((work / "classes.json").read_text())["classes"] == ["a", "b"]

    # a relative --out elsewhere in the work directory, given back with --labels
    assert prep("index", raw, "--out", "other/names.csv").exit_code == 0
    assert (work / "other" / "names.csv").read_bytes() == (work / "labels.csv").read_bytes()


def test_stage_before_its_input_exists_is_a_one_line_error(prep):
    assert_one_line_error(prep("resize"), "labels.csv", "prep index")
    assert_one_line_error(prep("split"), "labels.csv", "prep index")
    assert_one_line_error(prep("encode"), "splits.csv", "prep split")


def test_bad_option_values_are_one_line_errors(tree, prep):
    assert prep("index", tree).exit_code == 0
    for args, fragment in [
        (("resize", "--size", "0"), "'0'"),
        (("resize", "--size", "32x"), "'32x'"),
        (("resize", "--background", "notacolour"), "'notacolour'"),
        (("resize", "--fill", "1,2"), "'1,2'"),
        (("split", "--ratios", "7:-2:1"), "'7:-2:1'"),
    ]:
        result = prep(*args)
        assert result.exit_code != 0, args
        assert "Traceback" not in result.output
        assert fragment in result.stderr, (args, result.stderr)


def test_output_piped_into_a_reader_that_stops_early_is_no_error(tmp_path):
    raw = make_tree(tmp_path / "raw", {"cat": 2, "dog": 2})
    command = [sys.executable, "-m", "pipeline", "--workdir", str(tmp_path / "work"), "index", str(raw)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.close()  # as `prep index raw | head -0` would: prep's first line meets a closed pipe
        stderr = proc.stderr.read().decode()
    assert "Error" not in stderr and "Traceback" not in stderr, stderr
    assert (tmp_path / "work" / "labels.csv").exists()  # the work was done; only the report had nowhere to go


@pytest.mark.parametrize("args, fragments", [
    (["resize", "--size", "0"], ["--size", "'0'", "resize --help'"]),  # checked while the command runs
    (["resize", "--mode", "padd"], ["'padd'", "did you mean 'pad'?"]),  # checked while parsing
    (["pack", "--format", "zip"], ["'zip'"]),
    (["frobnicate"], ["No such command 'frobnicate' (see '"]),
    (["index"], ["Missing argument 'RAW'"]),
    (["sample", "cats", "out"], ["'NAME'", "'cats'"]),
    (["--bogus"], ["--bogus"]),
    (["sample"], ["Missing argument 'NAME'", "digits"]),  # Click's message has two lines
    (["resize", "--sise", "3"], ["No such option '--sise'", "Did you mean '--size'?"]),
])
def test_a_command_line_mistake_is_one_line_not_a_usage_block(prep, args, fragments):
    result = prep(*args)
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert_one_line_error(result, *fragments)


def test_prep_alone_shows_the_help(prep):
    result = prep(workdir=None)
    assert "Usage: " in result.output and "Commands:" in result.output and "Error" not in result.output


def test_a_broken_pipe_other_than_stdout_is_an_error(prep, monkeypatch):
    from pipeline.stages import status

    def lost_worker(cfg):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a worker process or a socket gone

    monkeypatch.setattr(status, "run", lost_worker)
    assert_one_line_error(prep("status"), "Broken pipe")
