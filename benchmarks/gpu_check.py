"""What a GPU machine runs in under 10 minutes to check the training and embed paths on it.

    python -m benchmarks.gpu_check --out runs/bench/gpu_check.json [--img-size 1024] [--batch-sizes 2,8]

Never a test dependency (the project's machines have no GPU). Reported, as a table and JSON:

* phase 1 and phase 2 steps at `--img-size` on the default profile's student: images/s and
  peak GPU memory (`benchmarks.train`'s step: forward, backward, clip, fused AdamW), phase 2
  at every `--batch-sizes` B, batched vs the per-image reference;
* host syncs per step: `torch.cuda.set_sync_debug_mode("warn")` around one warm step, every
  synchronizing call counted (the batched step should show none; metrics are read every
  `log_every` steps, outside the step);
* teacher embeddings/s: SAM ViT-H (random weights) at 1024 in bf16 autocast, batch 1,
  attention eager (segment-anything's own) vs SDPA (`edgesam.models.sdpa.use_sdpa`), with
  peak memory.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry

from benchmarks.train import build_step, build_tasks, collect, peak_memory_mb, publish, synthesize, timed
from edgesam.config import load_profile
from edgesam.data.shards import list_shards
from edgesam.models.sdpa import use_sdpa
from edgesam.tasks.data import EmbedShards
from edgesam.train import move_to


def count_syncs(step: Any, batch: Any, device: torch.device) -> int:
    """Synchronizing CUDA calls made by one call of `step` (0 on a CPU device: nothing to count)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def step_row(task: Any, train: Any, batches: list[Any], args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s, peak memory and host syncs of the training step of `task` on `batches`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = build_step(task, train, device)
    on_device = [move_to(b, device) for b in batches]
    rate = timed(lambda i: step(on_device[i % len(on_device)], i + 1), task.batch_size_of(batches[0]),
                 args.steps, args.warmup, device)
    return {"batch_size": task.batch_size_of(batches[0]), "images_per_s": round(rate, 2),
            "syncs_per_step": count_syncs(step, on_device[0], device),
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def teacher_rows(device: torch.device, img_size: int, steps: int) -> list[dict[str, Any]]:
    """SAM ViT-H image-encoder embeddings/s, eager attention vs SDPA."""
    encoder = sam_model_registry["vit_h"]().image_encoder.to(device).eval()
    x = torch.randn(1, 3, img_size, img_size, device=device)
    rows = []
    for attention in ("eager", "sdpa"):
        if attention == "sdpa":
            use_sdpa(encoder)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            rate = timed(lambda _: encoder(x), 1, steps, 1, device)
        rows.append({"attention": attention, "images_per_s": round(rate, 2),
                     "peak_memory_mb": round(peak_memory_mb(device), 1)})
    return rows


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['device']}, {report['img_size']} px, {report['backbone']}")
    print(f"{'phase':<24} {'batch':>5} {'img/s':>8} {'syncs/step':>10} {'peak MB':>9}")
    for name, row in report["steps"]:
        print(f"{name:<24} {row['batch_size']:>5} {row['images_per_s']:>8} {row['syncs_per_step']:>10} "
              f"{row['peak_memory_mb']:>9}")
    print(f"\n{'ViT-H attention':<24} {'img/s':>8} {'peak MB':>9}")
    for row in report["teacher"]:
        print(f"{row['attention']:<24} {row['images_per_s']:>8} {row['peak_memory_mb']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", default="2,8")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-teacher", action="store_true", help="leave out the ViT-H measurement")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/gpu_check.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    cfg = load_profile("default")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        embed, teacher_ckpt = synthesize(Path(tmp), args.images, args.img_size)
        data = EmbedShards(args.img_size, [str(p) for p in list_shards(embed, "train")], args.images)
        encoder, (batched, per_image) = build_tasks(cfg, data, teacher_ckpt, Path(tmp), "box")
        for b in [int(v) for v in args.batch_sizes.split(",")]:
            rows.append(("encoder_kd", step_row(encoder, cfg.encoder_kd.train, collect(encoder, b, 2)[0], args, device)))
            batches = collect(batched, b, 2)[0]
            for name, task in (("prompt_kd per-image ref", per_image), ("prompt_kd batched", batched)):
                rows.append((name, step_row(task, cfg.prompt_kd.train, batches, args, device)))
    teacher = [] if args.skip_teacher else teacher_rows(device, 1024, args.steps)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "img_size": args.img_size, "backbone": cfg.encoder_kd.backbone, "steps": rows, "teacher": teacher}
    publish(report, args.out, print_table)


if __name__ == "__main__":
    main()
