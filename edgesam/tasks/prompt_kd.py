"""EdgeSAM phase 2: prompt-in-the-loop distillation of the student against the frozen teacher."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from segment_anything.modeling import Sam
from torch import nn

from edgesam.config import PromptKDConfig
from edgesam.data.shards import Sample
from edgesam.objectives.distill import prompt_in_the_loop_loss
from edgesam.models.edgesam import save_edgesam
from edgesam.models.official import load_student
from edgesam.models.teacher import TeacherSource
from edgesam.objectives.prompts import (
    Prompts, batch_prompts, choose_prompt_kind, gt_boxes, gt_points, sample_annotations,
)
from edgesam.tasks.data import (
    EmbedShards, LoaderCache, device_images, embedding_example, shard_batches, speed_up_encoder,
)
from edgesam.tasks.encoder_kd import STUDENT_FILE


class PromptKDModel(nn.Module):
    """The student being trained beside the frozen teacher's prompt encoder and mask decoder.

    The teacher's image encoder is dropped: its embeddings are stored in the embed shards.
    """

    def __init__(self, student: Sam, teacher: Sam):
        super().__init__()
        teacher.image_encoder = nn.Identity()
        self.student = student
        self.teacher = teacher.requires_grad_(False)


def prompt_example(sample: Sample, img_size: int, max_prompts: int, seed: int, epoch: int) -> dict[str, Any] | None:
    """A phase-1 example plus up to `max_prompts` annotations' boxes and points in the input
    frame (the step picks one kind), drawn per (seed, epoch, image); None without annotations."""
    if not sample.annotations:
        return None
    example = embedding_example(sample, img_size, valid_stride=4)
    chosen = sample_annotations(len(sample.annotations), max_prompts, random.Random(f"{seed}/{epoch}/{sample.key}"))
    picked = [sample.annotations[i] for i in chosen]
    scale = img_size / max(sample.hw)
    points, labels = gt_points(picked, scale)
    example["prompts"] = Prompts(points, labels, gt_boxes(picked, scale))
    return example


def collate_prompts(examples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the images' tensors; join all their prompts into one set (`prompts`: boxes, points,
    labels) with the image of each prompt (`image_index`), the layout the batched loss decodes."""
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ValueError("a prompt_kd batch has no image with annotations")
    batch = torch.utils.data.default_collate([{k: v for k, v in e.items() if k != "prompts"} for e in examples])
    prompts, batch["image_index"] = batch_prompts([e["prompts"] for e in examples])
    batch["prompts"] = {"boxes": prompts.boxes, "points": prompts.points, "labels": prompts.labels}
    return batch


@dataclass
class PromptKDTask:
    """Phase 2 from a student (the phase-1 one, read once on the driver and shipped with the
    task) against the frozen teacher (a `TrainTask`)."""

    cfg: PromptKDConfig
    data: EmbedShards
    student: Sam = field(repr=False)
    teacher: TeacherSource
    seed: int = 0
    loaders: LoaderCache = field(default_factory=LoaderCache, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: PromptKDConfig, data: EmbedShards, student_checkpoint: str | Path,
                    teacher: TeacherSource, seed: int) -> PromptKDTask:
        return cls(cfg, data, load_student(student_checkpoint, data.img_size), teacher, seed)

    @property
    def find_unused_parameters(self) -> bool:
        """Whether some trainable parameter gets no gradient: the IoU head when it trains (no
        loss uses the student's scores), the prompt encoder's box and mask parts when it trains."""
        return (not self.cfg.freeze_decoder and not self.cfg.freeze_iou_head) or not self.cfg.freeze_prompt_encoder

    def build_model(self) -> nn.Module:
        student = copy.deepcopy(self.student)
        speed_up_encoder(student.image_encoder, self.cfg.channels_last, self.cfg.compile)
        return PromptKDModel(student, self.teacher.load())

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        student = model.student
        frozen = [
            (student.image_encoder, self.cfg.freeze_encoder),
            (student.prompt_encoder, self.cfg.freeze_prompt_encoder),
            (student.mask_decoder, self.cfg.freeze_decoder),
        ]
        head = {id(p) for p in student.mask_decoder.iou_prediction_head.parameters()} if self.cfg.freeze_iou_head else set()
        params = [p for module, freeze in frozen if not freeze for p in module.parameters() if id(p) not in head]
        if not params:
            raise ValueError("prompt_kd: encoder, prompt encoder and decoder are all frozen; nothing to train")
        return params

    def num_samples(self) -> int:
        return self.data.samples

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterable[Any]:
        transform = partial(prompt_example, img_size=self.data.img_size, max_prompts=self.cfg.max_prompts,
                            seed=self.seed)
        return shard_batches(self.loaders, self.data, transform, self.cfg.train.loader_workers, self.seed, rank,
                             world_size, epoch, batch_size, collate_prompts)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batched prompt-in-the-loop loss; boxes or points for the whole step (Python's RNG)."""
        images = device_images(batch["image"], batch["hw"], self.cfg.channels_last)
        with torch.set_grad_enabled(not self.cfg.freeze_encoder):
            student_emb = model.student.image_encoder(images)
        kind = choose_prompt_kind(self.cfg.prompt_types, self.cfg.box_prob)
        given = batch["prompts"]
        prompts = Prompts(boxes=given["boxes"]) if kind == "box" else Prompts(given["points"], given["labels"])
        loss, metrics = prompt_in_the_loop_loss(model.student, model.teacher, student_emb, batch["teacher_emb"],
                                                prompts, batch["image_index"], batch["valid"], self.cfg)
        return loss, {**metrics, "box_steps": float(kind == "box")}

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return len(batch["image"])

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        save_edgesam(model.student, Path(out_dir) / STUDENT_FILE, stage="prompt_kd")
        return {"student": STUDENT_FILE}
