"""From input units to shards: conversion tasks, parallel map, reject and repair accounting.

Units are SA-1B tars or directories (`edgesam.data.sa1b`) and slices of COCO sources
(`edgesam.data.coco_units`); each is converted by `edgesam.data.units.convert_unit`
(torch-free) into part tars and a summary; a unit with a summary is done. Units run inline,
in a process pool, or as Ray tasks when Ray is initialized or an address is configured (the
part directory must then be on storage the Ray workers share).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator

from edgesam.config import RuntimeConfig, ShardConfig
from edgesam.data.coco_units import coco_units
from edgesam.data.sa1b import ConvertTask, find_sources
from edgesam.data.shards import iter_raw
from edgesam.data.units import Unit, make_selector

log = logging.getLogger("edgesam.data.sharding")


class RejectRatioError(RuntimeError):
    """Too many inputs were rejected: the input is probably not what it should be."""


def convert_tasks(data: dict[str, Any], cfg: ShardConfig, part_dir: Path) -> list[Unit]:
    """One task per input unit of the data manifest: SA-1B units, then each COCO source's."""
    common = {"part_dir": part_dir, "target_size": cfg.target_size, "jpeg_quality": cfg.jpeg_quality,
              "val_fraction": cfg.val_fraction}
    tasks: list[Unit] = []
    if data.get("sa1b_dir"):
        units = [(split, unit) for split, found in find_sources(data["sa1b_dir"]).items() for unit in found]
        tasks += [ConvertTask(index=i, unit=unit, split=split, subset_fraction=cfg.subset_fraction,
                              subset_ids_file=cfg.subset_ids_file, **common) for i, (split, unit) in enumerate(units)]
    select = make_selector(cfg.subset_fraction, cfg.subset_ids_file)
    for source in data.get("coco_sources", []):
        tasks += coco_units(source, len(tasks), cfg.coco_unit_images, select, crowd=cfg.crowd, **common)
    if not tasks:
        raise FileNotFoundError("shard: the data manifest names neither sa1b_dir nor coco_sources")
    return tasks


def map_unordered(fn: Callable[[Unit], dict], tasks: list[Unit], workers: int,
                  runtime: RuntimeConfig) -> Iterator[dict]:
    """fn over tasks, results as they complete: inline, in a process pool, or as Ray tasks."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    import ray

    if ray.is_initialized() or runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        from edgesam.cluster import connect_ray

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


def check_rejects(summaries: list[dict], cfg: ShardConfig) -> tuple[int, dict[str, Any]]:
    """(accepted images, the manifest's accounting: rejects, repairs, counts).

    Raises `RejectRatioError` when rejected images / images or rejected annotations /
    annotations passes `cfg.max_reject_ratio`, or nothing is accepted.
    """
    accepted = sum(sum(s["samples"].values()) for s in summaries)
    kept = sum(s["annotations"] for s in summaries)
    rejected = [r for s in summaries for r in s["rejected"]]
    per_annotation = sum("annotation" in r for r in rejected)
    ratios = {"images": (len(rejected) - per_annotation, accepted), "annotations": (per_annotation, kept)}
    for level, (bad, good) in ratios.items():
        ratio = bad / max(bad + good, 1)
        if ratio > cfg.max_reject_ratio or accepted == 0:
            examples = "; ".join(f"{r['source']}:{r['key']}: {r['reason']}" for r in rejected[:5])
            raise RejectRatioError(
                f"shard: {bad} of {bad + good} {level} rejected ({ratio:.1%} > max_reject_ratio "
                f"{cfg.max_reject_ratio:.1%}); first reasons: {examples or 'no input selected'}"
            )
    for r in rejected[:20]:
        log.warning("shard: rejected %s %s: %s", r["source"], r["key"], r["reason"])
    if len(rejected) > 20:
        log.warning("shard: ... and %d more rejects (all listed in the manifest)", len(rejected) - 20)
    repaired = [r for s in summaries for r in s["repaired"]]
    if repaired:
        log.info("shard: %d annotations repaired (listed in the manifest), e.g. %s", len(repaired),
                 repaired[0]["reason"])
    return accepted, {
        "rejected": rejected, "repaired": repaired, "annotations": kept,
        **{k: sum(s[k] for s in summaries) for k in ("dropped_masks", "crowd_skipped")},
    }


def part_samples(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The WebDataset samples of part tars, in order."""
    for path in paths:
        for key, members in iter_raw(path):
            yield {"__key__": key, **members}
