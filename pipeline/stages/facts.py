"""What a work directory holds, read once for the report page and the dataset card.

:func:`gather` reads every stage's output that is there (None where a stage has not run);
:class:`Facts` answers the questions both the page (:mod:`pipeline.stages.report`) and the
card (:mod:`pipeline.stages.card`) ask of them: the class x split table, the settings, the
packaged files, the warnings. Neither renders anything here: each has its own template.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, workdir
from ..errors import PrepError
from ..formats import SPLITS
from .split import CONFLICTS, NEAR_COPIES, PAIR_COLUMNS

NATURAL = workdir.natural_key
VERIFY_PLOTS = ("training_curves.png", "confusion_matrix.png", "predictions.png")  # verify-train's, in verify/


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
    class_order: str = "natural"  # how encode numbered the classes (classes.json's "order")
    manifest: dict | None = None
    metrics: dict | None = None
    conflicts: list[dict] | None = None  # split's pairs of one picture under two labels
    near_copies: list[dict] | None = None  # split's near-copy pairs

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

    def resized_file(self, name: str, where: str) -> Path:
        """The file of a resized name read from ``where`` (a CSV), below ``resized/``, or a
        one-line PrepError: a crafted row cannot name a file elsewhere."""
        folder = self.wd.path(workdir.RESIZED_DIR)
        return folder / workdir.Confined(folder, f"{workdir.RESIZED_DIR}/")(name, where, whole=True)

    def image_shape(self) -> tuple[int, int, int] | None:
        """(width, height, channels) of the resized images."""
        image = (self.manifest or {}).get("image") or self.settings().get("resize") or {}
        if all(k in image for k in ("width", "height", "channels")):
            return int(image["width"]), int(image["height"]), int(image["channels"])
        for row in self.resized or ():
            if row.get("status") == "ok":
                try:
                    path = self.resized_file(row["resized"], workdir.RESIZED)
                except PrepError:
                    continue
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


def sources(wd: workdir.Workdir) -> list[Path]:
    """The files :func:`gather` reads that are there (and the plots the page inlines): what the
    page and the card are made of, with the resized images by the sha256 resized.csv records."""
    names = [workdir.INDEX_META, workdir.LABELS, workdir.RESIZED, workdir.RESIZE_SETTINGS, workdir.REJECTED,
             workdir.SPLITS, workdir.SPLIT_SETTINGS, CONFLICTS, NEAR_COPIES, workdir.CLASSES, workdir.MANIFEST,
             f"{workdir.VERIFY_DIR}/metrics.json", *(f"{workdir.VERIFY_DIR}/{name}" for name in VERIFY_PLOTS)]
    return [path for path in map(wd.path, names) if path.is_file()]


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
    if isinstance(classes, dict) and classes.get("order"):
        facts.class_order = str(classes["order"])
    facts.manifest = optional(workdir.MANIFEST, workdir.read_json)
    facts.metrics = optional(f"{workdir.VERIFY_DIR}/metrics.json", workdir.read_json)
    facts.conflicts = optional(CONFLICTS, lambda p: workdir.read_csv(p, PAIR_COLUMNS))
    facts.near_copies = optional(NEAR_COPIES, lambda p: workdir.read_csv(p, PAIR_COLUMNS))
    return facts


def duplicate_groups(labels: list[dict]) -> list[list[dict]]:
    """Rows of labels.csv sharing a sha256, in file order; only groups of two or more."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in labels:
        groups[row["sha256"]].append(row)
    return [g for g in groups.values() if len(g) > 1]


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
