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

from edgesam.models.decoding import PAD_LABEL


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
    prompt_types: Literal["both", "box", "point"], box_prob: float, rng: random.Random | None = None
) -> Literal["box", "point"]:
    """EdgeSAM: a training step uses boxes with probability `box_prob`, else single points.

    Drawn from Python's RNG (`rng`, default the global one, which checkpoints restore), not
    torch's: reading a torch random number back would be a host sync inside the step.
    """
    if prompt_types != "both":
        return prompt_types
    return "box" if (rng or random).random() < box_prob else "point"


def batch_prompts(prompts: Sequence[Prompts]) -> tuple[Prompts, torch.Tensor]:
    """The prompt sets of B images as one set of N = sum of their sizes, and the (N,) image index
    of each prompt (the layout of `decode_batched`). All sets hold the same kinds of prompt."""
    if not prompts:
        raise ValueError("batch_prompts needs at least one image's prompts")
    kinds = {(p.points is None, p.boxes is None) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("the images' prompt sets mix kinds (boxes on some, points on others)")

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(p, name) for p in prompts]
        return None if parts[0] is None else torch.cat(parts)

    counts = torch.tensor([len(p) for p in prompts])
    index = torch.repeat_interleave(torch.arange(len(prompts), device=counts.device), counts)
    return Prompts(cat("points"), cat("labels"), cat("boxes")), index


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

    Vectorized and without host syncs: every cell gets a uniform random score, cells outside
    the disagreement are scored -1, and the top `num_points` scores are the sample (a uniform
    draw without replacement); `torch.where` pads what falls outside or below `min_cells`.

    Args:
        teacher, student: (N, h, w) boolean masks on the low-resolution grid.
        valid: (h, w) or (N, h, w) boolean unpadded region (None: everywhere).
        num_points: points per prompt, drawn without replacement.
        input_size: side of the model's input frame the (square) grid covers.
        generator: a torch generator on the masks' device (None: torch's default one).
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
    if not 0 < num_points <= h * w:
        raise ValueError(f"num_points must be in 1..{h * w} (the grid's cells), got {num_points}")
    teacher = teacher.bool()
    disagree = teacher ^ student.bool()
    if valid is not None:
        disagree = disagree & valid.bool().to(disagree.device)
    flat = disagree.reshape(n, h * w)
    scores = torch.rand(n, h * w, generator=generator, device=flat.device).masked_fill_(~flat, -1.0)
    top, index = scores.topk(num_points, dim=1)
    enough = flat.sum(dim=1, keepdim=True) >= max(min_cells, 1)
    found = (top >= 0) & enough
    cell = torch.tensor([input_size / w, input_size / h], device=flat.device)
    xy = (torch.stack([index % w, index // w], dim=-1).float() + 0.5) * cell - 0.5
    points = torch.where(found[..., None], xy, 0.0)
    labels = torch.where(found, teacher.reshape(n, h * w).gather(1, index).long(), PAD_LABEL)
    return points, labels


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
