"""The granularity prior: the RPN trained on COCO-format boxes over the frozen student encoder."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from edgesam.config import RPNConfig
from edgesam.data.coco import CocoBoxes
from edgesam.models.edgesam import load_edgesam
from edgesam.models.rpn import RPN, build_rpn, rpn_loss, save_rpn
from edgesam.models.student import StudentEncoder

RPN_FILE = "rpn.pt"


class FrozenEncoderRPN(nn.Module):
    """The fused, frozen student encoder (kept in eval mode) and the trainable RPN.

    With `cache_features` the encoder's pyramid is kept (float16) per image index after the
    first epoch: the encoder is frozen, so it is a pure function of the image.
    """

    def __init__(self, encoder: StudentEncoder, rpn: RPN, cache_features: bool = False):
        super().__init__()
        self.encoder = encoder.eval().fuse()
        self.encoder.requires_grad_(False)
        self.rpn = rpn
        self.cache: dict[int, list[torch.Tensor]] | None = {} if cache_features else None

    def train(self, mode: bool = True) -> FrozenEncoderRPN:
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
        keys = indices.tolist()
        if self.cache is None or any(k not in self.cache for k in keys):
            _, features = self.encoder.forward_pyramid(images)
            if self.cache is None:
                return features
            for i, key in enumerate(keys):
                self.cache[key] = [f[i].half() for f in features]
        return [torch.stack([self.cache[k][level] for k in keys]).float() for level in range(len(self.rpn.strides))]

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.rpn(self.features(images, indices))


def collate(items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    return {"indices": torch.tensor([i for i, _, _ in items]), "images": torch.stack([x for _, x, _ in items]),
            "boxes": [b for _, _, b in items]}


def predict_settings(cfg: RPNConfig) -> dict[str, Any]:
    """What inference with the prior needs beyond the weights (stored in the checkpoint)."""
    return {"merge": cfg.merge}


@dataclass
class RPNTask:
    """RPN training on a COCO-format instances JSON (a `TrainTask`)."""

    cfg: RPNConfig
    student_checkpoint: str
    annotation_file: str
    images_dir: str
    img_size: int
    samples: int
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: RPNConfig, student_checkpoint: str | Path, annotation_file: str | Path,
                    images_dir: str | Path, img_size: int, seed: int) -> RPNTask:
        samples = len(CocoBoxes(annotation_file, images_dir, img_size))
        return cls(cfg, str(student_checkpoint), str(annotation_file), str(images_dir), img_size, samples, seed)

    def build_model(self) -> nn.Module:
        encoder = load_edgesam(self.student_checkpoint).image_encoder
        rpn = build_rpn(encoder, self.cfg.channels, self.cfg.num_convs)
        return FrozenEncoderRPN(encoder, rpn, self.cfg.cache_features)

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.rpn.parameters()

    def num_samples(self) -> int:
        return self.samples

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterable[Any]:
        dataset = CocoBoxes(self.annotation_file, self.images_dir, self.img_size)
        order = list(range(len(dataset)))
        random.Random(self.seed + epoch).shuffle(order)
        subset = torch.utils.data.Subset(dataset, order[rank::world_size])
        workers = self.cfg.train.loader_workers
        return torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                           prefetch_factor=4 if workers else None)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, deltas = model(batch["images"], batch["indices"])
        return rpn_loss(model.rpn, logits, deltas, batch["boxes"], self.cfg.focal_alpha, self.cfg.focal_gamma,
                        self.cfg.huber_beta)

    def batch_size_of(self, batch: dict[str, Any]) -> int:
        return len(batch["images"])

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        save_rpn(model.rpn, Path(out_dir) / RPN_FILE, **predict_settings(self.cfg))
        return {"rpn": RPN_FILE}
