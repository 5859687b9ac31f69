"""SAM's image and mask transforms in numpy + Pillow, for the torch-free `OnnxPredictor`.

Each function is the numpy twin of a PyTorch one, equal within float rounding (tests compare
them): `preprocess` of `edgesam.data.transforms.preprocess` (segment-anything's PIL bilinear
resize of the longest side, normalisation, bottom-right zero padding), `upsample_logits` of
`Sam.postprocess_masks` (bilinear to the padded input, crop, bilinear to the original size:
two linear maps per axis, composed into one matrix each), `prompt_arrays` of the token
order `Sam.prompt_encoder` builds (points, then box corners; one padding point without a box),
`decoder_feeds` of `edgesam.export.onnx.prompt_decoder_inputs`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

BOX_CORNER_LABELS = (2.0, 3.0)
PADDING_LABEL = -1.0


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) once the longest side is `size` (`ResizeLongestSide.get_preprocess_shape`)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 HxWx3 RGB -> ((1, 3, size, size) float32 encoder input, valid (h, w) in it)."""
    h, w = resized_shape(*image.shape[:2], size)
    resized = image if (h, w) == image.shape[:2] else np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    x = (resized.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    padded = np.zeros((size, size, 3), np.float32)
    padded[:h, :w] = x
    return padded.transpose(2, 0, 1)[None].copy(), (h, w)


def scale_coords(coords: np.ndarray, original_hw: tuple[int, int], size: int) -> np.ndarray:
    """(..., 2) xy from the original frame to the resized frame (`ResizeLongestSide.apply_coords`)."""
    h, w = resized_shape(*original_hw, size)
    return np.asarray(coords, np.float64) * np.array([w / original_hw[1], h / original_hw[0]])


def prompt_arrays(point_coords: np.ndarray | None, point_labels: np.ndarray | None,
                  boxes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """N prompt sets (points (N, P, 2) with labels (N, P), and/or boxes (N, 4), input frame) ->
    the decoder's float32 (N, P', 2) coordinates and (N, P') labels in SAM's token order."""
    parts, labels = [], []
    n = len(point_coords) if point_coords is not None else len(boxes)
    if point_coords is not None:
        parts.append(np.asarray(point_coords, np.float32).reshape(n, -1, 2))
        labels.append(np.asarray(point_labels, np.float32).reshape(n, -1))
    if boxes is not None:
        parts.append(np.asarray(boxes, np.float32).reshape(n, 2, 2))
        labels.append(np.tile(np.array(BOX_CORNER_LABELS, np.float32), (n, 1)))
    else:
        parts.append(np.zeros((n, 1, 2), np.float32))
        labels.append(np.full((n, 1), PADDING_LABEL, np.float32))
    return np.concatenate(parts, axis=1), np.concatenate(labels, axis=1)


def decoder_feeds(image_embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                  mask_input: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`decoder.onnx`'s inputs for N prompt sets (coordinates and labels from `prompt_arrays`);
    without `mask_input`, zero masks flagged absent."""
    n, (h, w) = len(coords), image_embeddings.shape[-2:]
    shape = (n, 1, 4 * h, 4 * w)
    masks = np.zeros(shape, np.float32) if mask_input is None else np.asarray(mask_input, np.float32).reshape(shape)
    return {"image_embeddings": image_embeddings, "point_coords": coords, "point_labels": labels, "mask_input": masks,
            "has_mask_input": np.full(n, 0.0 if mask_input is None else 1.0, np.float32)}


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) matrix of 1-D bilinear resampling as `F.interpolate(align_corners=False)`."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


@lru_cache(maxsize=8)
def _resize_matrices(img_size: int, low_hw: tuple[int, int], input_hw: tuple[int, int],
                     original_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column matrices of `upsample_logits`, float32; cached: one pair per image size."""
    rows = bilinear_matrix(original_hw[0], input_hw[0]) @ bilinear_matrix(img_size, low_hw[0])[:input_hw[0]]
    cols = bilinear_matrix(original_hw[1], input_hw[1]) @ bilinear_matrix(img_size, low_hw[1])[:input_hw[1]]
    return rows.astype(np.float32), np.ascontiguousarray(cols.T, np.float32)


def upsample_logits(low_res: np.ndarray, img_size: int, input_hw: tuple[int, int],
                    original_hw: tuple[int, int]) -> np.ndarray:
    """(..., h4, w4) low-res logits -> (..., H, W) on the original image (`Sam.postprocess_masks`)."""
    rows, cols = _resize_matrices(img_size, tuple(low_res.shape[-2:]), tuple(input_hw), tuple(original_hw))
    flat = low_res.astype(np.float32).reshape(-1, *low_res.shape[-2:])
    out = np.empty((len(flat), rows.shape[0], cols.shape[1]), np.float32)
    for i, logits in enumerate(flat):  # 2-D products: numpy's broadcasting matmul does not reach BLAS
        np.matmul(rows, logits @ cols, out=out[i])
    return out.reshape(*low_res.shape[:-2], *out.shape[1:])
