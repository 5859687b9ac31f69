"""Paired bootstrap intervals over images."""

from __future__ import annotations

import numpy as np
import pytest

from edgesam.eval.stats import comparisons, miou_interval, paired_difference
from edgesam.metrics import IoURecord


def _records(model: str, ious: dict[str, list[float]]) -> list[IoURecord]:
    return [IoURecord(model, "toy", "box", "large", v, image) for image, values in ious.items() for v in values]


def _ious(rng, images: int, shift: float = 0.0) -> dict[str, list[float]]:
    return {f"img{i}": list(np.clip(rng.normal(0.6 + shift, 0.15, size=rng.integers(1, 6)), 0, 1))
            for i in range(images)}


def test_interval_contains_the_mean_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    small, large = miou_interval(_ious(rng, 10)), miou_interval(_ious(rng, 200))
    for r in (small, large):
        assert r["low"] <= r["miou"] <= r["high"]
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])


def test_a_real_gain_is_significant_and_noise_is_not():
    rng = np.random.default_rng(1)
    base = _ious(rng, 60)
    better = {k: [min(1.0, v + 0.05) for v in vs] for k, vs in base.items()}
    gain = paired_difference(better, base)
    assert gain["significant"] and gain["diff_low"] > 0 and gain["ratio_low"] > 1
    noisy = {k: [float(np.clip(v + rng.normal(0, 0.05), 0, 1)) for v in vs] for k, vs in base.items()}
    same = paired_difference(noisy, base)
    assert same["diff_low"] < 0 < same["diff_high"] and not same["significant"]
    with pytest.raises(ValueError, match="different images or annotations"):
        paired_difference(base, {k: vs[:1] for k, vs in base.items()})


def test_comparisons_pair_models_measured_on_the_same_annotations():
    rng = np.random.default_rng(2)
    base = _ious(rng, 20)
    records = _records("teacher", base) + _records("prompt_kd", {k: [v * 0.9 for v in vs] for k, vs in base.items()})
    (row,) = comparisons(records)
    assert (row["model"], row["baseline"], row["dataset"], row["prompt"]) == ("prompt_kd", "teacher", "toy", "box")
    assert row["ratio"] == pytest.approx(0.9) and row["ratio_low"] <= 0.9 <= row["ratio_high"]
