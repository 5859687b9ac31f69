"""Losses: known values, valid-region masking, reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal

from edgesam.objectives.losses import (
    bce_loss,
    dice_loss,
    iou_head_loss,
    masked_mse,
    sigmoid_focal_loss,
)


def test_focal_matches_torchvision_per_pixel_mean():
    logits, targets = torch.randn(3, 8, 8), (torch.rand(3, 8, 8) > 0.5).float()
    expected = tv_focal(logits, targets, alpha=0.25, gamma=2.0, reduction="mean")
    assert sigmoid_focal_loss(logits, targets) == pytest.approx(float(expected), rel=1e-5)


def test_perfect_prediction_gives_zero_dice_and_near_zero_focal():
    targets = torch.zeros(2, 16, 16)
    targets[:, 4:12, 4:12] = 1
    logits = (targets * 2 - 1) * 30
    assert dice_loss(logits, targets) < 1e-4
    assert sigmoid_focal_loss(logits, targets) < 1e-8


def test_dice_of_disjoint_masks_is_near_one():
    a, b = torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)
    a[:, :16], b[:, 16:] = 1, 1
    assert dice_loss((a * 2 - 1) * 30, b) == pytest.approx(1.0, abs=0.01)


def test_padding_is_ignored_by_every_mask_loss():
    logits, targets = torch.randn(2, 16, 16), (torch.rand(2, 16, 16) > 0.5).float()
    valid = torch.zeros(16, 16, dtype=torch.bool)
    valid[:10, :12] = True
    garbage = logits.clone()
    garbage[:, ~valid] = 100.0  # wrong and confident, but only in the padding
    for loss in (sigmoid_focal_loss, dice_loss, bce_loss):
        assert loss(garbage, targets, valid) == pytest.approx(float(loss(logits, targets, valid)), rel=1e-5)
        assert loss(garbage, targets) != pytest.approx(float(loss(logits, targets)), rel=1e-3)
    expected = F.binary_cross_entropy_with_logits(logits[:, :10, :12], targets[:, :10, :12])
    assert bce_loss(logits, targets, valid) == pytest.approx(float(expected), rel=1e-5)


def test_reduction_none_gives_one_loss_per_mask():
    logits, targets = torch.randn(4, 3, 8, 8), torch.rand(4, 3, 8, 8).round()
    per_mask = dice_loss(logits, targets, reduction="none")
    assert per_mask.shape == (4, 3)
    assert per_mask.mean() == pytest.approx(float(dice_loss(logits, targets)), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        bce_loss(logits, targets, reduction="sum")


def test_masked_mse_averages_over_valid_cells_only():
    pred, target = torch.zeros(2, 4, 6, 6), torch.zeros(2, 4, 6, 6)
    valid = torch.zeros(2, 6, 6, dtype=torch.bool)
    valid[:, :3, :] = True
    pred[:, :, :3, :] = 2.0  # error 4 on every valid cell
    pred[:, :, 3:, :] = 50.0  # padding: ignored
    assert masked_mse(pred, target, valid) == pytest.approx(4.0)
    assert masked_mse(pred, target, valid[:, None]) == pytest.approx(4.0)
    assert masked_mse(pred, target) > 4.0
    with pytest.raises(ValueError, match="differ in shape"):
        masked_mse(pred, target[:, :2])


def test_iou_head_loss_is_mse_to_actual_iou():
    pred = torch.tensor([[0.5, 1.0]], requires_grad=True)
    actual = torch.tensor([[0.25, 1.0]])
    loss = iou_head_loss(pred, actual)
    assert float(loss) == pytest.approx(0.0625 / 2)
    loss.backward()
    assert pred.grad is not None
