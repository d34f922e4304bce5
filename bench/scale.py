"""The scale benchmark: every command's time and peak memory at growing dataset sizes.

    python bench/run.py --scale                                # 100,000 images
    python bench/run.py --scale --scale-images 50000,100000    # two sizes: the marginal cost per image

At each size, on a corpus of small JPEGs (64x64 crops of real photos, 10 classes), every command
runs as its own process tree from an empty work directory (cold), then again with nothing changed
(warm): wall time, CPU time (user + system of the process and every descendant it waited for,
from ``wait4``) and the peak RSS of the process tree (the sum over the process and its
descendants, sampled every 50 ms by run.py's :func:`measure`). With two or more sizes the growth
between the smallest and the largest gives each command's marginal cost, KB and microseconds per
image, and from it an estimate for 10 million images: time on this machine, peak memory per
command, disk, files per folder, and the first command to run out of memory. Results are printed
and written to the ``scale`` section of ``bench/results.json``.

The commands are those of the running interpreter's ``pipeline`` package (``python -P -m
pipeline``): with PYTHONPATH set, another checkout's. See bench/README.md for the columns and how
far to trust them.
"""

from __future__ import annotations

import argparse
import importlib.util
import compileall
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package
import corpus
import run as bench

KIND = "thumbs"
THUMB = 64  # px, square: small files, so that a large corpus is quick to build and to store
TARGET_IMAGES = 10_000_000
GB = 1024**3
MB = 1024**2


_sources: list[Image.Image] = []


def _load_sources() -> None:
    corpus._load_photos()
    _sources[:] = [Image.fromarray(photo) for photo in corpus._photos]


def thumb(seed: int, c: int, i: int) -> bytes:
    """JPEG bytes of image ``i`` of class ``c``: a jittered 64x64 crop of one of the sample photos.
    (A change to what it draws changes the corpus: bump ``corpus.VERSION`` with it.)"""
    rng = np.random.default_rng([seed, c, i])
    src = _sources[int(rng.integers(len(_sources)))]
    w, h = src.size
    side = int(np.exp(rng.uniform(np.log(THUMB * 0.75), np.log(min(h, w)))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img = src.resize((THUMB, THUMB), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                              reducing_gap=2.0)
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    gray = arr.mean(axis=2, keepdims=True)
    arr = gray + rng.uniform(0.6, 1.4) * (arr - gray)  # saturation
    tint = 1.0 + 0.15 * np.cos(2 * np.pi * (c / corpus.CLASSES + np.arange(3) / 3))  # per class
    arr = arr * (rng.uniform(0.75, 1.25) * tint * rng.uniform(0.95, 1.05, size=3)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_thumbs(job: tuple[str, int, int, list[int]]) -> int:
    folder, seed, c, indices = job
    for i in indices:
        Path(folder, corpus.class_name(c), f"img_{i:07d}.jpg").write_bytes(thumb(seed, c, i))
    return len(indices)


corpus.KINDS.setdefault(KIND, (_write_thumbs, _load_sources))


def build(per_class: int, seed: int, largest: int) -> tuple[Path, float]:
    """The corpus of ``per_class`` images per class and the seconds it took to make (0 if reused).

    A smaller corpus is made of hard links to the first files of each class of the largest one:
    the same bytes as generating it (each image has its own seeded generator), in a fraction of
    the time, and deleting it later frees no inode (see run.py's :func:`set_aside` for why that
    matters on ext4)."""
    started = time.perf_counter()
    folder = corpus.CORPUS_ROOT / f"{KIND}-{corpus.CLASSES}x{per_class}-seed{seed}"
    params = {"kind": KIND, "classes": corpus.CLASSES, "per_class": per_class, "seed": seed,
              "version": corpus.VERSION}
    if (folder / "corpus.json").exists():
        return corpus.ensure(KIND, per_class, seed), 0.0
    if per_class == largest:
        return corpus.ensure(KIND, per_class, seed), time.perf_counter() - started
    source = corpus.ensure(KIND, largest, seed)
    tmp = corpus.CORPUS_ROOT / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(corpus.CLASSES):
        name = corpus.class_name(c)
        (tmp / name).mkdir(parents=True)
        for i in range(per_class):
            file = f"img_{i:07d}.jpg"
            os.link(source / name / file, tmp / name / file)
    (tmp / "corpus.json").write_text(json.dumps(params))
    os.replace(tmp, folder)
    return folder, time.perf_counter() - started


def commands(raw: Path) -> list[tuple[str, list[str]]]:
    return [
        ("index", ["index", str(raw)]),
        ("resize", ["resize"]),
        ("split", ["split"]),
        ("encode", ["encode"]),
        ("pack pkl.gz", ["pack", "--format", "pkl.gz"]),
        ("pack h5", ["pack", "--format", "h5"]),
        ("pack tfrecord", ["pack", "--format", "tfrecord"]),
        ("pack parquet", ["pack", "--format", "parquet"]),
        ("verify", ["verify"]),
        ("report", ["report"]),
        ("status", ["status"]),
        ("status --quick", ["status", "--quick"]),  # warm: a stat per folder, not per file
    ]


def disk(path: Path) -> tuple[int, int]:
    """Bytes allocated on disk and the number of files under ``path`` (a file or a folder)."""
    if path.is_file():
        return path.stat().st_blocks * 512, 1
    size = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            size += os.lstat(os.path.join(root, name)).st_blocks * 512
            files += 1
    return size, files


def disk_usage(workdir: Path, raw: Path) -> dict[str, dict]:
    parts = {"corpus (RAW)": raw, "resized/": workdir / "resized", "dataset.pkl.gz": workdir / "dataset.pkl.gz",
             "dataset.h5": workdir / "dataset.h5", "tfrecord/": workdir / "tfrecord", "data/ (Parquet)": workdir / "data"}
    out = {name: dict(zip(("bytes", "files"), disk(path))) for name, path in parts.items() if path.exists()}
    total, files = disk(workdir)
    listed = [v for k, v in out.items() if k != "corpus (RAW)"]
    out["the rest of the work directory"] = {"bytes": total - sum(v["bytes"] for v in listed),
                                             "files": files - sum(v["files"] for v in listed)}
    return out


def measure_size(prep: list[str], raw: Path, n: int) -> dict:
    workdir = bench.WORK / f"scale-{n}"
    bench.set_aside(workdir)
    out = {"images": n, "corpus": str(raw.relative_to(HERE.parent))}
    for phase in ("cold", "warm"):
        out[phase] = {}
        for name, args in commands(raw):
            print(f"  {n:,} images, {phase}: prep {' '.join(args[:3]) if name != 'index' else 'index'} ...",
                  end="", flush=True)
            log = bench.WORK / "logs" / f"scale-{n}-{phase}-{name.replace(' ', '-')}.log"
            before = os.times()  # the tree's system time, apart: measure() gives user + system
            run = bench.require_ok(bench.measure([*prep, "--workdir", str(workdir), *args], log, bench.env_quiet()))
            system = os.times().children_system - before.children_system
            print(f" {run.seconds:.1f} s, {run.peak_rss_mb:.0f} MB", flush=True)
            out[phase][name] = {"seconds": run.seconds, "cpu_seconds": run.cpu_seconds, "system_seconds": system,
                                "foreign_cpu": run.foreign_cpu, "peak_rss_mb": run.peak_rss_mb,
                                "peak_pss_mb": run.peak_pss_mb, "ru_maxrss_mb": run.ru_maxrss_mb}
    out["disk"] = disk_usage(workdir, raw)
    out["workdir_entries_bytes"] = {entry.name: disk(entry)[0] for entry in sorted(workdir.iterdir())}
    bench.set_aside(workdir)  # deleted after the last timing
    return out


@contextlib.contextmanager
def dask_cluster(workers: int, env: dict | None = None):
    """A Dask scheduler and ``workers`` single-threaded worker processes on loopback, started apart
    from the command measured, so that the command's process tree is the client alone."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    logs = bench.WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        with open(logs / "scale-dask-cluster.log", "wb") as log:
            procs.append(subprocess.Popen([bench.PYTHON, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                           "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
                                          stdout=log, stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen([bench.PYTHON, "-m", "distributed.cli.dask_worker", address, "--nworkers",
                                           str(workers), "--nthreads", "1", "--no-dashboard"],
                                          stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}))
            from distributed import Client

            with Client(address, timeout=60) as client:
                client.wait_for_workers(workers, timeout=120)
            yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def dask_client(prep: list[str], raws: list[tuple[Path, int]], bucket: bool = False) -> dict | None:
    """What the client of a Dask `prep resize` costs per image: the command runs against a
    cluster started apart (2 workers on this machine), so that its own process tree, measured, is
    the client's: CPU and peak RSS at each size, and the growth per image between them. With
    ``bucket``, the work directory is a bucket on an S3-compatible server on loopback (moto, one
    process apart too), which the workers write the resized files to."""
    if not bench.dask_available() or (bucket and importlib.util.find_spec("moto") is None):
        return None
    out = {"sizes": [], "workdir": "s3 bucket (moto on loopback)" if bucket else "folder"}
    with contextlib.ExitStack() as stack:
        env = bench.env_quiet()
        if bucket:
            env = {**env, **stack.enter_context(s3_server()), "PREP_CACHE": str(bench.WORK / "scale-prep-cache")}
        address = stack.enter_context(dask_cluster(2, env))
        for raw, n in raws:
            workdir = bench.WORK / f"scale-dask-{n}"
            bench.set_aside(workdir)
            where = str(workdir)
            if bucket:
                where = f"s3://{make_bucket(env)}/work"
                bench.set_aside(Path(env["PREP_CACHE"]))
            log = bench.WORK / "logs" / f"scale-dask-{n}.log"
            bench.require_ok(bench.measure([*prep, "--workdir", where, "index", str(raw)], log, env))
            print(f"  {n:,} images: prep resize --executor dask, the client alone"
                  f"{', work directory on a bucket' if bucket else ''} ...", end="", flush=True)
            run = bench.require_ok(bench.measure([*prep, "--workdir", where, "resize", "--executor", "dask",
                                                  "--scheduler", address], log, env))
            print(f" {run.seconds:.1f} s, {run.cpu_seconds:.1f} CPU s, {run.peak_rss_mb:.0f} MB", flush=True)
            out["sizes"].append({"images": n, "seconds": run.seconds, "cpu_seconds": run.cpu_seconds,
                                 "peak_rss_mb": run.peak_rss_mb})
            bench.set_aside(workdir)
    if len(out["sizes"]) >= 2:
        a, b = out["sizes"][0], out["sizes"][-1]
        span = b["images"] - a["images"]
        out["client_cpu_us_per_image"] = (b["cpu_seconds"] - a["cpu_seconds"]) * 1e6 / span
        out["client_kb_per_image"] = (b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / span
    return out


@contextlib.contextmanager
def s3_server():
    """An S3-compatible server (moto) on a free loopback port, in a process of its own: the
    environment that points boto3 and s3fs at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    server = subprocess.Popen([bench.PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the S3 server (moto) did not start")
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def make_bucket(env: dict) -> str:
    name = f"scale-{os.getpid()}-{time.monotonic_ns()}"
    subprocess.run([bench.PYTHON, "-c", f"import boto3; boto3.client('s3').create_bucket(Bucket={name!r})"],
                   env={**os.environ, **env}, check=True)
    return name


def cluster_estimate(growth: dict, est: dict, client: dict | None, cores: int) -> dict | None:
    """10M images on a cluster of ``cores`` worker cores writing to a bucket: resize's per-image
    CPU (measured here, the client's share taken out) spread over the cores, or the client's own
    per-image CPU, whichever is slower; the other commands run on one machine as estimated."""
    if not client or "client_cpu_us_per_image" not in client:
        return None
    images = est["images"]
    client_us = max(client["client_cpu_us_per_image"], 0.0)
    worker_us = max(growth["cold"]["resize"]["cpu_us_per_image"] - client_us, 0.0)
    resize_s = images * max(worker_us / cores, client_us) * 1e-6
    rest_s = sum(c["seconds"] for name, c in est["commands"]["cold"].items() if name not in ("resize",))
    return {"cores": cores, "worker_cpu_us_per_image": worker_us, "client_cpu_us_per_image": client_us,
            "resize_hours": resize_s / 3600, "client_bound": client_us > worker_us / cores,
            "client_gb": (client["sizes"][-1]["peak_rss_mb"] * MB
                          + max(client["client_kb_per_image"], 0) * 1024 * (images - client["sizes"][-1]["images"])) / GB,
            "other_commands_hours": rest_s / 3600}


def marginal(small: dict, large: dict) -> dict:
    """Per command and phase: the growth per image from ``small`` to ``large``."""
    span = large["images"] - small["images"]
    out = {}
    for phase in ("cold", "warm"):
        out[phase] = {}
        for name, a in small[phase].items():
            b = large[phase][name]
            out[phase][name] = {
                "kb_per_image": (b["peak_rss_mb"] - a["peak_rss_mb"]) * 1024 / span,
                "pss_kb_per_image": (b["peak_pss_mb"] - a["peak_pss_mb"]) * 1024 / span,
                "us_per_image": (b["seconds"] - a["seconds"]) * 1e6 / span,
                "cpu_us_per_image": (b["cpu_seconds"] - a["cpu_seconds"]) * 1e6 / span,
            }
    for unit in ("bytes", "files"):
        out[f"disk_{unit}_per_image"] = {
            name: (large["disk"][name][unit] - small["disk"][name][unit]) / span for name in large["disk"]
            if name in small["disk"]
        }
    return out


def estimate(large: dict, growth: dict, images: int, memory_gb: float) -> dict:
    """Linear extrapolation from the largest measured size to ``images``."""
    extra = images - large["images"]
    commands_ = {}
    for phase in ("cold", "warm"):
        for name, m in large[phase].items():
            g = growth[phase][name]
            # a slope below zero is noise: the peak stays at least where it was
            rss_gb = (m["peak_rss_mb"] * MB + max(g["kb_per_image"], 0) * 1024 * extra) / GB
            pss_gb = (m["peak_pss_mb"] * MB + max(g["pss_kb_per_image"], 0) * 1024 * extra) / GB
            seconds = max(m["seconds"] + g["us_per_image"] * 1e-6 * extra, m["seconds"])
            commands_.setdefault(phase, {})[name] = {"seconds": seconds, "peak_rss_gb": rss_gb, "peak_pss_gb": pss_gb}
    disk_ = {}
    for name, d in large["disk"].items():
        disk_[name] = {"gb": (d["bytes"] + growth["disk_bytes_per_image"].get(name, 0) * extra) / GB,
                       "files": round(d["files"] + max(growth["disk_files_per_image"].get(name, 0), 0) * extra)}
    return {
        "images": images,
        "commands": commands_,
        "cold_hours": sum(c["seconds"] for c in commands_["cold"].values()) / 3600,
        "warm_hours": sum(c["seconds"] for c in commands_["warm"].values()) / 3600,
        "disk": disk_,
        "files_per_class_folder": images // corpus.CLASSES,
        "memory_gb": memory_gb,
        # PSS first: the memory the tree needs (pages shared by forked workers counted once); RSS: an upper bound
        "first_out_of_memory": outgrows(large, growth, memory_gb, "pss"),
        "first_out_of_memory_by_rss": outgrows(large, growth, memory_gb, "rss"),
    }


def outgrows(large: dict, growth: dict, memory_gb: float, measure: str) -> dict | None:
    """The command whose peak (``measure``: "rss" or "pss") reaches ``memory_gb`` at the fewest images."""
    first = None
    for phase in ("cold", "warm"):
        for name, m in large[phase].items():
            slope = growth[phase][name]["kb_per_image" if measure == "rss" else "pss_kb_per_image"] * 1024
            if slope > 0:
                at = large["images"] + (memory_gb * GB - m[f"peak_{measure}_mb"] * MB) / slope
                if first is None or at < first["images"]:
                    first = {"command": name, "phase": phase, "images": round(at)}
    return first


# -- report ---------------------------------------------------------------------------------


def flag(step: dict) -> str:
    return "!" if step["foreign_cpu"] > bench.NOISY else " "


def size_table(m: dict) -> str:
    lines = [f"{m['images']:,} images ({m['corpus']})",
             f"  {'command':<15}{'cold s':>9}{'CPU s':>8}{'sys s':>7}{'RSS MB':>8}{'PSS MB':>8}"
             f"{'warm s':>10}{'CPU s':>8}{'RSS MB':>8}"]
    for name, c in m["cold"].items():
        w = m["warm"][name]
        lines.append(f"  {name:<15}{c['seconds']:>8.2f}{flag(c)}{c['cpu_seconds']:>8.2f}{c['system_seconds']:>7.2f}"
                     f"{c['peak_rss_mb']:>8.0f}"
                     f"{c['peak_pss_mb']:>8.0f}{w['seconds']:>9.2f}{flag(w)}{w['cpu_seconds']:>8.2f}"
                     f"{w['peak_rss_mb']:>8.0f}")
    return "\n".join(lines)


def growth_table(sizes: list[dict], growth: dict, est: dict) -> str:
    n0, n1 = sizes[0]["images"], sizes[-1]["images"]
    lines = []
    for phase in ("cold", "warm"):
        heads = "".join(f"{'MB@' + format(s['images'], ','):>13}" for s in sizes)
        lines.append(f"{phase}: peak RSS of the process tree (MB) at each size; growth per image {n0:,} -> {n1:,}"
                     f" (RSS, PSS, wall, CPU); at {est['images']:,} images by extrapolation (hours, RSS, PSS)")
        lines.append(f"  {'command':<15}{heads}{'KB/img':>9}{'PSS KB':>9}{'us/img':>9}{'CPU us':>9}"
                     f"{'10M: h':>9}{'10M: GB':>9}{'PSS GB':>9}")
        for name in sizes[0][phase]:
            g, e = growth[phase][name], est["commands"][phase][name]
            mbs = "".join(f"{s[phase][name]['peak_rss_mb']:>13.0f}" for s in sizes)
            lines.append(f"  {name:<15}{mbs}{g['kb_per_image']:>9.2f}{g['pss_kb_per_image']:>9.2f}"
                         f"{g['us_per_image']:>9.1f}{g['cpu_us_per_image']:>9.1f}{e['seconds'] / 3600:>9.2f}"
                         f"{e['peak_rss_gb']:>9.1f}{e['peak_pss_gb']:>9.1f}")
        lines.append("")
    return "\n".join(lines)


def estimate_text(est: dict) -> str:
    shards = round(est["disk"].get("tfrecord/", {}).get("gb", 0) * 1024 / 100)

    def per_image(d: dict) -> bool:
        return d["files"] >= est["images"] / 2
    lines = [f"estimate for {est['images']:,} images on this machine ({corpus.cpu_count()} cores):",
             f"  time: {est['cold_hours']:.1f} h for the ten commands from an empty work directory,"
             f" {est['warm_hours']:.2f} h to run them again with nothing changed",
             "  disk: " + ", ".join(f"{name} {d['gb']:.1f} GB" + (f" in {d['files']:,} files" if per_image(d) else "")
                                    for name, d in est["disk"].items()),
             f"        (tfrecord/ in shards of 100 MiB, --shard-mb: about {shards:,}; this corpus is of 64x64 JPEGs,"
             " a real one takes more)",
             f"  files per folder: {est['files_per_class_folder']:,} in each resized/<class>/ (and in each RAW class"
             " folder laid out like this corpus)"]
    first, by_rss = est["first_out_of_memory"], est["first_out_of_memory_by_rss"]
    if first is None:
        lines.append("  memory: no command's peak grows with the number of images")
    else:
        lines.append(f"  memory: the first command to outgrow {est['memory_gb']:.0f} GB is prep {first['command']}"
                     f" ({first['phase']}), at about {first['images']:,} images by PSS"
                     + ("" if by_rss is None else f" ({by_rss['images']:,} by RSS)" if by_rss["command"] == first["command"] else
                        f"; by RSS, prep {by_rss['command']} ({by_rss['phase']}) at {by_rss['images']:,}"))
    return "\n".join(lines)


NOISE = ("Memory repeats from run to run (peaks within a few percent, KB/img within about 0.1); times do"
         " not: this machine's speed drifts by a fifth within minutes, other users' load and a recent large delete"
         " on the file system (see sys s) can make a command take three times as long, and `!` marks a timing"
         f" during which other processes used more than {bench.NOISY:.0%} of the machine. Judge memory work by"
         " KB/img and the GB; read us/img and the hours as a rough guide.")


# -- main -----------------------------------------------------------------------------------


def prep_identity(prep: list[str]) -> dict:
    """The version, folder and, when it is a git checkout, the commit of the prep being measured
    (asked of the interpreter the commands run in, the same way)."""
    version = subprocess.run([*prep, "--version"], capture_output=True, text=True)
    if version.returncode:
        raise SystemExit(f"`{' '.join(prep)} --version` failed: install prep into this Python (make install)\n"
                         f"{version.stderr.strip()[-500:]}")
    where = [*prep[:-2], "-c", "import pipeline; print(pipeline.__file__)"]
    folder = Path(subprocess.run(where, check=True, capture_output=True, text=True).stdout.strip()).parent
    git = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out = {"version": version.stdout.strip(), "folder": str(folder)}
    if git.returncode == 0:
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True).stdout.strip()
        out["commit"] = git.stdout.strip() + ("+uncommitted changes" if dirty else "")
    return out


def sizes_arg(text: str) -> list[int]:
    try:
        sizes = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected image counts separated by commas, e.g. 50000,100000; got {text!r}")
    if not sizes or sizes[0] < 3 * corpus.CLASSES:
        raise argparse.ArgumentTypeError(f"every size must be at least {3 * corpus.CLASSES}; got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py --scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale-images", type=sizes_arg, default=[100_000], metavar="N[,N...]",
                        help="corpus sizes (images, 10 classes) [100000]; two or more give the cost per image")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed [0]")
    parser.add_argument("--memory-gb", type=float, default=24.0, help="the memory of the machine to estimate for [24]")
    parser.add_argument("--cluster-cores", type=int, default=100, help="worker cores of the cluster to estimate for [100]")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask client's measurement")
    parser.add_argument("--bucket-images", type=sizes_arg, default=[50_000, 100_000], metavar="N,N",
                        help="corpus sizes for the Dask client with the work directory on a loopback S3 server"
                             " [50000,100000] (each resized file is a PUT to a server in Python: slow)")
    args = parser.parse_args(argv)
    # -P: not the current directory first in sys.path, which `-m` puts there, so that prep is the
    # one the interpreter installs or PYTHONPATH gives, wherever the benchmark is started
    prep = [bench.PYTHON, "-P", "-m", "pipeline"]
    bench.WORK.mkdir(exist_ok=True)
    identity = prep_identity(prep)
    # byte-compiled, as an installed package is (see run.py's compile_prep)
    if not compileall.compile_dir(identity["folder"], quiet=1):
        raise SystemExit(f"could not byte-compile prep's modules in {identity['folder']}")
    bench.warn_if_busy()
    print(f"measuring {identity['version']} in {identity['folder']}"
          + (f" (git commit {identity['commit']})" if "commit" in identity else ""))
    per_class = [n // corpus.CLASSES for n in args.scale_images]
    sizes = []
    client = bucket_client = None
    try:
        # the largest first: the smaller ones link to its files
        made = {per_class[-1]: build(per_class[-1], args.seed, per_class[-1])[1]}
        if made[per_class[-1]]:
            print(f"corpus built in {made[per_class[-1]]:.1f} s"
                  f" ({per_class[-1] * corpus.CLASSES / made[per_class[-1]]:,.0f} images/s)", flush=True)
        for pc in per_class:
            raw, seconds = build(pc, args.seed, per_class[-1])
            seconds = made.get(pc, seconds)
            n = len(corpus.images(raw))
            print(f"corpus: {raw} ({n:,} JPEG files, {disk(raw)[0] / MB:,.0f} MB"
                  + (f", made in {seconds:.1f} s)" if seconds else ", reused)"), flush=True)
            bench.read_corpus_once(raw)
            sizes.append({**measure_size(prep, raw, n), "corpus_seconds": seconds})
        if len(sizes) >= 2 and not args.no_dask:
            # the two smallest sizes: the client's cost per image, without a cluster run of the largest
            client = dask_client(prep, [(build(pc, args.seed, per_class[-1])[0], s["images"])
                                        for pc, s in zip(per_class[:2], sizes[:2])])
            bucket_sizes = [n // corpus.CLASSES for n in args.bucket_images if n // corpus.CLASSES <= per_class[-1]]
            if len(bucket_sizes) >= 2:
                bucket_client = dask_client(prep, [(build(pc, args.seed, per_class[-1])[0], pc * corpus.CLASSES)
                                                   for pc in bucket_sizes], bucket=True)
    finally:
        bench.empty_trash()
    print()
    for m in sizes:
        print(size_table(m))
        print()
    prep_ = {key: value for key, value in identity.items() if key != "folder"}  # no machine paths in results
    result = {"machine": bench.machine(), "prep": prep_, "sizes": sizes, "noise": NOISE}
    if len(sizes) >= 2:
        growth = marginal(sizes[0], sizes[-1])
        est = estimate(sizes[-1], growth, TARGET_IMAGES, args.memory_gb)
        print(growth_table(sizes, growth, est))
        print(estimate_text(est))
        cluster = cluster_estimate(growth, est, bucket_client or client, args.cluster_cores)
        if cluster:
            print(f"  on a cluster of {cluster['cores']} worker cores writing to a bucket: resize"
                  f" {cluster['resize_hours']:.2f} h ({cluster['worker_cpu_us_per_image']:.0f} CPU us per image on a worker,"
                  f" {cluster['client_cpu_us_per_image']:.1f} in the client: "
                  f"{'the client' if cluster['client_bound'] else 'the workers'} set the pace; the client's peak"
                  f" {cluster['client_gb']:.1f} GB), then {cluster['other_commands_hours']:.1f} h for the other commands"
                  " on one machine")
        for name, measured in (("folder", client), ("bucket", bucket_client)):
            if measured and "client_cpu_us_per_image" in measured:
                print(f"  the Dask client, work directory on a {name}: {measured['client_cpu_us_per_image']:.1f} CPU us"
                      f" and {measured['client_kb_per_image']:.2f} KB per image")
        result.update(marginal=growth, estimate=est, dask_client=client, dask_client_bucket=bucket_client,
                      cluster=cluster)
    else:
        print("(one size: give two or more with --scale-images, e.g. 50000,100000, for the cost per image)")
    print()
    print(NOISE)
    print("The work directories have been deleted: on ext4, files created in the next five minutes cost more system"
          " time (bench/README.md, \"The corpus\"), so let a rerun wait that long.")
    bench.save("scale", result)
    print(f"results: {bench.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
