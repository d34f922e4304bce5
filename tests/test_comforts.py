"""The everyday comforts: --json everywhere, prep.toml defaults, prep config, prep status, suggestions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from tests.conftest import make_tree


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A folder with raw/ in it, made the current directory (where prep.toml is looked for)."""
    make_tree(tmp_path / "raw", {"cat": 40, "dog": 40}, size=(20, 16))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def stage_states(result) -> dict[str, dict]:
    assert result.exit_code == 0, result.output
    return {s["stage"]: s for s in json.loads(result.stdout)["stages"]}


def test_a_failing_command_with_json_prints_the_error_as_json_too(project: Path):
    result = invoke("split", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)["error"]
    assert error.endswith("labels.csv does not exist; run `prep index RAW` first (or pass the file's path)")
    assert result.stderr.strip() == f"Error: {error}"


def test_every_command_prints_json_on_stdout(project: Path):
    commands = [
        ["sample", "digits", "digits"],
        ["index", "raw"],
        ["resize", "--workers", "1"],
        ["split"],
        ["encode"],
        ["pack", "--format", "pkl.gz"],
        ["verify"],
        ["report"],
        ["status"],
        ["config"],
        ["verify-train", "--model", "mlp", "--epochs", "2", "--margin", "0"],
        ["run", "raw", "--format", "pkl.gz", "--workers", "1"],
    ]
    assert {c[0] for c in commands} == set(cli.commands), "every command is covered"
    for args in commands:
        result = invoke(*args, "--json")
        if args[0] == "verify-train" and result.exit_code != 0:
            pytest.fail(result.output)
        assert result.exit_code == 0, (args, result.output)
        data = json.loads(result.stdout)
        assert isinstance(data, dict) and data, args
    assert json.loads(invoke("index", "raw", "--json").stdout)["images"] == 80
    run = json.loads(invoke("run", "raw", "--format", "pkl.gz", "--json").stdout)
    assert set(run) == {"index", "resize", "split", "encode", "pack", "verify", "report"}
    assert "Found 80 images" in run["index"]["summary"]


def test_human_messages_go_to_stderr_with_json(project: Path):
    result = invoke("index", "raw", "--json")
    assert "Found 80 images in 2 classes" in result.stderr
    assert "Found" not in result.stdout.split("\n")[0]


def test_quiet_and_verbose_on_every_command(project: Path):
    assert invoke("index", "raw", "-q").stdout == ""
    assert "Found 80 images" in invoke("index", "raw").stdout
    for name, command in cli.commands.items():
        options = {opt for p in command.params for opt in p.opts}
        assert {"-q", "--quiet", "-v", "--verbose", "--json"} <= options, name


def test_settings_file_gives_defaults_and_flags_win(project: Path):
    (project / "prep.toml").write_text('[resize]\nsize = "16x12"\nmode = "pad"\n[split]\nratios = "6:2:2"\n')
    assert invoke("index", "raw").exit_code == 0
    assert invoke("resize", "--workers", "1").exit_code == 0
    png = next((project / "processed" / "resized" / "cat").glob("*.png"))
    assert Image.open(png).size == (16, 12)
    assert invoke("resize", "--workers", "1", "--size", "8").exit_code == 0
    assert Image.open(png).size == (8, 8)
    settings = json.loads((project / "processed" / "resize.json").read_text())
    assert settings["mode"] == "pad"  # still from the file
    config = json.loads(invoke("config", "--json").stdout)
    assert config["file"].endswith("prep.toml")
    assert config["commands"]["resize"]["size"] == {"value": "16x12", "from": str(project / "prep.toml")}
    assert config["commands"]["resize"]["interpolation"]["from"] == "default"
    assert config["commands"]["run"]["ratios"]["value"] == "6:2:2"  # run takes every stage's table
    text = invoke("config").stdout
    resize = text.split("[resize]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert any(line.startswith('size = "16x12"') for line in resize)
    assert len({line.index("  # ") for line in resize}) == 1  # the sources line up


def test_pyproject_tool_table_and_workdir(project: Path):
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.prep]\nworkdir = "work"\n')
    assert invoke("index", "raw").exit_code == 0
    assert (project / "work" / "labels.csv").exists()
    assert invoke("--workdir", "other", "index", "raw").exit_code == 0
    assert (project / "other" / "labels.csv").exists()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[resize]\nsise = "16"\n', "unknown setting 'sise' in [resize]; did you mean 'size'?"),
        ('[resise]\nsize = "16"\n', "unknown command [resise]; did you mean 'resize'?"),
        ("[resize\n", "not valid TOML"),
    ],
)
def test_bad_settings_file_is_one_line(project: Path, text: str, fragment: str):
    (project / "prep.toml").write_text(text)
    result = invoke("status")
    assert result.exit_code != 0 and fragment in result.output
    assert "Traceback" not in result.output


def test_unknown_choice_suggests_the_nearest(project: Path):
    result = invoke("pack", "--format", "h6")
    assert result.exit_code == 2 and "did you mean 'h5'?" in result.output
    result = invoke("resize", "--mode", "strech")
    assert "did you mean 'stretch'?" in result.output


def test_status_follows_inputs_and_settings(project: Path):
    before = stage_states(invoke("status", "--json")) if (project / "processed").exists() else None
    assert before is None
    assert invoke("run", "raw", "--format", "pkl.gz", "--workers", "1").exit_code == 0
    states = stage_states(invoke("status", "--json"))
    assert [s["state"] for s in states.values()][:5] == ["up to date"] * 5
    assert states["verify-train"]["state"] == "missing"

    # touch an input: a RAW image changes, then index and resize follow
    target = project / "raw" / "cat" / "img0.png"
    Image.new("RGB", (20, 16), (1, 2, 3)).save(target)
    os.utime(target, ns=(1, 1))
    states = stage_states(invoke("status", "--json"))
    assert states["index"]["state"] == "stale" and "1 image changed in RAW" in states["index"]["reasons"]
    assert invoke("index", "raw").exit_code == 0
    states = stage_states(invoke("status", "--json"))
    assert states["index"]["state"] == "up to date"
    assert states["resize"]["state"] == "stale" and "1 image in labels.csv new or changed" in states["resize"]["reasons"]
    assert states["split"]["state"] == "stale" and "labels.csv changed" in states["split"]["reasons"]

    # change a setting in prep.toml
    assert invoke("run", "raw", "--format", "pkl.gz", "--workers", "1").exit_code == 0
    (project / "prep.toml").write_text('[resize]\nsize = "20"\n[split]\nseed = 7\n')
    states = stage_states(invoke("status", "--json"))
    assert states["resize"]["state"] == "stale"
    assert "size 32 when run; 20 now, from prep.toml" in states["resize"]["reasons"]
    assert "seed 42 when run; 7 now, from prep.toml" in states["split"]["reasons"]
    # the stages after a stale one are stale too: its next run changes their inputs
    assert states["encode"]["state"] == "stale" and states["encode"]["reasons"] == ["waits on resize, which is stale"]
    assert states["pack"]["reasons"] == ["waits on resize, which is stale"]
    assert states["verify-train"]["state"] == "missing"


def test_non_string_workdir_in_settings_is_one_line(project: Path):
    (project / "prep.toml").write_text("workdir = 5\n")
    result = invoke("status")
    assert result.exit_code == 1 and "workdir must be a folder name" in result.output
    assert "Traceback" not in result.output


def test_a_second_command_in_the_same_workdir_fails_at_once(project: Path):
    import subprocess
    import sys

    from pipeline.workdir import Workdir

    (project / "processed").mkdir()
    with Workdir(project / "processed").lock():  # held by this process; the CLI runs in another
        result = subprocess.run([sys.executable, "-m", "pipeline", "index", "raw"], capture_output=True, text=True)
        assert result.returncode == 1 and f"another prep command (pid {os.getpid()})" in result.stderr
        status = subprocess.run([sys.executable, "-m", "pipeline", "status"], capture_output=True, text=True)
        assert status.returncode == 0  # reading needs no lock
    assert invoke("index", "raw").exit_code == 0


def test_an_unwritable_output_is_one_line(project: Path):
    (project / "blocker").write_text("a file where a folder is needed")
    result = invoke("index", "raw", "--out", str(project / "blocker" / "labels.csv"))
    assert result.exit_code == 1 and "blocker" in result.output
    assert "Traceback" not in result.output


def test_run_checks_every_value_before_the_first_stage(project: Path):
    result = invoke("run", "raw", "--ratios", "7:2")
    assert result.exit_code == 1 and "--ratios needs three numbers" in result.output
    assert not (project / "processed" / "labels.csv").exists()  # index did not run
