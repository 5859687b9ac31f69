"""MODEL_CARD.md of an exported bundle: every file with its measured accuracy and speed."""

from __future__ import annotations

from typing import Any

from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD
from edgesam.eval.tables import fmt, miou_tables, prior_section, speed_table

def _latency(ms: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.1f} ms" for k, v in ms.items())


def file_table(config: dict[str, Any]) -> list[str]:
    """One row per bundle file: precision, size, measured mIoU (and drop from fp32), latency."""
    lines = ["| file | precision | MB | box mIoU | point mIoU | box / point drop vs fp32 | onnxruntime CPU latency |",
             "|---|---|---|---|---|---|---|"]
    for role, entry in sorted(config["files"].items()):
        acc = entry.get("accuracy") or {}
        drop = f"{acc['box_drop']:+.3f} / {acc['point_drop']:+.3f}" if acc else "-"
        lines.append(f"| `{entry['file']}` | {entry.get('precision', '-')} | {entry['bytes'] / 1e6:.1f} | "
                     f"{fmt(acc.get('box_miou'))} | {fmt(acc.get('point_miou'))} | {drop} | "
                     f"{_latency(entry['latency_ms']) if 'latency_ms' in entry else '-'} |")
    return lines


def variant_table(variants: dict[str, Any]) -> list[str]:
    lines = ["| variant (encoder + decoder) | box mIoU | point mIoU |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(v['box'])} | {fmt(v['point'])} |" for name, v in variants.items() if isinstance(v, dict)]
    return lines


def model_card(config: dict[str, Any], evaluation: dict[str, Any], parity: dict[str, Any],
               timings: dict[str, dict[str, float]], coreml: dict[str, Any]) -> str:
    """MODEL_CARD.md of an exported bundle: every file with its measured accuracy and speed,
    the evaluate stage's measurements, ONNX parity."""
    prior, model, accuracy = evaluation["granularity_prior"], config["model"], config["accuracy"]
    variants = accuracy["variants"]
    worst = {part: max(v["max_abs_diff"] for v in parity[part].values())
             for part in ("encoder", "decoder", "decoder_sam", "decoder_edgesam", "rpn") if part in parity}
    lines = [
        "# EdgeSAM model card", "",
        f"Student: `{model['backbone']}` encoder (fused) + SAM's prompt encoder and mask decoder, "
        f"input {config['img_size']} x {config['img_size']}, distilled with prompt-in-the-loop KD (EdgeSAM, "
        "arXiv 2312.06660). Optional granularity prior: an RPN whose proposals around a click become a box "
        f"prompt (merge rule `{prior['merge']}`).", "",
        "## Files", "",
        f"Accuracy: box and point mIoU of each file through the evaluation engine ({variants['pytorch']['annotations']} "
        f"objects of the val split, protocol `{accuracy['protocol']['name']}`, "
        f"{accuracy['protocol']['refine_iters']} corrective clicks); the other files of the variant are fp32. "
        f"int8: static QDQ, U8S8, calibrated on {accuracy['calibration_images']} {accuracy['calibration_split']} images; "
        f"weights {variants.get('int8_weights', '-')} (the better of those measured); decoder: dynamic, int8 MatMul "
        "weights, activations quantized per call. fp16: inputs and outputs stay "
        "float32. Latency: onnxruntime CPU on this machine, median (x86 without AVX512-FP16 runs fp16 slower than fp32).",
        "", *file_table(config), "", *variant_table(variants), "",
        f"- `encoder*.onnx`: `image` (1, 3, S, S), resized so the longest side is S, normalized with mean "
        f"{list(PIXEL_MEAN)} and std {list(PIXEL_STD)}, zero-padded bottom-right -> `image_embeddings`, then the "
        "backbone maps `features_s8/s16/s32` (the input of `rpn.onnx`).",
        "- `decoder*.onnx`: N prompt sets per call (image_embeddings, point_coords (N, P, 2), point_labels (N, P), "
        "mask_input (N, 1, S/4, S/4), has_mask_input (N,) -> scores (N, 4), masks (N, 4, S/4, S/4) low-res logits of "
        "all four mask tokens: token 0 single-mask, 1-3 SAM's multimask). Every shape is static or N / P "
        "(TensorRT-friendly); crop and resize the logits on the client (`edgesam.client.predictor`).",
        "- `decoder_sam.onnx`: segment-anything's ONNX interface (image_embeddings, point_coords, point_labels, "
        "mask_input, has_mask_input, orig_im_size -> masks, iou_predictions, low_res_masks).",
        "- `decoder_edgesam.onnx`: EdgeSAM's compact interface (image_embeddings, point_coords, point_labels -> "
        "scores, masks).",
        "- Point coordinates are in the resized frame; labels 1 / 0 / 2, 3 (box corners) / -1 (padding; add one "
        "padding point when there is no box).",
        "- `rpn.onnx`: per-location RPN scores and boxes; thresholding, NMS and the merge run on the client "
        f"(settings in config.json: {config['rpn']}).",
        "- `edgesam.pt` (`edgesam.models.edgesam.load_edgesam`), `rpn.pt` (`edgesam.models.rpn.load_rpn`), "
        "`config.json` (every file with its SHA-256; `edgesam.client.predictor.OnnxPredictor` reads the bundle).",
        f"- CoreML: {coreml.get('file', coreml.get('reason', coreml['status']))}.", "",
        "## Measured accuracy (evaluate stage)", "",
        *[line for name, m in evaluation["miou"].items() for line in miou_tables(m, name)],
        *prior_section(prior),
        "## Speed (evaluate stage, PyTorch eager, this machine)", "", *speed_table(evaluation["speed"]), "",
        "## ONNX parity", "",
        f"onnxruntime vs PyTorch (tolerance |diff| <= {parity['atol']} + {parity['rtol']} |value|): "
        + ", ".join(f"{part} max |diff| {value:.2e}" for part, value in worst.items()) + ".", "",
        "| runtime (CPU) | encoder ms | decoder ms (1 box) |", "|---|---|---|",
        *[f"| {name} | {t['encoder_ms']:.1f} | {t['decoder_ms']:.1f} |" for name, t in timings.items()], "",
        "## Limitations", "",
        "Trained and measured on the data this pipeline ran on (the embedded synthetic benchmark unless real "
        "SA-1B / COCO paths were configured); numbers above are those measurements, not the paper's.", "",
    ]
    return "\n".join(lines)
