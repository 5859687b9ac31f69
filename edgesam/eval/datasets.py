"""Evaluation items (an image and its ground-truth objects) from SA-1B-format shards and COCO/LVIS JSON."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgesam.data.coco import load_coco, read_image
from edgesam.data.shards import iter_samples
from edgesam.data.transforms import xywh_to_xyxy


@dataclass
class EvalItem:
    """One image and its ground-truth objects, in the image's own frame."""

    image_id: str
    image: np.ndarray  # uint8 H x W x 3
    masks: np.ndarray  # bool (N, H, W)
    boxes: np.ndarray  # float (N, 4) xyxy
    points: np.ndarray | None = None  # float (N, 2) xy: SA-1B's `point_coords` (None for COCO)


def _limit(indices: Sequence[int], max_annotations: int | None, rng: np.random.Generator) -> list[int]:
    """At most `max_annotations` of `indices`, drawn at random (EdgeSAM's SA-1B protocol), in order."""
    if not max_annotations or len(indices) <= max_annotations:
        return list(indices)
    return sorted(rng.choice(list(indices), size=max_annotations, replace=False).tolist())


def shard_items(
    paths: Sequence[str | Path], max_images: int | None = None, max_annotations: int | None = None, seed: int = 0
) -> Iterator[EvalItem]:
    """Items of SA-1B-format shards (the shard artifact's val split), in shard order; images
    with more than `max_annotations` objects keep a random subset (seeded per image)."""
    for count, sample in enumerate(iter_samples(paths)):
        if max_images is not None and count >= max_images:
            return
        masks = sample.masks()
        keep = _limit([i for i, m in enumerate(masks) if m.any()], max_annotations, np.random.default_rng([seed, count]))
        has_points = all(sample.annotations[i].get("point_coords") for i in keep)
        yield EvalItem(sample.key, sample.image, masks[keep], sample.boxes(keep),
                       sample.points(keep) if has_points else None)


def coco_items(
    annotation_file: str | Path,
    images_dir: str | Path,
    max_images: int | None = None,
    max_annotations: int | None = None,
    seed: int = 0,
) -> Iterator[EvalItem]:
    """Items of a COCO- or LVIS-format instances JSON (crowd regions skipped)."""
    coco = load_coco(annotation_file)
    for count, image_id in enumerate(sorted(coco.getImgIds())[:max_images]):
        image = read_image(coco, image_id, annotation_file, images_dir)
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        masks = np.array([coco.annToMask(a).astype(bool) for a in anns]).reshape(-1, *image.shape[:2])
        keep = _limit([i for i, m in enumerate(masks) if m.any()], max_annotations, np.random.default_rng([seed, count]))
        boxes = xywh_to_xyxy(np.array([anns[i]["bbox"] for i in keep]))
        yield EvalItem(str(image_id), image, masks[keep], boxes)
