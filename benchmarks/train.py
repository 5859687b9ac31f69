"""Training throughput of the two distillation phases, beside their data loaders' own.

    python -m benchmarks.train --out runs/bench/train.json [--embed runs/default/embed/<fp>]
                               [--device cuda] [--steps 5] [--threads 2]

For each phase (encoder_kd, prompt_kd with the default profile's settings):

* loader images/s: the task's own DataLoader (decoding, preprocessing, prompt sampling)
  iterated alone for `--steps` batches;
* step images/s: forward + backward + AdamW step on batches already in memory, median of
  `--steps` timed steps after `--warmup`;
* the ratio (should be >= 3: the loader is then not the bottleneck) and peak memory
  (process max RSS on CPU, max allocated on GPU).

Without `--embed` the script writes a small distillation set itself: `--images` images of
the embedded benchmark's generator, embedded by a randomly initialized tiny teacher (speed
does not depend on the weights).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from edgesam.config import DataConfig, load_profile
from edgesam.data.shards import list_shards, write_shards
from edgesam.data.synth import generate_image
from edgesam.data.transforms import preprocess
from edgesam.models.edgesam import build_edgesam, save_edgesam
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam
from edgesam.artifacts import sha256_file
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import EmbedShards
from edgesam.tasks.encoder_kd import EncoderKDTask
from edgesam.tasks.prompt_kd import PromptKDTask
from edgesam.train import move_to


def synthesize(root: Path, images: int, img_size: int) -> tuple[Path, Path]:
    """An embed-like directory (train/ shards with emb.npy) and a tiny teacher checkpoint."""
    teacher = build_tiny_sam(img_size)
    save_tiny_sam(teacher, root / "teacher.pt")
    cfg = DataConfig(min_side=img_size * 3 // 4, max_side=img_size)

    def samples():
        for image_id in range(images):
            jpg, record, _ = generate_image(image_id, cfg)
            image = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
            with torch.no_grad():
                emb = teacher.image_encoder(preprocess(image, img_size)[0][None])[0].numpy().astype(np.float16)
            buffer = io.BytesIO()
            np.save(buffer, emb)
            yield {"__key__": f"sa_{image_id}", "jpg": jpg, "json": json.dumps(record).encode(),
                   "emb.npy": buffer.getvalue()}

    write_shards(samples(), root / "train", max_count=64, max_size=1 << 30)
    return root, root / "teacher.pt"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(task: Any, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    start = time.perf_counter()
    batches, images = [], 0
    for batch in task.batches(0, 1, 0, batch_size):
        batches.append(batch)
        images += task.batch_size_of(batch)
        if len(batches) == steps + warmup:
            break
    loader_ips = images / (time.perf_counter() - start)
    torch.manual_seed(0)
    model = task.build_model().to(device).train()
    params = list(task.parameters(model))
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + warmup):
        batch = move_to(batches[i % len(batches)], device)
        t0 = time.perf_counter()
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) / task.batch_size_of(batch))
    step_ips = 1.0 / statistics.median(times)
    return {
        "batch_size": batch_size,
        "loader_images_per_s": round(loader_ips, 2),
        "step_images_per_s": round(step_ips, 3),
        "loader_to_step_ratio": round(loader_ips / step_ips, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed", type=Path, help="an embed artifact directory (else synthesize one)")
    parser.add_argument("--teacher-checkpoint", type=Path, help="tiny SAM checkpoint matching --embed")
    parser.add_argument("--profile", default="default", help="profile whose encoder_kd/prompt_kd settings to use")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="both phases' batch (default: the profile's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_profile(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        if args.embed:
            if not args.teacher_checkpoint:
                parser.error("--embed needs --teacher-checkpoint")
            embed, teacher_ckpt, img_size = args.embed, args.teacher_checkpoint, args.img_size
        else:
            embed, teacher_ckpt = synthesize(Path(tmp), args.images, args.img_size)
            img_size = args.img_size
        data = EmbedShards(img_size, [str(p) for p in list_shards(embed, "train")], args.images)
        teacher = TeacherSource("synthetic", str(teacher_ckpt), sha256_file(teacher_ckpt), img_size)
        phase1 = EncoderKDTask.from_config(cfg.encoder_kd, data, teacher, cfg.runtime.seed)
        student_ckpt = Path(tmp) / "phase1.pt"
        save_edgesam(build_edgesam(cfg.encoder_kd.backbone, img_size, teacher_ckpt), student_ckpt)
        phase2 = PromptKDTask.from_config(cfg.prompt_kd, data, student_ckpt, teacher, cfg.runtime.seed)
        results = {
            "encoder_kd": measure(phase1, args.batch_size or cfg.encoder_kd.train.batch_size, args.steps, args.warmup,
                                  device),
            "prompt_kd": measure(phase2, args.batch_size or cfg.prompt_kd.train.batch_size, args.steps, args.warmup,
                                 device),
        }
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads, "img_size": img_size, "profile": args.profile,
        "backbone": cfg.encoder_kd.backbone, "max_prompts": cfg.prompt_kd.max_prompts,
        "decode_iters": cfg.prompt_kd.decode_iters, "phases": results,
    }
    print(f"{'phase':<11} {'batch':>5} {'loader img/s':>13} {'step img/s':>11} {'ratio':>6} {'peak MB':>8}")
    for phase, r in results.items():
        print(f"{phase:<11} {r['batch_size']:>5} {r['loader_images_per_s']:>13} {r['step_images_per_s']:>11} "
              f"{r['loader_to_step_ratio']:>6} {r['peak_memory_mb']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
