"""COCO- and LVIS-format instances JSON as shard input: the source indexed once, then units.

`coco_units` reads an instances JSON in the main process, rejects what is wrong across
records (malformed image records, duplicate image or annotation ids, annotations of unknown
images or categories), sorts the images by id and cuts them into `CocoUnit`s of N images.
Each unit's worker then checks and converts its images (missing or corrupt file, size not
matching the JSON, crowd policy) and their annotations (polygons that do not close, RLEs
that do not cover the image, annotations outside the image, empty masks) into the same
SA-1B-format samples as `edgesam.data.sa1b`. Torch-free (units run in the workers).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from PIL import Image
from pycocotools import mask as mask_utils

from edgesam.data.annotations import (
    BadSample, bbox_problem, check_rle, encode_jpeg, interior_point, longest_side_shape, resized,
)
from edgesam.data.units import Converted, Rejected, Repaired, Unit

Entry = tuple[dict[str, Any], list[dict[str, Any]]]  # (image record, its annotations)
Crowd = Literal["skip", "as_mask", "reject_image"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_name(info: dict[str, Any]) -> str:
    """The image's file name: COCO's `file_name`, or the last part of LVIS's `coco_url`."""
    return info.get("file_name") or str(info.get("coco_url", "")).rsplit("/", 1)[-1]


def _image_problem(info: Any) -> str | None:
    if not isinstance(info, dict) or not _is_int(info.get("id")):
        return "malformed image record: no integer id"
    if not all(_is_int(info.get(k)) and info[k] > 0 for k in ("width", "height")):
        return f"malformed image record: width {info.get('width')!r}, height {info.get('height')!r}"
    if not _file_name(info):
        return "malformed image record: neither file_name nor coco_url"
    return None


def load_instances(path: Path) -> dict[str, Any]:
    """The parsed JSON; a file that is not an instances JSON at all fails the stage."""
    try:
        data = json.loads(Path(path).read_bytes())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{path}: not a COCO instances JSON (it needs 'images' and 'annotations' lists)")
    return data


def index_source(path: Path, name: str, select: Callable[[str], bool]) -> tuple[list[Entry], list[Rejected]]:
    """(Selected images sorted by id with their annotations, records rejected across the file)."""
    data, source = load_instances(path), str(path)
    images, ids, rejected = _index_images(data["images"], name, source, select)
    categories = {c["id"] for c in data.get("categories", []) if isinstance(c, dict) and _is_int(c.get("id"))}
    annotations, bad = _index_annotations(data["annotations"], name, source, images, ids, categories)
    return [(images[i], annotations[i]) for i in sorted(images)], rejected + bad


def _index_images(records: list[Any], name: str, source: str, select: Callable[[str], bool],
                  ) -> tuple[dict[int, dict[str, Any]], Counter, list[Rejected]]:
    """(Selected valid images by id, every id's record count, rejects). A duplicated id rejects
    all its records: which one its annotations belong to is unknown."""
    ids = Counter(i.get("id") for i in records if isinstance(i, dict) and _is_int(i.get("id")))
    images, rejected = {}, []
    for position, info in enumerate(records):
        problem = _image_problem(info)
        key = f"images[{position}]" if problem else f"{name}_{info['id']}"
        if problem is None and ids[info["id"]] > 1:
            problem = f"duplicate image id {info['id']}: {ids[info['id']]} records"
        if problem:
            rejected.append(Rejected(source, key, problem))
        elif select(key):
            images[info["id"]] = info
    return images, ids, rejected


def _index_annotations(records: list[Any], name: str, source: str, images: dict[int, Any], ids: Counter,
                       categories: set[int]) -> tuple[dict[int, list[dict[str, Any]]], list[Rejected]]:
    """(Annotations of the selected images, rejects). Of annotations sharing an id the first is
    kept; a missing `categories` list leaves every annotation category-less."""
    annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    rejected, seen = [], set()
    for position, ann in enumerate(records):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), (int, str)):
            key = f"{name}_{ann.get('image_id')}" if isinstance(ann, dict) else ""
            rejected.append(Rejected(source, key, "malformed annotation: no id", f"annotations[{position}]"))
            continue
        duplicate, image, category = ann["id"] in seen, ann.get("image_id"), ann.get("category_id")
        seen.add(ann["id"])
        known = _is_int(image) and image in ids
        if known and image not in annotations:
            continue  # its image is rejected (and says why) or not selected
        problem = (f"duplicate annotation id {ann['id']}: the first is kept" if duplicate
                   else f"image id {image!r} not in images" if not known
                   else f"category id {category!r} not in categories"
                   if not (_is_int(category) and category in categories) else None)
        if problem:
            rejected.append(Rejected(source, f"{name}_{image}", problem, ann["id"]))
        else:
            annotations[image].append(ann)
    return annotations, rejected


def _polygon_rle(polygons: list[Any], size: tuple[int, int]) -> tuple[dict[str, Any], str | None]:
    """(RLE of the polygons, the clipping repair if they reach outside the image)."""
    height, width = size
    if not polygons:
        raise BadSample("empty polygon list")
    for poly in polygons:
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
            raise BadSample("polygon with non-numeric or non-finite coordinates")
        if len(poly) % 2:
            raise BadSample(f"polygon with an odd number of coordinates ({len(poly)}): it does not close")
        if len(poly) < 6:
            raise BadSample(f"polygon with {len(poly) // 2} points: it needs 3 to close")
        xs, ys = poly[0::2], poly[1::2]
        if sum(xs[i - 1] * ys[i] - xs[i] * ys[i - 1] for i in range(len(xs))) == 0:
            raise BadSample("polygon encloses no area (its points are collinear)")
    xs = [v for poly in polygons for v in poly[0::2]]
    ys = [v for poly in polygons for v in poly[1::2]]
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
        raise BadSample(f"annotation outside the {width}x{height} image: polygon in x [{min(xs)}, {max(xs)}], "
                        f"y [{min(ys)}, {max(ys)}]")
    outside = min(xs) < -1 or min(ys) < -1 or max(xs) > width + 1 or max(ys) > height + 1
    repair = f"polygon extends outside the {width}x{height} image: clipped to it" if outside else None
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)), repair


def segmentation_rle(segmentation: Any, size: tuple[int, int]) -> tuple[dict[str, Any], str | None]:
    """(Compressed RLE of a COCO segmentation on an image of `size`, a repair reason or None)."""
    if isinstance(segmentation, list):
        return _polygon_rle(segmentation, size)
    if not isinstance(segmentation, dict):
        raise BadSample(f"malformed annotation: segmentation {type(segmentation).__name__}, not polygons or RLE")
    if list(segmentation.get("size", [])) != list(size):
        raise BadSample(f"RLE size {segmentation.get('size')} does not match the image size {list(size)}")
    counts = segmentation.get("counts")
    if not isinstance(counts, list):
        check_rle(segmentation, size)
        return segmentation, None
    if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != size[0] * size[1]:  # uncompressed (crowd)
        raise BadSample(f"undecodable RLE: its counts do not cover the {size[1]}x{size[0]} image")
    return mask_utils.frPyObjects(segmentation, *size), None


@dataclass(frozen=True, kw_only=True)
class CocoUnit(Unit):
    """N images of one COCO source (plus, on its first unit, the records rejected across the file)."""

    source: str  # the annotation file, in records
    prefix: str  # the source's name: keys are `<prefix>_<image id>`
    images_dir: Path
    entries: tuple[Entry, ...]
    crowd: Crowd = "skip"
    planned: tuple[Rejected, ...] = ()

    @property
    def name(self) -> str:
        ids = [info["id"] for info, _ in self.entries]
        return f"{self.source} images {ids[0]}..{ids[-1]}" if ids else self.source

    def results(self) -> Iterator[Converted | Rejected]:
        yield from self.planned
        for info, anns in self.entries:
            key = f"{self.prefix}_{info['id']}"
            try:
                yield self._convert(key, info, anns)
            except BadSample as error:
                yield Rejected(self.source, key, str(error))

    def _read(self, info: dict[str, Any]) -> Image.Image:
        path = self.images_dir / _file_name(info)
        if self.images_dir.resolve() not in path.resolve().parents:
            raise BadSample(f"image file {_file_name(info)!r} escapes the images directory")
        if not path.is_file():
            raise BadSample(f"missing image file {path}")
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise BadSample(f"corrupt image {path}: {error}") from None
        if image.size != (info["width"], info["height"]):
            raise BadSample(f"image is {image.size[0]}x{image.size[1]} but the JSON says "
                            f"{info['width']}x{info['height']}")
        return image

    def _convert(self, key: str, info: dict[str, Any], annotations: list[dict[str, Any]]) -> Converted:
        crowds = [a["id"] for a in annotations if a.get("iscrowd")]
        if crowds and self.crowd == "reject_image":
            raise BadSample(f"crowd annotations {crowds} (shard.crowd = reject_image)")
        image = self._read(info)
        size = (info["height"], info["width"])
        new_size = longest_side_shape(*size, self.target_size)
        out = Converted(key, {}, 0, crowd_skipped=len(crowds) if self.crowd == "skip" else 0)
        kept = []
        for ann in annotations:
            if ann.get("iscrowd") and self.crowd == "skip":
                continue
            try:
                converted = self._annotation(ann, size, new_size, out)
            except BadSample as error:
                out.rejected.append(Rejected(self.source, key, str(error), ann["id"]))
                continue
            if converted is None:
                out.dropped += 1
            else:
                kept.append(converted)
        meta = {"image_id": info["id"], "file_name": _file_name(info), "width": new_size[1], "height": new_size[0],
                "original_width": size[1], "original_height": size[0]}
        body = json.dumps({"image": meta, "annotations": kept}, separators=(",", ":")).encode()
        out.members.update(jpg=encode_jpeg(image, new_size, self.jpeg_quality), json=body)
        out.annotations = len(kept)
        return out

    def _annotation(self, ann: dict[str, Any], size: tuple[int, int], new_size: tuple[int, int],
                    out: Converted) -> dict[str, Any] | None:
        """`ann` on the new frame (None when its mask vanishes there); repairs go to `out`."""
        rle, repair = segmentation_rle(ann.get("segmentation"), size)
        if mask_utils.area(rle) == 0:
            raise BadSample("empty mask")
        done = resized(rle, size, new_size)
        if done is None:
            return None
        for reason in (repair, bbox_problem(ann.get("bbox"), rle, size)):
            if reason:
                out.repaired.append(Repaired(self.source, out.key, ann["id"], reason))
        return {**ann, "segmentation": done.segmentation, "bbox": done.bbox, "area": done.area,
                "point_coords": [interior_point(done.mask, done.bbox)]}


def coco_units(source: dict[str, Any], first_index: int, images_per_unit: int, select: Callable[[str], bool],
               **unit: Any) -> list[CocoUnit]:
    """The units of one source (`{name, annotations, images, split}`); `unit` holds the common
    `Unit` fields. A source without usable images still gets one unit, for its rejects."""
    entries, rejected = index_source(Path(source["annotations"]), source["name"], select)
    chunks = [entries[i : i + images_per_unit] for i in range(0, max(len(entries), 1), images_per_unit)]
    split = None if source["split"] == "auto" else source["split"]
    return [
        CocoUnit(index=first_index + k, split=split, source=str(source["annotations"]), prefix=source["name"],
                 images_dir=Path(source["images"]), entries=tuple(chunk), planned=tuple(rejected) if k == 0 else (),
                 **unit)
        for k, chunk in enumerate(chunks)
    ]


def rpn_defaults(sources: list[dict[str, Any]]) -> dict[str, str]:
    """The RPN's and COCO evaluation's files from the first train and val sources, when those
    share an images directory (the RPN reads one): then one `data.coco_sources` runs the DAG."""
    train = next((s for s in sources if s["split"] == "train"), None)
    val = next((s for s in sources if s["split"] == "val"), None)
    if not (train and val and train["images"] == val["images"]):
        return {}
    return {"coco_train": train["annotations"], "coco_val": val["annotations"], "coco_images": train["images"]}
