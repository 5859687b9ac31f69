"""Stage `export`: the deployable bundle of the phase-2 student (`edgesam.export.bundle.build_bundle`).

fp32 ONNX files checked against PyTorch (a parity break fails the stage, so no bundle with
broken files is committed), the int8 encoder calibrated on the shard artifact's images, fp16
encoder and decoder, the RPN head; each precision's mIoU on the val split beside fp32 and
its latency; the checkpoints, `config.json` (every file with its SHA-256) and `MODEL_CARD.md`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edgesam.artifacts import Artifact, write_text_atomic
from edgesam.config import ExportConfig, RuntimeConfig
from edgesam.data.shards import iter_samples, list_shards
from edgesam.export.bundle import build_bundle
from edgesam.eval.datasets import shard_items
from edgesam.export.onnx import export_coreml, fused_copy
from edgesam.models.edgesam import load_edgesam
from edgesam.models.rpn import load_rpn
from edgesam.export.model_card import model_card

STAGE = "export"
UPSTREAM = ("shard", "prompt_kd", "rpn", "evaluate")
COREML = "encoder.mlpackage"

log = logging.getLogger("edgesam.pipelines.export")


def run(cfg: ExportConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    checkpoint = inputs["prompt_kd"].path / inputs["prompt_kd"].manifest["student"]
    rpn_checkpoint = inputs["rpn"].path / inputs["rpn"].manifest["rpn"]
    sam = load_edgesam(checkpoint)
    calibration = (s.image for s in iter_samples(list_shards(inputs["shard"].path, cfg.calibration_split)))
    check = shard_items(list_shards(inputs["shard"].path, "val"), cfg.check_images, cfg.check_annotations)
    bundle = build_bundle(cfg, sam, checkpoint, load_rpn(rpn_checkpoint), rpn_checkpoint,
                          inputs["rpn"].manifest["merge"], calibration, check, out)
    coreml = (export_coreml(fused_copy(sam), out / COREML) if cfg.coreml
              else {"status": "skipped", "reason": "export.coreml is off"})
    log.info("CoreML: %s", coreml.get("reason", coreml["status"]))
    config = bundle["config"]
    write_text_atomic(out / "MODEL_CARD.md", model_card(config, inputs["evaluate"].manifest, bundle["parity"],
                                                        bundle["latency_ms"], coreml))
    files = {role: entry["file"] for role, entry in config["files"].items()}
    return {
        "files": [*files.values(), "config.json", "MODEL_CARD.md"] + ([COREML] if coreml["status"] == "exported" else []),
        "onnx": {r: f for r, f in files.items() if f.endswith(".onnx")}, "checkpoint": files["checkpoint"],
        "rpn": files["rpn_checkpoint"], "parity": bundle["parity"], "latency_ms": bundle["latency_ms"],
        "accuracy": config["accuracy"], "coreml": coreml,
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
