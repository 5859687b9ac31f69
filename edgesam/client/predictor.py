"""`OnnxPredictor`: segment-anything's `SamPredictor` interface on an exported bundle, without torch.

Imports numpy, onnxruntime and Pillow only (a test runs it where importing torch fails), so
it deploys where PyTorch does not. One `set_image` runs the encoder (and, with the
granularity prior, `rpn.onnx` on the encoder's pyramid outputs); each `predict` /
`predict_batch` is one `decoder.onnx` call for any number of prompt sets, followed by the
upsampling of `Sam.postprocess_masks` in numpy. Inputs are checked and converted as
`edgesam.client.inputs` documents (greyscale / RGBA images, boxes past the border).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgesam.client.bundle import Bundle, BundleError
from edgesam.client.inputs import as_rgb, check_prompt, require_image
from edgesam.client.prior import prior_boxes, proposals
from edgesam.client.transforms import decoder_feeds, preprocess, prompt_arrays, scale_coords, upsample_logits

PRECISIONS = ("fp32", "int8", "fp16")
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
MULTIMASK, SINGLE = slice(1, 4), slice(0, 1)  # SAM's multimask tokens and its single-mask token


def role(base: str, precision: str) -> str:
    """The bundle role of a precision variant: encoder, encoder_int8, decoder_fp16, ..."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return base if precision == "fp32" else f"{base}_{precision}"


def providers(device: str) -> list[str]:
    """onnxruntime execution providers for `device` ('cpu' or 'cuda'), or a clear error."""
    if device not in PROVIDERS:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("device 'cuda': this onnxruntime has no CUDAExecutionProvider "
                           f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    return PROVIDERS[device]


class OnnxPredictor:
    """`SamPredictor`'s `set_image` / `predict` on a bundle directory's ONNX files.

    Args:
        bundle: the export stage's output directory (with config.json).
        encoder_precision, decoder_precision: which files to run (fp32, int8 encoder, fp16).
        rpn: also run `rpn.onnx` so that `prior_box` turns a click into the prior's box.
        device: 'cpu' or 'cuda' (onnxruntime-gpu); threads: intra-op threads (None: onnxruntime's).
    """

    def __init__(self, bundle: str | Path, encoder_precision: str = "fp32", decoder_precision: str = "fp32",
                 rpn: bool = False, device: str = "cpu", threads: int | None = None) -> None:
        self.bundle = Bundle.open(bundle)
        config = self.bundle.config
        self.img_size, self.mask_threshold = int(config["img_size"]), float(config["mask_threshold"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._providers = providers(device)

        def load(name: str) -> ort.InferenceSession:
            path = self.bundle.path(name)
            try:
                return ort.InferenceSession(str(path), options, providers=self._providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BundleError(f"{path} cannot be loaded by onnxruntime: {exc}") from exc

        self.encoder = load(role("encoder", encoder_precision))
        self.decoder = load(role("decoder", decoder_precision))
        self.rpn = load("rpn_onnx") if rpn else None
        self._pyramid = [o.name for o in self.encoder.get_outputs()[1:]]  # the RPN's inputs, finest first
        self._check_shapes()
        self.reset_image()

    def _check_shapes(self) -> None:
        """The files agree with config.json and with each other (a foreign file fails here)."""
        size, grid = self.img_size, self.bundle.config["embedding_size"]
        encoder_in = self.encoder.get_inputs()[0].shape
        embedding = self.encoder.get_outputs()[0].shape
        decoder_in = {i.name: i.shape for i in self.decoder.get_inputs()}
        if list(encoder_in) != [1, 3, size, size]:
            raise BundleError(f"encoder input shape {encoder_in} does not match img_size {size} in config.json")
        if decoder_in.get("image_embeddings") != embedding or list(embedding[2:]) != list(grid):
            raise BundleError(f"encoder output {embedding} and decoder input {decoder_in.get('image_embeddings')} "
                              f"do not match the embedding size {grid} in config.json")
        if self.rpn is not None and [i.name for i in self.rpn.get_inputs()] != self._pyramid:
            raise BundleError(f"rpn.onnx reads {[i.name for i in self.rpn.get_inputs()]}, "
                              f"the encoder gives {self._pyramid}")

    def reset_image(self) -> None:
        self.features = self.proposals = None
        self.original_size = self.input_size = None
        self.is_image_set = False

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """Encode one image (uint8 RGB array, greyscale, RGBA or a PIL image)."""
        rgb = as_rgb(image, image_format)
        config = self.bundle.config
        x, self.input_size = preprocess(rgb, self.img_size, config["pixel_mean"], config["pixel_std"])
        self.original_size = rgb.shape[:2]
        outputs = self.encoder.run(None, {"image": x})
        self.features = outputs[0]
        if self.rpn is not None:
            scores, boxes = self.rpn.run(None, dict(zip(self._pyramid, outputs[1:])))
            rule = config["rpn"]
            self.proposals = proposals(scores, boxes, self.input_size, rule["score_threshold"], rule["max_proposals"],
                                       rule["pre_nms_top"], rule["nms_iou"])
        self.is_image_set = True

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None, multimask_output: bool = True,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One object, as `SamPredictor.predict`: points (P, 2) in pixels with labels (P,) 1 / 0, a
        box (4,) xyxy, low-res logits (1, 256, 256) of a previous call -> masks (C, H, W), scores
        (C,), low-res logits (C, 256, 256); C = 3 with `multimask_output`, else 1."""
        require_image(self.is_image_set)
        points, labels, boxes = check_prompt(point_coords, point_labels, box, mask_input, self.original_size)
        masks, scores, low = self._decode(points[None] if points is not None else None,
                                          labels[None] if labels is not None else None, boxes,
                                          None if mask_input is None else np.asarray(mask_input)[None],
                                          multimask_output, return_logits)
        return masks[0], scores[0], low[0]

    def predict_batch(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                      boxes: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                      multimask_output: bool = True, return_logits: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """N objects in one decoder call: point sets (N, P, 2) with labels (N, P) and / or boxes (N, 4),
        mask_input (N, 1, 256, 256) -> masks (N, C, H, W), scores (N, C), low-res (N, C, 256, 256)."""
        require_image(self.is_image_set)
        points, labels, boxes = check_prompt(point_coords, point_labels, boxes, mask_input, self.original_size,
                                             batched=True)
        return self._decode(points, labels, boxes, mask_input, multimask_output, return_logits)

    def _decode(self, points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None,
                mask_input: np.ndarray | None, multimask: bool, return_logits: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        points = scale_coords(points, self.original_size, self.img_size) if points is not None else None
        boxes = (scale_coords(boxes.reshape(-1, 2, 2), self.original_size, self.img_size).reshape(-1, 4)
                 if boxes is not None else None)
        return self.predict_input_frame(points, labels, boxes, mask_input, multimask, return_logits)

    def predict_input_frame(self, points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None,
                            mask_input: np.ndarray | None = None, multimask_output: bool = True,
                            return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`predict_batch` on prompts already in the resized input frame and unchecked (what
        `SamPredictor.predict_torch` takes). Mask input alone gets SAM's ONNX padding point."""
        require_image(self.is_image_set)
        if points is None and boxes is None:
            points, labels = np.zeros((len(mask_input), 0, 2)), np.zeros((len(mask_input), 0))
        coords, token_labels = prompt_arrays(points, labels, boxes)
        scores, low = self.decoder.run(None, decoder_feeds(self.features, coords, token_labels, mask_input))
        keep = MULTIMASK if multimask_output else SINGLE
        low, scores = low[:, keep], scores[:, keep]
        logits = upsample_logits(low, self.img_size, self.input_size, self.original_size)
        return (logits if return_logits else logits > self.mask_threshold), scores, low

    def prior_box(self, point: np.ndarray) -> np.ndarray | None:
        """The granularity prior's box (xyxy, original frame) for a click (x, y); None when the
        bundle's rule gives the click no box."""
        require_image(self.is_image_set)
        if self.rpn is None:
            raise RuntimeError("prior_box needs the RPN: OnnxPredictor(bundle, rpn=True)")
        point_in = scale_coords(np.asarray(point, np.float64).reshape(1, 2), self.original_size, self.img_size)
        boxes, found = prior_boxes(point_in, *self.proposals, self.bundle.config["rpn"])
        if not found[0]:
            return None
        h, w = self.input_size
        return boxes[0] * np.array([self.original_size[1] / w, self.original_size[0] / h] * 2)
