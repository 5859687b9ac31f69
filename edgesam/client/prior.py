"""The granularity prior's data-dependent steps in numpy, after `rpn.onnx`: thresholding,
top-k, clipping and NMS of the proposals, and the box each click gets under a prior rule.

Twins of `edgesam.models.rpn.proposals` and `prior_boxes` (the rule travels as the bundle's
`config.json` `rpn` entry, `PriorRule` fields); `tests/test_numpy_ops.py` compares them, so a
change of the PyTorch rule fails that test until it is made here too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PRE_NMS_TOP = 1000  # `proposals` default


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS, highest score first (`torchvision.ops.nms`)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        lt = np.maximum(boxes[best, :2], boxes[rest, :2])
        rb = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # empty boxes: 0 / 0 never suppresses, as in torchvision
            iou = inter / (area[best] + area[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.array(keep, np.int64)


def proposals(scores: np.ndarray, boxes: np.ndarray, valid_hw: tuple[int, int], score_threshold: float,
              max_proposals: int | None, pre_nms_top: int = PRE_NMS_TOP, nms_iou: float | None = 0.6
              ) -> tuple[np.ndarray, np.ndarray]:
    """`rpn.onnx` outputs (scores (L,), boxes (L, 4)) -> kept boxes (M, 4) clipped to the valid
    region and their scores (M,), best first; no NMS when `nms_iou` is None."""
    keep = np.nonzero(scores > score_threshold)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")[:pre_nms_top]]
    kept_boxes = boxes[keep].astype(np.float32).copy()
    kept_boxes[:, 0::2] = kept_boxes[:, 0::2].clip(0, valid_hw[1])
    kept_boxes[:, 1::2] = kept_boxes[:, 1::2].clip(0, valid_hw[0])
    kept_scores = scores[keep]
    order = nms(kept_boxes, kept_scores, nms_iou) if nms_iou is not None else np.arange(len(keep))  # already sorted
    chosen = order[:max_proposals]
    return kept_boxes[chosen], kept_scores[chosen]


def prior_boxes(points: np.ndarray, boxes: np.ndarray, scores: np.ndarray, rule: dict[str, Any]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The prior box of each click (N, 2): (boxes (N, 4) xyxy, found (N,) bool); rows without a
    box (no proposal, or none containing the click under the `best` pick) are zeros."""
    points = np.asarray(points, np.float64)
    n = len(points)
    out = np.zeros((n, 4))
    if len(boxes) == 0:
        return out, np.zeros(n, bool)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = np.linalg.norm(points[:, None] - centres[None], axis=-1)  # (N, M)
    k = min(rule["k"], len(boxes))
    if rule["pick"] == "weighted":
        nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
        weights = np.clip(scores[nearest], 1e-12, None)[..., None]
        return (boxes[nearest] * weights).sum(axis=1) / weights.sum(axis=1), np.ones(n, bool)
    x, y = points[:, 0:1], points[:, 1:2]
    inside = (boxes[:, 0] < x) & (x < boxes[:, 2]) & (boxes[:, 1] < y) & (y < boxes[:, 3])  # strict, as EdgeSAM
    distance = np.where(inside, distance, np.inf)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
    candidate = np.where(np.isfinite(np.take_along_axis(distance, nearest, 1)), scores[nearest], -1.0)
    best = np.take_along_axis(nearest, candidate.argmax(axis=1)[:, None], 1)[:, 0]
    found = inside.any(axis=1)
    out[found] = boxes[best[found]]
    return out, found
