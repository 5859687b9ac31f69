"""Distillation shards: each input shard embedded and written by one Ray Data actor.

`embed_shards` maps `ShardEmbedder` over the input shards with an actor pool (one GPU per
actor when there are GPUs). One input shard is one unit of work: the actor streams the tar,
decodes and resizes its images in threads a few batches ahead, runs the teacher's image
encoder on batches and streams each sample, with an `emb.npy` member, into the output shard,
committed atomically when complete. Only a per-shard summary (path, samples, bytes, sha256)
goes back to the driver: at 1024 px each sample carries a 2 MiB embedding, which would make
one driver loop the bottleneck of N GPUs.

Actors write where the driver expects the shards, so the output directory must be storage
every node can write: on a cluster, the artifact directory on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from edgesam.config import EmbedConfig
from edgesam.data.shards import iter_raw
from edgesam.data.tars import tar_writer
from edgesam.data.transforms import resize_image
from edgesam.models.sdpa import use_sdpa
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import device_images

EMBEDDING = "emb.npy"
LOOKAHEAD = 2  # batches decoded ahead of the encoder, so the accelerator rarely waits for JPEG decoding
WRITE_AHEAD = 64  # embedded samples the encoder may run ahead of the shard writer


def teacher_input(source: str, key: str, members: Mapping[str, bytes], img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's JPEG as the teacher's input before normalization: uint8 (3, S, S) resized
    and zero-padded, and its unpadded (h, w); `device_images` normalizes it on the device (a
    quarter of the float32 bytes decoded, queued and uploaded)."""
    if "jpg" not in members:
        raise ValueError(f"{source}: sample {key!r} has no 'jpg' member (found {sorted(members)})")
    try:
        with Image.open(io.BytesIO(members["jpg"])) as img:
            image = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: sample {key!r}: cannot decode its jpg ({error})") from error
    resized = resize_image(image, img_size)
    h, w = resized.shape[:2]
    padded = torch.zeros(3, img_size, img_size, dtype=torch.uint8)
    padded[:, :h, :w] = torch.from_numpy(np.require(resized, requirements=["C", "W"])).permute(2, 0, 1)
    return padded, torch.tensor([h, w])


def in_background(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items` produced on a thread up to `depth` ahead of the consumer, errors re-raised in
    order: the encoder computes the next batches while the shard writer hashes and writes
    (a bounded queue and a thread; no kept library wraps an iterator so)."""
    done, buffer = object(), queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                buffer.put((item, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            buffer.put((done, error))
        else:
            buffer.put((done, None))

    threading.Thread(target=produce, name="embed-encode", daemon=True).start()
    while True:
        item, error = buffer.get()
        if item is done:
            if error is not None:
                raise error
            return
        yield item


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_shard(samples: Iterable[tuple[str, Mapping[str, bytes]]], target: Path, expected: int, source: str,
                digest: Any = None) -> int:
    """Write one input shard's samples (key, members with the embedding) to `target`, committed only
    when all `expected` samples arrived; `digest` (a hashlib object) sees the bytes as they are written.
    Returns the count."""
    count = 0
    with tar_writer(target, digest) as write:
        for key, members in samples:
            write(key, members)
            count += 1
        if count != expected:
            raise RuntimeError(f"{source}: embedded {count} samples, the shard manifest lists {expected}")
    return count


class ShardEmbedder:
    """Ray Data actor: embeds whole input shards and writes each output shard itself.

    `threads` is both the torch threads of a CPU actor and the JPEG decoding threads.
    """

    def __init__(self, teacher: TeacherSource, dtype: str, gpu: bool, threads: int, batch_size: int,
                 sdpa: bool = True, compile: bool = False):
        self.device = torch.device("cuda") if gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.encoder = teacher.load().image_encoder.eval().to(self.device)
        if sdpa:
            use_sdpa(self.encoder)
        if compile and self.device.type == "cuda":
            self.encoder = torch.compile(self.encoder)
        self.img_size, self.batch_size = teacher.img_size, batch_size
        self.autocast = self.device.type == "cuda" and dtype != "float32"
        self.dtype = getattr(torch, dtype)
        self.decoders = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        source, target, digest = job["source"], Path(job["target"]), hashlib.sha256()
        count = write_shard(in_background(self._embedded(source), WRITE_AHEAD), target, job["samples"], source, digest)
        return {"source": source, "path": str(target), "samples": count, "bytes": target.stat().st_size,
                "sha256": digest.hexdigest()}

    def _embedded(self, source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The shard's samples in tar order, each with its embedding added."""
        pending: deque[tuple[list, list[Future]]] = deque()
        samples = iter_raw(source)
        while chunk := list(itertools.islice(samples, self.batch_size)):
            pending.append((chunk, [self.decoders.submit(teacher_input, source, key, members, self.img_size)
                                    for key, members in chunk]))
            if len(pending) > LOOKAHEAD:
                yield from self._encode(*pending.popleft())
        while pending:
            yield from self._encode(*pending.popleft())

    @torch.no_grad()
    def _encode(self, chunk: list[tuple[str, dict[str, bytes]]], inputs: list[Future]) -> Iterator[tuple[str, dict[str, bytes]]]:
        images, hw = (torch.stack(parts) for parts in zip(*(future.result() for future in inputs)))
        pinned = self.device.type == "cuda"
        x = device_images(images.pin_memory().to(self.device, non_blocking=True) if pinned else images, hw.to(self.device))
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            embeddings = self.encoder(x)
        embeddings = embeddings.half().cpu().numpy()  # halved on the device: half the bytes copied to the host
        for (key, members), embedding in zip(chunk, embeddings):
            yield key, {**members, EMBEDDING: encode_npy(embedding)}


def embed_shards(jobs: Sequence[tuple[str, Path, int]], teacher: TeacherSource, cfg: EmbedConfig,
                 gpu: bool) -> Iterator[dict[str, Any]]:
    """Embed each (source shard, target path, samples) of `jobs` in an actor pool (Ray must be
    connected); yield each shard's summary (source, path, samples, bytes, sha256) once it is
    committed, in completion order."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller shows its own
    ds = ray.data.from_items([{"source": str(s), "target": str(t), "samples": n} for s, t, n in jobs],
                             override_num_blocks=len(jobs))  # one shard per block: actors take shards one by one
    ds = ds.map(
        ShardEmbedder,
        fn_constructor_kwargs={"teacher": teacher, "dtype": cfg.dtype, "gpu": gpu, "threads": cfg.cpus_per_actor,
                               "batch_size": cfg.batch_size, "sdpa": cfg.sdpa, "compile": cfg.compile},
        # One shard in flight per actor: a shard is long, so a queue would only unbalance the tail.
        compute=ray.data.ActorPoolStrategy(size=min(cfg.concurrency, len(jobs)), max_tasks_in_flight_per_actor=1),
        num_gpus=1 if gpu else 0, num_cpus=cfg.cpus_per_actor,
    )
    yield from ds.iter_rows()
