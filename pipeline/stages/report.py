"""`prep report`: one self-contained HTML page about a work directory, and its dataset card.

``report/index.html`` inlines everything (images as base64 PNG data URIs, CSS in a ``<style>``;
no script, no network), so it opens offline in any browser. Its sections, each read from the
files of the stage that makes them, and each saying which command to run when they are absent:

    summary      source, settings, prep version, counts, time      index.json, manifest.json
    splits       class x split table and bar chart                 manifest.json (else splits.csv)
    samples      up to ``samples`` resized images per class        splits.csv, resized/
    sizes        source image sizes, aspect ratios, formats        resized.csv
    rejected     files resize rejected and index skipped           rejected.csv, index.json
    duplicates   same content twice, and under two labels          labels.csv
    verify       verify-train's metrics and plots                  verify/

The same facts give the dataset card, ``README.md`` in the work directory
(:mod:`pipeline.stages.card`), written by this command once the data has been split.

The page depends only on the work directory's files: the one time it shows is the manifest's
(or the newest input file's), and plots are saved without a software tag, so rerunning on the
same files gives the same bytes.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import statistics
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


from .. import __version__, workdir
from ..errors import PrepError
from ..formats import SPLITS

log = logging.getLogger(__name__)

REPORT = "report/index.html"
CARD = "README.md"
SPLIT_COLOURS = {"train": "#4c72b0", "valid": "#dd8452", "test": "#55a868"}
VERIFY_PLOTS = (
    ("training_curves.png", "Training curves"),
    ("confusion_matrix.png", "Confusion matrix (test split)"),
    ("predictions.png", "Test predictions (predicted / true; red when wrong)"),
)
MAX_ROWS = 200  # rows of a listing (rejected files, duplicate groups) before "and N more"
MAX_GRID_CLASSES = 100  # classes in the sample grid before "and N more"
NATURAL = workdir.natural_key
SECTIONS = (
    ("summary", "Summary"),
    ("splits", "Classes and splits"),
    ("samples", "Samples"),
    ("sizes", "Source images"),
    ("rejected", "Rejected and skipped"),
    ("duplicates", "Duplicates and conflicts"),
    ("verify", "verify-train"),
)


@dataclass
class ReportConfig:
    workdir: workdir.Workdir
    out: Path | None = None  # default: WORKDIR/report/index.html
    samples: int = 8


@dataclass
class ReportResult:
    out: Path
    bytes: int
    card: Path | None
    missing: list[str] = field(default_factory=list)  # commands whose outputs were absent

    @property
    def summary(self) -> str:
        text = f"Wrote {self.out} ({self.bytes / 1024:.0f} KB)"
        if self.card:
            text += f" and the dataset card {self.card}"
        if self.missing:
            text += "; not run yet: " + ", ".join(f"`prep {m}`" for m in self.missing)
        return text


# -- facts: what the work directory holds -----------------------------------------------------


@dataclass
class Facts:
    """Every stage output the report and the card use; None where the stage has not run."""

    wd: workdir.Workdir
    index: dict | None = None
    labels: list[dict] | None = None
    resized: list[dict] | None = None
    rejected: list[dict] | None = None
    splits: list[dict] | None = None
    classes: list[str] | None = None
    manifest: dict | None = None
    metrics: dict | None = None

    @property
    def version(self) -> str:
        return str((self.manifest or {}).get("prep_version") or __version__)

    @property
    def source(self) -> str | None:
        return (self.index or {}).get("raw")

    def settings(self) -> dict:
        """The stages' settings: the manifest's, else resize.json and split.json, plus index's."""
        recorded = (self.manifest or {}).get("settings") or {}
        settings = {}
        if self.index:
            settings["index"] = {k: self.index.get(k) for k in ("labels_from", "pattern", "follow_links")}
        for stage in ("resize", "split"):
            path = self.wd.path(f"{stage}.json")
            settings[stage] = recorded.get(stage) or (workdir.read_json(path) if path.exists() else None)
        settings.update((k, v) for k, v in recorded.items() if k not in settings)
        return {k: v for k, v in settings.items() if v}

    def dropped_classes(self) -> dict[str, int]:
        """class -> images, of the classes `prep split --drop-small` left out."""
        dropped = (self.settings().get("split") or {}).get("dropped_classes")
        return {str(c): int(n) for c, n in dropped.items()} if isinstance(dropped, dict) else {}

    def table(self) -> dict[str, dict[str, int]] | None:
        """class -> split -> images: the manifest's counts, else splits.csv's."""
        counts = manifest_counts(self.manifest) if self.manifest else None
        if counts is None and self.splits is not None:
            counts = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
            for row in self.splits:
                counts[row["label"]][row["split"]] += 1
        if counts is None:
            return None
        order = self.class_names() or sorted(counts, key=NATURAL)
        return {c: {s: int(counts.get(c, {}).get(s, 0)) for s in SPLITS} for c in order if c in counts}

    def class_names(self) -> list[str] | None:
        """Class names in id order (position = label id)."""
        if self.manifest and isinstance(self.manifest.get("classes"), list):
            return [str(c) for c in self.manifest["classes"]]
        return self.classes

    def files(self) -> dict[str, dict]:
        """The manifest's packaged files: relative path -> {format, bytes, sha256}."""
        files = (self.manifest or {}).get("files")
        return files if isinstance(files, dict) else {}

    def formats(self) -> list[str]:
        """The packaged formats, in the manifest's order."""
        listed = ((self.manifest or {}).get("settings") or {}).get("pack", {}).get("formats") or []
        found = dict.fromkeys(str(info.get("format")) for info in self.files().values())
        return [f for f in listed if f in found] + [f for f in found if f not in listed]

    def image_shape(self) -> tuple[int, int, int] | None:
        """(width, height, channels) of the resized images."""
        image = (self.manifest or {}).get("image") or self.settings().get("resize") or {}
        if all(k in image for k in ("width", "height", "channels")):
            return int(image["width"]), int(image["height"]), int(image["channels"])
        for row in self.resized or ():
            if row.get("status") == "ok":
                path = self.wd.path(workdir.RESIZED_DIR) / row["resized"]
                if path.is_file():
                    from PIL import Image

                    with Image.open(path) as img:
                        return img.width, img.height, len(img.getbands())
        return None

    def time(self) -> str | None:
        """When the data was made: the time of the manifest, else of the newest input file (UTC)."""
        names = [workdir.MANIFEST] if self.manifest else [workdir.ENCODED, workdir.SPLITS, workdir.RESIZED,
                                                          workdir.LABELS]
        times = [self.wd.path(n).stat().st_mtime for n in names if self.wd.path(n).exists()]
        if not times:
            return None
        return dt.datetime.fromtimestamp(max(times), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def manifest_counts(manifest: dict) -> dict[str, dict[str, int]] | None:
    """class -> split -> images from a manifest's ``splits`` (split -> {count, classes})."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return None
    table: dict[str, dict[str, int]] = defaultdict(dict)
    for split in SPLITS:
        for label, n in ((splits.get(split) or {}).get("classes") or {}).items():
            table[label][split] = int(n)
    return dict(table) or None


def gather(wd: workdir.Workdir) -> Facts:
    """Read whatever the stages have written so far."""
    if not wd.root.is_dir():
        raise PrepError(f"work directory {wd.root} does not exist; run `prep index RAW` first (or pass --workdir)")
    facts = Facts(wd)

    def optional(name: str, read):
        path = wd.path(name)
        return read(path) if path.exists() else None

    facts.index = optional(workdir.INDEX_META, workdir.read_json)
    facts.labels = optional(workdir.LABELS, lambda p: workdir.read_csv(p, ["path", "label", "sha256"]))
    facts.resized = optional(workdir.RESIZED, lambda p: workdir.read_csv(p, ["path", "status", "width", "height"]))
    facts.rejected = optional(workdir.REJECTED, lambda p: workdir.read_csv(p, ["path", "label", "reason"]))
    facts.splits = optional(workdir.SPLITS, lambda p: workdir.read_csv(p, ["path", "label", "resized", "split"]))
    classes = optional(workdir.CLASSES, workdir.read_json)
    facts.classes = classes.get("classes") if isinstance(classes, dict) else classes
    facts.manifest = optional(workdir.MANIFEST, workdir.read_json)
    facts.metrics = optional(f"{workdir.VERIFY_DIR}/metrics.json", workdir.read_json)
    return facts


# -- plots --------------------------------------------------------------------------------------


def figure(width: float, height: float):
    """A matplotlib Figure outside pyplot (no global state; PNGs are drawn by Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def figure_png(fig) -> bytes:
    """A figure as PNG bytes without a software tag (same figure, same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def split_chart(table: dict[str, dict[str, int]]) -> bytes:
    """Horizontal stacked bars: images per class, coloured by split, total at the end."""
    import numpy as np

    classes = list(table)
    n = len(classes)
    fig = figure(7.5, min(30.0, max(2.6, 0.3 * n + 1.4)))
    ax = fig.subplots()
    y = np.arange(n)
    left = np.zeros(n)
    for split in SPLITS:
        values = np.array([table[c][split] for c in classes])
        bars = ax.barh(y, values, left=left, color=SPLIT_COLOURS[split], label=split, height=0.75)
        left += values
    if n <= 60:
        ax.bar_label(bars, labels=[str(int(v)) for v in left], padding=3, fontsize=8)
    ax.set_yticks(y, classes, fontsize=9 if n <= 60 else 6)
    ax.invert_yaxis()
    ax.set_ylim(n - 0.5, -0.5)
    ax.margins(x=0.08)
    ax.set_xlabel("images")
    ax.set_ylabel("class")
    ax.set_title("Images per class and split")
    ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


def size_chart(sizes: list[tuple[int, int]]) -> bytes:
    """Source sizes (width x height, marker area ~ count) and the histogram of aspect ratios."""
    import numpy as np

    counted = Counter(sizes)
    ws, hs = zip(*counted, strict=True)
    counts = np.array(list(counted.values()), dtype=float)
    fig = figure(11, 4)
    left, right = fig.subplots(1, 2)
    left.scatter(ws, hs, s=15 + 285 * counts / counts.max(), alpha=0.55, color="#4c72b0", edgecolors="none")
    if max(ws) > 20 * min(ws) or max(hs) > 20 * min(hs):
        left.set_xscale("log")
        left.set_yscale("log")
    left.margins(0.1)
    left.set_xlabel("width (px)")
    left.set_ylabel("height (px)")
    left.set_title(f"Source image sizes ({len(counted)} distinct; area ~ images)")
    ratios = np.array([w / h for w, h in sizes if h])
    right.hist(ratios, bins=min(40, max(5, len(set(ratios.round(3))))), color="#4c72b0")
    right.set_xlabel("aspect ratio (width / height)")
    right.set_ylabel("images")
    right.set_title("Aspect ratios")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


# -- HTML -----------------------------------------------------------------------------------------

e = html.escape

PAGE = string.Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="prep $version">
<title>$title</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; }
nav { position: sticky; top: 0; background: #24292f; padding: .5em 1.5em; z-index: 1; }
nav a { color: #fff; margin-right: 1.2em; text-decoration: none; font-size: 14px; }
main { max-width: 1180px; margin: 0 auto; padding: 0 1.5em 3em; }
h1 { margin: .8em 0 .2em; font-size: 26px; }
h2 { margin: 0 0 .6em; font-size: 20px; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h3 { font-size: 16px; margin: 1.2em 0 .4em; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 1em 1.4em;
          margin: 1.2em 0; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: .25em .7em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; background: #f6f8fa; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
.missing { color: #9a6700; background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px;
           padding: .5em .9em; }
.muted { color: #59636e; }
.plot { max-width: 100%; height: auto; display: block; margin: .5em 0 1em; }
.grid { display: grid; grid-template-columns: 9em 1fr; gap: .3em 1em; align-items: start; }
.grid .label { font-weight: 600; padding-top: .4em; overflow-wrap: anywhere; }
.thumbs { display: flex; flex-wrap: wrap; gap: .5em; padding: .2em 0 .6em;
          border-bottom: 1px solid #eaeef2; }
figure { margin: 0; width: 96px; text-align: center; }
figure img { height: 64px; max-width: 96px; object-fit: contain; background: #eaeef2; }
figure img.px { image-rendering: pixelated; }
figcaption { font-size: 11px; color: #59636e; overflow: hidden; text-overflow: ellipsis;
             white-space: nowrap; }
.verdict { display: inline-block; padding: .1em .6em; border-radius: 1em; font-weight: 600; color: #fff; }
.verdict.good { background: #1a7f37; } .verdict.bad { background: #cf222e; }
.row { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
.row > div { min-width: 0; }
.row > div.grow { flex: 1 1 480px; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin: .4em 0 1em; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: .4em .9em; min-width: 7em; }
.card b { display: block; font-size: 20px; }
</style>
</head>
<body>
<nav>$nav</nav>
<main>
<h1>$title</h1>
<p class="muted">Dataset report written by prep $version from the work directory <code>$workdir</code>.</p>
$sections
</main>
</body>
</html>
"""
)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{e(alt)}" src="{data_uri(png)}">'


def _missing(command: str) -> str:
    return f'<p class="missing">Not run yet: run <code>prep {e(command)}</code>.</p>'


class Markup(str):
    """HTML that :func:`_table` inserts as is (everything else is escaped)."""


def _table(headers: list[str] | None, rows: list[list], *, numeric: set[int] = frozenset(), id: str = "",
           row_attrs: list[str] | None = None) -> str:
    """An HTML table; ``numeric`` columns are right-aligned; no header row when ``headers`` is None."""
    out = [f'<table id="{e(id)}">' if id else "<table>"]
    if headers is not None:
        out.append("<thead><tr>")
        out += [f'<th{" class=n" if i in numeric else ""}>{e(h)}</th>' for i, h in enumerate(headers)]
        out.append("</tr></thead>")
    out.append("<tbody>")
    for r, row in enumerate(rows):
        attrs = f" {row_attrs[r]}" if row_attrs and row_attrs[r] else ""
        out.append(f"<tr{attrs}>")
        for i, cell in enumerate(row):
            text = cell if isinstance(cell, Markup) else e(str(cell))
            tag = "th" if headers is None and i == 0 else "td"
            out.append(f'<{tag}{" class=n" if i in numeric else ""}>{text}</{tag}>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _more(shown: int, total: int, where: str) -> str:
    return f'<p class="muted">... and {total - shown} more (see <code>{e(where)}</code>).</p>' if total > shown else ""


def _value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(_value, value))
    return str(value)


def flatten(settings: dict, prefix: str = "") -> list[list[str]]:
    """Nested settings as [dotted.name, readable value] rows."""
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict):
            rows += flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _value(value)])
    return rows


def _bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _verdict(metrics: dict) -> Markup:
    verdict = str(metrics.get("verdict"))
    return Markup(f'<span class="verdict {"good" if verdict == "learned" else "bad"}">{e(verdict)}</span>')


def section_summary(facts: Facts) -> str:
    table = facts.table()
    cards = []
    if facts.labels is not None:
        cards.append(("images indexed", len(facts.labels)))
    if facts.index:
        cards.append(("files skipped", sum((facts.index.get("skipped") or {}).values())))
    if facts.rejected is not None:
        cards.append(("rejected", len(facts.rejected)))
    if table:
        cards.append(("classes", len(table)))
        cards += [(s, sum(t[s] for t in table.values())) for s in SPLITS]
    if facts.metrics:
        cards.append(("test accuracy", _num(facts.metrics, "test_accuracy", ".3f")))
    parts = ['<div class="cards">']
    parts += [f'<div class="card" data-count="{e(k)}"><b>{e(str(v))}</b>{e(k)}</div>' for k, v in cards]
    parts.append("</div>")

    shape = facts.image_shape()
    rows = [
        ["source", Markup(f"<code>{e(facts.source)}</code>") if facts.source else Markup(_missing("index RAW"))],
        ["prep version", facts.version],
        ["time", facts.time() or "-"],
    ]
    if shape:
        rows.append(["image size", f"{shape[0]} x {shape[1]} pixels, {'RGB' if shape[2] == 3 else 'grayscale'}"])
    if facts.manifest:
        sizes: dict[str, list[int]] = defaultdict(list)
        for info in facts.files().values():
            sizes[str(info.get("format"))].append(int(info.get("bytes", 0)))
        rows.append(["packaged", Markup("<br>".join(
            e(f"{fmt}: {len(sizes[fmt])} file{'s' * (len(sizes[fmt]) != 1)}, {_bytes(sum(sizes[fmt]))}")
            for fmt in facts.formats()
        ) or "-")])
    else:
        rows.append(["packaged", Markup(_missing("pack"))])
    if facts.metrics:
        rows.append(["verify-train", _verdict(facts.metrics)])
    parts.append('<div class="row"><div>' + _table(None, rows, id="summary-table") + "</div>")
    settings = facts.settings()
    if settings:
        listing = _table(["setting", "value"], flatten(settings), id="settings")
        parts.append(f"<div><h3>Settings</h3>{listing}</div>")
    parts.append("</div>")
    return "".join(parts)


def section_splits(facts: Facts) -> str:
    table = facts.table()
    if not table:
        return _missing("split")
    headers = ["id", "class", *SPLITS, "total"]
    names = facts.class_names() or []
    rows, attrs = [], []
    for label, counts in table.items():
        ident = names.index(label) if label in names else ""
        rows.append([ident, label, *(counts[s] for s in SPLITS), sum(counts.values())])
        attrs.append(f'data-class="{e(label)}"')
    totals = [sum(t[s] for t in table.values()) for s in SPLITS]
    rows.append(["", "total", *totals, sum(totals)])
    attrs.append('class="total" data-class=""')
    source = "manifest.json" if facts.manifest and manifest_counts(facts.manifest) else "splits.csv"
    return (
        f'<p class="muted">Images per class and split, from <code>{source}</code>.</p><div class="row"><div>'
        + _table(headers, rows, numeric={0, 2, 3, 4, 5}, id="class-split", row_attrs=attrs)
        + '</div><div class="grow">' + _img(split_chart(table), "bar chart of images per class and split")
        + "</div></div>"
    )


def section_samples(facts: Facts, per_class: int) -> str:
    rows = facts.splits
    if rows is None:
        rows = [r for r in facts.resized or () if r.get("status") == "ok"]
        if not rows:
            return _missing("resize")
    if per_class == 0:
        return '<p class="muted">No samples requested (<code>--samples 0</code>).</p>'
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if len(by_class[row["label"]]) < per_class:
            by_class[row["label"]].append(row)
    order = [c for c in (facts.class_names() or sorted(by_class, key=NATURAL)) if c in by_class]
    shape = facts.image_shape()
    pixelated = shape is not None and shape[1] < 64
    folder = facts.wd.path(workdir.RESIZED_DIR)
    parts = [
        f'<p class="muted">The first {per_class} resized images of each class, as packaged'
        f'{f" ({shape[0]} x {shape[1]} pixels, shown enlarged)" if pixelated else ""}.</p><div class="grid">'
    ]
    for label in order[:MAX_GRID_CLASSES]:
        parts.append(f'<div class="label">{e(label)}</div><div class="thumbs" data-class="{e(label)}">')
        for row in by_class[label]:
            path = folder / row["resized"]
            if not path.is_file():
                parts.append(f'<figure><figcaption title="{e(row["path"])}">missing</figcaption></figure>')
                continue
            name = row["path"].rsplit("/", 1)[-1]
            title = row["path"] + (f" ({row['split']})" if row.get("split") else "")
            parts.append(
                f'<figure title="{e(title)}">{_img(path.read_bytes(), row["path"], "px" if pixelated else "")}'
                f"<figcaption>{e(name)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</div>")
    if len(order) > MAX_GRID_CLASSES:
        parts.append(f'<p class="muted">... and {len(order) - MAX_GRID_CLASSES} more classes.</p>')
    return "".join(parts)


def section_sizes(facts: Facts) -> str:
    ok = [r for r in facts.resized or () if r.get("status") == "ok" and r.get("width") and r.get("height")]
    if not ok:
        return _missing("resize")
    sizes = [(int(r["width"]), int(r["height"])) for r in ok]
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
    ratios = [w / h for w, h in sizes]
    stats = [
        ["width (px)", min(widths), f"{statistics.median(widths):g}", max(widths)],
        ["height (px)", min(heights), f"{statistics.median(heights):g}", max(heights)],
        ["aspect ratio (w / h)", *(f"{v:.2f}" for v in (min(ratios), statistics.median(ratios), max(ratios)))],
    ]
    counted = Counter(sizes)
    common = sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    tables = [
        ("Sizes", _table(["", "min", "median", "max"], stats, numeric={1, 2, 3}, id="size-stats")),
        ("Most common sizes",
         _table(["width x height", "images"], [[f"{w} x {h}", n] for (w, h), n in common], numeric={1})),
    ]
    for column, title in (("format", "File formats"), ("mode", "Pixel modes")):
        values = sorted(Counter(r.get(column) or "?" for r in ok).items(), key=lambda kv: (-kv[1], kv[0]))
        tables.append((title, _table([column, "images"], [list(kv) for kv in values], numeric={1})))
    parts = [
        f'<p class="muted">The {len(ok)} usable images before resizing, from <code>resized.csv</code>.</p>',
        '<div class="row">', *(f"<div><h3>{title}</h3>{table}</div>" for title, table in tables), "</div>",
    ]
    if len(counted) > 1:
        parts.append(_img(size_chart(sizes), "scatter plot of source image sizes and histogram of aspect ratios"))
    return "".join(parts)


def section_rejected(facts: Facts) -> str:
    parts = ["<h3>Rejected by <code>prep resize</code></h3>"]
    if facts.rejected is None:
        parts.append(_missing("resize"))
    elif not facts.rejected:
        parts.append("<p>No image was rejected.</p>")
    else:
        reasons = Counter(r["reason"].split(":")[0] for r in facts.rejected)
        parts.append(_table(["reason", "files"], [list(kv) for kv in reasons.most_common()], numeric={1},
                            id="reject-reasons"))
        shown = facts.rejected[:MAX_ROWS]
        rows = [[Markup(f"<code>{e(r['path'])}</code>"), r["label"], r["reason"]] for r in shown]
        parts.append(_table(["file", "class", "reason"], rows, id="rejected-files"))
        parts.append(_more(len(shown), len(facts.rejected), workdir.REJECTED))
    dropped = facts.dropped_classes()
    if dropped:
        parts.append("<h3>Left out by <code>prep split --drop-small</code></h3>")
        parts.append("<p>Classes with fewer different images than the ratios need:</p>")
        parts.append(_table(["class", "images"], [list(kv) for kv in dropped.items()], numeric={1}, id="dropped"))
    parts.append("<h3>Skipped by <code>prep index</code></h3>")
    if facts.index is None:
        parts.append(_missing("index RAW"))
        return "".join(parts)
    skipped = facts.index.get("skipped") or {}
    examples = facts.index.get("skipped_examples") or {}
    if not skipped:
        parts.append("<p>No file was skipped.</p>")
    else:
        rows = [[reason, n, Markup("<br>".join(f"<code>{e(x)}</code>" for x in examples.get(reason, [])[:5]))]
                for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1])]
        parts.append(_table(["reason", "files", "examples"], rows, numeric={1}, id="skipped"))
    empty = facts.index.get("empty_classes") or []
    if empty:
        names = ", ".join(f"<code>{e(c)}</code>" for c in empty)
        parts.append(f"<p>Class folders without images (not classes): {names}.</p>")
    return "".join(parts)


def duplicate_groups(labels: list[dict]) -> list[list[dict]]:
    """Rows of labels.csv sharing a sha256, in file order; only groups of two or more."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in labels:
        groups[row["sha256"]].append(row)
    return [g for g in groups.values() if len(g) > 1]


def section_duplicates(facts: Facts) -> str:
    if facts.labels is None:
        return _missing("index RAW")
    groups = duplicate_groups(facts.labels)
    conflicts = [g for g in groups if len({r["label"] for r in g}) > 1]
    extra = sum(len(g) - 1 for g in groups)
    parts = [
        f'<p>{len(groups)} groups of identical files (same sha256; {extra} copies beyond the first),'
        f" {len(conflicts)} of them under more than one label."
        ' <span class="muted">prep split keeps each group in one split.</span></p>'
    ]

    def listing(chosen: list[list[dict]], id: str) -> str:
        rows = [
            [Markup(f"<code>{g[0]['sha256'][:12]}</code>"), len(g),
             Markup("<br>".join(f"<code>{e(r['path'])}</code> ({e(r['label'])})" for r in g))]
            for g in chosen[:MAX_ROWS]
        ]
        return _table(["sha256", "copies", "files (class)"], rows, numeric={1}, id=id) + _more(
            min(len(chosen), MAX_ROWS), len(chosen), workdir.LABELS
        )

    parts.append("<h3>Label conflicts (same content, different labels)</h3>")
    parts.append(listing(conflicts, "conflicts") if conflicts else "<p>None.</p>")
    parts.append("<h3>Duplicate groups</h3>")
    parts.append(listing(groups, "duplicates") if groups else "<p>None.</p>")
    return "".join(parts)


def _num(metrics: dict, key: str, spec: str = ".4f") -> str:
    value = metrics.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def section_verify(facts: Facts) -> str:
    m = facts.metrics
    if m is None:
        return _missing("verify-train")
    counts = m.get("counts") or {}
    rows = [
        ["verdict", _verdict(m)],
        ["test accuracy", _num(m, "test_accuracy")],
        ["majority baseline", _num(m, "baseline_accuracy")
         + (f" (always predicting {m['baseline_class']})" if "baseline_class" in m else "")],
        ["required accuracy", _num(m, "required_accuracy")
         + (f" (baseline + {m['margin']:g} of the headroom)" if "margin" in m else "")],
        ["p-value (binomial, vs baseline)", _num(m, "p_value", ".2e")],
        ["model / format", f"{m.get('model', '?')} on {m.get('format', '?')}"],
        ["epochs", f"{m.get('epochs_run', '?')} of at most {m.get('epochs_max', '?')},"
                   f" best {m.get('best_epoch', '?')}"],
        ["images (train / valid / test)", " / ".join(str(counts.get(s, "?")) for s in SPLITS)],
        ["seconds", _num(m, "seconds", ".0f")],
    ]
    parts = []
    trained, packed = facts.wd.path(f"{workdir.VERIFY_DIR}/metrics.json"), facts.wd.path(workdir.MANIFEST)
    if packed.exists() and packed.stat().st_mtime > trained.stat().st_mtime:
        parts.append('<p class="missing">The data was packed again after this run:'
                     " run <code>prep verify-train</code> to check what is packaged now.</p>")
    parts += ['<div class="row"><div>', _table(None, rows, id="metrics"), "</div>"]
    per_class = m.get("per_class") or {}
    if per_class:
        parts.append("<div><h3>Per class (test split)</h3>")
        parts.append(_table(
            ["class", "precision", "recall", "f1", "support"],
            [[c, *(_num(v, k, ".3f") for k in ("precision", "recall", "f1-score")), _num(v, "support", ".0f")]
             for c, v in per_class.items()],
            numeric={1, 2, 3, 4}, id="per-class",
        ))
        parts.append("</div>")
    parts.append("</div>")
    folder = facts.wd.path(workdir.VERIFY_DIR)
    plots = []
    for name, title in VERIFY_PLOTS:
        path = folder / name
        body = _img(path.read_bytes(), title) if path.is_file() else f'<p class="missing">{e(name)} is missing.</p>'
        plots.append(f"<h3>{e(title)}</h3>{body}")
    parts.append(plots[0])
    parts.append('<div class="row">' + "".join(f'<div class="grow">{p}</div>' for p in plots[1:]) + "</div>")
    return "".join(parts)


def render(facts: Facts, samples: int = 8) -> str:
    """The report page as a string."""
    bodies = {
        "summary": section_summary(facts),
        "splits": section_splits(facts),
        "samples": section_samples(facts, samples),
        "sizes": section_sizes(facts),
        "rejected": section_rejected(facts),
        "duplicates": section_duplicates(facts),
        "verify": section_verify(facts),
    }
    sections = "\n".join(
        f'<section id="{sid}">\n<h2>{e(title)}</h2>\n{bodies[sid]}\n</section>' for sid, title in SECTIONS
    )
    name = Path(facts.source).name if facts.source else facts.wd.root.name
    return PAGE.substitute(
        title=e(f"Dataset report: {name}"),
        version=e(facts.version),
        workdir=e(str(facts.wd.root)),
        nav="".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title in SECTIONS),
        sections=sections,
    )


def missing_commands(facts: Facts) -> list[str]:
    steps = [
        ("index RAW", facts.labels), ("resize", facts.resized), ("split", facts.splits),
        ("encode", facts.classes), ("pack", facts.manifest), ("verify-train", facts.metrics),
    ]
    return [command for command, value in steps if value is None]


def run(cfg: ReportConfig) -> ReportResult:
    if cfg.samples < 0:
        raise PrepError(f"--samples must be 0 or more; received {cfg.samples}")
    facts = gather(cfg.workdir)
    out = cfg.out or cfg.workdir.path(REPORT)
    page = render(facts, cfg.samples).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir.atomic_write_bytes(out, page)
    from . import card

    card_path = None
    text = card.render(facts)
    if text is None:
        log.info("no dataset card yet: run `prep split` first")
    else:
        card_path = cfg.workdir.path(CARD)
        with workdir.atomic_write(card_path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return ReportResult(out, len(page), card_path, missing_commands(facts))
