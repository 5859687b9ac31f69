"""Throughput and memory of the shard stage on the embedded benchmark.

    python -m benchmarks.shard --out runs/bench/shard.json [--data DIR] [--workers 1 2] [--sizes 1024 256]

Without `--data` (an SA-1B directory: `train/`, `val/` of sa_*.tar) the default profile's
benchmark is generated first. Reported, per target size:

* stage images/s at each worker count: wall time of the whole `pipelines.shard.run`
  (validation, image and mask resizing, RLE, part files, final shards; process-pool
  start-up included), and CPU ms per image (user + system time of the process and its
  workers), which stays meaningful on a machine shared with other jobs;
* plain images/s: a single-process loop doing only the image work with PIL (stream the
  tar, decode, resize the longest side, JPEG-encode), and the ratio stage / plain;
* peak memory (max RSS of a fresh process running the stage with 1 worker) on 1 tar and
  on 8 tars: streaming keeps it flat, whatever the number of tars.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from edgesam.artifacts import ArtifactStore
    from edgesam.config import RuntimeConfig, ShardConfig
    from pipelines import shard
    data = ArtifactStore(sys.argv[1]).artifact("data", "bench")
    out = Path(sys.argv[2])
    out.mkdir(parents=True)
    shard.run(ShardConfig(workers=1, target_size=int(sys.argv[3])), RuntimeConfig(), {"data": data}, out)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""")


def data_artifact(root: Path, sa1b_dir: Path):
    from edgesam.artifacts import ArtifactStore

    artifact = ArtifactStore(root).artifact("data", "bench")
    artifact.path.mkdir(parents=True, exist_ok=True)
    artifact.commit({"sa1b_dir": str(sa1b_dir)})
    return artifact


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def plain_loop(sa1b_dir: Path, size: int, quality: int) -> tuple[int, float, float]:
    """Decode-resize-encode every image with PIL in one process: (images, seconds, CPU seconds)."""
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for path in sorted(sa1b_dir.rglob("sa_*.tar")):
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                    img = img.convert("RGB")
                    scale = size / max(img.size)
                    resized = img.resize((int(img.width * scale + 0.5), int(img.height * scale + 0.5)), Image.BILINEAR)
                    resized.save(io.BytesIO(), format="JPEG", quality=quality)
                count += 1
    return count, time.perf_counter() - start, cpu_seconds() - cpu


def stage_run(work: Path, sa1b_dir: Path, size: int, workers: int) -> tuple[int, float, float]:
    from edgesam.config import RuntimeConfig, ShardConfig
    from pipelines import shard

    out = work / f"shard-{size}-{workers}"
    out.mkdir(parents=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    body = shard.run(ShardConfig(target_size=size, workers=workers), RuntimeConfig(), {"data": data_artifact(work, sa1b_dir)}, out)
    elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
    shutil.rmtree(out)
    return sum(s["samples"] for s in body["splits"].values()), elapsed, used


def peak_memory_mb(work: Path, sa1b_dir: Path, tars: int, size: int) -> int:
    """Max RSS (MiB) of a fresh process sharding the first `tars` train tars."""
    subset = work / f"mem-{tars}" / "sa1b"
    (subset / "train").mkdir(parents=True)
    for path in sorted((sa1b_dir / "train").glob("sa_*.tar"))[:tars]:
        os.symlink(path, subset / "train" / path.name)
    data_artifact(work / f"mem-{tars}", subset)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(work / f"mem-{tars}"), str(work / f"mem-{tars}" / "out"),
                             str(size)], env=env, check=True, capture_output=True, text=True)
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/shard.json"))
    parser.add_argument("--data", type=Path, help="SA-1B directory (default: generate the default benchmark)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 256])
    args = parser.parse_args()

    from edgesam.config import load_profile
    from edgesam.data.synth import write_benchmark

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        work = Path(tmp)
        if args.data is None:
            start = time.perf_counter()
            sa1b_dir = Path(write_benchmark(work / "data", load_profile("default").data)["sa1b_dir"])
            print(f"generated the default benchmark in {time.perf_counter() - start:.1f}s")
        else:
            sa1b_dir = args.data.resolve()
        rows: list[dict[str, Any]] = []
        for size in args.sizes:
            images, seconds, cpu = plain_loop(sa1b_dir, size, quality=95)
            plain = images / seconds
            row: dict[str, Any] = {"target_size": size, "images": images, "plain_images_per_s": round(plain, 2),
                                   "plain_cpu_ms_per_image": round(1000 * cpu / images, 1)}
            for workers in args.workers:
                count, elapsed, used = stage_run(work, sa1b_dir, size, workers)
                row[f"stage_images_per_s_w{workers}"] = round(count / elapsed, 2)
                row[f"ratio_w{workers}"] = round(count / elapsed / plain, 3)
                row[f"stage_cpu_ms_per_image_w{workers}"] = round(1000 * used / count, 1)
            rows.append(row)
        memory = {f"{n}_tars": peak_memory_mb(work, sa1b_dir, n, max(args.sizes)) for n in (1, 8)}

    header = ["target", "images", "plain img/s (cpu ms/img)"]
    header += [f"stage w={w} img/s (ratio, cpu ms/img)" for w in args.workers]
    print(" | ".join(header))
    for row in rows:
        cells = [str(row["target_size"]), str(row["images"]),
                 f"{row['plain_images_per_s']:.1f} ({row['plain_cpu_ms_per_image']:.1f})"]
        cells += [f"{row[f'stage_images_per_s_w{w}']:.1f} ({row[f'ratio_w{w}']:.2f}, "
                  f"{row[f'stage_cpu_ms_per_image_w{w}']:.1f})" for w in args.workers]
        print(" | ".join(cells))
    print(f"peak RSS at target {max(args.sizes)}: 1 tar {memory['1_tars']} MiB, 8 tars {memory['8_tars']} MiB")
    result = {
        "rows": rows, "peak_rss_mb": memory, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "python": platform.python_version(), "data": str(args.data or "generated default profile"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
