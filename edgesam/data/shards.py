"""WebDataset shards of the shard and embed stages: deterministic writing, streaming reading.

A shard is a plain tar of `<key>.jpg`, `<key>.json` and (embed artifacts) `<key>.emb.npy`
members. Shards are written atomically with fixed tar metadata (same samples, same bytes),
streamed back (never loaded whole) and split across Ray Train ranks and DataLoader
workers, by shard when there are enough shards, else by sample.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from edgesam.artifacts import sha256_file, temp_path
from edgesam.data.units import SPLITS



@dataclass
class Sample:
    """One image with its SA-1B annotations (and teacher embedding in embed artifacts)."""

    key: str
    image: np.ndarray  # uint8 H x W x 3
    annotations: list[dict[str, Any]]
    embedding: np.ndarray | None = None  # float16 256 x S/16 x S/16
    meta: dict[str, Any] = field(default_factory=dict)  # the JSON "image" record

    @property
    def hw(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def masks(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Bool (N, H, W) masks of the annotations at `indices` (all when None)."""
        chosen = range(len(self.annotations)) if indices is None else indices
        rles = [self.annotations[i]["segmentation"] for i in chosen]
        if not rles:
            return np.zeros((0, *self.hw), dtype=bool)
        return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)

    def boxes(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """(N, 4) float xyxy boxes."""
        chosen = range(len(self.annotations)) if indices is None else indices
        xywh = np.array([self.annotations[i]["bbox"] for i in chosen], dtype=np.float64).reshape(-1, 4)
        xywh[:, 2:] += xywh[:, :2]
        return xywh

    def points(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """(N, 2) float xy of each annotation's first `point_coords` entry."""
        chosen = range(len(self.annotations)) if indices is None else indices
        return np.array([self.annotations[i]["point_coords"][0] for i in chosen], dtype=np.float64).reshape(-1, 2)


def list_shards(artifact_dir: str | Path, split: str) -> list[Path]:
    """Sorted shard paths of `split` in a shard or embed artifact directory."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    directory = Path(artifact_dir) / split
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no {split!r} split in artifact {artifact_dir}")
    return sorted(directory.glob("shard-*.tar"))


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    samples: int
    bytes: int
    sha256: str


def write_shards(samples: Iterable[dict[str, Any]], directory: str | Path, max_count: int,
                 max_size: int) -> list[ShardInfo]:
    """Write WebDataset samples (`{"__key__": key, ext: bytes}`) to `directory/shard-NNNNNN.tar`.

    Tar metadata is fixed (mtime 0, fixed owner and mode), so the same samples give
    byte-identical shards. Each shard is written under a temporary name (`temp_path`) and
    renamed when complete: ShardWriter opens and closes the files itself, so its callbacks do
    what `atomic_path` does elsewhere. Shards of an earlier attempt that this one did not
    write are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[ShardInfo] = []
    open_files: list[tuple[Any, Path]] = []
    writer: wds.ShardWriter | None = None

    def opener(name: str) -> Any:
        tmp = temp_path(Path(name))
        open_files.append((open(tmp, "wb"), tmp))
        return open_files[-1][0]

    def post(name: str) -> None:
        file, tmp = open_files.pop()
        file.flush()
        os.fsync(file.fileno())
        file.close()
        os.replace(tmp, name)
        path = Path(name)
        written.append(ShardInfo(path, writer.count, path.stat().st_size, sha256_file(path)))

    for sample in samples:
        if writer is None:
            writer = wds.ShardWriter(str(directory / "shard-%06d.tar"), maxcount=max_count, maxsize=max_size,
                                     post=post, opener=opener, verbose=0, mtime=0)
        writer.write(sample)
    if writer is not None:
        writer.close()
    keep = {info.path.name for info in written}
    for stale in directory.glob("*shard-*.tar*"):
        if stale.name not in keep:
            stale.unlink()
    return written


def decode_sample(key: str, members: dict[str, bytes]) -> Sample:
    """Build a `Sample` from the raw members (extension -> bytes) of one key."""
    for required in ("jpg", "json"):
        if required not in members:
            raise ValueError(f"sample {key!r} has no {required!r} member (found {sorted(members)})")
    with Image.open(io.BytesIO(members["jpg"])) as img:
        image = np.asarray(img.convert("RGB"))
    record = json.loads(members["json"])
    embedding = np.load(io.BytesIO(members["emb.npy"]), allow_pickle=False) if "emb.npy" in members else None
    return Sample(key, image, record["annotations"], embedding, record["image"])


class ShardReadError(ValueError):
    """A shard tar cannot be read (truncated, overwritten, not a tar); names the file."""


def iter_raw(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) groups from one shard in tar order; a damaged tar
    raises `ShardReadError` naming the shard."""
    try:
        yield from _iter_members(path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardReadError(f"{path}: cannot read the shard tar ({type(exc).__name__}: {exc}); the artifact "
                             "holding it is damaged: recompute its stage with --force") from exc


def _iter_members(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(path, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            stem, _, ext = name.partition(".")
            if stem != key:
                if key is not None:
                    yield key, members
                key, members = stem, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _consumer() -> tuple[int, int]:
    """(index, count) of this DataLoader worker (0, 1 outside a DataLoader)."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def iter_samples(
    paths: Sequence[str | Path],
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    buffer_size: int = 64,
) -> Iterator[Sample]:
    """Stream decoded samples from `paths`.

    With `world_size` > 1 (Ray Train ranks) or inside DataLoader workers, each consumer
    gets a disjoint part: whole shards when there are at least as many shards as
    consumers, else every n-th sample. `shuffle` permutes the shard order and mixes
    samples through a buffer of `buffer_size`, deterministically from `seed`.
    """
    worker, num_workers = _consumer()
    consumers = world_size * num_workers
    consumer = rank * num_workers + worker
    rng = random.Random(seed)
    order = [Path(p) for p in paths]
    if shuffle:
        rng.shuffle(order)
    by_shard = len(order) >= consumers
    if by_shard:
        order = order[consumer::consumers]

    def raw() -> Iterator[tuple[str, dict[str, bytes]]]:
        index = 0
        for path in order:
            for item in iter_raw(path):
                if by_shard or index % consumers == consumer:
                    yield item
                index += 1

    stream = raw()
    if shuffle:
        stream = _buffer_shuffle(stream, buffer_size, rng)
    for key, members in stream:
        yield decode_sample(key, members)


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class SampleDataset(torch.utils.data.IterableDataset):
    """`iter_samples` as a torch IterableDataset; `set_epoch` reseeds the shuffle."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable[[Sample], Any] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 64,
    ):
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.buffer_size = buffer_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        samples = iter_samples(
            self.paths, self.shuffle, self.seed + self.epoch, self.rank, self.world_size, self.buffer_size
        )
        for sample in samples:
            yield self.transform(sample) if self.transform else sample
