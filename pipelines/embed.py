"""Stage `embed`: the teacher's image embeddings of every shard, with Ray Data.

An actor pool (one GPU per actor when the cluster has GPUs) takes the shard stage's shards one
by one: each actor reads its input shard, runs the teacher's image encoder and writes the
distillation shard itself (`edgesam.tasks.embed`), so this driver receives only per-shard
summaries, never embeddings. Actors write into the artifact directory directly: on a cluster it
must be on a filesystem every node shares. A shard is committed only when complete, so a rerun
after a kill recomputes only the missing ones.

    python -m pipelines embed --profile smoke
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import EmbedConfig, RuntimeConfig
from edgesam.tasks.embed import embed_shards
from edgesam.data.shards import SPLITS
from edgesam.models.teacher import TeacherSource
from edgesam.cluster import connect_ray, use_gpu

STAGE = "embed"
UPSTREAM = ("shard", "teacher")

log = logging.getLogger("edgesam.pipelines.embed")


def _embed_missing(jobs: list[tuple[str, Path, int]], cfg: EmbedConfig, runtime: RuntimeConfig,
                   teacher: TeacherSource) -> dict[str, Any]:
    """Embed the input shards of `jobs` (source, target, samples); return their summaries by target,
    the image count, seconds, and images/s after the first committed shard (pool warm)."""
    connect_ray(runtime)
    summaries, start, first = {}, time.perf_counter(), None
    with tqdm(total=sum(n for _, _, n in jobs), desc="embed", unit="img", mininterval=2.0, disable=None) as bar:
        for summary in embed_shards(jobs, teacher, cfg, use_gpu(runtime)):
            first = first or (time.perf_counter(), summary["samples"])
            summaries[summary["path"]] = summary
            bar.update(summary["samples"])
    end, done = time.perf_counter(), sum(s["samples"] for s in summaries.values())
    warm = (done - first[1]) / (end - first[0]) if first and done > first[1] and end > first[0] else None
    return {"shards": summaries, "images": done, "seconds": end - start, "warm_images_per_s": warm}


def runtime_key(cfg: EmbedConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return {"precision": cfg.dtype if runtime.use_gpu else "float32"}  # autocast on GPUs only


def run(cfg: EmbedConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    shard = inputs["shard"]
    teacher = TeacherSource.from_artifact(inputs["teacher"])
    jobs: list[tuple[str, Path, int]] = []
    outputs: dict[str, list[tuple[str, Path, int]]] = {}
    for split in SPLITS:
        for entry in shard.manifest["splits"][split]["shards"]:
            source = shard.path / entry["path"]
            if not source.is_file():
                raise FileNotFoundError(f"{source}: shard listed in {shard.manifest_path} is missing")
            target = out / split / Path(entry["path"]).name
            outputs.setdefault(split, []).append((entry["path"], target, entry["samples"]))
            if not target.is_file():
                jobs.append((str(source), target, entry["samples"]))
    reused = sum(len(v) for v in outputs.values()) - len(jobs)
    log.info("embed: %d shard(s) to compute, %d already done; teacher %s at %d", len(jobs), reused,
             teacher.kind, teacher.img_size)
    speed = _embed_missing(jobs, cfg, runtime, teacher) if jobs else {"images": 0, "shards": {}}
    images = speed["images"]
    if images:
        log.info("embed: %d images in %.1fs (%.2f images/s; %.2f once the pool is warm)", images,
                 speed["seconds"], images / speed["seconds"], speed["warm_images_per_s"] or float("nan"))
    splits = {}
    for split, entries in outputs.items():
        shards = []
        for rel, target, n in entries:  # computed shards come with the actors' digests; reused ones are hashed here
            done = speed["shards"].get(str(target)) or {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
            shards.append({"path": rel, "samples": n, "bytes": done["bytes"], "sha256": done["sha256"]})
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
