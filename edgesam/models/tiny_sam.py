"""The tiny SAM of the embedded benchmark: segment-anything's ViT, prompt encoder and decoder, small.

Embeddings are 256 x img_size/16 x img_size/16, like SAM's at 1024. Checkpoints carry their
build config, so `load_tiny_sam(path)` needs nothing but the file.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, Sam
from segment_anything.modeling.transformer import Attention

from edgesam.artifacts import atomic_torch_save
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD
from edgesam.models.checkpoint import CheckpointError, load_state_checked, read_checkpoint
from edgesam.models.sam_parts import PROMPT_EMBED_DIM, build_mask_decoder, build_prompt_encoder

KIND = "tiny_sam"


def build_tiny_sam(img_size: int = 256, embed_dim: int = 256, depth: int = 6, num_heads: int = 8) -> Sam:
    """A small SAM: ViT with patch 16 and global attention, SAM's prompt encoder and decoder."""
    if img_size % 16:
        raise ValueError(f"img_size must be divisible by 16, got {img_size}")
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
        out_chans=PROMPT_EMBED_DIM, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True, window_size=0, global_attn_indexes=(),  # global attention in every block
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=build_prompt_encoder(img_size, img_size // 16),
        mask_decoder=build_mask_decoder(),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def tie_cross_attention_init(decoder: MaskDecoder) -> int:
    """Start every token<->image cross-attention of `decoder` with equal query and key projections.

    Queries and keys both carry positional encodings (prompts: their point's, image: its
    cell's), so with W_q = W_k the attention logits start as about (W pe_prompt)·(W pe_cell),
    which peaks where the two positions agree: prompts attend to their own place from the
    first step. From SAM's random init a decoder trained from scratch first collapses to
    empty masks and must discover that alignment (benchmarks/teacher_recipe.py measures how
    long). Returns the number of attentions tied.
    """
    tied = 0
    for name, module in decoder.transformer.named_modules():
        if isinstance(module, Attention) and "self_attn" not in name:
            module.k_proj.load_state_dict(module.q_proj.state_dict())
            tied += 1
    return tied


def tiny_sam_config(sam: Sam) -> dict[str, int]:
    """The `build_tiny_sam` arguments that rebuild `sam`."""
    enc = sam.image_encoder
    return {
        "img_size": enc.img_size,
        "embed_dim": enc.patch_embed.proj.out_channels,
        "depth": len(enc.blocks),
        "num_heads": enc.blocks[0].attn.num_heads,
    }


def save_tiny_sam(sam: Sam, path: Path, **meta: Any) -> None:
    """Save a tiny SAM with its build config, so `load_tiny_sam` needs nothing else."""
    atomic_torch_save({"kind": KIND, "config": tiny_sam_config(sam), "meta": meta, "state_dict": sam.state_dict()},
                      path)


def load_tiny_sam(path: Path, error: type[CheckpointError] = CheckpointError) -> Sam:
    """Rebuild a tiny SAM saved by `save_tiny_sam`."""
    ckpt = read_checkpoint(path, "tiny SAM", error)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise error(f"{path} is not a tiny SAM checkpoint (no 'kind': '{KIND}')")
    sam = build_tiny_sam(**ckpt["config"])
    load_state_checked(sam, ckpt["state_dict"], Path(path), f"tiny SAM {ckpt['config']}", error)
    return sam.eval()
