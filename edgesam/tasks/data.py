"""The embed artifact as training data: examples with stored teacher embeddings, and loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from edgesam.artifacts import Artifact
from edgesam.data.shards import Sample, list_shards
from edgesam.data.transforms import preprocess, valid_mask


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


def embedding_example(sample: Sample, img_size: int, valid_stride: int = 16) -> dict[str, torch.Tensor]:
    """Preprocessed image, stored teacher embedding and the valid cells of one sample on the
    grid of stride `valid_stride` (16: the embedding, 4: the low-res masks)."""
    if sample.embedding is None:
        raise ValueError(f"sample {sample.key} has no teacher embedding (emb.npy): not an embed artifact")
    image, hw = preprocess(sample.image, img_size)
    embedding = torch.from_numpy(sample.embedding.astype(np.float32))
    return {"image": image, "teacher_emb": embedding, "valid": valid_mask(hw, img_size, img_size // valid_stride)}


def loader(dataset: torch.utils.data.IterableDataset, batch_size: int, workers: int, seed: int,
           collate: Callable | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader with its own generator: starting it leaves the global RNG (restored on
    resume, and used by the prompt loop) untouched."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        persistent_workers=False, prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
