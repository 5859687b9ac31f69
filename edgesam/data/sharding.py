"""From input units (SA-1B tars or directories) to shards: conversion tasks, parallel map, rejects.

Each unit is converted by `edgesam.data.sa1b.convert_unit` (torch-free) into part tars and a
summary; a unit with a summary is done. Units run inline, in a process pool, or as Ray
tasks when Ray is initialized or an address is configured (the part directory must then be
on storage the Ray workers share).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator

from edgesam.config import RuntimeConfig, ShardConfig
from edgesam.data.sa1b import ConvertTask, find_sources
from edgesam.data.shards import iter_raw

log = logging.getLogger("edgesam.data.sharding")


class RejectRatioError(RuntimeError):
    """Too many inputs were rejected: the input is probably not what it should be."""


def convert_tasks(sa1b_dir: Path, cfg: ShardConfig, part_dir: Path) -> list[ConvertTask]:
    """One conversion task per input unit, in input order."""
    units = [(split, unit) for split, found in find_sources(sa1b_dir).items() for unit in found]
    return [
        ConvertTask(i, unit, split, part_dir, cfg.target_size, cfg.jpeg_quality, cfg.subset_fraction,
                    cfg.subset_ids_file, cfg.val_fraction)
        for i, (split, unit) in enumerate(units)
    ]


def map_unordered(fn: Callable[[ConvertTask], dict], tasks: list[ConvertTask], workers: int,
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


def check_rejects(summaries: list[dict], cfg: ShardConfig) -> tuple[int, list[dict]]:
    """(accepted images, rejects); raises `RejectRatioError` past `cfg.max_reject_ratio`."""
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


def part_samples(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of part tars, in order."""
    for path in paths:
        for key, members in iter_raw(path):
            yield {"__key__": key, **members}
