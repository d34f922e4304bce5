"""What every `prep` command shares, so that pipeline/cli.py holds only the commands.

The Click group's error handling (one-line usage errors, suggestions), the per-command
Context (work directory, verbosity, --json), :func:`delegate` (the options every command takes,
the lock, signals, turning errors into one line, the JSON on stdout), the human output, and the
defaults from prep.toml (:mod:`pipeline.config`) as Click's default_map.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path

import click

from .errors import PrepError


class Choice(click.Choice):
    """click.Choice that suggests the nearest valid value: `--format h6` -> did you mean 'h5'?"""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as err:
            from .config import suggest

            hint = suggest(value, self.choices)
            raise click.BadParameter(
                f"{value!r} is not one of {', '.join(map(repr, self.choices))}{hint}", ctx, param
            ) from err


# plain `prep` (Click 8.2 and later raise this to show the help): shown as Click shows it
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineUsageError(click.UsageError):
    """A mistake on the command line, shown as one line instead of Click's usage block."""

    def __init__(self, err: click.UsageError):
        message = " ".join(line.strip() for line in err.format_message().splitlines() if line.strip())
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
        super().__init__(message.removesuffix(".") + where, err.ctx)

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class Group(click.Group):
    """The prep group: usage errors (bad option values, unknown options or commands, missing
    arguments), whether found while parsing or while a command runs, are one line."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _NO_ARGS_IS_HELP:
            raise
        except click.UsageError as err:
            raise OneLineUsageError(err) from None

    def invoke(self, ctx):
        try:  # covers finding the command, and making and running its context
            return super().invoke(ctx)
        except (_NO_ARGS_IS_HELP, OneLineUsageError):
            raise
        except click.NoSuchOption as err:
            raise OneLineUsageError(_own_suggestion(err)) from None
        except click.UsageError as err:
            raise OneLineUsageError(err) from None


def _own_suggestion(err: click.NoSuchOption) -> click.NoSuchOption:
    """``err`` suggesting the command's own options first (`--sise` -> `--size`, not the
    `--quiet` every command shares); Click's suggestion when none of them is close."""
    if err.ctx is None or err.possibilities is None:
        return err
    own = [opt for param in err.ctx.command.params if isinstance(param, click.Option) and param.name not in COMMON
           for opt in param.opts if opt.startswith("--")]
    close = difflib.get_close_matches(err.option_name, own)
    return click.NoSuchOption(err.option_name, possibilities=close, ctx=err.ctx) if close else err


def _failed(ctx: "Context", message: str) -> click.ClickException:
    """The one-line error (on stderr); with --json, stdout gets it too, as {"error": ...}."""
    message = ctx.shown(message)
    if ctx.json:
        click.echo(json.dumps({"error": message}, ensure_ascii=False))
    return click.ClickException(message)


class Context:
    """What every command shares: the work directory and how much to say, and in what form."""

    def __init__(self, workdir: str | Path, quiet: bool, verbose: int, as_json: bool = False):
        self.use_workdir(workdir)
        self.quiet = quiet
        self.verbose = verbose
        self.json = as_json
        self.warned_workers = False
        self.mirror = None  # the local copy of a URL work directory, while a command holds it
        self.configure_logging()

    def use_workdir(self, given: str | Path) -> None:
        """The work directory: a folder, a ``file://`` URL, or another fsspec URL (``s3://...``),
        which commands work on in a local mirror kept in step with it (see pipeline/remote.py)."""
        from .remote import clean, is_remote, local, mirror_of
        from .workdir import Workdir

        self.remote = clean(os.fspath(given)) if is_remote(given) else None
        self.workdir = Workdir(mirror_of(self.remote), self.remote) if self.remote else Workdir(local(given))

    def fetch(self) -> None:
        """Bring the local copy of a URL work directory up to date, in the middle of a command
        (`prep run`): files that workers wrote to the bucket are fetched for the next stage."""
        if self.mirror is not None and self.mirror.pulled:
            self.mirror.pull()  # what the stages wrote here goes up first

    def shown(self, text: str) -> str:
        """A message with the work directory named as the user gave it (a URL, not its mirror)."""
        return text.replace(str(self.workdir.root), self.remote) if self.remote else text

    @property
    def progress(self) -> bool:
        return not self.quiet

    def execution(self, executor: str, workers: int | None, scheduler: str | None):
        from .executors import WORKERS_PER_CORE, Execution, bounded_workers, cpu_count

        bounded = bounded_workers(executor, workers, scheduler)
        if bounded != workers and not self.warned_workers:  # once for `prep run`, not per stage
            cores = cpu_count()
            logging.warning("--workers %d is more than %d per core on %d core%s: using %d",
                            workers, WORKERS_PER_CORE, cores, "s" * (cores != 1), bounded)
            self.warned_workers = True
        return Execution(executor, bounded, scheduler, self.progress)

    def configure_logging(self) -> None:
        if self.quiet:
            level = logging.ERROR
        else:
            level = logging.DEBUG if self.verbose > 1 else logging.INFO if self.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._shown_record)

    def _shown_record(self, record: logging.LogRecord) -> bool:
        if self.remote:
            record.msg, record.args = self.shown(record.getMessage()), None
        return True


pass_ctx = click.make_pass_decorator(Context)


def delegate(fn=None, *, lock: bool | str = True, makes_workdir: bool | str = True):
    """Give a command -q/-v/--json and --workdir (prep's own options, after the command too),
    print its result, and turn a PrepError into one line and exit 1.

    ``lock``: True for a command that writes into the work directory (it holds it alone while it
    runs), "read" for one that reads its outputs (it waits for a writer to finish), "peek" for
    one that shows it as it is (it goes on beside a writer), False for one that does not use it.
    A writer that may be the first in a work directory (``makes_workdir``; or only when it is given
    the option of that name, its input from elsewhere) makes it, then locks it.
    SIGTERM and SIGHUP stop a command as Ctrl-C does: the same clean-up and message.
    """
    if fn is None:
        return functools.partial(delegate, lock=lock, makes_workdir=makes_workdir)

    @functools.wraps(fn)
    def wrapper(ctx: Context, *args, quiet=False, verbose=0, as_json=False, late_workdir=None, given_workdir=None,
                **kwargs):
        if given_workdir is not None and late_workdir is not None and not _same_place(given_workdir, late_workdir):
            raise click.UsageError(f"two work directories: {given_workdir} and --workdir {late_workdir}; give one")
        given = given_workdir if given_workdir is not None else late_workdir
        if given is not None:  # given after the command: as if before it (a path or a URL, mirrored, locked)
            ctx.use_workdir(given)
        if quiet or verbose or as_json:
            ctx.quiet, ctx.verbose, ctx.json = ctx.quiet or quiet, ctx.verbose + verbose, ctx.json or as_json
            ctx.configure_logging()
        try:
            with _stopped_by_signals(), _locked(ctx, lock, makes_workdir, kwargs):
                result = fn(ctx, *args, **kwargs)
        except PrepError as err:
            raise _failed(ctx, str(err)) from None
        except OutputClosed:  # Click's own handling of a closed stdout: exit 1, quietly
            raise BrokenPipeError(errno.EPIPE, "Broken pipe") from None
        except OSError as err:  # a folder that cannot be created or written, a full disk, ...
            where = f"{err.filename}: " if err.filename else ""
            raise _failed(ctx, f"{where}{err.strerror or err}") from None
        except MemoryError as err:
            stage = _stage_of(err)
            raise _failed(ctx, f"prep {stage} ran out of memory; try {_memory_hint(stage)}") from None
        except Exception as err:
            if not _worker_lost(err):
                raise
            stage = _stage_of(err)
            raise _failed(ctx, _worker_end(stage, getattr(err, "worker_ends", ()))) from None
        except KeyboardInterrupt as err:  # Ctrl-C, or Stopped
            click.echo("Interrupted; run the same command again to resume.", err=True)
            sys.exit(128 + getattr(err, "signum", signal.SIGINT))
        if ctx.json and result is not None:
            click.echo(json.dumps(to_json(result), indent=2, ensure_ascii=False, default=str))

    wrapper = click.option("--json", "as_json", is_flag=True,
                           help="Print a machine-readable summary on stdout (messages go to stderr).")(wrapper)
    wrapper = click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")(wrapper)
    wrapper = click.option("--workdir", "late_workdir", type=click.Path(file_okay=False, path_type=str),
                           help="As `prep --workdir`, which it overrides.")(wrapper)
    return click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")(wrapper)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is, so that it stops as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals():
    """Turn SIGTERM and SIGHUP into :class:`Stopped` while a command runs (unless they are
    ignored on purpose, as under nohup). The worker processes leave them to this process."""
    import threading

    saved = {}
    if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers

        def stop(signum, _frame):
            raise Stopped(signum)

        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                saved[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _locked(ctx: Context, lock: bool | str, makes_workdir: bool | str, options: dict):
    """The lock a command holds on its work directory (--workdir, or verify's WORKDIR argument).
    A work directory given as a URL is fetched into its local copy once the lock is held, and
    what the command wrote is uploaded after it (not by status, which only shows it)."""
    if not lock:
        return contextlib.nullcontext()
    wd = ctx.workdir
    if lock is True and _refused(wd.root, options.get("raw")):
        return contextlib.nullcontext()  # neither the folder nor its lock file: the stage says why
    mirror = None
    if ctx.remote:
        from .remote import Mirror, cache_root, leaves, overlap

        overlap(ctx.remote, options.get("raw"))
        command = click.get_current_context().info_name
        mirror = ctx.mirror = Mirror(ctx.remote, wd.root, leave=leaves(command, options), writes=lock != "peek")
        ctx.workdir = dataclasses.replace(wd, left=mirror.leave)  # read at the URL by the command
        try:
            wd.root.mkdir(parents=True, exist_ok=True)  # the copy, made to be locked before it is fetched
        except OSError as err:  # named by the cache folder: a message names the copy by its URL
            raise PrepError(f"cannot make the local copy of {ctx.remote} in {cache_root()}: {err.strerror or err}"
                            " (copies are kept in $PREP_CACHE, else $XDG_CACHE_HOME/prep, else ~/.cache/prep)"
                            ) from None
    held = mirror.pull if mirror else None
    if lock is True:
        from .workdir import STAGE_OUTPUTS

        command = click.get_current_context().info_name
        create = makes_workdir if isinstance(makes_workdir, bool) else options.get(makes_workdir) is not None
        held_lock = wd.lock(create=create, claims=STAGE_OUTPUTS.get(command, ()), held=held)
    else:
        held_lock = wd.lock(shared=True, wait=lock == "read", held=held)
    if mirror is None:
        return held_lock
    from .remote import synced

    return _both(held_lock, synced(mirror, writes=lock != "peek"))  # uploaded before the lock is let go


@contextlib.contextmanager
def _both(outer, inner):
    with outer, inner:
        yield


def _refused(root: Path, raw: str | None) -> bool:
    """Whether the stage will refuse to write in the work directory, before writing anything:
    RAW is not a folder, or the work directory is inside it (prep never writes into RAW)."""
    if raw is None:
        return False
    from .sources import local_path

    try:
        local = local_path(raw)
    except PrepError:
        return True
    return local is not None and (not os.path.isdir(local) or root.resolve().is_relative_to(Path(local).resolve()))


def _stage_of(err: BaseException) -> str:
    """The command whose stage raised ``err``: the outermost stage module in its traceback
    (for `prep run`, the stage it was in), else the command itself."""
    names = {"train": "verify-train", "card": "report"}
    tb = err.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(f"{__package__}.stages."):
            name = module.rsplit(".", 1)[1]
            return names.get(name, name)
        tb = tb.tb_next
    return click.get_current_context().info_name


def _memory_hint(stage: str) -> str:
    return {
        "pack": "fewer --workers, --format h5 or tfrecord (pkl.gz is built whole in memory), or a smaller resize --size",
        "verify-train": "a smaller --batch-size, or --model small",
        "index": "fewer --workers", "resize": "fewer --workers", "verify": "fewer --workers",
    }.get(stage, "closing other programs")


def _same_place(a: str, b: str) -> bool:
    """Whether two work directories as given are one (``w`` and ``./w``; URLs as written)."""
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def _worker_end(stage: str, ends) -> str:
    """What to say of a worker process of ``stage`` that died; ``ends``: the exit codes of the
    pool's processes, if known (a signal's is minus its number; the others were stopped after)."""
    import signal

    code = next((c for c in ends if c not in (None, 0, -signal.SIGTERM)), 0 if 0 in ends else -signal.SIGKILL)
    if code == -signal.SIGKILL:
        return (f"a worker process of prep {stage} was killed (most often by the system, out of memory);"
                f" try {_memory_hint(stage)}")
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"crashed ({name})"
    else:  # 0: a library that called exit() in the worker
        how = f"exited with code {code}" if code else "exited unexpectedly (with code 0)"
    return f"a worker process of prep {stage} {how}; run the same command again to resume"


def _worker_lost(err: Exception) -> bool:
    """A worker process died under the command (the system's out-of-memory killer, most often):
    a local pool is then broken, and Dask gives up on a task after it killed its workers."""
    from concurrent.futures import BrokenExecutor

    return isinstance(err, BrokenExecutor) or type(err).__name__ == "KilledWorker"


def to_json(result):
    """A stage result (dataclass), or a dict of them, as plain JSON data with its summary."""
    import dataclasses

    if isinstance(result, dict):
        return {key: to_json(value) for key, value in result.items()}
    if dataclasses.is_dataclass(result):
        data = dataclasses.asdict(result)
        summary = getattr(result, "summary", None)
        if isinstance(summary, str):
            data["summary"] = summary
        return data
    return result


class OutputClosed(Exception):
    """stdout was closed by its reader (`prep split | head -1`): not an error of the run."""


def echo(ctx: Context, text: str) -> None:
    """A human message: stdout, or stderr when stdout carries --json; nothing with --quiet."""
    if not ctx.quiet:
        try:
            click.echo(ctx.shown(text), err=ctx.json)
        except BrokenPipeError:
            raise OutputClosed from None


def text_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: wide (e.g. Korean) characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def padded(text: str, width: int) -> str:
    return text + " " * max(0, width - text_width(text))


def count_table(table: dict[str, dict[str, int]], columns) -> str:
    width = max([5] + [text_width(k) for k in table])
    lines = [f"  {'class':<{width}}" + "".join(f"{c:>8}" for c in columns)]
    for label, counts in table.items():
        lines.append(f"  {padded(label, width)}" + "".join(f"{counts[c]:>8}" for c in columns))
    lines.append(f"  {'total':<{width}}" + "".join(f"{sum(t[c] for t in table.values()):>8}" for c in columns))
    return "\n".join(lines)


RUN_PARTS = ("index", "resize", "split", "encode", "pack")


COMMON = {"quiet", "verbose", "as_json", "help", "late_workdir"}  # options every command has


def _option_names(command: click.Command) -> dict[str, click.Parameter]:
    """Every spelling a settings file may use for an option (``labels-from``, ``format``) -> its parameter."""
    names = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in COMMON:
            names[param.name] = param
            for opt in param.opts:
                names[opt.lstrip("-").replace("-", "_")] = param
    return names


def settings_file(ctx: click.Context):
    from . import config

    try:
        settings = config.find(Path.cwd())
        config.check(
            settings,
            set(_option_names(ctx.command)),
            {name: set(_option_names(cmd)) for name, cmd in ctx.find_root().command.commands.items()},
        )
    except PrepError as err:
        raise click.ClickException(str(err)) from None
    return settings


def _default_map(group: click.Group, settings) -> dict[str, dict]:
    """Click's default_map from the settings file; `run` takes every stage's table, then its own.
    A value of the wrong TOML type for its option (a number for a path, a list for a number) is
    a one-line error naming the file, table and key."""
    default_map: dict[str, dict] = {}
    for name, command in group.commands.items():
        names = _option_names(command)
        parts = [*(RUN_PARTS if name == "run" else ()), name]
        values = {}
        for part in parts:
            for key, value in settings.commands.get(part, {}).items():
                if key in names:
                    param = names[key]
                    _check_setting(settings.source, part, key, param, value)
                    values[param.name] = [value] if param.multiple and not isinstance(value, list) else value
        if values:
            default_map[name] = values
    return default_map


def _check_setting(source: Path, table: str, key: str, param: click.Parameter, value) -> None:
    """That ``value`` from the settings file is of a TOML type ``param`` takes (Click checks the
    value itself): a string for a path, true or false for a flag, a whole number for a count,
    a list of those for a repeatable option. A string is taken for a number or a flag too, as
    Click takes one on the command line."""
    kind = param.type
    if isinstance(kind, click.Path):
        expected, fits = "a path in quotes", lambda v: isinstance(v, str)
    elif getattr(param, "is_flag", False):
        expected, fits = "true or false", lambda v: isinstance(v, (bool, str))
    elif isinstance(kind, click.types.IntParamType):
        expected, fits = "a whole number", lambda v: isinstance(v, (int, str)) and not isinstance(v, bool)
    elif isinstance(kind, click.types.FloatParamType):
        expected, fits = "a number", lambda v: isinstance(v, (int, float, str)) and not isinstance(v, bool)
    else:
        expected, fits = "a value in quotes", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)
    if param.multiple:
        expected, ok = f"{expected}, or a list of them", all(map(fits, value)) if isinstance(value, list) else fits(value)
    else:
        ok = fits(value)
    if not ok:
        where = f"tool.prep.{table}" if source.name == "pyproject.toml" else table
        shown = json.dumps(value, ensure_ascii=False, default=str)  # as TOML writes it, mostly
        raise click.ClickException(f"{source}: [{where}] {key} must be {expected}; received {shown}")


def effective_settings(ctx: click.Context, name: str) -> dict[str, tuple[object, str]]:
    """option -> (value, where it came from) for command ``name``, before any command-line flag."""
    root = ctx.find_root()
    source = str(settings_file(root).source or "")
    given = (root.default_map or {}).get(name, {})
    command = root.command.commands[name]
    # parsing no arguments gives every option its effective default, converted by its type
    values = command.make_context(name, [], parent=root, resilient_parsing=True).params
    return {
        param.name: (values.get(param.name), source if param.name in given else "default")
        for param in command.params
        if isinstance(param, click.Option) and param.name not in COMMON
    }



def configure(ctx: click.Context, workdir: Path, quiet: bool, verbose: int) -> None:
    """Set up the group's context: the settings file's defaults, and the shared :class:`Context`."""
    settings = settings_file(ctx)
    if "workdir" in settings.group and ctx.get_parameter_source("workdir") == click.core.ParameterSource.DEFAULT:
        if not isinstance(settings.group["workdir"], str):
            raise click.ClickException(
                f"{settings.source}: workdir must be a folder name in quotes; received {settings.group['workdir']!r}"
            )
        workdir = settings.group["workdir"]
    ctx.default_map = _default_map(ctx.command, settings)
    ctx.obj = Context(workdir, quiet, verbose)
