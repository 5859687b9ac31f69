"""Stage `evaluate`: prompted mIoU of teacher and students, the RPN prior, speed, report.

Datasets: the shard artifact's SA-1B-format val split (multi-granular: parts and whole
objects, up to `max_annotations_per_image` random objects per image), the data artifact's
COCO-format val JSON (whole objects, all of them) and any `extra_sets` (COCO/LVIS-format).
Models: the teacher, the phase-1 and phase-2 students, and on COCO-format sets the phase-2
student with the RPN granularity prior under both merge rules. Every protocol of
`evaluate.protocols` runs on the same encodings. Writes `metrics.json`, the per-annotation
IoUs (`ious.jsonl`), `report.md` and its plots, with the upstream stages' training curves.
Every model's results are also appended to the results ledger of the work dir
(`edgesam.eval.ledger`, run id `evaluate/<fingerprint>`); a ledger that cannot be written is
logged, never fails the stage.
"""

from __future__ import annotations

import logging
import platform
import sqlite3
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from edgesam.artifacts import Artifact, write_json_atomic, write_text_atomic
from edgesam.config import EvaluateConfig, RuntimeConfig
from edgesam.data.shards import list_shards
from edgesam.eval.benchmark import Benchmark, append_stage_results, combined_digest
from edgesam.eval.datasets import coco_items, shard_items
from edgesam.eval.ledger import Ledger, default_path
from edgesam.eval.engine import Segmenter, protocol
from edgesam.eval.miou import evaluate, records_jsonl
from edgesam.eval.speed import model_speed
from edgesam.eval.stats import comparisons
from edgesam.metrics import summarize
from edgesam.store.code import code_version, module_digests
from edgesam.store.files import sha256_of
from edgesam.models.edgesam import load_edgesam
from edgesam.models.rpn import PRIOR_RULES, load_rpn
from edgesam.eval.teacher_reuse import teacher_results
from edgesam.eval.report import TRAINING_STAGES, write_report
from edgesam.eval.tables import training_curve

STAGE = "evaluate"
UPSTREAM = ("data", "shard", "teacher", "encoder_kd", "prompt_kd", "rpn")
METRICS_FILE, IOUS_FILE = "metrics.json", "ious.jsonl"

log = logging.getLogger("edgesam.pipelines.evaluate")


def runtime_key(cfg: EvaluateConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    return {"seed": runtime.seed}  # random clicks and annotation subsets


def ledger_models(inputs: dict[str, Artifact], students: list[Segmenter], priors: list[Segmenter]
                  ) -> dict[str, tuple[str, str]]:
    """{model: (weights digest, backbone)} of every model evaluated, as the results ledger keys them."""
    teacher = inputs["teacher"].manifest
    digests = {s.name: sha256_of(inputs[s.name].path / inputs[s.name].manifest["student"]) for s in students}
    rpn = sha256_of(inputs["rpn"].path / inputs["rpn"].manifest["rpn"])
    backbone = students[-1].sam.image_encoder.backbone_name
    return ({"teacher": (teacher["sha256"] or teacher["checkpoint"], f"teacher ({teacher['kind']})")}
            | {s.name: (digests[s.name], s.sam.image_encoder.backbone_name) for s in students}
            | {p.name: (combined_digest(digests["prompt_kd"], rpn), f"{backbone} + RPN") for p in priors})


def run(cfg: EvaluateConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    phase1, phase2 = (load_edgesam(inputs[s].path / inputs[s].manifest["student"], fuse=True)
                      for s in ("encoder_kd", "prompt_kd"))
    rpn_manifest = inputs["rpn"].manifest
    rpn = load_rpn(inputs["rpn"].path / rpn_manifest["rpn"])
    models = [Segmenter("encoder_kd", phase1), Segmenter("prompt_kd", phase2)]
    priors = [Segmenter(f"prompt_kd+rpn:{name}", phase2, rpn, rule) for name, rule in PRIOR_RULES.items()]
    protocols = [protocol(name, cfg.refine_iters) for name in cfg.protocols]
    data = inputs["data"].manifest
    coco_sets = {"coco": (data["coco_val"], data["coco_images"])} | {k: tuple(map(str, v)) for k, v in cfg.extra_sets.items()}
    sets = {"sa1b": (partial(shard_items, list_shards(inputs["shard"].path, "val"), cfg.max_images,
                             cfg.max_annotations_per_image, runtime.seed), cfg.overlay_images)}
    sets |= {name: (partial(coco_items, annotations, images, cfg.max_images), 0) for name, (annotations, images) in coco_sets.items()}
    teacher = teacher_results(inputs, cfg, runtime.seed, sets, protocols)  # once per teacher and val data

    log.info("evaluating %s on the SA-1B-format val shards (%s)", ", ".join(m.name for m in models),
             ", ".join(cfg.protocols))
    records, overlays, _ = evaluate(models, sets["sa1b"][0](), "sa1b", protocols, runtime.seed, overlays=cfg.overlay_images)
    prior_stats = {}
    for name, (annotation_file, images) in coco_sets.items():
        log.info("evaluating on %s (%s), RPN off and on", name, annotation_file)
        found, _, stats = evaluate([*models, *priors], sets[name][0](), name, protocols, runtime.seed)
        for key in records:
            records[key] += found[key]
        prior_stats[name] = {model: asdict(s) for model, s in stats.items()}
    teacher.merge_into(records, overlays)
    miou = {key: summarize(value) for key, value in records.items()}
    intervals = {key: comparisons(value) for key, value in records.items()}
    write_text_atomic(out / IOUS_FILE, records_jsonl(records))
    bench = Benchmark.open(inputs["shard"].path, protocols[0].name, cfg.refine_iters, cfg.max_images,
                           cfg.max_annotations_per_image, runtime.seed)
    try:
        append_stage_results(Ledger(default_path(runtime.work_dir)), bench, records,
                             ledger_models(inputs, models, priors), cfg.refine_iters,
                             code_version(module_digests(f"pipelines.{STAGE}")), f"{STAGE}/{out.name}")
    except (sqlite3.Error, OSError) as exc:
        log.warning("results ledger not updated: %s", exc)

    log.info("measuring speed (%d repeats)", cfg.speed_repeats)
    speed = {"teacher": teacher.speed} | {m.name: model_speed(m.sam, cfg.speed_repeats) for m in models}
    speed["prompt_kd+rpn"] = model_speed(phase2, cfg.speed_repeats, rpn)
    chosen = f"prompt_kd+rpn:{rpn_manifest['merge']}"
    prior = {
        "merge": rpn_manifest["merge"], "proposals": rpn_manifest["proposals"], "clicks": prior_stats,
        "point_miou": {key: {"off": m["coco"]["prompt_kd"]["point"]["all"],
                             **{p.name.split(":")[1]: m["coco"][p.name]["point"]["all"] for p in priors}}
                       for key, m in miou.items()},
    }
    headline = protocols[0].name
    metrics = {
        "protocols": {p.name: asdict(p) for p in protocols}, "miou": miou, "comparisons": intervals, "speed": speed,
        "granularity_prior": prior,
        "backbone": phase2.image_encoder.backbone_name,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "headline": {
            "label": f"SA-1B val mIoU (box and point prompts, mean; protocol {headline})",
            "miou": {name: (v["box"]["all"] + v["point"]["all"]) / 2 for name, v in miou[headline]["sa1b"].items()},
        },
    }
    write_json_atomic(out / METRICS_FILE, metrics)
    files = write_report(metrics, overlays, out, {s: training_curve(inputs[s].manifest) for s in TRAINING_STAGES})
    log.info("COCO point mIoU (%s): RPN off %.3f, on (%s) %.3f; SA-1B box mIoU teacher %.3f, prompt_kd %.3f",
             headline, prior["point_miou"][headline]["off"], rpn_manifest["merge"],
             miou[headline]["coco"][chosen]["point"]["all"], miou[headline]["sa1b"]["teacher"]["box"]["all"],
             miou[headline]["sa1b"]["prompt_kd"]["box"]["all"])
    return {"metrics": METRICS_FILE, "ious": IOUS_FILE, "report": "report.md",
            "files": [METRICS_FILE, IOUS_FILE, *files], "miou": miou, "speed": speed, "granularity_prior": prior}


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
