"""Stage `shard`: SA-1B tars -> validated, resized WebDataset shards `train/` and `val/`.

Each input unit (a tar, or a directory of extracted pairs) is converted by a worker into a
part file under `out/.parts/`, streamed member by member, with a summary (counts, rejects)
written after the part: a unit with a summary is done, so a rerun after a kill skips it.
Units run in a process pool, or as Ray tasks when Ray is initialized or an address is
configured (the parts directory must then be on storage the Ray workers share). The parts
are then concatenated in input order into shards (`webdataset.ShardWriter`, fixed tar
metadata), so the same input and config give byte-identical shards whatever the worker
count or interruptions.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from edgesam.artifacts import Artifact, write_json_atomic
from edgesam.config import RuntimeConfig, ShardConfig
from edgesam.data.sa1b import BadSample, Rejected, convert, find_sources, id_fraction, iter_pairs, make_selector
from edgesam.data.shards import SPLITS, add_member, iter_raw, write_shards

STAGE = "shard"
UPSTREAM = ("data",)
PARTS = ".parts"

log = logging.getLogger("edgesam.pipelines.shard")


class RejectRatioError(RuntimeError):
    """Too many inputs were rejected: the input is probably not what it should be."""


@dataclass(frozen=True)
class UnitTask:
    index: int
    unit: Path
    split: str | None  # None: split by image id with val_fraction
    part_dir: Path
    cfg: ShardConfig

    @property
    def summary_path(self) -> Path:
        return self.part_dir / f"{self.index:06d}.json"

    def part_path(self, split: str) -> Path:
        return self.part_dir / f"{self.index:06d}.{split}.tar"


def shard_unit(task: UnitTask) -> dict[str, Any]:
    """Convert one input unit into per-split part tars; return (and store) its summary."""
    if task.summary_path.is_file():
        return json.loads(task.summary_path.read_text())
    start = time.perf_counter()
    select = make_selector(task.cfg.subset_fraction, task.cfg.subset_ids_file)
    parts: dict[str, tuple[tarfile.TarFile, Path]] = {}
    samples = {split: 0 for split in SPLITS}
    rejected: list[dict[str, str]] = []
    dropped = 0
    for item in iter_pairs(task.unit, select):
        if isinstance(item, Rejected):
            rejected.append(asdict(item))
            continue
        try:
            sample, lost = convert(item, task.cfg.target_size, task.cfg.jpeg_quality)
        except BadSample as error:
            rejected.append(asdict(Rejected(item.source, item.key, str(error))))
            continue
        split = task.split or ("val" if id_fraction(item.key, "val") < task.cfg.val_fraction else "train")
        if split not in parts:
            tmp = task.part_path(split).with_suffix(f".tmp-{os.getpid()}")
            parts[split] = (tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), tmp)
        tar = parts[split][0]
        add_member(tar, f"{item.key}.jpg", sample["jpg"])
        add_member(tar, f"{item.key}.json", sample["json"])
        samples[split] += 1
        dropped += lost
    for split, (tar, tmp) in parts.items():
        tar.close()
        os.replace(tmp, task.part_path(split))
    summary = {
        "index": task.index, "unit": str(task.unit), "samples": samples, "rejected": rejected,
        "dropped_masks": dropped, "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(task.summary_path, summary)
    return summary


def _map_ordered(fn: Callable[[UnitTask], dict], tasks: list[UnitTask], workers: int,
                 runtime: RuntimeConfig) -> Iterator[dict]:
    """fn over tasks in input order: inline, in a process pool, or as Ray tasks."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    import ray

    if ray.is_initialized() or runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        from edgesam.train.cluster import connect_ray

        connect_ray(runtime)
        remote = ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(t) for t in tasks[:workers]]
        queue = iter(tasks[workers:])
        while pending:
            done, pending = pending[0], pending[1:]  # in order; at most `workers` in flight
            yield ray.get(done)
            pending += [remote.remote(t) for t in itertools.islice(queue, 1)]
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(fn, tasks)


def _tasks(sa1b_dir: Path, cfg: ShardConfig, part_dir: Path) -> list[UnitTask]:
    units = [(split, unit) for split, found in find_sources(sa1b_dir).items() for unit in found]
    return [UnitTask(i, unit, split, part_dir, cfg) for i, (split, unit) in enumerate(units)]


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
    for r in rejected:
        log.warning("shard: rejected %s %s: %s", r["source"], r["key"], r["reason"])
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
    resumed = sum(t.summary_path.is_file() for t in tasks)
    log.info("shard: %d input units from %s (%d done earlier), target %d px, %d workers",
             len(tasks), sa1b_dir, resumed, cfg.target_size, cfg.workers)
    start = time.perf_counter()
    summaries: list[dict] = []
    with tqdm(total=len(tasks), desc="shard", unit="tar") as progress:
        for summary in _map_ordered(shard_unit, tasks, cfg.workers, runtime):
            summaries.append(summary)
            images = sum(sum(s["samples"].values()) for s in summaries)
            progress.set_postfix(img_s=f"{images / (time.perf_counter() - start):.1f}")
            progress.update(1)
    accepted, rejected = _check_rejects(summaries, cfg)
    elapsed = time.perf_counter() - start
    log.info("shard: %d images converted in %.1fs (%.1f img/s), %d rejected",
             accepted, elapsed, accepted / max(elapsed, 1e-9), len(rejected))
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
        "images_per_second": round(accepted / max(elapsed, 1e-9), 2),
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
