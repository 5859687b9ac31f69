"""Mask IoU and mIoU aggregation by prompt type and object size.

Object sizes follow COCO (small < 32², medium < 96² pixels of area, large above) on a frame
whose longest side is 640; on other frames the thresholds scale with the longest side, so
a 1024-pixel frame's "small" is < 51².
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

COCO_FRAME = 640
COCO_SMALL = 32**2
COCO_MEDIUM = 96**2
SIZES = ("small", "medium", "large")


def mask_iou(pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of binary masks (..., H, W) -> (...), over the `valid` pixels only when given
    (broadcast, e.g. the unpadded region). Two empty masks agree perfectly (1.0)."""
    pred = torch.as_tensor(pred).bool()
    gt = torch.as_tensor(gt).bool()
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {tuple(pred.shape)}, ground truth {tuple(gt.shape)}")
    if valid is not None:
        keep = valid.bool().to(pred.device)
        pred, gt = pred & keep, gt & keep
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def size_bucket(area: float, frame_hw: tuple[int, int]) -> str:
    """COCO size class of an object of `area` pixels on a frame of (height, width)."""
    scale = (max(frame_hw) / COCO_FRAME) ** 2
    if area < COCO_SMALL * scale:
        return "small"
    if area < COCO_MEDIUM * scale:
        return "medium"
    return "large"


@dataclass(frozen=True)
class IoURecord:
    """The IoU of one annotation (of image `image`) under one prompt by one model on one dataset."""

    model: str
    dataset: str
    prompt: str
    size: str
    iou: float
    image: str = ""


def summarize(records: Iterable[IoURecord]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """mIoU as {dataset: {model: {prompt: {"all", "small", "medium", "large", "count"}}}}.

    Keys keep the order in which they first occur in `records`; size entries are present
    only for sizes that occur.
    """
    groups: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        bucket = groups[(r.dataset, r.model, r.prompt)]
        bucket["all"].append(r.iou)
        bucket[r.size].append(r.iou)
    out: dict = {}
    for (dataset, model, prompt), values in groups.items():  # in the order first seen
        entry = {name: float(np.mean(v)) for name, v in values.items()}
        entry["count"] = len(values["all"])
        out.setdefault(dataset, {}).setdefault(model, {})[prompt] = entry
    return out
