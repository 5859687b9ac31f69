"""segment-anything's prompt encoder and mask decoder at SAM's sizes, shared by every model here."""

from __future__ import annotations

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

PROMPT_EMBED_DIM = 256


def build_mask_decoder() -> MaskDecoder:
    """SAM's mask decoder (two-way transformer, 4 mask tokens), as in segment-anything."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_prompt_encoder(img_size: int, embedding_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
