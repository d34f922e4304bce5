"""`prep pack`: the split, label-encoded, resized images into pkl.gz, h5, tfrecord and parquet, and manifest.json.

Workers decode shards of resized PNGs (:func:`read_pngs`); this process reads encoded.csv a
line at a time, twice (:func:`survey` counts and checks it, :func:`_pack` packs it), and hands
each sample, in encoded.csv order, to the writer of every format being packed, so pixels are
decoded once and memory does not grow with the dataset (but for pkl.gz's labels, 8 bytes an
image, which the pickle holds after the pixels). Each output appears
atomically when complete; manifest.json is written last. A format whose output still matches
its inputs and options (a :class:`workdir.Stamp` per format) is not rewritten, and that check
imports none of numpy, the decoders, h5py and tensorflow.

A write that fails (a full disk, a file size limit) is an error naming the output, and leaves
the previous outputs as they were; what a pack killed while writing left behind (temporary
files and folders of a process that is gone) is removed by the next (:func:`workdir.remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from .. import __version__, executors, formats, manifest, sources, workdir
from ..errors import PrepError, StageInputMissing
from ..formats import FORMATS, SPLITS, Layout, PackOptions, Sample
from .encode import ENCODED_COLUMNS, read_classes

log = logging.getLogger(__name__)


@dataclass
class PackConfig:
    workdir: workdir.Workdir
    encoded: Path
    formats: tuple[str, ...] = tuple(FORMATS)
    options: PackOptions = field(default_factory=PackOptions)
    execution: executors.Execution = field(default_factory=executors.Execution)


@dataclass
class PackResult:
    written: list[str]  # formats packed by this run
    current: list[str]  # formats already up to date
    layout: Layout
    sizes: dict[str, tuple[int, int]]  # format -> (files, bytes)
    seconds: float

    @property
    def summary(self) -> str:
        counts = ", ".join(f"{s} {self.layout.counts.get(s, 0)}" for s in SPLITS)
        head = (
            f"{'Packed' if self.written else 'Up to date:'} {sum(self.layout.counts.values())} images"
            f" ({counts}; shape {self.layout.shape}; {len(self.layout.classes)} classes)"
        )
        if self.written:
            head += f" in {self.seconds:.1f} s"
        parts = []
        for name, (files, size) in self.sizes.items():
            state = "written" if name in self.written else "up to date"
            where = f"/ {_human(size)} in {files} files" if files > 1 else f" {_human(size)}"
            parts.append(f"{FORMATS[name].OUTPUT}{where} ({state})")
        return head + ": " + ", ".join(parts)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def parse_formats(names) -> tuple[str, ...]:
    """``("all",)`` or format names -> the distinct formats in registry order."""
    chosen = set()
    for name in names or ("all",):
        if name == "all":
            chosen.update(FORMATS)
        else:
            formats.get(name)
            chosen.add(name)
    return tuple(n for n in FORMATS if n in chosen)


# -- worker ---------------------------------------------------------------------------------


def read_pngs(
    names: list[tuple[str, str]], folder: str, shape: tuple[int, int, int], want_png: bool, first: str
) -> tuple[np.ndarray, list[bytes | None] | None, dict[int, str]]:
    """The pixels of a shard's resized files, given as (name, the sha256 resize recorded), as one
    (N, H, W, C) array (one buffer to send back, not N), their PNG bytes if wanted, and position
    -> reason for files that cannot be used: changed since resize (a file edited, or a link put
    there, is never packed), unreadable, or not of the shape of ``first``."""
    import hashlib

    import numpy as np  # here, in the workers, as the decoder: a pack with nothing to do needs neither

    from .. import imaging

    pixels = np.zeros((len(names), *shape), np.uint8)
    pngs: list[bytes | None] | None = [] if want_png else None
    problems: dict[int, str] = {}
    files = sources.read_below(folder, [name for name, _ in names])
    for i, ((name, expected), data) in enumerate(zip(names, files)):
        try:
            if isinstance(data, OSError):
                raise data
            if hashlib.sha256(data).hexdigest() != expected:
                problems[i] = "changed since `prep resize` (its sha256 differs from the one resize recorded)"
                data = None
                continue
            image = imaging.decode_png(data)
            if image.shape != shape:
                problems[i] = f"{_shape(image.shape)}, but {first} is {_shape(shape)} (all must have one shape)"
            else:
                pixels[i] = image
        except FileNotFoundError:
            problems[i] = "missing"
            data = None
        except OSError as err:
            problems[i] = f"cannot read ({err.strerror or err})"
            data = None
        except ValueError as err:
            problems[i] = str(err)
        finally:
            if pngs is not None:
                pngs.append(data)
    return pixels, pngs, problems


# -- inputs ---------------------------------------------------------------------------------


class Row(NamedTuple):
    """One encoded.csv row, checked (:func:`iter_rows`)."""

    path: str  # relative to RAW
    label: str
    sha256: str  # of the source image
    resized: str  # relative to resized/
    resized_sha256: str  # of the resized PNG, as resize recorded it
    split: str
    group: str  # images split keeps together ("" for none)
    label_id: int


def iter_rows(encoded: Path, classes: list[str], wd: workdir.Workdir, *, whole_file: bool = False) -> Iterator[Row]:
    """encoded.csv's rows, read a line at a time (memory does not grow with the file), each
    checked: its path below RAW and its resized name inside ``wd``'s ``resized/``, its label and
    ``label_id`` those of classes.json, its split one of SPLITS, its resized file and that file's
    sha256 recorded. A bad row is a PrepError naming its line; with ``whole_file`` it is raised
    once the whole file has been read (a malformed line anywhere first, then the first path
    leaving its folder, then the first other fault), and bad rows are not yielded."""
    raw = workdir.Confined(None, "RAW")
    names = workdir.Confined(wd.path(workdir.RESIZED_DIR), f"{workdir.RESIZED_DIR}/")
    where = str(encoded)
    ids = {str(number): number for number in range(len(classes))}  # the usual label_id text
    first: dict[int, PrepError] = {}  # kind (0: a path, 1: another fault) -> its first error
    line = 1
    for line, (path, label, sha256, resized, resized_sha256, split, group, label_id) in enumerate(
            workdir.iter_csv(encoded, ENCODED_COLUMNS), start=2):
        try:
            raw(path, where, line)
            if resized:
                names(resized, where, line)
        except PrepError as err:
            if not whole_file:
                raise
            first.setdefault(0, err)
            continue
        number = ids.get(label_id)
        if number is not None and classes[number] == label and split in SPLITS and resized and resized_sha256:
            yield Row(path, label, sha256, resized, resized_sha256, split, group, number)
            continue
        problem = _problem(path, label, label_id, split, resized, resized_sha256, classes)
        if problem is None:  # an id written otherwise ("03"), as int() reads it
            yield Row(path, label, sha256, resized, resized_sha256, split, group, int(label_id))
            continue
        if not whole_file:
            raise PrepError(f"{encoded} line {line}: {problem}")
        first.setdefault(1, PrepError(f"{encoded} line {line}: {problem}"))
    if line == 1:
        raise PrepError(f"{encoded} has no rows; run `prep encode` first")
    if first:
        raise first[min(first)]


def _problem(path: str, label: str, label_id: str, split: str, resized: str, resized_sha256: str,
             classes: list[str]) -> str | None:
    """What is wrong with an encoded.csv row (its paths aside), or None."""
    try:
        number = int(label_id)
    except ValueError:
        number = -1
    if not 0 <= number < len(classes) or classes[number] != label:
        return f"label {label!r} with id {label_id!r} does not match classes.json; run `prep encode` again"
    if split not in SPLITS:
        return f"split {split!r} is not one of {', '.join(SPLITS)}"
    if not resized or not resized_sha256:
        what = "resized file" if not resized else "sha256 of its resized file"
        return f"{path} has no {what}; run `prep resize` then `prep split`"
    return None


def inputs_of(wd: workdir.Workdir, encoded: Path) -> list[Path]:
    """The files pack's outputs depend on (settings files only when the stages wrote them)."""
    classes = wd.path(workdir.CLASSES)
    if not classes.exists():
        raise StageInputMissing(f"{classes} does not exist; run `prep encode` first")
    optional = [wd.path(n) for n in (workdir.RESIZED, manifest.RESIZE_SETTINGS, manifest.SPLIT_SETTINGS)]
    return [encoded, classes] + [p for p in optional if p.exists()]


def survey(wd: workdir.Workdir, encoded: Path, classes: list[str], where: str, sizes: bool = False
           ) -> tuple[Layout, dict[str, dict[str, int]], Row]:
    """One read of encoded.csv (:func:`iter_rows`, whole file): the layout (image shape from the
    first resized PNG; sample counts per split, and with ``sizes`` the PNG bytes per split too,
    what tfrecord and parquet plan their shards by), the images per class of each split, and
    the first row. The PNGs are in ``where`` (``resized/``, or the work directory URL's, where a
    Dask cluster's workers read them: their sizes asked a batch at a time, the first one read)."""
    import io

    from PIL import Image

    counts, per_class, png_bytes = Counter(), Counter(), Counter()
    head = missing = None
    batch: list[Row] = []

    def measure() -> None:
        nonlocal missing
        for row, size in zip(batch, sources.sizes_below(where, [r.resized for r in batch])):
            if isinstance(size, FileNotFoundError):
                missing = missing or row  # raised once the rows are known to be sound
            elif isinstance(size, OSError):
                raise PrepError(f"resized image {joined(where, row.resized)}: {size.strerror or size}") from None
            else:
                png_bytes[row.split] += size
        batch.clear()

    for row in iter_rows(encoded, classes, wd, whole_file=True):
        counts[row.split] += 1
        per_class[(row.split, row.label)] += 1
        head = head or row
        if sizes:
            batch.append(row)
            if len(batch) == 1024:
                measure()
    measure()
    if missing is not None:
        raise _missing(where, missing)
    first = joined(where, head.resized)
    data = next(sources.read_below(where, [head.resized]))
    try:
        if isinstance(data, OSError):
            raise data
        with Image.open(io.BytesIO(data)) as img:
            width, height, mode = img.width, img.height, img.mode
    except FileNotFoundError:
        raise _missing(where, head) from None
    except OSError as err:
        why = "not a readable PNG" if isinstance(data, bytes) else "cannot read it"
        raise PrepError(f"{first}: {why} ({err.strerror or err}); run `prep resize` again") from None
    if mode not in ("L", "RGB"):
        raise PrepError(f"{first}: expected an 8-bit L or RGB PNG, found mode {mode}; run `prep resize` again")
    channels = 1 if mode == "L" else 3
    spec = manifest.optional_json(wd.path(manifest.RESIZE_SETTINGS))
    if spec and (spec.get("width"), spec.get("height"), spec.get("channels")) != (width, height, channels):
        raise PrepError(
            f"{first} is {width}x{height} with {channels} channels but {manifest.RESIZE_SETTINGS} says"
            f" {spec.get('width')}x{spec.get('height')} with {spec.get('channels')}; run `prep resize` again"
        )
    layout = Layout(height, width, channels, tuple(classes), {s: counts[s] for s in SPLITS},
                    {s: png_bytes[s] for s in SPLITS}, __version__)
    per_split = {s: {c: per_class[(s, c)] for c in classes if per_class[(s, c)]} for s in SPLITS}
    return layout, per_split, head


def joined(where: str, name: str) -> str:
    """The resized file ``name`` in ``where`` (a folder or a URL), as messages name it."""
    return f"{where}/{name}" if sources.is_url(where) else os.path.join(where, name)


def _missing(where: str, row: Row) -> PrepError:
    return PrepError(f"resized image {joined(where, row.resized)} is missing (for {row.path}); run `prep resize` again")


def in_shards(rows: Iterator[Row], count: int, slots: int, held: deque) -> Iterator[list[tuple[str, str]]]:
    """The (resized name, its sha256) of ``rows`` in the shards :func:`executors.chunk` cuts
    ``count`` items into, for :func:`executors.map_shards`; each shard's rows are appended to
    ``held`` as it is handed out (the caller takes them back in order with its results), so only
    the shards in flight are held."""
    for size in map(len, executors.chunk(range(count), slots, max_size=256)):
        shard = list(itertools.islice(rows, size))
        held.append(shard)
        yield [(r.resized, r.resized_sha256) for r in shard]


# -- run ------------------------------------------------------------------------------------


def _stamp(wd: workdir.Workdir, name: str) -> workdir.Stamp:
    return workdir.Stamp(wd, f"pack-{name}")


def stamp_settings(options: dict, name: str | None = None) -> dict:
    """What a format's output depends on besides its inputs: its options, and how its module
    encodes them (``ENCODING``, e.g. the compressor's version), so other bytes mean another stamp."""
    settings = {"prep_version": __version__, "options": options}
    encoding = getattr(FORMATS[name], "ENCODING", None) if name else None
    return settings if encoding is None else {**settings, "encoding": encoding}


def _previous_manifest(wd: workdir.Workdir) -> dict | None:
    with contextlib.suppress(PrepError):
        return manifest.read(wd)
    return None


def run(cfg: PackConfig) -> PackResult:
    started = time.perf_counter()
    wd = cfg.workdir
    requested = parse_formats(cfg.formats)
    if not cfg.encoded.exists():
        raise StageInputMissing(f"{cfg.encoded} does not exist; run `prep encode` first")
    _require_current(wd)
    inputs = inputs_of(wd, cfg.encoded)
    workdir.remove_stale_temps(wd.root, {module.OUTPUT for module in FORMATS.values()} | {workdir.MANIFEST})
    previous = _previous_manifest(wd)

    listed = {name: formats.settings(name, cfg.options) for name in requested}
    todo = [n for n in requested if not _stamp(wd, n).is_current(inputs, stamp_settings(listed[n], n))]
    # Formats not asked for stay in the manifest while they still match the inputs.
    previous_pack = (previous or {}).get("settings", {}).get("pack", {})
    for name in FORMATS:
        if name in requested or not manifest.output_files(wd.root, name):
            continue
        options = previous_pack.get(name)
        if options is not None and _stamp(wd, name).is_current(inputs, stamp_settings(options, name)):
            listed[name] = options
        else:
            log.warning("%s is out of date and left out of %s; run `prep pack --format %s` to update it",
                        wd.path(FORMATS[name].OUTPUT), workdir.MANIFEST, name)

    manifest_stamp = _stamp(wd, "manifest")
    if todo or previous is None or not manifest_stamp.is_current(inputs, stamp_settings(listed)):
        classes = read_classes(wd.path(workdir.CLASSES))
        layout, per_class, first = survey(wd, cfg.encoded, classes, wd.for_workers(workdir.RESIZED_DIR, cfg.execution.executor),
                                          sizes=_needs_png(todo))
        if todo:
            _pack(cfg, classes, layout, first, todo)
        previous = manifest.build(wd, layout, per_class, inputs, listed)
        with _naming(wd.path(workdir.MANIFEST)):
            manifest.write(wd, previous)
        with _naming(wd.path(workdir.STAMPS_DIR)):
            for name in todo:
                outputs = [wd.root / f for f in manifest.output_files(wd.root, name)]
                _stamp(wd, name).record(inputs, stamp_settings(listed[name], name), outputs)
            manifest_stamp.record(inputs, stamp_settings(listed), [wd.path(workdir.MANIFEST)])

    sizes = {}
    for name in listed:
        entries = [f for f in previous["files"].values() if f["format"] == name]
        sizes[name] = (len(entries), sum(f["bytes"] for f in entries))
    current = [n for n in requested if n not in todo]
    return PackResult(todo, current, manifest.layout(previous), sizes, time.perf_counter() - started)


def out_of_date(wd: workdir.Workdir) -> str | None:
    """Whether splits.csv or encoded.csv is older than what its stage read, and what to run: packing
    them would pack another split than the one on disk, or blame resize for the names of
    images that split no longer keeps."""
    for stage, output, then in (("split", workdir.SPLITS, " and `prep encode`"), ("encode", workdir.ENCODED, "")):
        changed = workdir.Stamp(wd, stage).changed_inputs()
        if changed:
            return f"{output} is out of date: {changed[0]} since `prep {stage}`; run `prep {stage}`{then}"
    return None


def _require_current(wd: workdir.Workdir) -> None:
    """A one-line error if :func:`out_of_date`."""
    why = out_of_date(wd)
    if why:
        raise PrepError(f"{why} first")


def _needs_png(names) -> bool:
    """Whether a format among ``names`` stores the PNG bytes (and plans its shards by their size)."""
    return any(getattr(FORMATS[name], "NEEDS_PNG", False) for name in names)


def _pack(cfg: PackConfig, classes: list[str], layout: Layout, first: Row, todo: list[str]) -> None:
    """Pack encoded.csv's rows, read again a line at a time, into the formats ``todo``."""
    from .. import imaging  # noqa: F401  (before the pool forks: the workers inherit it, and numpy)

    wd = cfg.workdir
    where = wd.for_workers(workdir.RESIZED_DIR, cfg.execution.executor)
    count = sum(layout.counts.values())
    rows = iter_rows(cfg.encoded, classes, wd)
    held: deque[list[Row]] = deque()
    position = dict.fromkeys(SPLITS, 0)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(cfg.execution.open())
        writers = [
            stack.enter_context(_Named(wd.path(FORMATS[name].OUTPUT), FORMATS[name].writer, layout, cfg.options))
            for name in todo
        ]
        bar = stack.enter_context(cfg.execution.bar(count, "pack"))
        shards = in_shards(rows, count, cfg.execution.slots, held)
        results = executors.map_shards(pool, read_pngs, shards, where, layout.shape, _needs_png(todo),
                                       joined(where, first.resized))
        for pixels, pngs, problems in results:
            shard = held.popleft()
            if problems:
                bad = min(problems)
                raise PrepError(f"resized image {joined(where, shard[bad].resized)}: {problems[bad]};"
                                " run `prep resize` again")
            for i, row in enumerate(shard):
                sample = Sample(row.split, position[row.split], row.label_id, row.path,
                                pngs[i] if pngs is not None else None, pixels[i])
                position[row.split] += 1
                for w in writers:
                    w.write(sample)
            bar.update(len(shard))
        if sum(position.values()) != count or next(rows, None) is not None:
            raise PrepError(f"{cfg.encoded} changed while it was packed; run `prep pack` again")


class _Named:
    """A format's writer whose OSErrors name its output (a failed write names no file)."""

    def __init__(self, target: Path, writer, *args):
        self.target = target
        self.writer = writer(target, *args)

    def __enter__(self) -> "_Named":
        with _naming(self.target):
            self.w = self.writer.__enter__()
        return self

    def write(self, sample: Sample) -> None:
        with _naming(self.target):
            self.w.write(sample)

    def __exit__(self, *exc) -> bool | None:
        with _naming(self.target):  # the writer's own error: an exception passed in comes back as it is
            return self.writer.__exit__(*exc)


@contextlib.contextmanager
def _naming(path: Path):
    """An OSError that names no file (a full disk, a file size limit) raised as one naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None



def _shape(shape) -> str:
    h, w, c = shape
    return f"{w}x{h} with {c} channel{'s' * (c != 1)}"
