"""EdgeSAM's two distillation objectives as pure functions.

Phase 1 (`encoder_kd_loss`): the student encoder's embedding matches the teacher's,
pixel-wise MSE over the valid (unpadded) cells. Phase 2 (`prompt_in_the_loop_loss`): the
student's masks match the teacher's for the same prompts, and each further decoding
iteration adds points where the two disagree (EdgeSAM, arXiv 2312.06660, Sec. 3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from edgesam.config import PromptKDConfig
from edgesam.metrics import mask_iou
from edgesam.models.decoding import decode
from edgesam.objectives.losses import bce_loss, dice_loss, masked_mse
from edgesam.objectives.prompts import Prompts, disagreement_points


def valid_on_grid(valid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Downsample (B, H, W) valid-pixel masks to (B, h, w): a cell is valid if any of it is
    (the convention of `edgesam.data.transforms.valid_mask`)."""
    if valid.shape[-2:] == tuple(size):
        return valid.bool()
    return F.interpolate(valid[:, None].float(), size=size, mode="area")[:, 0] > 0


def encoder_kd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pixel-wise MSE between (B, C, h, w) embeddings over the valid cells only.

    `valid` is the (B, H, W) unpadded region at input resolution (or already at h x w).
    """
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"student embedding {tuple(student_emb.shape)} and teacher embedding "
            f"{tuple(teacher_emb.shape)} differ in shape"
        )
    grid = valid_on_grid(valid, student_emb.shape[-2:])
    return masked_mse(student_emb, teacher_emb.to(student_emb.dtype), grid)


def num_mask_outputs(prompts: Prompts, cfg: PromptKDConfig) -> int:
    """EdgeSAM: all 4 mask tokens for point prompts, 1 for boxes (both configurable)."""
    return cfg.box_multimask if prompts.boxes is not None else cfg.point_multimask


def prompt_in_the_loop_loss(
    student_sam: Sam,
    teacher_sam: Sam,
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    prompts: list[Prompts],
    valid: torch.Tensor,
    cfg: PromptKDConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """EdgeSAM's phase-2 loss on a batch of B images.

    Both models decode the same prompts, the teacher (frozen, no grad) from its stored
    embedding. The loss is Dice + BCE (weights from `cfg`) between the student's mask logits
    and the teacher's masks binarized at the mask threshold (or the teacher's probabilities
    when `cfg.target == "logits"`), over the valid region, summed over `cfg.decode_iters`
    iterations and divided by their number. Between iterations both predictions are
    binarized; of several masks the one the teacher scores highest is taken (same index for
    both); `cfg.points_per_iter` points sampled where they disagree (positive on false
    negatives, negative on false positives) are appended to both models' prompts.

    Args:
        student_emb, teacher_emb: (B, 256, h, w) image embeddings.
        prompts: B initial prompt sets in the input frame.
        valid: (B, H, W) valid-pixel masks at input resolution (or on the low-res grid).

    Returns:
        the loss averaged over images, and metrics (per-iteration loss and student/teacher
        mask IoU, as floats).
    """
    if len(prompts) != student_emb.shape[0] or teacher_emb.shape[0] != student_emb.shape[0]:
        raise ValueError(
            f"batch mismatch: {len(prompts)} prompt sets, student {tuple(student_emb.shape)}, "
            f"teacher {tuple(teacher_emb.shape)}"
        )
    if cfg.decode_iters < 1:
        raise ValueError(f"decode_iters must be >= 1, got {cfg.decode_iters}")
    grid_size = (4 * student_emb.shape[-2], 4 * student_emb.shape[-1])
    valid = valid_on_grid(valid.to(student_emb.device), grid_size)
    input_size = student_sam.image_encoder.img_size
    threshold = teacher_sam.mask_threshold
    iter_loss = torch.zeros(cfg.decode_iters)
    iter_iou = torch.zeros(cfg.decode_iters)
    total = student_emb.new_zeros(())
    for i, image_prompts in enumerate(prompts):
        outputs = num_mask_outputs(image_prompts, cfg)
        current = image_prompts
        image_loss = student_emb.new_zeros(())
        for it in range(cfg.decode_iters):
            with torch.no_grad():
                t_logits, t_iou = decode(
                    teacher_sam, teacher_emb[i : i + 1].float(), current.points, current.labels,
                    current.boxes, num_outputs=outputs,
                )
            s_logits, _ = decode(
                student_sam, student_emb[i : i + 1], current.points, current.labels,
                current.boxes, num_outputs=outputs,
            )
            target = (t_logits > threshold).float() if cfg.target == "binary" else torch.sigmoid(t_logits)
            mask = valid[i].expand_as(s_logits)
            loss = cfg.dice_weight * dice_loss(s_logits, target, mask) + cfg.bce_weight * bce_loss(
                s_logits, target, mask
            )
            image_loss = image_loss + loss
            best = t_iou.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            t_mask = t_logits[rows, best] > threshold
            s_mask = s_logits.detach()[rows, best] > threshold
            iter_loss[it] += loss.detach().float().cpu()
            iter_iou[it] += mask_iou(s_mask, t_mask, valid[i]).float().mean().cpu()
            if it + 1 < cfg.decode_iters:
                points, labels = disagreement_points(
                    t_mask, s_mask, valid[i], cfg.points_per_iter, input_size, generator, cfg.min_disagreement_cells
                )
                current = current.with_points(points, labels)
        total = total + image_loss / cfg.decode_iters
    batch = len(prompts)
    metrics = {f"loss_iter{k}": float(iter_loss[k]) / batch for k in range(cfg.decode_iters)}
    metrics |= {f"iou_iter{k}": float(iter_iou[k]) / batch for k in range(cfg.decode_iters)}
    return total / batch, metrics

