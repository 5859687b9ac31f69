"""Read SA-1B inputs (tars or extracted pairs) as a stream, validate and resize them.

Real SA-1B and the embedded benchmark share the layout: `sa_NNNNNN.tar` files holding
`sa_<id>.jpg` + `sa_<id>.json`. A tar is read in stream mode, one member at a time, so
memory does not depend on its size. Every bad input (unsafe member path, truncated tar,
image without JSON, malformed JSON, corrupt JPEG, RLE of the wrong size) becomes a
`Rejected` record with its reason instead of an exception; an annotation whose `bbox` or
`point_coords` cannot stand is fixed and listed as `Repaired`.

Torch-free, like `edgesam.data.units`: `ConvertTask`s run in the conversion workers.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from PIL import Image

from edgesam.data.annotations import BadSample, bbox_problem, encode_jpeg, interior_point, longest_side_shape, resized
from edgesam.data.units import Converted, Rejected, Repaired, Unit, make_selector

PAIR = ("jpg", "json")


@dataclass(frozen=True)
class Pair:
    source: str
    key: str
    jpg: bytes
    json: bytes


def find_sources(root: str | Path, split_dirs: tuple[str, ...] = ("train", "val")) -> dict[str | None, list[Path]]:
    """Input units (tars, or directories of extracted pairs) by split.

    `root/train` and `root/val` are the splits when present; otherwise `root` itself is
    one unsplit input (key None), as real SA-1B is.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: SA-1B input directory does not exist")
    present = [s for s in split_dirs if (root / s).is_dir()]
    found = {s: _units(root / s) for s in present} if present else {None: _units(root)}
    if not any(found.values()):
        raise FileNotFoundError(f"{root}: no sa_*.tar files or sa_*.jpg/sa_*.json pairs found")
    return found


def _units(directory: Path) -> list[Path]:
    tars = sorted(p for p in directory.glob("*.tar") if p.is_file())
    has_pairs = any(directory.glob("sa_*.json")) or any(directory.glob("sa_*.jpg"))
    return tars + ([directory] if has_pairs else [])


def iter_pairs(unit: Path, select: Callable[[str], bool]) -> Iterator[Pair | Rejected]:
    """Stream the selected (jpg, json) pairs of a tar or a directory, and the rejects."""
    return _iter_dir(unit, select) if unit.is_dir() else _iter_tar(unit, select)


def _member_problem(info: tarfile.TarInfo) -> str | None:
    path = PurePosixPath(info.name)
    if path.is_absolute() or ".." in path.parts:
        return f"member path {info.name!r} escapes the directory"
    if not info.isfile():
        return f"member {info.name!r} is not a regular file"
    return None


def _iter_tar(path: Path, select: Callable[[str], bool]) -> Iterator[Pair | Rejected]:
    source = str(path)
    pending: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for info in tar:
                if info.isdir():
                    continue
                problem = _member_problem(info)
                if problem:
                    yield Rejected(source, info.name, problem)
                    continue
                key, _, ext = PurePosixPath(info.name).name.partition(".")
                if ext not in PAIR or not select(key):
                    continue
                payload = tar.extractfile(info).read()
                members = pending.setdefault(key, {})
                members[ext] = payload
                if len(members) == len(PAIR):
                    del pending[key]
                    yield Pair(source, key, members["jpg"], members["json"])
            end = tar.offset
        if not _ends_with_zero_block(path, end):
            yield Rejected(source, "", f"truncated tar: no end-of-archive marker after byte {end}")
    except (tarfile.TarError, EOFError, OSError) as error:
        yield Rejected(source, "", f"truncated or corrupt tar: {error}")
    for key, members in sorted(pending.items()):
        yield Rejected(source, key, _unpaired("jpg" in members))


def _unpaired(has_image: bool) -> str:
    return "image without its JSON" if has_image else "JSON without its image"


def _ends_with_zero_block(path: Path, offset: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _iter_dir(directory: Path, select: Callable[[str], bool]) -> Iterator[Pair | Rejected]:
    source = str(directory)
    root = directory.resolve()
    keys = sorted({p.name.partition(".")[0] for p in directory.glob("sa_*.*") if p.suffix[1:] in PAIR})
    for key in filter(select, keys):
        files = {ext: directory / f"{key}.{ext}" for ext in PAIR}
        if not all(f.is_file() for f in files.values()):
            yield Rejected(source, key, _unpaired(files["jpg"].is_file()))
            continue
        if any(root not in f.resolve().parents for f in files.values()):
            yield Rejected(source, key, "file path escapes the directory")
            continue
        yield Pair(source, key, files["jpg"].read_bytes(), files["json"].read_bytes())


def _parse_record(raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
        info, annotations = record["image"], record["annotations"]
        int(info["width"]), int(info["height"])
        if not isinstance(annotations, list):
            raise TypeError("'annotations' is not a list")
    except (ValueError, KeyError, TypeError) as error:
        raise BadSample(f"malformed JSON: {type(error).__name__}: {error}") from None
    return record


def _decode_jpeg(raw: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "JPEG":
                raise OSError(f"format is {img.format}, not JPEG")
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise BadSample(f"corrupt JPEG: {error}") from None


def _scale(values: list[float], sx: float, sy: float) -> list[float]:
    return [round(v * (sx if i % 2 == 0 else sy), 3) for i, v in enumerate(values)]


def _usable_points(points: Any, size: tuple[int, int]) -> bool:
    """Whether `points` is a non-empty list of finite [x, y] inside the image."""
    height, width = size
    return isinstance(points, list) and bool(points) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)
        and 0 <= p[0] <= width and 0 <= p[1] <= height
        for p in points
    )


def _annotation(ann: dict[str, Any], size: tuple[int, int], new_size: tuple[int, int]) -> tuple[dict | None, list[str]]:
    """(`ann` on the new frame or None when its mask vanishes there, the repairs it needed)."""
    done = resized(ann["segmentation"], size, new_size)
    if done is None:
        return None, []
    sx, sy = new_size[1] / size[1], new_size[0] / size[0]
    repairs = [bbox_problem(ann.get("bbox"), ann["segmentation"], size)]
    if _usable_points(ann.get("point_coords"), size):
        points = [_scale(p, sx, sy) for p in ann["point_coords"]]
    else:
        repairs.append(f"point_coords {ann.get('point_coords')!r} missing or outside the image: "
                       "the mask's deepest interior point used")
        points = [interior_point(done.mask, done.bbox)]
    return {
        **ann, "segmentation": done.segmentation, "bbox": done.bbox, "area": done.area, "point_coords": points,
        "crop_box": _scale(ann.get("crop_box", [0, 0, size[1], size[0]]), sx, sy),
    }, [r for r in repairs if r]


def convert(pair: Pair, target_size: int, jpeg_quality: int) -> Converted:
    """Resize one pair so its longest side is `target_size`.

    Masks are resized once (bilinear, threshold 0.5) and re-encoded as RLE, with box and
    area recomputed from them (the box is the scaled box to within a pixel); points and
    crop boxes are scaled; masks that vanish at the new size are dropped. A given box or
    point list that cannot stand is replaced and listed in `repaired`.
    Raises `BadSample` with the reason when the pair is unusable.
    """
    record = _parse_record(pair.json)
    image = _decode_jpeg(pair.jpg)
    info = record["image"]
    width, height = image.size
    if (int(info["width"]), int(info["height"])) != (width, height):
        raise BadSample(f"image is {width}x{height} but its JSON says {info['width']}x{info['height']}")
    new_size = longest_side_shape(height, width, target_size)
    annotations, repaired, dropped = [], [], 0
    for ann in record["annotations"]:
        try:
            converted, repairs = _annotation(ann, (height, width), new_size)
        except (KeyError, TypeError, IndexError) as error:
            raise BadSample(f"malformed annotation {ann.get('id') if isinstance(ann, dict) else ann!r}: "
                            f"{type(error).__name__}: {error}") from None
        if converted is None:
            dropped += 1
            continue
        annotations.append(converted)
        repaired += [Repaired(pair.source, pair.key, ann.get("id"), reason) for reason in repairs]
    meta = {**info, "width": new_size[1], "height": new_size[0], "original_width": width, "original_height": height}
    body = json.dumps({"image": meta, "annotations": annotations}, separators=(",", ":")).encode()
    members = {"jpg": encode_jpeg(image, new_size, jpeg_quality), "json": body}
    return Converted(pair.key, members, len(annotations), dropped, repaired=repaired)


@dataclass(frozen=True, kw_only=True)
class ConvertTask(Unit):
    """One SA-1B tar or directory of extracted pairs."""

    unit: Path
    subset_fraction: float | None = None
    subset_ids_file: Path | None = None

    @property
    def name(self) -> str:
        return str(self.unit)

    def results(self) -> Iterator[Converted | Rejected]:
        for item in iter_pairs(self.unit, make_selector(self.subset_fraction, self.subset_ids_file)):
            if isinstance(item, Rejected):
                yield item
                continue
            try:
                yield convert(item, self.target_size, self.jpeg_quality)
            except BadSample as error:
                yield Rejected(item.source, item.key, str(error))
