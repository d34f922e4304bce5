"""`prep encode`: one label -> id map for the whole dataset, ``classes.json`` and ``encoded.csv``.

One map is fitted on the classes of all splits together (never per split, which would shift
ids when a split lacks a class). Ids follow the natural order of the class names (``img2``
before ``img10``) or, with ``--class-order alphabetical``, Python's ``sorted()`` (``img10``
before ``img2``), the order torchvision's ImageFolder and Keras give class folders;
``--classes FILE`` pins an existing map so new data keeps old ids. classes.json records the
order (``natural``, ``alphabetical`` or ``pinned``).
scikit-learn's LabelEncoder is not used: it always sorts classes lexicographically, and
importing scikit-learn would cost more than the whole stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .. import workdir
from ..errors import PrepError
from .split import SPLIT_COLUMNS, path_checks

ENCODED_COLUMNS = SPLIT_COLUMNS + ["label_id"]
CLASS_ORDERS = {"natural": workdir.natural_key, "alphabetical": None}  # name -> sort key (None: sorted())


@dataclass
class EncodeConfig:
    workdir: workdir.Workdir
    splits: Path
    classes_out: Path
    out: Path
    pinned: Path | None = None
    class_order: str = "natural"


@dataclass
class EncodeResult:
    classes: list[str]
    out: Path
    up_to_date: bool = False

    @property
    def summary(self) -> str:
        head = ", ".join(f"{i}={c}" for i, c in enumerate(self.classes[:10]))
        more = ", ..." if len(self.classes) > 10 else ""
        return f"{'Up to date: e' if self.up_to_date else 'E'}ncoded {len(self.classes)} classes: {head}{more}"


def read_classes(path: Path) -> list[str]:
    """The class list of a classes.json (``{"classes": [...]}`` or a bare list)."""
    data = workdir.read_json(path)
    classes = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise PrepError(f"{path}: expected {{\"classes\": [\"name\", ...]}}")
    if len(set(classes)) != len(classes):
        raise PrepError(f"{path}: class names repeat")
    return classes


def read_labels(wd: workdir.Workdir, splits: Path) -> dict[str, None]:
    """The labels of splits.csv (in the order they first appear), its rows read a line at a time
    and their paths checked; a fault in the CSV itself is reported before a path out of place,
    wherever it is."""
    labels: dict[str, None] = {}
    check, problem = path_checks(wd, splits), None
    for line, (path, label, _, resized, *_) in enumerate(workdir.iter_csv(splits, SPLIT_COLUMNS), start=2):
        labels[label] = None
        if problem is None:
            try:
                check(line, path, resized)
            except PrepError as err:
                problem = err
    if not labels:
        raise PrepError(f"{splits} has no rows; run `prep split` first")
    if problem is not None:
        raise problem
    return labels


def encoded_rows(splits: Path, ids: dict[str, int]) -> Iterator[tuple]:
    """The rows of encoded.csv: those of splits.csv, read again, with their label's id."""
    for row in workdir.iter_csv(splits, SPLIT_COLUMNS):
        if row[1] not in ids:
            raise PrepError(f"{splits} changed while encode read it; run `prep encode` again")
        yield *row, ids[row[1]]


def run(cfg: EncodeConfig) -> EncodeResult:
    if cfg.class_order not in CLASS_ORDERS:
        raise PrepError(f"--class-order must be one of {', '.join(CLASS_ORDERS)}; received {cfg.class_order!r}")
    stamp = workdir.Stamp(cfg.workdir, "encode")
    inputs = [cfg.splits] + ([cfg.pinned] if cfg.pinned else [])
    settings = {"pinned": str(cfg.pinned) if cfg.pinned else None, "class_order": cfg.class_order}
    if stamp.is_current(inputs, settings) and cfg.out.exists() and cfg.classes_out.exists():
        return EncodeResult(read_classes(cfg.classes_out), cfg.out, up_to_date=True)

    present = sorted(read_labels(cfg.workdir, cfg.splits), key=CLASS_ORDERS[cfg.class_order])
    if cfg.pinned:
        classes = read_classes(cfg.pinned)
        unknown = [c for c in present if c not in set(classes)]
        if unknown:
            raise PrepError(
                f"class {unknown[0]!r} is not in the pinned map {cfg.pinned}"
                f" ({len(unknown)} unknown: {', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''})"
            )
    else:
        classes = present

    ids = {name: i for i, name in enumerate(classes)}

    order = "pinned" if cfg.pinned else cfg.class_order
    workdir.write_json(cfg.classes_out, {"classes": classes, "order": order})
    workdir.write_csv_rows(cfg.out, ENCODED_COLUMNS, encoded_rows(cfg.splits, ids))
    stamp.record(inputs, settings, [cfg.out, cfg.classes_out])
    return EncodeResult(classes, cfg.out)
