"""How much of the benchmark's masks a SAM at a given input size can represent at all.

    python -m benchmarks.mask_ceiling --out runs/bench/mask_ceiling.json [--images 60] [--size 256]

SAM predicts masks on a grid of a quarter of its input (64x64 at 256) and upsamples them
bilinearly to the image. This pushes each *ground-truth* val mask through the same path
(resize to the shard size as the shard stage does, average-pool to the low-res grid,
bilinear upsampling back to the image, threshold 0.5) and reports the mIoU against the
original mask: the ceiling of any model at that size, overall and by mask area at `--size`.
Rows compare the generator's `min_mask_fraction` / `object_scale` choices (data/README.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from edgesam.config import DataConfig
from edgesam.data.synth import VAL_FIRST_ID, generate_image
from edgesam.data.transforms import resized_shape

SETTINGS = (  # (min_mask_fraction, object_scale)
    (0.0, (0.12, 0.4)),
    (0.0, (0.2, 0.5)),
    (0.003, (0.12, 0.4)),
    (0.003, (0.2, 0.5)),
)
AREA_BINS = (0, 100, 400, 1600, float("inf"))  # pixels at --size


def roundtrip_iou(mask: np.ndarray, size: int) -> tuple[float, float]:
    """(IoU of `mask` after the low-res round trip, its area at `size`)."""
    h, w = mask.shape
    nh, nw = resized_shape(h, w, size)
    full = torch.from_numpy(mask).float()[None, None]
    small = F.interpolate(full, size=(nh, nw), mode="bilinear") > 0.5
    padded = torch.zeros(1, 1, size, size)
    padded[..., :nh, :nw] = small.float()
    low = F.avg_pool2d(padded, 4)
    up = F.interpolate(low, size=(size, size), mode="bilinear")[..., :nh, :nw]
    back = F.interpolate(up, size=(h, w), mode="bilinear")[0, 0] > 0.5
    gt = torch.from_numpy(mask)
    union = int((back | gt).sum())
    return (int((back & gt).sum()) / union if union else 1.0), float(small.sum())


def measure(cfg: DataConfig, images: int, size: int) -> dict[str, object]:
    ious, areas = [], []
    for image_id in range(VAL_FIRST_ID, VAL_FIRST_ID + images):
        _, record, _ = generate_image(image_id, cfg)
        for ann in record["annotations"]:
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            iou, area = roundtrip_iou(mask_utils.decode(rle).astype(bool), size)
            ious.append(iou)
            areas.append(area)
    iou_arr, area_arr = np.array(ious), np.array(areas)
    by_area = {}
    for lo, hi in zip(AREA_BINS, AREA_BINS[1:]):
        sel = (area_arr >= lo) & (area_arr < hi)
        by_area[f"{lo:g}-{hi:g}"] = {"masks": int(sel.sum()), "miou": round(float(iou_arr[sel].mean()), 4) if sel.any() else None}
    return {"min_mask_fraction": cfg.min_mask_fraction, "object_scale": list(cfg.object_scale),
            "masks": len(ious), "ceiling_miou": round(float(iou_arr.mean()), 4), "by_area": by_area}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/mask_ceiling.json"))
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    rows = [measure(DataConfig(min_mask_fraction=f, object_scale=s), args.images, args.size) for f, s in SETTINGS]
    bins = list(rows[0]["by_area"])
    print(f"mask round trip through a {args.size // 4}x{args.size // 4} grid ({args.images} val images)")
    print("| min_mask_fraction | object_scale | masks | ceiling mIoU | " + " | ".join(f"{b} px" for b in bins) + " |")
    print("|---" * (4 + len(bins)) + "|")
    for r in rows:
        cells = [f"{c['miou']} ({c['masks']})" if c["miou"] is not None else "-" for c in r["by_area"].values()]
        print(f"| {r['min_mask_fraction']} | {r['object_scale']} | {r['masks']} | {r['ceiling_miou']} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "images": args.images, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
