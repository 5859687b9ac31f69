"""How fast the reference teacher leaves the empty-mask plateau, per recipe variant.

    python -m benchmarks.teacher_recipe --shard runs/default/shard/<fp> --out runs/bench/teacher_recipe.json
                                        [--steps 400] [--device cpu] [--threads 2]

A tiny SAM trained from scratch with SAM's recipe first predicts empty masks for every
prompt (train IoU 0) and only later learns to follow its prompts. For each variant (the
default profile's teacher with the learning rate, gradient clipping and decoder init below),
the same training batches run for `--steps` steps on a warm-up + cosine schedule of
`--schedule` steps, and the script reports:

* escape step: the first 25-step window whose mean train box IoU exceeds 0.05;
* train box / point IoU of the last 25-step window;
* val box mIoU and single-point best-of-3 mIoU on `--val-images` val images;
* seconds per step.

A plain loop (no Ray): this measures the recipe, not the training engine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesam.artifacts import Artifact
from edgesam.config import load_profile
from edgesam.data.shards import list_shards
from edgesam.eval.datasets import shard_items
from edgesam.eval.miou import ground_truth_miou
from edgesam.tasks.teacher import TeacherTask
from edgesam.train.loop import move_to
from edgesam.train.schedule import build_scheduler

VARIANTS = {  # name: (lr, grad_clip, tied cross-attention init)
    "previous default (lr 1.5e-3, clip 1)": (1.5e-3, 1.0, False),
    "lr 5e-4, clip 0.1": (5e-4, 0.1, False),
    "lr 5e-4, clip 0.1, tied q/k (default)": (5e-4, 0.1, True),
}
WINDOW = 25


def run_variant(shard: Path, lr: float, clip: float, tied: bool, args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_profile("default").teacher.model_copy(update={"tied_attention_init": tied})
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    device = torch.device(args.device)
    task = TeacherTask.from_config(cfg, Artifact("shard", shard.name, shard), seed=0)
    model = task.build_model().to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, args.schedule, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
    batches = itertools.chain.from_iterable(task.batches(0, 1, epoch, cfg.train.batch_size) for epoch in itertools.count())
    windows: list[dict[str, float]] = []
    window: dict[str, list[float]] = {}
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = move_to(next(batches), device)
        loss, metrics = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            window.setdefault(key, []).append(value)
        if step % WINDOW == 0:
            windows.append({"step": step, **{k: float(np.mean(v)) for k, v in window.items()}})
            window = {}
    seconds = time.perf_counter() - start
    escape = next((w["step"] for w in windows if w.get("train_box_iou", 0.0) > 0.05), None)
    val = ground_truth_miou(model, shard_items(list_shards(shard, "val"), args.val_images))
    last = windows[-1] if windows else {}
    return {
        "lr": lr, "grad_clip": clip, "tied_attention_init": tied, "escape_step": escape,
        "train_box_iou": last.get("train_box_iou"), "train_point_iou": last.get("train_point_iou"),
        "val_box_miou": val["box_miou"], "val_point_best_of_3_miou": val["point_best_of_3_miou"],
        "seconds_per_step": seconds / args.steps, "windows": windows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard", type=Path, required=True, help="a shard artifact directory (train/ and val/)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--schedule", type=int, default=2000, help="length of the cosine schedule")
    parser.add_argument("--val-images", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/teacher_recipe.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name, (lr, clip, tied) in VARIANTS.items():
        print(f"running {name} for {args.steps} steps ...", flush=True)
        results[name] = run_variant(args.shard, lr, clip, tied, args)
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "threads": args.threads, "steps": args.steps, "schedule": args.schedule, "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{'variant':<40} {'escape':>6} {'train box':>9} {'val box':>7} {'val point':>9} {'s/step':>6}")
    for name, r in results.items():
        escape = str(r["escape_step"]) if r["escape_step"] is not None else "never"
        print(f"{name:<40} {escape:>6} {r['train_box_iou'] or 0:>9.3f} {r['val_box_miou']:>7.3f} "
              f"{r['val_point_best_of_3_miou']:>9.3f} {r['seconds_per_step']:>6.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
