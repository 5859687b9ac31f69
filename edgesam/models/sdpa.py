"""SAM's ViT attention through `torch.nn.functional.scaled_dot_product_attention`.

segment-anything's `Attention` materializes the attention map and adds its decomposed
relative-position terms to it; the same computation is SDPA with that sum as an additive
bias, which lets PyTorch pick a fused kernel (memory-efficient attention takes a bias) on
GPUs. `use_sdpa` swaps the forward of each attention module of an image encoder in place,
without forking segment-anything's files; the weights and the result are unchanged (to float
tolerance).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def _sdpa_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if self.use_rel_pos:  # the terms of segment-anything's add_decomposed_rel_pos, on the unscaled q
        r_q = q.reshape(b * self.num_heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def use_sdpa(encoder: nn.Module) -> int:
    """Route every segment-anything `Attention` of `encoder` through SDPA; returns how many."""
    count = 0
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_sdpa_forward, module)
            count += 1
    return count
