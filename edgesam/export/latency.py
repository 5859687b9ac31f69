"""Size, compute and CPU latency of one student backbone at a deployment size, for comparisons.

The leaderboard of a backbone sweep needs every backbone timed the same way, at the size it
would be deployed at (1024 for SAM), one after another in one process, so that ratios between
rows are fair even on a shared machine. A distilled student is usually trained smaller
(256 on the embedded benchmark) and latency does not depend on the weights, so each backbone
is built fresh at `img_size` with seeded random weights: its fused PyTorch encoder, its
`encoder.onnx` (fp32) and a static int8 QDQ copy (per-channel weights, calibrated on the given
images), each timed as the export stage times its files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgesam.eval.speed import latency_ms, params_m
from edgesam.export.bundle import encoder_inputs
from edgesam.export.onnx import export_encoder, fused_copy, ort_latency_ms
from edgesam.export.quantize import prepare_encoder, quantize_encoder
from edgesam.models.decoding import decode
from edgesam.models.edgesam import build_edgesam


def _gmacs(fn: Any) -> tuple[float, Any]:
    """(GMACs of `fn()`: every FLOP torch.utils.flop_counter counts / 2, its output)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops() / 2e9, out


@torch.no_grad()
def backbone_speed(backbone: str, img_size: int = 1024, repeats: int = 5,
                   calibration_images: Iterable[np.ndarray] = (), seed: int = 0) -> dict[str, Any]:
    """Params, GMACs (encoder on one image + decoder on one box) and median CPU latencies (ms) of
    the fused PyTorch encoder and its fp32 and int8 ONNX files at `img_size`. Without calibration
    images the int8 file is calibrated on random inputs (its latency, not its accuracy, is measured)."""
    torch.manual_seed(seed)
    sam = build_edgesam(backbone, img_size).requires_grad_(False)  # FlopCounterMode's module tracker wants no graph
    image = torch.randn(1, 3, img_size, img_size)
    encoder_gmacs, embedding = _gmacs(lambda: sam.image_encoder(image))
    box = torch.tensor([[0.2, 0.25, 0.7, 0.8]]) * img_size
    decoder_gmacs, _ = _gmacs(lambda: decode(sam, embedding, boxes=box, num_outputs=1))
    fused = fused_copy(sam)
    calibration = encoder_inputs(calibration_images, img_size) or [
        np.random.default_rng(seed).standard_normal((1, 3, img_size, img_size), np.float32)]
    feeds = {"image": image.numpy()}
    out = {
        "backbone": backbone, "img_size": img_size, "repeats": repeats,
        "encoder_params_m": params_m(sam.image_encoder),
        "decoder_params_m": params_m(sam.prompt_encoder) + params_m(sam.mask_decoder),
        "encoder_gmacs": encoder_gmacs, "decoder_gmacs": decoder_gmacs,
        "torch_fused_ms": latency_ms(lambda: fused.image_encoder(image), repeats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "encoder.onnx"
        export_encoder(fused, fp32)
        out["onnx_fp32_ms"] = ort_latency_ms(fp32, feeds, repeats)
        int8 = Path(tmp) / "encoder_int8.onnx"
        quantize_encoder(prepare_encoder(fused, Path(tmp)), int8, calibration, per_channel=True)
        out["onnx_int8_ms"] = ort_latency_ms(int8, feeds, repeats)
    out["threads"] = torch.get_num_threads()
    out["load_average"] = os.getloadavg()[0]
    return out
