"""Learning rate: linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""

from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                         warmup_start_ratio: float | None = None, cosine_from_start: bool = False) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warm-up rises linearly to 1, from `warmup_start_ratio` (None: 1 / warmup_steps). The cosine
    runs over the steps after warm-up, or, with `cosine_from_start`, over all steps as timm's
    `CosineLRScheduler(warmup_prefix=False)` does in EdgeSAM's training (the warm-up then
    overrides its first steps, and the lr drops to the cosine's value when warm-up ends).
    """
    if warmup_steps > 0 and step < warmup_steps:
        if warmup_start_ratio is None:
            return (step + 1) / warmup_steps
        return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps
    start = 0 if cosine_from_start else warmup_steps
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(lr: float, batch_size: int, world_size: int, lr_ref_batch: int) -> float:
    """Linear scaling rule: `lr` is given for `lr_ref_batch` images per step."""
    return lr * batch_size * world_size / lr_ref_batch


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                    warmup_start_ratio: float | None = None,
                    cosine_from_start: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(
        step, total_steps, warmup_steps, min_lr_ratio, warmup_start_ratio, cosine_from_start))
