"""The dataset card: ``README.md`` in the work directory, in the Hugging Face shape.

YAML front matter (``pretty_name``, ``license`` from ``prep report --license``,
``task_categories``, ``size_categories`` and, once the Parquet shards are packed, ``configs``
naming their files per split and ``dataset_info`` with the features they hold, the class names
as a ``class_label``, and the split sizes), then a body: what the data is, classes and counts
per split, image size and mode, the prep commands and settings that made it, how to load each
format, and the checksums from ``manifest.json``. With it, ``datasets.load_dataset(WORKDIR)``
and the Hub (once the folder is uploaded) read the Parquet shards as typed splits.

``prep report`` writes it once the data is split, from the facts :mod:`pipeline.stages.facts`
gathers; the numbers come from the manifest once ``prep pack`` has run. The YAML is written by
PyYAML, in the order the Hub's own cards use; the Markdown by the template
``pipeline/templates/card.md.j2``, where every name read from the data is escaped for Markdown
(:func:`md`, :func:`code`, :func:`fence`): the Hub renders a card's HTML tags, tables and emphasis.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import yaml

from ..errors import PrepError
from ..formats import FORMATS, SPLITS
from ..spec import ResizeSpec
from .facts import Facts, flatten, template

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
    "parquet": """\
import os
from datasets import load_dataset  # reads this card's configs: splits train, validation (prep's valid), test
ds = load_dataset(os.path.abspath("."))  # this folder; or "user/name", the Hub repository it is uploaded to
names = ds["train"].features["label"].names  # ds["train"][0]: {"image": PIL image, "label": id}
train = ds["train"].with_format("numpy")  # image uint8 (H, W, C); with "torch" (C, H, W)""",
    "pandas": """\
import glob, io, pandas as pd  # or DuckDB: SELECT image.path, label FROM 'data/train-*.parquet'
from PIL import Image
train = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob("data/train-*.parquet"))], ignore_index=True)
image = Image.open(io.BytesIO(train["image"][0]["bytes"]))  # columns image {bytes: PNG, path}, label""",
    "torch": """\
import pipeline, torch  # prep's loaders: Parquet row groups read on demand, h5 opened in each worker
train = pipeline.load_torch("{file}", "train")  # (uint8 H x W x C array, int label); transform= as in torchvision
loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, num_workers=2)""",
    "tf.data": """\
import pipeline  # prep's loaders, installed with prep, for any of the formats (TensorFlow: prep's train extra)
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


LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def check_license(value: str) -> str:
    """A Hub license id (lowercase, as the Hub lists them: cc-by-4.0, mit, apache-2.0, unknown, other)."""
    if not LICENSE_ID.fullmatch(value or ""):
        raise PrepError(f"--license must be a Hugging Face Hub license id such as cc-by-4.0, mit, unknown or other;"
                        f" received {value!r}")
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


def front_matter(name: str, classes: list[str], table: dict[str, dict[str, int]], license: str = "unknown",
                 parquet: dict[str, tuple[int, int]] | None = None) -> str:
    """The YAML block between ``---`` lines; ``parquet`` (split -> (in-memory bytes, file bytes)
    of its Parquet shards) adds the ``configs`` and ``dataset_info`` that `datasets` and the Hub read."""
    total = sum(sum(t.values()) for t in table.values())
    meta = {
        "pretty_name": name,
        "license": check_license(license),
        **({"license_name": f"{_slug(name)}-license", "license_link": "LICENSE"} if license == "other" else {}),
        "task_categories": ["image-classification"],
        "size_categories": [size_category(total)],
    }
    if parquet is not None:
        from ..formats.parquet import HUB_SPLITS, OUTPUT

        counts = {s: sum(t[s] for t in table.values()) for s in SPLITS}
        present = [s for s in SPLITS if counts[s]]  # an empty split has no file, and `datasets` refuses it
        meta["configs"] = [{"config_name": "default", "data_files": [
            {"split": HUB_SPLITS[s], "path": f"{OUTPUT}/{HUB_SPLITS[s]}-*"} for s in present]}]
        meta["dataset_info"] = {
            "features": [
                {"name": "image", "dtype": "image"},
                {"name": "label", "dtype": {"class_label": {"names": {str(i): c for i, c in enumerate(classes)}}}},
            ],
            "splits": [{"name": HUB_SPLITS[s], "num_bytes": parquet[s][0], "num_examples": counts[s]}
                       for s in present],
            "download_size": sum(size for _, size in parquet.values()),
            "dataset_size": sum(size for size, _ in parquet.values()),
        }
    text = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return f"---\n{text}---\n"


def parquet_sizes(facts: Facts) -> dict[str, tuple[int, int]] | None:
    """split -> (uncompressed bytes, file bytes) of the packaged Parquet shards, or None when
    there are none. The first is what `datasets` calls a split's num_bytes (its size in memory)."""
    from ..formats import parquet

    if "parquet" not in facts.formats():
        return None
    try:
        files = parquet.shards(facts.wd.path(parquet.OUTPUT))
        sizes = {}
        for split, paths in files.items():
            footers = [parquet._open(p).metadata for p in paths]
            sizes[split] = (sum(m.row_group(g).total_byte_size for m in footers for g in range(m.num_row_groups)),
                            sum(p.stat().st_size for p in paths))
        return sizes
    except (PrepError, OSError):  # gone since `prep pack`: `prep verify` says so
        return None


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
    for key, usual in (("near_copies", "default"), ("on_conflict", "keep"), ("group_by", None), ("groups", None)):
        if split.get(key, usual) != usual:
            args.append(f"--{key.replace('_', '-')} {shlex.quote(str(split[key]))}")
    lines.append(" ".join(["prep split", *args]))
    order = facts.class_order
    lines.append("prep encode" + (f" --class-order {order}" if order == "alphabetical" else ""))
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


ORDERS = {
    "natural": "in natural order (`2` before `10`)",
    "alphabetical": "in alphabetical order, Python's `sorted()` (`10` before `2`), as torchvision's ImageFolder"
                    " and Keras number class folders",
    "pinned": "as a pinned classes.json gave them (`prep encode --classes`)",
}


# Markdown: what a name read from the data must not be taken for. Backslash escapes stop
# emphasis, links, code, strikethrough, math ($) and table cells (|, which GFM splits on even
# inside a code span); entities stop HTML tags, which the Hub renders.
MD_PUNCTUATION = re.compile(r"([\\`*\[\]|~$])")
UNDERSCORES = re.compile(r"(?<=[^\W_])(_+)(?=[^\W_])|(_+)")  # inside a word (snake_case) they emphasise nothing
HTML_CHARS = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _one_line(text) -> str:
    return " ".join(str(text).splitlines()).replace("\t", " ")


def md(text) -> str:
    """``text`` as Markdown that shows it as it is, on one line (a table cell too)."""
    escaped = MD_PUNCTUATION.sub(r"\\\1", _one_line(text))
    escaped = UNDERSCORES.sub(lambda m: m.group(1) or m.group(2).replace("_", "\\_"), escaped)
    return re.sub(r"[&<>]", lambda m: HTML_CHARS[m.group()], escaped)


def code(text, table: bool = False) -> str:
    """``text`` as a code span: no Markdown nor HTML inside; fenced by more backticks than it
    holds in a row. In a table, ``|`` is escaped (GFM splits cells before it reads code)."""
    text = _one_line(text)
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    if table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def fence(text: str, lang: str = "") -> str:
    """``text`` as a fenced code block whose fence no line of it can close."""
    ticks = "`" * max(3, max(map(len, re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


NEAR_RULES = {
    "default": "identical files and near copies (perceptual hashes of the upright images within 4 of 64 bits,"
               " or within 8 when their 256-bit hashes are within 40)",
    "strict": "identical files and near copies (perceptual hashes of the upright images within 4 of 64 bits)",
}


def render(facts: Facts, license: str = "unknown") -> str | None:
    """The card's text, or None before `prep split` has run."""
    table = facts.table()
    if not table:
        return None
    classes = facts.class_names() or list(table)
    totals = {s: sum(t[s] for t in table.values()) for s in SPLITS}
    shape = facts.image_shape()
    settings, formats = facts.settings(), facts.formats()
    pickled = ((settings.get("pack") or {}).get("pkl.gz") or {}) if "pkl.gz" in formats else {}  # its options
    stored = [what for key, what in (("flat", f"flat, (N, {shape[0] * shape[1] * shape[2]})"),
                                     ("as_float", "float32 in [0, 1]")) if shape and pickled.get(key)]
    m = facts.metrics

    def number(key: str, spec: str) -> str:
        value = m.get(key)
        return format(value, spec) if isinstance(value, (int, float)) else "?"

    snippets = []
    if formats:
        x = ("float32 in [0, 1]" if pickled.get("as_float") else "uint8") + (
            " (N, H*W*C)" if pickled.get("flat") else " (N, H, W, C)")
        for fmt in formats:
            if fmt in LOADING:
                title = "parquet, with Hugging Face datasets" if fmt == "parquet" else fmt
                snippets.append((title, LOADING[fmt].replace("{x}", x)))
            if fmt == "parquet":
                snippets.append(("parquet, with pandas", LOADING["pandas"]))
        first = FILES.get(formats[0], ".")
        snippets += [("numpy, any format", LOADING["numpy"].replace("{file}", first)),
                     ("PyTorch, any format but tfrecord", LOADING["torch"].replace("{file}", ".")),
                     ("tf.data, any format", LOADING["tf.data"].replace("{file}", first))]
    near = (settings.get("split") or {}).get("near_copies", "default")
    return template("card.md.j2", md=md, code=code, fence=fence).render(
        front_matter=front_matter(facts.name, classes, table, license, parquet_sizes(facts)),
        name=facts.name,
        source=facts.source,
        version=facts.version,
        time=facts.time(),
        total=sum(totals.values()),
        totals=totals,
        split_names=list(SPLITS),
        shape=shape,
        colour={1: "grayscale", 3: "RGB"}.get(shape[2], f"{shape[2]} channels") if shape else "",
        stored=stored,
        classes=[(i, c, [table.get(c, {}).get(s, 0) for s in SPLITS], sum(table.get(c, {}).values()))
                 for i, c in enumerate(classes)],
        order=ORDERS.get(facts.class_order, facts.class_order),
        dropped=list(facts.dropped_classes().items()),
        commands=commands(facts),
        kept=NEAR_RULES.get(near, "identical files"),
        settings=flatten(settings),
        metrics=m and {"model": m.get("model", "?"), "format": m.get("format", "?"), "verdict": m.get("verdict", "?"),
                       "accuracy": number("test_accuracy", ".3f"), "baseline": number("baseline_accuracy", ".3f"),
                       "required": number("required_accuracy", ".3f"), "p_value": number("p_value", ".1e")},
        snippets=snippets,
        files=[(path, info.get("bytes", ""), info.get("sha256", "")) for path, info in facts.files().items()],
    )
