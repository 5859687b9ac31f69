"""The demo page's JavaScript transforms (web/transforms.js, run by Node) against their numpy
twins in `edgesam.client.transforms` on the same inputs: the resize of the longest side is
Pillow's to the bit, so the encoder input is identical; the mask upscaling agrees within float
rounding, and the binary masks wherever a logit is not at the threshold."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgesam.client.transforms import preprocess, prompt_arrays, resized_shape, scale_coords, upsample_logits

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "web" / "test" / "run_transforms.mjs"
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
LOGIT_ATOL = 1e-4  # float64 sparse products in JS vs float32 BLAS in numpy (logits of magnitude ~10)

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (apt-get install nodejs)")


def run_node(cases: dict, tmp: Path) -> dict:
    (tmp / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run(["node", str(RUNNER), str(tmp)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads((tmp / "results.json").read_text())


def images(astronaut: np.ndarray, coffee: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """(image, size) pairs: downscaling and upscaling, square, wide, tall and odd shapes."""
    rng = np.random.default_rng(0)
    return [(coffee, 256), (coffee, 1024), (astronaut, 1024), (astronaut[::2, ::3].copy(), 256),
            (rng.integers(0, 256, (37, 91, 3), dtype=np.uint8), 64), (coffee[:, :150].copy(), 160)]


def test_preprocess_matches_numpy_to_the_bit(astronaut, coffee, tmp_path):
    pairs = images(astronaut, coffee)
    cases = {"preprocess": [], "upsample": [], "prompts": [], "tokens": [], "shapes": []}
    for i, (image, size) in enumerate(pairs):
        (tmp_path / f"image{i}.bin").write_bytes(np.ascontiguousarray(image).tobytes())
        cases["preprocess"].append({"image": f"image{i}.bin", "height": image.shape[0], "width": image.shape[1],
                                    "size": size, "mean": MEAN, "std": STD})
    results = run_node(cases, tmp_path)["preprocess"]
    for (image, size), got in zip(pairs, results):
        want, input_hw = preprocess(image, size, MEAN, STD)
        assert tuple(got["inputHW"]) == input_hw
        js = np.fromfile(tmp_path / got["output"], np.float32).reshape(want.shape)
        np.testing.assert_array_equal(js, want, err_msg=f"{image.shape} at {size}")


def test_upsampled_logits_and_masks_match_numpy(tmp_path):
    rng = np.random.default_rng(1)
    settings = [((64, 64), 256, (400, 600)), ((64, 64), 256, (512, 512)), ((256, 256), 1024, (900, 300)),
                ((16, 16), 64, (37, 91))]
    cases = {"preprocess": [], "upsample": [], "prompts": [], "tokens": [], "shapes": []}
    lows = []
    for i, (low_hw, size, original) in enumerate(settings):
        low = (rng.standard_normal(low_hw) * 8).astype(np.float32)
        lows.append(low)
        low.tofile(tmp_path / f"low{i}.bin")
        cases["upsample"].append({"low": f"low{i}.bin", "lowHW": low_hw, "imgSize": size, "threshold": 0.0,
                                  "inputHW": resized_shape(*original, size), "originalHW": original})
    results = run_node(cases, tmp_path)["upsample"]
    for (low_hw, size, original), low, got in zip(settings, lows, results):
        want = upsample_logits(low, size, resized_shape(*original, size), original)
        js = np.fromfile(tmp_path / got["output"], np.float32).reshape(original)
        np.testing.assert_allclose(js, want, atol=LOGIT_ATOL, rtol=0)
        mask = np.fromfile(tmp_path / got["mask"], np.uint8).reshape(original).astype(bool)
        decided = np.abs(want) > LOGIT_ATOL
        assert 0.05 < mask.mean() < 0.95
        np.testing.assert_array_equal(mask[decided], want[decided] > 0)


def test_prompt_tokens_and_shapes_match_numpy(tmp_path):
    prompts = [
        ([[300.0, 200.0]], [1], None, (400, 600), 1024),
        ([[300.0, 200.0], [10.5, 399.0]], [1, 0], None, (400, 600), 256),
        ([], [], [100.0, 50.0, 500.0, 350.0], (400, 600), 1024),
        ([[120.0, 80.0]], [0], [0.0, 0.0, 511.0, 300.0], (512, 512), 256),
    ]
    cases = {"preprocess": [], "upsample": [], "prompts": [], "tokens": [],
             "shapes": [[400, 600, 1024], [600, 400, 256], [37, 91, 64], [333, 333, 1024], [1, 999, 1024]]}
    for points, labels, box, original, size in prompts:
        cases["prompts"].append({"points": points, "labels": labels, "box": box, "originalHW": original,
                                 "size": size})
    cases["tokens"] = [{"scores": [0.9, 0.1, 0.7, 0.3], "pointCount": 1, "hasBox": False},
                       {"scores": [0.1, 0.2, 0.3, 0.4], "pointCount": 1, "hasBox": True},
                       {"scores": [0.1, 0.5, 0.3, 0.4], "pointCount": 2, "hasBox": False}]
    results = run_node(cases, tmp_path)
    for (points, labels, box, original, size), got in zip(prompts, results["prompts"]):
        scaled = scale_coords(np.array(points).reshape(1, -1, 2), original, size) if points else None
        boxes = scale_coords(np.array(box).reshape(1, 2, 2), original, size).reshape(1, 4) if box else None
        coords, token_labels = prompt_arrays(scaled, np.array([labels]) if points else None, boxes)
        np.testing.assert_allclose(np.array(got["coords"], np.float32).reshape(coords.shape), coords, rtol=0, atol=0)
        np.testing.assert_array_equal(np.array(got["labels"], np.float32), token_labels[0])
    assert [tuple(s) for s in results["shapes"]] == [resized_shape(h, w, s) for h, w, s in cases["shapes"]]
    assert results["tokens"] == [2, 0, 0]  # a lone click: the best of the multimask tokens 1-3
