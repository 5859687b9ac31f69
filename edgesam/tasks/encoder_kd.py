"""EdgeSAM phase 1: the student encoder learns the teacher's embeddings (pixel-wise MSE)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from edgesam.config import EncoderKDConfig
from edgesam.data.shards import SampleDataset
from edgesam.objectives.distill import encoder_kd_loss
from edgesam.models.edgesam import build_edgesam, edgesam_config, save_edgesam
from edgesam.models.official import load_student
from edgesam.models.student import StudentEncoder
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import EmbedShards, embedding_example, loader

STUDENT_FILE = "student.pt"


@dataclass
class EncoderKDTask:
    """The student encoder alone against stored teacher embeddings (a `TrainTask`); saves a
    complete EdgeSAM whose prompt encoder and mask decoder are the teacher's."""

    backbone: str
    upsample_mode: str
    pretrained: bool | Path
    data: EmbedShards
    loader_workers: int
    teacher: TeacherSource
    seed: int = 0
    init: Path | None = None

    @classmethod
    def from_config(cls, cfg: EncoderKDConfig, data: EmbedShards, teacher: TeacherSource, seed: int) -> EncoderKDTask:
        if cfg.init is not None:
            config = edgesam_config(load_student(cfg.init, data.img_size))
            if config["backbone"] != cfg.backbone:
                raise ValueError(f"encoder_kd.init {cfg.init} is a {config['backbone']} student, but encoder_kd.backbone "
                                 f"is {cfg.backbone}")
        return cls(cfg.backbone, cfg.upsample_mode, cfg.pretrained, data, cfg.train.loader_workers, teacher, seed,
                   cfg.init)

    def build_model(self) -> nn.Module:
        if self.init is not None:
            return load_student(self.init, self.data.img_size).image_encoder
        return StudentEncoder(self.backbone, self.data.img_size, upsample_mode=self.upsample_mode,
                              pretrained=self.pretrained)

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()

    def num_samples(self) -> int:
        return self.data.samples

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterable[Any]:
        dataset = SampleDataset(
            self.data.shards, partial(embedding_example, img_size=self.data.img_size), shuffle=True,
            seed=self.seed, rank=rank, world_size=world_size,
        )
        dataset.set_epoch(epoch)
        return loader(dataset, batch_size, self.loader_workers, self.seed + epoch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return encoder_kd_loss(model(batch["image"]), batch["teacher_emb"], batch["valid"]), {}

    def batch_size_of(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["image"])

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        """The student: this encoder with the init student's decoder, or a fresh student with the teacher's."""
        if self.init is not None:
            sam = load_student(self.init, self.data.img_size)
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
