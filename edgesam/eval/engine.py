"""The prompting engine: every prompted mask that evaluation computes comes from `Segmenter.segment`.

Every object of an image is prompted once per prompt type:

* ``box``: its ground-truth box, single-mask output (mask token 0);
* ``point``: one positive click (chosen by the caller: the mask centre, the interior point
  farthest from the boundary; a random interior pixel; or SA-1B's own point);
  `point_outputs` masks of which one is kept by predicted score, by area (largest) or by
  oracle (best IoU with the ground truth). With the RPN granularity prior the click also gets
  the prior's box (`edgesam.models.rpn.prior_boxes`) and the single-mask output;
* ``box+r`` / ``point+r``: after r corrective clicks, appended to the prompt.

Two presets (`PROTOCOLS`): ``paper`` is EdgeSAM's `evaluation/eval_mIoU.py`: one mask output,
box and point prompts both refined, each corrective click a uniform random pixel of the error
region (labelled by the ground truth there; none when fewer than 10 cells of the low-res grid
are wrong), no mask fed back. ``sam`` is SAM's interactive style: 3 outputs for a click,
selected by score, points refined only, each click at the centre of the larger error region,
the previous low-res logits fed back as mask input.

Masks are binarized at the image's own resolution (low-res logits upsampled with
`Sam.postprocess_masks`), so callers compare them with ground truth or a teacher's masks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from segment_anything.modeling import Sam

from edgesam.data.transforms import preprocess, scale_boxes, scale_coords
from edgesam.eval.datasets import EvalItem
from edgesam.metrics import mask_iou
from edgesam.models.decoding import decode
from edgesam.models.rpn import PRIOR_RULES, RPN, PriorRule, prior_boxes, prior_proposals

PointMode = Literal["center", "random"]
MultimaskSelect = Literal["score", "area", "oracle"]
MIN_ERROR_CELLS = 10  # EdgeSAM: no corrective click when fewer low-res cells are wrong


@dataclass(frozen=True)
class EvalProtocol:
    """How objects are prompted (see the module docstring)."""

    name: str = "sam"
    point_mode: PointMode = "center"
    point_outputs: int = 3
    multimask_select: MultimaskSelect = "score"
    refine_iters: int = 0
    refine_boxes: bool = False  # box prompts get corrective clicks too
    click: Literal["center", "random"] = "center"  # corrective click: error-region centre or a random pixel
    mask_input: bool = True  # feed the previous low-res logits back when refining


PROTOCOLS = {
    "sam": EvalProtocol("sam"),
    "paper": EvalProtocol("paper", point_outputs=1, refine_boxes=True, click="random", mask_input=False),
}


def protocol(name: str, refine_iters: int) -> EvalProtocol:
    """The preset `name` with `refine_iters` corrective clicks."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return replace(PROTOCOLS[name], refine_iters=refine_iters)


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


def random_corrective_click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                            min_pixels: float) -> tuple[float, float, int]:
    """EdgeSAM's corrective click: a uniform random pixel where `pred` is wrong, labelled by the
    ground truth there (1 in a miss, 0 in a false alarm); (0, 0, -1) under `min_pixels` errors."""
    ys, xs = np.nonzero(pred != gt)
    if len(xs) < min_pixels:
        return 0.0, 0.0, -1
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i]), int(gt[ys[i], xs[i]])


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

    `decoder` has `decode`'s signature; `edgesam.export.onnx_backend` swaps in exported files.
    """

    name: str
    sam: Sam
    rpn: RPN | None = None
    rule: PriorRule = PRIOR_RULES["official"]
    decoder: Callable[..., tuple[torch.Tensor, torch.Tensor]] = decode  # e.g. an ONNX file's (export/onnx_backend)

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
        return Encoded(embedding, hw, prior_proposals(self.rpn, features, [hw], self.rule)[0])

    def prior(self, encoded: Encoded, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prior's boxes of (N, 2) clicks in the input frame: (boxes, found), None without an RPN."""
        if encoded.proposals is None:
            return None
        return prior_boxes(points, *encoded.proposals, self.rule)

    @torch.no_grad()
    def segment(self, item: EvalItem, protocol: EvalProtocol, clicks: np.ndarray, encoded: Encoded | None = None,
                rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """Bool (N, H, W) masks of every object of `item` on the image's frame, by prompt type
        (`box`, `point`, `box+r`, `point+r`). `clicks` (N, 2) holds each object's first click
        (xy); `rng` draws the random corrective clicks."""
        device = self.sam.device
        encoded = encoded or self.encode(item.image)
        run = _Run(self, item, protocol, encoded, rng or np.random.default_rng(0))
        masks: dict[str, torch.Tensor] = {}
        boxes = torch.as_tensor(scale_boxes(item.boxes, run.original, self.img_size), dtype=torch.float32,
                                device=device)
        low = run.decode(None, None, boxes, torch.ones(len(boxes), dtype=torch.bool, device=device), None, 1)
        masks["box"] = run.upsample(low)[:, 0]
        if protocol.refine_boxes:
            run.refine("box", masks, low, None, None, boxes, torch.ones_like(boxes[:, 0], dtype=torch.bool))

        points = torch.as_tensor(scale_coords(clicks, run.original, self.img_size), dtype=torch.float32,
                                 device=device)[:, None]
        labels = torch.ones(points.shape[:2], dtype=torch.int64, device=device)
        prior = self.prior(encoded, points[:, 0])
        prior_box, has_box = prior if prior is not None else (None, torch.zeros(len(points), dtype=torch.bool))
        low = run.decode(points, labels, prior_box, has_box.to(device), None, protocol.point_outputs)
        masks["point"] = run.upsample(low)[:, 0]
        run.refine("point", masks, low, points, labels, prior_box, has_box.to(device))
        return masks


class _Run:
    """One `Segmenter.segment` call: decoding with optional per-object boxes, refinement rounds."""

    def __init__(self, segmenter: Segmenter, item: EvalItem, protocol: EvalProtocol, encoded: Encoded,
                 rng: np.random.Generator):
        self.sam, self.item, self.protocol, self.encoded, self.rng = segmenter.sam, item, protocol, encoded, rng
        self.decoder = segmenter.decoder
        self.img_size = segmenter.img_size
        self.original = item.image.shape[:2]
        self.gt = torch.as_tensor(item.masks, device=self.sam.device)
        cell = 4 * max(self.original) / self.img_size  # a low-res mask cell, in image pixels
        self.min_error_pixels = MIN_ERROR_CELLS * cell * cell

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        return self.sam.postprocess_masks(low_res, self.encoded.hw, self.original) > self.sam.mask_threshold

    def decode(self, points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None,
               has_box: torch.Tensor, mask_input: torch.Tensor | None, outputs: int) -> torch.Tensor:
        """Selected low-res logits (N, 1, h, w): rows with a box decode it (one output), rows
        without it decode their points alone with `outputs` masks and the protocol's selection."""
        n = len(has_box)
        low = None
        for rows, with_box in ((has_box.nonzero()[:, 0], True), ((~has_box).nonzero()[:, 0], False)):
            if len(rows) == 0:
                continue
            k = 1 if with_box else outputs
            part, scores = self.decoder(self.sam, self.encoded.embedding,
                                  points[rows] if points is not None else None,
                                  labels[rows] if labels is not None else None,
                                  boxes[rows] if with_box else None,
                                  mask_input[rows] if mask_input is not None else None, k)
            if k > 1:
                keep = (scores.argmax(dim=1) if self.protocol.multimask_select == "score" else
                        select_masks(self.upsample(part), scores, self.gt[rows], self.protocol.multimask_select))
                part = part[torch.arange(len(part), device=part.device), keep][:, None]
            if low is None:
                low = part.new_zeros(n, *part.shape[1:])
            low[rows] = part
        return low

    def clicks(self, binary: torch.Tensor) -> np.ndarray:
        """(N, 3) x, y, label of each object's next corrective click on the image's frame."""
        pred = binary.cpu().numpy()
        if self.protocol.click == "random":
            return np.array([random_corrective_click(p, g, self.rng, self.min_error_pixels)
                             for p, g in zip(pred, self.item.masks)])
        return np.array([corrective_click(p, g) for p, g in zip(pred, self.item.masks)])

    def refine(self, kind: str, masks: dict[str, torch.Tensor], low: torch.Tensor, points: torch.Tensor | None,
               labels: torch.Tensor | None, boxes: torch.Tensor | None, has_box: torch.Tensor) -> None:
        """`refine_iters` rounds of one more click each, masks stored as `kind+r`."""
        device = self.sam.device
        binary = masks[kind]
        for r in range(1, self.protocol.refine_iters + 1):
            extra = self.clicks(binary)
            xy = torch.as_tensor(scale_coords(extra[:, :2], self.original, self.img_size), dtype=torch.float32,
                                 device=device)[:, None]
            label = torch.as_tensor(extra[:, 2:], dtype=torch.int64, device=device)
            points = xy if points is None else torch.cat([points, xy], dim=1)
            labels = label if labels is None else torch.cat([labels, label], dim=1)
            low = self.decode(points, labels, boxes, has_box, low if self.protocol.mask_input else None, 1)
            binary = self.upsample(low)[:, 0]
            masks[f"{kind}+{r}"] = binary
