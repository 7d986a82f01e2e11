"""Captioning throughput by input format and runner, side by side in one run: the same images
as a folder of files, as webdataset tar shards, as Parquet files of image bytes (one machine),
and as the tar shards on a local Ray instance with 1 and 2 model replicas.

Each contender is a real `cogvlm caption` process (cogvlm-tiny unless --model). Printed: images/s
as the run itself reports it (captioning time: after the model load on one machine; on Ray after
Ray has started, so the replicas' startup and model loads count) and the command's wall time,
startup included. Every model runs one torch thread (OMP_NUM_THREADS=1 on one machine; Ray
replicas get --cpus-per-replica 1), so 2 replicas use 2 cores: on a shared, busy machine, more
threads than free cores make torch many times slower, which would drown the comparison.

    pip install -e '.[datasets,ray]' && python benchmarks/caption.py [--images 200] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogvlm.data.synthetic import make_scene

SHARDS = 4


def make_data(root: Path, n: int) -> None:
    """n scenes (JPEG) as folder/, tar/0000{0..3}.tar and parquet/{0,1}.parquet."""
    (root / "folder").mkdir()
    (root / "tar").mkdir()
    (root / "parquet").mkdir()
    images = []
    for i in range(n):
        out = io.BytesIO()
        make_scene(i, 112).image.save(out, "jpeg")
        images.append((f"{i:06d}", out.getvalue()))
        (root / "folder" / f"{i:06d}.jpg").write_bytes(out.getvalue())
    per = -(-n // SHARDS)
    for s in range(SHARDS):
        with tarfile.open(root / "tar" / f"{s:05d}.tar", "w") as tar:
            for key, data in images[s * per:(s + 1) * per]:
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    half = -(-n // 2)
    for s in range(2):
        part = images[s * half:(s + 1) * half]
        pq.write_table(pa.table({"key": [k for k, _ in part], "jpg": pa.array([d for _, d in part], pa.binary())}),
                       root / "parquet" / f"{s}.parquet")


def run(args: list[str], cwd: Path) -> tuple[float, float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",
           "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cogvlm", "caption", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cogvlm caption {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    rate = float(re.search(r"cogvlm caption: ([\d.]+) images/s", proc.stdout).group(1))
    return rate, wall, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="cogvlm-tiny")
    opts = parser.parse_args()
    common = ["--model", opts.model, "--batch-size", str(opts.batch_size), "--log-every", "3600"]
    tars = f"tar/{{00000..{SHARDS - 1:05d}}}.tar"
    contenders = {
        "folder (JPEG files)": ["folder", "--output", "out-folder/captions.jsonl"],
        f"tar ({SHARDS} webdataset shards)": [tars, "--output", "out-tar"],
        "Parquet (2 files of bytes)": ["parquet/0.parquet", "parquet/1.parquet", "--output", "out-parquet"],
        "Ray, 1 replica (tar)": [tars, "--output", "out-ray1", "--ray", "--replicas", "1"],
        "Ray, 2 replicas (tar)": [tars, "--output", "out-ray2", "--ray", "--replicas", "2"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, opts.images)
        print(f"{opts.images} images (112 px JPEG), {opts.model}, batch {opts.batch_size}, {os.cpu_count()} cores")
        print(f"{'input':32} {'images/s':>9} {'wall s':>8}")
        for name, args in contenders.items():
            rate, wall, out = run(args + common, root)
            print(f"{name:32} {rate:9.2f} {wall:8.1f}", flush=True)
            for line in out.splitlines():
                if "replica " in line:
                    print(f"{'':4}{line.removeprefix('cogvlm caption: ')}")


if __name__ == "__main__":
    main()
