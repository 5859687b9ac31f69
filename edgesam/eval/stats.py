"""Intervals: paired bootstrap over images, so that a gain can be told from noise.

Every mIoU here is a mean over annotations; a bootstrap sample draws images with replacement
(annotations of one image are not independent) and recomputes the mean over their
annotations. Comparisons are paired: both models' IoUs of the same annotations move together.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np

from edgesam.metrics import IoURecord

SAMPLES = 2000
LEVEL = 0.95


def per_image(records: Iterable[IoURecord], model: str, dataset: str, prompt: str) -> dict[str, list[float]]:
    """IoUs of `model` by image, for one dataset and prompt type."""
    out: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.model == model and r.dataset == dataset and r.prompt == prompt:
            out[r.image].append(r.iou)
    return out


def _sums(a: dict[str, list[float]], b: dict[str, list[float]] | None) -> tuple[np.ndarray, ...]:
    images = sorted(a)
    if b is not None and (set(b) != set(a) or any(len(a[i]) != len(b[i]) for i in images)):
        raise ValueError("paired comparison over different images or annotations")
    n = np.array([len(a[i]) for i in images], float)
    sa = np.array([sum(a[i]) for i in images])
    sb = np.array([sum(b[i]) for i in images]) if b is not None else np.zeros_like(sa)
    return n, sa, sb


def _resample(n: np.ndarray, *sums: np.ndarray, samples: int, seed: int) -> list[np.ndarray]:
    idx = np.random.default_rng(seed).integers(0, len(n), size=(samples, len(n)))
    counts = n[idx].sum(1)
    return [s[idx].sum(1) / counts for s in sums]


def _interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def miou_interval(a: dict[str, list[float]], samples: int = SAMPLES, seed: int = 0) -> dict[str, float]:
    """mIoU of one model with its bootstrap 95% interval."""
    n, sa, _ = _sums(a, None)
    (means,) = _resample(n, sa, samples=samples, seed=seed)
    low, high = _interval(means)
    return {"miou": float(sa.sum() / n.sum()), "low": low, "high": high, "images": len(n), "annotations": int(n.sum())}


def paired_difference(a: dict[str, list[float]], b: dict[str, list[float]], samples: int = SAMPLES,
                      seed: int = 0) -> dict[str, float]:
    """mIoU(a) - mIoU(b) and mIoU(a) / mIoU(b) over the same annotations, with paired bootstrap 95%
    intervals; `significant` when the difference's interval excludes 0."""
    n, sa, sb = _sums(a, b)
    ma, mb = _resample(n, sa, sb, samples=samples, seed=seed)
    diff_low, diff_high = _interval(ma - mb)
    ratio_low, ratio_high = _interval(ma / np.maximum(mb, 1e-12))
    a_mean, b_mean = float(sa.sum() / n.sum()), float(sb.sum() / n.sum())
    return {"a": a_mean, "b": b_mean, "diff": a_mean - b_mean, "diff_low": diff_low, "diff_high": diff_high,
            "ratio": a_mean / max(b_mean, 1e-12), "ratio_low": ratio_low, "ratio_high": ratio_high,
            "significant": diff_low > 0 or diff_high < 0, "images": len(n), "annotations": int(n.sum())}


# (a, b): the report's comparisons, wherever both models were measured.
PAIRS = (("prompt_kd", "teacher"), ("encoder_kd", "teacher"), ("prompt_kd", "encoder_kd"),
         ("prompt_kd+rpn:official", "prompt_kd"), ("prompt_kd+rpn:weighted", "prompt_kd"),
         ("prompt_kd+rpn:official", "prompt_kd+rpn:weighted"))


def comparisons(records: list[IoURecord], pairs: Iterable[tuple[str, str]] = PAIRS,
                samples: int = SAMPLES) -> list[dict]:
    """Paired differences of every pair on every dataset and prompt type both were measured on."""
    seen = defaultdict(set)
    for r in records:
        seen[(r.dataset, r.model)].add(r.prompt)
    out = []
    for dataset in sorted({d for d, _ in seen}):
        for a, b in pairs:
            for prompt in sorted(seen.get((dataset, a), set()) & seen.get((dataset, b), set())):
                result = paired_difference(per_image(records, a, dataset, prompt), per_image(records, b, dataset, prompt),
                                           samples)
                out.append({"dataset": dataset, "prompt": prompt, "model": a, "baseline": b, **result})
    return out
