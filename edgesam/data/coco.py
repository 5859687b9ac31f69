"""COCO- and LVIS-format instance JSON: quiet loading, validated image reading, the RPN's box dataset."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from edgesam.data.transforms import preprocess, scale_boxes, xywh_to_xyxy


def quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a pycocotools function without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def load_coco(annotation_file: str | Path) -> COCO:
    return quiet(COCO, str(annotation_file))


def read_image(coco: COCO, image_id: int, annotation_file: str | Path, images_dir: str | Path) -> np.ndarray:
    """The RGB uint8 image of `image_id`, checked against the size its JSON records."""
    info = coco.imgs[image_id]
    name = info.get("file_name") or Path(info.get("coco_url", "")).name  # LVIS names images by URL
    if not name:
        raise ValueError(f"{annotation_file}: image {image_id} has neither file_name nor coco_url")
    path = Path(images_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{annotation_file}: image {image_id} refers to {path}, which does not exist")
    with Image.open(path) as img:
        image = np.asarray(img.convert("RGB"))
    if image.shape[:2] != (info["height"], info["width"]):
        raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]}, but {annotation_file} says "
                         f"{info['width']}x{info['height']}")
    return image


class CocoBoxes(torch.utils.data.Dataset):
    """Images of a COCO-format JSON, preprocessed to `img_size`, with their non-crowd boxes
    in the model's input frame: (index, image, boxes (M, 4) xyxy)."""

    def __init__(self, annotation_file: str | Path, images_dir: str | Path, img_size: int):
        self.coco = load_coco(annotation_file)
        self.image_ids = sorted(self.coco.getImgIds())
        self.annotation_file, self.images_dir, self.img_size = annotation_file, images_dir, img_size

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        image_id = self.image_ids[index]
        image = read_image(self.coco, image_id, self.annotation_file, self.images_dir)
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
                if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        x, _ = preprocess(image, self.img_size)
        boxes = scale_boxes(xywh_to_xyxy(np.array([a["bbox"] for a in anns])), image.shape[:2], self.img_size)
        return index, x, torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
