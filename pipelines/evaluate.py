"""Stage `evaluate`: prompted mIoU of teacher and students, the RPN prior, speed, report.

Datasets: the shard artifact's SA-1B-format val split (multi-granular: parts and whole
objects), the data artifact's COCO-format val JSON (whole objects, instance level) and any
`extra_sets` (COCO/LVIS-format). Models: the teacher, the phase-1 and phase-2 students, and
on COCO-format sets the phase-2 student with the RPN granularity prior. Writes
`metrics.json`, `report.md` and its plots.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from edgesam.artifacts import Artifact, write_json_atomic
from edgesam.config import EvaluateConfig, RuntimeConfig
from edgesam.data.shards import list_shards
from edgesam.eval.datasets import coco_items, shard_items
from edgesam.eval.engine import EvalProtocol, Segmenter
from edgesam.eval.miou import evaluate
from edgesam.eval.speed import model_speed
from edgesam.metrics import summarize
from edgesam.models.edgesam import load_edgesam
from edgesam.models.rpn import load_rpn
from edgesam.models.teacher import TeacherSource
from edgesam.report import write_report

STAGE = "evaluate"
UPSTREAM = ("data", "shard", "teacher", "encoder_kd", "prompt_kd", "rpn")
METRICS_FILE = "metrics.json"
RPN_MODEL = "prompt_kd+rpn"

log = logging.getLogger("edgesam.pipelines.evaluate")


def _student(artifact: Artifact):
    sam = load_edgesam(artifact.path / artifact.manifest["student"])
    sam.image_encoder.fuse()
    return sam


def run(cfg: EvaluateConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    teacher = TeacherSource.from_artifact(inputs["teacher"]).load()
    phase2 = _student(inputs["prompt_kd"])
    rpn = inputs["rpn"].manifest
    models = [Segmenter("teacher", teacher), Segmenter("encoder_kd", _student(inputs["encoder_kd"])),
              Segmenter("prompt_kd", phase2)]
    with_prior = Segmenter(RPN_MODEL, phase2, load_rpn(inputs["rpn"].path / rpn["rpn"]), k=rpn["k"],
                           score_threshold=rpn["score_threshold"], max_proposals=rpn["max_proposals"])
    protocol = EvalProtocol(cfg.point_mode, cfg.point_outputs, cfg.multimask_select, cfg.refine_iters)
    limits = {"max_images": cfg.max_images, "max_annotations": cfg.max_annotations_per_image}

    log.info("evaluating %s on the SA-1B-format val shards", ", ".join(m.name for m in models))
    sa1b = shard_items(list_shards(inputs["shard"].path, "val"), **limits)
    records, overlays = evaluate(models, sa1b, "sa1b", protocol, runtime.seed, overlays=cfg.overlay_images)
    data = inputs["data"].manifest
    coco_sets = {"coco": (data["coco_val"], data["coco_images"])} | {k: tuple(map(str, v)) for k, v in cfg.extra_sets.items()}
    for name, (annotation_file, images) in coco_sets.items():
        log.info("evaluating %s on %s (%s), RPN off and on", ", ".join(m.name for m in models), name, annotation_file)
        records += evaluate([*models, with_prior], coco_items(annotation_file, images, **limits), name, protocol,
                            runtime.seed)[0]
    miou = summarize(records)

    log.info("measuring speed (%d repeats)", cfg.speed_repeats)
    speed = {m.name: model_speed(m.sam, cfg.speed_repeats) for m in models}
    speed[RPN_MODEL] = model_speed(phase2, cfg.speed_repeats, with_prior.rpn)
    prior = {"k": rpn["k"], "proposals": rpn["proposals"], "point_miou_off": miou["coco"]["prompt_kd"]["point"]["all"],
             "point_miou_on": miou["coco"][RPN_MODEL]["point"]["all"]}
    metrics = {
        "protocol": asdict(protocol), "miou": miou, "speed": speed, "granularity_prior": prior,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "headline": {
            "label": "SA-1B val mIoU (box and point prompts, mean)",
            "miou": {name: (v["box"]["all"] + v["point"]["all"]) / 2 for name, v in miou["sa1b"].items()},
        },
    }
    write_json_atomic(out / METRICS_FILE, metrics)
    files = write_report(metrics, overlays, out)
    log.info("COCO point mIoU: RPN off %.3f, on %.3f; SA-1B box mIoU teacher %.3f, prompt_kd %.3f",
             prior["point_miou_off"], prior["point_miou_on"], miou["sa1b"]["teacher"]["box"]["all"],
             miou["sa1b"]["prompt_kd"]["box"]["all"])
    return {"metrics": METRICS_FILE, "report": "report.md", "files": [METRICS_FILE, *files], "miou": miou,
            "speed": speed, "granularity_prior": prior}


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
