"""Prompt sampling: ground-truth boxes and points, and EdgeSAM's disagreement points.

Coordinates are xy pixel positions in the model's input frame (the image resized so its
longest side is `img_size`, before padding), the frame and convention of segment-anything's
prompt encoder (which adds 0.5 to reach pixel centres). Padding points carry label -1, which
SAM's prompt encoder embeds as "not a point".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

PAD_LABEL = -1


@dataclass
class Prompts:
    """The prompts of N objects on one image: boxes (N, 4) and/or points (N, P, 2) + labels (N, P)."""

    points: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.boxes) if self.boxes is not None else len(self.points)

    def with_points(self, points: torch.Tensor, labels: torch.Tensor) -> Prompts:
        """These prompts with `points` (N, k, 2) and `labels` (N, k) appended (a box keeps its box)."""
        if self.points is None:
            return Prompts(points, labels, self.boxes)
        return Prompts(
            torch.cat([self.points, points], dim=1), torch.cat([self.labels, labels], dim=1), self.boxes
        )


def gt_boxes(annotations: Sequence[dict[str, Any]], scale: float = 1.0) -> torch.Tensor:
    """(N, 4) xyxy boxes from the annotations' `bbox` (xywh), multiplied by `scale`."""
    if not annotations:
        return torch.zeros(0, 4)
    xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    return xyxy * scale


def gt_points(annotations: Sequence[dict[str, Any]], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 2) positive points from the annotations' first `point_coords`, and (N, 1) labels."""
    coords = []
    for a in annotations:
        points = a.get("point_coords")
        if not points:
            raise ValueError(f"annotation {a.get('id')} has no point_coords")
        coords.append(points[0])
    xy = torch.tensor(coords, dtype=torch.float32).reshape(-1, 1, 2) * scale
    return xy, torch.ones(xy.shape[:2], dtype=torch.int64)


def sample_annotations(num_annotations: int, max_prompts: int, rng: random.Random) -> list[int]:
    """Sorted indices of up to `max_prompts` annotations drawn without replacement."""
    if num_annotations == 0:
        raise ValueError("cannot sample prompts from an image without annotations")
    return sorted(rng.sample(range(num_annotations), min(max_prompts, num_annotations)))


def choose_prompt_kind(
    prompt_types: Literal["both", "box", "point"], box_prob: float, generator: torch.Generator | None = None
) -> Literal["box", "point"]:
    """EdgeSAM: a training step uses boxes with probability `box_prob`, else single points."""
    if prompt_types != "both":
        return prompt_types
    return "box" if float(torch.rand((), generator=generator)) < box_prob else "point"


def disagreement_points(
    teacher: torch.Tensor,
    student: torch.Tensor,
    valid: torch.Tensor | None,
    num_points: int,
    input_size: int,
    generator: torch.Generator | None = None,
    min_cells: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample points uniformly from where the binarized teacher and student masks disagree.

    Args:
        teacher, student: (N, h, w) boolean masks on the low-resolution grid.
        valid: (h, w) boolean unpadded region (None: everywhere).
        num_points: points per prompt, drawn without replacement.
        input_size: side of the model's input frame the (square) grid covers.
        min_cells: prompts whose masks disagree on fewer cells get no point (EdgeSAM: 10).

    Returns:
        points (N, num_points, 2) at the centres of the sampled cells in the input frame
        (pixel positions: cell (i, j) of a grid with cells of s pixels -> (j + 0.5) s - 0.5,
        (i + 0.5) s - 0.5), and labels (N, num_points): 1 where the teacher says foreground and the
        student background (false negative), 0 in the opposite case, -1 (padding, point
        at 0,0) where fewer than `num_points` (or than `min_cells`) cells disagree.
    """
    if teacher.shape != student.shape or teacher.dim() != 3:
        raise ValueError(f"teacher and student masks must both be (N, h, w), got {tuple(teacher.shape)} and {tuple(student.shape)}")
    n, h, w = teacher.shape
    teacher, student = teacher.bool(), student.bool()
    disagree = teacher ^ student
    if valid is not None:
        disagree &= valid.bool().to(disagree.device)
    flat = disagree.reshape(n, h * w)
    counts = flat.sum(dim=1)
    points = torch.zeros(n, num_points, 2)
    labels = torch.full((n, num_points), PAD_LABEL, dtype=torch.int64)
    cell = torch.tensor([input_size / w, input_size / h])
    for i in torch.nonzero(counts >= max(min_cells, 1), as_tuple=False).flatten().tolist():
        k = min(num_points, int(counts[i]))
        idx = torch.multinomial(flat[i].float().cpu(), k, replacement=False, generator=generator)
        ys, xs = idx // w, idx % w
        points[i, :k] = (torch.stack([xs, ys], dim=1).float() + 0.5) * cell - 0.5
        labels[i, :k] = teacher[i].reshape(-1)[idx.to(teacher.device)].long().cpu()
    return points.to(teacher.device), labels.to(teacher.device)


def uniform_pixels(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly (torch's global RNG) from each of N boolean (N, H, W) regions.

    Returns xy (N, 2) float pixel positions and (N,) whether the region was non-empty (an
    empty region gives (0, 0)). Vectorized: one random score per pixel, argmax inside the region.
    """
    n, h, w = region.shape
    flat = region.reshape(n, h * w)
    scores = torch.rand(n, h * w, device=region.device).masked_fill_(~flat, -1.0)
    index = scores.argmax(dim=1)
    xy = torch.stack([index % w, index // w], dim=1).float()
    return xy, flat.any(dim=1)


def interior_points(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-point prompt: a uniformly random pixel of each (N, H, W) mask.

    Returns points (N, 1, 2) and labels (N, 1): 1, or -1 (padding) for an empty mask.
    """
    xy, found = uniform_pixels(masks.bool())
    labels = torch.where(found, 1, PAD_LABEL).to(torch.int64)
    return xy[:, None], labels[:, None]


def error_region_clicks(
    target: torch.Tensor, prediction: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's corrective click: a pixel drawn uniformly from where `prediction` is wrong.

    Args:
        target, prediction: (N, H, W) boolean masks on the input frame (one pixel per cell).
        valid: (H, W) unpadded region (None: everywhere).

    Returns points (N, 1, 2) and labels (N, 1): 1 in a missed (false negative) pixel, 0 in a
    false positive, -1 (padding) where the prediction is already exact.
    """
    target, prediction = target.bool(), prediction.bool()
    error = target ^ prediction
    if valid is not None:
        error &= valid.bool()
    xy, found = uniform_pixels(error)
    rows = torch.arange(len(xy), device=xy.device)
    positive = target[rows, xy[:, 1].long(), xy[:, 0].long()]
    labels = torch.where(found, positive.long(), PAD_LABEL)
    return xy[:, None], labels[:, None]
