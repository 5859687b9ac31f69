import numpy as np
import pytest
import torch

from edgesam.metrics import IoURecord, mask_iou, size_bucket, summarize


def _disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    ys, xs = np.mgrid[:h, :w]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2


def test_mask_iou_values():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert mask_iou(a, b).item() == pytest.approx(4 / 12)
    assert mask_iou(a, a).item() == 1.0
    assert mask_iou(a, np.zeros_like(a)).item() == 0.0
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)).item() == 1.0
    batch = mask_iou(torch.stack([torch.as_tensor(a), torch.as_tensor(b)]), torch.as_tensor(a).expand(2, 4, 4))
    assert batch.shape == (2,)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(a, b[:3])


def _records(predict) -> list[IoURecord]:
    gts = [_disk(64, 96, 30, 30, r) for r in (2, 8, 30)]
    return [
        IoURecord("m", "d", prompt, size_bucket(float(g.sum()), (64, 96)), mask_iou(predict(g), g).item())
        for g in gts for prompt in ("box", "point")
    ]


def test_perfect_predictor_scores_one_and_empty_zero():
    perfect = summarize(_records(lambda g: g))["d"]["m"]
    empty = summarize(_records(np.zeros_like))["d"]["m"]
    for prompt in ("box", "point"):
        assert perfect[prompt]["all"] == 1.0
        assert empty[prompt]["all"] == 0.0
        assert perfect[prompt]["count"] == 3
        assert {"small", "medium", "large"} <= set(perfect[prompt])


def test_size_buckets_scale_with_the_frame():
    assert size_bucket(31**2, (480, 640)) == "small"
    assert size_bucket(50**2, (480, 640)) == "medium"
    assert size_bucket(97**2, (480, 640)) == "large"
    # a 256-pixel frame is 2.5x smaller: "small" is below (32 / 2.5)^2
    assert size_bucket(14**2, (256, 200)) == "medium"
    assert size_bucket(12**2, (256, 200)) == "small"


def test_summary_averages_per_group():
    records = [IoURecord("a", "d", "box", "small", 0.5), IoURecord("a", "d", "box", "large", 1.0),
               IoURecord("b", "d", "box", "small", 0.25)]
    out = summarize(records)["d"]
    assert out["a"]["box"] == {"all": 0.75, "small": 0.5, "large": 1.0, "count": 2}
    assert out["b"]["box"]["all"] == 0.25


def test_mask_iou_counts_only_valid_pixels():
    pred, gt = torch.zeros(2, 8, 8, dtype=torch.bool), torch.zeros(2, 8, 8, dtype=torch.bool)
    pred[0, :, :4], gt[0, :, :2] = True, True  # IoU 0.5 everywhere, 1.0 in the left quarter
    pred[1, :, 6:] = True  # only in the padding: an exact empty prediction inside
    valid = torch.zeros(8, 8, dtype=torch.bool)
    valid[:, :2] = True
    assert mask_iou(pred, gt).tolist() == [0.5, 0.0]
    assert mask_iou(pred, gt, valid).tolist() == [1.0, 1.0]
