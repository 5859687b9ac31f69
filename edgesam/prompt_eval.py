"""Box- and point-prompt mIoU of students against ground truth and against their teacher.

The prompts follow `edgesam.evaluation`'s default protocol: each object's box (one mask
output) and one positive click at its mask centre (SAM's three multimask outputs, the one of
highest predicted IoU kept). Each student's mask is compared with the ground truth and with
the teacher's mask for the same prompt, at the image's own resolution.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from edgesam.data.transforms import preprocess, scale_boxes, scale_coords
from edgesam.evaluation import EvalItem, center_point
from edgesam.metrics import mask_iou
from edgesam.models.decoding import decode

PROMPT_KINDS = ("box", "point")


@torch.no_grad()
def prompted_masks(sam: Sam, item: EvalItem, clicks: np.ndarray, point_outputs: int = 3) -> dict[str, torch.Tensor]:
    """Bool (N, H, W) masks of every object of `item` prompted with its box and with its click
    (`clicks` (N, 2) xy on the image's frame), per prompt kind, on the image's frame."""
    size, original = sam.image_encoder.img_size, item.image.shape[:2]
    x, hw = preprocess(item.image, size)
    embedding = sam.image_encoder(x[None].to(sam.device))
    boxes = torch.as_tensor(scale_boxes(item.boxes, original, size), dtype=torch.float32, device=sam.device)
    points = torch.as_tensor(scale_coords(clicks, original, size), dtype=torch.float32, device=sam.device)[:, None]
    labels = torch.ones(points.shape[:2], dtype=torch.int64, device=sam.device)
    out = {}
    for kind, (low, scores) in {
        "box": decode(sam, embedding, boxes=boxes, num_outputs=1),
        "point": decode(sam, embedding, points, labels, num_outputs=point_outputs),
    }.items():
        best = low[torch.arange(len(low)), scores.argmax(dim=1)][:, None]
        out[kind] = (sam.postprocess_masks(best, hw, original)[:, 0] > sam.mask_threshold).cpu()
    return out


def evaluate_prompts(
    items: Iterable[EvalItem], teacher: Sam, students: Mapping[str, Sam], point_outputs: int = 3
) -> dict[str, dict[str, float]]:
    """mIoU over objects, {model: {"box_gt", "point_gt", ["box_teacher", "point_teacher"], "objects"}}.

    "teacher" is one of the models (against ground truth only).
    """
    models = {"teacher": teacher, **students}
    ious: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in models}
    for sam in models.values():
        sam.eval()
    for item in tqdm(items, desc="prompt mIoU", unit="img", leave=False):
        if len(item.masks) == 0:
            continue
        gt = torch.as_tensor(item.masks)
        clicks = np.array([center_point(m) for m in item.masks])
        teacher_masks = prompted_masks(teacher, item, clicks, point_outputs)
        for name, sam in models.items():
            masks = teacher_masks if name == "teacher" else prompted_masks(sam, item, clicks, point_outputs)
            for kind in PROMPT_KINDS:
                ious[name].setdefault(f"{kind}_gt", []).append(mask_iou(masks[kind], gt))
                if name != "teacher":
                    ious[name].setdefault(f"{kind}_teacher", []).append(mask_iou(masks[kind], teacher_masks[kind]))
    results: dict[str, dict[str, float]] = {}
    for name, per_key in ious.items():
        if per_key:
            results[name] = {key: round(float(torch.cat(v).mean()), 4) for key, v in per_key.items()}
            results[name]["objects"] = int(sum(len(v) for v in per_key["box_gt"]))
    return results
