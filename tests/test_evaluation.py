import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import torch

from edgesam.eval.datasets import EvalItem, coco_items
from edgesam.eval.engine import EvalProtocol, Segmenter, center_point, corrective_click, random_point, select_masks
from edgesam.eval.miou import evaluate
from edgesam.eval.speed import model_speed
from edgesam.metrics import summarize
from edgesam.models.rpn import build_rpn


def _u_shape(h: int = 60, w: int = 80) -> np.ndarray:
    """A U whose centroid lies outside the mask."""
    mask = np.zeros((h, w), bool)
    mask[10:50, 10:20] = True
    mask[10:50, 60:70] = True
    mask[40:50, 10:70] = True
    return mask


def _boxes(masks: np.ndarray) -> np.ndarray:
    out = []
    for m in masks:
        ys, xs = np.nonzero(m)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("mask", [_u_shape(), np.pad(np.ones((5, 9), bool), ((3, 10), (0, 4))), np.ones((7, 7), bool)])
def test_center_point_lies_inside_the_mask(mask):
    x, y = center_point(mask)
    assert mask[int(y), int(x)]


def test_the_u_shape_has_its_centroid_outside():
    mask = _u_shape()
    ys, xs = np.nonzero(mask)
    assert not mask[int(round(ys.mean())), int(round(xs.mean()))]


def test_center_point_is_farthest_from_the_boundary():
    mask = np.zeros((40, 40), bool)
    mask[5:36, 10:21] = True  # 31 x 11 bar: centre column 15
    x, y = center_point(mask)
    assert x == 15 and 5 + 5 <= y <= 35 - 5
    with pytest.raises(ValueError):
        center_point(np.zeros((4, 4), bool))


def test_random_point_lies_inside_the_mask():
    rng = np.random.default_rng(0)
    mask = _u_shape()
    for _ in range(20):
        x, y = random_point(mask, rng)
        assert mask[int(y), int(x)]


def test_corrective_click_targets_the_larger_error():
    gt = np.zeros((50, 50), bool)
    gt[10:40, 10:40] = True
    miss = gt.copy()
    miss[10:40, 25:40] = False  # right half missed
    x, y, label = corrective_click(miss, gt)
    assert label == 1 and gt[int(y), int(x)] and not miss[int(y), int(x)]
    alarm = gt.copy()
    alarm[0:10, :] = True
    x, y, label = corrective_click(alarm, gt)
    assert label == 0 and alarm[int(y), int(x)] and not gt[int(y), int(x)]
    assert corrective_click(gt, gt)[2] == -1


def test_select_masks_modes():
    import torch

    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, :4, :4] = True
    masks = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True  # exact
    masks[0, 1] = True  # largest
    masks[0, 2, :2, :2] = True
    scores = torch.tensor([[0.1, 0.2, 0.9]])
    assert select_masks(masks, scores, gt, "score").item() == 2
    assert select_masks(masks, scores, gt, "area").item() == 1
    assert select_masks(masks, scores, gt, "oracle").item() == 0


class _Oracle:
    """Stands in for a Segmenter: predicts the ground truth (or nothing)."""

    def __init__(self, name: str, perfect: bool):
        self.name, self.perfect = name, perfect

    def segment(self, item, protocol, clicks):
        pred = torch.as_tensor(item.masks if self.perfect else np.zeros_like(item.masks))
        return {"box": pred, "point": pred}


def _item(image: np.ndarray) -> EvalItem:
    h, w = image.shape[:2]
    ys, xs = np.mgrid[:h, :w]
    masks = np.stack([
        (xs - 150) ** 2 + (ys - 120) ** 2 < 60**2,
        (xs > 300) & (xs < 500) & (ys > 200) & (ys < 350),
        np.pad(_u_shape(), ((300, h - 360), (20, w - 100))),
    ])
    return EvalItem("coffee", image, masks, _boxes(masks))


def test_evaluate_perfect_and_empty_predictors(coffee):
    records, overlays = evaluate([_Oracle("perfect", True), _Oracle("empty", False)], [_item(coffee)], "toy",
                                 EvalProtocol(), overlays=1)
    summary = summarize(records)["toy"]
    assert summary["perfect"]["point"]["all"] == 1.0 and summary["perfect"]["box"]["count"] == 3
    assert summary["empty"]["box"]["all"] == 0.0
    assert set(overlays[0].masks) == {"perfect", "empty"}


def test_segmenter_runs_the_protocol_with_and_without_rpn(student_256, coffee):
    item = _item(coffee)
    rpn = build_rpn(student_256.image_encoder, channels=16, num_convs=1).eval()
    protocol = EvalProtocol(point_mode="random", multimask_select="oracle", refine_iters=2)
    plain = Segmenter("student", student_256)
    prior = Segmenter("student+rpn", student_256, rpn=rpn, k=3, score_threshold=0.0)
    records, _ = evaluate([plain, prior], [item], "toy", protocol)
    summary = summarize(records)["toy"]
    for name in ("student", "student+rpn"):
        assert set(summary[name]) == {"box", "point", "point+1", "point+2"}
        assert all(0.0 <= r.iou <= 1.0 for r in records)
        assert summary[name]["box"]["count"] == 3
    # the prior changes the point prompt (a merged box is added), not the box prompt
    assert summary["student"]["box"]["all"] == summary["student+rpn"]["box"]["all"]
    assert summary["student"]["point"]["all"] != summary["student+rpn"]["point"]["all"]


def test_coco_items_read_instances_json(tmp_path, coffee):
    item = _item(coffee)
    Image.fromarray(coffee).save(tmp_path / "img.jpg")
    anns = []
    for i, m in enumerate(item.masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        x0, y0, x1, y1 = item.boxes[i]
        anns.append({"id": i + 1, "image_id": 7, "category_id": 1, "segmentation": rle, "area": float(m.sum()),
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    anns.append({**anns[0], "id": 99, "iscrowd": 1})
    data = {"images": [{"id": 7, "file_name": "img.jpg", "height": 400, "width": 600}],
            "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    items = list(coco_items(tmp_path / "instances.json", tmp_path, max_annotations=2))
    assert len(items) == 1 and items[0].masks.shape == (2, 400, 600)
    np.testing.assert_array_equal(items[0].masks, item.masks[:2])
    np.testing.assert_allclose(items[0].boxes, item.boxes[:2])
    lvis = {**data, "images": [{"id": 7, "coco_url": "http://images.cocodataset.org/val2017/img.jpg",
                                "height": 400, "width": 600}]}
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    assert len(list(coco_items(tmp_path / "lvis.json", tmp_path))[0].masks) == 3  # LVIS: file name from the URL
    (tmp_path / "img.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img.jpg"):
        list(coco_items(tmp_path / "instances.json", tmp_path))


def test_model_speed_reports_params_macs_and_latency(student_256):
    speed = model_speed(student_256, repeats=1)
    assert speed["encoder_gmacs"] > 0.1 and speed["encoder_ms"] > 0 and speed["decoder_ms"] > 0
    assert 1 < speed["encoder_params_m"] < 20


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The evaluate stage run on a tiny committed upstream chain."""
    from stage_chain import LOCAL, upstream_chain

    from edgesam.artifacts import Artifact
    from edgesam.config import EvaluateConfig
    from pipelines import evaluate as stage

    root = tmp_path_factory.mktemp("evaluate_stage")
    inputs = upstream_chain(root)
    out = Artifact("evaluate", "fixture", root / "evaluate")
    out.path.mkdir()
    cfg = EvaluateConfig(max_images=2, max_annotations_per_image=4, overlay_images=2, speed_repeats=1, refine_iters=1)
    out.commit(stage.run(cfg, LOCAL, {k: inputs[k] for k in stage.UPSTREAM}, out.path))
    return inputs, out


def test_evaluate_stage_writes_metrics_report_and_plots(evaluated):
    _, artifact = evaluated
    manifest = artifact.manifest
    for name in manifest["files"]:
        assert (artifact.path / name).is_file() and (artifact.path / name).stat().st_size > 0
    metrics = json.loads((artifact.path / "metrics.json").read_text())
    assert set(metrics["miou"]) == {"sa1b", "coco"}
    assert set(metrics["miou"]["sa1b"]) == {"teacher", "encoder_kd", "prompt_kd"}
    assert set(metrics["miou"]["coco"]) == {"teacher", "encoder_kd", "prompt_kd", "prompt_kd+rpn"}
    for models in metrics["miou"].values():
        for prompts in models.values():
            assert set(prompts) == {"box", "point", "point+1"}
            assert all(0.0 <= v["all"] <= 1.0 and 1 <= v["count"] <= 8 for v in prompts.values())
    prior = metrics["granularity_prior"]
    assert prior["point_miou_off"] == metrics["miou"]["coco"]["prompt_kd"]["point"]["all"]
    assert "ap" in prior["proposals"] and "rpn_ms" in metrics["speed"]["prompt_kd+rpn"]
    report = (artifact.path / "report.md").read_text()
    assert "![overlays](overlays.png)" in report and f"{prior['point_miou_on']:.3f}" in report
