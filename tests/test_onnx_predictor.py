"""`OnnxPredictor` against the PyTorch `EdgeSAMPredictor` on the same bundle, and without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgesam.client.bundle import BundleError
from edgesam.client.inputs import PromptError
from edgesam.client.predictor import OnnxPredictor
from edgesam.predictor import EdgeSAMPredictor

LOGIT_ATOL = 1e-3  # fp32 onnxruntime vs PyTorch, low-res logits (measured ~1e-5)
MIN_MASK_IOU = 0.99  # binary masks at the image's resolution: only pixels at the threshold may differ

PROMPTS = {
    "point": dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1])),
    "two points": dict(point_coords=np.array([[300.0, 200.0], [100.0, 50.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([100.0, 50.0, 500.0, 350.0])),
    "point + box": dict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1]),
                        box=np.array([100.0, 50.0, 500.0, 350.0])),
}


@pytest.fixture(scope="module")
def predictors(bundle_256, coffee):
    onnx, torch_predictor = OnnxPredictor(bundle_256, rpn=True), EdgeSAMPredictor.from_bundle(bundle_256, rpn=True)
    onnx.set_image(coffee)
    torch_predictor.set_image(coffee)
    return onnx, torch_predictor


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def assert_same(got: tuple, want: tuple) -> None:
    masks, scores, low = got
    assert masks.shape == want[0].shape and scores.shape == want[1].shape and low.shape == want[2].shape
    np.testing.assert_allclose(low, want[2], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(scores, want[1], atol=LOGIT_ATOL, rtol=0)
    for a, b in zip(masks.reshape(-1, *masks.shape[-2:]), want[0].reshape(-1, *masks.shape[-2:])):
        assert mask_iou(a, b) >= MIN_MASK_IOU


@pytest.mark.parametrize("name", PROMPTS)
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches_the_pytorch_predictor(predictors, name, multimask):
    onnx, torch_predictor = predictors
    assert_same(onnx.predict(**PROMPTS[name], multimask_output=multimask),
                torch_predictor.predict(**PROMPTS[name], multimask_output=multimask))


def test_mask_input_and_logits_match(predictors):
    onnx, torch_predictor = predictors
    _, _, low = torch_predictor.predict(**PROMPTS["point"], multimask_output=False)
    kwargs = dict(**PROMPTS["two points"], mask_input=low, multimask_output=False, return_logits=True)
    got, want = onnx.predict(**kwargs), torch_predictor.predict(**kwargs)
    np.testing.assert_allclose(got[0], want[0], atol=LOGIT_ATOL, rtol=0)  # upsampled logits, numpy vs F.interpolate


def test_many_boxes_and_point_sets_in_one_call(predictors):
    onnx, torch_predictor = predictors
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 300, (16, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(50, 250, (16, 2))], axis=1)
    assert_same(onnx.predict_batch(boxes=boxes, multimask_output=False),
                torch_predictor.predict_batch(boxes=boxes, multimask_output=False))
    points, labels = rng.uniform(0, 390, (4, 3, 2)), np.array([[1, 0, 1]] * 4)
    got = onnx.predict_batch(points, labels, boxes=boxes[:4])
    assert got[0].shape == (4, 3, 400, 600)
    assert_same(got, torch_predictor.predict_batch(points, labels, boxes=boxes[:4]))


def test_granularity_prior_box_matches(predictors):
    onnx, torch_predictor = predictors
    for point in ([300.0, 200.0], [20.0, 380.0]):
        np.testing.assert_allclose(onnx.prior_box(point), torch_predictor.prior_box(point), atol=0.05)


TORCH_FREE = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "segment_anything", "timm"}:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocked())
    from edgesam.client.predictor import OnnxPredictor

    bundle, image, out = sys.argv[1:4]
    predictor = OnnxPredictor(bundle, rpn=True)
    predictor.set_image(np.load(image))
    masks, scores, low = predictor.predict(point_coords=np.array([[300.0, 200.0]]), point_labels=np.array([1]))
    np.savez(out, masks=masks, scores=scores, low=low, prior=predictor.prior_box([300.0, 200.0]))
    heavy = {"torch", "torchvision", "segment_anything", "timm", "scipy", "skimage", "pydantic", "matplotlib"}
    print(json.dumps(sorted(heavy & {m.split(".")[0] for m in sys.modules})))
""")


def test_onnx_predictor_runs_where_torch_cannot_be_imported(predictors, bundle_256, coffee, tmp_path):
    np.save(tmp_path / "image.npy", coffee)
    result = subprocess.run([sys.executable, "-c", TORCH_FREE, str(bundle_256), str(tmp_path / "image.npy"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []  # nothing heavy was imported
    got = np.load(tmp_path / "out.npz")
    want = predictors[1].predict(**PROMPTS["point"])
    assert_same((got["masks"], got["scores"], got["low"]), want)
    np.testing.assert_allclose(got["prior"], predictors[1].prior_box([300.0, 200.0]), atol=0.05)


@pytest.mark.parametrize("make", [lambda a: a.mean(-1).astype(np.uint8), lambda a: a.mean(-1, keepdims=True).astype(np.uint8),
                                  lambda a: np.dstack([a, np.full(a.shape[:2], 7, np.uint8)])],
                         ids=["grey", "grey HxWx1", "RGBA"])
def test_greyscale_and_rgba_images_are_converted(predictors, coffee, make):
    image = make(coffee)
    expected = image[..., :3] if image.ndim == 3 and image.shape[2] == 4 else np.repeat(
        image.reshape(*image.shape[:2], 1), 3, axis=2)
    for predictor in predictors:
        predictor.set_image(image)
        masks = predictor.predict(**PROMPTS["box"])[0]
        predictor.set_image(expected)
        np.testing.assert_array_equal(masks, predictor.predict(**PROMPTS["box"])[0])
        predictor.set_image(coffee)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "empty prompt"),
    (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "no point"),
    (dict(point_coords=np.array([[700.0, 20.0]]), point_labels=np.array([1])), r"outside the 600x400 image"),
    (dict(point_coords=np.array([[10.0, 20.0]])), "needs point_labels"),
    (dict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([2])), "labels must be 1"),
    (dict(box=np.array([50.0, 50.0, 20.0, 80.0])), "is empty"),
    (dict(box=np.array([700.0, 10.0, 800.0, 90.0])), "outside the 600x400 image"),
])
def test_bad_prompts_fail_clearly_in_both_predictors(predictors, kwargs, message):
    for predictor in predictors:
        with pytest.raises(PromptError, match=message):
            predictor.predict(**kwargs)


def test_bad_images_fail_clearly(predictors, coffee):
    for predictor in predictors:
        with pytest.raises(PromptError, match="uint8"):
            predictor.set_image(coffee / 255.0)
        with pytest.raises(PromptError, match="shape"):
            predictor.set_image(np.zeros((4, 4, 2), np.uint8))
    predictors[0].set_image(coffee)
    predictors[1].set_image(coffee)


def test_box_past_the_border_is_clipped(predictors):
    onnx = predictors[0]
    inside = onnx.predict(box=np.array([100.0, 50.0, 600.0, 400.0]))
    np.testing.assert_array_equal(onnx.predict(box=np.array([100.0, 50.0, 900.0, 700.0]))[1], inside[1])


@pytest.fixture
def broken_bundle(bundle_256, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_256, copy)
    return copy


def test_bundle_problems_name_the_file(broken_bundle):
    config = json.loads((broken_bundle / "config.json").read_text())
    del config["files"]["encoder_int8"]
    (broken_bundle / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="no 'encoder_int8' file"):
        OnnxPredictor(broken_bundle, encoder_precision="int8")
    (broken_bundle / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"bundle file missing: .*decoder.onnx"):
        OnnxPredictor(broken_bundle)
    shutil.copy(broken_bundle / "decoder_edgesam.onnx", broken_bundle / "decoder.onnx")
    with pytest.raises(BundleError, match=r"decoder.onnx does not match .*config.json"):
        OnnxPredictor(broken_bundle)
    (broken_bundle / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json not found"):
        OnnxPredictor(broken_bundle)


def test_torch_predictor_checks_the_bundle_too(broken_bundle):
    (broken_bundle / "edgesam.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match=r"edgesam.pt does not match"):
        EdgeSAMPredictor.from_bundle(broken_bundle)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_reduced_precision_files_run_in_the_predictor(bundle_256, coffee, precision):
    predictor = OnnxPredictor(bundle_256, encoder_precision=precision, decoder_precision=precision)
    predictor.set_image(coffee)
    masks, scores, low = predictor.predict(**PROMPTS["box"])
    assert masks.shape == (3, 400, 600) and np.isfinite(low).all() and low.dtype == np.float32
