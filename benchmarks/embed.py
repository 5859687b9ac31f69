"""Throughput and memory of the embed stage (Ray Data actor pool) against a bare loop.

    python -m benchmarks.embed --out runs/bench/embed.json [--images 256] [--batch-size 4] [--threads 1]
    python -m benchmarks.embed --zero-cost-teacher --out runs/bench/embed-zero-cost.json [--images 128]

Default: on the smoke benchmark's generator (here `--images` images, cut into 8 shards) with the
smoke profile's small teacher (random weights: speed does not depend on them), reported:

* stage images/s: `pipelines.embed.run` end to end (Ray start excluded: a warm-up run starts
  it), and once the actor pool is warm (after the first committed shard);
* bare images/s: one process looping over the same shards with the same encoder, batch size
  and torch threads (decode, SAM preprocessing, encoder, float16 npy serialization), and the
  ratio warm stage / bare (target >= 0.8);
* peak memory (sum of the RSS of the driver and every process it started, Ray's included,
  sampled every 0.1 s) of a fresh process embedding 2 shards and 8 shards: streaming keeps it flat.

With `--gpu` and a CUDA device: SAM ViT-H with random weights at 1024 in bf16, encoder
images/s and peak GPU memory (bare loop over random inputs).

`--zero-cost-teacher`: the stage's own work at 1024 px with an encoder that returns one
constant 256x64x64 tensor, so only reading, decoding, preprocessing, serializing and writing
count. The teacher is `ConstantTeacher`, a `TeacherSource` defined here whose `load()` builds
that encoder; it is handed to `edgesam.tasks.embed.embed_shards` (what the stage's `run`
calls after listing the shards), so no benchmark code reaches the library. Inputs: `--images`
samples at 1024 (longest side, JPEG quality 95 as the shard stage writes them; 16 generated
scenes repeated under distinct keys) in 8 shards. Reported: images/s with 1 and 2 actors (end
to end with Ray already started, and after the first committed shard) and CPU ms per image of
the process tree (Ray's processes included; also after the first shard), beside a bare loop in
this process that reads the same shards and writes the same tars (same bytes, checked) with
the same library functions, timed before and after the stage runs; and the peak process-tree
RSS of the stage on 2 vs 8 shards (1 actor).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
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

from edgesam.models.teacher import TeacherSource

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    spec = json.loads(sys.argv[1])
    samples = {"rss": 0, "cpu": {}, "cpu_before": None}  # CPU seconds by pid; at the first sample
    running = [True]
    def tree():  # this process and all its descendants (Ray's processes), from /proc
        parent = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(pid)] = int(fields[1])
        members, changed = {os.getpid()}, True
        while changed:
            grown = members | {p for p, pp in parent.items() if pp in members}
            changed, members = grown != members, grown
        return members
    def sample():
        ticks = os.sysconf("SC_CLK_TCK")
        while running[0]:
            rss = 0
            for pid in tree():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                samples["cpu"][pid] = (int(stat[11]) + int(stat[12])) / ticks  # utime + stime
                rss += int(status.split("VmRSS:")[1].split()[0]) * 1024 if "VmRSS:" in status else 0
            samples["rss"] = max(samples["rss"], rss)
            samples["cpu_before"] = samples["cpu_before"] or dict(samples["cpu"])
            time.sleep(0.1)
    from edgesam.config import EmbedConfig, RuntimeConfig
    cfg = EmbedConfig(batch_size=spec["batch"], cpus_per_actor=spec["threads"], concurrency=spec["actors"])
    runtime = RuntimeConfig(num_workers=1, object_store_mb=256)
    if spec["teacher"] is None:  # the zero-cost teacher: the library's embed_shards, Ray started first
        from benchmarks.embed import ConstantTeacher, shard_jobs
        from edgesam.tasks.embed import embed_shards
        from edgesam.cluster import connect_ray
        connect_ray(runtime)
        jobs = shard_jobs(Path(spec["shard"]), Path(spec["out"]))
        def stage():
            first = None
            for summary in embed_shards(jobs, ConstantTeacher("constant", "", "", spec["img_size"]), cfg, False):
                if first is None:
                    first, samples["cpu_first"] = (time.perf_counter(), summary["samples"]), dict(samples["cpu"])
            return first
    else:
        from edgesam.artifacts import Artifact
        from pipelines import embed
        inputs = {"shard": Artifact("shard", "b", Path(spec["shard"])),
                  "teacher": Artifact("teacher", "b", Path(spec["teacher"]))}
        if spec["warmup"]:  # start Ray and load the teacher once, so the timed run measures the stage
            embed.run(cfg, runtime, inputs, Path(spec["out"] + "-warmup"))
        def stage():
            samples["manifest"] = embed.run(cfg, runtime, inputs, Path(spec["out"]))
    threading.Thread(target=sample, daemon=True).start()
    while samples["cpu_before"] is None:
        time.sleep(0.01)
    start = time.perf_counter()
    first = stage()
    end = time.perf_counter()
    time.sleep(0.2)
    running[0] = False
    cpu_s = sum(samples["cpu"].values()) - sum(samples["cpu_before"].values())
    result = {"seconds": end - start, "peak_rss_mb": samples["rss"] / 2**20, "cpu_s": cpu_s}
    if "manifest" in samples:
        manifest = samples["manifest"]
        result["images"] = sum(s["samples"] for s in manifest["splits"].values())
        result["warm_images_per_s"] = manifest["warm_images_per_s"]
    else:
        result["images"] = sum(n for _, _, n in jobs)
        result["warm_images_per_s"] = (result["images"] - first[1]) / (end - first[0])
        warm_cpu_s = sum(samples["cpu"].values()) - sum(samples["cpu_first"].values())
        result["warm_cpu_ms_per_image"] = 1000 * warm_cpu_s / (result["images"] - first[1])
    result["images_per_s"] = result["images"] / result["seconds"]
    print(json.dumps(result))
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


def run_stage(**spec: Any) -> dict[str, Any]:
    """One stage run in a fresh process (its own Ray) under the RSS and CPU sampler of STAGE_SCRIPT."""
    spec = {"teacher": None, "actors": 1, "warmup": False, "img_size": 1024, **spec}
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, json.dumps(spec)], cwd=REPO, env=env,
                            capture_output=True, text=True, check=False)  # PYTHONPATH: Ray workers import this file
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


class ConstantEncoder(torch.nn.Module):
    """An image encoder at zero cost: the same 256 x S/16 x S/16 embedding for every input."""

    def __init__(self, img_size: int):
        super().__init__()
        grid = img_size // 16
        self.register_buffer("embedding", torch.randn(256, grid, grid, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.expand(len(x), -1, -1, -1)


class ConstantSam(torch.nn.Module):
    def __init__(self, img_size: int):
        super().__init__()
        self.image_encoder = ConstantEncoder(img_size)


class ConstantTeacher(TeacherSource):
    """The zero-cost teacher: a `TeacherSource` (picklable, `load()` in each actor) of `ConstantSam`."""

    def load(self) -> ConstantSam:
        return ConstantSam(self.img_size)


def shard_jobs(shard_dir: Path, out: Path) -> list[tuple[str, Path, int]]:
    """(source, target, samples) of the input shards in `shard_dir`, as the stage lists them."""
    counts = json.loads((shard_dir / "counts.json").read_text())
    return [(str(shard_dir / name), out / name, n) for name, n in sorted(counts.items())]


def build_inputs_1024(root: Path, images: int, shards: int) -> tuple[Path, Path]:
    """(`shards`-shard directory, its first 2 shards) of `images` samples at 1024 as the shard stage
    writes them: 16 generated scenes, longest side resized to 1024, JPEG quality 95, JSON record."""
    from PIL import Image

    from edgesam.config import DataConfig
    from edgesam.data.synth import generate_image
    from edgesam.data.tars import tar_writer
    from edgesam.data.transforms import resize_image

    scenes = []
    for image_id in range(16):
        jpg, record, _ = generate_image(image_id, DataConfig(min_side=768, max_side=1024))
        image = resize_image(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")), 1024)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        scenes.append((buffer.getvalue(), json.dumps(record).encode()))
    all_dir, two_dir = root / "in8", root / "in2"
    counts: dict[str, int] = {}
    per_shard = -(-images // shards)
    for index in range(shards):
        ids = range(index * per_shard, min(images, (index + 1) * per_shard))
        name = f"shard-{index:06d}.tar"
        with tar_writer(all_dir / name) as write:
            for i in ids:
                write(f"sa_{i}", {"jpg": scenes[i % 16][0], "json": scenes[i % 16][1]})
        counts[name] = len(ids)
    (all_dir / "counts.json").write_text(json.dumps(counts))
    two_dir.mkdir()
    for name in sorted(counts)[:2]:
        shutil.copy(all_dir / name, two_dir / name)
    (two_dir / "counts.json").write_text(json.dumps({n: counts[n] for n in sorted(counts)[:2]}))
    return all_dir, two_dir


def bare_writer(shard_dir: Path, out: Path, batch: int, threads: int) -> dict[str, Any]:
    """The zero-cost stage's work in one loop, no Ray, no threads: read each input shard, decode and
    preprocess, encode (constant), serialize float16 npy, write the tar through `write_shard`
    with its SHA-256 computed on the way, as the actors do."""
    from edgesam.tasks.embed import EMBEDDING, encode_npy, teacher_input, write_shard
    from edgesam.data.shards import iter_raw

    torch.set_num_threads(threads)
    encoder = ConstantTeacher("constant", "", "", 1024).load().image_encoder
    cpu, start = time.process_time(), time.perf_counter()
    images = 0
    for source, target, expected in shard_jobs(shard_dir, out):
        def samples():
            stream = iter_raw(source)
            while chunk := [item for _, item in zip(range(batch), stream)]:
                x = torch.stack([teacher_input(source, key, members, 1024) for key, members in chunk])
                for (key, members), embedding in zip(chunk, encoder(x).float().numpy().astype(np.float16)):
                    yield key, {**members, EMBEDDING: encode_npy(embedding)}

        images += write_shard(samples(), target, expected, source, hashlib.sha256())
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "cpu_s": time.process_time() - cpu}


def zero_cost(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count(), "img_size": 1024,
                              "images": args.images, "shards": 8, "batch_size": args.batch_size,
                              "threads": args.threads, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-embed0-") as tmp:
        root = Path(tmp)
        shard8, shard2 = build_inputs_1024(root, args.images, 8)
        common = {"batch": args.batch_size, "threads": args.threads}
        bare = [bare_writer(shard8, root / "bare", args.batch_size, args.threads)]
        reference = {p.name: p.read_bytes() for p in (root / "bare").glob("*.tar")}
        for actors in (1, 2):
            out = root / f"stage{actors}"
            report[f"stage_{actors}_actors"] = run_stage(shard=shard8, out=out, actors=actors, **common)
            if {p.name: p.read_bytes() for p in out.glob("*.tar")} != reference:
                raise RuntimeError(f"{out}: the stage's tars differ from the bare writer's")
            shutil.rmtree(out)
        report["peak_rss_mb"] = {"2_shards": run_stage(shard=shard2, out=root / "mem2", **common)["peak_rss_mb"],
                                 "8_shards": report["stage_1_actors"]["peak_rss_mb"]}
        shutil.rmtree(root / "bare")
        bare.append(bare_writer(shard8, root / "bare", args.batch_size, args.threads))
    report["bare"] = bare
    bare_rate = sum(b["images_per_s"] for b in bare) / len(bare)
    report["load_average_after"] = os.getloadavg()
    print(f"embed stage, zero-cost teacher, {args.images} images at 1024 in 8 shards, batch {args.batch_size}, "
          f"{args.threads} thread(s) per actor; load average {report['load_average_before'][0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'':<24}{'images/s':>10}{'warm img/s':>12}{'vs bare':>9}{'CPU ms/img':>12}{'warm CPU':>10}")
    for b, when in zip(bare, ("before", "after")):
        print(f"{'bare writer (' + when + ')':<24}{b['images_per_s']:>10.2f}{'':>12}{'':>9}"
              f"{1000 * b['cpu_s'] / b['images']:>12.0f}")
    for actors in (1, 2):
        stage = report[f"stage_{actors}_actors"]
        stage["warm_vs_bare"] = stage["warm_images_per_s"] / bare_rate
        print(f"{f'stage, {actors} actor(s)':<24}{stage['images_per_s']:>10.2f}{stage['warm_images_per_s']:>12.2f}"
              f"{stage['warm_vs_bare']:>9.2f}{1000 * stage['cpu_s'] / stage['images']:>12.0f}"
              f"{stage['warm_cpu_ms_per_image']:>10.0f}")
    print("warm: after the first committed shard; CPU: user + system of the whole process tree (Ray's included)")
    print(f"peak RSS (driver + Ray processes), 1 actor: 2 shards {report['peak_rss_mb']['2_shards']:.0f} MiB, "
          f"8 shards {report['peak_rss_mb']['8_shards']:.0f} MiB")
    return report


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


def tiny_teacher(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": platform.platform(), "cpus": torch.get_num_threads(),
                              "batch_size": args.batch_size, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        root = Path(tmp)
        shard8, shard2, teacher = build_inputs(root, args.images)
        common = {"teacher": teacher, "batch": args.batch_size, "threads": args.threads, "img_size": 256}
        report["stage"] = run_stage(shard=shard8, out=root / "out8", warmup=True, **common)
        report["bare"] = bare_loop(shard8, teacher, args.batch_size, args.threads)
        report["warm_ratio"] = report["stage"]["warm_images_per_s"] / report["bare"]["images_per_s"]
        report["peak_rss_mb"] = {
            "2_shards": run_stage(shard=shard2, out=root / "cold2", **common)["peak_rss_mb"],
            "8_shards": run_stage(shard=shard8, out=root / "cold8", **common)["peak_rss_mb"],
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
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "embed.json")
    parser.add_argument("--zero-cost-teacher", action="store_true",
                        help="time reading, preprocessing and writing at 1024 with a constant encoder")
    parser.add_argument("--images", type=int, help="benchmark size, 8 shards (default 256; 128 with --zero-cost-teacher)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the bare loop and of each actor")
    parser.add_argument("--gpu", action="store_true", help="also time SAM ViT-H at 1024 in bf16 on CUDA")
    args = parser.parse_args()
    args.images = args.images or (128 if args.zero_cost_teacher else 256)
    report = zero_cost(args) if args.zero_cost_teacher else tiny_teacher(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
