"""Defaults from ``prep.toml`` (or ``[tool.prep]`` in ``pyproject.toml``) in the current folder.

The file mirrors the command line: top-level keys are options of ``prep`` itself (``workdir``),
tables are commands, keys are option names with ``-`` or ``_``::

    workdir = "work"
    [resize]
    size = "64x64"
    mode = "crop"
    [split]
    ratios = "8:1:1"

Flags given on the command line win over the file, which wins over the built-in defaults.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PrepError


@dataclass
class Settings:
    """The defaults found, and the file they came from (None when there is none)."""

    source: Path | None = None
    group: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)


def find(folder: Path) -> Settings:
    """Read ``prep.toml``, else ``pyproject.toml``'s ``[tool.prep]``, from ``folder``."""
    for name, section in (("prep.toml", None), ("pyproject.toml", ("tool", "prep"))):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PrepError(f"{path}: not valid TOML ({err})") from None
        if section:
            for key in section:
                data = data.get(key, {}) if isinstance(data, dict) else {}
            if not data:
                continue
        group = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
        commands = {
            k: {o.replace("-", "_"): v for o, v in table.items()} for k, table in data.items() if isinstance(table, dict)
        }
        return Settings(path, group, commands)
    return Settings()


def check(settings: Settings, group_options: set[str], command_options: dict[str, set[str]]) -> None:
    """Every key must name a real command and option; suggest the nearest one when not."""
    where = settings.source
    for key in settings.group:
        if key not in group_options:
            raise PrepError(f"{where}: unknown setting {key!r}{suggest(key, group_options | set(command_options))}")
    for command, options in settings.commands.items():
        if command not in command_options:
            raise PrepError(f"{where}: unknown command [{command}]{suggest(command, command_options)}")
        for key in options:
            if key not in command_options[command]:
                raise PrepError(
                    f"{where}: unknown setting {key!r} in [{command}]{suggest(key, command_options[command])}"
                )


def suggest(value: str, choices) -> str:
    """``"; did you mean 'h5'?"`` for the nearest valid choice, or nothing."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""
