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
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage import data as sample_images

from edgesam.artifacts import Artifact, write_json_atomic
from edgesam.config import ExportConfig, RuntimeConfig
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD, preprocess
from edgesam.evaluation import model_speed
from edgesam.export import (
    COMPACT_INPUTS,
    COMPACT_OUTPUTS,
    SAM_DECODER_INPUTS,
    SAM_DECODER_OUTPUTS,
    check_parity,
    export_compact_decoder,
    export_coreml,
    export_encoder,
    export_sam_decoder,
    fused_copy,
    ort_latency_ms,
)
from edgesam.models.edgesam import edgesam_config, load_edgesam
from edgesam.report import miou_tables, speed_table

STAGE = "export"
UPSTREAM = ("prompt_kd", "rpn", "evaluate")
FILES = {"encoder": "encoder.onnx", "decoder_sam": "decoder_sam.onnx", "decoder_edgesam": "decoder_edgesam.onnx"}
CHECKPOINT, RPN_CHECKPOINT, COREML = "edgesam.pt", "rpn.pt", "encoder.mlpackage"

log = logging.getLogger("edgesam.pipelines.export")


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def latency(sam, files: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    """Median CPU latency (ms) of encoder and compact decoder: onnxruntime and PyTorch eager."""
    size = sam.image_encoder.img_size
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    grid = sam.prompt_encoder.image_embedding_size
    feeds = {"image_embeddings": np.zeros((1, 256, *grid), np.float32),
             "point_coords": np.array([[[size / 2, size / 2], [0, 0]]], np.float32),
             "point_labels": np.array([[1, -1]], np.float32)}
    eager = model_speed(sam, repeats)
    return {
        "onnxruntime": {"encoder_ms": ort_latency_ms(files["encoder"], {"image": image}, repeats),
                        "decoder_ms": ort_latency_ms(files["decoder_edgesam"], feeds, repeats)},
        "pytorch": {"encoder_ms": eager["encoder_ms"], "decoder_ms": eager["decoder_ms"]},
    }


def model_card(config: dict[str, Any], evaluation: dict[str, Any], parity: dict[str, Any],
               timings: dict[str, dict[str, float]], coreml: dict[str, Any]) -> str:
    prior = evaluation["granularity_prior"]
    worst = {part: max(v["max_abs_diff"] for v in parity[part].values())
             for part in ("encoder", "decoder_sam", "decoder_edgesam")}
    lines = [
        "# EdgeSAM model card", "",
        f"Student: `{config['backbone']}` encoder (fused) + SAM's prompt encoder and mask decoder, "
        f"input {config['img_size']} x {config['img_size']}, distilled with prompt-in-the-loop KD (EdgeSAM, "
        "arXiv 2312.06660). Optional granularity prior: an RPN whose k-nearest proposals around a click "
        f"become a box prompt (k = {prior['k']}).", "",
        "## Files", "",
        f"- `{FILES['encoder']}`: `image` (1, 3, S, S), resized so the longest side is S, normalized with mean "
        f"{list(PIXEL_MEAN)} and std {list(PIXEL_STD)}, zero-padded bottom-right -> `image_embeddings`.",
        f"- `{FILES['decoder_sam']}`: segment-anything's ONNX interface ({', '.join(SAM_DECODER_INPUTS)} -> "
        f"{', '.join(SAM_DECODER_OUTPUTS)}).",
        f"- `{FILES['decoder_edgesam']}`: EdgeSAM's compact interface ({', '.join(COMPACT_INPUTS)} -> "
        f"{', '.join(COMPACT_OUTPUTS)}: four low-res mask logits and their predicted IoU).",
        "- Point coordinates are in the resized frame; labels 1 / 0 / 2, 3 (box corners) / -1 (padding; add one "
        "padding point when there is no box).",
        f"- `{CHECKPOINT}` (`edgesam.models.load_edgesam`), `{RPN_CHECKPOINT}` (`edgesam.models.rpn.load_rpn`), "
        "`config.json`.",
        f"- CoreML: {coreml.get('file', coreml.get('reason', coreml['status']))}.", "",
        "## Measured accuracy (evaluate stage)", "", *miou_tables(evaluation["miou"]),
        "Granularity prior on COCO-format instance masks, point prompts: mIoU "
        f"{prior['point_miou_off']:.3f} without the RPN, {prior['point_miou_on']:.3f} with it. "
        f"RPN proposals: box AP {prior['proposals']['ap']:.3f}, AR@100 {prior['proposals']['ar100']:.3f}.", "",
        "## Speed (evaluate stage, PyTorch eager, this machine)", "", *speed_table(evaluation["speed"]), "",
        "## ONNX", "",
        f"onnxruntime vs PyTorch parity (tolerance |diff| <= {parity['atol']} + {parity['rtol']} |value|): "
        + ", ".join(f"{part} max |diff| {value:.2e}" for part, value in worst.items()) + ".", "",
        "| runtime (CPU) | encoder ms | decoder ms |", "|---|---|---|",
        *[f"| {name} | {t['encoder_ms']:.1f} | {t['decoder_ms']:.1f} |" for name, t in timings.items()], "",
        "## Limitations", "",
        "Trained and measured on the data this pipeline ran on (the embedded synthetic benchmark unless real "
        "SA-1B / COCO paths were configured); numbers above are those measurements, not the paper's.", "",
    ]
    return "\n".join(lines)


def run(cfg: ExportConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    student_artifact, rpn_artifact = inputs["prompt_kd"], inputs["rpn"]
    checkpoint = student_artifact.path / student_artifact.manifest["student"]
    rpn_manifest = rpn_artifact.manifest
    evaluation = inputs["evaluate"].manifest
    sam = load_edgesam(checkpoint)
    fused = fused_copy(sam)
    files = {name: out / file for name, file in FILES.items()}
    log.info("exporting ONNX (opset %d) to %s", cfg.opset, out)
    export_encoder(fused, files["encoder"], cfg.opset)
    export_sam_decoder(fused, files["decoder_sam"], cfg.opset)
    export_compact_decoder(fused, files["decoder_edgesam"], cfg.opset)

    photo = sample_images.coffee()  # a real, non-square photo
    image, _ = preprocess(photo, fused.image_encoder.img_size)
    parity = check_parity(fused, files, image[None], photo.shape[:2], cfg.parity_atol, cfg.parity_rtol)
    with torch.no_grad():
        parity["fusion_max_abs_diff"] = float((fused.image_encoder(image[None]) - sam.image_encoder(image[None])).abs().max())
    log.info("ONNX parity ok: encoder %.2e, SAM decoder %.2e, compact decoder %.2e (max |diff|)",
             parity["encoder"]["image_embeddings"]["max_abs_diff"],
             max(v["max_abs_diff"] for v in parity["decoder_sam"].values()),
             max(v["max_abs_diff"] for v in parity["decoder_edgesam"].values()))
    timings = latency(fused, files, cfg.latency_repeats)
    log.info("CPU latency ms: %s", json.dumps(timings))

    coreml = export_coreml(fused, out / COREML) if cfg.coreml else {"status": "skipped", "reason": "export.coreml is off"}
    log.info("CoreML: %s", coreml.get("reason", coreml["status"]))

    _copy(checkpoint, out / CHECKPOINT)
    _copy(rpn_artifact.path / rpn_manifest["rpn"], out / RPN_CHECKPOINT)
    config = {
        "model": edgesam_config(sam), "img_size": sam.image_encoder.img_size,
        "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD), "mask_threshold": sam.mask_threshold,
        "rpn": {"k": rpn_manifest["k"], "score_threshold": rpn_manifest["score_threshold"],
                "max_proposals": rpn_manifest["max_proposals"]},
        "onnx": {"opset": cfg.opset, "files": FILES, "decoder_sam_inputs": list(SAM_DECODER_INPUTS),
                 "decoder_edgesam_inputs": list(COMPACT_INPUTS)},
    }
    write_json_atomic(out / "config.json", config)
    _write_text(out / "MODEL_CARD.md", model_card(config["model"], evaluation, parity, timings, coreml))
    return {
        "files": [*FILES.values(), CHECKPOINT, RPN_CHECKPOINT, "config.json", "MODEL_CARD.md"]
        + ([COREML] if coreml["status"] == "exported" else []),
        "onnx": FILES,
        "checkpoint": CHECKPOINT,
        "rpn": RPN_CHECKPOINT,
        "parity": parity,
        "latency_ms": timings,
        "coreml": coreml,
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
