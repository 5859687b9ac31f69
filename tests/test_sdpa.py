"""SAM's ViT attention through SDPA equals segment-anything's own (global and windowed blocks)."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT

from edgesam.models.sdpa import use_sdpa


def test_sdpa_attention_matches_segment_anything():
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=4, out_chans=32,
                              qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                              window_size=4, global_attn_indexes=(1,)).eval()
    for block in encoder.blocks:  # non-zero relative positions, so the bias matters
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        eager = encoder(x)
        assert use_sdpa(encoder) == 2
        fast = encoder(x)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
