"""`EdgeSAMPredictor`: segment-anything's `SamPredictor`, plus EdgeSAM's granularity prior."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from edgesam.models.rpn import RPN, knn_merge, proposals


class EdgeSAMPredictor(SamPredictor):
    """A `SamPredictor` whose image pass also proposes boxes with the RPN (when given), so that
    `prior_box` turns a click into the box prompt of the granularity prior."""

    def __init__(self, sam: Sam, rpn: RPN | None = None, k: int = 3, score_threshold: float = 0.05,
                 max_proposals: int = 100) -> None:
        super().__init__(sam)
        self.rpn, self.k, self.score_threshold, self.max_proposals = rpn, k, score_threshold, max_proposals
        self.proposals: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """`SamPredictor.set_torch_image` with one encoder pass for the embedding and the RPN's pyramid."""
        if self.rpn is None:
            super().set_torch_image(transformed_image, original_image_size)
            return
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features, pyramid = self.model.image_encoder.forward_pyramid(self.model.preprocess(transformed_image))
        self.proposals = proposals(self.rpn, *self.rpn(pyramid), [self.input_size], self.score_threshold,
                                   self.max_proposals)[0]
        self.is_image_set = True

    def prior_box(self, point: np.ndarray) -> np.ndarray | None:
        """The granularity-prior box (xyxy, original frame) for a click (x, y), or None without proposals."""
        if self.proposals is None:
            raise RuntimeError("prior_box needs an RPN and an image (set_image) first")
        point_in = torch.as_tensor(self.transform.apply_coords(np.asarray(point, float)[None], self.original_size))
        merged = knn_merge(point_in.float(), *self.proposals, self.k)
        if merged is None:
            return None
        scale = np.array(self.original_size[::-1] * 2, float) / np.array(self.input_size[::-1] * 2, float)
        return merged[0].cpu().numpy() * scale

    @classmethod
    def with_rpn_settings(cls, sam: Sam, rpn: RPN, settings: dict[str, Any]) -> EdgeSAMPredictor:
        """A predictor with the prior settings an RPN checkpoint was saved with (k, thresholds)."""
        keys = ("k", "score_threshold", "max_proposals")
        return cls(sam, rpn, **{k: settings[k] for k in keys if k in settings})
