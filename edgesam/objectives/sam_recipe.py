"""Segment Anything's own training recipe, for the reference teacher of the embedded benchmark.

Per image: up to `max_prompts` ground-truth masks, prompted by their boxes or by one random
interior point each (equal odds per image), then `corrective_clicks` rounds that add one
click sampled uniformly from the error region of the previous prediction (positive in
misses, negative in false alarms) and feed the previous low-res logits back as the mask
prompt. Masks are supervised at input resolution with focal and dice losses (SAM: 20:1), the
IoU head with MSE to the actual IoU; ambiguous single-point prompts predict 3 masks and only
the best one is trained (SAM Sec. 3 and appendix A).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from edgesam.data.shards import Sample
from edgesam.data.transforms import preprocess, valid_mask
from edgesam.metrics import mask_iou
from edgesam.models.decoding import decode
from edgesam.objectives.losses import dice_loss, iou_head_loss, sigmoid_focal_loss
from edgesam.objectives.prompts import error_region_clicks, interior_points


@dataclass(frozen=True)
class RecipeWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0


def training_example(sample: Sample, img_size: int, max_prompts: int, rng: random.Random,
                     hflip: bool = False) -> dict[str, Any] | None:
    """Preprocessed image, up to `max_prompts` padded GT masks and their boxes (None if unannotated).

    `hflip` mirrors the image, its masks and boxes (the flip augmentation of long teacher runs).
    """
    if not sample.annotations:
        return None
    chosen = sorted(rng.sample(range(len(sample.annotations)), min(max_prompts, len(sample.annotations))))
    raw, masks, boxes = sample.image, torch.from_numpy(sample.masks(chosen)), sample.boxes(chosen)
    if hflip:
        raw, masks = raw[:, ::-1], masks.flip(-1)
        boxes = np.stack([sample.hw[1] - boxes[:, 2], boxes[:, 1], sample.hw[1] - boxes[:, 0], boxes[:, 3]], axis=1)
    image, (h, w) = preprocess(np.ascontiguousarray(raw), img_size)
    scale = h / sample.hw[0]
    if masks.shape[-2:] != (h, w):
        masks = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear")[:, 0] > 0.5
    padded = torch.zeros(len(chosen), img_size, img_size, dtype=torch.bool)
    padded[:, :h, :w] = masks
    return {
        "image": image,
        "masks": padded,
        "boxes": torch.from_numpy(boxes * scale).float(),
        "valid": valid_mask((h, w), img_size),
    }


def interactive_loss(
    sam: Sam,
    images: torch.Tensor,
    examples: list[dict[str, torch.Tensor]],
    corrective_clicks: int,
    weights: RecipeWeights,
    loss_stride: int = 1,
    box_prob: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM's interactive training loss over a batch of images (see module docstring).

    Mask losses are computed on a grid of input size / `loss_stride` (SAM: 1, the input
    resolution): logits are upsampled bilinearly, targets average-pooled (soft at edges).
    """
    size = images.shape[-1]
    grid = size // loss_stride
    embeddings = sam.image_encoder(images)
    total = embeddings.new_zeros(())
    box_ious, point_ious = [], []
    for i, ex in enumerate(examples):
        gt, valid = ex["masks"], ex["valid"]
        n = len(gt)
        target = F.avg_pool2d(gt.float()[:, None], loss_stride) if loss_stride > 1 else gt.float()[:, None]
        valid_grid = F.max_pool2d(valid.float()[None], loss_stride)[0] > 0 if loss_stride > 1 else valid
        use_boxes = bool(torch.rand(()) < box_prob)
        boxes = ex["boxes"] if use_boxes else None
        points = labels = None
        if not use_boxes:
            points, labels = interior_points(gt)
        outputs, mask_input = (1 if use_boxes else 3), None
        image_loss = embeddings.new_zeros(())
        rows = torch.arange(n, device=gt.device)
        for it in range(1 + corrective_clicks):
            low, iou_pred = decode(sam, embeddings[i:i + 1], points, labels, boxes, mask_input, outputs)
            logits = low if low.shape[-1] == grid else F.interpolate(low, size=(grid, grid), mode="bilinear", align_corners=False)
            tgt = target.expand_as(logits)
            mask_loss = weights.focal * sigmoid_focal_loss(logits, tgt, valid_grid, reduction="none") + \
                weights.dice * dice_loss(logits, tgt, valid_grid, reduction="none")
            actual = mask_iou(logits.detach() > 0, tgt > 0.5, valid_grid).to(logits.dtype)
            best = mask_loss.detach().argmin(dim=1)
            iou_loss = iou_head_loss(iou_pred, actual, reduction="none").mean(dim=1)
            image_loss = image_loss + (mask_loss[rows, best] + weights.iou * iou_loss).mean()
            if it == 0:
                (box_ious if use_boxes else point_ious).append(float(actual[rows, best].mean()))
            if it < corrective_clicks:
                previous = low.detach()[rows, best][:, None]
                full = F.interpolate(previous, size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0
                click, click_label = error_region_clicks(gt, full, valid)
                points = click if points is None else torch.cat([points, click], dim=1)
                labels = click_label if labels is None else torch.cat([labels, click_label], dim=1)
                mask_input, outputs = previous, 1
        total = total + image_loss / (1 + corrective_clicks)
    metrics = {}
    if box_ious:
        metrics["train_box_iou"] = float(np.mean(box_ious))
    if point_ious:
        metrics["train_point_iou"] = float(np.mean(point_ious))
    return total / len(examples), metrics
