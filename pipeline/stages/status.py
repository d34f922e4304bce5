"""`prep status`: for each stage, up to date, stale or missing, and why.

Each stage is judged from what it recorded: index against the RAW folder (listing and the hash
cache's sizes and versions), resize against labels.csv and the resize settings, the later
stages through their stamps (:class:`pipeline.workdir.Stamp`) against their inputs and the
settings in force now.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import sources, workdir
from ..errors import PrepError
from ..spec import ResizeSpec


@dataclass
class StatusConfig:
    workdir: workdir.Workdir
    spec: ResizeSpec = field(default_factory=ResizeSpec)
    split: dict = field(default_factory=lambda: {"ratios": [0.7, 0.2, 0.1], "seed": 42, "drop_small": False})
    # command -> option -> where its value now comes from ("defaults", "prep.toml", ...)
    origins: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class StageStatus:
    stage: str
    state: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class StatusResult:
    stages: list[StageStatus]

    @property
    def summary(self) -> str:
        width = max(len(s.stage) for s in self.stages)
        lines = []
        for s in self.stages:
            why = f"  ({'; '.join(s.reasons[:4])}{'; ...' if len(s.reasons) > 4 else ''})" if s.reasons else ""
            lines.append(f"{s.stage:<{width}}  {s.state}{why}")
        return "\n".join(lines)


def _judge(stage: str, present: bool, reasons: list[str], missing_hint: str) -> StageStatus:
    if not present:
        return StageStatus(stage, "missing", [missing_hint])
    return StageStatus(stage, "stale" if reasons else "up to date", reasons)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def index_status(wd: workdir.Workdir) -> StageStatus:
    meta_path = wd.path(workdir.INDEX_META)
    if not meta_path.exists():
        return StageStatus("index", "missing", ["run `prep index RAW`"])
    meta = workdir.read_json(meta_path)
    try:
        labels = wd.labels()
    except PrepError:
        return StageStatus("index", "missing", ["labels.csv is missing; run `prep index RAW`"])
    if not isinstance(meta, dict) or not isinstance(meta.get("raw"), str):
        return StageStatus("index", "stale", [f"{workdir.INDEX_META} records no RAW folder; run `prep index RAW`"])
    root = meta["raw"]
    if not sources.exists(root):
        return StageStatus("index", "stale", [f"RAW {root} not found"])
    follow, outside = meta.get("follow_links") is True, meta.get("allow_outside_links") is True
    listing = sources.list_files(root, follow_links=follow, outside_links=follow and outside)
    indexed = {r["path"] for r in workdir.read_csv(labels, ["path"])}
    found = set(listing.files)
    if meta.get("labels_from", "folder") == "folder":
        found = {rel for rel in found if "/" in rel}
    cache = workdir.hash_cache(wd, root)
    changed = sum(
        1
        for rel in found & indexed
        if rel in cache and list(listing.versions.get(rel, ()))[:2] != cache[rel][:2]
    )
    reasons = []
    if found - indexed:
        reasons.append(f"{_count(len(found - indexed), 'new image')} in RAW")
    if indexed - found:
        reasons.append(f"{_count(len(indexed - found), 'image')} gone from RAW")
    if changed:
        reasons.append(f"{_count(changed, 'image')} changed in RAW")
    return _judge("index", True, reasons, "")


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def setting_changes(recorded: dict, wanted: dict, origins: dict[str, str]) -> list[str]:
    """``size 48 when run; 32 now, from defaults`` for each option whose value differs: the
    value the stage ran with, the one its next plain run would use, and where that comes from."""
    changes = []
    for key in sorted(recorded.keys() | wanted.keys()):
        old, new = recorded.get(key), wanted.get(key)
        if old != new:
            option = key.replace("_", "-")
            was = f"{_shown(old)} when run" if key in recorded else "not recorded"
            changes.append(f"{option} {was}; {_shown(new)} now, from {origins.get(key, 'defaults')}")
    return changes


def _as_options(spec: dict) -> dict:
    """The resize settings as its options: width and height as one size (``32``, ``64x48``)."""
    options = {k: v for k, v in spec.items() if k not in ("width", "height")}
    if "width" in spec or "height" in spec:
        width, height = spec.get("width"), spec.get("height")
        options["size"] = f"{width}" if width == height else f"{width}x{height}"
    return options


def resize_status(wd: workdir.Workdir, spec: ResizeSpec, origins: dict[str, str] | None = None) -> StageStatus:
    from .resize import JOURNAL, PENDING, check_outputs, journal_entries

    table = wd.path(workdir.RESIZED)
    # images an interrupted run finished; None when no run was interrupted
    journaled = len({e["path"] for e in journal_entries(wd) if PENDING not in e}) if wd.path(JOURNAL).exists() else None
    interrupted = f"interrupted after {_count(journaled or 0, 'image')}; run `prep resize` to finish"
    if not table.exists():
        return StageStatus("resize", "missing", [interrupted if journaled is not None else "run `prep resize`"])
    reasons = [interrupted] if journaled is not None else []
    try:
        labels = {r["path"]: r["sha256"] for r in workdir.read_csv(wd.labels(), ["path", "sha256"])}
    except PrepError:
        labels = {}
    done = {r["path"]: r for r in workdir.read_csv(table, ["path", "sha256", "status", "resized"])}
    stale = sum(1 for p, sha in labels.items() if p not in done or done[p]["sha256"] != sha)
    if stale:
        reasons.append(f"{_count(stale, 'image')} in labels.csv new or changed")
    if done.keys() - labels.keys():
        reasons.append(f"{_count(len(done.keys() - labels.keys()), 'image')} no longer in labels.csv")
    settings_path = wd.path(workdir.RESIZE_SETTINGS)
    recorded = workdir.read_json(settings_path) if settings_path.exists() else {}
    wanted = json_like(dataclasses.asdict(spec))
    recorded = {k: v for k, v in recorded.items() if k in wanted} if isinstance(recorded, dict) else {}
    reasons.extend(setting_changes(_as_options(recorded), _as_options(wanted), origins or {}))
    intact = check_outputs(wd, list(done.values()))[0]
    changed = [r["resized"] for r in done.values() if r["status"] == "ok" and r["resized"] not in intact]
    if changed:
        example = changed[0] if len(changed) == 1 else f"{changed[0]}, ..."
        reasons.append(f"{_count(len(changed), 'resized file')} missing or changed since `prep resize` ({example})")
    return _judge("resize", True, reasons, "")


def json_like(value):
    """Tuples as lists, as they come back from JSON."""
    if isinstance(value, dict):
        return {k: json_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_like(v) for v in value]
    return value


def stamped_status(wd: workdir.Workdir, stage: str, stamp: str, inputs: list[Path], settings, output: Path,
                   hint: str, origins: dict[str, str] | None = None) -> StageStatus:
    if not output.exists():
        return StageStatus(stage, "missing", [hint])
    missing_inputs = [p for p in inputs if not p.exists()]
    if missing_inputs:
        return StageStatus(stage, "stale", [f"input {p.name} is missing" for p in missing_inputs])
    stamped = workdir.Stamp(wd, stamp)
    reasons = stamped.explain(inputs, None if isinstance(settings, dict) else settings)
    if isinstance(settings, dict) and reasons != ["never run here"]:
        try:
            recorded = workdir.read_json(stamped.path).get("settings")
        except (PrepError, AttributeError):
            recorded = None
        if isinstance(recorded, dict):
            reasons.extend(setting_changes(recorded, json.loads(json.dumps(settings, default=str)), origins or {}))
        else:
            reasons.append("settings changed")
    return _judge(stage, True, reasons, hint)


def pack_status(wd: workdir.Workdir) -> StageStatus:
    from . import pack

    manifest_path = wd.path(workdir.MANIFEST)
    if not manifest_path.exists():
        return StageStatus("pack", "missing", ["run `prep pack`"])
    encoded = wd.path(workdir.ENCODED)
    if not encoded.exists():
        return StageStatus("pack", "stale", ["input encoded.csv is missing"])
    listed = workdir.read_json(manifest_path).get("settings", {}).get("pack", {})
    inputs = pack.inputs_of(wd, encoded)
    reasons = []
    for name in listed.get("formats", []):
        for why in workdir.Stamp(wd, f"pack-{name}").explain(inputs, pack.stamp_settings(listed[name], name)):
            reasons.append(f"{name}: {why}")
    return _judge("pack", True, reasons, "")


def train_status(wd: workdir.Workdir) -> StageStatus:
    from ..formats import FORMATS
    from .train import STAMP, packaged_files

    metrics = wd.path(workdir.VERIFY_DIR) / "metrics.json"
    if not metrics.exists():
        return StageStatus("verify-train", "missing", ["run `prep verify-train`"])
    fmt = workdir.read_json(metrics).get("format")
    packed = wd.path(FORMATS[fmt].OUTPUT) if fmt in FORMATS else None
    if packed is None or not packed.exists():
        return StageStatus("verify-train", "stale", [f"its {fmt} data is gone"])
    # the data it trained on and the outputs it wrote (its options are not known here)
    return _judge("verify-train", True, workdir.Stamp(wd, STAMP).explain(packaged_files(packed), None), "")


def run(cfg: StatusConfig) -> StatusResult:
    wd = cfg.workdir
    if not wd.root.is_dir():
        raise PrepError(f"work directory {wd.root} does not exist; run `prep index RAW` first")
    labels = wd.labels() if wd.path(workdir.INDEX_META).exists() else wd.path(workdir.LABELS)
    with_labels = [labels] + ([wd.path(workdir.RESIZED)] if wd.path(workdir.RESIZED).exists() else [])
    splits = wd.path(workdir.SPLITS)
    stages = [
        index_status(wd),
        resize_status(wd, cfg.spec, cfg.origins.get("resize")),
        stamped_status(wd, "split", "split", with_labels, cfg.split, splits, "run `prep split`",
                       cfg.origins.get("split")),
        stamped_status(wd, "encode", "encode", [splits], None, wd.path(workdir.ENCODED),
                       "run `prep encode`"),
        pack_status(wd),
        train_status(wd),
    ]
    # a stage is only as current as the stages before it: their next run changes its inputs
    first = next((i for i, s in enumerate(stages) if s.state != "up to date"), len(stages))
    for s in stages[first + 1 :]:
        if s.state == "up to date":  # its inputs may change when the earlier stage runs
            s.state, s.reasons = "stale", [f"waits on {stages[first].stage}, which is {stages[first].state}"]
    return StatusResult(stages)
