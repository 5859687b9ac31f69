"""Stage `rpn`: the granularity prior, trained on COCO-format boxes on the frozen student.

Reads the data artifact's COCO-format instances JSON (the embedded benchmark's whole
objects, or real COCO through `data.coco_*`) and the phase-2 student. The student encoder is
fused and frozen; only the RPN (FPN + shared head) trains, in the shared loop (Ray Train),
with focal loss on objectness and Huber loss on boxes. Proposals are then measured on the
val JSON with pycocotools' COCOeval, class-agnostic (box AP, AR@100). Writes `rpn.pt`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import nn

from edgesam.artifacts import Artifact
from edgesam.config import RPNConfig, RuntimeConfig
from edgesam.data.transforms import preprocess, scale_boxes, xywh_to_xyxy
from edgesam.evaluation import class_agnostic_box_eval, rpn_detections
from edgesam.models.edgesam import load_edgesam
from edgesam.models.rpn import RPN, build_rpn, encode_with_features, load_rpn, rpn_loss, save_rpn
from edgesam.train import fit, training_summary

STAGE = "rpn"
UPSTREAM = ("data", "prompt_kd")
RPN_FILE = "rpn.pt"

log = logging.getLogger("edgesam.pipelines.rpn")


class FrozenEncoderRPN(nn.Module):
    """The fused, frozen student encoder (kept in eval mode) and the trainable RPN.

    With `cache_features` the encoder's features are kept (float16) per image index after
    the first epoch: the encoder is frozen, so they are a pure function of the image.
    """

    def __init__(self, encoder: nn.Module, rpn: RPN, cache_features: bool = False):
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
            _, features = encode_with_features(self.encoder, images)
            if self.cache is None:
                return features
            for i, key in enumerate(keys):
                self.cache[key] = [f[i].half() for f in features]
        return [torch.stack([self.cache[k][level] for k in keys]).float() for level in range(len(self.rpn.strides))]

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.rpn(self.features(images, indices))


class CocoBoxes(torch.utils.data.Dataset):
    """Images of a COCO-format JSON, preprocessed to `img_size`, with their non-crowd boxes
    in the model's input frame."""

    def __init__(self, annotation_file: str, images_dir: str, img_size: int):
        self.coco = COCO(annotation_file)
        self.image_ids = sorted(self.coco.getImgIds())
        self.images_dir = Path(images_dir)
        self.annotation_file = annotation_file
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        info = self.coco.imgs[self.image_ids[index]]
        path = self.images_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{self.annotation_file}: image {info['id']} refers to {path}, which does not exist")
        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=info["id"]))
                if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        x, _ = preprocess(image, self.img_size)
        boxes = scale_boxes(xywh_to_xyxy(np.array([a["bbox"] for a in anns])), image.shape[:2], self.img_size)
        return index, x, torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def collate(items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    return {"indices": torch.tensor([i for i, _, _ in items]), "images": torch.stack([x for _, x, _ in items]),
            "boxes": [b for _, _, b in items]}


@dataclass
class RPNTask:
    """RPN training as a `TrainTask`."""

    cfg: RPNConfig
    student_checkpoint: str
    annotation_file: str
    images_dir: str
    img_size: int
    samples: int
    seed: int = 0

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


def predict_settings(cfg: RPNConfig) -> dict[str, Any]:
    """What inference with the prior needs beyond the weights (stored in the checkpoint)."""
    return {"k": cfg.k, "score_threshold": cfg.score_threshold, "max_proposals": cfg.max_proposals}


def run(cfg: RPNConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    data, prompt_kd = inputs["data"].manifest, inputs["prompt_kd"]
    student = str(prompt_kd.path / prompt_kd.manifest["student"])
    img_size = int(prompt_kd.manifest["img_size"])
    coco_train, coco_val, images = data.get("coco_train"), data.get("coco_val"), data.get("coco_images")
    if not (coco_train and coco_val and images):
        raise ValueError(
            f"the rpn stage trains on COCO-format boxes, but the data artifact {inputs['data'].path} has none: "
            "set data.coco_train, data.coco_val and data.coco_images (instances JSONs and their image directory)"
        )
    samples = len(COCO(coco_train).getImgIds())
    log.info("training the RPN on %d images of %s (student %s, %d px)", samples, coco_train, student, img_size)
    task = RPNTask(cfg, student, coco_train, images, img_size, samples, runtime.seed)
    summary = fit(task, cfg.train, runtime, out)
    sam = load_edgesam(student)
    sam.image_encoder.fuse()
    rpn = load_rpn(out / RPN_FILE)
    log.info("measuring proposals on %s", coco_val)
    detections = rpn_detections(sam, rpn, coco_val, images, cfg.score_threshold, cfg.max_proposals)
    quality = class_agnostic_box_eval(coco_val, detections)
    log.info("RPN on val: box AP %.3f, AP50 %.3f, AR@100 %.3f", quality["ap"], quality["ap50"], quality["ar100"])
    return {
        "rpn": RPN_FILE,
        "student": student,
        "img_size": img_size,
        "train_samples": samples,
        **training_summary(summary),
        "proposals": quality,
        **predict_settings(cfg),
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
