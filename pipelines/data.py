"""Stage `data`: generate the embedded benchmark, or reference the user's SA-1B and COCO.

With neither `data.sa1b_path` nor `data.coco_sources` set the benchmark is generated into the
artifact (SA-1B tars under `sa1b/{train,val}/`, COCO JSON and images under `coco/`,
`DATASET_CARD.md`). Otherwise nothing is copied: the manifest points at the user's paths
after checking they exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesam.artifacts import Artifact
from edgesam.config import DataConfig, RuntimeConfig
from edgesam.data.coco_units import rpn_defaults
from edgesam.data.sa1b import find_sources
from edgesam.data.synth import write_benchmark

STAGE = "data"
UPSTREAM: tuple[str, ...] = ()

log = logging.getLogger("edgesam.pipelines.data")


def _existing(path: Path | None, what: str, kind: str) -> str | None:
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    ok = path.is_file() if kind == "file" else path.is_dir()
    if not ok:
        raise FileNotFoundError(f"data.{what} = {path}: no such {kind}")
    return str(path)


def reference_manifest(cfg: DataConfig) -> dict[str, Any]:
    """Manifest fields pointing at user-provided SA-1B / COCO paths, after checking them."""
    counts: dict[str, int] = {}
    sa1b_dir = _existing(cfg.sa1b_path, "sa1b_path", "directory")
    if sa1b_dir:
        counts = {split or "unsplit": len(units) for split, units in find_sources(sa1b_dir).items()}
        log.info("data: using SA-1B at %s (%s)", sa1b_dir, ", ".join(f"{s}: {n} inputs" for s, n in counts.items()))
    sources = [{"name": s.name, "split": s.split,
                "annotations": _existing(s.annotations, f"coco_sources[{i}].annotations", "file"),
                "images": _existing(s.images, f"coco_sources[{i}].images", "directory")}
               for i, s in enumerate(cfg.coco_sources)]
    rpn = rpn_defaults(sources)
    return {
        "sa1b_dir": sa1b_dir,
        "coco_sources": sources,
        "coco_train": _existing(cfg.coco_train, "coco_train", "file") or rpn.get("coco_train"),
        "coco_val": _existing(cfg.coco_val, "coco_val", "file") or rpn.get("coco_val"),
        "coco_images": _existing(cfg.coco_images, "coco_images", "directory") or rpn.get("coco_images"),
        "inputs": counts,
        "synthetic": False,
    }


def run(cfg: DataConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    if cfg.sa1b_path is None and not cfg.coco_sources:
        log.info("data: generating the embedded benchmark (%d train + %d val images)", cfg.num_train, cfg.num_val)
        return write_benchmark(out, cfg)
    return reference_manifest(cfg)


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
