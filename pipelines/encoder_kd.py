"""Stage `encoder_kd`: EdgeSAM phase 1, the student encoder learns the teacher's embeddings.

Trains `edgesam.tasks.encoder_kd.EncoderKDTask` on the embed artifact's training shards in
the shared loop (Ray Train), then measures the saved student (a complete EdgeSAM `Sam`
with the teacher's decoder) on the val split, against ground truth and the teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesam.artifacts import Artifact
from edgesam.config import EncoderKDConfig, RuntimeConfig
from edgesam.data.shards import list_shards
from edgesam.eval.datasets import shard_items
from edgesam.eval.miou import compare_with_teacher
from edgesam.models.edgesam import load_edgesam
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import EmbedShards
from edgesam.tasks.encoder_kd import STUDENT_FILE, EncoderKDTask, pass_on_init
from edgesam.train import fit, training_key, training_summary

STAGE = "encoder_kd"
UPSTREAM = ("embed", "teacher")

log = logging.getLogger("edgesam.pipelines.encoder_kd")


def runtime_key(cfg: EncoderKDConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return training_key(cfg.train, runtime)


def run(cfg: EncoderKDConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    embed = inputs["embed"]
    data = EmbedShards.from_artifact(embed)
    teacher = TeacherSource.from_artifact(inputs["teacher"])
    if cfg.train.epochs == 0:
        summary = pass_on_init(cfg, data.img_size, out)
    else:
        summary = fit(EncoderKDTask.from_config(cfg, data, teacher, runtime.seed), cfg.train, runtime, out)
    log.info("evaluating on %s val images", cfg.eval_images or "all")
    items = shard_items(list_shards(embed.path, "val"), cfg.eval_images)
    miou = compare_with_teacher(items, teacher.load(), {STAGE: load_edgesam(out / STUDENT_FILE)})
    log.info("val mIoU: %s", miou)
    return {"student": STUDENT_FILE, "backbone": cfg.backbone, "img_size": data.img_size,
            "train_samples": data.samples, **training_summary(summary), "miou": miou}


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
