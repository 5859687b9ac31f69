"""`EdgeSAMPredictor`: segment-anything's `SamPredictor`, plus EdgeSAM's granularity prior,
checked inputs (`edgesam.client.inputs`), N prompts per call and loading from an exported bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from edgesam.client.bundle import Bundle, BundleError
from edgesam.client.inputs import as_rgb, check_prompt, require_image
from edgesam.models.rpn import PRIOR_RULES, RPN, prior_boxes, prior_proposals


class EdgeSAMPredictor(SamPredictor):
    """A `SamPredictor` whose image pass also proposes boxes with the RPN (when given), so that
    `prior_box` turns a click into the box prompt of the granularity prior (rule `merge`)."""

    def __init__(self, sam: Sam, rpn: RPN | None = None, merge: str = "official") -> None:
        super().__init__(sam)
        self.rpn, self.rule = rpn, PRIOR_RULES[merge]
        self.proposals: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """`SamPredictor.set_image` after `edgesam.client.inputs.as_rgb` (greyscale, RGBA, PIL, BGR)."""
        super().set_image(as_rgb(image, image_format))

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

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None, multimask_output: bool = True,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`SamPredictor.predict` after `edgesam.client.inputs.check_prompt` (boxes clipped to the image)."""
        require_image(self.is_image_set)
        points, labels, boxes = check_prompt(point_coords, point_labels, box, mask_input, self.original_size)
        return super().predict(points, labels, None if boxes is None else boxes[0], mask_input, multimask_output,
                               return_logits)

    @torch.no_grad()
    def predict_batch(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                      boxes: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                      multimask_output: bool = True, return_logits: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """N objects in one decoder pass: point sets (N, P, 2) with labels (N, P) and / or boxes (N, 4)
        in pixels -> masks (N, C, H, W), scores (N, C), low-res logits (N, C, 256, 256)."""
        require_image(self.is_image_set)
        points, labels, boxes = check_prompt(point_coords, point_labels, boxes, mask_input, self.original_size,
                                             batched=True)

        def tensor(values: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if values is None else torch.as_tensor(values, dtype=dtype, device=self.device)

        if points is not None:
            points = self.transform.apply_coords(points, self.original_size)
        if boxes is not None:
            boxes = self.transform.apply_boxes(boxes, self.original_size)
        outputs = self.predict_torch(tensor(points, torch.float), tensor(labels, torch.int), tensor(boxes, torch.float),
                                     tensor(mask_input, torch.float), multimask_output, return_logits)
        return tuple(t.cpu().numpy() for t in outputs)  # type: ignore[return-value]

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

    @classmethod
    def with_rpn_settings(cls, sam: Sam, rpn: RPN, settings: dict[str, Any]) -> EdgeSAMPredictor:
        """A predictor with the prior rule an RPN checkpoint or bundle was saved with (`merge`)."""
        return cls(sam, rpn, settings.get("merge", "official"))

    @classmethod
    def from_bundle(cls, bundle: str | Path, rpn: bool = False, device: str = "cpu") -> EdgeSAMPredictor:
        """The PyTorch predictor of an exported bundle (`edgesam.pt`, and `rpn.pt` with `rpn`),
        each file checked against config.json."""
        from edgesam.models.edgesam import load_edgesam
        from edgesam.models.rpn import load_rpn

        opened = Bundle.open(bundle)
        sam = load_edgesam(opened.path("checkpoint")).to(device)
        if not rpn:
            return cls(sam)
        if "rpn" not in opened.config:
            raise BundleError(f"bundle {opened.root} has no RPN settings in its config.json")
        return cls.with_rpn_settings(sam, load_rpn(opened.path("rpn_checkpoint")).to(device), opened.config["rpn"])
