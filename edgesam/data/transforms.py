"""SAM preprocessing: resize the longest side, normalize, pad bottom-right; padding masks.

`preprocess` is exactly `ResizeLongestSide(img_size).apply_image` followed by
`Sam.preprocess`, so students, teachers and exported models see identical inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of an image whose longest side is resized to `size` (SAM's rounding)."""
    return ResizeLongestSide.get_preprocess_shape(height, width, size)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 HxWx3 image so its longest side is `size` (SAM's bilinear PIL resize)."""
    if max(image.shape[:2]) == size:
        return image
    return ResizeLongestSide(size).apply_image(image)


def normalize_pad(image: torch.Tensor, img_size: int) -> torch.Tensor:
    """`Sam.preprocess` on a float (..., 3, h, w) tensor: normalize, zero-pad to img_size."""
    mean = torch.tensor(PIXEL_MEAN, device=image.device).view(-1, 1, 1)
    std = torch.tensor(PIXEL_STD, device=image.device).view(-1, 1, 1)
    x = (image - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, img_size - w, 0, img_size - h))


def preprocess(image: np.ndarray, img_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 HxWx3 image -> (normalized, padded 3 x img_size x img_size tensor, valid (h, w))."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    resized = resize_image(image, img_size)
    x = torch.from_numpy(np.require(resized, requirements=["C", "W"])).permute(2, 0, 1).float()
    return normalize_pad(x, img_size), (resized.shape[0], resized.shape[1])


def valid_mask(hw: tuple[int, int], img_size: int, grid: int | None = None) -> torch.Tensor:
    """Bool (grid, grid) mask of the cells that overlap the un-padded (h, w) region.

    `hw` is the valid size in the img_size frame; `grid` is the resolution of the map the
    mask is for (img_size // 16 for embeddings, img_size // 4 for low-res masks).
    """
    grid = grid or img_size
    rows = math.ceil(hw[0] * grid / img_size)
    cols = math.ceil(hw[1] * grid / img_size)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[:rows, :cols] = True
    return mask


def scale_coords(coords: np.ndarray, original_hw: tuple[int, int], size: int) -> np.ndarray:
    """Map (..., 2) xy coordinates from the original frame to the resized-longest-side frame."""
    return ResizeLongestSide(size).apply_coords(np.asarray(coords, dtype=np.float64), original_hw)


def scale_boxes(boxes: np.ndarray, original_hw: tuple[int, int], size: int) -> np.ndarray:
    """Map (N, 4) xyxy boxes from the original frame to the resized-longest-side frame."""
    return ResizeLongestSide(size).apply_boxes(np.asarray(boxes, dtype=np.float64), original_hw)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes
