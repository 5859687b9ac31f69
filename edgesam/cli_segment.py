"""`edgesam predict` and `edgesam everything`: predictors for either backend, image folders,
mask / overlay / COCO-RLE outputs.

Prompt semantics follow segment-anything: all `--point`s prompt one object (SAM's multimask
output only for a lone point), each `--box` prompts one object, a box with points is one
object. `--rpn` turns the first positive point into the granularity prior's box.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
OVERLAY_COLOR = np.array([30, 144, 255], dtype=np.float32)  # the blue of SAM's notebooks


def image_paths(path: Path) -> list[Path]:
    """`path` itself, or the images of a folder (sorted), or a clear error."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return found
    if not path.is_file():
        raise SystemExit(f"error: image not found: {path}")
    return [path]


def load_image(path: Path) -> np.ndarray:
    """An RGB uint8 array (greyscale, palette and RGBA converted by Pillow), or an error naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise SystemExit(f"error: cannot read image {path}: {exc}") from exc


def bundle_dir(checkpoint: Path) -> Path:
    return checkpoint if checkpoint.is_dir() else checkpoint.parent


def _torch_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: PyTorch sees no CUDA device here")
    return device


def torch_predictor(checkpoint: Path, rpn: bool, rpn_checkpoint: Path | None, device: str) -> Any:
    """`EdgeSAMPredictor` of a bundle folder (its files checked against config.json) or of a
    checkpoint; with `rpn`, the RPN of the bundle, beside the checkpoint, or given."""
    from edgesam.client.bundle import CHECKPOINT, RPN_CHECKPOINT, BundleError
    from edgesam.models.checkpoint import CheckpointError, read_checkpoint
    from edgesam.models.edgesam import load_edgesam
    from edgesam.models.rpn import load_rpn
    from edgesam.predictor import EdgeSAMPredictor

    if checkpoint.is_dir() and rpn_checkpoint is None:
        try:
            return EdgeSAMPredictor.from_bundle(checkpoint, rpn, _torch_device(device))
        except (BundleError, CheckpointError) as exc:
            raise SystemExit(f"error: {exc}") from exc
    file = checkpoint / CHECKPOINT if checkpoint.is_dir() else checkpoint
    rpn_file = rpn_checkpoint or bundle_dir(checkpoint) / RPN_CHECKPOINT
    if rpn and not rpn_file.is_file():
        raise SystemExit(f"error: --rpn needs the RPN checkpoint: {rpn_file} not found "
                         f"(export bundles have {RPN_CHECKPOINT} beside {CHECKPOINT}; else pass --rpn-checkpoint FILE)")
    device = _torch_device(device)
    try:
        model = load_edgesam(file).to(device)
        if not rpn:
            return EdgeSAMPredictor(model)
        rpn_model = load_rpn(rpn_file).to(device)  # checks the file is an RPN checkpoint
        settings = read_checkpoint(rpn_file, "RPN").get("meta", {})  # the prior settings it was trained for
        return EdgeSAMPredictor.with_rpn_settings(model, rpn_model, settings)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from exc


def make_predictor(args: argparse.Namespace, rpn: bool) -> Any:
    """The predictor of `--backend` (torch: the checkpoint; onnx: the bundle folder it is in)."""
    from edgesam.client.bundle import BundleError

    if args.backend == "torch":
        return torch_predictor(args.checkpoint, rpn, args.rpn_checkpoint, args.device)
    if args.rpn_checkpoint is not None:
        raise SystemExit("error: --rpn-checkpoint is for --backend torch; the onnx backend uses the bundle's rpn.onnx")
    from edgesam.client.predictor import OnnxPredictor

    try:
        return OnnxPredictor(bundle_dir(args.checkpoint), encoder_precision=args.precision, rpn=rpn, device=args.device)
    except (BundleError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from exc


def overlay(image: np.ndarray, masks: np.ndarray, points: np.ndarray | None = None,
            boxes: np.ndarray | None = None, colors: np.ndarray | None = None) -> np.ndarray:
    """The image with each mask (K, H, W) tinted, the boxes outlined and the points marked."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    colors = np.repeat(OVERLAY_COLOR[None], len(masks), 0) if colors is None else colors
    for mask, color in zip(masks, colors):
        out[mask] = 0.45 * out[mask] + 0.55 * color
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    radius = max(3, round(max(image.shape[:2]) / 150))
    for box in boxes if boxes is not None else []:
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=max(2, radius // 2))
    for x, y in points if points is not None else []:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 50, 50), outline=(255, 255, 255))
    return np.asarray(canvas)


def _prompts(args: argparse.Namespace) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(points (P, 2), labels (P,), boxes (K, 4)) from the command line, checked for consistency."""
    points = np.array(args.point, float) if args.point else None
    if args.label and not args.point:
        raise SystemExit("error: --label needs --point")
    labels = np.array(args.label or [1] * len(args.point or []), int) if points is not None else None
    if points is not None and len(labels) != len(points):
        raise SystemExit(f"error: {len(labels)} --label for {len(points)} --point: give one per point, or none (all 1)")
    boxes = np.array(args.box, float) if args.box else None
    if points is not None and boxes is not None and len(boxes) > 1:
        raise SystemExit("error: points go with one box (one object); several boxes are one object each")
    if args.rpn and (points is None or boxes is not None):
        raise SystemExit("error: --rpn turns a point prompt into a box; it needs --point and no --box")
    return points, labels, boxes


def predict_one(predictor: Any, image: np.ndarray, args: argparse.Namespace, points: np.ndarray | None,
                labels: np.ndarray | None, boxes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Masks (K, H, W) and predicted IoU (K,) of the prompted objects, and the boxes used."""
    from edgesam.client.inputs import PromptError

    try:
        predictor.set_image(image)
        if args.rpn:
            prior = predictor.prior_box(points[labels == 1][0] if (labels == 1).any() else points[0])
            if prior is None:
                raise SystemExit("error: the RPN proposed no box on this image")
            boxes = prior[None]
        if boxes is not None and len(boxes) > 1:
            masks, scores, _ = predictor.predict_batch(boxes=boxes, multimask_output=False)
            return masks[:, 0], scores[:, 0], boxes
        multimask = boxes is None and len(points) == 1  # a lone point is ambiguous: best of SAM's three
        masks, scores, _ = predictor.predict(points, labels, None if boxes is None else boxes[0], multimask_output=multimask)
    except PromptError as exc:
        raise SystemExit(f"error: {exc}") from exc
    best = int(np.argmax(scores))
    return masks[best][None], scores[best][None], boxes


def cmd_predict(args: argparse.Namespace) -> None:
    from PIL import Image

    points, labels, boxes = _prompts(args)
    paths = image_paths(args.image)
    predictor = make_predictor(args, args.rpn)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(paths, desc="predict", unit="img", disable=True if len(paths) == 1 else None):
        image = load_image(path)
        start = time.perf_counter()
        try:
            masks, scores, used = predict_one(predictor, image, args, points, labels, boxes)
        except SystemExit as exc:
            raise SystemExit(f"{exc} ({path})") from exc
        elapsed = time.perf_counter() - start
        names = [f"{path.stem}_mask.png"] if len(masks) == 1 else [f"{path.stem}_mask_{i}.png" for i in range(len(masks))]
        for name, mask in zip(names, masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.out / name)
        Image.fromarray(overlay(image, masks, points, used)).save(args.out / f"{path.stem}_overlay.png")
        lines = [f"mask {args.out / n} ({int(m.sum())} px, predicted IoU {s:.3f}"
                 + (f", RPN box {np.round(used[0], 1).tolist()}" if args.rpn else "") + ")"
                 for n, m, s in zip(names, masks, scores)]
        tqdm.write("\n".join(lines) + f"\noverlay {args.out / f'{path.stem}_overlay.png'}\n"
                   f"{elapsed:.2f} s ({args.backend}, {args.device})")


class _OnnxSamFacade:
    """`OnnxPredictor` with the `SamPredictor` surface `SamAutomaticMaskGenerator` uses."""

    def __init__(self, predictor: Any):
        import torch
        from segment_anything.utils.transforms import ResizeLongestSide

        self.onnx, self.torch = predictor, torch
        self.transform, self.device = ResizeLongestSide(predictor.img_size), torch.device("cpu")
        self.model = SimpleNamespace(mask_threshold=predictor.mask_threshold)

    def set_image(self, image: np.ndarray) -> None:
        self.onnx.set_image(image)

    def reset_image(self) -> None:
        self.onnx.reset_image()

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        out = self.onnx.predict_input_frame(point_coords.numpy(), point_labels.numpy(),
                                            None if boxes is None else boxes.numpy(), None, multimask_output,
                                            return_logits)
        return tuple(self.torch.from_numpy(np.ascontiguousarray(t)) for t in out)


def mask_generator(predictor: Any, args: argparse.Namespace, point_grid: np.ndarray | None) -> Any:
    """segment-anything's automatic mask generator on `predictor`, with a progress bar per batch."""
    from segment_anything import SamAutomaticMaskGenerator

    class ProgressMaskGenerator(SamAutomaticMaskGenerator):
        def _process_batch(self, *batch, **kwargs):
            data = super()._process_batch(*batch, **kwargs)
            self.bar.update(len(batch[0]))
            return data

    if point_grid is not None and len(point_grid) == 0:
        raise SystemExit("error: the RPN proposed no box on this image; run without --rpn for the point grid")
    facade = predictor if args.backend == "torch" else _OnnxSamFacade(predictor)
    generator = ProgressMaskGenerator(
        SimpleNamespace(image_encoder=SimpleNamespace(img_size=facade.transform.target_length)),
        points_per_side=None if point_grid is not None else args.points_per_side,
        point_grids=None if point_grid is None else [point_grid], points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
        output_mode="coco_rle")
    generator.predictor = facade
    generator.bar = tqdm(total=len(generator.point_grids[0]), desc="everything", unit="prompt", disable=None)
    return generator


def rpn_point_grid(predictor: Any, image: np.ndarray) -> np.ndarray:
    """Centres of the RPN's proposals, normalized to [0, 1] (x, y) of the image."""
    predictor.set_image(image)
    boxes = predictor.proposals[0]
    boxes = boxes.cpu().numpy() if hasattr(boxes, "cpu") else boxes
    h, w = predictor.input_size
    return ((boxes[:, :2] + boxes[:, 2:]) / 2) / np.array([w, h])


def cmd_everything(args: argparse.Namespace) -> None:
    from PIL import Image
    from pycocotools import mask as mask_utils

    paths = image_paths(args.image)
    predictor = make_predictor(args, args.rpn)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = load_image(path)
        start = time.perf_counter()
        generator = mask_generator(predictor, args, rpn_point_grid(predictor, image) if args.rpn else None)
        with generator.bar:
            annotations = generator.generate(image)
        annotations.sort(key=lambda a: -a["area"])
        json_path, overlay_path = args.out / f"{path.stem}_masks.json", args.out / f"{path.stem}_everything.png"
        json_path.write_text(json.dumps({"image": path.name, "height": image.shape[0], "width": image.shape[1],
                                         "annotations": annotations}))
        masks = np.array([mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations]
                         ).reshape(-1, *image.shape[:2])
        colors = np.random.default_rng(0).uniform(0, 255, (len(masks), 3)).astype(np.float32)
        Image.fromarray(overlay(image, masks, colors=colors)).save(overlay_path)
        print(f"{len(annotations)} masks {json_path} (COCO RLE)\noverlay {overlay_path}\n"
              f"{time.perf_counter() - start:.2f} s ({args.backend}, {args.device})")
