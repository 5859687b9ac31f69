import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import torch

from edgesam.eval.datasets import EvalItem, coco_items
from edgesam.eval.engine import (EvalProtocol, Segmenter, center_point, corrective_click, protocol, random_corrective_click,
                                 random_point, select_masks)
from edgesam.eval.miou import evaluate
from edgesam.eval.speed import model_speed
from edgesam.metrics import summarize
from edgesam.models.rpn import PRIOR_RULES, build_rpn


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

    rpn = None

    def encode(self, image):
        return None

    def segment(self, item, protocol, clicks, encoded=None, rng=None):
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
    records, overlays, _ = evaluate([_Oracle("perfect", True), _Oracle("empty", False)], [_item(coffee)], "toy",
                                    [EvalProtocol()], overlays=1)
    summary = summarize(records["sam"])["toy"]
    assert summary["perfect"]["point"]["all"] == 1.0 and summary["perfect"]["box"]["count"] == 3
    assert summary["empty"]["box"]["all"] == 0.0
    assert set(overlays[0].masks) == {"perfect", "empty"}


def test_segmenter_runs_both_protocols_with_and_without_rpn(student_256, coffee):
    item = _item(coffee)
    rpn = build_rpn(student_256.image_encoder, channels=16, num_convs=1).eval()
    sam_style = replace(protocol("sam", 2), point_mode="random", multimask_select="oracle")
    rule = replace(PRIOR_RULES["weighted"], score_threshold=0.0)  # random RPN weights: keep every proposal
    plain, prior = Segmenter("student", student_256), Segmenter("student+rpn", student_256, rpn, rule)
    records, _, stats = evaluate([plain, prior], [item], "toy", [sam_style, protocol("paper", 2)])
    sam, paper = summarize(records["sam"])["toy"], summarize(records["paper"])["toy"]
    for name in ("student", "student+rpn"):
        assert set(sam[name]) == {"box", "point", "point+1", "point+2"}
        assert set(paper[name]) == {"box", "box+1", "box+2", "point", "point+1", "point+2"}
        assert all(0.0 <= r.iou <= 1.0 for r in records["sam"] + records["paper"])
        assert sam[name]["box"]["count"] == 3
    # the prior changes the point prompt (a merged box is added), not the box prompt
    assert sam["student"]["box"]["all"] == sam["student+rpn"]["box"]["all"]
    assert sam["student"]["point"]["all"] != sam["student+rpn"]["point"]["all"]
    assert stats["student+rpn"].clicks == 3 and stats["student+rpn"].with_box == 3


def test_random_corrective_click_labels_by_the_ground_truth():
    gt = np.zeros((20, 20), bool)
    gt[:, :10] = True
    pred = np.zeros_like(gt)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y, label = random_corrective_click(pred, gt, rng, min_pixels=10)
        assert gt[int(y), int(x)] and label == 1  # only misses are wrong here
    x, y, label = random_corrective_click(gt, gt, rng, min_pixels=1)
    assert label == -1  # exact: no click
    almost = gt.copy()
    almost[0, :5] = False  # 5 wrong pixels, under the threshold
    assert random_corrective_click(almost, gt, rng, min_pixels=10)[2] == -1


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
    assert len(items) == 1 and items[0].masks.shape == (2, 400, 600)  # 2 of the 3, drawn at random, in order
    kept = [next(i for i, m in enumerate(item.masks) if np.array_equal(m, got)) for got in items[0].masks]
    assert kept == sorted(set(kept))
    np.testing.assert_allclose(items[0].boxes, item.boxes[kept])
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
    assert set(metrics["miou"]) == set(metrics["protocols"]) == {"paper", "sam"}
    expected = {"paper": {"box", "box+1", "point", "point+1"}, "sam": {"box", "point", "point+1"}}
    for name, per_dataset in metrics["miou"].items():
        assert set(per_dataset) == {"sa1b", "coco"}
        assert set(per_dataset["sa1b"]) == {"teacher", "encoder_kd", "prompt_kd"}
        assert set(per_dataset["coco"]) == {"teacher", "encoder_kd", "prompt_kd", "prompt_kd+rpn:official",
                                            "prompt_kd+rpn:weighted"}
        for models in per_dataset.values():
            for prompts in models.values():
                assert set(prompts) == expected[name]
                assert all(0.0 <= v["all"] <= 1.0 and 1 <= v["count"] <= 8 for v in prompts.values())
    prior = metrics["granularity_prior"]
    assert prior["point_miou"]["paper"]["off"] == metrics["miou"]["paper"]["coco"]["prompt_kd"]["point"]["all"]
    assert set(prior["point_miou"]["sam"]) == {"off", "official", "weighted"}
    clicks = prior["clicks"]["coco"]["prompt_kd+rpn:official"]
    assert clicks["clicks"] == metrics["miou"]["sam"]["coco"]["prompt_kd"]["point"]["count"]
    assert clicks["box_contains_click"] == clicks["with_box"]  # the official rule only keeps boxes around the click
    assert "ap" in prior["proposals"] and "rpn_ms" in metrics["speed"]["prompt_kd+rpn"]
    report = (artifact.path / "report.md").read_text()
    assert "![overlays](overlays.png)" in report and "protocol `paper`" in report and "protocol `sam`" in report
    rows = metrics["comparisons"]["paper"]
    assert {(r["model"], r["baseline"]) for r in rows} >= {("prompt_kd", "teacher"), ("prompt_kd", "encoder_kd")}
    assert all(r["diff_low"] <= r["diff"] <= r["diff_high"] for r in rows)
    assert "### Comparisons, protocol `paper`" in report
    assert f"| paper | {prior['point_miou']['paper']['off']:.3f} |" in report
    assert "training_curves.png" in manifest["files"]
    assert "![training curves](training_curves.png)" in report
    assert (artifact.path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in report.splitlines() if line.startswith(("| teacher | 6 |", "| encoder_kd | 5 |",
                                                                       "| prompt_kd | 5 |", "| rpn | 2 |"))]
    assert len(rows) == 4 and "iou_iter0 0.700, iou_iter1 0.900" in rows[2] and "train_box_iou 0.800" in rows[0]
    lines = (artifact.path / "ious.jsonl").read_text().splitlines()
    assert sum(v["count"] for m in metrics["miou"]["paper"]["coco"].values() for v in m.values()) + sum(
        v["count"] for m in metrics["miou"]["paper"]["sa1b"].values() for v in m.values()) == sum(
        json.loads(line)["protocol"] == "paper" for line in lines)
