"""Traceable modules behind the exported ONNX graphs (what `edgesam.export.onnx` traces).

* `EncoderGraph`: the fused encoder with the backbone's pyramid as extra outputs, so the RPN
  needs no second encoder pass.
* `SamDecoder`: segment-anything's `SamOnnxModel` interface with tensor crop indices.
* `CompactDecoder`: EdgeSAM's compact interface (one prompt set, no mask input).
* `PromptDecoder` (`edgesam.export.decoder`): the client decoder, N prompt sets per call.
* `RPNGraph`: the RPN head and its box decoding for one image (thresholding, NMS and the
  merge around a click are data-dependent and run in numpy, `edgesam.client.prior`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from edgesam.models.rpn import MAX_LOG_DISTANCE, RPN, _flatten, _locations


def pyramid_names(sam: Sam) -> tuple[str, ...]:
    """Output names of the backbone maps the encoder graph exposes, finest first."""
    return tuple(f"features_s{s}" for s in sam.image_encoder.feature_strides)


class EncoderGraph(nn.Module):
    """image -> (image_embeddings, *backbone maps at the encoder's feature strides)."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, features = self.encoder.forward_pyramid(image)
        return (embedding, *features)


class SamDecoder(SamOnnxModel):
    """`SamOnnxModel` whose crop of the padding follows `orig_im_size` in the exported graph.

    segment-anything crops with Python ints, which tracing freezes to the example's aspect
    ratio; here the crop indices are tensors, so every image size exports correctly.
    """

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        rows = torch.arange(prepadded[0], device=masks.device)
        cols = torch.arange(prepadded[1], device=masks.device)
        masks = masks.index_select(2, rows).index_select(3, cols)
        h, w = orig_im_size.to(torch.int64)[0], orig_im_size.to(torch.int64)[1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)


class CompactDecoder(nn.Module):
    """EdgeSAM's compact decoder: (image_embeddings, point_coords, point_labels) -> (scores, masks)."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.prompts = SamOnnxModel(sam, return_single_mask=False)  # its traceable point embedding
        self.sam = sam

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.prompts._embed_points(point_coords, point_labels)
        h, w = image_embeddings.shape[-2:]
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(point_coords.shape[0], -1, h, w)
        masks, scores = self.sam.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return scores, masks


class RPNGraph(nn.Module):
    """Backbone maps (finest first) of one image -> (scores (L,) after the sigmoid, boxes (L, 4)
    xyxy in the input frame, not clipped), L being every location of every level.

    The locations are buffers fixed by `img_size`, so the graph has only static shapes.
    """

    def __init__(self, rpn: RPN, img_size: int):
        super().__init__()
        self.rpn = rpn
        shapes = [(img_size // s, img_size // s) for s in rpn.strides]
        self.register_buffer("locations", torch.cat([_locations(hw, s, torch.device("cpu"))
                                                     for hw, s in zip(shapes, rpn.strides)]))
        self.register_buffer("strides", torch.cat([torch.full((h * w, 1), float(s)) for (h, w), s in
                                                   zip(shapes, rpn.strides)]))

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = self.rpn(list(features))
        scores = _flatten(logits)[0, :, 0].sigmoid()
        distance = _flatten(deltas)[0].clamp(max=MAX_LOG_DISTANCE).exp() * self.strides
        boxes = torch.cat([self.locations - distance[:, :2], self.locations + distance[:, 2:]], dim=1)
        return scores, boxes
