"""Stage `embed`: the teacher's image embeddings of every shard, with Ray Data.

A streaming Ray Data pipeline reads the shard stage's WebDataset shards (raw bytes), resizes
the images as SAM does (CPU tasks), runs the teacher's image encoder in an actor pool
(`map_batches` with a callable class: one GPU per actor when the cluster has GPUs) and
streams the rows back, one distillation shard per input shard (`edgesam.data.embeddings`).
A shard is committed only when complete, so a rerun after a kill recomputes only the missing
ones; the dataset is streamed, never materialized.

    python -m pipelines embed --profile smoke
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import EmbedConfig, RuntimeConfig
from edgesam.data.embeddings import TeacherEncoder, resize_batch, write_shard
from edgesam.data.shards import SPLITS
from edgesam.models.teacher import TeacherSource
from edgesam.train import connect_ray, use_gpu

STAGE = "embed"
UPSTREAM = ("shard", "teacher")

log = logging.getLogger("edgesam.pipelines.embed")


def _embed_missing(jobs: dict[str, tuple[Path, int]], cfg: EmbedConfig, runtime: RuntimeConfig,
                   teacher: TeacherSource) -> dict[str, Any]:
    """Run the pipeline over the input shards in `jobs` (source -> (target, samples)); return
    the image count, seconds, and images/s after the first row (pool warm)."""
    import ray.data

    connect_ray(runtime)
    gpu = use_gpu(runtime)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows arrive shard by shard, in tar order
    context.enable_progress_bars = False
    ds = ray.data.read_webdataset(list(jobs), decoder=None, override_num_blocks=len(jobs))
    ds = ds.map_batches(resize_batch, fn_kwargs={"img_size": teacher.img_size}, batch_size=cfg.batch_size,
                        batch_format="numpy", zero_copy_batch=True)
    ds = ds.map_batches(
        TeacherEncoder, fn_constructor_kwargs={"teacher": teacher, "dtype": cfg.dtype, "gpu": gpu,
                                               "threads": cfg.cpus_per_actor},
        batch_size=cfg.batch_size, batch_format="numpy", concurrency=cfg.concurrency,
        num_gpus=1 if gpu else 0, num_cpus=cfg.cpus_per_actor,
    )
    done, start, first = 0, time.perf_counter(), None
    with tqdm(total=sum(n for _, n in jobs.values()), desc="embed", unit="img", mininterval=2.0) as bar:
        def counted(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            nonlocal first
            for row in rows:
                first = first or time.perf_counter()
                bar.update(1)
                yield row

        for source, rows in itertools.groupby(ds.iter_rows(), key=lambda row: row["__url__"]):
            target, expected = jobs[source]
            done += write_shard(counted(rows), target, expected, source)
    end = time.perf_counter()
    warm = (done - cfg.batch_size) / (end - first) if first is not None and done > cfg.batch_size else None
    return {"images": done, "seconds": end - start, "warm_images_per_s": warm}


def runtime_key(cfg: EmbedConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return {"precision": cfg.dtype if runtime.use_gpu else "float32"}  # autocast on GPUs only


def run(cfg: EmbedConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    shard = inputs["shard"]
    teacher = TeacherSource.from_artifact(inputs["teacher"])
    jobs: dict[str, tuple[Path, int]] = {}
    outputs: dict[str, list[tuple[str, Path, int]]] = {}
    for split in SPLITS:
        for entry in shard.manifest["splits"][split]["shards"]:
            source = shard.path / entry["path"]
            if not source.is_file():
                raise FileNotFoundError(f"{source}: shard listed in {shard.manifest_path} is missing")
            target = out / split / Path(entry["path"]).name
            outputs.setdefault(split, []).append((entry["path"], target, entry["samples"]))
            if not target.is_file():
                jobs[str(source)] = (target, entry["samples"])
    reused = sum(len(v) for v in outputs.values()) - len(jobs)
    log.info("embed: %d shard(s) to compute, %d already done; teacher %s at %d", len(jobs), reused,
             teacher.kind, teacher.img_size)
    speed = _embed_missing(jobs, cfg, runtime, teacher) if jobs else {"images": 0}
    images = speed["images"]
    if images:
        log.info("embed: %d images in %.1fs (%.2f images/s; %.2f once the pool is warm)", images,
                 speed["seconds"], images / speed["seconds"], speed["warm_images_per_s"] or float("nan"))
    splits = {}
    for split, entries in outputs.items():
        shards = [{"path": rel, "samples": n, "bytes": t.stat().st_size, "sha256": sha256_file(t)}
                  for rel, t, n in entries]
        splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards)}
    grid = teacher.img_size // 16
    return {
        "splits": splits, "target_size": shard.manifest["target_size"], "img_size": teacher.img_size,
        "embedding_shape": [256, grid, grid], "embedding_dtype": "float16",
        "teacher": {"kind": teacher.kind, "sha256": teacher.sha256},
        "computed_shards": len(jobs), "reused_shards": reused,
        "images_per_s": round(images / speed["seconds"], 2) if images else None,
        "warm_images_per_s": round(speed["warm_images_per_s"], 2) if speed.get("warm_images_per_s") else None,
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
