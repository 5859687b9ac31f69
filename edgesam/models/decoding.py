"""Prompted mask decoding with a choice of 1, 3 or 4 mask outputs per prompt, for one image or
for the prompts of many images in one call.

`Sam.mask_decoder` always predicts all four mask tokens; segment-anything's `forward`
returns token 0 (single mask) or tokens 1..3 (multimask). EdgeSAM distils all four, so the
decoder's tokens are sliced here. Gradients flow; callers choose no_grad.

Training decodes every prompt of a batch at once (`decode_batched`: one call per model and
decoding iteration, as the official `MaskDecoderBatch` does, an image index per prompt) and
must not wait on the device: segment-anything's `_embed_points` writes through boolean
masks (a `nonzero` and a host sync each on CUDA), so `embed_points` computes the same values
with `torch.where`. Every module is segment-anything's own; only the glue between them is here.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam

MASK_SLICES = {1: slice(0, 1), 3: slice(1, 4), 4: slice(0, 4)}
PAD_LABEL = -1


def embed_points(encoder: PromptEncoder, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
    """`PromptEncoder._embed_points` without boolean-mask indexing: the same values, bit for bit.

    (N, P, 2) points and (N, P) labels (1 foreground, 0 background, -1 padding) -> (N, P(+1), C);
    `pad` appends the padding point SAM adds when no box follows.
    """
    points = points + 0.5  # shift to the centre of the pixel
    if pad:
        points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
        labels = torch.cat([labels, torch.full_like(labels[:, :1], PAD_LABEL)], dim=1)
    embedding = encoder.pe_layer.forward_with_coords(points, encoder.input_image_size)
    labels = labels[..., None]
    embedding = torch.where(labels == PAD_LABEL, 0.0 + encoder.not_a_point_embed.weight, embedding)
    embedding = torch.where(labels == 0, embedding + encoder.point_embeddings[0].weight, embedding)
    return torch.where(labels == 1, embedding + encoder.point_embeddings[1].weight, embedding)


def encode_prompts(encoder: PromptEncoder, points: torch.Tensor | None, labels: torch.Tensor | None,
                   boxes: torch.Tensor | None, mask_input: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`PromptEncoder.forward` with `embed_points`: sparse (N, T, C) and dense (N, C, h, w) embeddings."""
    count = len(points) if points is not None else len(boxes) if boxes is not None else len(mask_input)
    sparse = [torch.empty(count, 0, encoder.embed_dim, device=encoder.no_mask_embed.weight.device)]
    if points is not None:
        sparse.append(embed_points(encoder, points, labels, pad=boxes is None))
    if boxes is not None:
        sparse.append(encoder._embed_boxes(boxes))
    if mask_input is not None:
        dense = encoder._embed_masks(mask_input)
    else:
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(count, -1, *encoder.image_embedding_size)
    return torch.cat(sparse, dim=1), dense


def predict_masks(decoder: MaskDecoder, prompt_embeddings: torch.Tensor, image_pe: torch.Tensor,
                  sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` on an image embedding per prompt (N, C, h, w), already
    gathered, instead of one image's embedding repeated: all four mask tokens and IoU scores."""
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = prompt_embeddings + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    mask_tokens = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(hs[:, 0, :])


def _check_prompts(points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None,
                   mask_input: torch.Tensor | None, num_outputs: int) -> None:
    if num_outputs not in MASK_SLICES:
        raise ValueError(f"num_outputs must be 1, 3 or 4, got {num_outputs}")
    if points is None and boxes is None and mask_input is None:
        raise ValueError("decode needs at least one prompt: points, boxes or mask_input")
    if (points is None) != (labels is None):
        raise ValueError("points and labels must be given together")


def decode_batched(
    sam: Sam,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    mask_input: torch.Tensor | None = None,
    num_outputs: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode N prompts over B images in one call; prompt n belongs to image `image_index[n]`.

    Args:
        image_embeddings: (B, 256, h, w) embeddings of the images.
        image_index: (N,) int64 image of each prompt.
        points: (N, P, 2) xy in the model's input frame, with `labels` (N, P): 1 foreground,
            0 background, -1 padding.
        boxes: (N, 4) xyxy in the input frame.
        mask_input: (N, 1, 4h, 4w) low-res logits of a previous iteration.
        num_outputs: 1 (token 0), 3 (tokens 1..3, SAM's multimask) or 4 (all tokens, EdgeSAM).

    Returns:
        low-res mask logits (N, K, 4h, 4w) and IoU predictions (N, K), K = num_outputs.
    """
    _check_prompts(points, labels, boxes, mask_input, num_outputs)
    if image_embeddings.dim() != 4 or image_index.dim() != 1:
        raise ValueError(f"image_embeddings must be (B, C, h, w) and image_index (N,), got "
                         f"{tuple(image_embeddings.shape)} and {tuple(image_index.shape)}")
    sparse, dense = encode_prompts(sam.prompt_encoder, points, labels, boxes, mask_input)
    if len(image_index) != len(sparse):
        raise ValueError(f"image_index has {len(image_index)} entries for {len(sparse)} prompts")
    masks, iou = predict_masks(sam.mask_decoder, image_embeddings.index_select(0, image_index),
                               sam.prompt_encoder.get_dense_pe(), sparse, dense)
    keep = MASK_SLICES[num_outputs]
    return masks[:, keep], iou[:, keep]


def decode(
    sam: Sam,
    image_embeddings: torch.Tensor,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    mask_input: torch.Tensor | None = None,
    num_outputs: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode N prompts on one image: `decode_batched` with every prompt on image 0.

    `image_embeddings` is (1, 256, h, w); the other arguments and the outputs are
    `decode_batched`'s.
    """
    _check_prompts(points, labels, boxes, mask_input, num_outputs)
    if image_embeddings.dim() != 4 or image_embeddings.shape[0] != 1:
        raise ValueError(
            f"image_embeddings must be (1, C, h, w) for one image, got {tuple(image_embeddings.shape)}"
        )
    count = len(points) if points is not None else len(boxes) if boxes is not None else len(mask_input)
    image_index = torch.zeros(count, dtype=torch.int64, device=image_embeddings.device)
    return decode_batched(sam, image_embeddings, image_index, points, labels, boxes, mask_input, num_outputs)
