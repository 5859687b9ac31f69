"""The exported bundle of the export stage: every file, checked, listed in config.json.

`build_bundle` writes the fp32 ONNX files (parity with PyTorch or the stage fails), the int8
encoder (per-tensor and per-channel weights both calibrated and measured, the better kept
unless one is configured) and decoder (dynamic int8 weights), the fp16 encoder and decoder,
the RPN head, the checkpoints, and measures each ONNX precision through the evaluation engine (`Segmenter.segment` with its
default protocol, on the shard artifact's val split, beside the PyTorch model on the same
prompts) and with onnxruntime latency.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from segment_anything.modeling import Sam
from skimage import data as sample_images

from edgesam.artifacts import copy_atomic, write_json_atomic
from edgesam.client.bundle import CHECKPOINT, CONFIG, FORMAT, RPN_CHECKPOINT, VERSION, file_entry
from edgesam.config import ExportConfig
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD, preprocess
from edgesam.eval.datasets import EvalItem
from edgesam.eval.engine import EvalProtocol, Segmenter, protocol
from edgesam.eval.miou import evaluate
from edgesam.eval.speed import model_speed
from edgesam.export.onnx_backend import onnx_segmenter
from edgesam.export.onnx import (COMPACT_INPUTS, DECODER_INPUTS, SAM_DECODER_INPUTS, check_parity, export_onnx,
                            fused_copy, ort_latency_ms, session)
from edgesam.client.prior import PRE_NMS_TOP
from edgesam.client.transforms import decoder_feeds, prompt_arrays
from edgesam.export.quantize import prepare_encoder, quantize_decoder, quantize_encoder, to_fp16
from edgesam.metrics import summarize
from edgesam.models.edgesam import edgesam_config
from edgesam.models.rpn import PRIOR_RULES, RPN

log = logging.getLogger("edgesam.export.bundle")
DESCRIPTIONS = {
    "encoder": "image (1, 3, S, S) -> image_embeddings, features_s8/s16/s32",
    "decoder": "N prompt sets per call -> scores (N, 4), low-res masks (N, 4, S/4, S/4); static shapes",
    "decoder_sam": "segment-anything's SamOnnxModel interface (masks at orig_im_size)",
    "decoder_edgesam": "EdgeSAM's compact interface (one prompt set, no mask input)",
    "rpn_onnx": "RPN head on features_s8/s16/s32 -> rpn_scores (L,), rpn_boxes (L, 4)",
}


def encoder_inputs(images: Iterable[np.ndarray], img_size: int) -> list[np.ndarray]:
    """Encoder inputs (1, 3, S, S) float32 of uint8 RGB images (int8 calibration)."""
    return [preprocess(image, img_size)[0][None].numpy() for image in images]


def _miou(sam: Sam, segmenters: list[Segmenter], items: Iterable[EvalItem], check: EvalProtocol
          ) -> dict[str, dict[str, float]]:
    """Box and point mIoU per segmenter on `items` under the `check` protocol."""
    records = evaluate([Segmenter("pytorch", sam), *segmenters], items, "val", [check])[0][check.name]
    if not records:
        raise ValueError("checking the exported files needs val images with annotated objects; found none")
    miou = summarize(records)["val"]
    return {name: {"box": v["box"]["all"], "point": v["point"]["all"], "annotations": v["box"]["count"]}
            for name, v in miou.items()}


def _feeds(sam: Sam, boxes: int) -> dict[str, np.ndarray]:
    """`decoder.onnx` inputs of `boxes` copies of one box on a random embedding (latency only)."""
    size, (h, w) = sam.image_encoder.img_size, sam.prompt_encoder.image_embedding_size
    box = np.repeat([[0.2 * size, 0.25 * size, 0.7 * size, 0.8 * size]], boxes, 0)
    embedding = np.random.default_rng(0).standard_normal((1, 256, h, w), np.float32)
    return decoder_feeds(embedding, *prompt_arrays(None, None, box))


def file_latency(sam: Sam, role: str, path: Path, repeats: int) -> dict[str, float]:
    """Median onnxruntime ms of a bundle file: encoders on one image, decoders on 1 (and 16) boxes."""
    size = sam.image_encoder.img_size
    if role.startswith("encoder"):
        return {"image": ort_latency_ms(path, {"image": np.zeros((1, 3, size, size), np.float32)}, repeats)}
    inputs = {i.name: i.shape for i in session(path).get_inputs()}
    if role == "rpn_onnx":
        return {"image": ort_latency_ms(path, {name: np.zeros(shape, np.float32) for name, shape in inputs.items()},
                                        repeats)}
    if role in ("decoder", "decoder_int8", "decoder_fp16"):
        return {"1_box": ort_latency_ms(path, _feeds(sam, 1), repeats),
                "16_boxes": ort_latency_ms(path, _feeds(sam, 16), repeats)}
    feeds = {name: value for name, value in _feeds(sam, 1).items() if name in inputs}
    if role == "decoder_sam":
        feeds["orig_im_size"] = np.array([size, size], np.float32)
    return {"1_box": ort_latency_ms(path, feeds, repeats)}


def _int8(fused: Sam, cfg: ExportConfig, calibration: list[np.ndarray], tmp: Path) -> dict[str, Path]:
    """The int8 candidates to measure: per-tensor and / or per-channel weights."""
    modes = ("per_tensor", "per_channel") if cfg.int8_weights == "auto" else (cfg.int8_weights,)
    prepared = prepare_encoder(fused, tmp, cfg.opset)
    out = {}
    for mode in modes:
        out[mode] = tmp / f"encoder_int8_{mode}.onnx"
        log.info("int8 encoder, %s weights, %s calibration on %d images", mode, cfg.calibration_method, len(calibration))
        quantize_encoder(prepared, out[mode], calibration, mode == "per_channel", cfg.calibration_method)
    return out


def _precision_checks(fused: Sam, cfg: ExportConfig, files: dict[str, Path], calibration: list[np.ndarray],
                      items: Iterable[EvalItem], check: EvalProtocol, tmp: Path
                      ) -> tuple[dict[str, Path], dict[str, Any]]:
    """Reduced-precision files (written to `tmp`) and the mIoU of every variant beside fp32."""
    variants = {"fp32": (files["encoder"], files["decoder"])}
    candidates = _int8(fused, cfg, calibration, tmp) if "int8" in cfg.precisions else {}
    variants |= {f"int8 {mode}": (path, files["decoder"]) for mode, path in candidates.items()}
    extra: dict[str, Path] = {}
    if "int8" in cfg.precisions:
        extra["decoder_int8"] = tmp / "decoder_int8.onnx"
        quantize_decoder(files["decoder"], extra["decoder_int8"])
        variants["int8 decoder"] = (files["encoder"], extra["decoder_int8"])
    if "fp16" in cfg.precisions:
        for base in ("encoder", "decoder"):
            extra[f"{base}_fp16"] = tmp / f"{base}_fp16.onnx"
            to_fp16(files[base], extra[f"{base}_fp16"])
        variants |= {"fp16 encoder": (extra["encoder_fp16"], files["decoder"]),
                     "fp16 decoder": (files["encoder"], extra["decoder_fp16"])}
    segmenters = [onnx_segmenter(name, fused, *paths) for name, paths in variants.items()]
    miou = _miou(fused, segmenters, items, check)
    if candidates:
        best = max(candidates, key=lambda mode: (miou[f"int8 {mode}"]["box"], miou[f"int8 {mode}"]["point"]))
        extra["encoder_int8"] = candidates[best]
        miou["int8_weights"] = best
    return extra, miou


def _accuracy(role: str, miou: dict[str, Any]) -> dict[str, float] | None:
    """The measured mIoU of the variant that tests the file of `role` (and its drop from fp32)."""
    name = {"encoder": "fp32", "decoder": "fp32", "encoder_fp16": "fp16 encoder", "decoder_fp16": "fp16 decoder",
            "decoder_int8": "int8 decoder",
            "encoder_int8": f"int8 {miou.get('int8_weights')}"}.get(role)
    if name not in miou:
        return None
    values = miou[name]
    return {"variant": name, "box_miou": values["box"], "point_miou": values["point"],
            "box_drop": miou["fp32"]["box"] - values["box"], "point_drop": miou["fp32"]["point"] - values["point"]}


def _export_checked(cfg: ExportConfig, sam: Sam, rpn: RPN, out: Path) -> tuple[Sam, dict[str, Path], dict[str, Any]]:
    """The fused model's fp32 files and their parity report (a parity break raises)."""
    fused = fused_copy(sam)
    log.info("exporting ONNX (opset %d) to %s", cfg.opset, out)
    files = export_onnx(fused, out, cfg.opset, rpn=rpn)
    photo = sample_images.coffee()  # a real, non-square photo
    image, _ = preprocess(photo, fused.image_encoder.img_size)
    parity = check_parity(fused, files, image[None], photo.shape[:2], cfg.parity_atol, cfg.parity_rtol, rpn=rpn)
    with torch.no_grad():
        parity["fusion_max_abs_diff"] = float((fused.image_encoder(image[None]) - sam.image_encoder(image[None])).abs().max())
    files["rpn_onnx"] = files.pop("rpn")
    return fused, files, parity


def _base(role: str) -> tuple[str, str]:
    """(base role, precision) of a file role: encoder_int8 -> (encoder, int8)."""
    base, _, precision = role.rpartition("_")
    return (base, precision) if precision in ("int8", "fp16") else (role, "fp32")


def _entries(fused: Sam, files: dict[str, Path], miou: dict[str, Any], repeats: int) -> dict[str, Any]:
    """config.json's file list: digests, what each file is, its latency and measured accuracy."""
    return {role: file_entry(path, precision=_base(role)[1], description=DESCRIPTIONS[_base(role)[0]],
                             latency_ms=file_latency(fused, role, path, repeats), accuracy=_accuracy(role, miou))
            for role, path in files.items()}


def bundle_config(sam: Sam, entries: dict[str, Any], merge: str, opset: int) -> dict[str, Any]:
    """config.json of a bundle: what a client needs besides the files (`edgesam.client.bundle` reads it);
    `merge` names the prior's rule (`PRIOR_RULES`), whose settings the client applies."""
    return {
        "format": FORMAT, "version": VERSION, "model": edgesam_config(sam), "img_size": sam.image_encoder.img_size,
        "embedding_size": list(sam.prompt_encoder.image_embedding_size), "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD), "mask_threshold": sam.mask_threshold, "opset": opset,
        "rpn": {"merge": merge, **asdict(PRIOR_RULES[merge]), "pre_nms_top": PRE_NMS_TOP},
        "inputs": {"decoder": list(DECODER_INPUTS), "decoder_sam": list(SAM_DECODER_INPUTS),
                   "decoder_edgesam": list(COMPACT_INPUTS)},
        "files": entries,
    }


def build_bundle(cfg: ExportConfig, sam: Sam, checkpoint: Path, rpn: RPN, rpn_checkpoint: Path,
                 merge: str, calibration_images: Iterable[np.ndarray],
                 check_items: Iterable[EvalItem], out: Path) -> dict[str, Any]:
    """Write and check every file of the bundle in `out`, then config.json.

    Returns the manifest body: config.json's content, the parity report and latencies.
    """
    check = protocol(cfg.check_protocol, cfg.check_refine_iters)
    fused, files, parity = _export_checked(cfg, sam, rpn, out)
    img_size = fused.image_encoder.img_size
    calibration = encoder_inputs(islice(calibration_images, cfg.calibration_images), img_size)
    with tempfile.TemporaryDirectory() as tmp:  # int8 candidates: only the chosen one reaches `out`
        extra, miou = _precision_checks(fused, cfg, files, calibration, check_items, check, Path(tmp))
        for role, path in extra.items():
            files[role] = out / f"{role}.onnx"
            copy_atomic(path, files[role])
    log.info("mIoU per precision: %s", miou)
    copy_atomic(checkpoint, out / CHECKPOINT)
    copy_atomic(rpn_checkpoint, out / RPN_CHECKPOINT)
    entries = _entries(fused, files, miou, cfg.latency_repeats)
    entries["checkpoint"] = file_entry(out / CHECKPOINT, loader="edgesam.models.edgesam.load_edgesam")
    entries["rpn_checkpoint"] = file_entry(out / RPN_CHECKPOINT, loader="edgesam.models.rpn.load_rpn")
    config = bundle_config(sam, entries, merge, cfg.opset)
    config["accuracy"] = {"protocol": asdict(check), "split": "val", "calibration_images": len(calibration),
                          "calibration_split": cfg.calibration_split, "variants": miou}
    write_json_atomic(out / CONFIG, config)
    eager = model_speed(fused, cfg.latency_repeats)
    latency = {"onnxruntime": {"encoder_ms": entries["encoder"]["latency_ms"]["image"],
                               "decoder_ms": entries["decoder"]["latency_ms"]["1_box"]},
               "pytorch": {"encoder_ms": eager["encoder_ms"], "decoder_ms": eager["decoder_ms"]}}
    return {"config": config, "parity": parity, "latency_ms": latency}
