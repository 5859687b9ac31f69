"""The benchmark scripts run end to end at their smallest sizes and write the JSON they print
(their figures are measured elsewhere; here only that the scripts still work with the library)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--out", str(out), *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_speed_has_every_onnx_row(tmp_path):
    report = run_benchmark("speed", tmp_path / "speed.json", "--img-size", "256", "--threads", "1", "--warmup", "0",
                           "--repeats", "1", "--skip-sam", "--no-malloc-tuning")
    rows = report["rows"]
    for precision in ("fp32", "int8", "fp16"):
        assert any(name.startswith(f"student encoder (fused), ONNX Runtime {precision}") for name in rows)
    timed = [name for name in rows if "OnnxPredictor" in name or "client decoder" in name]
    assert len(timed) == 5 and all(rows[name]["median_s"] > 0 for name in timed)


def test_train_times_both_phases(tmp_path):
    report = run_benchmark("train", tmp_path / "train.json", "--images", "4", "--steps", "1", "--warmup", "0",
                           "--threads", "1", "--batch-size", "2")
    assert set(report["phases"]) == {"encoder_kd", "prompt_kd"}
    assert all(phase["step_images_per_s"] > 0 for phase in report["phases"].values())


def test_mask_ceiling_is_an_iou(tmp_path):
    report = run_benchmark("mask_ceiling", tmp_path / "ceiling.json", "--images", "4", "--size", "256")
    assert report["rows"] and all(0 < row["ceiling_miou"] <= 1 for row in report["rows"])
