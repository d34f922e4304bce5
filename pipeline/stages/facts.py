"""What a work directory holds, read once for the report page and the dataset card.

:func:`gather` reads every stage's output that is there (None where a stage has not run), the
CSVs a row at a time: what the page and the card show of the images is counts, statistics per
class and per size, and a bounded sample (the first images of each class, the first rows of each
listing, the largest groups), so it keeps no row per image, only a few numbers per image in arrays.
:class:`Facts` answers the questions both the page (:mod:`pipeline.stages.report`) and the card
(:mod:`pipeline.stages.card`) ask of them: the class x split table, the settings, the packaged
files, the warnings. Neither renders anything here: each has its own template.
"""

from __future__ import annotations

import datetime as dt
import functools
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__, workdir
from ..errors import PrepError
from ..workdir import SPLIT_NAMES as SPLITS

# split's files, named here as in workdir.STAGE_OUTPUTS: importing pipeline.stages.split for
# their names would cost a report with nothing to do more than all else it does
CONFLICTS = "conflicts.csv"  # pairs of one picture under two labels
NEAR_COPIES = "near_copies.csv"  # each image's closest near copy (other content)

NATURAL = workdir.natural_key
VERIFY_PLOTS = ("training_curves.png", "confusion_matrix.png", "predictions.png")  # verify-train's, in verify/
MAX_ROWS = 200  # rows of a listing (rejected files, duplicate groups) shown before "and N more"
MAX_PAIRS = 50  # near-copy pairs shown side by side before "and N more"
MAX_GROUPS, MAX_GROUP_THUMBS = 5, 12  # the largest groups shown, and images of each


@dataclass
class Head:
    """A CSV's first rows (dicts of the columns read) and how many rows it has."""

    rows: list[dict]
    total: int


@dataclass
class Labels:
    """labels.csv: how many rows, and its groups of identical files (rows sharing a sha256, two
    or more; in the order of their first rows): how many, the copies beyond the first of each,
    and the first MAX_ROWS groups and the first MAX_ROWS of those under more than one label, each
    a list of rows (path, label, sha256)."""

    count: int
    groups: list[list[dict]]
    conflicts: list[list[dict]]
    group_count: int
    conflict_count: int
    extra: int


@dataclass
class Resized:
    """resized.csv's usable images (status ok): how many; the width and height of those with a
    size (arrays, in file order) and the tallies of their formats and modes; the first rows of
    each class (path, label, resized), kept when there is no splits.csv to take samples from."""

    usable: int
    widths: object  # numpy arrays
    heights: object
    formats: Counter
    modes: Counter
    samples: list[dict] = field(default_factory=list)


@dataclass
class Groups:
    """splits.csv's groups (images kept in one split): per split, how many and their images
    (a group is in the split of its first row); the MAX_GROUPS largest, each (images, split, its
    first MAX_GROUP_THUMBS rows)."""

    per_split: dict[str, list[int]]
    largest: list[tuple[int, str, list[dict]]]


@dataclass
class Facts:
    """What the report and the card use of every stage output; None where the stage has not run."""

    wd: workdir.Workdir
    samples: int = 8  # images per class kept for the page's sample grid
    index: dict | None = None
    labels: Labels | None = None
    resized: Resized | None = None
    rejected: Head | None = None
    reject_reasons: Counter = field(default_factory=Counter)  # the text before ":" of each reason
    splits: list[dict] | None = None  # splits.csv's first ``samples`` rows of each class (path, label, resized, split)
    split_counts: Counter | None = None  # (label, split) -> rows of splits.csv
    groups: Groups | None = None
    classes: list[str] | None = None
    class_order: str = "natural"  # how encode numbered the classes (classes.json's "order")
    manifest: dict | None = None
    metrics: dict | None = None
    conflicts: Head | None = None  # split's pairs of one picture under two labels (first MAX_PAIRS)
    near_copies: Head | None = None  # split's near-copy pairs (first MAX_PAIRS)
    # path -> (its row, the CSV it is from) of each image a pair shows: splits.csv's row, else
    # resized.csv's (a usable image left out of the splits)
    shown: dict[str, tuple[dict, str]] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str((self.manifest or {}).get("prep_version") or __version__)

    @property
    def source(self) -> str | None:
        return (self.index or {}).get("raw")

    @property
    def name(self) -> str:
        """The dataset's name: the last part of RAW's path or URL, else the work directory's."""
        return str(self.source or "").rstrip("/").rsplit("/", 1)[-1] or self.wd.root.name

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
        if counts is None and self.split_counts is not None:
            counts = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
            for (label, split), n in self.split_counts.items():
                if split in SPLITS:
                    counts[label][split] += n
        if counts is None:
            return None
        order = self.class_names() or sorted(counts, key=NATURAL)
        return {c: {s: int(counts.get(c, {}).get(s, 0)) for s in SPLITS} for c in order if c in counts}

    def class_names(self) -> list[str] | None:
        """Class names in id order (position = label id)."""
        if self.manifest and isinstance(self.manifest.get("classes"), list):
            return [str(c) for c in self.manifest["classes"]]
        return self.classes

    def class_weights(self) -> dict[str, float]:
        """class -> the weight the manifest gives its examples in training, when it gives them."""
        weights = (self.manifest or {}).get("class_weights")
        if not isinstance(weights, dict):
            return {}
        return {str(c): float(w) for c, w in weights.items() if isinstance(w, (int, float))}

    def warnings(self) -> list[dict]:
        """index.json's warnings, each ``{"kind", "message", ...}``: what to check first."""
        found = (self.index or {}).get("warnings")
        if not isinstance(found, list):
            return []
        return [w for w in found if isinstance(w, dict) and w.get("message")]

    def files(self) -> dict[str, dict]:
        """The manifest's packaged files: relative path -> {format, bytes, sha256}."""
        files = (self.manifest or {}).get("files")
        return files if isinstance(files, dict) else {}

    def formats(self) -> list[str]:
        """The packaged formats, in the manifest's order."""
        listed = ((self.manifest or {}).get("settings") or {}).get("pack", {}).get("formats") or []
        found = dict.fromkeys(str(info.get("format")) for info in self.files().values())
        return [f for f in listed if f in found] + [f for f in found if f not in listed]

    def resized_bytes(self, name: str, where: str) -> bytes | None:
        """The bytes of the resized file ``name`` read from ``where`` (a CSV), None if it is not
        there (or not a regular file), or a one-line PrepError for a name leaving ``resized/``: a
        crafted row cannot read a file elsewhere. Read at the work directory's URL when the
        command's copy leaves ``resized/`` there (:meth:`workdir.Workdir.at`)."""
        from ..sources import is_url, read_below

        folder = self.wd.at(workdir.RESIZED_DIR)
        name = workdir.Confined(None if is_url(folder) else folder, f"{workdir.RESIZED_DIR}/")(name, where, whole=True)
        data = next(read_below(folder, [name]))
        return None if isinstance(data, OSError) else data

    def image_shape(self) -> tuple[int, int, int] | None:
        """(width, height, channels) of the resized images."""
        image = (self.manifest or {}).get("image") or self.settings().get("resize") or {}
        if all(k in image for k in ("width", "height", "channels")):
            return int(image["width"]), int(image["height"]), int(image["channels"])
        return self._first_image_shape

    @functools.cached_property
    def _first_image_shape(self) -> tuple[int, int, int] | None:
        """(width, height, channels) of the first usable resized image whose file is there."""
        if not self.resized or not self.resized.usable:
            return None
        for status, name in workdir.iter_csv(self.wd.path(workdir.RESIZED), ["status", "resized"], ["status"]):
            if status == "ok":
                try:
                    data = self.resized_bytes(name, workdir.RESIZED)
                except PrepError:
                    continue
                if data is not None:
                    import io

                    from PIL import Image

                    with Image.open(io.BytesIO(data)) as img:
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


def sources(wd: workdir.Workdir) -> list[Path]:
    """The files :func:`gather` reads that are there (and the plots the page inlines): what the
    page and the card are made of, with the resized images by the sha256 resized.csv records."""
    names = [workdir.INDEX_META, workdir.LABELS, workdir.RESIZED, workdir.RESIZE_SETTINGS, workdir.REJECTED,
             workdir.SPLITS, workdir.SPLIT_SETTINGS, CONFLICTS, NEAR_COPIES, workdir.CLASSES, workdir.MANIFEST,
             f"{workdir.VERIFY_DIR}/metrics.json", *(f"{workdir.VERIFY_DIR}/{name}" for name in VERIFY_PLOTS)]
    return [path for path in map(wd.path, names) if path.is_file()]


def gather(wd: workdir.Workdir, samples: int = 8) -> Facts:
    """Read whatever the stages have written so far, keeping the first ``samples`` images of each
    class for the sample grid."""
    if not wd.root.is_dir():
        raise PrepError(f"work directory {wd.root} does not exist; run `prep index RAW` first (or pass --workdir)")
    from .split import PAIR_COLUMNS

    facts = Facts(wd, samples)

    def optional(name: str, read):
        path = wd.path(name)
        return read(path) if path.exists() else None

    facts.index = optional(workdir.INDEX_META, workdir.read_json)
    facts.conflicts = optional(CONFLICTS, lambda p: _head(p, PAIR_COLUMNS, MAX_PAIRS))
    facts.near_copies = optional(NEAR_COPIES, lambda p: _head(p, PAIR_COLUMNS, MAX_PAIRS))
    paired = {row[key] for pairs in (facts.conflicts, facts.near_copies) if pairs for row in pairs.rows
              for key in ("path_a", "path_b")}
    facts.labels = optional(workdir.LABELS, _labels)
    has_splits = wd.path(workdir.SPLITS).exists()
    facts.resized = optional(workdir.RESIZED, lambda p: _resized(p, 0 if has_splits else samples, paired, facts.shown))
    facts.rejected = optional(workdir.REJECTED, lambda p: _head(p, ["path", "label", "reason"], MAX_ROWS,
                                                               facts.reject_reasons))
    if has_splits:
        facts.splits, facts.split_counts, facts.groups = _splits(wd.path(workdir.SPLITS), samples, paired, facts.shown)
    classes = optional(workdir.CLASSES, workdir.read_json)
    facts.classes = classes.get("classes") if isinstance(classes, dict) else classes
    if isinstance(classes, dict) and classes.get("order"):
        facts.class_order = str(classes["order"])
    facts.manifest = optional(workdir.MANIFEST, workdir.read_json)
    facts.metrics = optional(f"{workdir.VERIFY_DIR}/metrics.json", workdir.read_json)
    return facts


def _head(path: Path, columns: list[str], limit: int, reasons: Counter | None = None) -> Head:
    """The first ``limit`` rows of a CSV and its number of rows; ``reasons`` counts the text
    before ":" of each row's last column."""
    rows, total = [], 0
    for values in workdir.iter_csv(path, columns):
        if total < limit:
            rows.append(dict(zip(columns, values)))
        if reasons is not None:
            reasons[values[-1].split(":")[0]] += 1
        total += 1
    return Head(rows, total)


def _labels(path: Path) -> Labels:
    """labels.csv's groups of identical files, from a 64-bit hash of each row's sha256 and a
    number for its label (arrays), then the rows of the groups shown, read again. (Two
    different sha256 of a million sharing a hash is a chance in 10^7.)"""
    import numpy as np

    shas, labels, numbers = array("q"), array("q"), {}
    for sha, label in workdir.iter_csv(path, ["sha256", "label"], ["path", "label", "sha256"]):
        shas.append(hash(sha))
        labels.append(numbers.setdefault(label, len(numbers)))
    keys, first, inverse, copies = np.unique(np.frombuffer(shas, np.int64), return_index=True, return_inverse=True,
                                             return_counts=True)
    inverse = inverse.reshape(-1)
    in_group = copies[inverse] > 1
    kinds = np.unique(inverse[in_group] * max(len(numbers), 1) + np.frombuffer(labels, np.int64)[in_group])
    two_labels = np.bincount(kinds // max(len(numbers), 1), minlength=len(keys)) > 1  # per sha256: its labels
    grouped = np.flatnonzero(copies > 1)
    grouped = grouped[np.argsort(first[grouped], kind="stable")]  # in the order of their first rows
    conflicting = grouped[two_labels[grouped]]
    shown = {int(k): [] for k in keys[np.concatenate([grouped[:MAX_ROWS], conflicting[:MAX_ROWS]])]}
    if shown:
        for row in workdir.iter_csv(path, ["path", "label", "sha256"]):
            members = shown.get(hash(row[2]))
            if members is not None:
                members.append({"path": row[0], "label": row[1], "sha256": row[2]})
    return Labels(len(shas), [shown[int(k)] for k in keys[grouped[:MAX_ROWS]]],
                  [shown[int(k)] for k in keys[conflicting[:MAX_ROWS]]], len(grouped), len(conflicting),
                  int((copies[grouped] - 1).sum()))


def _resized(path: Path, samples: int, paired: set[str], shown: dict) -> Resized:
    """resized.csv's usable images: their count, sizes (arrays), formats and modes, the first
    ``samples`` of each class, and the rows of those in ``paired`` (into ``shown``)."""
    import numpy as np

    widths, heights, formats, modes, rows, usable = array("q"), array("q"), Counter(), Counter(), [], 0
    per_class: Counter = Counter()
    columns = ["path", "label", "status", "resized", "width", "height", "format", "mode"]
    rows_read = enumerate(workdir.iter_csv(path, columns, ["path", "status", "width", "height"]), start=2)
    for line, (name, label, status, resized, width, height, kind, mode) in rows_read:
        if status != "ok":
            continue
        usable += 1
        if name in paired:
            shown[name] = ({"path": name, "label": label, "resized": resized}, workdir.RESIZED)
        if per_class[label] < samples:
            per_class[label] += 1
            rows.append({"path": name, "label": label, "resized": resized})
        if width and height:
            try:
                widths.append(int(width))
                heights.append(int(height))
            except ValueError:
                raise PrepError(f"{path} line {line}: width {width!r} and height {height!r}; expected whole numbers"
                                " of pixels") from None
            formats[kind or "?"] += 1
            modes[mode or "?"] += 1
    return Resized(usable, np.frombuffer(widths, np.int64), np.frombuffer(heights, np.int64), formats, modes, rows)


def _splits(path: Path, samples: int, paired: set[str], shown: dict) -> tuple[list[dict], Counter, Groups]:
    """splits.csv's first ``samples`` rows of each class, its (label, split) counts and its
    groups, and the rows of the images in ``paired`` (into ``shown``). Per row in a group, a
    64-bit hash of the group, its position and its split (arrays); the largest groups are found
    from them, and their rows read again."""
    import numpy as np

    columns = ["path", "label", "resized", "split", "group"]
    rows, counts, per_class = [], Counter(), Counter()
    groups, positions, splits = array("q"), array("q"), bytearray()
    code = {split: i for i, split in enumerate(SPLITS)}
    for at, (name, label, resized, split, group) in enumerate(workdir.iter_csv(path, columns, columns[:4])):
        counts[label, split] += 1
        if per_class[label] < samples:
            per_class[label] += 1
            rows.append({"path": name, "label": label, "resized": resized, "split": split})
        if name in paired:
            shown[name] = ({"path": name, "label": label, "resized": resized, "split": split}, workdir.SPLITS)
        if group:
            groups.append(hash(group))
            positions.append(at)
            splits.append(code.get(split, len(SPLITS)))
    _, first, sizes = np.unique(np.frombuffer(groups, np.int64), return_index=True, return_counts=True)
    of_first = np.frombuffer(bytes(splits), np.uint8)[first]
    per_split = {s: [int((of_first == i).sum()), int(sizes[of_first == i].sum())] for i, s in enumerate(SPLITS)}
    if not len(sizes):
        return rows, counts, Groups(per_split, [])
    # the largest groups: of those as large as the MAX_GROUPS-th, the first by natural order of
    # their first image; a second reading finds them and keeps their first rows
    candidates = sizes >= np.sort(sizes)[-min(MAX_GROUPS, len(sizes))]
    starts = np.frombuffer(positions, np.int64)[first[candidates]]
    order = np.argsort(starts)
    starts, candidate_sizes = starts[order].tolist(), sizes[candidates][order].tolist()
    largest: list[list] = []  # [sort key, group, size, split, rows], best first
    members: dict[str, list[dict]] = {}
    next_start = 0
    for at, (name, label, resized, split, group) in enumerate(workdir.iter_csv(path, columns, columns[:4])):
        if not group:
            continue
        if next_start < len(starts) and at == starts[next_start]:
            key = (-candidate_sizes[next_start], NATURAL(name))
            if len(largest) < MAX_GROUPS or key < largest[-1][0]:
                largest.append([key, group, candidate_sizes[next_start], split, []])
                largest.sort(key=lambda entry: entry[0])
                del largest[MAX_GROUPS:]
                members = {entry[1]: entry[4] for entry in largest}
            next_start += 1
        kept = members.get(group)
        if kept is not None and len(kept) < MAX_GROUP_THUMBS:
            kept.append({"path": name, "label": label, "resized": resized, "split": split})
    return rows, counts, Groups(per_split, [(size, split, kept) for _, _, size, split, kept in largest])


def flatten(settings: dict, prefix: str = "") -> list[list[str]]:
    """Nested settings as [dotted.name, readable value] rows."""
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict):
            rows += flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _value(value)])
    return rows


def _value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(_value, value))
    return str(value)


def short(name: str, limit: int = 22) -> str:
    """A class name cut to ``limit`` characters for a plot's labels (tables show it whole)."""
    name = " ".join(str(name).split())
    return name if len(name) <= limit else name[: limit - 1] + "…"


def template(name: str, **filters):
    """A template of ``pipeline/templates``, with ``filters``: HTML ones (``.html.j2``) autoescape
    everything not marked safe; the Markdown card escapes through its own filters."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters.update(filters)
    return env.get_template(name)
