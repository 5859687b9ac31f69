"""`PromptDecoder`: SAM's prompt encoder + mask decoder rewritten for one ONNX call on N prompts.

The same weights and the same arithmetic as `Sam.prompt_encoder` + `MaskDecoder.predict_masks`
(parity within float rounding, `tests/test_onnx_decoder.py`), reorganised so that

* every tensor shape is a constant or the prompt / point count: no shape is computed from a
  float input, and onnx shape inference derives every output shape (TensorRT, NPU compilers);
* image-side tensors stay channels-last (N, HW, C) from the start: attention heads are block
  masks on the channel axis rather than transposes of (N, HW, C) tensors, the positional
  term is added once per layer for both projections that need it, and the two transposed
  convolutions of the upscaling are matrix products followed by one reordering of the four
  output masks (SAM transposes the full (N, C, H, W) maps several times per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import nn


def _head_mask(attention: Attention) -> torch.Tensor:
    """(heads, 1, dim) 0/1 mask selecting each head's channels."""
    heads, dim = attention.num_heads, attention.internal_dim
    mask = torch.zeros(heads, 1, dim)
    for h in range(heads):
        mask[h, 0, h * (dim // heads):(h + 1) * (dim // heads)] = 1.0
    return mask


def _attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """`attention` of few projected queries (N, T, D) over projected keys/values (N, L, D), heads
    as channel masks: (q * mask_h) . k is head h's score; masking the output keeps h's channels."""
    scale = (attention.internal_dim // attention.num_heads) ** -0.5
    scores = ((q[:, None] * mask) @ k[:, None].transpose(-1, -2)) * scale  # (N, H, T, L)
    return attention.out_proj(((scores.softmax(-1) @ v[:, None]) * mask).sum(1))


def _transposed_conv_weights(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 transposed convolution as (C_in, 4 C_out) matrix and bias, columns (dy, dx, c)."""
    c_in, c_out = conv.weight.shape[:2]
    return conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out), conv.bias.repeat(4)


class PromptDecoder(nn.Module):
    """(image_embeddings (1, 256, h, w), point_coords (N, P, 2), point_labels (N, P),
    mask_input (N, 1, 4h, 4w), has_mask_input (N,)) -> (scores (N, 4), masks (N, 4, 4h, 4w)):
    predicted IoU and low-res logits of all four mask tokens for each of N prompt sets.

    Coordinates are in the input frame; labels 1 / 0 points, 2 / 3 box corners, -1 padding.
    """

    def __init__(self, sam: Sam):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.img_size = sam.image_encoder.img_size
        self.grid = tuple(sam.prompt_encoder.image_embedding_size)
        self.hw, self.channels = self.grid[0] * self.grid[1], sam.prompt_encoder.embed_dim
        self.output_tokens = 1 + sam.mask_decoder.num_mask_tokens
        transformer = sam.mask_decoder.transformer
        pe = sam.prompt_encoder.get_dense_pe().detach()
        self.register_buffer("image_pe", pe.flatten(2).transpose(1, 2).contiguous(), persistent=False)
        self.register_buffer("self_heads", _head_mask(transformer.layers[0].self_attn), persistent=False)
        self.register_buffer("cross_heads", _head_mask(transformer.final_attn_token_to_image), persistent=False)
        upscaling = sam.mask_decoder.output_upscaling
        self.up_channels = (upscaling[0].out_channels, upscaling[3].out_channels)
        for name, conv in (("up1", upscaling[0]), ("up2", upscaling[3])):
            weight, bias = _transposed_conv_weights(conv)
            self.register_buffer(f"{name}_weight", weight.detach(), persistent=False)
            self.register_buffer(f"{name}_bias", bias.detach(), persistent=False)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`PromptEncoder._embed_points` with explicit padding points: (N, P, 256)."""
        encoder = self.prompt_encoder
        embedding = encoder.pe_layer._pe_encoding((coords + 0.5) / self.img_size)
        labels = labels[..., None]
        embedding = embedding * (labels != -1) + encoder.not_a_point_embed.weight * (labels == -1)
        for i, point in enumerate(encoder.point_embeddings):
            embedding = embedding + point.weight * (labels == i)
        return embedding

    def embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Dense prompt embedding, channels-last (N, HW, 256): the mask's or `no_mask_embed`."""
        downscaling = self.prompt_encoder.mask_downscaling
        small = downscaling[:-1](mask_input)  # (N, 16, h, w): few channels, cheap to transpose
        last = downscaling[-1]
        small = small.reshape(mask_input.shape[0], last.in_channels, self.hw).transpose(1, 2)
        dense = small @ last.weight[:, :, 0, 0].T + last.bias
        has = has_mask_input[:, None, None]
        return has * dense + (1 - has) * self.prompt_encoder.no_mask_embed.weight

    def _tokens_to_image(self, attention: Attention, tokens: torch.Tensor, keys_pe: torch.Tensor,
                         keys: torch.Tensor) -> torch.Tensor:
        return _attend(attention, attention.q_proj(tokens), attention.k_proj(keys_pe), attention.v_proj(keys),
                       self.cross_heads)

    def _image_to_tokens(self, attention: Attention, image: torch.Tensor, tokens: torch.Tensor,
                         values: torch.Tensor) -> torch.Tensor:
        """Image queries (N, HW, C) over T tokens; only the small value tensor is split in heads."""
        n, t, heads = tokens.shape[0], tokens.shape[1], attention.num_heads
        head_dim = attention.internal_dim // heads
        q = attention.q_proj(image)[:, None]
        k = attention.k_proj(tokens)[:, None] * self.cross_heads
        scores = (q @ k.transpose(-1, -2)) * (1.0 / head_dim ** 0.5)  # (N, H, HW, T)
        v = attention.v_proj(values).reshape(n, t, heads, head_dim).transpose(1, 2)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, self.hw, attention.internal_dim)
        return attention.out_proj(out)

    def _block(self, layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor,
               query_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`TwoWayAttentionBlock.forward` on channels-last keys."""
        q = queries if layer.skip_first_layer_pe else queries + query_pe
        attention = layer.self_attn
        attended = _attend(attention, attention.q_proj(q), attention.k_proj(q), attention.v_proj(queries),
                           self.self_heads)
        queries = layer.norm1(attended if layer.skip_first_layer_pe else queries + attended)
        keys_pe = keys + self.image_pe  # once for both projections that need it (SAM adds it twice)
        queries = layer.norm2(queries + self._tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe,
                                                              keys_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + self._image_to_tokens(layer.cross_attn_image_to_token, keys_pe, queries + query_pe,
                                                        queries))
        return queries, keys

    def _upscale(self, keys: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """Output upscaling and the hypernetwork product, channels-last -> (N, 4, 4h, 4w)."""
        (h, w), n = self.grid, keys.shape[0]
        upscaling = self.mask_decoder.output_upscaling
        norm, act1, act2 = upscaling[1], upscaling[2], upscaling[4]
        (c1, c2), k = self.up_channels, self.output_tokens - 1
        x = (keys @ self.up1_weight + self.up1_bias).reshape(n, h * w * 4, c1)
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        x = act2(x @ self.up2_weight + self.up2_bias).reshape(n, h * w * 16, c2)
        masks = (x @ hyper_in.transpose(1, 2)).reshape(n, h, w, 2, 2, 2, 2, k)  # rows (y, x, dy1, dx1, dy2, dx2)
        return masks.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(n, k, 4 * h, 4 * w)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder, transformer = self.mask_decoder, self.mask_decoder.transformer
        image = image_embeddings.reshape(1, self.channels, self.hw).transpose(1, 2)
        per_prompt = torch.ones_like(point_labels[:, :1, None])  # (N, 1, 1): broadcasting keeps N in shape inference
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]) * per_prompt
        prompt = torch.cat([output_tokens, self.embed_points(point_coords, point_labels)], dim=1)
        queries, keys = prompt, image + self.embed_masks(mask_input, has_mask_input)
        for layer in transformer.layers:
            queries, keys = self._block(layer, queries, keys, prompt)
        final = transformer.final_attn_token_to_image
        queries = transformer.norm_final_attn(queries + self._tokens_to_image(final, queries + prompt,
                                                                              keys + self.image_pe, keys))
        hyper_in = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                               dim=1)
        return decoder.iou_prediction_head(queries[:, 0]), self._upscale(keys, hyper_in)
