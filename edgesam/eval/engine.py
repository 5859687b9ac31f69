"""The prompting engine: every prompted mask that evaluation computes comes from `Segmenter.segment`.

Every object of an image is prompted once per prompt type:

* ``box``: its ground-truth box, single-mask output (mask token 0);
* ``point``: one positive click (chosen by the caller: the mask centre, the interior point
  farthest from the boundary; a random interior pixel; or SA-1B's own point);
  `point_outputs` masks (SAM: 3) of which one is kept by predicted score, by area (largest)
  or by oracle (best IoU with the ground truth). With the RPN granularity prior the click
  also gets the confidence-weighted merge of the k proposals nearest to it as a box, and
  the single-mask output is used;
* ``point+r``: after r corrective clicks, each placed at the interior point of the larger
  error region (positive in a miss, negative in a false alarm), with the previous low-res
  logits as mask input and the single-mask output.

Masks are binarized at the image's own resolution (low-res logits upsampled with
`Sam.postprocess_masks`), so callers compare them with ground truth or a teacher's masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from segment_anything.modeling import Sam

from edgesam.data.transforms import preprocess, scale_boxes, scale_coords
from edgesam.eval.datasets import EvalItem
from edgesam.metrics import mask_iou
from edgesam.models.decoding import decode
from edgesam.models.rpn import RPN, knn_merge, proposals

PointMode = Literal["center", "random"]
MultimaskSelect = Literal["score", "area", "oracle"]


@dataclass(frozen=True)
class EvalProtocol:
    point_mode: PointMode = "center"
    point_outputs: int = 3
    multimask_select: MultimaskSelect = "score"
    refine_iters: int = 0


def center_point(mask: np.ndarray) -> tuple[float, float]:
    """xy of the mask pixel farthest from its boundary (the image border counts as boundary)."""
    if not mask.any():
        raise ValueError("cannot place a point in an empty mask")
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), distance.shape)
    return float(x), float(y)


def random_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """xy of a uniformly drawn mask pixel."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot place a point in an empty mask")
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def first_clicks(item: EvalItem, mode: PointMode, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) xy of each object's first click on the image's frame."""
    if mode == "center":
        return np.array([center_point(m) for m in item.masks])
    return np.array([random_point(m, rng) for m in item.masks])


def corrective_click(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, int]:
    """The next click of the refinement protocol: (x, y, label).

    Placed at the centre of the error region (misses or false alarms) that reaches farthest
    from its boundary; label 1 for a miss, 0 for a false alarm, -1 (no click) when the
    prediction is exact.
    """
    best = (0.0, 0.0, 0.0, -1)
    for region, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        if region.any():
            distance = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(int(distance.argmax()), distance.shape)
            if distance[y, x] > best[0]:
                best = (float(distance[y, x]), float(x), float(y), label)
    return best[1], best[2], best[3]


def select_masks(masks: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, mode: MultimaskSelect) -> torch.Tensor:
    """Index (N,) of the mask kept among K candidates: masks (N, K, H, W) bool, scores (N, K)."""
    if mode == "score":
        return scores.argmax(dim=1)
    if mode == "area":
        return masks.flatten(2).sum(-1).argmax(dim=1)
    if mode == "oracle":
        return mask_iou(masks, gt[:, None].expand_as(masks)).argmax(dim=1)
    raise ValueError(f"unknown multimask selection {mode!r}; expected score, area or oracle")


@dataclass
class Encoded:
    """One image through the encoder: its embedding, valid input size and RPN proposals."""

    embedding: torch.Tensor  # (1, 256, h, w)
    hw: tuple[int, int]
    proposals: tuple[torch.Tensor, torch.Tensor] | None = None  # boxes (M, 4) xyxy, scores (M,)


@dataclass
class Segmenter:
    """A SAM-family model under evaluation, optionally with the RPN granularity prior.

    `decoder` has `decode`'s signature; `edgesam.eval.onnx_backend` swaps in exported files.
    """

    name: str
    sam: Sam
    rpn: RPN | None = None
    k: int = 3
    score_threshold: float = 0.05
    max_proposals: int = 100
    decoder: Callable[..., tuple[torch.Tensor, torch.Tensor]] = decode

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> Encoded:
        x, hw = preprocess(image, self.img_size)
        x = x[None].to(self.sam.device)
        if self.rpn is None:
            return Encoded(self.sam.image_encoder(x), hw)
        embedding, features = self.sam.image_encoder.forward_pyramid(x)
        found = proposals(self.rpn, *self.rpn(features), [hw], self.score_threshold, self.max_proposals)[0]
        return Encoded(embedding, hw, found)

    @torch.no_grad()
    def segment(self, item: EvalItem, protocol: EvalProtocol, clicks: np.ndarray,
                encoded: Encoded | None = None) -> dict[str, torch.Tensor]:
        """Bool (N, H, W) masks of every object of `item` on the image's frame, by prompt type
        (`box`, `point`, `point+r`). `clicks` (N, 2) holds each object's first click (xy)."""
        sam, device = self.sam, self.sam.device
        original = item.image.shape[:2]
        encoded = encoded or self.encode(item.image)
        embedding = encoded.embedding
        gt = torch.as_tensor(item.masks, device=device)

        def upsample(low_res: torch.Tensor) -> torch.Tensor:
            return sam.postprocess_masks(low_res, encoded.hw, original) > sam.mask_threshold

        masks: dict[str, torch.Tensor] = {}
        boxes = torch.as_tensor(scale_boxes(item.boxes, original, self.img_size), dtype=torch.float32, device=device)
        low, _ = self.decoder(sam, embedding, boxes=boxes, num_outputs=1)
        masks["box"] = upsample(low)[:, 0]

        points = torch.as_tensor(scale_coords(clicks, original, self.img_size), dtype=torch.float32, device=device)[:, None]
        labels = torch.ones(points.shape[:2], dtype=torch.int64, device=device)
        prior = knn_merge(points[:, 0], *encoded.proposals, self.k) if encoded.proposals is not None else None
        if prior is not None:
            low, _ = self.decoder(sam, embedding, points, labels, boxes=prior, num_outputs=1)
        else:
            low, scores = self.decoder(sam, embedding, points, labels, num_outputs=protocol.point_outputs)
            if protocol.multimask_select == "score":  # no need to upsample the others
                keep = scores.argmax(dim=1)
            else:
                keep = select_masks(upsample(low), scores, gt, protocol.multimask_select)
            low = low[torch.arange(len(low), device=device), keep][:, None]
        binary = upsample(low)[:, 0]
        masks["point"] = binary

        for r in range(1, protocol.refine_iters + 1):
            extra = np.array([corrective_click(p, g) for p, g in zip(binary.cpu().numpy(), item.masks)])
            xy = torch.as_tensor(scale_coords(extra[:, :2], original, self.img_size), dtype=torch.float32, device=device)
            points = torch.cat([points, xy[:, None]], dim=1)
            labels = torch.cat([labels, torch.as_tensor(extra[:, 2:], dtype=torch.int64, device=device)], dim=1)
            low, _ = self.decoder(sam, embedding, points, labels, boxes=prior, mask_input=low, num_outputs=1)
            binary = upsample(low)[:, 0]
            masks[f"point+{r}"] = binary
        return masks
