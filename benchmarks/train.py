"""Training throughput of the two distillation phases, beside their data loaders' own.

    python -m benchmarks.train --out runs/bench/train.json [--img-size 1024] [--batch-sizes 4,16]
                               [--embed runs/default/embed/<fp> --teacher-checkpoint ...]
                               [--device cuda] [--steps 2] [--warmup 1] [--threads 2]

For each phase (encoder_kd, prompt_kd with the profile's settings):

* example images/s of one process reading, decoding and preparing samples: "before" the
  float32 CPU preprocessing the loaders used to do (`preprocess`, the embedding cast to
  float32), "after" the uint8 image and stored float16 embedding (`embedding_example`; the
  normalization now runs on the device, inside the step); and loader images/s, the task's own
  loader iterated in-process (one loader worker: prompt sampling and collation included);
* step images/s: `edgesam.train.step.TrainStep` (forward, backward, clip, fused AdamW) on
  batches already in memory, median of `--steps` timed steps after `--warmup`, and how many
  loader workers that step consumes (step rate / one loader's rate);
* phase 2 at every `--batch-sizes` B: "before" is the per-image reference
  (`prompt_in_the_loop_loss_per_image`: B x decode_iters decoder calls of each model), "after"
  the batched loss (decode_iters calls, whatever B), each as a whole step and as the loss
  alone (decoders, sampling, backward to fixed student embeddings), with their ratio.

Peak memory is the process max RSS on CPU, max allocated on GPU. Without `--embed` the script
writes a small distillation set itself: `--images` images of the embedded benchmark's
generator, embedded by a randomly initialized small teacher (speed does not depend on the
weights; the decoders are SAM's size whatever the teacher).
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
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from edgesam.artifacts import sha256_file
from edgesam.config import DataConfig, PipelineConfig, TrainConfig, load_profile
from edgesam.data.shards import Sample, iter_samples, list_shards, write_shards
from edgesam.data.synth import generate_image
from edgesam.data.transforms import preprocess
from edgesam.models.edgesam import build_edgesam, save_edgesam
from edgesam.models.teacher import TeacherSource
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam
from edgesam.objectives.distill import prompt_in_the_loop_loss, prompt_in_the_loop_loss_per_image
from edgesam.objectives.prompts import Prompts
from edgesam.tasks.data import EmbedShards, device_images, embedding_example
from edgesam.tasks.encoder_kd import EncoderKDTask
from edgesam.tasks.prompt_kd import PromptKDTask
from edgesam.train import move_to
from edgesam.train.loop import TaskForward
from edgesam.train.step import NonFiniteGuard, TrainStep, build_optimizer


def synthesize(root: Path, images: int, img_size: int) -> tuple[Path, Path]:
    """An embed-like directory (train/ shards with emb.npy) and a small teacher checkpoint."""
    teacher = build_tiny_sam(img_size, embed_dim=64, depth=1, num_heads=2)
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


def step_prompts(batch: dict[str, Any], kind: str) -> Prompts:
    given = batch["prompts"]
    return Prompts(boxes=given["boxes"]) if kind == "box" else Prompts(given["points"], given["labels"])


def split_prompts(batch: dict[str, Any], kind: str) -> list[Prompts]:
    """The batch's joined prompts back as one set per image (host side: the reference path)."""
    counts = torch.bincount(batch["image_index"], minlength=len(batch["image"])).tolist()
    joined = step_prompts(batch, kind)
    if kind == "box":
        return [Prompts(boxes=b) for b in torch.split(joined.boxes, counts)]
    return [Prompts(p, lab) for p, lab in zip(torch.split(joined.points, counts), torch.split(joined.labels, counts))]


class PerImagePromptKD(PromptKDTask):
    """Phase 2 with the per-image reference loss: the "before" row (`cfg.prompt_types` fixed)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        student_emb = model.student.image_encoder(device_images(batch["image"], batch["hw"]))
        return prompt_in_the_loop_loss_per_image(model.student, model.teacher, student_emb, batch["teacher_emb"],
                                                 split_prompts(batch, self.cfg.prompt_types), batch["valid"], self.cfg)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def collect(task: Any, batch_size: int, count: int) -> tuple[list[Any], float]:
    """`count` batches of the task's loader in this process, and its images/s."""
    start, batches = time.perf_counter(), []
    for batch in task.batches(0, 1, 0, batch_size):
        batches.append(batch)
        if len(batches) == count:
            break
    return batches, sum(task.batch_size_of(b) for b in batches) / (time.perf_counter() - start)


def float32_example(sample: Sample, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loaders computed per sample before: normalized float32 image, float32 embedding."""
    return preprocess(sample.image, img_size)[0], torch.from_numpy(sample.embedding.astype(np.float32))


def transform_rate(data: EmbedShards, images: int, transform: Callable[[Sample, int], Any]) -> float:
    """Images/s of reading, decoding and `transform`ing samples in one process."""
    start, done = time.perf_counter(), 0
    for sample in iter_samples(data.shards):
        transform(sample, data.img_size)
        done += 1
        if done == images:
            break
    return done / (time.perf_counter() - start)


def timed(run: Callable[[int], Any], images: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of `run(i)`: the median of `steps` timed calls after `warmup`."""
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        run(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def build_step(task: Any, train: TrainConfig, device: torch.device) -> TrainStep:
    """The training loop's own step (forward, backward, clip, fused AdamW) over a fresh model."""
    torch.manual_seed(0)
    model = task.build_model().to(device).train()
    trainable = list(task.parameters(model))
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trainable))
    return TrainStep(TaskForward(task, model), build_optimizer(model, trainable, train, 1e-5), trainable,
                     train.grad_clip, NonFiniteGuard(device))


def step_rate(task: Any, train: TrainConfig, batches: list[Any], steps: int, warmup: int,
              device: torch.device) -> float:
    """Images/s of the loop's own step on in-memory batches."""
    step = build_step(task, train, device)
    on_device = [move_to(b, device) for b in batches]
    return timed(lambda i: step(on_device[i % len(on_device)], i + 1), task.batch_size_of(batches[0]), steps, warmup,
                 device)


def loss_rate(task: PromptKDTask, batch: dict[str, Any], batched: bool, steps: int, warmup: int,
              device: torch.device) -> float:
    """Images/s of the phase-2 loss alone (and its backward) on fixed student embeddings."""
    torch.manual_seed(0)
    model = task.build_model().to(device)
    batch = move_to(batch, device)
    with torch.no_grad():
        emb = model.student.image_encoder(device_images(batch["image"], batch["hw"]))

    kind = task.cfg.prompt_types

    def run(_: int) -> None:
        student_emb = emb.clone().requires_grad_()
        if batched:
            loss, _ = prompt_in_the_loop_loss(model.student, model.teacher, student_emb, batch["teacher_emb"],
                                              step_prompts(batch, kind), batch["image_index"], batch["valid"], task.cfg)
        else:
            loss, _ = prompt_in_the_loop_loss_per_image(model.student, model.teacher, student_emb,
                                                        batch["teacher_emb"], split_prompts(batch, kind),
                                                        batch["valid"], task.cfg)
        loss.backward()

    return timed(run, len(batch["image"]), steps, warmup, device)


def phase1(task: EncoderKDTask, data: EmbedShards, train: TrainConfig, batch_size: int, args: argparse.Namespace,
           device: torch.device) -> dict[str, Any]:
    batches, loader = collect(task, batch_size, args.steps + args.warmup)
    step = step_rate(task, train, batches, args.steps, args.warmup, device)
    return {"batch_size": batch_size,
            "example_images_per_s_before": round(transform_rate(data, args.images, float32_example), 2),
            "example_images_per_s_after": round(transform_rate(data, args.images, embedding_example), 2),
            "loader_images_per_s": round(loader, 2), "step_images_per_s": round(step, 3),
            "loaders_per_step": round(step / loader, 2), "peak_memory_mb": round(peak_memory_mb(device), 1)}


def phase2(tasks: tuple[PromptKDTask, PerImagePromptKD], train: TrainConfig, batch_size: int,
           args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    batched, per_image = tasks
    batches, loader = collect(batched, batch_size, args.steps + args.warmup)
    row = {"batch_size": batch_size, "loader_images_per_s": round(loader, 2)}
    for name, task in (("before", per_image), ("after", batched)):
        row[f"step_images_per_s_{name}"] = round(step_rate(task, train, batches, args.steps, args.warmup, device), 3)
        row[f"loss_images_per_s_{name}"] = round(loss_rate(batched, batches[0], task is batched, args.steps,
                                                           args.warmup, device), 3)
    row["step_ratio"] = round(row["step_images_per_s_after"] / row["step_images_per_s_before"], 2)
    row["loss_ratio"] = round(row["loss_images_per_s_after"] / row["loss_images_per_s_before"], 2)
    row["loaders_per_step"] = round(row["step_images_per_s_after"] / loader, 2)
    row["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    return row


def build_tasks(cfg: PipelineConfig, data: EmbedShards, teacher_ckpt: Path, root: Path,
                prompt_type: str) -> tuple[EncoderKDTask, tuple[PromptKDTask, PerImagePromptKD]]:
    teacher = TeacherSource("synthetic", str(teacher_ckpt), sha256_file(teacher_ckpt), data.img_size)
    encoder = EncoderKDTask.from_config(cfg.encoder_kd.model_copy(update={"train": cfg.encoder_kd.train.model_copy(
        update={"loader_workers": 0})}), data, teacher, cfg.runtime.seed)
    student_ckpt = root / "phase1.pt"
    save_edgesam(build_edgesam(cfg.encoder_kd.backbone, data.img_size, teacher_ckpt), student_ckpt)
    prompt_cfg = cfg.prompt_kd.model_copy(update={"prompt_types": prompt_type, "train": cfg.prompt_kd.train.model_copy(
        update={"loader_workers": 0})})
    batched = PromptKDTask.from_config(prompt_cfg, data, student_ckpt, teacher, cfg.runtime.seed)
    per_image = PerImagePromptKD(prompt_cfg, data, batched.student, teacher, cfg.runtime.seed)
    return encoder, (batched, per_image)


def print_table(report: dict[str, Any]) -> None:
    p1 = report["phases"]["encoder_kd"]
    print(f"{'phase':<11} {'batch':>5} {'example img/s (fp32 -> uint8)':>30} {'loader img/s':>12} "
          f"{'step img/s':>10} {'loaders/step':>12} {'peak MB':>8}")
    print(f"{'encoder_kd':<11} {p1['batch_size']:>5} {p1['example_images_per_s_before']:>13} -> "
          f"{p1['example_images_per_s_after']:<13} {p1['loader_images_per_s']:>12} {p1['step_images_per_s']:>10} "
          f"{p1['loaders_per_step']:>12} {p1['peak_memory_mb']:>8}")
    print(f"\n{'prompt_kd':<11} {'batch':>5} {'loader img/s':>12} {'step before':>11} {'step after':>10} "
          f"{'ratio':>6} {'loss before':>11} {'loss after':>10} {'ratio':>6} {'loaders/step':>12}")
    for r in report["phases"]["prompt_kd"]["by_batch"]:
        print(f"{'':<11} {r['batch_size']:>5} {r['loader_images_per_s']:>12} {r['step_images_per_s_before']:>11} "
              f"{r['step_images_per_s_after']:>10} {r['step_ratio']:>6} {r['loss_images_per_s_before']:>11} "
              f"{r['loss_images_per_s_after']:>10} {r['loss_ratio']:>6} {r['loaders_per_step']:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed", type=Path, help="an embed artifact directory (else synthesize one)")
    parser.add_argument("--teacher-checkpoint", type=Path, help="tiny SAM checkpoint matching --embed")
    parser.add_argument("--profile", default="default", help="profile whose encoder_kd/prompt_kd settings to use")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="phase 1's batch and the only phase-2 batch")
    parser.add_argument("--batch-sizes", default="4,16", help="phase-2 batches, before vs after")
    parser.add_argument("--prompt-type", choices=("box", "point"), default="box", help="phase 2's prompts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_profile(args.profile)
    if args.embed and not args.teacher_checkpoint:
        parser.error("--embed needs --teacher-checkpoint")
    sizes = [args.batch_size] if args.batch_size else [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        embed, teacher_ckpt = ((args.embed, args.teacher_checkpoint) if args.embed
                               else synthesize(Path(tmp), args.images, args.img_size))
        data = EmbedShards(args.img_size, [str(p) for p in list_shards(embed, "train")], args.images)
        encoder, prompt = build_tasks(cfg, data, teacher_ckpt, Path(tmp), args.prompt_type)
        p1 = phase1(encoder, data, cfg.encoder_kd.train, args.batch_size or cfg.encoder_kd.train.batch_size, args,
                    device)
        rows = [phase2(prompt, cfg.prompt_kd.train, b, args, device) for b in sizes]
    p2 = {"batch_size": rows[0]["batch_size"], "step_images_per_s": rows[0]["step_images_per_s_after"],
          "loader_images_per_s": rows[0]["loader_images_per_s"], "by_batch": rows}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads, "img_size": args.img_size, "profile": args.profile,
        "backbone": cfg.encoder_kd.backbone, "max_prompts": cfg.prompt_kd.max_prompts,
        "decode_iters": cfg.prompt_kd.decode_iters, "prompt_type": args.prompt_type,
        "phases": {"encoder_kd": p1, "prompt_kd": p2},
    }
    publish(report, args.out)


def publish(report: dict[str, Any], out: Path, table: Callable[[dict[str, Any]], None] = print_table) -> None:
    """Print the report as a table and write it as JSON (the benchmarks' contract)."""
    table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
