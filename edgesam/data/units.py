"""Input units -> part tars: reject / repair records, selection and split by key, the unit runner.

A unit is a slice of the input (an SA-1B tar or directory, or N images of a COCO source)
that one worker converts into one part tar per split plus a summary JSON. A unit with a
summary is done, so a rerun after an interruption converts only the rest. Torch-free:
`convert_unit` runs in pool / Ray worker processes, which then start fast and small.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgesam.artifacts import write_json_atomic
from edgesam.data.tars import WriteSample, tar_writer

SPLITS = ("train", "val")
_KEY_ID = re.compile(r"^sa_(\d+)$")


@dataclass(frozen=True)
class Rejected:
    """An input left out, with why: a whole image (or tar) or, with `annotation`, one annotation."""

    source: str
    key: str
    reason: str
    annotation: int | str | None = None

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Repaired:
    """An annotation kept after the stage fixed it (e.g. a box recomputed from its mask), with why."""

    source: str
    key: str
    annotation: int | str | None
    reason: str


@dataclass
class Converted:
    """One image as a WebDataset sample, with what happened to its annotations on the way."""

    key: str
    members: dict[str, bytes]  # jpg, json
    annotations: int  # kept
    dropped: int = 0  # masks that vanish at the target size
    crowd_skipped: int = 0
    repaired: list[Repaired] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)  # annotations only


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
    """Keep an image by key: in the ids list file (one id, `sa_<id>` or sample key per line),
    else by fraction."""
    if ids_file is not None:
        if not Path(ids_file).is_file():
            raise FileNotFoundError(f"{ids_file}: subset id list does not exist")
        wanted = {_parse_id(line) for line in Path(ids_file).read_text().splitlines() if line.strip()}
        return lambda key: image_id(key) in wanted
    if fraction is not None:
        return lambda key: id_fraction(key, "subset") < fraction
    return lambda key: True


@dataclass(frozen=True, kw_only=True)
class Unit(ABC):
    """What every unit has: where its parts go, the target frame and its split rule."""

    index: int
    part_dir: Path
    split: str | None  # None: split by image id with val_fraction
    target_size: int
    jpeg_quality: int = 95
    val_fraction: float = 0.0

    @property
    def summary_path(self) -> Path:
        return self.part_dir / f"{self.index:06d}.json"

    def part_path(self, split: str) -> Path:
        return self.part_dir / f"{self.index:06d}.{split}.tar"

    def split_of(self, key: str) -> str:
        return self.split or ("val" if id_fraction(key, "val") < self.val_fraction else "train")

    @property
    @abstractmethod
    def name(self) -> str:
        """The unit in the summary: a tar, a directory, or a COCO source's image range."""

    @abstractmethod
    def results(self) -> Iterator[Converted | Rejected]:
        """Each input image converted, or rejected with its reason."""


def convert_unit(task: Unit) -> dict[str, Any]:
    """Convert one unit into part tars (atomically), then write and return its summary.

    A unit whose summary exists is done: its summary is returned without work.
    """
    if task.summary_path.is_file():
        return json.loads(task.summary_path.read_text())
    start = time.perf_counter()
    samples = {split: 0 for split in SPLITS}
    counts = {"annotations": 0, "dropped_masks": 0, "crowd_skipped": 0}
    rejected: list[dict[str, Any]] = []
    repaired: list[dict[str, Any]] = []
    with ExitStack() as parts:  # one part tar per split, each committed when the unit is done
        writers: dict[str, WriteSample] = {}
        for item in task.results():
            if isinstance(item, Rejected):
                rejected.append(item.record())
                continue
            split = task.split_of(item.key)
            if split not in writers:
                writers[split] = parts.enter_context(tar_writer(task.part_path(split)))
            writers[split](item.key, item.members)
            samples[split] += 1
            counts["annotations"] += item.annotations
            counts["dropped_masks"] += item.dropped
            counts["crowd_skipped"] += item.crowd_skipped
            rejected += [r.record() for r in item.rejected]
            repaired += [asdict(r) for r in item.repaired]
    summary = {
        "index": task.index, "unit": task.name, "samples": samples, **counts, "rejected": rejected,
        "repaired": repaired, "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(task.summary_path, summary)
    return summary
