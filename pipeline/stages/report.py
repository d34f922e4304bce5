"""`prep report`: one self-contained HTML page about a work directory, and its dataset card.

``report/index.html`` inlines everything (images as base64 PNG data URIs, CSS in a ``<style>``;
no script, no network), so it opens offline in any browser, and reads on a phone (tables scroll
in their own box, the sample grid reflows, plots scale). Its sections, each read from the
files of the stage that makes them, and each saying which command to run when they are absent:

    summary      source, settings, prep version, counts, time      index.json, manifest.json
    splits       class x split table, bar chart, class weights     manifest.json (else splits.csv)
    samples      up to ``samples`` resized images per class        splits.csv, resized/
    sizes        source image sizes, aspect ratios, formats        resized.csv
    rejected     files resize rejected and index skipped           rejected.csv, index.json
    duplicates   same content twice, and under two labels          labels.csv
    near         near copies: two-label pairs, pairs, groups       conflicts.csv, near_copies.csv, splits.csv
    verify       verify-train's metrics and plots                  verify/

Above them, "Check these first" lists index.json's warnings when it has any.

This module turns the facts (:mod:`pipeline.stages.facts`) into what the page shows, and the
template ``pipeline/templates/report.html.j2`` (autoescaped) writes the HTML. The same facts
give the dataset card, ``README.md`` in the work directory (:mod:`pipeline.stages.card`),
written by this command once the data has been split. A ``README.md`` or
``report/index.html`` that prep did not write (the work directory may be a project's own
folder) is left as it is: the card and the page then take a second name.

The page depends only on the work directory's files: the one time it shows is the manifest's
(or the newest input file's), and plots are saved without a software tag, so rerunning on the
same files gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, workdir
from ..errors import PrepError
from ..workdir import SPLIT_NAMES as SPLITS
from .facts import CONFLICTS, MAX_PAIRS, MAX_ROWS, NATURAL, NEAR_COPIES, Facts, Head, flatten, gather
from .facts import VERIFY_PLOTS as PLOT_FILES
from .facts import manifest_counts, short, sources, template

log = logging.getLogger(__name__)

REPORT = "report/index.html"
STAMP = "report"  # .stamps/report.json: what the page and the card were last made of
CARD = "README.md"
SPLIT_COLOURS = {"train": "#4c72b0", "valid": "#dd8452", "test": "#55a868"}
VERIFY_PLOTS = tuple(zip(PLOT_FILES, (
    "Training curves", "Confusion matrix (test split)", "Test predictions (mistakes first: ✗ wrong, ✓ right)",
), strict=True))
MAX_GRID_CLASSES = 100  # classes in the sample grid before "and N more"
SECTIONS = (
    ("summary", "Summary"),
    ("splits", "Classes and splits"),
    ("samples", "Samples"),
    ("sizes", "Source images"),
    ("rejected", "Rejected and skipped"),
    ("duplicates", "Duplicates and conflicts"),
    ("near", "Near copies"),
    ("verify", "verify-train"),
)
# index.json's warnings: a title, and the section that shows what each is about
WARNINGS = {
    "raw_too_high": ("RAW may be one folder too high", "summary"),
    "small_class": ("Small class", "splits"),
    "imbalance": ("Classes out of balance", "splits"),
    "size_outliers": ("Images of unusual size", "sizes"),
    "upscaled": ("Images enlarged", "sizes"),
    "two_labels": ("One picture under two labels", "near"),
    "rejected": ("Images rejected", "rejected"),
}
# Plots are drawn at DPI dots per inch and shown at CSS_DPI CSS pixels per inch: sharp on
# screens of twice the density, and their text (9-11 pt on figures about 5 inches wide) still
# about 8 CSS px when a 360 px phone shrinks them to its width.
DPI, CSS_DPI = 200, 100


@dataclass
class ReportConfig:
    workdir: workdir.Workdir
    out: Path | None = None  # default: WORKDIR/report/index.html
    samples: int = 8
    license: str = "unknown"  # the dataset card's license id


@dataclass
class ReportResult:
    out: Path
    bytes: int
    card: Path | None
    missing: list[str] = field(default_factory=list)  # commands whose outputs were absent
    up_to_date: bool = False  # nothing it is made of changed since it was written

    @property
    def summary(self) -> str:
        text = f"{'Up to date:' if self.up_to_date else 'Wrote'} {self.out} ({self.bytes / 1024:.0f} KB)"
        if self.card:
            text += f" and the dataset card {self.card}"
        if self.missing:
            text += "; not run yet: " + ", ".join(f"`prep {m}`" for m in self.missing)
        return text


# -- plots --------------------------------------------------------------------------------------


@dataclass
class Plot:
    """An image for the page: its data URI, its width in CSS px, and the width under which it
    scrolls in its box rather than shrink further (0: it may shrink to any width)."""

    uri: str
    alt: str
    width: int
    min_width: int = 0


def figure(width: float, height: float):
    """A matplotlib Figure outside pyplot (no global state; PNGs are drawn by Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_plot(fig, alt: str) -> Plot:
    """A figure as a PNG without a software tag (same figure, same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return Plot(data_uri(buffer.getvalue()), alt, round(fig.get_figwidth() * CSS_DPI))


def file_plot(path: Path, alt: str) -> Plot:
    """A PNG file as it is, shown at CSS_DPI (by the density it records, else 100 dpi); a wide
    one (a confusion matrix of many classes) scrolls rather than shrink below 3/4 of that."""
    from PIL import Image

    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        dpi = float((image.info.get("dpi") or (CSS_DPI,))[0]) or CSS_DPI
        width = round(image.width * CSS_DPI / dpi)
    return Plot(data_uri(data), alt, width, round(0.75 * width) if width > 900 else 0)


def split_chart(table: dict[str, dict[str, int]]) -> Plot:
    """Horizontal stacked bars: images per class, coloured by split, total at the end."""
    import numpy as np

    classes = list(table)
    n = len(classes)
    fig = figure(5.2, min(30.0, max(2.4, 0.28 * n + 1.3)))
    ax = fig.subplots()
    y = np.arange(n)
    left = np.zeros(n)
    for split in SPLITS:
        values = np.array([table[c][split] for c in classes])
        bars = ax.barh(y, values, left=left, color=SPLIT_COLOURS[split], label=split, height=0.75)
        left += values
    if n <= 60:
        ax.bar_label(bars, labels=[str(int(v)) for v in left], padding=3, fontsize=9)
    ax.set_yticks(y, [short(c) for c in classes], fontsize=10 if n <= 30 else 7)
    ax.tick_params(axis="x", labelsize=9)
    ax.set_ylim(n - 0.5, -0.5)
    ax.margins(x=0.1)
    ax.set_xlabel("images", fontsize=10)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=3, frameon=False, fontsize=10,
              borderaxespad=0.2, handlelength=1.2)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_plot(fig, "bar chart of images per class and split")


def size_charts(ws, hs, counts, ratios) -> list[Plot]:
    """Source sizes (width x height of each distinct size, marker area ~ its ``counts``), and the
    histogram of the aspect ``ratios`` (arrays)."""
    import numpy as np

    counts = counts.astype(float)
    fig = figure(5.0, 3.8)
    ax = fig.subplots()
    ax.scatter(ws, hs, s=15 + 285 * counts / counts.max(), alpha=0.55, color="#4c72b0", edgecolors="none")
    if ws.max() > 20 * ws.min() or hs.max() > 20 * hs.min():
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.margins(0.1)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Source sizes ({len(ws)} distinct; area ~ images)", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    scatter = figure_plot(fig, "scatter plot of source image sizes")

    fig = figure(5.0, 3.8)
    ax = fig.subplots()
    ax.hist(ratios, bins=min(40, max(5, len(np.unique(ratios.round(3))))), color="#4c72b0")
    ax.set_xlabel("aspect ratio (width / height)")
    ax.set_ylabel("images")
    ax.set_title("Aspect ratios", fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return [scatter, figure_plot(fig, "histogram of aspect ratios")]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# -- what each section shows ---------------------------------------------------------------------


class Thumbnails:
    """Resized images as thumbnails, read only from below ``resized/``: a name from a CSV that
    leaves it (``../``, an absolute path, a link out) is shown as refused, not read."""

    def __init__(self, facts: Facts):
        self.facts = facts
        self.refused = 0

    def __call__(self, name: str, where: str, *, alt: str, title: str, caption: str, path: str = "") -> dict:
        shown = {"uri": None, "alt": alt, "title": title, "caption": caption, "path": path}
        if not name:
            return {**shown, "caption": "missing"}
        try:
            data = self.facts.resized_bytes(name, where)
        except PrepError as err:
            self.refused += 1
            if self.refused <= 5:
                log.warning("%s: not shown", err)
            return {**shown, "caption": "not shown"}
        if data is None:
            return {**shown, "caption": "missing"}
        return {**shown, "uri": data_uri(data)}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _num(metrics: dict, key: str, spec: str = ".4f") -> str:
    value = metrics.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def warnings(facts: Facts) -> list[dict]:
    titles = dict(SECTIONS)
    shown = []
    found = list(facts.warnings())
    # what split and resize found belongs up front too: labels to check, images left out
    if facts.conflicts and facts.conflicts.total:
        found.append({"kind": "two_labels", "message": f"{_plural(facts.conflicts.total, 'image')} with a copy or"
                      " near copy under another label (conflicts.csv): one of the two labels is likely wrong"})
    if facts.rejected and facts.rejected.total:
        found.append({"kind": "rejected", "message": f"{_plural(facts.rejected.total, 'image')} could not be used"
                      " (rejected.csv), each with its reason"})
    for w in found:
        kind = str(w.get("kind") or "")
        title, section = WARNINGS.get(kind, (kind.replace("_", " ").capitalize() or "Warning", None))
        shown.append({"kind": kind, "title": title, "message": str(w["message"]), "section": section,
                      "section_name": titles.get(section, "")})
    return shown


def summary(facts: Facts) -> dict:
    table = facts.table()
    cards = []
    if facts.labels is not None:
        cards.append(("images indexed", facts.labels.count))
    if facts.index:
        cards.append(("files skipped", sum((facts.index.get("skipped") or {}).values())))
    if facts.rejected is not None:
        cards.append(("rejected", facts.rejected.total))
    if table:
        cards.append(("classes", len(table)))
        cards += [(s, sum(t[s] for t in table.values())) for s in SPLITS]
    if facts.metrics:
        cards.append(("test accuracy", _num(facts.metrics, "test_accuracy", ".3f")))
    shape = facts.image_shape()
    packaged = None
    if facts.manifest:
        sizes: dict[str, list[int]] = defaultdict(list)
        for info in facts.files().values():
            sizes[str(info.get("format"))].append(int(info.get("bytes", 0)))
        packaged = [f"{fmt}: {len(sizes[fmt])} file{'s' * (len(sizes[fmt]) != 1)}, {_bytes(sum(sizes[fmt]))}"
                    for fmt in facts.formats()]
    return {
        "cards": cards,
        "source": facts.source,
        "time": facts.time(),
        "shape": shape and f"{shape[0]} x {shape[1]} pixels, {'RGB' if shape[2] == 3 else 'grayscale'}",
        "packaged": packaged,
        "verdict": str(facts.metrics.get("verdict")) if facts.metrics else None,
        "settings": flatten(facts.settings()),
    }


def splits(facts: Facts) -> dict | None:
    table = facts.table()
    if not table:
        return None
    names = facts.class_names() or []
    rows = [{"id": names.index(label) if label in names else "", "label": label,
             "counts": [counts[s] for s in SPLITS], "total": sum(counts.values())} for label, counts in table.items()]
    weights = facts.class_weights()
    return {
        "source": "manifest.json" if facts.manifest and manifest_counts(facts.manifest) else "splits.csv",
        "rows": rows,
        "totals": [sum(t[s] for t in table.values()) for s in SPLITS],
        "weights": [[c, f"{weights[c]:.3g}"] for c in table if c in weights],
        "chart": split_chart(table),
    }


def samples(facts: Facts, per_class: int, thumbnail: Thumbnails) -> dict | None:
    """The first ``per_class`` images of each class (of those :func:`gather` kept)."""
    rows, where = facts.splits, workdir.SPLITS
    if rows is None:
        if not (facts.resized and facts.resized.usable):
            return None
        rows, where = facts.resized.samples, workdir.RESIZED
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if len(by_class[row["label"]]) < per_class:
            by_class[row["label"]].append(row)
    order = [c for c in (facts.class_names() or sorted(by_class, key=NATURAL)) if c in by_class]
    classes = [
        (label, [thumbnail(row.get("resized", ""), where, alt=row["path"], caption=row["path"].rsplit("/", 1)[-1],
                           title=row["path"] + (f" ({row['split']})" if row.get("split") else ""))
                 for row in by_class[label]])
        for label in order[:MAX_GRID_CLASSES]
    ]
    return {"per_class": per_class, "shape": facts.image_shape(), "classes": classes,
            "more": max(0, len(order) - MAX_GRID_CLASSES)}


def sizes(facts: Facts) -> dict | None:
    import numpy as np

    widths, heights = (facts.resized.widths, facts.resized.heights) if facts.resized else ((), ())
    if not len(widths):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):  # a height of 0 makes no ratio for the histogram
        ratios = widths / heights
    # the distinct sizes in the order they first come, with their counts
    distinct, first, counts = np.unique(np.stack([widths, heights], axis=1), axis=0, return_index=True,
                                        return_counts=True)
    order = np.argsort(first)
    ws, hs, counts = distinct[order, 0], distinct[order, 1], counts[order]
    common = sorted(zip(ws.tolist(), hs.tolist(), counts.tolist()), key=lambda s: (-s[2], s[0], s[1]))[:10]

    def tally(counted) -> list[list]:
        return [list(kv) for kv in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))]

    return {
        "count": len(widths),
        "stats": [
            ["width (px)", int(widths.min()), f"{np.median(widths):g}", int(widths.max())],
            ["height (px)", int(heights.min()), f"{np.median(heights):g}", int(heights.max())],
            ["aspect ratio (w / h)", *(f"{v:.2f}" for v in (ratios.min(), np.median(ratios), ratios.max()))],
        ],
        "common": [[f"{w} x {h}", n] for w, h, n in common],
        "formats": tally(facts.resized.formats),
        "modes": tally(facts.resized.modes),
        "charts": size_charts(ws, hs, counts, ratios[heights != 0]) if len(ws) > 1 else [],
    }


def rejected(facts: Facts) -> dict:
    shown = {"rejected": None, "skipped": None, "dropped": [[c, n] for c, n in facts.dropped_classes().items()],
             "empty": (facts.index or {}).get("empty_classes") or []}
    if facts.rejected is not None:
        shown.update(rejected=facts.rejected.rows[:MAX_ROWS], rejected_total=facts.rejected.total,
                     reasons=[list(kv) for kv in facts.reject_reasons.most_common()])
    if facts.index is not None:
        examples = facts.index.get("skipped_examples") or {}
        shown["skipped"] = [(reason, n, examples.get(reason, [])[:5])
                            for reason, n in sorted((facts.index.get("skipped") or {}).items(), key=lambda kv: -kv[1])]
    return shown


def duplicates(facts: Facts) -> dict | None:
    labels = facts.labels
    if labels is None:
        return None
    return {"groups": labels.groups, "conflicts": labels.conflicts, "extra": labels.extra,
            "group_count": labels.group_count, "conflict_count": labels.conflict_count}


NEAR_RULES = {
    "off": "not looked for (--near-copies off)",
    "strict": "perceptual hashes (pHash) of the upright images within 4 of 64 bits",
    "default": "perceptual hashes (pHash) of the upright images within 4 of 64 bits, or within 8 when"
               " their 256-bit hashes are within 40",
}
ON_CONFLICT = {"keep": "both kept, in one split", "drop": "both left out", "error": "the split refused"}


def near(facts: Facts, thumbnail: Thumbnails) -> dict | None:
    """One picture under two labels, near-copy pairs side by side, groups per split, the largest groups."""
    if facts.splits is None:
        return None
    split = facts.settings().get("split") or {}
    rule = split.get("near_copies")
    if rule is None:
        return {"rule": None}

    def thumb(path: str, label: str, named: bool = True, row: dict | None = None) -> dict:
        row, source = (row, workdir.SPLITS) if row is not None else facts.shown.get(path, ({}, workdir.SPLITS))
        caption = (f"{label}, {row['split']}" if row.get("split") else f"{label}, left out") if named else (
            path.rsplit("/", 1)[-1])
        return thumbnail(row.get("resized", ""), source, alt=path, title=f"{path} ({label})", caption=caption,
                         path=path)

    def pairs(rows: list[dict]) -> list:
        return [(thumb(r["path_a"], r["label_a"]), thumb(r["path_b"], r["label_b"]), r["distance8"], r["distance16"])
                for r in rows[:MAX_PAIRS]]

    def count(n: int, what: str) -> str:
        return f"{n} {what}{'s' * (n != 1)}"

    conflicts, near_copies = facts.conflicts or Head([], 0), facts.near_copies or Head([], 0)
    outcome = ON_CONFLICT.get(split.get("on_conflict"), "")
    return {
        "rule": NEAR_RULES.get(rule, str(rule)),
        "pairs": [
            ("two-labels", f"One picture under two labels ({count(conflicts.total, 'pair')}; {outcome})",
             pairs(conflicts.rows), conflicts.total, CONFLICTS),
            ("near-pairs", f"Near copies ({count(near_copies.total, 'pair')}: each image with its closest near copy)",
             pairs(near_copies.rows), near_copies.total, NEAR_COPIES),
        ],
        "per_split": [[s, *facts.groups.per_split[s]] for s in SPLITS],
        "largest": [(n, split, [thumb(r["path"], r["label"], named=False, row=r) for r in rows])
                    for n, split, rows in facts.groups.largest],
    }


def verify(facts: Facts) -> dict | None:
    m = facts.metrics
    if m is None:
        return None
    counts = m.get("counts") or {}
    rows = [
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
    trained, packed = facts.wd.path(f"{workdir.VERIFY_DIR}/metrics.json"), facts.wd.path(workdir.MANIFEST)
    folder = facts.wd.path(workdir.VERIFY_DIR)
    per_class = m.get("per_class") or {}
    return {
        "verdict": str(m.get("verdict")),
        "rows": rows,
        "stale": packed.exists() and packed.stat().st_mtime > trained.stat().st_mtime,
        "per_class": [[c, *(_num(v, k, ".3f") for k in ("precision", "recall", "f1-score")), _num(v, "support", ".0f")]
                      for c, v in per_class.items()],
        "plots": [(name, title, file_plot(folder / name, title) if (folder / name).is_file() else None)
                  for name, title in VERIFY_PLOTS],
    }


# -- the page ------------------------------------------------------------------------------------


def render(facts: Facts, samples_per_class: int = 8) -> str:
    """The report page as a string."""
    thumbnail = Thumbnails(facts)
    shape = facts.image_shape()
    page = template("report.html.j2").render(
        title=f"Dataset report: {facts.name}",
        version=facts.version,
        workdir=facts.wd.url or str(facts.wd.root),  # as the user named it: a URL, not its local copy
        sections=SECTIONS,
        splits_names=list(SPLITS),
        max_rows=MAX_ROWS,
        pixelated=shape is not None and shape[1] < 64,
        warnings=warnings(facts),
        summary=summary(facts),
        splits=splits(facts),
        samples=samples(facts, samples_per_class, thumbnail),
        sizes=sizes(facts),
        rejected=rejected(facts),
        duplicates=duplicates(facts),
        near=near(facts, thumbnail),
        verify=verify(facts),
    )
    if thumbnail.refused:
        log.warning("%d images not shown: their names leave %s/", thumbnail.refused, workdir.RESIZED_DIR)
    return page


def missing_commands(facts: Facts) -> list[str]:
    steps = [
        ("index RAW", facts.labels), ("resize", facts.resized), ("split", facts.splits),
        ("encode", facts.classes), ("pack", facts.manifest), ("verify-train", facts.metrics),
    ]
    return [command for command, value in steps if value is None]


def run(cfg: ReportConfig) -> ReportResult:
    """Write the page and the card, unless what they are made of is as when they were written
    (the stage files, the options, this prep, the files' times the page shows) and they are as
    written: then nothing is read but a stat of each file (see :class:`workdir.Stamp`)."""
    if cfg.samples < 0:
        raise PrepError(f"--samples must be 0 or more; received {cfg.samples}")
    wd = cfg.workdir
    if not wd.root.is_dir():
        raise PrepError(f"work directory {wd.root} does not exist; run `prep index RAW` first (or pass --workdir)")
    out = cfg.out or wd.path(REPORT)
    if out == wd.path(REPORT):  # not one the user named with --out
        out = _free_name(wd, REPORT, "report", lambda path: PAGE_MARK in _head(path, 4096))
    stamp, inputs = workdir.Stamp(wd, STAMP), sources(wd)
    times = {wd.relative(p): p.stat().st_mtime_ns for p in inputs}  # the page shows the data's time, and when
    settings = {"out": wd.relative(out), "samples": cfg.samples, "license": cfg.license, "version": __version__,
                "workdir": wd.url or str(wd.root), "times": times}
    done = stamp.summary() if stamp.is_current(inputs, settings) else None
    if isinstance(done, dict) and isinstance(done.get("bytes"), int) and isinstance(done.get("missing"), list):
        card_path = done.get("card")
        if card_path == SECOND_NAMES[CARD]:  # said again, as on the run that wrote it
            log.warning("%s was not written by prep: left as it is; the dataset card is %s", wd.path(CARD),
                        wd.path(card_path))
        return ReportResult(out, done["bytes"], wd.path(card_path) if isinstance(card_path, str) else None,
                            [str(m) for m in done["missing"]], up_to_date=True)
    from . import card

    found = gather(wd, cfg.samples)
    page = render(found, cfg.samples).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir.atomic_write_bytes(out, page)
    card_path = None
    text = card.render(found, cfg.license)
    if text is None:
        log.info("no dataset card yet: run `prep split` first")
    else:
        card_path = _free_name(wd, CARD, "dataset card", _is_card)
        with workdir.atomic_write(card_path, "w", encoding="utf-8") as handle:
            handle.write(text.rstrip("\n") + f"\n\n{CARD_MARK}\n")
    result = ReportResult(out, len(page), card_path, missing_commands(found))
    stamp.record(inputs, settings, [out] + ([card_path] if card_path else []),
                 summary={"bytes": result.bytes, "missing": result.missing,
                          "card": wd.relative(card_path) if card_path else None})
    return result


# A work directory may be a project's own folder (--workdir .): prep replaces only files it wrote.
SECOND_NAMES = {REPORT: "report/prep.html", CARD: "DATASET_CARD.md"}
PAGE_MARK = b'<meta name="generator" content="prep '
CARD_MARK = "<!-- written by prep report, which updates this file: delete this line to keep it as it is -->"
OLD_CARD = b"\nlicense: other  # TODO: the license of the source images"  # the front matter of cards before the mark


def _is_card(path: Path) -> bool:
    text = _head(path, 1 << 24)  # a card is far smaller
    return CARD_MARK.encode() in text[-4096:] or (text.startswith(b"---\n") and OLD_CARD in text)


def _free_name(wd: workdir.Workdir, name: str, what: str, written_by_prep) -> Path:
    """Where to write ``name``: there, unless a file prep did not write is there (a project's
    own README.md); then under its second name, saying so."""
    for candidate in (name, SECOND_NAMES[name]):
        path = wd.path(candidate)
        if not (path.exists() or path.is_symlink()) or (path.is_file() and written_by_prep(path)):
            if candidate != name:
                log.warning("%s was not written by prep: left as it is; the %s is %s", wd.path(name), what, path)
            return path
    raise PrepError(f"{wd.path(name)} and {path} were not written by prep: move one of them away for the {what}")


def _head(path: Path, limit: int) -> bytes:
    """The first ``limit`` bytes of a regular file (of anything else, a FIFO say: none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    with open(fd, "rb") as handle:
        return handle.read(limit) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
