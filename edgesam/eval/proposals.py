"""Granularity-prior proposals on a COCO-format set, scored class-agnostically with COCOeval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from segment_anything.modeling import Sam
from tqdm import tqdm

from edgesam.data.coco import load_coco, quiet, read_image
from edgesam.data.transforms import preprocess
from edgesam.models.rpn import RPN, proposals

BOX_METRICS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100")


def _to_original(boxes: torch.Tensor, original_hw: tuple[int, int], resized_hw: tuple[int, int]) -> np.ndarray:
    """xyxy boxes of the resized frame back to the original image frame."""
    sy, sx = original_hw[0] / resized_hw[0], original_hw[1] / resized_hw[1]
    return boxes.cpu().numpy() * np.array([sx, sy, sx, sy])


@torch.no_grad()
def rpn_detections(sam: Sam, rpn: RPN, annotation_file: str | Path, images_dir: str | Path,
                   score_threshold: float = 0.05, max_proposals: int = 100, nms_iou: float = 0.6) -> list[dict]:
    """Proposals on every image of a COCO-format JSON, decoded as detections (NMS'd, at most
    `max_proposals`), as COCO results (xywh, original frame)."""
    coco = load_coco(annotation_file)
    category = min(coco.getCatIds(), default=1)
    size = sam.image_encoder.img_size
    results = []
    for image_id in tqdm(sorted(coco.getImgIds()), desc="proposals", mininterval=2.0, disable=None):
        image = read_image(coco, image_id, annotation_file, images_dir)
        x, hw = preprocess(image, size)
        _, features = sam.image_encoder.forward_pyramid(x[None].to(sam.device))
        boxes, scores = proposals(rpn, *rpn(features), [hw], score_threshold, max_proposals, nms_iou=nms_iou)[0]
        xyxy = _to_original(boxes, image.shape[:2], hw)
        for (x0, y0, x1, y1), score in zip(xyxy.tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    return results


def class_agnostic_box_eval(annotation_file: str | Path, detections: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval of boxes ignoring categories: AP, AP50, AP75, AR@1/10/100."""
    if not detections:
        return {name: 0.0 for name in BOX_METRICS}
    gt = load_coco(annotation_file)
    evaluator = COCOeval(gt, quiet(gt.loadRes, detections), iouType="bbox")
    evaluator.params.useCats = 0
    quiet(evaluator.evaluate)
    quiet(evaluator.accumulate)
    quiet(evaluator.summarize)
    return {name: round(max(float(v), 0.0), 4) for name, v in zip(BOX_METRICS, evaluator.stats)}
