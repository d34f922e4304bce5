"""The local copy of a work directory on a bucket: the client's memory per object.

    python bench/run.py --mirror                      # 10,000 and 30,000 objects
    python bench/run.py --mirror --objects 20000,100000

Fills a bucket on a loopback S3 server (moto, in a process of its own) with small objects under
``work/resized/`` (as a Dask cluster's workers leave them), then runs in a fresh process each:
the first pull (every object fetched), a second one (nothing changed), and the pull of a command
that leaves ``resized/`` alone (``split``), each followed by the push after a command. Prints the
peak resident memory of that process (its VmHWM: ``ru_maxrss`` would count the launcher's) and
the growth per object between the two sizes, and merges them into bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ is not a package

import run as bench  # noqa: E402
import scale  # noqa: E402

ONE = r"""
import json, sys, time
from pathlib import Path
from pipeline import remote
url, root, leave = sys.argv[1], Path(sys.argv[2]), tuple(sys.argv[3:])
mirror = remote.Mirror(url, root, leave=leave)
started = time.perf_counter()
fetched = mirror.pull()
pulled = time.perf_counter()
mirror.push()
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"fetched": fetched, "pull_seconds": pulled - started, "push_seconds": time.perf_counter() - pulled,
                  "peak_mb": peak / 1024}))
"""
PASSES = (("first pull", ()), ("pull again", ()), ("pull leaving resized/", ("resized",)))


def fill(env: dict, bucket: str, n: int) -> None:
    """``n`` objects of 300 bytes in ``bucket``'s work/resized/, 10 folders, and three tables."""
    code = f"""
import boto3
from concurrent.futures import ThreadPoolExecutor
s3 = boto3.client("s3")
def put(i):
    s3.put_object(Bucket={bucket!r}, Key=f"work/resized/c{{i % 10}}/img_{{i:07d}}.png", Body=b"x" * 300)
with ThreadPoolExecutor(16) as pool:
    list(pool.map(put, range({n})))
for name in ("labels.csv", "resized.csv", ".stamps/resize.json"):
    s3.put_object(Bucket={bucket!r}, Key=f"work/{{name}}", Body=b"a,b\\n")
"""
    subprocess.run([bench.PYTHON, "-c", code], env={**os.environ, **env}, check=True)


def measure(env: dict, n: int, folder: Path) -> dict:
    bucket = scale.make_bucket(env)
    started = time.perf_counter()
    fill(env, bucket, n)
    print(f"  {n:,} objects uploaded in {time.perf_counter() - started:.0f} s", flush=True)
    out = {"objects": n}
    for name, leave in PASSES:
        done = subprocess.run([bench.PYTHON, "-P", "-c", ONE, f"s3://{bucket}/work", str(folder / f"copy-{n}" / "work"),
                               *leave], env={**os.environ, **env, "PREP_CACHE": str(folder)},
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(done.stdout)
        print(f"  {n:,} objects, {name}: {out[name]['peak_mb']:.0f} MB, pull {out[name]['pull_seconds']:.1f} s,"
              f" {out[name]['fetched']:,} fetched", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py --mirror", description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=scale.sizes_arg, default=[10_000, 30_000], metavar="N,N",
                        help="objects in the bucket, two sizes [10000,30000]")
    args = parser.parse_args(argv)
    if len(args.objects) != 2:
        parser.error("--objects takes two sizes, e.g. 10000,30000")
    with scale.s3_server() as env, tempfile.TemporaryDirectory() as folder:
        sizes = [measure(env, n, Path(folder)) for n in args.objects]
    small, large = sizes
    growth = {name: (large[name]["peak_mb"] - small[name]["peak_mb"]) * 1024 / (large["objects"] - small["objects"])
              for name, _ in PASSES}
    print()
    print(f"{'':24}{small['objects']:>12,}{large['objects']:>12,}   KB per object")
    for name, _ in PASSES:
        print(f"{name:24}{small[name]['peak_mb']:>9.0f} MB{large[name]['peak_mb']:>9.0f} MB   {growth[name]:.2f}")
    bench.save("mirror", {"machine": bench.machine(), "sizes": sizes, "kb_per_object": growth})
    print(f"results: {bench.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
