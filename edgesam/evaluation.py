"""Prompted mIoU evaluation under the SAM / EdgeSAM protocol.

Every annotation of an image is prompted once per prompt type:

* ``box``: its ground-truth box, single-mask output (mask token 0);
* ``point``: one positive click at the mask centre (the interior point farthest from the
  boundary) or at a random interior pixel; `point_outputs` masks (SAM: 3) of which one is
  kept by predicted score, by area (largest) or by oracle (best IoU with the ground truth).
  With the RPN granularity prior the click also gets the confidence-weighted merge of the
  k proposals nearest to it as a box, and the single-mask output is used;
* ``point+r``: after r corrective clicks, each placed at the interior point of the larger
  error region (positive in a miss, negative in a false alarm), with the previous low-res
  logits as mask input and the single-mask output.

IoU is measured per annotation at the image's own resolution (low-res logits upsampled
with `Sam.postprocess_masks`). Ground truth comes from SA-1B-format shards or from
COCO-format JSON (LVIS-format JSON loads the same way through pycocotools).
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.ndimage import distance_transform_edt
from segment_anything.modeling import Sam
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from edgesam.data.shards import iter_samples
from edgesam.data.transforms import preprocess, scale_boxes, scale_coords, xywh_to_xyxy
from edgesam.metrics import IoURecord, mask_iou, size_bucket
from edgesam.models.decoding import decode
from edgesam.models.rpn import RPN, encode_with_features, knn_merge, proposals

PointMode = Literal["center", "random"]
MultimaskSelect = Literal["score", "area", "oracle"]


@dataclass
class EvalItem:
    """One image and its ground-truth objects, in the image's own frame."""

    image_id: str
    image: np.ndarray  # uint8 H x W x 3
    masks: np.ndarray  # bool (N, H, W)
    boxes: np.ndarray  # float (N, 4) xyxy


@dataclass(frozen=True)
class EvalProtocol:
    point_mode: PointMode = "center"
    point_outputs: int = 3
    multimask_select: MultimaskSelect = "score"
    refine_iters: int = 0


@dataclass
class Overlay:
    """One object of one image prompted with a point, and each model's mask."""

    image: np.ndarray
    gt: np.ndarray
    point: tuple[float, float]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


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


def select_masks(
    masks: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, mode: MultimaskSelect
) -> torch.Tensor:
    """Index (N,) of the mask kept among K candidates: masks (N, K, H, W) bool, scores (N, K)."""
    if mode == "score":
        return scores.argmax(dim=1)
    if mode == "area":
        return masks.flatten(2).sum(-1).argmax(dim=1)
    if mode == "oracle":
        return mask_iou(masks, gt[:, None].expand_as(masks)).argmax(dim=1)
    raise ValueError(f"unknown multimask selection {mode!r}; expected score, area or oracle")


@dataclass
class Segmenter:
    """A SAM-family model under evaluation, optionally with the RPN granularity prior."""

    name: str
    sam: Sam
    rpn: RPN | None = None
    k: int = 3
    score_threshold: float = 0.05
    max_proposals: int = 100

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None]:
        """(embedding (1, 256, h, w), valid input size, RPN proposals or None)."""
        x, hw = preprocess(image, self.img_size)
        x = x[None].to(self.sam.device)
        if self.rpn is None:
            return self.sam.image_encoder(x), hw, None
        embedding, features = encode_with_features(self.sam.image_encoder, x)
        found = proposals(self.rpn, *self.rpn(features), [hw], self.score_threshold, self.max_proposals)[0]
        return embedding, hw, found

    @torch.no_grad()
    def segment(
        self, item: EvalItem, protocol: EvalProtocol, clicks: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """IoU per annotation by prompt type, and the binary masks of the first click.

        `clicks` (N, 2) holds each annotation's first click, xy in the image frame.
        """
        sam, device = self.sam, self.sam.device
        original = item.image.shape[:2]
        embedding, hw, found = self.encode(item.image)
        gt = torch.as_tensor(item.masks, device=device)

        def upsample(low_res: torch.Tensor) -> torch.Tensor:
            return sam.postprocess_masks(low_res, hw, original) > sam.mask_threshold

        ious: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        boxes = torch.as_tensor(scale_boxes(item.boxes, original, self.img_size), dtype=torch.float32, device=device)
        low, _ = decode(sam, embedding, boxes=boxes, num_outputs=1)
        ious["box"] = mask_iou(upsample(low)[:, 0], gt).cpu().numpy()

        points = torch.as_tensor(scale_coords(clicks, original, self.img_size),
                                 dtype=torch.float32, device=device)[:, None]
        labels = torch.ones(points.shape[:2], dtype=torch.int64, device=device)
        prior = knn_merge(points[:, 0], *found, self.k) if found is not None else None
        if prior is not None:
            low, _ = decode(sam, embedding, points, labels, boxes=prior, num_outputs=1)
        else:
            low, scores = decode(sam, embedding, points, labels, num_outputs=protocol.point_outputs)
            if protocol.multimask_select == "score":  # no need to upsample the others
                keep = scores.argmax(dim=1)
            else:
                keep = select_masks(upsample(low), scores, gt, protocol.multimask_select)
            low = low[torch.arange(len(low), device=device), keep][:, None]
        binary = upsample(low)[:, 0]
        ious["point"] = mask_iou(binary, gt).cpu().numpy()
        masks["point"] = binary.cpu().numpy()

        for r in range(1, protocol.refine_iters + 1):
            pred = binary.cpu().numpy()
            extra = np.array([corrective_click(p, g) for p, g in zip(pred, item.masks)])
            xy = torch.as_tensor(scale_coords(extra[:, :2], original, self.img_size), dtype=torch.float32, device=device)
            points = torch.cat([points, xy[:, None]], dim=1)
            labels = torch.cat([labels, torch.as_tensor(extra[:, 2:], dtype=torch.int64, device=device)], dim=1)
            low, _ = decode(sam, embedding, points, labels, boxes=prior, mask_input=low, num_outputs=1)
            binary = upsample(low)[:, 0]
            ious[f"point+{r}"] = mask_iou(binary, gt).cpu().numpy()
        return ious, masks


def evaluate(
    segmenters: Sequence[Segmenter],
    items: Iterable[EvalItem],
    dataset: str,
    protocol: EvalProtocol,
    seed: int = 0,
    overlays: int = 0,
) -> tuple[list[IoURecord], list[Overlay]]:
    """Run every model on every item; IoU records and point-prompt overlays of the first
    `overlays` images (their largest object)."""
    records: list[IoURecord] = []
    shown: list[Overlay] = []
    for index, item in enumerate(tqdm(items, desc=f"evaluate {dataset}", unit="img", mininterval=5.0)):
        if len(item.masks) == 0:
            continue
        sizes = [size_bucket(float(m.sum()), item.image.shape[:2]) for m in item.masks]
        if protocol.point_mode == "center":
            clicks = np.array([center_point(m) for m in item.masks])
        else:
            rng = np.random.default_rng([seed, index])
            clicks = np.array([random_point(m, rng) for m in item.masks])
        largest = int(np.argmax(item.masks.reshape(len(item.masks), -1).sum(1)))
        overlay = Overlay(item.image, item.masks[largest], tuple(clicks[largest])) if index < overlays else None
        for segmenter in segmenters:  # the same clicks for every model
            ious, masks = segmenter.segment(item, protocol, clicks)
            for prompt, values in ious.items():
                records += [IoURecord(segmenter.name, dataset, prompt, s, float(v)) for s, v in zip(sizes, values)]
            if overlay is not None:
                overlay.masks[segmenter.name] = masks["point"][largest]
        if overlay is not None:
            shown.append(overlay)
    return records, shown


def _limit(indices: Sequence[int], max_annotations: int | None) -> list[int]:
    return list(indices)[:max_annotations] if max_annotations else list(indices)


def shard_items(
    paths: Sequence[str | Path], max_images: int | None = None, max_annotations: int | None = None
) -> Iterator[EvalItem]:
    """Items of SA-1B-format shards (the shard artifact's val split), in shard order."""
    for count, sample in enumerate(iter_samples(paths)):
        if max_images is not None and count >= max_images:
            return
        masks = sample.masks()
        keep = _limit([i for i, m in enumerate(masks) if m.any()], max_annotations)
        yield EvalItem(sample.key, sample.image, masks[keep], sample.boxes(keep))


def coco_items(
    annotation_file: str | Path,
    images_dir: str | Path,
    max_images: int | None = None,
    max_annotations: int | None = None,
) -> Iterator[EvalItem]:
    """Items of a COCO- or LVIS-format instances JSON (crowd regions skipped)."""
    coco = _quiet(COCO, str(annotation_file))
    for image_id in sorted(coco.getImgIds())[:max_images]:
        image = _read_image(coco, image_id, annotation_file, images_dir)
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        masks = np.array([coco.annToMask(a).astype(bool) for a in anns]).reshape(-1, *image.shape[:2])
        keep = _limit([i for i, m in enumerate(masks) if m.any()], max_annotations)
        boxes = xywh_to_xyxy(np.array([anns[i]["bbox"] for i in keep]))
        yield EvalItem(str(image_id), image, masks[keep], boxes)


def _to_original(boxes: torch.Tensor, original_hw: tuple[int, int], resized_hw: tuple[int, int]) -> np.ndarray:
    """xyxy boxes of the resized frame back to the original image frame."""
    sy, sx = original_hw[0] / resized_hw[0], original_hw[1] / resized_hw[1]
    return boxes.cpu().numpy() * np.array([sx, sy, sx, sy])


def rpn_detections(
    sam: Sam,
    rpn: RPN,
    annotation_file: str | Path,
    images_dir: str | Path,
    score_threshold: float = 0.05,
    max_proposals: int = 100,
) -> list[dict]:
    """Proposals on every image of a COCO-format JSON, as COCO results (xywh, original frame)."""
    coco = _quiet(COCO, str(annotation_file))
    category = min(coco.getCatIds(), default=1)
    segmenter = Segmenter("rpn", sam, rpn, score_threshold=score_threshold, max_proposals=max_proposals)
    results = []
    for image_id in tqdm(sorted(coco.getImgIds()), desc="proposals", mininterval=2.0):
        image = _read_image(coco, image_id, annotation_file, images_dir)
        _, hw, (boxes, scores) = segmenter.encode(image)
        xyxy = _to_original(boxes, image.shape[:2], hw)
        for (x0, y0, x1, y1), score in zip(xyxy.tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": category, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    return results


def class_agnostic_box_eval(annotation_file: str | Path, detections: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval of boxes ignoring categories: AP, AP50, AP75, AR@1/10/100."""
    gt = _quiet(COCO, str(annotation_file))
    names = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar1", "ar10", "ar100")
    if not detections:
        return {name: 0.0 for name in names}
    evaluator = COCOeval(gt, _quiet(gt.loadRes, detections), iouType="bbox")
    evaluator.params.useCats = 0
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    return {name: round(max(float(v), 0.0), 4) for name, v in zip(names, evaluator.stats)}


def _quiet(fn, *args):
    """Call a pycocotools function without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _read_image(coco: COCO, image_id: int, annotation_file: str | Path, images_dir: str | Path) -> np.ndarray:
    info = coco.imgs[image_id]
    name = info.get("file_name") or Path(info.get("coco_url", "")).name  # LVIS names images by URL
    if not name:
        raise ValueError(f"{annotation_file}: image {image_id} has neither file_name nor coco_url")
    path = Path(images_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{annotation_file}: image {image_id} refers to {path}, which does not exist")
    with Image.open(path) as img:
        image = np.asarray(img.convert("RGB"))
    if image.shape[:2] != (info["height"], info["width"]):
        raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]}, but {annotation_file} says "
                         f"{info['width']}x{info['height']}")
    return image


def _latency_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


@torch.no_grad()
def model_speed(sam: Sam, repeats: int = 5, rpn: RPN | None = None) -> dict[str, float]:
    """Parameters, encoder GMACs (one image) and median PyTorch eager latencies on this
    machine: the encoder on one image, the decoder on one point prompt, and with `rpn` the
    proposals (FPN, head, NMS) of one image."""
    size = sam.image_encoder.img_size
    device = sam.device
    x = torch.randn(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        embedding = sam.image_encoder(x)
    point = torch.full((1, 1, 2), size / 2, device=device)
    label = torch.ones(1, 1, dtype=torch.int64, device=device)
    decoder_params = sum(p.numel() for m in (sam.prompt_encoder, sam.mask_decoder) for p in m.parameters())
    out = {
        "encoder_params_m": sum(p.numel() for p in sam.image_encoder.parameters()) / 1e6,
        "decoder_params_m": decoder_params / 1e6,
        "encoder_gmacs": counter.get_total_flops() / 2e9,
        "encoder_ms": _latency_ms(lambda: sam.image_encoder(x), repeats),
        "decoder_ms": _latency_ms(lambda: decode(sam, embedding, point, label, num_outputs=4), repeats),
    }
    if rpn is not None:
        _, features = encode_with_features(sam.image_encoder, x)
        out["rpn_params_m"] = sum(p.numel() for p in rpn.parameters()) / 1e6
        out["rpn_ms"] = _latency_ms(lambda: proposals(rpn, *rpn(features), [(size, size)]), repeats)
    return out
