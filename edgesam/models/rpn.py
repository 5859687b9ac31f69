"""EdgeSAM's granularity prior: a detachable region proposal network and the kNN box merge.

A light FPN over the frozen student's feature pyramid (stride-8/16/32 backbone maps) feeds one head
shared across levels. The head is FCOS-like (anchor-free): at every location it predicts a
class-agnostic objectness logit and the distances (left, top, right, bottom) to the box
edges, in log units of the level's stride. Positives are locations near a ground-truth box
centre (centre sampling, radius 1.5 strides) whose box size falls in the level's range;
objectness is trained with sigmoid focal loss, boxes with the Huber (smooth L1) loss.

At predict time a point prompt gets a box from the proposals by one of two rules
(`PRIOR_RULES`), and the box and the point go to SAM's mask decoder together:

* ``official`` (EdgeSAM's `eval_mIoU.py`): proposals scoring above 0.1, no NMS; of those that
  contain the click, the 5 with the nearest centres; the best-scoring of them is the box. No
  proposal contains the click: no box (the point alone).
* ``weighted`` (this project's earlier rule): NMS'd proposals above 0.05, the 3 with centres
  nearest to the click merged by a confidence-weighted mean (may not contain the click).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, sigmoid_focal_loss

from edgesam.artifacts import atomic_torch_save
from edgesam.models.checkpoint import CheckpointError, read_checkpoint
from edgesam.models.student import PYRAMID_STRIDES, StudentEncoder

RPN_STRIDES = PYRAMID_STRIDES
MAX_LOG_DISTANCE = math.log(1e4)


class RPN(nn.Module):
    """FPN + shared objectness/box head over backbone feature maps of the given strides."""

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int] = RPN_STRIDES,
        channels: int = 128,
        num_convs: int = 2,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"{len(in_channels)} input channel counts for {len(strides)} strides")
        self.config = {
            "in_channels": list(in_channels), "strides": list(strides), "channels": channels,
            "num_convs": num_convs, "prior_prob": prior_prob,
        }
        self.strides = tuple(strides)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        tower: list[nn.Module] = []
        for _ in range(num_convs):
            tower += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.ReLU()]
        self.tower = nn.Sequential(*tower)
        self.objectness = nn.Conv2d(channels, 1, 3, padding=1)
        self.box = nn.Conv2d(channels, 4, 3, padding=1)
        self.level_scale = nn.Parameter(torch.ones(len(strides)))
        nn.init.constant_(self.objectness.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.box.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Feature maps (finest first) -> per level objectness logits (B, 1, h, w) and
        log-distances (B, 4, h, w)."""
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 2, -1, -1):  # top-down pathway
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        logits, deltas = [], []
        for i, (conv, lat) in enumerate(zip(self.smooth, laterals)):
            x = self.tower(conv(lat))
            logits.append(self.objectness(x))
            deltas.append(self.box(x) * self.level_scale[i])
        return logits, deltas

    def size_ranges(self) -> list[tuple[float, float]]:
        """The box-size range (max distance to an edge) each level is responsible for."""
        bounds = [0.0] + [8.0 * s for s in self.strides[:-1]] + [math.inf]
        return list(zip(bounds[:-1], bounds[1:]))


def build_rpn(encoder: StudentEncoder, channels: int = 128, num_convs: int = 2) -> RPN:
    """An RPN over the student encoder's feature pyramid (`StudentEncoder.forward_pyramid`)."""
    if encoder.feature_strides != RPN_STRIDES:
        raise ValueError(f"backbone {encoder.backbone_name} has pyramid strides {encoder.feature_strides}; "
                         f"the RPN needs {RPN_STRIDES}")
    return RPN(encoder.feature_channels, RPN_STRIDES, channels=channels, num_convs=num_convs)


def _locations(shape: tuple[int, int], stride: int, device: torch.device) -> torch.Tensor:
    """(h*w, 2) xy centres of a level's cells in input pixels."""
    h, w = shape
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() + 0.5) * stride


def assign_targets(
    rpn: RPN,
    shapes: Sequence[tuple[int, int]],
    gt_boxes: Sequence[torch.Tensor],
    radius: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS assignment over all levels.

    Returns labels (B, L) in {0, 1} and log-distance targets (B, L, 4) (valid at positives),
    L being the locations of all levels, finest first.
    """
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    locs, strides, lows, highs = [], [], [], []
    for shape, stride, (low, high) in zip(shapes, rpn.strides, rpn.size_ranges()):
        loc = _locations(shape, stride, device)
        locs.append(loc)
        strides.append(torch.full((len(loc),), float(stride), device=device))
        lows.append(torch.full((len(loc),), low, device=device))
        highs.append(torch.full((len(loc),), high, device=device))
    loc, stride, low, high = (torch.cat(t) for t in (locs, strides, lows, highs))
    labels = torch.zeros(len(gt_boxes), len(loc), device=device)
    targets = torch.zeros(len(gt_boxes), len(loc), 4, device=device)
    for b, boxes in enumerate(gt_boxes):
        if len(boxes) == 0:
            continue
        boxes = boxes.float()
        x, y = loc[:, 0:1], loc[:, 1:2]  # (L, 1) against (M,) boxes
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], dim=-1)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        reach = radius * stride[:, None]
        near = ((x - centre[:, 0]).abs() < reach) & ((y - centre[:, 1]).abs() < reach)
        extent = ltrb.max(dim=-1).values
        ok = (ltrb.min(dim=-1).values > 0) & near & (extent >= low[:, None]) & (extent < high[:, None])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).expand(len(loc), -1)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best_area, best = area.min(dim=1)
        positive = torch.isfinite(best_area)
        labels[b] = positive.float()
        chosen = ltrb[torch.arange(len(loc), device=device), best]
        targets[b] = torch.log(chosen.clamp(min=1e-3) / stride[:, None])
    return labels, targets


def _flatten(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level (B, C, h, w) maps -> (B, L, C)."""
    return torch.cat([t.flatten(2).transpose(1, 2) for t in levels], dim=1)


def rpn_loss(
    rpn: RPN,
    logits: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    huber_beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal objectness loss + Huber box loss, each normalised by the number of positives."""
    shapes = [tuple(t.shape[-2:]) for t in logits]
    labels, targets = assign_targets(rpn, shapes, gt_boxes)
    logit, delta = _flatten(logits)[..., 0], _flatten(deltas)
    positive = labels > 0
    num_pos = max(int(positive.sum()), 1)
    cls = sigmoid_focal_loss(logit, labels, alpha=focal_alpha, gamma=focal_gamma, reduction="sum") / num_pos
    box = F.smooth_l1_loss(delta[positive], targets[positive], beta=huber_beta, reduction="sum") / num_pos
    return cls + box, {"cls": float(cls.detach()), "box": float(box.detach()), "positives": float(positive.sum())}


@torch.no_grad()
def proposals(
    rpn: RPN,
    logits: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    valid_hw: Sequence[tuple[int, int]],
    score_threshold: float = 0.05,
    max_proposals: int | None = 100,
    pre_nms_top: int = 1000,
    nms_iou: float | None = 0.6,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode per image (boxes (M, 4) xyxy clipped to the valid region, scores (M,)), best first;
    class-agnostic NMS across levels unless `nms_iou` is None, at most `max_proposals` if set."""
    out = []
    shapes = [tuple(t.shape[-2:]) for t in logits]
    device = logits[0].device
    loc = torch.cat([_locations(s, st, device) for s, st in zip(shapes, rpn.strides)])
    stride = torch.cat([torch.full((s[0] * s[1],), float(st), device=device) for s, st in zip(shapes, rpn.strides)])
    scores_all = _flatten(logits)[..., 0].sigmoid()
    deltas_all = _flatten(deltas)
    for b, (h, w) in enumerate(valid_hw):
        scores = scores_all[b]
        keep = (scores > score_threshold).nonzero().squeeze(1)
        keep = keep[scores[keep].topk(min(pre_nms_top, len(keep))).indices]
        dist = deltas_all[b, keep].clamp(max=MAX_LOG_DISTANCE).exp() * stride[keep, None]
        xy = loc[keep]
        boxes = torch.cat([xy - dist[:, :2], xy + dist[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        order = nms(boxes, scores[keep], nms_iou) if nms_iou is not None else scores[keep].argsort(descending=True)
        kept = order[:max_proposals]
        out.append((boxes[kept], scores[keep][kept]))
    return out


@dataclass(frozen=True)
class PriorRule:
    """How proposals become the box of a click (see the module docstring)."""

    score_threshold: float
    nms_iou: float | None
    max_proposals: int | None
    k: int
    pick: str  # "best": the best-scoring of the k nearest that contain the click; "weighted": their weighted mean


PRIOR_RULES = {
    "official": PriorRule(score_threshold=0.1, nms_iou=None, max_proposals=None, k=5, pick="best"),
    "weighted": PriorRule(score_threshold=0.05, nms_iou=0.6, max_proposals=100, k=3, pick="weighted"),
}


def prior_proposals(rpn: RPN, features: Sequence[torch.Tensor], valid_hw: Sequence[tuple[int, int]],
                    rule: PriorRule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The proposals a prior rule merges, per image."""
    return proposals(rpn, *rpn(features), valid_hw, rule.score_threshold, rule.max_proposals, nms_iou=rule.nms_iou)


def prior_boxes(points: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                rule: PriorRule) -> tuple[torch.Tensor, torch.Tensor]:
    """The granularity-prior box of each click: (boxes (N, 4) xyxy, found (N,) bool).

    Rows without a box (no proposal, or none containing the click under the official rule)
    are zeros with found False: decode those clicks without a box.
    """
    n = len(points)
    out = torch.zeros(n, 4, device=points.device)
    if len(boxes) == 0:
        return out, torch.zeros(n, dtype=torch.bool, device=points.device)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distance = torch.cdist(points.float(), centres.float())  # (N, M)
    if rule.pick == "weighted":
        nearest = distance.topk(min(rule.k, len(boxes)), dim=1, largest=False).indices  # (N, k)
        weights = scores[nearest].clamp(min=1e-12)
        out = (boxes[nearest] * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return out, torch.ones(n, dtype=torch.bool, device=points.device)
    x, y = points[:, 0:1].float(), points[:, 1:2].float()
    inside = (boxes[:, 0] < x) & (x < boxes[:, 2]) & (boxes[:, 1] < y) & (y < boxes[:, 3])  # strict, as EdgeSAM
    distance = distance.masked_fill(~inside, float("inf"))
    nearest = distance.topk(min(rule.k, len(boxes)), dim=1, largest=False).indices  # (N, k)
    candidate_scores = scores[nearest].masked_fill(~torch.isfinite(distance.gather(1, nearest)), -1.0)
    best = nearest.gather(1, candidate_scores.argmax(dim=1, keepdim=True)).squeeze(1)
    found = inside.any(dim=1)
    out[found] = boxes[best[found]]
    return out, found


def contains(boxes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N,) whether each xyxy box contains its point (borders included)."""
    x, y = points[:, 0], points[:, 1]
    return (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])


def save_rpn(rpn: RPN, path: Path, **meta: Any) -> None:
    """Save the RPN with its build config (atomic)."""
    atomic_torch_save({"kind": "rpn", "config": rpn.config, "meta": meta, "state_dict": rpn.state_dict()}, path)


class RPNCheckpointError(CheckpointError):
    """An RPN checkpoint is missing, corrupt or not an RPN."""


def load_rpn(path: Path) -> RPN:
    """Rebuild an RPN saved by `save_rpn` (weights_only load)."""
    ckpt = read_checkpoint(path, "RPN", RPNCheckpointError)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "rpn":
        raise RPNCheckpointError(f"{path} is not an RPN checkpoint (no 'kind': 'rpn')")
    rpn = RPN(**ckpt["config"])
    rpn.load_state_dict(ckpt["state_dict"])
    return rpn.eval()
