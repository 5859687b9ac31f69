"""The embedded benchmark: multi-part objects on photo backgrounds, in SA-1B and COCO formats.

Each scene pastes several objects (templates of 2-4 parts, `edgesam.data.shapes`) with
random scale, rotation, flip and overlap onto a crop of a `skimage.data` photo or
texture. Masks are computed after occlusion. The SA-1B side annotates every visible
part and every whole object (multi-granular, like SA-1B); the COCO side has whole objects
only, one category per template. Everything is deterministic from `DataConfig.seed`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from edgesam.artifacts import write_bytes_atomic, write_text_atomic
from edgesam.config import DataConfig
from edgesam.data.shapes import CATEGORIES, TEMPLATES, Template, texture_fill
from edgesam.data.tars import tar_writer

log = logging.getLogger(__name__)

BACKGROUNDS = (
    "astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
VAL_FIRST_ID = 10_000_001  # val image ids do not depend on the train count
MIN_VISIBLE_FRACTION = 0.5  # an object placed later may hide at most half of an earlier one
MIN_MASK_AREA = 12  # pixels; the floor of `DataConfig.min_mask_fraction` on tiny images
JPEG_QUALITY = 90
SPLITS = ("train", "val")


@dataclass
class SceneObject:
    template: Template
    window: tuple[slice, slice]  # bounding window of the drawn object in the image
    part_ids: list[int]  # ids in the part map, parallel to template.parts
    drawn_area: int


@dataclass
class Scene:
    image: np.ndarray  # uint8 H x W x 3
    part_map: np.ndarray  # int32, -1 = background
    object_map: np.ndarray  # int32, -1 = background
    objects: list[SceneObject] = field(default_factory=list)


@functools.cache
def _background_sources() -> tuple[np.ndarray, ...]:
    import skimage.data

    sources = []
    for name in BACKGROUNDS:
        image = getattr(skimage.data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        sources.append(np.ascontiguousarray(image))
    return tuple(sources)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of a skimage photo/texture, resized to (height, width), muted (float)."""
    sources = _background_sources()
    source = sources[rng.integers(len(sources))]
    sh, sw = source.shape[:2]
    crop_h = min(sh, sw * height / width) * rng.uniform(0.5, 1.0)
    crop_w = crop_h * width / height
    crop_h, crop_w = max(int(crop_h), 8), max(int(crop_w), 8)
    y0, x0 = rng.integers(0, sh - crop_h + 1), rng.integers(0, sw - crop_w + 1)
    crop = Image.fromarray(source[y0 : y0 + crop_h, x0 : x0 + crop_w]).resize((width, height), Image.BILINEAR)
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    gray = image.mean(axis=-1, keepdims=True)
    image = 0.6 * image + 0.4 * gray  # desaturate so the painted objects stand out
    return 0.75 * image + 0.25 * image.mean()


def _rasterize(polygon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int] | None:
    """Fill `polygon` (pixel xy) -> (bool mask of its clipped bounding window, y0, x0)."""
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.ceil(polygon.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("1", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in (polygon - (x0, y0)).tolist()], fill=1)
    mask = np.asarray(canvas, dtype=bool)
    return (mask, y0, x0) if mask.any() else None


def _pose(rng: np.random.Generator, height: int, width: int, scale_range: tuple[float, float]) -> np.ndarray:
    """A random 2x3 affine map from the unit template frame to pixels."""
    size = rng.uniform(*scale_range) * min(height, width)
    aspect = rng.uniform(0.85, 1.15)
    angle = rng.uniform(-np.pi / 5, np.pi / 5)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = rotation @ np.diag([flip * size * aspect, size / aspect])
    center = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
    return np.concatenate([linear, center[:, None]], axis=1)


def _try_place(scene: Scene, template: Template, affine: np.ndarray) -> list[tuple[np.ndarray, int, int]] | None:
    """Part masks of `template` at `affine`, or None if it would hide too much of an earlier object."""
    height, width = scene.part_map.shape
    parts = [_rasterize(p.polygon @ affine[:, :2].T + affine[:, 2], height, width) for p in template.parts]
    if any(p is None for p in parts):
        return None
    covered = np.zeros(len(scene.objects), dtype=np.int64)
    for mask, y0, x0 in parts:
        under = scene.object_map[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask]
        covered += np.bincount(under[under >= 0], minlength=len(scene.objects))
    for object_id, (obj, lost) in enumerate(zip(scene.objects, covered)):
        visible = np.count_nonzero(scene.object_map[obj.window] == object_id)
        if visible - lost < MIN_VISIBLE_FRACTION * obj.drawn_area:
            return None
    return parts


def render_scene(rng: np.random.Generator, height: int, width: int, num_objects: int,
                 scale_range: tuple[float, float], attempts: int = 10) -> Scene:
    """Paint `num_objects` multi-part objects (fewer if they do not fit) onto a background."""
    canvas = background(rng, height, width)
    scene = Scene(canvas, np.full((height, width), -1, np.int32), np.full((height, width), -1, np.int32))
    next_part = 0
    for _ in range(num_objects):
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        for _ in range(attempts):
            affine = _pose(rng, height, width, scale_range)
            parts = _try_place(scene, template, affine)
            if parts is not None:
                break
        else:
            continue
        object_id = len(scene.objects)
        period = max(3.0, 0.07 * np.abs(affine[:, :2]).max())
        ys0, xs0, ys1, xs1 = height, width, 0, 0
        for part, (mask, y0, x0) in zip(template.parts, parts):
            window = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            color = np.array(part.colors[rng.integers(len(part.colors))], np.float32) + rng.normal(0, 12, 3)
            patch = texture_fill(part.texture, color, mask.shape, period, rng)
            canvas[window][mask] = patch[mask]
            scene.part_map[window][mask] = next_part
            scene.object_map[window][mask] = object_id
            next_part += 1
            ys0, xs0 = min(ys0, y0), min(xs0, x0)
            ys1, xs1 = max(ys1, y0 + mask.shape[0]), max(xs1, x0 + mask.shape[1])
        window = (slice(ys0, ys1), slice(xs0, xs1))
        drawn = int(np.count_nonzero(scene.object_map[window] == object_id))
        scene.objects.append(SceneObject(template, window, list(range(next_part - len(parts), next_part)), drawn))
    scene.image = np.clip(canvas, 0, 255).astype(np.uint8)
    return scene


def _rle_annotation(ann_id: int, mask: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """An SA-1B annotation record of a full-size bool mask."""
    height, width = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    ys, xs = np.nonzero(mask)
    k = rng.integers(len(ys))
    return {
        "id": ann_id,
        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask_utils.area(rle)),
        "predicted_iou": float(rng.uniform(0.85, 1.0)),
        "stability_score": float(rng.uniform(0.9, 1.0)),
        "point_coords": [[float(xs[k]), float(ys[k])]],
        "crop_box": [0.0, 0.0, float(width), float(height)],
    }


def annotate(scene: Scene, image_id: int, rng: np.random.Generator,
             min_area: int = MIN_MASK_AREA) -> tuple[list[dict], list[dict]]:
    """(SA-1B annotations: every object and visible part of at least `min_area` pixels,
    COCO annotations: those objects only)."""
    sa1b, coco = [], []
    next_id = image_id * 1000
    for object_id, obj in enumerate(scene.objects):
        whole = scene.object_map == object_id
        area = int(np.count_nonzero(whole))
        if area < min_area:
            continue
        record = _rle_annotation(next_id, whole, rng)
        sa1b.append(record)
        category = CATEGORIES.index(obj.template.name) + 1
        coco.append({k: record[k] for k in ("id", "segmentation", "bbox", "area")}
                    | {"image_id": image_id, "category_id": category, "iscrowd": 0})
        next_id += 1
        for part_id in obj.part_ids:
            part = scene.part_map == part_id
            visible = int(np.count_nonzero(part))
            if min_area <= visible < area:
                sa1b.append(_rle_annotation(next_id, part, rng))
                next_id += 1
    return sa1b, coco


def generate_image(image_id: int, cfg: DataConfig) -> tuple[bytes, dict[str, Any], list[dict[str, Any]]]:
    """(JPEG bytes, SA-1B JSON record, COCO annotations) of image `image_id`."""
    rng = np.random.default_rng([cfg.seed, image_id])
    height, width = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
    if height == width:  # keep every image non-square, to exercise the padding paths
        width += 1 if width < cfg.max_side else -1
    num_objects = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
    scene = render_scene(rng, height, width, num_objects, cfg.object_scale)
    min_area = max(MIN_MASK_AREA, round(cfg.min_mask_fraction * height * width))
    sa1b, coco = annotate(scene, image_id, rng, min_area)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    info = {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"}
    return buffer.getvalue(), {"image": info, "annotations": sa1b}, coco


def _split_ids(split: str, cfg: DataConfig) -> range:
    return range(1, cfg.num_train + 1) if split == "train" else range(VAL_FIRST_ID, VAL_FIRST_ID + cfg.num_val)


def _chunks(ids: range, size: int) -> Iterator[range]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def write_split(out: Path, split: str, cfg: DataConfig, progress: tqdm) -> tuple[dict[str, Any], int]:
    """Write one split's SA-1B tars and COCO images; return (COCO dataset dict, SA-1B mask count)."""
    tar_dir = out / "sa1b" / split
    image_dir = out / "coco" / "images"
    tar_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, masks = [], [], 0
    for index, ids in enumerate(_chunks(_split_ids(split, cfg), cfg.images_per_tar)):
        with tar_writer(tar_dir / f"sa_{index:06d}.tar") as write:
            for image_id in ids:
                jpeg, record, coco = generate_image(image_id, cfg)
                name = record["image"]["file_name"]
                write(name.removesuffix(".jpg"), {"jpg": jpeg, "json": json.dumps(record).encode()})
                write_bytes_atomic(image_dir / name, jpeg)
                images.append({k: record["image"][k] for k in ("width", "height", "file_name")} | {"id": image_id})
                annotations.extend(coco)
                masks += len(record["annotations"])
                progress.update(1)
    categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(CATEGORIES)]
    coco = {
        "info": {"description": f"edgesam embedded benchmark ({split})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return coco, masks


def tree_checksum(root: Path, subdirs: tuple[str, ...] = ("sa1b", "coco")) -> str:
    """SHA-256 over the relative paths and contents of every file under `subdirs`."""
    digest = hashlib.sha256()
    for sub in subdirs:
        for path in sorted(p for p in (root / sub).rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _split_stats(coco: dict[str, Any], sa1b_annotations: int) -> dict[str, Any]:
    per_class = {name: 0 for name in CATEGORIES}
    for ann in coco["annotations"]:
        per_class[CATEGORIES[ann["category_id"] - 1]] += 1
    heights = [im["height"] for im in coco["images"]]
    widths = [im["width"] for im in coco["images"]]
    return {
        "images": len(coco["images"]),
        "objects": len(coco["annotations"]),
        "sa1b_annotations": sa1b_annotations,
        "per_class": per_class,
        "height": [min(heights, default=0), max(heights, default=0)],
        "width": [min(widths, default=0), max(widths, default=0)],
    }


def write_benchmark(out_dir: str | Path, cfg: DataConfig) -> dict[str, Any]:
    """Generate the benchmark under `out_dir`; return the data manifest fields."""
    out = Path(out_dir).resolve()
    annotation_dir = out / "coco" / "annotations"
    annotation_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {}
    start = time.perf_counter()
    with tqdm(total=cfg.num_train + cfg.num_val, desc="synth", unit="img", disable=None) as progress:
        for split in SPLITS:
            coco, masks = write_split(out, split, cfg, progress)
            write_bytes_atomic(annotation_dir / f"instances_{split}.json", json.dumps(coco).encode())
            counts[split] = _split_stats(coco, masks)
    elapsed = time.perf_counter() - start
    total = cfg.num_train + cfg.num_val
    log.info("synth: %d images in %.1fs (%.1f img/s)", total, elapsed, total / max(elapsed, 1e-9))
    checksum = tree_checksum(out)
    write_text_atomic(out / "DATASET_CARD.md", dataset_card(cfg, counts, checksum))
    return {
        "sa1b_dir": str(out / "sa1b"),
        "coco_train": str(annotation_dir / "instances_train.json"),
        "coco_val": str(annotation_dir / "instances_val.json"),
        "coco_images": str(out / "coco" / "images"),
        "counts": counts,
        "categories": list(CATEGORIES),
        "checksum": checksum,
        "synthetic": True,
    }


def dataset_card(cfg: DataConfig, counts: dict[str, Any], checksum: str) -> str:
    """The generated benchmark's dataset card (Markdown)."""
    parts = "\n".join(f"| {t.name} | {', '.join(p.name for p in t.parts)} | "
                      f"{counts['train']['per_class'][t.name]} | {counts['val']['per_class'][t.name]} |"
                      for t in TEMPLATES)
    rows = "\n".join(
        f"| {split} | {c['images']} | {c['objects']} | {c['sa1b_annotations']} | "
        f"{c['height'][0]}-{c['height'][1]} x {c['width'][0]}-{c['width'][1]} |"
        for split, c in counts.items()
    )
    return f"""# edgesam embedded benchmark

Synthetic scenes of multi-part objects on crops of `skimage.data` photos and textures,
written in the SA-1B format (`sa1b/<split>/sa_NNNNNN.tar`, every visible part and every
whole object annotated) and the COCO instances format
(`coco/annotations/instances_<split>.json`, whole objects only, one category per template;
images in `coco/images/`). Generated by `edgesam.data.synth.write_benchmark`.

- seed: {cfg.seed}
- objects per image: {cfg.objects_per_image[0]}-{cfg.objects_per_image[1]}, each {cfg.object_scale[0]:.0%}-{cfg.object_scale[1]:.0%} of the shorter image side
- image sides: {cfg.min_side}-{cfg.max_side} px, never square
- SHA-256 of `sa1b/` and `coco/`: `{checksum}`

| split | images | objects (COCO) | masks (SA-1B) | height x width |
|---|---|---|---|---|
{rows}

| class | parts (back to front) | train objects | val objects |
|---|---|---|---|
{parts}

Backgrounds: {', '.join(BACKGROUNDS)} (`skimage.data`), desaturated and with lowered
contrast so painted parts stand out. An object placed later may hide at most
{1 - MIN_VISIBLE_FRACTION:.0%} of an earlier one; masks with fewer visible pixels than
{cfg.min_mask_fraction:.2%} of the image (at least {MIN_MASK_AREA}) are not annotated. See `data/README.md` for the design and the choice of sizes.
"""
