"""The `prep` command line: parse options, build a stage config, call the stage, report.

Nothing else lives here. Stage modules are imported inside each command, so `prep --help`
does not pay for numpy, scikit-learn or tensorflow.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from .errors import PrepError
from .spec import INTERPOLATION_NAMES, RESIZE_MODES

FORMATS = ("pkl.gz", "h5", "tfrecord")


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
            own = {name for param in self.params for name in param.opts}  # prep's own, as --workdir
            if err.option_name in own and err.ctx is not None:
                err = click.UsageError(
                    f"{err.option_name} is an option of prep itself: put it before the command"
                    f" (prep {err.option_name} ... {err.ctx.info_name} ...)", err.ctx)
            raise OneLineUsageError(err) from None
        except click.UsageError as err:
            raise OneLineUsageError(err) from None


def _failed(ctx: "Context", message: str) -> click.ClickException:
    """The one-line error (on stderr); with --json, stdout gets it too, as {"error": ...}."""
    if ctx.json:
        click.echo(json.dumps({"error": message}, ensure_ascii=False))
    return click.ClickException(message)


class Context:
    """What every command shares: the work directory and how much to say, and in what form."""

    def __init__(self, workdir: Path, quiet: bool, verbose: int, as_json: bool = False):
        from .workdir import Workdir

        self.workdir = Workdir(workdir)
        self.quiet = quiet
        self.verbose = verbose
        self.json = as_json
        self.configure_logging()

    @property
    def progress(self) -> bool:
        return not self.quiet

    def execution(self, executor: str, workers: int | None, scheduler: str | None):
        from .executors import Execution

        return Execution(executor, workers, scheduler, self.progress)

    def configure_logging(self) -> None:
        if self.quiet:
            level = logging.ERROR
        else:
            level = logging.DEBUG if self.verbose > 1 else logging.INFO if self.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


pass_ctx = click.make_pass_decorator(Context)


def delegate(fn=None, *, lock: bool = True):
    """Give a command -q/-v/--json, print its result, and turn a PrepError into one line and exit 1.

    A command that writes into the work directory holds its lock (``lock=True``) while it runs.
    """
    if fn is None:
        return functools.partial(delegate, lock=lock)

    @functools.wraps(fn)
    def wrapper(ctx: Context, *args, quiet=False, verbose=0, as_json=False, **kwargs):
        if quiet or verbose or as_json:
            ctx.quiet, ctx.verbose, ctx.json = ctx.quiet or quiet, ctx.verbose + verbose, ctx.json or as_json
            ctx.configure_logging()
        try:
            with ctx.workdir.lock() if lock else contextlib.nullcontext():
                result = fn(ctx, *args, **kwargs)
        except PrepError as err:
            raise _failed(ctx, str(err)) from None
        except OutputClosed:  # Click's own handling of a closed stdout: exit 1, quietly
            raise BrokenPipeError(errno.EPIPE, "Broken pipe") from None
        except OSError as err:  # a folder that cannot be created or written, a full disk, ...
            where = f"{err.filename}: " if err.filename else ""
            raise _failed(ctx, f"{where}{err.strerror or err}") from None
        except KeyboardInterrupt:
            click.echo("Interrupted; run the same command again to resume.", err=True)
            sys.exit(130)
        if ctx.json and result is not None:
            click.echo(json.dumps(to_json(result), indent=2, ensure_ascii=False, default=str))

    wrapper = click.option("--json", "as_json", is_flag=True,
                           help="Print a machine-readable summary on stdout (messages go to stderr).")(wrapper)
    wrapper = click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")(wrapper)
    return click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")(wrapper)


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


def _check_executor(ctx, param, value):
    """Fail before any work if the chosen executor's package is missing."""
    from .executors import require

    try:
        require(value)
    except PrepError as err:
        raise click.ClickException(str(err)) from None
    return value


def executor_options(fn):
    fn = click.option("--scheduler", envvar="PREP_SCHEDULER", metavar="URL",
                      help="Dask scheduler address (tcp://host:8786) of a running cluster; with --executor dask.")(fn)
    fn = click.option("--workers", type=click.IntRange(min=1), default=None,
                      help="Worker processes [default: all cores]; with --executor dask and no --scheduler, "
                           "the size of the local Dask cluster.")(fn)
    fn = click.option("--executor", type=Choice(["local", "serial", "dask"]), default="local",
                      show_default=True, callback=_check_executor,
                      help="Where the work runs: local processes, this process, or Dask (pip install 'dask[distributed]').")(fn)
    return fn


def resize_options(fn):
    options = [
        click.option("--size", default="32", show_default=True, metavar="N|WxH", help="Output size: 32 or 64x48 (W x H)."),
        click.option("--mode", type=Choice(list(RESIZE_MODES)), default="stretch", show_default=True,
                     help="stretch to the size, centre-crop to its aspect, or pad (letterbox)."),
        click.option("--interpolation", type=Choice(list(INTERPOLATION_NAMES)),
                     default="bilinear", show_default=True, help="Resampling filter (anti-aliased when shrinking)."),
        click.option("--channels", type=Choice(["3", "1"]), default="3", show_default=True,
                     help="3 for RGB, 1 for grayscale."),
        click.option("--background", default="white", show_default=True, help="Colour under transparent pixels."),
        click.option("--fill", default="black", show_default=True, help="Padding colour with --mode pad."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                     help="Reject larger images as decompression bombs [default: Pillow's 89,478,485]."),
        click.option("--strict", is_flag=True, help="Exit non-zero if any image is rejected."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_spec(size, mode, interpolation, channels, background, fill, max_pixels):
    from .spec import DEFAULT_MAX_PIXELS, ResizeSpec, parse_color, parse_size

    try:
        width, height = parse_size(size)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--size") from None
    colours = {}
    for name, value in (("background", background), ("fill", fill)):
        try:
            colours[name] = parse_color(value)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint=f"--{name}") from None
    return ResizeSpec(width, height, mode, interpolation, int(channels), colours["background"], colours["fill"],
                      max_pixels or DEFAULT_MAX_PIXELS)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), envvar="PREP_WORKDIR",
              default="processed", show_default=True, help="Folder for every stage's files (or PREP_WORKDIR).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("-v", "--verbose", count=True, help="More detail (-vv for debug).")
@click.version_option(package_name="prep", prog_name="prep")
@click.pass_context
def cli(ctx, workdir, quiet, verbose):
    """Turn RAW/<class>/<image> folders into a packaged, verified ML dataset.

    \b
    Stages (each reads the previous one's files in the work directory):
      index -> resize -> split -> encode -> pack -> verify -> verify-train
    `prep run RAW` runs them all.
    """
    settings = _settings(ctx)
    if "workdir" in settings.group and ctx.get_parameter_source("workdir") == click.core.ParameterSource.DEFAULT:
        if not isinstance(settings.group["workdir"], str):
            raise click.ClickException(
                f"{settings.source}: workdir must be a folder name in quotes; received {settings.group['workdir']!r}"
            )
        workdir = Path(settings.group["workdir"])
    ctx.default_map = _default_map(settings)
    ctx.obj = Context(workdir, quiet, verbose)


class OutputClosed(Exception):
    """stdout was closed by its reader (`prep split | head -1`): not an error of the run."""


def echo(ctx: Context, text: str) -> None:
    """A human message: stdout, or stderr when stdout carries --json; nothing with --quiet."""
    if not ctx.quiet:
        try:
            click.echo(text, err=ctx.json)
        except BrokenPipeError:
            raise OutputClosed from None


# -- sample ---------------------------------------------------------------------------------


@cli.command()
@click.argument("name", type=Choice(["digits"]), metavar="NAME")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@pass_ctx
@delegate(lock=False)
def sample(ctx, name, out):
    """Write a bundled real dataset as images into OUT/<class>/.

    digits: scikit-learn's 1,797 handwritten digits (8x8 grayscale PNG, classes 0-9).
    """
    from .stages import sample as stage

    result = stage.run(name, out)
    echo(ctx, result.summary)
    return result


# -- index ----------------------------------------------------------------------------------


def _index(ctx, raw, out, labels_from, pattern, follow_links, executor, workers, scheduler):
    from .stages import index as stage

    if pattern and labels_from != "filename":
        raise PrepError(f"--pattern {pattern!r} takes the class from file names: pass --labels-from filename too")
    cfg = stage.IndexConfig(
        raw=raw, workdir=ctx.workdir, out=ctx.workdir.output(out, "labels.csv"), labels_from=labels_from,
        pattern=pattern or stage.DEFAULT_PATTERN, follow_links=follow_links,
        execution=ctx.execution(executor, workers, scheduler),
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    if ctx.verbose or not ctx.quiet:
        width = max(_width(c) for c in result.class_counts)
        for label, n in result.class_counts.items():
            echo(ctx, f"  {_pad(label, width)}  {n:>7}")
    return result


@cli.command()
@click.argument("raw")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Labels CSV [default: WORKDIR/labels.csv].")
@click.option("--labels-from", type=Choice(["folder", "filename"]), default="folder", show_default=True,
              help="Class from the first-level folder, or from the file name with --pattern.")
@click.option("--pattern", help=r"Regex on the file stem with a (?P<label>...) group [default: the part before the last -, _, . or space and digits].")
@click.option("--follow-links", is_flag=True, help="Follow symbolic links.")
@executor_options
@pass_ctx
@delegate
def index(ctx, **options):
    """List the images of RAW/<class>/..., label and hash them: labels.csv.

    RAW is a folder or a URL (s3://bucket/raw, gs://bucket/raw, file:///data/raw).
    """
    return _index(ctx, **options)


# -- resize ---------------------------------------------------------------------------------


def _resize(ctx, labels, raw, size, mode, interpolation, channels, background, fill, max_pixels, strict,
            executor, workers, scheduler):
    from .stages import resize as stage

    spec = build_spec(size, mode, interpolation, channels, background, fill, max_pixels)
    cfg = stage.ResizeConfig(
        workdir=ctx.workdir, labels=ctx.workdir.labels(labels), raw=raw,
        spec=spec, strict=strict, execution=ctx.execution(executor, workers, scheduler),
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), help="Labels CSV [default: WORKDIR/labels.csv].")
@click.option("--raw", metavar="PATH|URL", help="RAW root, a folder or a URL [default: the one `prep index` recorded].")
@resize_options
@executor_options
@pass_ctx
@delegate
def resize(ctx, **options):
    """Resize every image to a fixed-size 8-bit PNG under WORKDIR/resized/."""
    return _resize(ctx, **options)


# -- split ----------------------------------------------------------------------------------


def _split(ctx, labels, out, ratios, seed, drop_small):
    from .stages import split as stage

    cfg = stage.SplitConfig(
        workdir=ctx.workdir, labels=ctx.workdir.labels(labels),
        out=ctx.workdir.output(out, "splits.csv"), ratios=stage.parse_ratios(ratios), seed=seed,
        drop_small=drop_small,
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    echo(ctx, _table(result.table, stage.SPLITS))
    return result


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: wide (e.g. Korean) characters take two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _width(text))


def _table(table: dict[str, dict[str, int]], columns) -> str:
    width = max([5] + [_width(k) for k in table])
    lines = [f"  {'class':<{width}}" + "".join(f"{c:>8}" for c in columns)]
    for label, counts in table.items():
        lines.append(f"  {_pad(label, width)}" + "".join(f"{counts[c]:>8}" for c in columns))
    lines.append(f"  {'total':<{width}}" + "".join(f"{sum(t[c] for t in table.values()):>8}" for c in columns))
    return "\n".join(lines)


@cli.command()
@click.argument("labels", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="[default: WORKDIR/splits.csv]")
@click.option("--ratios", default="7:2:1", show_default=True, help="train:valid:test, e.g. 7:2:1, 0.8,0.2,0 or 80:10:10.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the assignment.")
@click.option("--drop-small", is_flag=True, help="Leave out classes too small for the ratios instead of failing.")
@pass_ctx
@delegate
def split(ctx, **options):
    """Assign every usable image to train / valid / test: splits.csv."""
    return _split(ctx, **options)


# -- encode ---------------------------------------------------------------------------------


def _encode(ctx, splits, classes):
    from .stages import encode as stage

    cfg = stage.EncodeConfig(
        workdir=ctx.workdir, splits=ctx.workdir.input(splits, "splits.csv", made_by="split"),
        classes_out=ctx.workdir.path("classes.json"), out=ctx.workdir.path("encoded.csv"), pinned=classes,
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.argument("splits", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pin an existing classes.json so classes keep their ids.")
@pass_ctx
@delegate
def encode(ctx, **options):
    """Map class names to ids once for all splits: classes.json and encoded.csv."""
    return _encode(ctx, **options)


# -- verify-train ---------------------------------------------------------------------------


@cli.command("verify-train")
@click.option("--format", "fmt", type=Choice(["pkl.gz", "h5", "tfrecord"]),
              help="Packaged format to train on [default: the first found: pkl.gz, h5, tfrecord].")
@click.option("--model", type=Choice(["cnn", "small", "mlp"]), default="cnn", show_default=True,
              help="cnn: the original workflow's CNN; small: a smaller CNN; mlp: one hidden layer.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Most epochs to train (early stopping usually ends sooner).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per step.")
@click.option("--patience", type=click.IntRange(min=1), default=4, show_default=True,
              help="Early stopping: epochs without a better validation loss.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of weights, shuffling and dropout.")
@click.option("--margin", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Share of the headroom above the majority baseline the test accuracy must reach.")
@pass_ctx
@delegate
def verify_train(ctx, fmt, model, epochs, batch_size, patience, seed, margin):
    """Train a Keras model on the packaged data and check that it learned."""
    from .stages import train as stage

    # Keras logs epochs on stdout, which carries the JSON with --json
    cfg = stage.TrainConfig(ctx.workdir, fmt, model, epochs, batch_size, patience, seed, margin,
                            ctx.progress and not ctx.json)
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


# -- report ---------------------------------------------------------------------------------


def _report(ctx, out=None, samples=8):
    from .stages import report as stage

    cfg = stage.ReportConfig(ctx.workdir, ctx.workdir.output(out, stage.REPORT), samples)
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="[default: WORKDIR/report/index.html]")
@click.option("--samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Resized images shown per class.")
@pass_ctx
@delegate
def report(ctx, **options):
    """Write a self-contained HTML report and the dataset card (WORKDIR/README.md).

    The report (report/index.html, images inlined, opens offline) shows counts per class and
    split, samples, source sizes, rejected files, duplicates and verify-train's results; each
    part says which command to run when its input is missing.
    """
    return _report(ctx, **options)


# -- pack, verify ---------------------------------------------------------------------------


def pack_options(fn):
    options = [
        click.option("--format", "formats", multiple=True, default=("all",), show_default=True,
                     type=Choice([*FORMATS, "all"]), help="Format to write; repeat for several."),
        click.option("--flat", is_flag=True, help="pkl.gz: images as (N, H*W*C) rows."),
        click.option("--float", "as_float", is_flag=True, help="pkl.gz: float32 pixels in [0, 1] instead of uint8."),
        click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=100, show_default=True,
                     help="tfrecord: target shard size in MiB."),
        click.option("--tfrecord-compression", type=Choice(["none", "gzip"]), default="none",
                     show_default=True, help="tfrecord: compress the shards."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _pack(ctx, formats, flat, as_float, shard_mb, tfrecord_compression, executor, workers, scheduler):
    from .formats import PackOptions
    from .stages import pack as stage

    cfg = stage.PackConfig(
        workdir=ctx.workdir, encoded=ctx.workdir.path("encoded.csv"),
        formats=stage.parse_formats(formats), options=PackOptions(flat, as_float, shard_mb, tfrecord_compression),
        execution=ctx.execution(executor, workers, scheduler),
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@pack_options
@executor_options
@pass_ctx
@delegate
def pack(ctx, **options):
    """Write the split, encoded, resized images as pkl.gz, h5 and tfrecord/, then manifest.json.

    A format whose file already matches its inputs and options is left as it is.
    """
    return _pack(ctx, **options)


def _verify(ctx, workdir, executor, workers, scheduler):
    from .stages import verify as stage
    from .workdir import Workdir

    cfg = stage.VerifyConfig(
        workdir=Workdir(workdir) if workdir else ctx.workdir, execution=ctx.execution(executor, workers, scheduler),
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.argument("workdir", required=False, type=click.Path(file_okay=False, path_type=Path))
@executor_options
@pass_ctx
@delegate(lock=False)
def verify(ctx, **options):
    """Check the packaged files of WORKDIR [default: --workdir] against manifest.json and their sources.

    Checksums, counts, shapes, dtypes, label ids, no image in two splits, and identical
    pixels in every format and the resized PNGs. Exits non-zero at the first difference.
    """
    return _verify(ctx, **options)


# -- run ------------------------------------------------------------------------------------


@cli.command("run")
@click.argument("raw")
@click.option("--labels-from", type=Choice(["folder", "filename"]), default="folder", show_default=True,
              help="As in `prep index`.")
@click.option("--pattern", help="As in `prep index`.")
@click.option("--follow-links", is_flag=True, help="As in `prep index`.")
@resize_options
@click.option("--ratios", default="7:2:1", show_default=True, help="As in `prep split`.")
@click.option("--seed", type=int, default=42, show_default=True, help="As in `prep split`.")
@click.option("--drop-small", is_flag=True, help="As in `prep split`.")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="As in `prep encode`.")
@pack_options
@executor_options
@pass_ctx
@delegate
def run_all(ctx, raw, labels_from, pattern, follow_links, size, mode, interpolation, channels, background, fill,
            max_pixels, strict, ratios, seed, drop_small, classes, formats, flat, as_float, shard_mb,
            tfrecord_compression, executor, workers, scheduler):
    """Run every stage on RAW with one set of options."""
    from .stages.split import parse_ratios

    # check every value before the first stage starts, not when its stage is reached
    parse_ratios(ratios)
    build_spec(size, mode, interpolation, channels, background, fill, max_pixels)
    run_options = dict(executor=executor, workers=workers, scheduler=scheduler)
    return {
        "index": _index(ctx, raw, None, labels_from, pattern, follow_links, **run_options),
        "resize": _resize(ctx, None, None, size, mode, interpolation, channels, background, fill, max_pixels,
                          strict, **run_options),
        "split": _split(ctx, None, None, ratios, seed, drop_small),
        "encode": _encode(ctx, None, classes),
        "pack": _pack(ctx, formats, flat, as_float, shard_mb, tfrecord_compression, **run_options),
        "verify": _verify(ctx, None, **run_options),
        "report": _report(ctx),
    }


# -- settings: prep.toml, config, status --------------------------------------------------

RUN_PARTS = ("index", "resize", "split", "encode", "pack")
COMMON = {"quiet", "verbose", "as_json", "help"}


def _option_names(command: click.Command) -> dict[str, click.Parameter]:
    """Every spelling a settings file may use for an option (``labels-from``, ``format``) -> its parameter."""
    names = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in COMMON:
            names[param.name] = param
            for opt in param.opts:
                names[opt.lstrip("-").replace("-", "_")] = param
    return names


def _settings(ctx: click.Context):
    from . import config

    try:
        settings = config.find(Path.cwd())
        config.check(
            settings,
            set(_option_names(ctx.command)),
            {name: set(_option_names(cmd)) for name, cmd in cli.commands.items()},
        )
    except PrepError as err:
        raise click.ClickException(str(err)) from None
    return settings


def _default_map(settings) -> dict[str, dict]:
    """Click's default_map from the settings file; `run` takes every stage's table, then its own."""
    default_map: dict[str, dict] = {}
    for name, command in cli.commands.items():
        names = _option_names(command)
        tables = [settings.commands.get(part, {}) for part in RUN_PARTS] if name == "run" else []
        tables.append(settings.commands.get(name, {}))
        values = {}
        for table in tables:
            for key, value in table.items():
                if key in names:
                    param = names[key]
                    values[param.name] = [value] if param.multiple and isinstance(value, str) else value
        if values:
            default_map[name] = values
    return default_map


def effective_settings(ctx: click.Context, name: str) -> dict[str, tuple[object, str]]:
    """option -> (value, where it came from) for command ``name``, before any command-line flag."""
    root = ctx.find_root()
    source = str(_settings(root).source or "")
    given = (root.default_map or {}).get(name, {})
    command = cli.commands[name]
    # parsing no arguments gives every option its effective default, converted by its type
    values = command.make_context(name, [], parent=root, resilient_parsing=True).params
    return {
        param.name: (values.get(param.name), source if param.name in given else "default")
        for param in command.params
        if isinstance(param, click.Option) and param.name not in COMMON
    }


@cli.command("config")
@click.pass_context
@pass_ctx
@delegate(lock=False)
def show_config(ctx, click_ctx):
    """Print the effective settings of every command and where each came from.

    Defaults come from prep.toml in the current folder (or [tool.prep] in pyproject.toml):
    top-level keys for prep itself (workdir), a table per command ([resize] size = "64").
    Flags on the command line win over the file.
    """
    root = click_ctx.find_root()
    settings = _settings(root)
    data = {"file": str(settings.source) if settings.source else None, "workdir": str(ctx.workdir.root), "commands": {}}
    lines = [f"# settings file: {settings.source or 'none (prep.toml or [tool.prep] in pyproject.toml)'}",
             f"workdir = {json.dumps(str(ctx.workdir.root))}"]
    for name in sorted(cli.commands):
        values = effective_settings(click_ctx, name)
        if not values:
            continue
        data["commands"][name] = {k: {"value": v, "from": src} for k, (v, src) in values.items()}
        lines.append(f"\n[{name}]")
        shown = {key: f"{key} = {json.dumps(list(v) if isinstance(v, tuple) else v, default=str)}"
                 for key, (v, _) in values.items()}
        width = max(map(len, shown.values()))
        lines.extend(f"{shown[key]:<{width}}  # {src}" for key, (_, src) in values.items())
    echo(ctx, "\n".join(lines))
    return data


@cli.command()
@click.pass_context
@pass_ctx
@delegate(lock=False)
def status(ctx, click_ctx):
    """For each stage: up to date, stale or missing, and why.

    Compares each stage's recorded inputs and settings with the files in the work directory,
    the RAW folder and the settings prep.toml gives now.
    """
    from .stages import status as stage

    resize = {k: v for k, (v, _) in effective_settings(click_ctx, "resize").items()}
    split = {k: v for k, (v, _) in effective_settings(click_ctx, "split").items()}
    from .stages.split import parse_ratios

    cfg = stage.StatusConfig(
        workdir=ctx.workdir,
        spec=build_spec(resize["size"], resize["mode"], resize["interpolation"], resize["channels"],
                        resize["background"], resize["fill"], resize["max_pixels"]),
        split={"ratios": list(parse_ratios(split["ratios"])), "seed": split["seed"], "drop_small": split["drop_small"]},
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


def main() -> None:
    cli(prog_name="prep")


if __name__ == "__main__":  # pragma: no cover
    main()
