"""Stage `rpn`: the granularity prior, trained on COCO-format boxes on the frozen student.

Trains `edgesam.tasks.rpn.RPNTask` on the data artifact's COCO-format instances JSON (the
embedded benchmark's whole objects, or real COCO through `data.coco_*`), then scores its
proposals on the val JSON with pycocotools' COCOeval, class-agnostic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesam.artifacts import Artifact
from edgesam.config import RPNConfig, RuntimeConfig
from edgesam.eval.proposals import class_agnostic_box_eval, rpn_detections
from edgesam.models.edgesam import load_edgesam
from edgesam.models.rpn import load_rpn
from edgesam.tasks.rpn import RPN_FILE, RPNTask, predict_settings
from edgesam.train import fit, training_key, training_summary

STAGE = "rpn"
UPSTREAM = ("data", "prompt_kd")

log = logging.getLogger("edgesam.pipelines.rpn")


def runtime_key(cfg: RPNConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return training_key(cfg.train, runtime)


def run(cfg: RPNConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    data, prompt_kd = inputs["data"].manifest, inputs["prompt_kd"]
    student = prompt_kd.path / prompt_kd.manifest["student"]
    img_size = int(prompt_kd.manifest["img_size"])
    coco_train, coco_val, images = data.get("coco_train"), data.get("coco_val"), data.get("coco_images")
    if not (coco_train and coco_val and images):
        raise ValueError(
            f"the rpn stage trains on COCO-format boxes, but the data artifact {inputs['data'].path} has none: "
            "set data.coco_train, data.coco_val and data.coco_images (instances JSONs and their image directory)"
        )
    task = RPNTask.from_config(cfg, student, coco_train, images, img_size, runtime.seed)
    log.info("training the RPN on %d images of %s (student %s, %d px)", task.samples, coco_train, student, img_size)
    summary = fit(task, cfg.train, runtime, out)
    sam = load_edgesam(student, fuse=True)
    log.info("measuring proposals on %s", coco_val)
    detections = rpn_detections(sam, load_rpn(out / RPN_FILE), coco_val, images)
    quality = class_agnostic_box_eval(coco_val, detections)
    log.info("RPN on val: box AP %.3f, AP50 %.3f, AR@100 %.3f", quality["ap"], quality["ap50"], quality["ar100"])
    return {"rpn": RPN_FILE, "student": str(student), "img_size": img_size, "train_samples": task.samples,
            **training_summary(summary), "proposals": quality, **predict_settings(cfg)}


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
