"""The embed artifact as training data: examples with stored teacher embeddings, loaders that
keep a GPU fed, and what both distillation phases do to their student encoder's input.

The loader carries the image as uint8, padded to the square input, and the embedding as
stored (float16): a quarter and a half of their float32 size through the loader processes,
the pinned copy and the host-to-device transfer. `device_images` normalizes on the device,
with the same arithmetic as `edgesam.data.transforms.preprocess`.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from edgesam.artifacts import Artifact
from edgesam.data.shards import Sample, SampleDataset, list_shards
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD, resize_image, valid_mask

Collate = Callable[[list[Any]], Any]


@dataclass(frozen=True)
class EmbedShards:
    """The training split of a committed embed artifact."""

    img_size: int
    shards: list[str]
    samples: int

    @classmethod
    def from_artifact(cls, embed: Artifact) -> EmbedShards:
        shards = [str(p) for p in list_shards(embed.path, "train")]
        if not shards:
            raise FileNotFoundError(f"{embed.path}/train: the embed artifact has no training shards")
        manifest = embed.manifest
        return cls(int(manifest["img_size"]), shards, int(manifest["splits"]["train"]["samples"]))


def embedding_example(sample: Sample, img_size: int, valid_stride: int = 16) -> dict[str, Any]:
    """One sample as training input: `image` uint8 (3, S, S) resized and zero-padded, `hw` its
    unpadded (h, w), `teacher_emb` the stored embedding as stored, `valid` the cells of the
    grid of stride `valid_stride` (16: the embedding, 4: the low-res masks) that overlap the
    image, and `key` (named by `NonFiniteLossError` when a batch goes bad)."""
    if sample.embedding is None:
        raise ValueError(f"sample {sample.key} has no teacher embedding (emb.npy): not an embed artifact")
    if sample.image.dtype != np.uint8 or sample.image.ndim != 3 or sample.image.shape[2] != 3:
        raise ValueError(f"sample {sample.key}: expected a uint8 HxWx3 image, got {sample.image.dtype} "
                         f"{sample.image.shape}")
    resized = resize_image(sample.image, img_size)
    h, w = resized.shape[:2]
    image = torch.zeros(3, img_size, img_size, dtype=torch.uint8)
    image[:, :h, :w] = torch.from_numpy(np.require(resized, requirements=["C", "W"])).permute(2, 0, 1)
    return {"image": image, "hw": torch.tensor([h, w]),
            "teacher_emb": torch.from_numpy(np.ascontiguousarray(sample.embedding)),
            "valid": valid_mask((h, w), img_size, img_size // valid_stride), "key": sample.key}


def device_images(images: torch.Tensor, hw: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """`Sam.preprocess` of a uint8 (B, 3, S, S) batch on its device: normalized, zero outside
    each image's (h, w) in `hw` (B, 2); on the CPU bit-identical to `preprocess`."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device).view(1, -1, 1, 1)
    x = (images.float() - mean) / std
    positions = torch.arange(images.shape[-1], device=images.device)
    inside = (positions[None, :, None] < hw[:, 0, None, None]) & (positions[None, None, :] < hw[:, 1, None, None])
    x = torch.where(inside[:, None], x, 0.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def speed_up_encoder(encoder: nn.Module, channels_last: bool, compile: bool) -> nn.Module:
    """The student's fixed-shape image encoder in channels-last layout and/or compiled
    (`nn.Module.compile`, in place: state-dict keys stay as they are). GPU options."""
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    if compile:
        encoder.compile()
    return encoder


class EpochSamples(torch.utils.data.IterableDataset):
    """The shards' samples of one epoch, shuffled per epoch, each through `transform(sample, epoch)`.

    Persistent DataLoader workers keep the copy of the dataset they started with, so an epoch
    set on the main process's copy would never reach them: the epoch sits in shared memory
    (`multiprocessing.Value`) and each worker reads it when the next epoch's iteration starts.
    """

    def __init__(self, shards: list[str], transform: Callable[..., Any], seed: int, rank: int, world_size: int):
        self.shards, self.transform, self.seed = shards, transform, seed
        self.rank, self.world_size = rank, world_size
        self._epoch = multiprocessing.Value("q", 0)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch.value
        dataset = SampleDataset(self.shards, partial(self.transform, epoch=epoch), shuffle=True, seed=self.seed,
                                rank=self.rank, world_size=self.world_size)
        dataset.set_epoch(epoch)
        return iter(dataset)


class EpochLoader:
    """One DataLoader for every epoch of a run, its worker processes started once (persistent),
    its batches in pinned memory when there is a GPU (asynchronous host-to-device copies).

    The loader has its own generator: starting it leaves the global RNG (restored on resume,
    and used by the prompt loop) untouched.
    """

    def __init__(self, dataset: EpochSamples, batch_size: int, workers: int, seed: int, collate: Collate | None):
        self.dataset = dataset
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
            pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed),
        )

    def epoch(self, epoch: int) -> Iterator[Any]:
        self.dataset.set_epoch(epoch)
        return iter(self.loader)


class LoaderCache:
    """A task's `EpochLoader` per (rank, world size, batch size), built where the task runs.

    Not pickled: a task travels to its Ray workers before it has loaders, and each worker
    starts its own.
    """

    def __init__(self) -> None:
        self._loaders: dict[tuple[int, int, int], EpochLoader] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._loaders = {}

    def batches(self, key: tuple[int, int, int], epoch: int, make: Callable[[], EpochLoader]) -> Iterator[Any]:
        if key not in self._loaders:
            self._loaders[key] = make()
        return self._loaders[key].epoch(epoch)


def shard_batches(cache: LoaderCache, data: EmbedShards, transform: Callable[..., Any], workers: int, seed: int,
                  rank: int, world_size: int, epoch: int, batch_size: int,
                  collate: Collate | None = None) -> Iterator[Any]:
    """`TrainTask.batches` over embed shards: this rank's part of `epoch`, from the cached loader."""
    def make() -> EpochLoader:
        return EpochLoader(EpochSamples(data.shards, transform, seed, rank, world_size), batch_size, workers, seed,
                           collate)

    return cache.batches((rank, world_size, batch_size), epoch, make)
