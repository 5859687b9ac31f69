"""Stage `embed`: the teacher's image embeddings of every shard, with Ray Data.

A streaming Ray Data pipeline reads the shard stage's WebDataset shards (raw bytes), resizes
the images as SAM does (CPU tasks), runs the teacher's image encoder in an actor pool
(`map_batches` with a callable class: one GPU per actor when the cluster has GPUs, bf16/fp16
autocast there) and streams the rows back to the driver, which writes one distillation shard
per input shard: the same keys and members plus `<key>.emb.npy` (float16, 256 x S/16 x S/16).

Each output shard is written under a temporary name and renamed when complete, so a rerun
after a kill recomputes only the shards that are missing. The object store stays bounded:
the dataset is streamed, never materialized.

    python -m pipelines embed --profile smoke
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import EmbedConfig, RuntimeConfig
from edgesam.data.shards import SPLITS
from edgesam.data.transforms import normalize_pad, resize_image
from edgesam.models.teacher import load_teacher, load_tiny_sam
from edgesam.train import connect_ray, use_gpu
from pipelines.teacher import verified_checkpoint

STAGE = "embed"
UPSTREAM = ("shard", "teacher")
EMBEDDING = "emb.npy"
_COLUMNS = ("__key__", "__url__")  # read_webdataset's bookkeeping columns

log = logging.getLogger("edgesam.pipelines.embed")


def resize_batch(batch: dict[str, np.ndarray], img_size: int) -> dict[str, np.ndarray]:
    """CPU stage: decode each JPEG and resize its longest side to `img_size` (SAM's resize),
    zero-padded to img_size x img_size uint8 with the valid (h, w) beside it."""
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


def load_encoder(kind: str, checkpoint: str) -> torch.nn.Module:
    sam = load_tiny_sam(Path(checkpoint)) if kind == "synthetic" else load_teacher(kind, Path(checkpoint))
    return sam.image_encoder.eval()


class TeacherEncoder:
    """Ray Data actor: the teacher's image encoder on batches from `resize_batch`."""

    def __init__(self, kind: str, checkpoint: str, img_size: int, dtype: str, gpu: bool, threads: int):
        self.device = torch.device("cuda") if gpu and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(kind, checkpoint).to(self.device)
        self.img_size = img_size
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
            buffer = io.BytesIO()
            np.save(buffer, embedding, allow_pickle=False)
            blobs[i] = buffer.getvalue()
        return {**batch, EMBEDDING: blobs}


def teacher_source(teacher: Artifact) -> tuple[str, Path, int, str]:
    """(kind, checkpoint path, img_size, sha256) of the teacher artifact, checked on disk."""
    path, digest = verified_checkpoint(teacher)
    manifest = teacher.manifest
    return manifest["kind"], path, int(manifest["img_size"]), digest


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: reproducible bytes
    tar.addfile(info, io.BytesIO(payload))


class _ShardSink:
    """Writes the rows of one input shard to its output shard; renames it when complete."""

    def __init__(self, source: str, target: Path, expected: int):
        self.source, self.target, self.expected = source, target, expected
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        key = row["__key__"]
        for ext, payload in sorted(row.items()):
            if ext not in _COLUMNS and payload is not None:
                _add_member(self.tar, f"{key}.{ext}", bytes(payload))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        if self.count != self.expected:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{self.source}: embedded {self.count} samples, the shard manifest lists {self.expected}")
        os.replace(self.tmp, self.target)


def _embed_missing(
    jobs: dict[str, tuple[Path, int]], cfg: EmbedConfig, runtime: RuntimeConfig,
    kind: str, checkpoint: Path, img_size: int,
) -> dict[str, Any]:
    """Run the Ray Data pipeline over the input shards in `jobs` (source -> (target, samples));
    return the image count, seconds, and images/s after the first batch (pool warm)."""
    import ray.data

    connect_ray(runtime)
    gpu = use_gpu(runtime)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows arrive shard by shard, in tar order
    context.enable_progress_bars = False
    sources = list(jobs)
    ds = ray.data.read_webdataset(sources, decoder=None, override_num_blocks=len(sources))
    ds = ds.map_batches(resize_batch, fn_kwargs={"img_size": img_size}, batch_size=cfg.batch_size,
                        batch_format="numpy", zero_copy_batch=True)
    ds = ds.map_batches(
        TeacherEncoder,
        fn_constructor_kwargs={"kind": kind, "checkpoint": str(checkpoint), "img_size": img_size,
                               "dtype": cfg.dtype, "gpu": gpu, "threads": cfg.cpus_per_actor},
        batch_size=cfg.batch_size, batch_format="numpy", concurrency=cfg.concurrency,
        num_gpus=1 if gpu else 0, num_cpus=cfg.cpus_per_actor,
    )
    total = sum(samples for _, samples in jobs.values())
    sink: _ShardSink | None = None
    done, start, first = 0, time.perf_counter(), None
    with tqdm(total=total, desc="embed", unit="img", mininterval=2.0) as bar:
        for row in ds.iter_rows():
            source = row["__url__"]
            if sink is None or sink.source != source:
                if sink is not None:
                    sink.close()
                target, expected = jobs[source]
                sink = _ShardSink(source, target, expected)
            sink.write(row)
            done += 1
            if first is None:
                first = time.perf_counter()
            bar.update(1)
        if sink is not None:
            sink.close()
    end = time.perf_counter()
    warm = (done - cfg.batch_size) / (end - first) if first is not None and done > cfg.batch_size else None
    return {"images": done, "seconds": end - start, "warm_images_per_s": warm}


def run(cfg: EmbedConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    shard, teacher = inputs["shard"], inputs["teacher"]
    kind, checkpoint, img_size, teacher_sha = teacher_source(teacher)
    shard_manifest = shard.manifest
    jobs: dict[str, tuple[Path, int]] = {}
    outputs: dict[str, list[tuple[str, Path, int]]] = {}
    for split in SPLITS:
        for entry in shard_manifest["splits"][split]["shards"]:
            source = shard.path / entry["path"]
            if not source.is_file():
                raise FileNotFoundError(f"{source}: shard listed in {shard.manifest_path} is missing")
            target = out / split / Path(entry["path"]).name
            outputs.setdefault(split, []).append((entry["path"], target, entry["samples"]))
            if not target.is_file():
                jobs[str(source)] = (target, entry["samples"])
    for stale in out.glob("*/.shard-*.tar.tmp-*"):  # partial shards of a killed attempt
        stale.unlink()
    reused = sum(len(v) for v in outputs.values()) - len(jobs)
    log.info("embed: %d shard(s) to compute, %d already done; teacher %s at %d", len(jobs), reused, kind, img_size)
    speed = _embed_missing(jobs, cfg, runtime, kind, checkpoint, img_size) if jobs else {"images": 0}
    images = speed["images"]
    if images:
        log.info("embed: %d images in %.1fs (%.2f images/s; %.2f once the pool is warm)", images,
                 speed["seconds"], images / speed["seconds"], speed["warm_images_per_s"] or float("nan"))
    splits = {}
    for split, entries in outputs.items():
        shards = [{"path": rel, "samples": n, "bytes": t.stat().st_size, "sha256": sha256_file(t)}
                  for rel, t, n in entries]
        splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards)}
    grid = img_size // 16
    return {
        "splits": splits,
        "target_size": shard_manifest["target_size"],
        "img_size": img_size,
        "embedding_shape": [256, grid, grid],
        "embedding_dtype": "float16",
        "teacher": {"kind": kind, "sha256": teacher_sha},
        "computed_shards": len(jobs),
        "reused_shards": reused,
        "images_per_s": round(images / speed["seconds"], 2) if images else None,
        "warm_images_per_s": round(speed["warm_images_per_s"], 2) if speed.get("warm_images_per_s") else None,
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
