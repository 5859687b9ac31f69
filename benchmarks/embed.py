"""Throughput and memory of the embed stage (Ray Data actor pool) against a bare PyTorch loop.

    python -m benchmarks.embed --out runs/bench/embed.json [--images 256] [--batch-size 4] [--threads 1]

On the smoke benchmark's generator (here `--images` images, cut into 8 shards) with the smoke
profile's small teacher (random weights: speed does not depend on them), reported:

* stage images/s: `pipelines.embed.run` end to end (Ray start excluded: a warm-up run starts
  it), and once the actor pool is warm (after the first batch);
* bare images/s: one process looping over the same shards with the same encoder, batch size
  and torch threads (decode, SAM preprocessing, encoder, float16 npy serialization), and the
  ratio warm stage / bare (target >= 0.8);
* peak memory (sum of the RSS of the driver and every process it started, Ray's included,
  sampled every 0.1 s) of a fresh process embedding 2 shards and 8 shards: streaming keeps it flat.

With `--gpu` and a CUDA device: SAM ViT-H with random weights at 1024 in bf16, encoder
images/s and peak GPU memory (bare loop over random inputs).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    from edgesam.artifacts import Artifact
    from edgesam.config import EmbedConfig, RuntimeConfig
    from pipelines import embed
    shard, teacher, out, batch, threads, warmup = sys.argv[1:7]
    peak, running = [0], [True]
    def tree_rss():  # RSS of this process and all its descendants (Ray's processes), from /proc
        parent, rss = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            parent[int(pid)] = int(fields["PPid"])
            rss[int(pid)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        tree, total = {os.getpid()}, 0
        for pid in sorted(parent):
            chain, p = [], pid
            while p in parent and p not in tree and p > 1:
                chain.append(p)
                p = parent[p]
            if p in tree:
                tree.update(chain)
        return sum(rss.get(p, 0) for p in tree)
    def sample():
        while running[0]:
            peak[0] = max(peak[0], tree_rss())
            time.sleep(0.1)
    threading.Thread(target=sample, daemon=True).start()
    cfg = EmbedConfig(batch_size=int(batch), cpus_per_actor=int(threads))
    runtime = RuntimeConfig(num_workers=1, object_store_mb=256)
    inputs = {"shard": Artifact("shard", "b", Path(shard)), "teacher": Artifact("teacher", "b", Path(teacher))}
    if warmup == "1":  # start Ray and load the teacher once, so the timed run measures the stage
        embed.run(cfg, runtime, inputs, Path(out + "-warmup"))
    start = time.perf_counter()
    manifest = embed.run(cfg, runtime, inputs, Path(out))
    seconds = time.perf_counter() - start
    running[0] = False
    images = sum(s["samples"] for s in manifest["splits"].values())
    print(json.dumps({"images": images, "seconds": seconds, "images_per_s": images / seconds,
                      "warm_images_per_s": manifest["warm_images_per_s"], "peak_rss_mb": peak[0] / 2**20}))
""")


def build_inputs(root: Path, images: int) -> tuple[Path, Path, Path]:
    """(8-shard artifact, 2-shard artifact, teacher artifact) of the smoke benchmark."""
    from edgesam.artifacts import Artifact, ArtifactStore, sha256_file
    from edgesam.config import load_profile
    from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam
    from pipelines.stage import run_dag

    num_val = max(1, images // 8)
    cfg = load_profile("smoke", {
        "runtime": {"work_dir": str(root / "runs")},
        "data": {"num_train": images - num_val, "num_val": num_val, "images_per_tar": num_val},
        "shard": {"max_count": num_val},
    })
    shard = run_dag(cfg, ArtifactStore(root / "runs"), stages=["data", "shard"])["shard"][0]
    manifest = shard.manifest
    two = Artifact("shard", "two", root / "two")
    for split in ("train", "val"):
        first = manifest["splits"][split]["shards"][0]
        (two.path / split).mkdir(parents=True)
        shutil.copy(shard.path / first["path"], two.path / first["path"])
        manifest["splits"][split] = {"shards": [first], "samples": first["samples"]}
    two.commit({k: v for k, v in manifest.items() if k not in ("stage", "fingerprint", "committed_at")})
    teacher = Artifact("teacher", "bench", root / "teacher")
    teacher.path.mkdir()
    save_tiny_sam(build_tiny_sam(256, cfg.teacher.embed_dim, cfg.teacher.depth, cfg.teacher.num_heads),
                  teacher.path / "teacher.pt")
    teacher.commit({"kind": "synthetic", "checkpoint": "teacher.pt", "img_size": 256,
                    "sha256": sha256_file(teacher.path / "teacher.pt")})
    return shard.path, two.path, teacher.path


def run_stage(shard: Path, teacher: Path, out: Path, batch: int, threads: int, warmup: bool) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", STAGE_SCRIPT, str(shard), str(teacher), str(out), str(batch), str(threads),
         "1" if warmup else "0"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"embed stage run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bare_loop(shard: Path, teacher: Path, batch: int, threads: int) -> dict[str, Any]:
    """The same work without Ray: decode, preprocess, encode, serialize float16 npy."""
    from edgesam.data.shards import iter_samples, list_shards
    from edgesam.data.transforms import preprocess
    from edgesam.models.tiny_sam import load_tiny_sam

    torch.set_num_threads(threads)
    encoder = load_tiny_sam(teacher / "teacher.pt").image_encoder.eval()
    paths = list_shards(shard, "train") + list_shards(shard, "val")

    def encode(images: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for embedding in encoder(torch.stack(images)).numpy().astype(np.float16):
                np.save(io.BytesIO(), embedding, allow_pickle=False)

    encode([preprocess(next(iter_samples(paths)).image, 256)[0]])  # warm-up
    start, images, pending = time.perf_counter(), 0, []
    for sample in iter_samples(paths):
        pending.append(preprocess(sample.image, 256)[0])
        images += 1
        if len(pending) == batch:
            encode(pending)
            pending = []
    if pending:
        encode(pending)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def gpu_vit_h(batch: int, batches: int) -> dict[str, Any]:
    """SAM ViT-H image encoder, random weights, 1024x1024, bf16 autocast: images/s and memory."""
    from segment_anything import sam_model_registry

    encoder = sam_model_registry["vit_h"]().image_encoder.cuda().eval()
    x = torch.randn(batch, 3, 1024, 1024, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        encoder(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            encoder(x)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"device": torch.cuda.get_device_name(), "batch_size": batch, "images_per_s": batch * batches / seconds,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "embed.json")
    parser.add_argument("--images", type=int, default=256, help="benchmark size (8 shards)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the bare loop and of each actor")
    parser.add_argument("--gpu", action="store_true", help="also time SAM ViT-H at 1024 in bf16 on CUDA")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": platform.platform(), "cpus": torch.get_num_threads(),
                              "batch_size": args.batch_size, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        root = Path(tmp)
        shard8, shard2, teacher = build_inputs(root, args.images)
        report["stage"] = run_stage(shard8, teacher, root / "out8", args.batch_size, args.threads, warmup=True)
        report["bare"] = bare_loop(shard8, teacher, args.batch_size, args.threads)
        report["warm_ratio"] = report["stage"]["warm_images_per_s"] / report["bare"]["images_per_s"]
        report["peak_rss_mb"] = {
            "2_shards": run_stage(shard2, teacher, root / "cold2", args.batch_size, args.threads, False)["peak_rss_mb"],
            "8_shards": run_stage(shard8, teacher, root / "cold8", args.batch_size, args.threads, False)["peak_rss_mb"],
        }
    if args.gpu:
        report["gpu_vit_h"] = gpu_vit_h(args.batch_size, 10) if torch.cuda.is_available() else "no CUDA device"
    stage, bare = report["stage"], report["bare"]
    print(f"{'':<28}{'images':>8}{'images/s':>10}")
    print(f"{'embed stage (end to end)':<28}{stage['images']:>8}{stage['images_per_s']:>10.2f}")
    print(f"{'embed stage (pool warm)':<28}{'':>8}{stage['warm_images_per_s']:>10.2f}")
    print(f"{'bare PyTorch loop':<28}{bare['images']:>8}{bare['images_per_s']:>10.2f}")
    print(f"warm stage / bare loop: {report['warm_ratio']:.2f}")
    print(f"peak RSS (driver + Ray processes): 2 shards {report['peak_rss_mb']['2_shards']:.0f} MiB, "
          f"8 shards {report['peak_rss_mb']['8_shards']:.0f} MiB")
    if "gpu_vit_h" in report:
        print(f"GPU ViT-H@1024 bf16: {report['gpu_vit_h']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
