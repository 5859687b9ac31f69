"""Checks and conversions of what users hand to a predictor (numpy only: both predictors use them).

Conversions (documented, never silent failures):

* greyscale images (H x W or H x W x 1) are replicated to RGB; RGBA (H x W x 4) drops the
  alpha channel; `PIL.Image` inputs are converted with `.convert("RGB")`; BGR (OpenCV) is
  flipped when `image_format="BGR"`;
* boxes reaching past the image are clipped to it.

Everything else that cannot be a prompt on this image raises `PromptError` naming the
problem: non-uint8 pixels, an empty image, no prompt at all, points outside the image,
labels other than 0 / 1, boxes with no area inside the image, mismatched counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PromptError(ValueError):
    """An image or prompt a predictor cannot use, with the reason."""


def as_rgb(image: Any, image_format: str = "RGB") -> np.ndarray:
    """A uint8 H x W x 3 RGB array from an array or PIL image (see the module's conversions)."""
    if image_format not in ("RGB", "BGR"):
        raise PromptError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise PromptError(f"image must hold uint8 pixel values 0-255, got dtype {image.dtype} "
                          "(for floats in [0, 1] pass (image * 255).round().astype(np.uint8))")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise PromptError(f"image must be H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise PromptError(f"image is empty: shape {image.shape}")
    image = image[..., :3]
    return np.ascontiguousarray(image[..., ::-1] if image_format == "BGR" else image)


def require_image(is_image_set: bool) -> None:
    """The error both predictors give for a prompt before `set_image`."""
    if not is_image_set:
        raise RuntimeError("an image must be set with set_image(...) before predicting")


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise PromptError(f"{what} must be finite numbers, got {values.tolist()}")
    return values


def check_points(coords: Any, labels: Any, image_hw: tuple[int, int], batched: bool) -> tuple[np.ndarray, np.ndarray]:
    """Points (P, 2) or, batched, (N, P, 2) in pixels of the image, and labels 0 / 1 of the same shape."""
    rank = 3 if batched else 2
    coords = _finite(np.asarray(coords, np.float64), "point coordinates")
    if labels is None:
        raise PromptError("point_coords needs point_labels (1 foreground, 0 background)")
    labels = np.asarray(labels)
    if coords.ndim != rank or coords.shape[-1] != 2:
        raise PromptError(f"point_coords must have shape {'(N, P, 2)' if batched else '(P, 2)'}, got {coords.shape}")
    if labels.shape != coords.shape[:-1]:
        raise PromptError(f"point_labels has shape {labels.shape}, expected {coords.shape[:-1]} (one per point)")
    if coords.shape[-2] == 0:
        raise PromptError("point_coords holds no point")
    if not np.isin(labels, (0, 1)).all():
        raise PromptError(f"point labels must be 1 (foreground) or 0 (background), got {np.unique(labels).tolist()}")
    h, w = image_hw
    outside = (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | (coords[..., 1] > h)
    if outside.any():
        raise PromptError(f"point {coords[outside][0].tolist()} is outside the {w}x{h} image "
                          "(x in [0, width], y in [0, height])")
    return coords, labels.astype(np.int64)


def check_boxes(boxes: Any, image_hw: tuple[int, int], batched: bool) -> np.ndarray:
    """Boxes xyxy ((4,) or (1, 4), batched (N, 4)) clipped to the image; (N, 4) float64."""
    boxes = _finite(np.asarray(boxes, np.float64), "box coordinates")
    if boxes.shape[-1:] != (4,) or boxes.ndim > 2 or (not batched and boxes.size != 4):
        raise PromptError(f"box must be x0, y0, x1, y1 with shape {'(N, 4)' if batched else '(4,)'}, got {boxes.shape}")
    boxes = boxes.reshape(-1, 4)
    if (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
        raise PromptError(f"box {boxes[(boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])][0].tolist()} "
                          "is empty: need x0 < x1 and y0 < y1")
    h, w = image_hw
    clipped = np.stack([boxes[:, 0].clip(0, w), boxes[:, 1].clip(0, h), boxes[:, 2].clip(0, w),
                        boxes[:, 3].clip(0, h)], axis=1)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        raise PromptError(f"box {boxes[empty][0].tolist()} lies outside the {w}x{h} image")
    return clipped


def check_prompt(point_coords: Any, point_labels: Any, boxes: Any, mask_input: Any, image_hw: tuple[int, int],
                 batched: bool = False) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Validated (points, labels, boxes); raises `PromptError` for an empty or unusable prompt."""
    if point_coords is None and boxes is None and mask_input is None:
        raise PromptError("empty prompt: give point_coords with point_labels, a box, or mask_input")
    if point_coords is None and point_labels is not None:
        raise PromptError("point_labels given without point_coords")
    points = labels = None
    if point_coords is not None:
        points, labels = check_points(point_coords, point_labels, image_hw, batched)
    if boxes is not None:
        boxes = check_boxes(boxes, image_hw, batched)
    if batched and points is not None and boxes is not None and len(points) != len(boxes):
        raise PromptError(f"{len(points)} point sets for {len(boxes)} boxes: one point set per box")
    return points, labels, boxes
