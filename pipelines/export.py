"""Stage `export`: the deployable bundle of the phase-2 student.

Writes the fused encoder and both decoder interfaces as ONNX (`edgesam.export`), checks
them against PyTorch with onnxruntime (the stage fails on a parity break, so no bundle with
broken files is ever committed), measures onnxruntime vs PyTorch CPU latency, optionally
converts the encoder to CoreML, and copies the EdgeSAM and RPN checkpoints next to a
`config.json` and a `MODEL_CARD.md` carrying the evaluate stage's measured metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from skimage import data as sample_images

from edgesam.artifacts import Artifact, copy_atomic, write_json_atomic, write_text_atomic
from edgesam.config import ExportConfig, RuntimeConfig
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD, preprocess
from edgesam.export import (COMPACT_INPUTS, ONNX_FILES, SAM_DECODER_INPUTS, check_parity, export_coreml, export_onnx,
                            fused_copy, latency)
from edgesam.models.edgesam import edgesam_config, load_edgesam
from edgesam.report import model_card

STAGE = "export"
UPSTREAM = ("prompt_kd", "rpn", "evaluate")
CHECKPOINT, RPN_CHECKPOINT, COREML = "edgesam.pt", "rpn.pt", "encoder.mlpackage"

log = logging.getLogger("edgesam.pipelines.export")


def run(cfg: ExportConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    checkpoint = inputs["prompt_kd"].path / inputs["prompt_kd"].manifest["student"]
    rpn = inputs["rpn"].manifest
    sam = load_edgesam(checkpoint)
    fused = fused_copy(sam)
    log.info("exporting ONNX (opset %d) to %s", cfg.opset, out)
    files = export_onnx(fused, out, cfg.opset)
    photo = sample_images.coffee()  # a real, non-square photo
    image, _ = preprocess(photo, fused.image_encoder.img_size)
    parity = check_parity(fused, files, image[None], photo.shape[:2], cfg.parity_atol, cfg.parity_rtol)
    with torch.no_grad():
        parity["fusion_max_abs_diff"] = float((fused.image_encoder(image[None]) - sam.image_encoder(image[None])).abs().max())
    log.info("ONNX parity ok: %s", {part: max(v["max_abs_diff"] for v in parity[part].values())
                                    for part in ("encoder", "decoder_sam", "decoder_edgesam")})
    timings = latency(fused, files, cfg.latency_repeats)
    log.info("CPU latency ms: %s", json.dumps(timings))
    coreml = export_coreml(fused, out / COREML) if cfg.coreml else {"status": "skipped", "reason": "export.coreml is off"}
    log.info("CoreML: %s", coreml.get("reason", coreml["status"]))

    copy_atomic(checkpoint, out / CHECKPOINT)
    copy_atomic(inputs["rpn"].path / rpn["rpn"], out / RPN_CHECKPOINT)
    config = {
        "model": edgesam_config(sam), "img_size": sam.image_encoder.img_size,
        "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD), "mask_threshold": sam.mask_threshold,
        "rpn": {"merge": rpn["merge"]},
        "onnx": {"opset": cfg.opset, "files": ONNX_FILES, "decoder_sam_inputs": list(SAM_DECODER_INPUTS),
                 "decoder_edgesam_inputs": list(COMPACT_INPUTS)},
    }
    write_json_atomic(out / "config.json", config)
    names = {**ONNX_FILES, "checkpoint": CHECKPOINT, "rpn": RPN_CHECKPOINT}
    write_text_atomic(out / "MODEL_CARD.md", model_card(config["model"], names, inputs["evaluate"].manifest, parity,
                                                        timings, coreml))
    return {
        "files": [*ONNX_FILES.values(), CHECKPOINT, RPN_CHECKPOINT, "config.json", "MODEL_CARD.md"]
        + ([COREML] if coreml["status"] == "exported" else []),
        "onnx": ONNX_FILES, "checkpoint": CHECKPOINT, "rpn": RPN_CHECKPOINT, "parity": parity,
        "latency_ms": timings, "coreml": coreml,
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
