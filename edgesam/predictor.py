"""`EdgeSAMPredictor`: segment-anything's `SamPredictor`, plus EdgeSAM's granularity prior."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from edgesam.models.rpn import PRIOR_RULES, RPN, prior_boxes, prior_proposals


class EdgeSAMPredictor(SamPredictor):
    """A `SamPredictor` whose image pass also proposes boxes with the RPN (when given), so that
    `prior_box` turns a click into the box prompt of the granularity prior (rule `merge`)."""

    def __init__(self, sam: Sam, rpn: RPN | None = None, merge: str = "official") -> None:
        super().__init__(sam)
        self.rpn, self.rule = rpn, PRIOR_RULES[merge]
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
        self.proposals = prior_proposals(self.rpn, pyramid, [self.input_size], self.rule)[0]
        self.is_image_set = True

    def prior_box(self, point: np.ndarray) -> np.ndarray | None:
        """The granularity-prior box (xyxy, original frame) for a click (x, y); None when the
        rule gives none (no proposal, or none containing the click)."""
        if self.proposals is None:
            raise RuntimeError("prior_box needs an RPN and an image (set_image) first")
        point_in = torch.as_tensor(self.transform.apply_coords(np.asarray(point, float)[None], self.original_size))
        boxes, found = prior_boxes(point_in.float(), *self.proposals, self.rule)
        if not bool(found[0]):
            return None
        scale = np.array(self.original_size[::-1] * 2, float) / np.array(self.input_size[::-1] * 2, float)
        return boxes[0].cpu().numpy() * scale
