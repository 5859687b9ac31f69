"""Stage `teacher`: the SAM whose knowledge is distilled.

With `kind` vit_h/vit_l/vit_b the stage verifies and loads the given SAM checkpoint and
records its SHA-256 (nothing big is copied: the manifest references the file). `kind:
reference` is the tiny SAM shipped in `data/reference_teacher/`, verified the same way and
checked against the benchmark it was trained on. With `kind: synthetic` it trains a tiny SAM at
the shards' size with SAM's own recipe (`edgesam.tasks.teacher`) and measures it on the val split.

    python -m pipelines teacher --profile smoke
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import RuntimeConfig, TeacherConfig
from edgesam.data.shards import list_shards
from edgesam.eval.datasets import shard_items
from edgesam.eval.miou import ground_truth_miou
from edgesam.models.reference import describe_reference
from edgesam.models.teacher import describe_sam_teacher
from edgesam.models.tiny_sam import load_tiny_sam, tiny_sam_config
from edgesam.tasks.teacher import CHECKPOINT, TeacherTask
from edgesam.train import fit, training_key, training_summary

STAGE = "teacher"
UPSTREAM = ("shard",)
REFERENCE_TEACHER = Path(__file__).resolve().parents[1] / "data" / "reference_teacher" / "reference_teacher.pt"

log = logging.getLogger("edgesam.pipelines.teacher")


def _train_reference(cfg: TeacherConfig, runtime: RuntimeConfig, shard: Artifact, out: Path) -> dict[str, Any]:
    task = TeacherTask.from_config(cfg, shard, runtime.seed)
    summary = fit(task, cfg.train, runtime, out)
    checkpoint = out / summary["files"]["checkpoint"]
    sam = load_tiny_sam(checkpoint)
    log.info("teacher: evaluating on the val split")
    val = ground_truth_miou(sam, shard_items(list_shards(shard.path, "val")))
    log.info("teacher: val box mIoU %.3f, point best-of-3 mIoU %.3f (%d annotations)",
             val["box_miou"], val["point_best_of_3_miou"], val["annotations"])
    return {"kind": "synthetic", "checkpoint": CHECKPOINT, "sha256": sha256_file(checkpoint),
            "arch": tiny_sam_config(sam), "img_size": task.img_size, "val": val, "train": training_summary(summary)}


def runtime_key(cfg: TeacherConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return training_key(cfg.train, runtime) if cfg.kind == "synthetic" else {}


def run(cfg: TeacherConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    shard = inputs["shard"]
    if cfg.kind == "synthetic":
        return _train_reference(cfg, runtime, shard, out)
    if cfg.kind == "reference":
        return describe_reference(cfg.checkpoint or REFERENCE_TEACHER, cfg.sha256, cfg.allow_unverified, shard.manifest)
    return describe_sam_teacher(cfg.kind, cfg.checkpoint, cfg.sha256, cfg.allow_unverified,
                                int(shard.manifest["target_size"]))


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
