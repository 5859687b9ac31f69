"""Stage `prompt_kd`: EdgeSAM phase 2, prompt-in-the-loop distillation.

Trains `edgesam.tasks.prompt_kd.PromptKDTask` from the phase-1 student, then puts the phase-2
student's val mIoU beside the teacher's and the phase-1 student's (measured again when
phase 1 used other val images).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesam.artifacts import Artifact, write_text_atomic
from edgesam.config import PromptKDConfig, RuntimeConfig
from edgesam.data.shards import list_shards
from edgesam.eval.datasets import shard_items
from edgesam.eval.miou import compare_with_teacher, records_jsonl
from edgesam.models.edgesam import load_edgesam
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import EmbedShards
from edgesam.tasks.prompt_kd import STUDENT_FILE, PromptKDTask
from edgesam.train import fit, training_key, training_summary

STAGE = "prompt_kd"
UPSTREAM = ("embed", "teacher", "encoder_kd")
VAL_IOUS = "val_ious.jsonl"

log = logging.getLogger("edgesam.pipelines.prompt_kd")


def runtime_key(cfg: PromptKDConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return training_key(cfg.train, runtime)


def run(cfg: PromptKDConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    embed, phase1 = inputs["embed"], inputs["encoder_kd"]
    data = EmbedShards.from_artifact(embed)
    teacher = TeacherSource.from_artifact(inputs["teacher"])
    phase1_student = phase1.path / phase1.manifest["student"]
    start = cfg.init or phase1_student
    summary = fit(PromptKDTask.from_config(cfg, data, start, teacher, runtime.seed), cfg.train, runtime, out)
    students = {STAGE: load_edgesam(out / STUDENT_FILE)}
    same_images = phase1.manifest["config"]["eval_images"] == cfg.eval_images
    if not same_images:
        students["encoder_kd"] = load_edgesam(phase1_student)
    items = shard_items(list_shards(embed.path, "val"), cfg.eval_images)
    records: list = []
    miou = compare_with_teacher(items, teacher.load(), students, records=records)
    write_text_atomic(out / VAL_IOUS, records_jsonl({"val": records}))  # for the ablations' intervals
    if same_images:
        miou["encoder_kd"] = phase1.manifest["miou"]["encoder_kd"]
    log.info("val mIoU: %s", miou)
    return {"student": STUDENT_FILE, "val_ious": VAL_IOUS, "img_size": data.img_size, "train_samples": data.samples,
            **training_summary(summary), "miou": miou}


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
