"""Side-by-side benchmark: prep against the ways people build a 32x32 dataset without it.

    python bench/run.py                  # 10 classes x 2,000 JPEG photos (about 20k files)
    python bench/run.py --per-class 20   # smoke run: completes in well under a minute
    python bench/run.py --large          # pack 100k small images into h5 and tfrecord
    python bench/run.py --near-copies    # the near-copy search to 1M hashes; prep split on 100k
    python bench/run.py --mirror         # a work directory on a bucket: the client's memory per object

Every row runs as its own process (or, for prep, one process per command, as a user types
them) and is timed end to end, start-up and imports included. Peak memory is sampled from the
whole process tree: the sum of the proportional set size (PSS) of the process and all its
descendants, which counts the pages forked workers share once (every 0.5 s and whenever the
RSS has grown by a tenth, as reading it costs the kernel a page-table walk), and the sum of their
RSS, which counts them once per process (an upper bound; every 50 ms). The kernel's ``ru_maxrss`` (the largest
single process, from ``wait4``) is kept in the JSON as a cross-check; on Linux it never reads
below the launcher's own RSS at fork time, so small processes are overstated there. Results
are printed as a table and merged into ``bench/results.json``. See bench/README.md for what
each row means.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package
import corpus

WORK = HERE / "work"
RESULTS = HERE / "results.json"
TRASH = WORK / "trash"
PYTHON = sys.executable
PREP = str(Path(sys.executable).with_name("prep"))
SAMPLE_SECONDS = 0.05
# PSS comes from smaps_rollup, for which the kernel walks each process's page tables: ~1.4 ms
# per prep process, which at every sample took 12% of a core from the two the rows share
PSS_EVERY = 10  # samples: every 0.5 s, and whenever the tree's RSS has grown by PSS_GROWTH
PSS_GROWTH = 1.1
PAGE = os.sysconf("SC_PAGE_SIZE")
NOISY = 0.10  # share of the machine other processes may use before a timing is flagged
MB = 1024 * 1024

TARGETS = {
    "d/a": (">=", 4.0),
    "d/b": (">=", 1.5),
    "d/c": (">=", 0.6),
    "resize/c": (">=", 0.8),
    "e/d": ("<=", 0.10),
    "prep --help seconds": ("<", 0.5),
    "dask 2 workers / 1 worker": (">=", 1.7),
    "dask overhead vs local": ("<=", 0.15),
}
LARGE_RSS_TARGET_MB = 500


@dataclass
class Run:
    """One process tree, run to completion: wall and CPU time, peak memory."""

    cmd: list[str]
    seconds: float
    returncode: int
    cpu_seconds: float  # user + system of the tree (waited-for descendants included)
    foreign_cpu: float  # share of the machine other processes used meanwhile (0..1): noise
    peak_pss_mb: float  # max over time of the sum of PSS over the tree
    peak_rss_mb: float  # the same with RSS (counts shared pages once per process)
    ru_maxrss_mb: float  # the largest single process of the tree, floored at the launcher's RSS
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (psutil's children() reads every process: 2 ms).
    Every thread's list: Dask starts its worker processes from a thread of the client."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += handle.read().split()
    except OSError:  # exited (or a thread ended meanwhile): what was read so far
        pass
    return [pid] + [p for child in dict.fromkeys(children) for p in _tree(int(child))]


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_full_info().pss
    except psutil.Error:
        return 0


def _busy(times) -> float:
    return times.user + times.nice + times.system + times.irq + times.softirq + times.steal


def measure(cmd: list[str], log: Path, env: dict | None = None) -> Run:
    """Run ``cmd`` with output to ``log``; sample the tree's memory until it exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    exited = threading.Event()
    waited: list = []

    def wait(pid: int) -> None:
        # wait4 rather than Popen.wait: it also returns the tree's resource usage
        waited.append(os.wait4(pid, 0))
        waited.append(time.perf_counter())
        exited.set()

    with open(log, "wb") as out:
        machine_before, self_before = _busy(psutil.cpu_times()), sum(os.times()[:2])
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        threading.Thread(target=wait, args=(proc.pid,), daemon=True).start()
        peak_pss = peak_rss = 0
        samples = 0
        rss_at_pss = 0  # the tree's RSS when PSS was last read
        while not exited.is_set():
            tree = _tree(proc.pid)
            rss = sum(_rss(pid) for pid in tree)
            peak_rss = max(peak_rss, rss)
            if samples % PSS_EVERY == 0 or rss > rss_at_pss * PSS_GROWTH:  # and whenever RSS grew
                peak_pss, rss_at_pss = max(peak_pss, sum(_pss(pid) for pid in tree)), rss
            samples += 1
            exited.wait(SAMPLE_SECONDS)
    (_, status, usage), ended = waited
    seconds = ended - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    own = cpu + sum(os.times()[:2]) - self_before
    foreign = (_busy(psutil.cpu_times()) - machine_before - own) / (seconds * corpus.cpu_count())
    return Run(cmd, seconds, proc.returncode, cpu, max(0.0, foreign), peak_pss / MB, peak_rss / MB,
               usage.ru_maxrss / 1024, str(log))


def env_quiet() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


# -- steps ----------------------------------------------------------------------------------


def time_help(repeat: int = 5) -> dict:
    """Wall time of `prep --help` (the first call may pay for a cold disk cache)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([PREP, "--help"], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "runs": times}


def has_pack() -> bool:
    return subprocess.run([PREP, "pack", "--help"], check=False, capture_output=True).returncode == 0


def read_corpus_once(folder: Path) -> None:
    """Read every file once so that no row pays for a cold page cache alone."""
    for path in corpus.images(folder):
        path.read_bytes()


def set_aside(*folders: Path) -> None:
    """Move earlier outputs out of the way, to be deleted after the timings (:func:`empty_trash`).

    Not deleted here: on ext4 without a journal the kernel avoids reusing the inodes of files
    deleted in the last few minutes and checks each one on every file it creates, so after a
    large delete every file created costs several times the usual system time, which would be
    charged to the prep rows that write thousands of files (see README.md)."""
    TRASH.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if folder.exists():
            folder.rename(TRASH / f"{folder.name}-{time.time_ns()}")


def empty_trash() -> None:
    shutil.rmtree(TRASH, ignore_errors=True)


def dask_available() -> bool:
    return subprocess.run([PYTHON, "-c", "import distributed"], check=False, capture_output=True).returncode == 0


DASK_VARIANTS = (  # (key, label, executor options)
    ("local", "prep resize, local, 2 processes", ["--executor", "local", "--workers", "2"]),
    ("dask1", "prep resize, dask LocalCluster, 1 worker", ["--executor", "dask", "--workers", "1"]),
    ("dask2", "prep resize, dask LocalCluster, 2 workers", ["--executor", "dask", "--workers", "2"]),
)


def run_resize_variant(key: str, label: str, options: list[str], workdir: Path, raw: Path, n: int) -> Row:
    """`prep index` (not timed), then `prep resize` with ``options`` (timed) in a new work directory."""
    index = [PREP, "--workdir", str(workdir), "index", str(raw)]
    done = subprocess.run(index, check=False, capture_output=True)
    if done.returncode:
        raise SystemExit(f"`{' '.join(index)}` failed (exit {done.returncode}):\n{done.stderr.decode()[-500:]}")
    cmd = [PREP, "--workdir", str(workdir), "resize", *options]
    run = require_ok(measure(cmd, WORK / "logs" / f"{key}-resize.log"))
    return Row(key, label, n, run.seconds, run.cpu_seconds, run.foreign_cpu,
               run.peak_pss_mb, run.peak_rss_mb, run.ru_maxrss_mb)


def same_outputs(first: Path, second: Path) -> bool:
    """The resized images and resized.csv of two work directories are byte-identical."""
    def files(root: Path) -> dict[str, bytes]:
        out = {str(p.relative_to(root)): p.read_bytes() for p in (root / "resized").rglob("*") if p.is_file()}
        out["resized.csv"] = (root / "resized.csv").read_bytes()
        return out

    return files(first) == files(second)


def require_ok(run: Run) -> Run:
    """``run``, or stop the benchmark with the last lines of its log."""
    if not run.ok:
        tail = "\n".join(Path(run.log).read_text().splitlines()[-5:])
        raise SystemExit(f"`{' '.join(run.cmd)}` failed (exit {run.returncode}):\n{tail}")
    return run


def prep_commands(workdir: Path, raw: Path, pack: bool) -> list[tuple[str, list[str]]]:
    base = [PREP, "--workdir", str(workdir)]
    steps = [
        ("index", base + ["index", str(raw)]),
        ("resize", base + ["resize"]),
        ("split", base + ["split"]),
        ("encode", base + ["encode"]),
    ]
    if pack:
        steps.append(("pack", base + ["pack", "--format", "pkl.gz"]))
    return steps


@dataclass
class Row:
    key: str
    name: str
    images: int
    seconds: float
    cpu_seconds: float
    foreign_cpu: float
    peak_pss_mb: float
    peak_rss_mb: float
    ru_maxrss_mb: float
    steps: dict = field(default_factory=dict)
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_baseline(key: str, name: str, label: str, raw: Path, n: int) -> Row:
    out = WORK / f"{name}.pkl.gz"
    run = measure([PYTHON, str(HERE / "baselines.py"), name, str(raw), str(out)], WORK / "logs" / f"{name}.log",
                  env_quiet())
    if not run.ok:
        raise SystemExit(f"{label} failed (exit {run.returncode}); see {run.log}")
    produced = json.loads(Path(run.log).read_text().strip().splitlines()[-1])["images"]
    if produced != n:
        raise SystemExit(f"{label} produced {produced} images; expected {n}")
    if out.exists():
        check_pickle(out, n, label)
    return Row(key, label, n, run.seconds, run.cpu_seconds, run.foreign_cpu, run.peak_pss_mb, run.peak_rss_mb,
               run.ru_maxrss_mb)


def check_pickle(path: Path, n: int, label: str) -> None:
    """The file holds (x, y) with x of shape (n, 32, 32, 3), uint8, and n labels."""
    with gzip.open(path, "rb") as f:
        x, y = pickle.load(f)
    if x.shape != (n, 32, 32, 3) or str(x.dtype) != "uint8" or len(y) != n:
        raise SystemExit(f"{label} wrote x {x.shape} {x.dtype}, {len(y)} labels; expected ({n}, 32, 32, 3) uint8")


def run_prep(key: str, label: str, workdir: Path, raw: Path, n: int, pack: bool, note: str = "") -> Row:
    steps = {}
    for step, cmd in prep_commands(workdir, raw, pack):
        run = require_ok(measure(cmd, WORK / "logs" / f"{key}-{step.replace(' ', '-')}.log"))
        steps[step] = {"seconds": run.seconds, "images_per_s": n / run.seconds, "cpu_seconds": run.cpu_seconds,
                       "foreign_cpu": run.foreign_cpu, "peak_pss_mb": run.peak_pss_mb,
                       "peak_rss_mb": run.peak_rss_mb, "ru_maxrss_mb": run.ru_maxrss_mb}
    seconds = sum(s["seconds"] for s in steps.values())
    peak = {k: max(s[k] for s in steps.values()) for k in ("peak_pss_mb", "peak_rss_mb", "ru_maxrss_mb")}
    return Row(key, label, n, seconds, sum(s["cpu_seconds"] for s in steps.values()),
               sum(s["foreign_cpu"] * s["seconds"] for s in steps.values()) / seconds, **peak, steps=steps, note=note)


def check_prep_output(workdir: Path, n: int) -> str:
    """What `prep pack --format pkl.gz` wrote, loaded the documented way (mnist.pkl.gz layout)."""
    path = workdir / "dataset.pkl.gz"
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f)
    shapes = [(x.shape, str(x.dtype), y.shape) for x, y in splits]
    if sum(len(x) for x, _ in splits) != n or any(
        x.shape[1:] != (32, 32, 3) or str(x.dtype) != "uint8" or len(y) != len(x) for x, y in splits
    ):
        raise SystemExit(f"{path} holds {shapes}; expected {n} images of 32x32x3 uint8 with labels")
    names = ("train", "valid", "test")
    return f"{path.name}: " + ", ".join(f"{name} {x.shape} {x.dtype}" for name, (x, _) in zip(names, splits))


# -- report ---------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    """Rows and prep's per-command lines; ``!`` marks a timing taken while other processes used
    more than a tenth of the machine."""

    def line(key, name, images, seconds, rate, cpu, foreign, pss, rss):
        flag = "!" if foreign > NOISY else " "
        return (f"{key:<7}{name:<44}{images:>7}{seconds:>9.2f}{flag}{rate:>8.0f}{cpu:>8.1f}"
                f"{pss:>10.0f}{rss:>10.0f}")

    lines = [f"{'':7}{'row':<44}{'images':>7}{'seconds':>10}{'img/s':>8}{'CPU s':>8}{'PSS MB':>10}{'RSS MB':>10}"]
    for r in rows:
        lines.append(line(r.key + ")", r.name, str(r.images), r.seconds, r.rate, r.cpu_seconds, r.foreign_cpu,
                          r.peak_pss_mb, r.peak_rss_mb))
        for step, s in r.steps.items():
            lines.append(line("", f"  prep {step}", "", s["seconds"], s["images_per_s"], s["cpu_seconds"],
                              s["foreign_cpu"], s["peak_pss_mb"], s["peak_rss_mb"]))
        if r.note:
            lines.append(f"{'':9}({r.note})")
    return "\n".join(lines)


def verdicts(values: dict[str, float]) -> dict[str, dict]:
    out = {}
    for name, (op, bound) in TARGETS.items():
        if name not in values:
            continue
        value = values[name]
        met = {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]
        out[name] = {"value": value, "target": f"{op} {bound}", "met": met}
    return out


def save(section: str, data: dict) -> None:
    results = {}
    if RESULTS.exists():
        try:
            results = json.loads(RESULTS.read_text())
        except json.JSONDecodeError:
            results = {}
    results[section] = data
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, RESULTS)


def machine() -> dict:
    import numpy
    import PIL

    return {
        "cpus": corpus.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pillow": PIL.__version__,
        "numpy": numpy.__version__,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average_at_end": os.getloadavg(),
    }


# -- the two modes --------------------------------------------------------------------------


def warn_if_busy() -> None:
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before the start; timings will be noisy")


def main_benchmark(args) -> int:
    warn_if_busy()
    started, steal_before = time.perf_counter(), psutil.cpu_times().steal
    help_times = time_help()
    print(f"prep --help: {help_times['median']:.3f} s median of {len(help_times['runs'])}"
          f" (min {help_times['min']:.3f} s)")
    raw = corpus.ensure("photos", args.per_class, args.seed)
    n = len(corpus.images(raw))
    read_corpus_once(raw)
    pack = has_pack()
    if not pack:
        print("prep pack is not available: rows d and e run the first four commands only")
    skip = set(args.skip)
    print(f"corpus: {raw} ({n:,} JPEG files)")

    workdir = WORK / "prep"
    note = "" if pack else "without pack: prep pack is not available"
    dask = "dask" not in skip and dask_available()
    if "dask" not in skip and not dask:
        print("dask rows skipped: `distributed` is not installed (pip install 'prep[dask]')")
    dask_dirs = {key: WORK / f"resize-{key}" for key, _, _ in DASK_VARIANTS}
    best: dict[str, Row] = {}
    for round_ in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"round {round_} of {args.repeat}")
        set_aside(workdir, *dask_dirs.values())
        measured = []
        if "a" not in skip:
            print("a) original workflow ...", flush=True)
            measured.append(run_baseline("a", "original", "original: Image.open().resize, 1 process", raw, n))
        if "b" not in skip:
            print("b) keras image_dataset_from_directory ...", flush=True)
            measured.append(run_baseline("b", "keras", "keras image_dataset_from_directory", raw, n))
        if "c" not in skip:
            print("c) decode-only reference ...", flush=True)
            measured.append(run_baseline("c", "decode", f"decode only, draft, {corpus.cpu_count()} processes", raw, n))
        print("d) prep, cold work directory ...", flush=True)
        measured.append(run_prep("d", "prep, 5 commands, cold", workdir, raw, n, pack, note))
        print("e) prep, warm rerun ...", flush=True)
        measured.append(run_prep("e", "prep, same 5 commands again (warm)", workdir, raw, n, pack, note))
        if dask:
            for key, label, options in DASK_VARIANTS:
                print(f"{key}) {label} ...", flush=True)
                measured.append(run_resize_variant(key, label, options, dask_dirs[key], raw, n))
        for row in measured:  # the fastest round of each row: noise only ever slows a run down
            if row.key not in best or row.seconds < best[row.key].seconds:
                best[row.key] = row
    rows = list(best.values())
    described = check_prep_output(workdir, n) if pack else "not packed"

    by = {r.key: r for r in rows}
    ratios = {}
    d = by["d"]
    for other in ("a", "b", "c"):
        if other in by:
            ratios[f"d/{other}"] = d.rate / by[other].rate
    if "c" in by:
        ratios["resize/c"] = d.steps["resize"]["images_per_s"] / by["c"].rate
    ratios["e/d"] = by["e"].seconds / d.seconds
    if dask:
        ratios["dask 2 workers / 1 worker"] = by["dask2"].rate / by["dask1"].rate
        ratios["dask overhead vs local"] = by["dask2"].seconds / by["local"].seconds - 1
        if not same_outputs(dask_dirs["local"], dask_dirs["dask2"]):
            raise SystemExit("prep resize wrote different outputs with --executor dask and --executor local")
    checks = verdicts({**ratios, "prep --help seconds": help_times["median"]})

    print()
    print(table(rows))
    if any(r.foreign_cpu > NOISY or any(st["foreign_cpu"] > NOISY for st in r.steps.values()) for r in rows):
        print(f"! other processes used more than {NOISY:.0%} of the machine during that timing: rerun when idle")
    print()
    print("ratios (throughput, except e/d = warm seconds / cold seconds, and the dask overhead ="
          " dask seconds / local seconds - 1):")
    for name, check in checks.items():
        verdict = "met" if check["met"] else "NOT MET"
        print(f"  {name:<28}{check['value']:>8.3f}   target {check['target']:<8} {verdict}")
    if not pack:
        print("  (prep pack missing: d and e leave out the pack step, so their ratios flatter prep)")
    print(f"prep output: {described}")
    # CPU time the hypervisor gave other guests while this machine wanted it (a virtual
    # machine's main source of noise; counted in the rows' "other processes" share too)
    steal = psutil.cpu_times().steal - steal_before
    share = steal / ((time.perf_counter() - started) * corpus.cpu_count())
    print(f"hypervisor steal over the whole benchmark: {steal:.1f} CPU s ({share:.1%} of the machine's time)")

    save("main", {
        "machine": {**machine(), "steal_seconds": steal, "steal_share": share},
        "corpus": {"folder": str(raw.relative_to(HERE.parent)), "images": n, "per_class": args.per_class,
                   "classes": corpus.CLASSES, "seed": args.seed},
        "repeat": args.repeat,
        "prep_help_seconds": help_times,
        "pack_available": pack,
        "rows": {r.key: {**asdict(r), "images_per_s": r.rate} for r in rows},
        "ratios": ratios,
        "targets": checks,
        "prep_output": described,
    })
    print(f"results: {RESULTS}")
    return 0


def large_benchmark(args) -> int:
    warn_if_busy()
    per_class = args.large_images // corpus.CLASSES
    raw = corpus.ensure("small", per_class, args.seed)
    n = len(corpus.images(raw))
    if not has_pack():
        print("prep pack is not available yet; nothing to measure in --large")
        return 1
    workdir = WORK / f"large-{raw.name}"  # kept: a rerun only pays for the pack
    print(f"corpus: {raw} ({n:,} PNG files); preparing {workdir} ...", flush=True)
    prepared = run_prep("L", "prep index..encode", workdir, raw, n, pack=False)
    packs = {}
    for fmt in ("h5", "tfrecord", "h5+tfrecord"):  # each alone, then both in one command
        clear_pack_outputs(workdir)
        options = [arg for name in fmt.split("+") for arg in ("--format", name)]
        print(f"prep pack {' '.join(options)} ...", flush=True)
        cmd = [PREP, "--workdir", str(workdir), "pack", *options]
        run = measure(cmd, WORK / "logs" / f"large-pack-{fmt}.log")
        if not run.ok:
            raise SystemExit(f"`{' '.join(cmd)}` failed (exit {run.returncode}); see {run.log}")
        packs[fmt] = {"seconds": run.seconds, "images_per_s": n / run.seconds, "peak_pss_mb": run.peak_pss_mb,
                      "peak_rss_mb": run.peak_rss_mb, "ru_maxrss_mb": run.ru_maxrss_mb,
                      # ru_maxrss catches a spike between two samples; it only overstates
                      "met": max(run.peak_rss_mb, run.ru_maxrss_mb) < LARGE_RSS_TARGET_MB}
    print()
    print(table([prepared]))
    print(f"\npacking {n:,} images of 32x32x3 (target: peak RSS < {LARGE_RSS_TARGET_MB} MB)")
    print(f"  {'format':<12}{'seconds':>9}{'img/s':>9}{'PSS MB':>9}{'RSS MB':>9}{'largest process MB':>20}")
    for fmt, p in packs.items():
        print(f"  {fmt:<12}{p['seconds']:>9.2f}{p['images_per_s']:>9.0f}{p['peak_pss_mb']:>9.0f}"
              f"{p['peak_rss_mb']:>9.0f}{p['ru_maxrss_mb']:>20.0f}   {'met' if p['met'] else 'NOT MET'}")
    print("  (PSS and RSS: the whole process tree; met: the larger RSS figure is under the target)")
    save("large", {"machine": machine(), "images": n, "prepare": asdict(prepared), "pack": packs,
                   "rss_target_mb": LARGE_RSS_TARGET_MB})
    print(f"results: {RESULTS}")
    return 0


NEAR_TARGET_S = 60  # prep split of 100,000 images, near-copy search included
NEAR_SEARCHES = [(100_000, "random"), (300_000, "random"), (1_000_000, "random"), (100_000, "cluster100"),
                 (1_000_000, "cluster100"), (100_000, "cluster1000")]


def near_copies_benchmark(args) -> int:
    """The near-copy search on synthetic hashes, `prep split` on 100,000 images, and what the
    perceptual hashes add to each image's transform (bench/nearcopies.py does the work)."""
    warn_if_busy()
    script = str(HERE / "nearcopies.py")
    logs = WORK / "logs"
    searches = []
    for n, kind in NEAR_SEARCHES[: 3 if args.quick else None]:
        print(f"near-copy search: {n:,} {kind} hashes ...", flush=True)
        run = require_ok(measure([PYTHON, script, "search", str(n), kind], logs / f"near-search-{n}-{kind}.log"))
        found = _last_json(run.log)
        searches.append({**found, "seconds": run.seconds, "peak_pss_mb": run.peak_pss_mb})
    splits = []
    for kind in ("random", "cluster100"):
        folder = WORK / f"near-split-{kind}"
        set_aside(folder)
        subprocess.run([PYTHON, script, "workdir", "100000", kind, str(folder)], check=True)
        print(f"prep split on 100,000 images ({kind} hashes) ...", flush=True)
        run = require_ok(measure([PREP, "--workdir", str(folder), "-q", "split"], logs / f"near-split-{kind}.log"))
        splits.append({"kind": kind, "images": 100_000, "seconds": run.seconds, "peak_pss_mb": run.peak_pss_mb,
                       "met": run.seconds < NEAR_TARGET_S})
    raw = corpus.ensure("photos", 100, args.seed)
    print(f"perceptual hashes on {raw} ...", flush=True)
    run = require_ok(measure([PYTHON, script, "cost", str(raw)], logs / "near-cost.log"))
    cost = _last_json(run.log)
    print(f"\n  {'hashes':>10} {'kind':<12}{'pairs':>12}{'groups':>9}{'largest':>9}{'search s':>10}{'all s':>8}"
          f"{'PSS MB':>8}")
    for s in searches:
        print(f"  {s['hashes']:>10,} {s['kind']:<12}{s['pairs']:>12,}{s['groups']:>9,}{s['largest']:>9,}"
              f"{s['search_s']:>10.1f}{s['seconds']:>8.1f}{s['peak_pss_mb']:>8.0f}")
    for s in splits:
        print(f"  prep split, 100,000 images, {s['kind']} hashes: {s['seconds']:.1f} s, {s['peak_pss_mb']:.0f} MB"
              f" (target < {NEAR_TARGET_S} s: {'met' if s['met'] else 'NOT MET'})")
    print(f"  hashes per image: +{cost['added_us']} us on a transform of {cost['transform_us']} us"
          f" ({cost['images']} photos, 32x32)")
    save("near_copies", {"machine": machine(), "search": searches, "split": splits, "hash_cost": cost})
    print(f"results: {RESULTS}")
    return 0


def _last_json(log) -> dict:
    return json.loads([line for line in Path(log).read_text().splitlines() if line.startswith("{")][-1])


def clear_pack_outputs(workdir: Path) -> None:
    """Remove what an earlier `prep pack` wrote, so the pack is measured, not its up-to-date check."""
    for path in list(workdir.glob("dataset*")) + [workdir / "tfrecord", workdir / "manifest.json"]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for stamp in (workdir / ".stamps").glob("pack*"):
        stamp.unlink()


def compile_prep() -> None:
    """Byte-compile prep's modules, as installing a package does: an editable install (`make
    install`) leaves that to the first import, which skips it where PYTHONDONTWRITEBYTECODE is
    set, and every timed command, and every Dask worker, would compile prep's sources again."""
    import compileall
    import importlib.util

    folder = Path(importlib.util.find_spec("pipeline").origin).parent  # main() checked prep is installed
    if not compileall.compile_dir(folder, quiet=1):
        raise SystemExit(f"could not byte-compile prep's modules in {folder}")


def main() -> int:
    if "--scale" in sys.argv[1:]:  # a benchmark of its own, with its own options
        import scale

        return scale.main([arg for arg in sys.argv[1:] if arg != "--scale"])
    if "--mirror" in sys.argv[1:]:
        import mirror

        return mirror.main([arg for arg in sys.argv[1:] if arg != "--mirror"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=2000, help="JPEG images per class (10 classes) [2000]")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed [0]")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each row keeps its fastest [1]")
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "dask"],
                        help="rows to leave out (dask: the executor comparison)")
    parser.add_argument("--large", action="store_true", help="only the packing benchmark on 100k small images")
    parser.add_argument("--large-images", type=int, default=100_000, help="images for --large [100000]")
    parser.add_argument("--near-copies", action="store_true",
                        help="only the near-copy benchmark: the pair search to 1M hashes, prep split on 100k")
    parser.add_argument("--quick", action="store_true", help="with --near-copies: leave out the largest searches")
    parser.add_argument("--scale", action="store_true",
                        help="only the scale benchmark: every command at growing sizes (see scale.py --help)")
    parser.add_argument("--mirror", action="store_true",
                        help="only the client's memory per object with a work directory on a bucket (see mirror.py --help)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1; received {args.repeat}")
    if args.large_images < 3 * corpus.CLASSES:
        parser.error(f"--large-images must be at least {3 * corpus.CLASSES}; received {args.large_images}")
    if args.per_class < 3:
        parser.error(f"--per-class must be at least 3 (one image per split); received {args.per_class}")
    if not Path(PREP).exists():
        parser.error(f"{PREP} not found: install prep into this Python environment (make install)")
    WORK.mkdir(exist_ok=True)
    compile_prep()
    try:
        if args.near_copies:
            return near_copies_benchmark(args)
        return large_benchmark(args) if args.large else main_benchmark(args)
    finally:
        empty_trash()  # after every timing, or a failure: see set_aside


if __name__ == "__main__":
    sys.exit(main())
