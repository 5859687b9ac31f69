"""Parameters, GMACs and median PyTorch eager latency of a SAM-family model on this machine."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch.utils.flop_counter import FlopCounterMode

from edgesam.models.decoding import decode
from edgesam.models.rpn import RPN, proposals


def run_times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of `fn()`, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def latency_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, after one warm-up run."""
    return 1000 * float(np.median(run_times(fn, repeats)))


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


@torch.no_grad()
def model_speed(sam: Sam, repeats: int = 5, rpn: RPN | None = None) -> dict[str, float]:
    """Parameters, encoder GMACs (one image) and median latencies: the encoder on one image,
    the decoder on one point prompt (4 outputs), and with `rpn` the proposals of one image."""
    size = sam.image_encoder.img_size
    device = sam.device
    x = torch.randn(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        embedding = sam.image_encoder(x)
    point = torch.full((1, 1, 2), size / 2, device=device)
    label = torch.ones(1, 1, dtype=torch.int64, device=device)
    out = {
        "encoder_params_m": params_m(sam.image_encoder),
        "decoder_params_m": params_m(sam.prompt_encoder) + params_m(sam.mask_decoder),
        "encoder_gmacs": counter.get_total_flops() / 2e9,
        "encoder_ms": latency_ms(lambda: sam.image_encoder(x), repeats),
        "decoder_ms": latency_ms(lambda: decode(sam, embedding, point, label, num_outputs=4), repeats),
    }
    if rpn is not None:
        _, features = sam.image_encoder.forward_pyramid(x)
        out["rpn_params_m"] = params_m(rpn)
        out["rpn_ms"] = latency_ms(lambda: proposals(rpn, *rpn(features), [(size, size)]), repeats)
    return out
