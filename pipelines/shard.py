"""Stage `shard`: SA-1B tars and COCO/LVIS sources -> validated, resized WebDataset shards.

Input units are converted in parallel into part files under `out/.parts/`
(`edgesam.data.sharding`); a unit with a summary is done, so a rerun after a kill skips it.
The parts are then concatenated in input order into shards (`webdataset.ShardWriter`, fixed
tar metadata), so the same input and config give byte-identical shards whatever the worker
count or interruptions.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgesam.artifacts import Artifact
from edgesam.config import RuntimeConfig, ShardConfig
from edgesam.data.sharding import check_rejects, convert_tasks, map_unordered, part_samples
from edgesam.data.shards import write_shards
from edgesam.data.units import SPLITS, convert_unit

STAGE = "shard"
UPSTREAM = ("data",)
PARTS = ".parts"

log = logging.getLogger("edgesam.pipelines.shard")


def run(cfg: ShardConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    data = inputs["data"].manifest
    part_dir = out / PARTS
    part_dir.mkdir(parents=True, exist_ok=True)
    tasks = convert_tasks(data, cfg, part_dir)
    resumed = {t.index for t in tasks if t.summary_path.is_file()}
    sources = [p for p in [data.get("sa1b_dir"), *(s["annotations"] for s in data.get("coco_sources", []))] if p]
    log.info("shard: %d input units from %s (%d done earlier), target %d px, %d workers",
             len(tasks), ", ".join(sources), len(resumed), cfg.target_size, cfg.workers)
    start = time.perf_counter()
    summaries: list[dict] = []
    converted = 0  # images converted by this run (not earlier attempts)
    with tqdm(total=len(tasks), desc="shard", unit="unit", disable=None) as progress:
        for summary in map_unordered(convert_unit, tasks, cfg.workers, runtime):
            summaries.append(summary)
            converted += 0 if summary["index"] in resumed else sum(summary["samples"].values())
            progress.set_postfix(img_s=f"{converted / (time.perf_counter() - start):.1f}")
            progress.update(1)
    summaries.sort(key=lambda s: s["index"])
    accepted, accounting = check_rejects(summaries, cfg)
    elapsed = time.perf_counter() - start
    log.info("shard: %d images converted in %.1fs (%.1f img/s), %d accepted in all, %d rejected, %d repaired",
             converted, elapsed, converted / max(elapsed, 1e-9), accepted, len(accounting["rejected"]),
             len(accounting["repaired"]))
    splits = {}
    for split in SPLITS:
        parts = [t.part_path(split) for t, s in zip(tasks, summaries) if s["samples"][split]]
        shards = write_shards(part_samples(parts), out / split, cfg.max_count, cfg.max_size)
        splits[split] = {
            "shards": [{"path": f"{split}/{s.path.name}", "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                       for s in shards],
            "samples": sum(s.samples for s in shards),
        }
    shutil.rmtree(part_dir)
    return {"splits": splits, "target_size": cfg.target_size, **accounting, "inputs": len(tasks),
            "data_checksum": inputs["data"].manifest.get("checksum"),  # the embedded benchmark's version
            "images_per_second": round(converted / max(elapsed, 1e-9), 2)}


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
