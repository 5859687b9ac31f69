"""EdgeSAM phase 1: the student encoder learns the teacher's embeddings (pixel-wise MSE)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from segment_anything.modeling import Sam
from torch import nn

from edgesam.config import EncoderKDConfig
from edgesam.data.shards import Sample
from edgesam.objectives.distill import encoder_kd_loss
from edgesam.models.edgesam import build_edgesam, edgesam_config, save_edgesam
from edgesam.models.official import load_student
from edgesam.models.student import StudentEncoder
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import (
    EmbedShards, LoaderCache, device_images, embedding_example, shard_batches, speed_up_encoder,
)

STUDENT_FILE = "student.pt"


def encoder_example(sample: Sample, img_size: int, epoch: int) -> dict[str, Any]:
    """A phase-1 example (`embedding_example`), the same in every epoch."""
    return embedding_example(sample, img_size)


@dataclass
class EncoderKDTask:
    """The student encoder alone against stored teacher embeddings (a `TrainTask`); saves a
    complete EdgeSAM whose prompt encoder and mask decoder are the teacher's, or the init
    student's (read once, on the driver, and shipped with the task)."""

    backbone: str
    upsample_mode: str
    pretrained: bool | Path
    data: EmbedShards
    loader_workers: int
    teacher: TeacherSource
    seed: int = 0
    init_student: Sam | None = field(default=None, repr=False)
    channels_last: bool = False
    compile: bool = False
    loaders: LoaderCache = field(default_factory=LoaderCache, repr=False, compare=False)
    find_unused_parameters = False  # the embedding MSE reaches every encoder parameter

    @classmethod
    def from_config(cls, cfg: EncoderKDConfig, data: EmbedShards, teacher: TeacherSource, seed: int) -> EncoderKDTask:
        init = None
        if cfg.init is not None:
            init = load_student(cfg.init, data.img_size)
            backbone = edgesam_config(init)["backbone"]
            if backbone != cfg.backbone:
                raise ValueError(f"encoder_kd.init {cfg.init} is a {backbone} student, but encoder_kd.backbone "
                                 f"is {cfg.backbone}")
        return cls(cfg.backbone, cfg.upsample_mode, cfg.pretrained, data, cfg.train.loader_workers, teacher, seed,
                   init, cfg.channels_last, cfg.compile)

    def build_model(self) -> nn.Module:
        if self.init_student is not None:
            encoder = copy.deepcopy(self.init_student.image_encoder)
        else:
            encoder = StudentEncoder(self.backbone, self.data.img_size, upsample_mode=self.upsample_mode,
                                     pretrained=self.pretrained)
        return speed_up_encoder(encoder, self.channels_last, self.compile)

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()

    def num_samples(self) -> int:
        return self.data.samples

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterable[Any]:
        transform = partial(encoder_example, img_size=self.data.img_size)
        return shard_batches(self.loaders, self.data, transform, self.loader_workers, self.seed, rank, world_size,
                             epoch, batch_size)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images = device_images(batch["image"], batch["hw"], self.channels_last)
        return encoder_kd_loss(model(images), batch["teacher_emb"], batch["valid"]), {}

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return len(batch["image"])

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        """The student: this encoder with the init student's decoder, or a fresh student with the teacher's."""
        if self.init_student is not None:
            sam = copy.deepcopy(self.init_student)
        else:
            sam = build_edgesam(self.backbone, self.data.img_size, self.teacher.load(), self.upsample_mode)
        sam.image_encoder.load_state_dict(model.state_dict())
        save_edgesam(sam, Path(out_dir) / STUDENT_FILE, stage="encoder_kd")
        return {"student": STUDENT_FILE}


def pass_on_init(cfg: EncoderKDConfig, img_size: int, out_dir: Path) -> dict[str, Any]:
    """`encoder_kd.train.epochs: 0`: the init student becomes the phase-1 student unchanged."""
    if cfg.init is None:
        raise ValueError("encoder_kd.train.epochs is 0, which trains nothing: set encoder_kd.init, the student to pass on")
    save_edgesam(load_student(cfg.init, img_size), Path(out_dir) / STUDENT_FILE, stage="encoder_kd", init=str(cfg.init))
    return {"steps": 0, "files": {"student": STUDENT_FILE}, "history": [], "train_seconds": 0.0, "images_per_s": 0.0}
