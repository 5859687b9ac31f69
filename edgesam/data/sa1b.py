"""Read SA-1B inputs (tars or extracted pairs) as a stream, validate and resize them.

Real SA-1B and the embedded benchmark share the layout: `sa_NNNNNN.tar` files holding
`sa_<id>.jpg` + `sa_<id>.json`. A tar is read in stream mode, one member at a time, so
memory does not depend on its size. Every bad input (unsafe member path, truncated tar,
image without JSON, malformed JSON, corrupt JPEG, RLE of the wrong size) becomes a
`Rejected` record with its reason instead of an exception.

This module does not import torch: `convert_unit` runs in pool / Ray worker processes,
which then start fast and small.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from edgesam.artifacts import write_json_atomic
from edgesam.data.tars import WriteSample, tar_writer

PAIR = ("jpg", "json")
SPLITS = ("train", "val")
_KEY_ID = re.compile(r"^sa_(\d+)$")


@dataclass(frozen=True)
class Rejected:
    source: str
    key: str
    reason: str


@dataclass(frozen=True)
class Pair:
    source: str
    key: str
    jpg: bytes
    json: bytes


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason recorded in the manifest."""


def longest_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """SAM's `ResizeLongestSide.get_preprocess_shape` (same rounding), without torch."""
    scale = size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


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


def image_id(key: str) -> int | str:
    """The SA-1B image id of key `sa_<id>` (the key itself for other names)."""
    match = _KEY_ID.match(key)
    return int(match.group(1)) if match else key


def id_fraction(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) from an image id, for subsets and split assignment."""
    digest = hashlib.sha256(f"{salt}:{image_id(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _parse_id(text: str) -> int | str:
    text = text.strip().removesuffix(".jpg")
    return int(text) if text.isdigit() else image_id(text)


def make_selector(fraction: float | None, ids_file: Path | None) -> Callable[[str], bool]:
    """Keep an image by key: in the ids list file (one id or `sa_<id>` per line), else by fraction."""
    if ids_file is not None:
        if not Path(ids_file).is_file():
            raise FileNotFoundError(f"{ids_file}: subset id list does not exist")
        wanted = {_parse_id(line) for line in Path(ids_file).read_text().splitlines() if line.strip()}
        return lambda key: image_id(key) in wanted
    if fraction is not None:
        return lambda key: id_fraction(key, "subset") < fraction
    return lambda key: True


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


def _resize_mask(rle: dict[str, Any], size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Decode an RLE and resize it (bilinear, threshold 0.5), resampling only around the mask.

    Returns a Fortran-ordered uint8 mask, ready for `pycocotools.mask.encode`.
    """
    if list(rle.get("size", [])) != list(size):
        raise BadSample(f"RLE size {rle.get('size')} does not match the image size {list(size)}")
    try:
        mask = mask_utils.decode(rle)
        x, y, w, h = mask_utils.toBbox(rle)
    except (TypeError, ValueError) as error:
        raise BadSample(f"undecodable RLE: {error}") from None
    if mask.shape == new_size:
        return np.asfortranarray(mask)
    out = np.zeros(new_size, dtype=np.uint8, order="F")
    if w == 0 or h == 0:
        return out
    sy, sx = new_size[0] / size[0], new_size[1] / size[1]
    # The output window around the mask (2 px margin) ...
    x0, x1 = max(0, math.floor(x * sx) - 2), min(new_size[1], math.ceil((x + w) * sx) + 2)
    y0, y1 = max(0, math.floor(y * sy) - 2), min(new_size[0], math.ceil((y + h) * sy) + 2)
    # ... and the source crop it reads, with the bilinear filter's support as margin.
    mx, my = math.ceil(max(1.0, 1 / sx)) + 1, math.ceil(max(1.0, 1 / sy)) + 1
    cx0, cx1 = max(0, math.floor(x0 / sx) - mx), min(size[1], math.ceil(x1 / sx) + mx)
    cy0, cy1 = max(0, math.floor(y0 / sy) - my), min(size[0], math.ceil(y1 / sy) + my)
    crop = Image.fromarray(np.ascontiguousarray(mask[cy0:cy1, cx0:cx1]) * np.uint8(255))
    box = (x0 / sx - cx0, y0 / sy - cy0, x1 / sx - cx0, y1 / sy - cy0)
    out[y0:y1, x0:x1] = np.asarray(crop.resize((x1 - x0, y1 - y0), Image.BILINEAR, box=box)) >= 128
    return out


def _scale(values: list[float], sx: float, sy: float) -> list[float]:
    return [round(v * (sx if i % 2 == 0 else sy), 3) for i, v in enumerate(values)]


def convert(pair: Pair, target_size: int, jpeg_quality: int) -> tuple[dict[str, Any], int]:
    """Resize one pair so its longest side is `target_size`: (WebDataset sample, masks dropped).

    Masks are resized once (bilinear, threshold 0.5) and re-encoded as RLE, with box and
    area recomputed from them (the box is the scaled box to within a pixel); points and
    crop boxes are scaled; masks that vanish at the new size are dropped.
    Raises `BadSample` with the reason when the pair is unusable.
    """
    record = _parse_record(pair.json)
    image = _decode_jpeg(pair.jpg)
    info = record["image"]
    width, height = image.size
    if (int(info["width"]), int(info["height"])) != (width, height):
        raise BadSample(f"image is {width}x{height} but its JSON says {info['width']}x{info['height']}")
    new_h, new_w = longest_side_shape(height, width, target_size)
    sx, sy = new_w / width, new_h / height
    annotations, dropped = [], 0
    for ann in record["annotations"]:
        try:
            mask = _resize_mask(ann["segmentation"], (height, width), (new_h, new_w))
            rle = mask_utils.encode(mask)
            area = int(mask_utils.area(rle))
            if area == 0:
                dropped += 1
                continue
            annotations.append({
                **ann,
                "segmentation": {"size": [new_h, new_w], "counts": rle["counts"].decode("ascii")},
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": area,
                "point_coords": [_scale(p, sx, sy) for p in ann.get("point_coords", [])],
                "crop_box": _scale(ann.get("crop_box", [0, 0, width, height]), sx, sy),
            })
        except (KeyError, TypeError, IndexError) as error:
            raise BadSample(f"malformed annotation {ann.get('id') if isinstance(ann, dict) else ann!r}: "
                            f"{type(error).__name__}: {error}") from None
    resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), Image.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=jpeg_quality)
    meta = {**info, "width": new_w, "height": new_h, "original_width": width, "original_height": height}
    body = json.dumps({"image": meta, "annotations": annotations}, separators=(",", ":")).encode()
    return {"__key__": pair.key, "jpg": buffer.getvalue(), "json": body}, dropped


@dataclass(frozen=True)
class ConvertTask:
    """One input unit to convert into per-split part tars under `part_dir`."""

    index: int
    unit: Path
    split: str | None  # None: split by image id with val_fraction
    part_dir: Path
    target_size: int
    jpeg_quality: int = 95
    subset_fraction: float | None = None
    subset_ids_file: Path | None = None
    val_fraction: float = 0.0

    @property
    def summary_path(self) -> Path:
        return self.part_dir / f"{self.index:06d}.json"

    def part_path(self, split: str) -> Path:
        return self.part_dir / f"{self.index:06d}.{split}.tar"


def convert_unit(task: ConvertTask) -> dict[str, Any]:
    """Convert one unit into part tars (atomically), then write and return its summary.

    A unit whose summary exists is done: its summary is returned without work, so a rerun
    after an interruption only converts the remaining units.
    """
    if task.summary_path.is_file():
        return json.loads(task.summary_path.read_text())
    start = time.perf_counter()
    select = make_selector(task.subset_fraction, task.subset_ids_file)
    samples = {split: 0 for split in SPLITS}
    rejected: list[dict[str, str]] = []
    dropped = 0
    with ExitStack() as parts:  # one part tar per split, each committed when the unit is done
        writers: dict[str, WriteSample] = {}
        for item in iter_pairs(task.unit, select):
            if isinstance(item, Rejected):
                rejected.append(asdict(item))
                continue
            try:
                sample, lost = convert(item, task.target_size, task.jpeg_quality)
            except BadSample as error:
                rejected.append(asdict(Rejected(item.source, item.key, str(error))))
                continue
            split = task.split or ("val" if id_fraction(item.key, "val") < task.val_fraction else "train")
            if split not in writers:
                writers[split] = parts.enter_context(tar_writer(task.part_path(split)))
            writers[split](item.key, {"jpg": sample["jpg"], "json": sample["json"]})
            samples[split] += 1
            dropped += lost
    summary = {
        "index": task.index, "unit": str(task.unit), "samples": samples, "rejected": rejected,
        "dropped_masks": dropped, "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(task.summary_path, summary)
    return summary
