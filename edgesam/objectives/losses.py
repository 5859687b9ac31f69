"""Mask and embedding losses, each with an optional valid-region mask (padding excluded).

Mask losses take logits and targets of shape (..., H, W) and compute one loss per mask
(over its valid pixels); `reduction="none"` returns those (...), `"mean"` their mean.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def _weights(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(like)
    return valid.to(like.dtype).expand_as(like)


def _reduce(per_mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return per_mask
    if reduction == "mean":
        return per_mask.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _pixel_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).flatten(-2).sum(-1) / weights.flatten(-2).sum(-1).clamp(min=1)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Focal loss (Lin et al.) per mask, averaged over valid pixels, as in SAM's training."""
    logits, targets = logits.float(), targets.float()
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(_pixel_mean(loss, _weights(valid, loss)), reduction)


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    smooth: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) and targets over the valid pixels of each mask."""
    prob = torch.sigmoid(logits.float())
    targets = targets.float()
    weights = _weights(valid, prob)
    inter = (prob * targets * weights).flatten(-2).sum(-1)
    total = ((prob + targets) * weights).flatten(-2).sum(-1)
    return _reduce(1 - (2 * inter + smooth) / (total + smooth), reduction)


def bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Binary cross-entropy with logits per mask, averaged over valid pixels."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return _reduce(_pixel_mean(loss, _weights(valid, loss)), reduction)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of (B, C, h, w) maps over the valid cells only.

    `valid` is (B, h, w) or (B, 1, h, w) (e.g. the padding mask on the embedding grid);
    the mean runs over valid cells and channels, so padding neither adds error nor dilutes it.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    sq = (pred.float() - target.float()) ** 2
    if valid is None:
        return sq.mean()
    if valid.dim() == pred.dim() - 1:
        valid = valid.unsqueeze(-3)
    weights = valid.to(sq.dtype).expand_as(sq)
    return (sq * weights).sum() / weights.sum().clamp(min=1)


def iou_head_loss(iou_pred: torch.Tensor, actual_iou: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """SAM's IoU-head loss: MSE between predicted and actual mask IoU."""
    return _reduce((iou_pred.float() - actual_iou.detach().float()) ** 2, reduction)
