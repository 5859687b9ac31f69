"""Stage `teacher`: the SAM whose knowledge is distilled.

With `kind` vit_h/vit_l/vit_b the stage verifies and loads the given SAM checkpoint and
records its SHA-256 (nothing big is copied: the manifest references the file). With
`kind: synthetic` (the embedded benchmark) it trains a small reference SAM at the shards'
`target_size` with SAM's own recipe (`edgesam.train.sam_recipe`) through the shared
Ray Train loop, then measures box and single-point mIoU against the val split's ground
truth and writes them into the manifest.

    python -m pipelines teacher --profile smoke
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from segment_anything.modeling import Sam
from torch import nn

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import RuntimeConfig, TeacherConfig
from edgesam.data.shards import iter_samples, list_shards
from edgesam.models.teacher import (
    TeacherCheckpointError,
    build_tiny_sam,
    file_digests,
    load_teacher,
    load_tiny_sam,
    save_tiny_sam,
    tie_cross_attention_init,
    tiny_sam_config,
)
from edgesam.train import fit
from edgesam.train.sam_recipe import RecipeWeights, evaluate_gt_prompts, interactive_loss, training_example

STAGE = "teacher"
UPSTREAM = ("shard",)
CHECKPOINT = "teacher.pt"
SAM_IMG_SIZE = 1024

log = logging.getLogger("edgesam.pipelines.teacher")


@dataclass
class TeacherTask:
    """The reference teacher as a `TrainTask`: a tiny SAM trained on the train shards."""

    shards: list[str]
    num_train: int
    img_size: int
    embed_dim: int
    depth: int
    num_heads: int
    max_prompts: int
    corrective_clicks: int
    loss_stride: int
    weights: RecipeWeights
    seed: int
    tied_attention_init: bool = True

    @classmethod
    def from_config(cls, cfg: TeacherConfig, shard: Artifact, seed: int) -> TeacherTask:
        """The task of `cfg` on the train split of a committed shard artifact."""
        manifest = shard.manifest
        return cls(
            shards=[str(p) for p in list_shards(shard.path, "train")],
            num_train=int(manifest["splits"]["train"]["samples"]),
            img_size=int(manifest["target_size"]), embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, max_prompts=cfg.max_prompts, corrective_clicks=cfg.corrective_clicks,
            loss_stride=cfg.loss_stride, weights=RecipeWeights(cfg.focal_weight, cfg.dice_weight, cfg.iou_weight),
            seed=seed, tied_attention_init=cfg.tied_attention_init,
        )

    def build_model(self) -> nn.Module:
        sam = build_tiny_sam(self.img_size, self.embed_dim, self.depth, self.num_heads)
        if self.tied_attention_init:
            tie_cross_attention_init(sam.mask_decoder)
        return sam

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()

    def num_samples(self) -> int:
        return self.num_train

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}-{epoch}-{rank}")
        batch: list[dict[str, torch.Tensor]] = []
        for sample in iter_samples(self.shards, shuffle=True, seed=self.seed + epoch, rank=rank, world_size=world_size):
            example = training_example(sample, self.img_size, self.max_prompts, rng)
            if example is None:
                continue
            batch.append(example)
            if len(batch) == batch_size:
                yield _collate(batch)
                batch = []
        if batch:
            yield _collate(batch)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return interactive_loss(
            model, batch["images"], batch["examples"], self.corrective_clicks, self.weights, self.loss_stride
        )

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return len(batch["examples"])

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        save_tiny_sam(model.cpu(), Path(out_dir) / CHECKPOINT, trained_on=self.shards)
        return {"checkpoint": CHECKPOINT}


def _collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    images = torch.stack([ex.pop("image") for ex in examples])
    return {"images": images, "examples": examples}


def verified_checkpoint(artifact: Artifact) -> tuple[Path, str]:
    """The checkpoint path of a committed teacher artifact and its sha256, checked on disk."""
    manifest = artifact.manifest
    path = Path(manifest["checkpoint"])
    path = path if path.is_absolute() else artifact.path / path
    if not path.is_file():
        raise TeacherCheckpointError(f"teacher checkpoint {path} named by {artifact.manifest_path} is missing")
    digest = sha256_file(path)
    if digest != manifest["sha256"]:
        raise TeacherCheckpointError(
            f"teacher checkpoint {path} does not match {artifact.manifest_path}: it changed since the "
            f"teacher stage ran (sha256 {digest}, recorded {manifest['sha256']}); rerun the teacher stage"
        )
    return path, digest


def load_teacher_artifact(artifact: Artifact) -> tuple[Sam, Path]:
    """The teacher `Sam` (eval mode, CPU) of a committed teacher artifact, and its checkpoint path."""
    path, _ = verified_checkpoint(artifact)
    kind = artifact.manifest["kind"]
    sam = load_tiny_sam(path) if kind == "synthetic" else load_teacher(kind, path)
    return sam.eval(), path


def _resolve_sam(cfg: TeacherConfig, target_size: int) -> dict[str, Any]:
    if cfg.checkpoint is None:
        raise TeacherCheckpointError(
            f"teacher.kind={cfg.kind} needs teacher.checkpoint (the path of the official SAM {cfg.kind} "
            "checkpoint), or use teacher.kind=synthetic"
        )
    path = Path(cfg.checkpoint).expanduser().resolve()
    if not path.is_file():
        raise TeacherCheckpointError(f"SAM {cfg.kind} checkpoint not found: {path}")
    sha256, _ = file_digests(path)
    sam = load_teacher(cfg.kind, path)  # verifies the digest of official files and every key and shape
    img_size = sam.image_encoder.img_size
    if target_size != img_size:
        log.warning("shards are resized to %d but SAM %s runs at %d: images are resized again",
                    target_size, cfg.kind, img_size)
    log.info("teacher: verified SAM %s at %s (sha256 %s)", cfg.kind, path, sha256)
    return {"kind": cfg.kind, "checkpoint": str(path), "sha256": sha256,
            "arch": {"kind": cfg.kind}, "img_size": img_size}


def _train_reference(cfg: TeacherConfig, runtime: RuntimeConfig, shard: Artifact, out: Path) -> dict[str, Any]:
    task = TeacherTask.from_config(cfg, shard, runtime.seed)
    img_size = task.img_size
    if not task.shards:
        raise FileNotFoundError(f"{shard.path}/train: the shard artifact has no training shards")
    summary = fit(task, cfg.train, runtime, out)
    checkpoint = out / summary["files"]["checkpoint"]
    sam = load_tiny_sam(checkpoint)
    log.info("teacher: evaluating on the val split")
    val = evaluate_gt_prompts(sam, iter_samples(list_shards(shard.path, "val")), img_size)
    log.info("teacher: val box mIoU %.3f, point best-of-3 mIoU %.3f (%d annotations)",
             val["box_miou"], val["point_best_of_3_miou"], val["annotations"])
    history = summary["history"]
    return {
        "kind": "synthetic",
        "checkpoint": CHECKPOINT,
        "sha256": sha256_file(checkpoint),
        "arch": tiny_sam_config(sam),
        "img_size": img_size,
        "val": val,
        "train": {
            "steps": summary["steps"],
            "seconds": summary["train_seconds"],
            "images_per_s": round(summary["images_per_s"], 2),
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "history": history,
        },
    }


def run(cfg: TeacherConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    shard = inputs["shard"]
    if cfg.kind == "synthetic":
        return _train_reference(cfg, runtime, shard, out)
    return _resolve_sam(cfg, int(shard.manifest["target_size"]))


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
