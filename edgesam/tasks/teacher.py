"""The reference teacher: a tiny SAM trained from scratch with SAM's interactive recipe."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from edgesam.artifacts import Artifact
from edgesam.config import TeacherConfig
from edgesam.data.shards import iter_samples, list_shards
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam, tie_cross_attention_init
from edgesam.objectives.sam_recipe import RecipeWeights, interactive_loss, training_example

CHECKPOINT = "teacher.pt"


@dataclass
class TeacherTask:
    """A tiny SAM trained on the train shards of a shard artifact (a `TrainTask`)."""

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
    hflip: bool = False

    @classmethod
    def from_config(cls, cfg: TeacherConfig, shard: Artifact, seed: int) -> TeacherTask:
        manifest = shard.manifest
        shards = [str(p) for p in list_shards(shard.path, "train")]
        if not shards:
            raise FileNotFoundError(f"{shard.path}/train: the shard artifact has no training shards")
        return cls(
            shards=shards, num_train=int(manifest["splits"]["train"]["samples"]),
            img_size=int(manifest["target_size"]), embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, max_prompts=cfg.max_prompts, corrective_clicks=cfg.corrective_clicks,
            loss_stride=cfg.loss_stride, weights=RecipeWeights(cfg.focal_weight, cfg.dice_weight, cfg.iou_weight),
            seed=seed, tied_attention_init=cfg.tied_attention_init, hflip=cfg.hflip,
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
            example = training_example(sample, self.img_size, self.max_prompts, rng,
                                       hflip=self.hflip and rng.random() < 0.5)
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
