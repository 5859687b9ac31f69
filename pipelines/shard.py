"""Stage `shard`: SA-1B tars -> validated, resized WebDataset shards `train/` and `val/`.

Each input unit (a tar, or a directory of extracted pairs) is converted by a worker
(`edgesam.data.sa1b.convert_unit`, torch-free) into part files under `out/.parts/`,
streamed member by member, with a summary (counts, rejects) written after the parts: a
unit with a summary is done, so a rerun after a kill skips it.
Units run in a process pool, or as Ray tasks when Ray is initialized or an address is
configured (the parts directory must then be on storage the Ray workers share). The parts
are then concatenated in input order into shards (`webdataset.ShardWriter`, fixed tar
metadata), so the same input and config give byte-identical shards whatever the worker
count or interruptions.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from edgesam.artifacts import Artifact
from edgesam.config import RuntimeConfig, ShardConfig
from edgesam.data.sa1b import SPLITS, ConvertTask, convert_unit, find_sources
from edgesam.data.shards import iter_raw, write_shards

STAGE = "shard"
UPSTREAM = ("data",)
PARTS = ".parts"

log = logging.getLogger("edgesam.pipelines.shard")


class RejectRatioError(RuntimeError):
    """Too many inputs were rejected: the input is probably not what it should be."""


def _map_unordered(fn: Callable[[ConvertTask], dict], tasks: list[ConvertTask], workers: int,
                   runtime: RuntimeConfig) -> Iterator[dict]:
    """fn over tasks, results as they complete: inline, in a process pool, or as Ray tasks."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    import ray

    if ray.is_initialized() or runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        from edgesam.train.cluster import connect_ray

        connect_ray(runtime)
        remote = ray.remote(num_cpus=1)(fn)
        pending: list[Any] = []
        for task in tasks:  # at most `workers` tasks in flight
            if len(pending) >= workers:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
            pending.append(remote.remote(task))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for future in as_completed([pool.submit(fn, task) for task in tasks]):
            yield future.result()


def _tasks(sa1b_dir: Path, cfg: ShardConfig, part_dir: Path) -> list[ConvertTask]:
    units = [(split, unit) for split, found in find_sources(sa1b_dir).items() for unit in found]
    return [
        ConvertTask(i, unit, split, part_dir, cfg.target_size, cfg.jpeg_quality, cfg.subset_fraction,
                    cfg.subset_ids_file, cfg.val_fraction)
        for i, (split, unit) in enumerate(units)
    ]


def _check_rejects(summaries: list[dict], cfg: ShardConfig) -> tuple[int, list[dict]]:
    accepted = sum(sum(s["samples"].values()) for s in summaries)
    rejected = [r for s in summaries for r in s["rejected"]]
    total = accepted + len(rejected)
    ratio = len(rejected) / max(total, 1)
    if ratio > cfg.max_reject_ratio or accepted == 0:
        examples = "; ".join(f"{r['source']}:{r['key']}: {r['reason']}" for r in rejected[:5])
        raise RejectRatioError(
            f"shard: {len(rejected)} of {total} inputs rejected ({ratio:.1%} > max_reject_ratio "
            f"{cfg.max_reject_ratio:.1%}); first reasons: {examples or 'no input selected'}"
        )
    for r in rejected[:20]:
        log.warning("shard: rejected %s %s: %s", r["source"], r["key"], r["reason"])
    if len(rejected) > 20:
        log.warning("shard: ... and %d more rejects (all listed in the manifest)", len(rejected) - 20)
    return accepted, rejected


def _part_samples(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        for key, members in iter_raw(path):
            yield {"__key__": key, **members}


def run(cfg: ShardConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    sa1b_dir = Path(inputs["data"].manifest["sa1b_dir"])
    part_dir = out / PARTS
    part_dir.mkdir(parents=True, exist_ok=True)
    tasks = _tasks(sa1b_dir, cfg, part_dir)
    resumed = {t.index for t in tasks if t.summary_path.is_file()}
    log.info("shard: %d input units from %s (%d done earlier), target %d px, %d workers",
             len(tasks), sa1b_dir, len(resumed), cfg.target_size, cfg.workers)
    start = time.perf_counter()
    summaries: list[dict] = []
    converted = 0  # images converted by this run (not earlier attempts)
    with tqdm(total=len(tasks), desc="shard", unit="tar") as progress:
        for summary in _map_unordered(convert_unit, tasks, cfg.workers, runtime):
            summaries.append(summary)
            converted += 0 if summary["index"] in resumed else sum(summary["samples"].values())
            progress.set_postfix(img_s=f"{converted / (time.perf_counter() - start):.1f}")
            progress.update(1)
    summaries.sort(key=lambda s: s["index"])
    accepted, rejected = _check_rejects(summaries, cfg)
    elapsed = time.perf_counter() - start
    log.info("shard: %d images converted in %.1fs (%.1f img/s), %d accepted in all, %d rejected",
             converted, elapsed, converted / max(elapsed, 1e-9), accepted, len(rejected))
    splits = {}
    for split in SPLITS:
        parts = [t.part_path(split) for t, s in zip(tasks, summaries) if s["samples"][split]]
        shards = write_shards(_part_samples(parts), out / split, cfg.max_count, cfg.max_size)
        splits[split] = {
            "shards": [{"path": f"{split}/{s.path.name}", "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                       for s in shards],
            "samples": sum(s.samples for s in shards),
        }
    shutil.rmtree(part_dir)
    return {
        "splits": splits,
        "target_size": cfg.target_size,
        "rejected": rejected,
        "dropped_masks": sum(s["dropped_masks"] for s in summaries),
        "inputs": len(tasks),
        "images_per_second": round(converted / max(elapsed, 1e-9), 2),
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
