"""Prompted mask decoding with a choice of 1, 3 or 4 mask outputs per prompt.

`Sam.mask_decoder` always predicts all four mask tokens; segment-anything's `forward`
returns token 0 (single mask) or tokens 1..3 (multimask). EdgeSAM distils all four, so
`decode` calls `predict_masks` directly and slices. Gradients flow; callers choose no_grad.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

MASK_SLICES = {1: slice(0, 1), 3: slice(1, 4), 4: slice(0, 4)}


def decode(
    sam: Sam,
    image_embeddings: torch.Tensor,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    mask_input: torch.Tensor | None = None,
    num_outputs: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode N prompts on one image.

    Args:
        image_embeddings: (1, 256, h, w) embedding of the image.
        points: (N, P, 2) xy in the model's input frame, with `labels` (N, P): 1 foreground,
            0 background, -1 padding.
        boxes: (N, 4) xyxy in the input frame.
        mask_input: (N, 1, 4h, 4w) low-res logits of a previous iteration.
        num_outputs: 1 (token 0), 3 (tokens 1..3, SAM's multimask) or 4 (all tokens, EdgeSAM).

    Returns:
        low-res mask logits (N, K, 4h, 4w) and IoU predictions (N, K), K = num_outputs.
    """
    if num_outputs not in MASK_SLICES:
        raise ValueError(f"num_outputs must be 1, 3 or 4, got {num_outputs}")
    if points is None and boxes is None and mask_input is None:
        raise ValueError("decode needs at least one prompt: points, boxes or mask_input")
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together")
    if image_embeddings.dim() != 4 or image_embeddings.shape[0] != 1:
        raise ValueError(
            f"image_embeddings must be (1, C, h, w) for one image, got {tuple(image_embeddings.shape)}"
        )
    sparse, dense = sam.prompt_encoder(
        points=(points, labels) if points is not None else None,
        boxes=boxes,
        masks=mask_input,
    )
    masks, iou = sam.mask_decoder.predict_masks(
        image_embeddings=image_embeddings,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )
    keep = MASK_SLICES[num_outputs]
    return masks[:, keep], iou[:, keep]
