"""The granularity prior's data-dependent steps in numpy, after `rpn.onnx`: thresholding,
top-k, clipping and NMS of the proposals, and the merge of the proposals around a click.

Twins of `edgesam.models.rpn.proposals` and `knn_merge` (same defaults; `tests/test_numpy_ops.py`
compares them): a change of the PyTorch merge rule fails that test until it is made here too.
"""

from __future__ import annotations

import numpy as np

PRE_NMS_TOP = 1000  # `proposals` defaults
NMS_IOU = 0.6


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
              max_proposals: int, pre_nms_top: int = PRE_NMS_TOP, nms_iou: float = NMS_IOU
              ) -> tuple[np.ndarray, np.ndarray]:
    """`rpn.onnx` outputs (scores (L,), boxes (L, 4)) -> kept boxes (M, 4) clipped to the valid
    region and their scores (M,), best first."""
    keep = np.nonzero(scores > score_threshold)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")[:pre_nms_top]]
    kept_boxes = boxes[keep].astype(np.float32).copy()
    kept_boxes[:, 0::2] = kept_boxes[:, 0::2].clip(0, valid_hw[1])
    kept_boxes[:, 1::2] = kept_boxes[:, 1::2].clip(0, valid_hw[0])
    chosen = nms(kept_boxes, scores[keep], nms_iou)[:max_proposals]
    return kept_boxes[chosen], scores[keep][chosen]


def knn_merge(points: np.ndarray, boxes: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray | None:
    """For each point (N, 2), the confidence-weighted mean of the k proposals whose centres are
    nearest: (N, 4) xyxy, or None without proposals."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(boxes) == 0:
        return None
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = np.linalg.norm(np.asarray(points, np.float64)[:, None] - centres[None], axis=-1)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :min(k, len(boxes))]
    weights = np.clip(scores[nearest], 1e-12, None)[..., None]
    return (boxes[nearest] * weights).sum(axis=1) / weights.sum(axis=1)
