"""The dataset card: ``README.md`` in the work directory, in the Hugging Face shape.

YAML front matter (``pretty_name``, ``task_categories``, ``size_categories``, a ``license``
placeholder, and ``dataset_info`` with the class names as a ``class_label`` feature and the
split sizes), then a body: what the data is, classes and counts per split, image size and
mode, the prep commands and settings that made it, how to load each format, and the
checksums from ``manifest.json``.

``prep report`` writes it (:mod:`pipeline.stages.report` gathers the facts) once the data is
split; the numbers come from the manifest once ``prep pack`` has run. The YAML is written by
hand, every string as a JSON string (which YAML reads as a double-quoted scalar), so it
needs no YAML library and keeps its TODO comment.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import TYPE_CHECKING

from ..formats import FORMATS, SPLITS
from ..spec import ResizeSpec

if TYPE_CHECKING:
    from .report import Facts

# Hugging Face's size_categories buckets
SIZE_CATEGORIES = (
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
)
FILES = {name: module.OUTPUT for name, module in FORMATS.items()}
LOADING = {
    "pkl.gz": """\
import gzip, pickle
train_set, valid_set, test_set = pickle.load(gzip.open("dataset.pkl.gz"), encoding="latin1")
x_train, y_train = train_set  # {x}, int64 (N,)""",
    "h5": """\
import h5py
with h5py.File("dataset.h5", "r") as f:
    x_train, y_train = f["train/images"][:], f["train/labels"][:]  # uint8 (N, H, W, C), int64 (N,)
    classes = list(f.attrs["classes"])  # label id = position""",
    "tfrecord": """\
import json, tensorflow as tf  # tfrecord/features.json describes the records and lists the shards
spec = json.load(open("tfrecord/features.json"))
features = {k: tf.io.FixedLenFeature(f["shape"], tf.as_dtype(f["dtype"])) for k, f in spec["features"].items()}
files = [f"tfrecord/{shard['file']}" for shard in spec["splits"]["train"]["shards"]]
def parse(record):
    x = tf.io.parse_single_example(record, features)
    return tf.io.decode_png(x["image/encoded"], spec["image"]["channels"]), x["image/class/label"]
train = tf.data.TFRecordDataset(files, compression_type=spec["compression"] or None).map(parse)""",
    "tf.data": """\
import pipeline  # prep's loaders, installed with prep, for any of the formats
train = pipeline.load_tf("{file}", "train").shuffle(10_000).batch(64)  # (uint8 H x W x C, int64) pairs""",
    "numpy": """\
import pipeline  # prep's loaders, installed with prep, for any of the formats
(x_train, y_train), (x_valid, y_valid), (x_test, y_test) = pipeline.load("{file}")
classes = pipeline.load_classes("{file}")""",
}


def size_category(n: int) -> str:
    """The Hugging Face ``size_categories`` bucket of ``n`` examples."""
    for limit, name in SIZE_CATEGORIES:
        if n < limit:
            return name
    return "n>1B"


def _q(value) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def front_matter(name: str, classes: list[str], table: dict[str, dict[str, int]]) -> str:
    """The YAML block between ``---`` lines."""
    total = sum(sum(t.values()) for t in table.values())
    lines = [
        "---",
        f"pretty_name: {_q(name)}",
        "task_categories:",
        "- image-classification",
        "size_categories:",
        f"- {size_category(total)}",
        "license: other  # TODO: the license of the source images (an SPDX id such as cc-by-4.0)",
        "dataset_info:",
        "  features:",
        "  - name: image",
        "    dtype: image",
        "  - name: label",
        "    dtype:",
        "      class_label:",
        "        names:",
        *(f"          {_q(i)}: {_q(c)}" for i, c in enumerate(classes)),
        "  splits:",
    ]
    for split in SPLITS:
        lines += [f"  - name: {split}", f"    num_examples: {sum(t[split] for t in table.values())}"]
    lines.append("---")
    return "\n".join(lines) + "\n"


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def counts_table(classes: list[str], table: dict[str, dict[str, int]]) -> str:
    """Markdown: one row per class (id, name, images per split, total) and a total row."""
    lines = ["| id | class | " + " | ".join(SPLITS) + " | total |", "| ---: | --- |" + " ---: |" * 4]
    for i, label in enumerate(classes):
        counts = table.get(label, dict.fromkeys(SPLITS, 0))
        cells = [counts[s] for s in SPLITS] + [sum(counts.values())]
        lines.append(f"| {i} | {_md(label)} | " + " | ".join(map(str, cells)) + " |")
    totals = [sum(t[s] for t in table.values()) for s in SPLITS]
    lines.append("| | **total** | " + " | ".join(f"**{n}**" for n in [*totals, sum(totals)]) + " |")
    return "\n".join(lines)


def commands(facts: Facts) -> list[str]:
    """The prep commands that made the data, with the recorded settings."""
    settings = facts.settings()
    index = settings.get("index") or {}
    lines = [" ".join([
        "prep index", shlex.quote(str(facts.source or "RAW")),
        *(["--labels-from filename"] if index.get("labels_from") == "filename" else []),
        *([f"--pattern {shlex.quote(index['pattern'])}"] if index.get("pattern") else []),
        *(["--follow-links"] if index.get("follow_links") else []),
    ])]
    resize = settings.get("resize") or {}
    default = json.loads(json.dumps(dataclasses.asdict(ResizeSpec())))
    args = [f"--size {resize['width']}x{resize['height']}"] if "width" in resize and "height" in resize else []
    for key in ("mode", "interpolation", "channels", "background", "fill", "max_pixels"):
        if key in resize and resize[key] != default[key]:
            value = ",".join(map(str, resize[key])) if isinstance(resize[key], list) else resize[key]
            args.append(f"--{key.replace('_', '-')} {value}")
    lines.append(" ".join(["prep resize", *args]))
    split = settings.get("split") or {}
    args = ["--ratios " + ":".join(map(str, split["ratios"]))] if isinstance(split.get("ratios"), list) else []
    args += [f"--seed {split['seed']}"] if "seed" in split else []
    args += ["--drop-small"] if split.get("drop_small") else []
    lines.append(" ".join(["prep split", *args]))
    lines.append("prep encode")
    formats = facts.formats()
    pack = settings.get("pack") or {}
    args = [] if set(formats) == set(FILES) else [f"--format {f}" for f in formats]
    pickled, records = pack.get("pkl.gz") or {}, pack.get("tfrecord") or {}
    args += ["--flat"] if pickled.get("flat") else []
    args += ["--float"] if pickled.get("as_float") else []
    args += [f"--shard-mb {records['shard_mb']:g}"] if records.get("shard_mb", 100) != 100 else []
    if records.get("tfrecord_compression", "none") != "none":
        args.append(f"--tfrecord-compression {records['tfrecord_compression']}")
    lines.append(" ".join(["prep pack", *args]))
    if formats:
        lines.append("prep verify")
    return lines


def _code(text: str, lang: str = "python") -> str:
    return f"```{lang}\n{text}\n```\n"


def render(facts: Facts) -> str | None:
    """The card's text, or None before `prep split` has run."""
    table = facts.table()
    if not table:
        return None
    classes = facts.class_names() or list(table)
    source = str(facts.source or "")
    name = source.rstrip("/").rsplit("/", 1)[-1] or facts.wd.root.name
    totals = {s: sum(t[s] for t in table.values()) for s in SPLITS}
    shape = facts.image_shape()
    colour = {1: "grayscale", 3: "RGB"}.get(shape[2], f"{shape[2]} channels") if shape else ""
    made = f" by prep {facts.version}" + (f" on {facts.time()}" if facts.time() else "")
    settings, formats = facts.settings(), facts.formats()
    pickled = ((settings.get("pack") or {}).get("pkl.gz") or {}) if "pkl.gz" in formats else {}  # its options

    parts = [front_matter(name, classes, table), f"# {name}\n"]
    parts.append(
        f"An image-classification dataset of {sum(totals.values())} images in {len(classes)} classes"
        + (f", {shape[0]} x {shape[1]} pixels, {colour}" if shape else "")
        + f": {totals['train']} for training, {totals['valid']} for validation and {totals['test']} for testing."
        + f" It was made from the class folders of `{source or 'RAW'}`{made}.\n"
    )
    parts.append("## Classes\n\nA label id is the class's position in this list, the same in every split and format.\n")
    parts.append(counts_table(classes, table) + "\n")
    dropped = facts.dropped_classes()
    if dropped:
        listed = ", ".join(f"`{_md(c)}` ({n} image{'s' * (n != 1)})" for c, n in dropped.items())
        parts.append(f"Left out by `prep split --drop-small`, too small for the ratios: {listed}.\n")

    parts.append("## Images\n")
    if shape:
        stored = [what for key, what in (("flat", f"flat, (N, {shape[0] * shape[1] * shape[2]})"),
                                         ("as_float", "float32 in [0, 1]")) if pickled.get(key)]
        parts.append(
            f"{shape[0]} x {shape[1]} pixels (width x height), {colour}, 8 bits per channel: images are uint8"
            f" arrays of shape (N, {shape[1]}, {shape[0]}, {shape[2]}) (N, height, width, channels) and labels"
            " int64 ids" + (f"; dataset.pkl.gz holds them {' and '.join(stored)}" if stored else "") + ".\n"
        )
    else:
        parts.append("Not resized yet: run `prep resize`.\n")

    parts.append("## How it was made\n")
    parts.append(_code("\n".join(commands(facts)), "sh"))
    parts.append(
        "`prep index` lists and hashes the images, `prep resize` decodes each one (EXIF orientation, colour"
        " modes, transparency) and resizes it, `prep split` assigns whole groups of identical files to one split,"
        " stratified by class, `prep encode` numbers the classes and `prep pack` writes the formats below with"
        " their checksums.\n"
    )
    if settings:
        from .report import flatten

        rows = ["| setting | value |", "| --- | --- |"] + [f"| {_md(k)} | {_md(v)} |" for k, v in flatten(settings)]
        parts.append("The recorded settings:\n\n" + "\n".join(rows) + "\n")

    parts.append("## Verification\n")
    m = facts.metrics
    if m:
        parts.append(
            f"`prep verify-train` trained a {m.get('model', '?')} model on {m.get('format', '?')}: test accuracy"
            f" {m.get('test_accuracy', float('nan')):.3f} against a majority baseline of"
            f" {m.get('baseline_accuracy', float('nan')):.3f} (required {m.get('required_accuracy', float('nan')):.3f},"
            f" p = {m.get('p_value', float('nan')):.1e}): **{m.get('verdict', '?')}**.\n"
        )
    else:
        parts.append("`prep verify-train` has not run yet.\n")
    parts.append("`report/index.html` beside this card shows samples of every class, the source image sizes,"
                 " rejected files, duplicates and label conflicts.\n")

    parts.append("## Loading\n")
    if not formats:
        parts.append("Not packaged yet: run `prep pack`.\n")
    else:
        parts.append("From this folder, in Python:\n")
        x = ("float32 in [0, 1]" if pickled.get("as_float") else "uint8") + (
            " (N, H*W*C)" if pickled.get("flat") else " (N, H, W, C)")
        for fmt in formats:
            if fmt in LOADING:
                parts.append(f"**{fmt}**\n\n" + _code(LOADING[fmt].replace("{x}", x)))
        first = FILES.get(formats[0], ".")
        parts.append("**numpy, any format**\n\n" + _code(LOADING["numpy"].replace("{file}", first)))
        parts.append("**tf.data, any format**\n\n" + _code(LOADING["tf.data"].replace("{file}", first)))

    parts.append("## Checksums\n")
    files = facts.files()
    if not files:
        parts.append("Not packaged yet: run `prep pack`.\n")
    else:
        lines = ["| file | bytes | sha256 |", "| --- | ---: | --- |"]
        lines += [f"| `{path}` | {info.get('bytes', '')} | `{info.get('sha256', '')}` |"
                  for path, info in files.items()]
        parts.append("\n".join(lines) + "\n\n`prep verify` checks them, and every image in every format.\n")
    return "\n".join(parts)
