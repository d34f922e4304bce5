"""The `prep` command line: parse options, build a stage config, call the stage, report.

Nothing else lives here: what every command shares (errors, --json, the lock, prep.toml) is
in :mod:`pipeline.cli_support`. Stage modules are imported inside each command, so
`prep --help` does not pay for numpy, scikit-learn or tensorflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_support import (Choice, Group, configure, count_table, delegate, echo, effective_settings, padded, pass_ctx,
                          settings_file, text_width)
from .errors import PrepError
from .spec import INTERPOLATION_NAMES, RESIZE_MODES

FORMATS = ("pkl.gz", "h5", "tfrecord", "parquet")
CLASS_ORDERS = ("natural", "alphabetical")


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
@click.option("--workdir", type=click.Path(file_okay=False, path_type=str), envvar="PREP_WORKDIR",
              default="processed", show_default=True,
              help="Folder (or fsspec URL, s3://bucket/work) for every stage's files (or PREP_WORKDIR).")
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
    configure(ctx, workdir, quiet, verbose)


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


def _index(ctx, raw, out, labels_from, pattern, follow_links, executor, workers, scheduler, allow_outside_links=False):
    from .stages import index as stage

    if pattern and labels_from != "filename":
        raise PrepError(f"--pattern {pattern!r} takes the class from file names: pass --labels-from filename too")
    cfg = stage.IndexConfig(
        raw=raw, workdir=ctx.workdir, out=ctx.workdir.output(out, "labels.csv"), labels_from=labels_from,
        pattern=pattern or stage.DEFAULT_PATTERN, follow_links=follow_links, allow_outside_links=allow_outside_links,
        execution=ctx.execution(executor, workers, scheduler),
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    if ctx.verbose or not ctx.quiet:
        width = max(text_width(c) for c in result.class_counts)
        for label, n in result.class_counts.items():
            echo(ctx, f"  {padded(label, width)}  {n:>7}")
    return result


@cli.command()
@click.argument("raw")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Labels CSV [default: WORKDIR/labels.csv].")
@click.option("--labels-from", type=Choice(["folder", "filename"]), default="folder", show_default=True,
              help="Class from the first-level folder, or from the file name with --pattern.")
@click.option("--pattern", help=r"Regex on the file stem with a (?P<label>...) group [default: the part before the last -, _, . or space and digits].")
@click.option("--follow-links", is_flag=True, help="Follow symbolic links (not those that loop or lead out of RAW).")
@click.option("--allow-outside-links", is_flag=True, help="With --follow-links, follow links that lead out of RAW too.")
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
@delegate(makes_workdir="labels")  # the first command in a new work directory only with its input given
def resize(ctx, **options):
    """Resize every image to a fixed-size 8-bit PNG under WORKDIR/resized/."""
    return _resize(ctx, **options)


# -- split ----------------------------------------------------------------------------------


def _split(ctx, labels, out, ratios, seed, drop_small, near_copies="default", on_conflict="keep", group_by=None,
           groups=None):
    from .stages import split as stage

    cfg = stage.SplitConfig(
        workdir=ctx.workdir, labels=ctx.workdir.labels(labels),
        out=ctx.workdir.output(out, "splits.csv"), ratios=stage.parse_ratios(ratios), seed=seed,
        drop_small=drop_small, near_copies=near_copies, on_conflict=on_conflict, group_by=group_by, groups=groups,
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    echo(ctx, count_table(result.table, stage.SPLITS))
    for note in result.notes:
        echo(ctx, note)
    return result


def grouping_options(fn):
    """What `prep split` keeps together, shared by `prep run`."""
    options = [
        click.option("--near-copies", type=Choice(["off", "strict", "default"]), default="default", show_default=True,
                     help="Keep near copies (re-saved, resized, retouched) in one split: strict: perceptual hashes"
                          " within 4 bits; default: also 5-8 bits when the finer hash agrees."),
        click.option("--on-conflict", type=Choice(["keep", "drop", "error"]), default="keep", show_default=True,
                     help="One picture under two labels (listed in conflicts.csv): keep both, drop both, or fail."),
        click.option("--group-by", metavar="REGEX",
                     help="Keep the images of one group in one split: a regex with (?P<group>...) matched on the"
                          " path, e.g. '(?P<group>patient\\d+)'."),
        click.option("--groups", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Keep the images of one group in one split: a CSV with columns path,group."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("labels", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="[default: WORKDIR/splits.csv]")
@click.option("--ratios", default="7:2:1", show_default=True, help="train:valid:test, e.g. 7:2:1, 0.8,0.2,0 or 80:10:10.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the assignment.")
@click.option("--drop-small", is_flag=True, help="Leave out classes too small for the ratios instead of failing.")
@grouping_options
@pass_ctx
@delegate(makes_workdir="labels")  # the first command in a new work directory only with its input given
def split(ctx, **options):
    """Assign every usable image to train / valid / test: splits.csv."""
    return _split(ctx, **options)


# -- encode ---------------------------------------------------------------------------------


def _encode(ctx, splits, classes, class_order="natural"):
    from .stages import encode as stage

    cfg = stage.EncodeConfig(
        workdir=ctx.workdir, splits=ctx.workdir.input(splits, "splits.csv", made_by="split"),
        classes_out=ctx.workdir.path("classes.json"), out=ctx.workdir.path("encoded.csv"), pinned=classes,
        class_order=class_order,
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.argument("splits", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pin an existing classes.json so classes keep their ids.")
@click.option("--class-order", type=Choice(CLASS_ORDERS), default="natural", show_default=True,
              help="Ids in natural order (2 before 10) or alphabetical, Python's sorted() (10 before 2), "
                   "as torchvision's ImageFolder and Keras number folders.")
@pass_ctx
@delegate(makes_workdir="splits")  # the first command in a new work directory only with its input given
def encode(ctx, **options):
    """Map class names to ids once for all splits: classes.json and encoded.csv."""
    return _encode(ctx, **options)


# -- verify-train ---------------------------------------------------------------------------


@cli.command("verify-train")
@click.option("--format", "fmt", type=Choice(FORMATS),
              help="Packaged format to train on [default: the first found: pkl.gz, h5, tfrecord, parquet].")
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
@click.option("--class-weight", type=Choice(["none", "balanced"]), default="none", show_default=True,
              help="balanced: weigh each class inversely to its train images (manifest.json's class_weights).")
@click.option("--save-model", is_flag=True, help="Keep the trained model as verify/model.keras.")
@pass_ctx
@delegate(makes_workdir=False)
def verify_train(ctx, fmt, model, epochs, batch_size, patience, seed, margin, class_weight, save_model):
    """Train a Keras model on the packaged data and check that it learned.

    One progress bar runs over every epoch; -v logs each epoch's loss and accuracy.
    """
    from .stages import train as stage

    cfg = stage.TrainConfig(ctx.workdir, fmt, model, epochs, batch_size, patience, seed, margin, ctx.progress,
                            class_weight, save_model)
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


# -- report ---------------------------------------------------------------------------------


def _report(ctx, out=None, samples=8, license="unknown"):
    from .stages import report as stage

    cfg = stage.ReportConfig(ctx.workdir, ctx.workdir.output(out, stage.REPORT), samples, license)
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="[default: WORKDIR/report/index.html]")
@click.option("--samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Resized images shown per class.")
@click.option("--license", default="unknown", show_default=True, metavar="ID",
              help="The dataset card's license: a Hugging Face Hub license id (cc-by-4.0, mit, ...), "
                   "unknown, or other (the card then points to a LICENSE file beside it).")
@pass_ctx
@delegate(makes_workdir=False)
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
@delegate(makes_workdir=False)
def pack(ctx, **options):
    """Write the split, encoded, resized images as pkl.gz, h5, tfrecord/ and data/ (Parquet), then manifest.json.

    A format whose file already matches its inputs and options is left as it is.
    """
    return _pack(ctx, **options)


def _verify(ctx, executor, workers, scheduler, full=False):
    from .stages import verify as stage

    cfg = stage.VerifyConfig(workdir=ctx.workdir, execution=ctx.execution(executor, workers, scheduler), full=full)
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


@cli.command()
@click.argument("given_workdir", metavar="[WORKDIR]", required=False, type=click.Path(file_okay=False, path_type=str))
@executor_options
@click.option("--full", is_flag=True, help="Check everything again, also what has not changed since the last check.")
@pass_ctx
@delegate(lock="read")
def verify(ctx, **options):
    """Check the packaged files of WORKDIR [default: --workdir] against manifest.json and their sources.

    Checksums, counts, shapes, dtypes, label ids, no image in two splits, and identical
    pixels in every format and the resized PNGs. Exits non-zero at the first difference.
    A rerun checks again only what changed since a run that passed (--full: everything).
    """
    return _verify(ctx, **options)


# -- run ------------------------------------------------------------------------------------


@cli.command("run")
@click.argument("raw")
@click.option("--labels-from", type=Choice(["folder", "filename"]), default="folder", show_default=True,
              help="As in `prep index`.")
@click.option("--pattern", help="As in `prep index`.")
@click.option("--follow-links", is_flag=True, help="As in `prep index`.")
@click.option("--allow-outside-links", is_flag=True, help="As in `prep index`.")
@resize_options
@click.option("--ratios", default="7:2:1", show_default=True, help="As in `prep split`.")
@click.option("--seed", type=int, default=42, show_default=True, help="As in `prep split`.")
@click.option("--drop-small", is_flag=True, help="As in `prep split`.")
@grouping_options
@click.option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="As in `prep encode`.")
@click.option("--class-order", type=Choice(CLASS_ORDERS), default="natural", show_default=True,
              help="As in `prep encode`.")
@click.option("--license", default="unknown", show_default=True, metavar="ID", help="As in `prep report`.")
@pack_options
@executor_options
@pass_ctx
@delegate
def run_all(ctx, raw, labels_from, pattern, follow_links, allow_outside_links, size, mode, interpolation, channels, background, fill,
            max_pixels, strict, ratios, seed, drop_small, near_copies, on_conflict, group_by, groups, classes,
            class_order, license, formats, flat, as_float, shard_mb, tfrecord_compression, executor, workers, scheduler):
    """Run every stage on RAW with one set of options."""
    from .stages.card import check_license
    from .stages.split import parse_ratios

    # check every value before the first stage starts, not when its stage is reached
    parse_ratios(ratios)
    check_license(license)
    build_spec(size, mode, interpolation, channels, background, fill, max_pixels)
    run_options = dict(executor=executor, workers=workers, scheduler=scheduler)
    results = {
        "index": _index(ctx, raw, None, labels_from, pattern, follow_links, allow_outside_links=allow_outside_links,
                        **run_options),
        "resize": _resize(ctx, None, None, size, mode, interpolation, channels, background, fill, max_pixels,
                          strict, **run_options),
    }
    if executor == "dask":  # its workers wrote to a URL work directory, not to its local copy
        ctx.fetch()
    return results | {
        "split": _split(ctx, None, None, ratios, seed, drop_small, near_copies, on_conflict, group_by, groups),
        "encode": _encode(ctx, None, classes, class_order),
        "pack": _pack(ctx, formats, flat, as_float, shard_mb, tfrecord_compression, **run_options),
        "verify": _verify(ctx, **run_options),
        "report": _report(ctx, license=license),
    }


# -- settings: prep.toml, config, status --------------------------------------------------

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
    settings = settings_file(root)
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
@click.option("--quick", is_flag=True,
              help="Judge RAW and resized/ by their folders' times: notices files added, removed, renamed or"
                   " replaced, not one rewritten in place (a stat per folder, not per file).")
@click.pass_context
@pass_ctx
@delegate(lock="peek")
def status(ctx, click_ctx, quick):
    """For each stage: up to date, stale or missing, and why.

    Compares each stage's recorded inputs and settings with the files in the work directory,
    the RAW folder and the settings prep.toml gives now.
    """
    from .stages import status as stage

    from .stages.split import parse_ratios, settings_of

    effective = {name: effective_settings(click_ctx, name) for name in ("resize", "split")}
    resize, split = ({k: v for k, (v, _) in effective[name].items()} for name in ("resize", "split"))

    cfg = stage.StatusConfig(
        workdir=ctx.workdir,
        spec=build_spec(resize["size"], resize["mode"], resize["interpolation"], resize["channels"],
                        resize["background"], resize["fill"], resize["max_pixels"]),
        split=settings_of(parse_ratios(split["ratios"]), split["seed"], split["drop_small"], split["near_copies"],
                          split["on_conflict"], split["group_by"], split["groups"]),
        origins={name: {k: "defaults" if src == "default" else Path(src).name for k, (_, src) in values.items()}
                 for name, values in effective.items()},
        quick=quick,
    )
    result = stage.run(cfg)
    echo(ctx, result.summary)
    return result


def main() -> None:
    cli(prog_name="prep")


if __name__ == "__main__":  # pragma: no cover
    main()
