"""Distillation shards: the teacher's embedding beside each sample, computed in Ray Data batches.

`resize_batch` (CPU tasks) decodes and resizes images as SAM does; `TeacherEncoder` (an actor
pool, one GPU per actor when there are GPUs) turns them into float16 embeddings; `write_shard`
writes one input shard's rows, with an `emb.npy` member per sample, to its output shard.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image

from edgesam.data.tars import tar_writer
from edgesam.data.transforms import normalize_pad, resize_image
from edgesam.models.teacher import TeacherSource

EMBEDDING = "emb.npy"
BOOKKEEPING = ("__key__", "__url__")  # read_webdataset's columns that are not members


def resize_batch(batch: dict[str, np.ndarray], img_size: int) -> dict[str, np.ndarray]:
    """Decode each JPEG and resize its longest side to `img_size` (SAM's resize), zero-padded
    to img_size x img_size uint8, with the valid (h, w) beside it."""
    pixels = np.zeros((len(batch["jpg"]), img_size, img_size, 3), dtype=np.uint8)
    hw = np.zeros((len(batch["jpg"]), 2), dtype=np.int64)
    for i, payload in enumerate(batch["jpg"]):
        with Image.open(io.BytesIO(payload)) as img:
            resized = resize_image(np.asarray(img.convert("RGB")), img_size)
        pixels[i, : resized.shape[0], : resized.shape[1]] = resized
        hw[i] = resized.shape[:2]
    return {**batch, "pixels": pixels, "hw": hw}


def teacher_input(pixels: np.ndarray, hw: np.ndarray, img_size: int) -> torch.Tensor:
    """(B, 3, S, S) normalized, padded teacher input from `resize_batch`'s columns (= `preprocess`)."""
    return torch.stack([
        normalize_pad(torch.from_numpy(p[:h, :w]).permute(2, 0, 1).float(), img_size)
        for p, (h, w) in zip(pixels, hw)
    ])


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class TeacherEncoder:
    """Ray Data actor: the teacher's image encoder on batches from `resize_batch`."""

    def __init__(self, teacher: TeacherSource, dtype: str, gpu: bool, threads: int):
        self.device = torch.device("cuda") if gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.encoder = teacher.load().image_encoder.eval().to(self.device)
        self.img_size = teacher.img_size
        self.autocast = self.device.type == "cuda" and dtype != "float32"
        self.dtype = getattr(torch, dtype)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = teacher_input(batch.pop("pixels"), batch.pop("hw"), self.img_size).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            embeddings = self.encoder(x)
        embeddings = embeddings.float().cpu().numpy().astype(np.float16)
        blobs = np.empty(len(embeddings), dtype=object)
        for i, embedding in enumerate(embeddings):
            blobs[i] = encode_npy(embedding)
        return {**batch, EMBEDDING: blobs}


def write_shard(rows: Iterable[dict[str, Any]], target: Path, expected: int, source: str) -> int:
    """Write one input shard's rows (with their embeddings) to `target`, committed only when
    all `expected` samples arrived; returns the count."""
    count = 0
    with tar_writer(target) as write:
        for row in rows:
            write(row["__key__"], {ext: bytes(v) for ext, v in row.items() if ext not in BOOKKEEPING and v is not None})
            count += 1
        if count != expected:
            raise RuntimeError(f"{source}: embedded {count} samples, the shard manifest lists {expected}")
    return count
