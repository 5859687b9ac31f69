"""The `edgesam` command.

    edgesam predict IMAGE --point X,Y [--label 1] --checkpoint CKPT --out DIR [--rpn RPN_CKPT]
    edgesam predict IMAGE --box X0,Y0,X1,Y1 --checkpoint CKPT --out DIR
    edgesam info CKPT
    edgesam data synth --profile default --out DIR
    edgesam teacher pack TEACHER_ARTIFACT --out data/reference_teacher
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

OVERLAY_COLOR = np.array([30, 144, 255], dtype=np.float32)  # the blue of SAM's notebooks


def parse_floats(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{what} expects {count} comma-separated numbers, got {text!r}")
    return values


def load_image(path: Path) -> np.ndarray:
    """An RGB uint8 array, or a clear error naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SystemExit(f"error: image not found: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise SystemExit(f"error: cannot read image {path}: {exc}") from exc


def overlay(image: np.ndarray, mask: np.ndarray, points: np.ndarray | None, box: np.ndarray | None) -> np.ndarray:
    """The image with the mask tinted, the box outlined and the points marked."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * OVERLAY_COLOR
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    radius = max(3, round(max(image.shape[:2]) / 150))
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=max(2, radius // 2))
    for x, y in points if points is not None else []:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 50, 50), outline=(255, 255, 255))
    return np.asarray(canvas)


def cmd_predict(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from edgesam.models.checkpoint import CheckpointError
    from edgesam.models.edgesam import load_edgesam
    from edgesam.models.rpn import load_rpn
    from edgesam.predictor import EdgeSAMPredictor

    if args.rpn and args.point is None:
        raise SystemExit("error: --rpn turns a point prompt into a box; it needs --point")
    image = load_image(args.image)
    try:
        model = load_edgesam(args.checkpoint)
        rpn = load_rpn(args.rpn) if args.rpn else None
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if rpn is None:
        predictor = EdgeSAMPredictor(model)
    else:  # the merge rule it was saved with
        meta = torch.load(args.rpn, map_location="cpu", weights_only=True).get("meta", {})
        predictor = EdgeSAMPredictor(model, rpn, meta.get("merge", "official"))
    start = time.perf_counter()
    points = labels = box = None
    if args.point is not None:
        points, labels = np.array([args.point]), np.array([args.label])
    if args.box is not None:
        box = np.array(args.box)
    predictor.set_image(image)
    if rpn is not None:
        box = predictor.prior_box(points[0])
        if box is None:
            raise SystemExit(f"error: the RPN {args.rpn} proposed no box around this click")
    # A lone point is ambiguous: take the best of SAM's three masks, as SAM recommends.
    multimask = box is None
    masks, scores, _ = predictor.predict(
        point_coords=points, point_labels=labels, box=box, multimask_output=multimask
    )
    best = int(np.argmax(scores))
    mask = masks[best]
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.image.stem
    mask_path, overlay_path = args.out / f"{stem}_mask.png", args.out / f"{stem}_overlay.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    Image.fromarray(overlay(image, mask, points, box)).save(overlay_path)
    print(
        f"mask {mask_path} ({int(mask.sum())} px, predicted IoU {scores[best]:.3f}"
        + (f", RPN box {np.round(box, 1).tolist()}" if args.rpn else "")
        + f")\noverlay {overlay_path}\n{elapsed:.2f} s on CPU"
    )


def cmd_info(args: argparse.Namespace) -> None:
    from edgesam.models.edgesam import EdgeSAMCheckpointError, load_edgesam, read_edgesam_checkpoint

    try:
        ckpt = read_edgesam_checkpoint(args.checkpoint)
        model = load_edgesam(args.checkpoint)
    except EdgeSAMCheckpointError as exc:
        raise SystemExit(f"error: {exc}") from exc
    cfg = ckpt["config"]

    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    rows = [
        ("checkpoint", str(args.checkpoint)),
        ("backbone", cfg["backbone"]),
        ("input size", f"{cfg['img_size']}x{cfg['img_size']}"),
        ("embedding", f"256x{cfg['img_size'] // 16}x{cfg['img_size'] // 16}"),
        ("upsample mode", cfg["upsample_mode"]),
        ("fused", str(cfg["fused"])),
        ("params (total)", millions(model)),
        ("  image encoder", millions(model.image_encoder)),
        ("  prompt encoder", millions(model.prompt_encoder)),
        ("  mask decoder", millions(model.mask_decoder)),
    ]
    rows += [(f"meta.{k}", json.dumps(v, default=str)) for k, v in ckpt["meta"].items()]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def cmd_data_synth(args: argparse.Namespace) -> None:
    from edgesam.config import load_profile
    from edgesam.data.synth import write_benchmark

    cfg = load_profile(args.profile).data
    summary = write_benchmark(args.out, cfg)
    print(json.dumps(summary, indent=2, default=str))


def cmd_teacher_pack(args: argparse.Namespace) -> None:
    from edgesam.models.reference import pack_teacher_artifact

    meta = pack_teacher_artifact(args.artifact, args.out)
    print(json.dumps({k: meta[k] for k in ("arch", "sha256", "bytes", "benchmark", "val")}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesam", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment one object of an image and write mask + overlay PNGs")
    p.add_argument("image", type=Path)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--point", type=lambda s: parse_floats(s, 2, "--point"), metavar="X,Y")
    prompt.add_argument("--box", type=lambda s: parse_floats(s, 4, "--box"), metavar="X0,Y0,X1,Y1")
    p.add_argument("--label", type=int, choices=(0, 1), default=1, help="1 foreground, 0 background point")
    p.add_argument("--checkpoint", type=Path, required=True, help="EdgeSAM checkpoint (save_edgesam)")
    p.add_argument("--rpn", type=Path, metavar="RPN_CKPT",
                   help="RPN checkpoint (save_rpn): turn the point into a box with the granularity prior")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="print an EdgeSAM checkpoint's model summary")
    p.add_argument("checkpoint", type=Path)
    p.set_defaults(func=cmd_info)

    teacher = sub.add_parser("teacher", help="teacher tools").add_subparsers(dest="teacher_command", required=True)
    p = teacher.add_parser("pack", help="write a trained teacher artifact as the shipped reference teacher")
    p.add_argument("artifact", type=Path, help="a committed teacher artifact of kind synthetic")
    p.add_argument("--out", type=Path, required=True, help="e.g. data/reference_teacher")
    p.set_defaults(func=cmd_teacher_pack)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the embedded benchmark (SA-1B tars + COCO JSON)")
    p.add_argument("--profile", default="default")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
