"""Annotation geometry shared by the SA-1B and COCO converters: resized masks, box checks, points.

Both converters resize each mask once and derive `bbox` and `area` from the resized mask, so
the stored box always agrees with the stored mask. A given box that disagrees is therefore
not kept, and `bbox_problem` names why, so the stage reports it as repaired instead of
rewriting it silently. Torch-free (runs in the conversion workers).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import distance_transform_edt


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Resized:
    """One mask on the target frame: RLE, box and area computed from it, and the mask itself."""

    segmentation: dict[str, Any]
    bbox: list[float]
    area: int
    mask: np.ndarray  # uint8, Fortran order


def longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """SAM's `ResizeLongestSide.get_preprocess_shape` (same rounding), without torch."""
    scale = size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def rle_runs(counts: str | bytes) -> np.ndarray:
    """The run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`, vectorised).

    pycocotools decodes an RLE whose runs do not cover the image into uninitialised memory,
    so the converters check the total before decoding.
    """
    c = np.frombuffer(counts.encode() if isinstance(counts, str) else counts, np.uint8).astype(np.int64) - 48
    ends = (c & 0x20) == 0  # a character without the continuation bit ends a value
    if len(c) == 0 or not ends[-1] or c.min() < 0 or c.max() > 63:
        raise BadSample("undecodable RLE: malformed counts string")
    group = np.concatenate([[0], np.cumsum(ends)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    shift = 5 * (np.arange(len(c)) - starts[group])
    values = np.bincount(group, weights=(c & 0x1F) << shift).astype(np.int64)
    last = np.flatnonzero(ends)
    values -= np.where(c[last] & 0x10, np.int64(1) << (shift[last] + 5), 0)  # sign of the last 5 bits
    runs = values.copy()  # from the fourth run on, a value is the delta to the run two before
    runs[1::2], runs[2::2] = np.cumsum(values[1::2]), np.cumsum(values[2::2])
    return runs


def check_rle(rle: dict[str, Any], size: tuple[int, int]) -> None:
    """Raise `BadSample` unless `rle` is a compressed RLE covering exactly an image of `size`."""
    if list(rle.get("size", [])) != list(size):
        raise BadSample(f"RLE size {rle.get('size')} does not match the image size {list(size)}")
    counts = rle.get("counts")
    if not isinstance(counts, (str, bytes)):
        raise BadSample(f"undecodable RLE: counts is {type(counts).__name__}, not a string")
    runs = rle_runs(counts)
    if runs.min() < 0 or runs.sum() != size[0] * size[1]:
        raise BadSample(f"undecodable RLE: its runs cover {runs.sum()} pixels, not the {size[1]}x{size[0]} image's "
                        f"{size[0] * size[1]}")


def resize_mask(rle: dict[str, Any], size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Decode an RLE and resize it (bilinear, threshold 0.5), resampling only around the mask.

    Returns a Fortran-ordered uint8 mask, ready for `pycocotools.mask.encode`.
    """
    check_rle(rle, size)
    try:
        mask = mask_utils.decode(rle)
        x, y, w, h = mask_utils.toBbox(rle)
    except (TypeError, ValueError) as error:
        raise BadSample(f"undecodable RLE: {error}") from None
    if mask.shape == new_size:
        return np.asfortranarray(mask)
    out = np.zeros(new_size, dtype=np.uint8, order="F")
    if w == 0 or h == 0:
        return out
    sy, sx = new_size[0] / size[0], new_size[1] / size[1]
    # The output window around the mask (2 px margin) ...
    x0, x1 = max(0, math.floor(x * sx) - 2), min(new_size[1], math.ceil((x + w) * sx) + 2)
    y0, y1 = max(0, math.floor(y * sy) - 2), min(new_size[0], math.ceil((y + h) * sy) + 2)
    # ... and the source crop it reads, with the bilinear filter's support as margin.
    mx, my = math.ceil(max(1.0, 1 / sx)) + 1, math.ceil(max(1.0, 1 / sy)) + 1
    cx0, cx1 = max(0, math.floor(x0 / sx) - mx), min(size[1], math.ceil(x1 / sx) + mx)
    cy0, cy1 = max(0, math.floor(y0 / sy) - my), min(size[0], math.ceil(y1 / sy) + my)
    crop = Image.fromarray(np.ascontiguousarray(mask[cy0:cy1, cx0:cx1]) * np.uint8(255))
    box = (x0 / sx - cx0, y0 / sy - cy0, x1 / sx - cx0, y1 / sy - cy0)
    out[y0:y1, x0:x1] = np.asarray(crop.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=box)) >= 128
    return out


def resized(rle: dict[str, Any], size: tuple[int, int], new_size: tuple[int, int]) -> Resized | None:
    """The mask of `rle` (on an image of `size`) at `new_size`; None when it vanishes there."""
    mask = resize_mask(rle, size, new_size)
    encoded = mask_utils.encode(mask)
    area = int(mask_utils.area(encoded))
    if area == 0:
        return None
    segmentation = {"size": list(new_size), "counts": encoded["counts"].decode("ascii")}
    return Resized(segmentation, [float(v) for v in mask_utils.toBbox(encoded)], area, mask)


def bbox_problem(bbox: Any, rle: dict[str, Any], size: tuple[int, int]) -> str | None:
    """Why a given xywh `bbox` cannot stand for the mask `rle` on an image of `size` (None: it can).

    Tolerance: 1 px outside the image (rounding of polygon vertices) and 2 px + 5 % of the
    box's side between the given and the mask's edges (a polygon's box vs its raster).
    """
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, w, h]: recomputed from the mask"
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not numeric: recomputed from the mask"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"bbox {bbox} has NaN or infinite values: recomputed from the mask"
    if w <= 0 or h <= 0:
        return f"bbox {bbox} has a negative or zero size: recomputed from the mask"
    height, width = size
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return f"bbox {bbox} extends outside the {width}x{height} image: clipped to the mask's box"
    mx, my, mw, mh = (float(v) for v in mask_utils.toBbox(rle))
    tolerance = 2 + 0.05 * max(mw, mh)
    if max(abs(x - mx), abs(y - my), abs(x + w - mx - mw), abs(y + h - my - mh)) > tolerance:
        return f"bbox {bbox} disagrees with its mask's box {[mx, my, mw, mh]}: recomputed from the mask"
    return None


def interior_point(mask: np.ndarray, bbox: list[float]) -> list[float]:
    """[x, y] of the mask pixel farthest from the mask's boundary (image border included).

    A box centre can miss a ring or a C-shaped object; the deepest interior pixel is always
    on the object and is where a single click is least ambiguous. Ties go to the first pixel
    in row-major order, so the point is deterministic.
    """
    x, y, w, h = (int(v) for v in bbox)
    crop = np.pad(mask[y : y + h, x : x + w], 1)
    row, col = np.unravel_index(int(np.argmax(distance_transform_edt(crop))), crop.shape)
    return [float(x + col - 1), float(y + row - 1)]


def encode_jpeg(image: Image.Image, new_size: tuple[int, int], quality: int) -> bytes:
    """`image` resized (bilinear) to `new_size` (h, w), as JPEG bytes."""
    if image.size != (new_size[1], new_size[0]):
        image = image.resize((new_size[1], new_size[0]), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
