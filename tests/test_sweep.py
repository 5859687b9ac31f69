"""The backbone sweep: the pre-flight check, the leaderboard's rows and verdicts, and (marker
`sweep`, minutes) a smoke sweep of three backbones run twice through the flow."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgesam.eval.leaderboard import (Entry, _frontier, leaderboard_csv, leaderboard_markdown, leaderboard_rows,
                                      plot_pareto)
from edgesam.models.backbones import check_backbone


def test_preflight_passes_a_cnn_and_names_what_breaks_the_others():
    good = check_backbone("mobilenetv3_small_050", 256)
    assert good.ok and good.reason == "" and {8, 16, 32} <= set(good.strides) and good.params_m > 0
    vit = check_backbone("vit_tiny_patch16_224", 256)
    assert not vit.ok and "strides [16, 16, 16]" in vit.reason and "missing [8, 32]" in vit.reason
    typo = check_backbone("repvit_m11", 256)
    assert not typo.ok and "timm has no model 'repvit_m11'" in typo.reason and "repvit_m1" in typo.reason
    assert vit.seconds < 5 and typo.seconds < 5


def test_preflight_catches_a_model_that_breaks_at_the_input_size():
    result = check_backbone("efficientformerv2_s0", 256)  # attention reshapes assume 224-px inputs
    assert not result.ok and result.reason.startswith("forward/backward at img_size 256 fails")


def _write_ious(path: Path, ious: dict[str, np.ndarray]) -> Path:
    """An evaluate run's ious.jsonl: per model, 40 images x 5 annotations, box and point prompts."""
    path.mkdir(parents=True)
    lines = []
    for model, values in ious.items():
        for prompt in ("box", "point"):
            for i, v in enumerate(values):
                lines.append(json.dumps({"protocol": "paper", "model": model, "dataset": "sa1b", "prompt": prompt,
                                         "size": "large", "iou": float(v), "image": f"im{i // 5}"}))
    (path / "ious.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def entries(tmp_path) -> list[Entry]:
    rng = np.random.default_rng(0)
    teacher = rng.uniform(0.7, 0.9, 200)
    base = teacher - 0.10 + rng.normal(0, 0.02, 200)
    runs = {"base": base, "base seed 1": base + 0.004, "better": base + 0.05, "same": base + rng.normal(0, 0.02, 200),
            "slightly": base + 0.002}
    out = [Entry(label, "net_a" if label.startswith("base") else f"net_{label}", 1 if "seed" in label else 0, "ok",
                 _write_ious(tmp_path / label.replace(" ", "_"), {"teacher": teacher, "prompt_kd": v}))
           for label, v in runs.items()]
    return out + [Entry("vit", "vit", 0, "failed: features_only gives strides [16, 16, 16]")]


SPEEDS = {name: {"encoder_params_m": 5.0, "decoder_params_m": 4.0, "encoder_gmacs": 2.0, "decoder_gmacs": 0.1,
                 "torch_fused_ms": ms, "onnx_fp32_ms": ms / 2, "onnx_int8_ms": ms / 3}
          for name, ms in {"net_a": 40.0, "net_better": 80.0, "net_same": 20.0, "net_slightly": 30.0}.items()}


def test_leaderboard_tells_image_noise_from_seed_noise(entries, tmp_path):
    rows = {r["label"]: r for r in leaderboard_rows(entries, SPEEDS, "base")}
    assert rows["base"]["box_verdict"] == "baseline" and rows["base seed 1"]["box_verdict"] == "seed replicate"
    assert rows["base"]["box_seed_gap"] == pytest.approx(0.004)
    assert rows["better"]["box_diff"] == pytest.approx(0.05)
    assert rows["better"]["box_verdict"] == "beyond image and seed noise"
    # +0.002 everywhere: the interval excludes 0 (no image noise) but the seeds differ by more
    assert rows["slightly"]["box_verdict"] == "beyond image noise, within seed noise"
    assert rows["same"]["box_verdict"] == "within image noise"
    assert rows["base"]["box_teacher_ratio"] < 1 and rows["better"]["box_teacher_ratio"] > rows["base"]["box_teacher_ratio"]
    assert rows["vit"]["status"].startswith("failed:") and rows["vit"].get("box_miou") is None

    table = leaderboard_markdown(list(rows.values()))
    assert len(table) == 2 + len(entries)
    assert "+0.050 [" in next(line for line in table if "`better`" in line) and " ** |" in table[[
        i for i, line in enumerate(table) if "`better`" in line][0]]
    assert table[-1].endswith("| failed: features_only gives strides [16, 16, 16] |")
    parsed = list(csv.DictReader(io.StringIO(leaderboard_csv(list(rows.values())))))
    assert [p["label"] for p in parsed] == [e.label for e in entries]
    assert math.isclose(float(parsed[2]["box_diff"]), rows["better"]["box_diff"])
    plot_pareto(list(rows.values()), tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_leaderboard_needs_an_evaluated_baseline(entries):
    with pytest.raises(ValueError, match="baseline 'vit' has no evaluation"):
        leaderboard_rows(entries, SPEEDS, "vit")


def test_pareto_frontier_keeps_the_undominated_points():
    points = [(10.0, 0.5), (20.0, 0.4), (30.0, 0.7), (30.0, 0.6), (40.0, 0.65), (50.0, 0.8)]
    assert _frontier(points) == [(10.0, 0.5), (30.0, 0.7), (50.0, 0.8)]


def _committed(work_dir: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(work_dir)): json.loads(p.read_text())["committed_at"]
            for p in work_dir.glob("*/*/manifest.json")}


@pytest.mark.sweep
@pytest.mark.timeout(2400)  # two smoke sweeps: 7 min alone here, far more beside other work
def test_smoke_sweep_ranks_two_backbones_refuses_a_vit_and_reruns_from_the_cache(tmp_path):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import edgesam_sweep

    params = dict(profile="smoke", backbones=["repvit_m1", "mobilenetv3_small_050", "vit_tiny_patch16_224"],
                  work_dir=tmp_path / "runs", name="smoke", latency_size=256, latency_repeats=2)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect"}), \
            prefect_test_harness(server_startup_timeout=120):
        first = edgesam_sweep(**params)
        committed = _committed(tmp_path / "runs")
        second = edgesam_sweep(**params)
    rows = {r["label"]: r for r in first["rows"]}
    for label in ("repvit_m1", "mobilenetv3_small_050"):
        assert rows[label]["status"] == "ok"
        assert all(math.isfinite(rows[label][k]) for k in ("box_miou", "point_miou", "onnx_fp32_ms", "onnx_int8_ms"))
    assert rows["vit_tiny_patch16_224"]["status"].startswith("failed: features_only gives strides [16, 16, 16]")
    assert len(list((tmp_path / "runs" / "encoder_kd").glob("*/manifest.json"))) == 2  # nothing trained for the ViT
    assert len(list((tmp_path / "runs" / "export").glob("*/manifest.json"))) == 2
    assert len(list((tmp_path / "runs" / "evaluate_teacher").glob("*/manifest.json"))) == 1  # teacher evaluated once
    teacher = {json.dumps(json.loads(p.read_text())["miou"]["paper"]["sa1b"]["teacher"])
               for p in (tmp_path / "runs" / "evaluate").glob("*/metrics.json")}
    assert len(teacher) == 1
    assert {json.loads(p.read_text())["backbone"] for p in (tmp_path / "runs" / "evaluate").glob("*/metrics.json")} \
        == {"repvit_m1", "mobilenetv3_small_050"}
    assert _committed(tmp_path / "runs") == committed  # the rerun recomputed nothing
    assert second["table"] == first["table"] and second["dir"] == first["dir"]
    assert (Path(first["dir"]) / "pareto.png").is_file() and (Path(first["dir"]) / "leaderboard.csv").is_file()
