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
from edgesam.models.decoding import decode_batched
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


def image_weights(image_index: torch.Tensor, num_images: int) -> torch.Tensor:
    """(N,) weight of each prompt such that a weighted sum over prompts is the mean over images
    of each image's mean over its prompts (every image counts the same, however many prompts
    it has). Counted with `index_add_`, which needs no host sync (`bincount` would)."""
    ones = torch.ones(len(image_index), device=image_index.device)
    counts = torch.zeros(num_images, device=image_index.device).index_add_(0, image_index, ones)
    return 1.0 / (counts.index_select(0, image_index) * num_images)


def _mask_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, valid: torch.Tensor, threshold: float,
               cfg: PromptKDConfig) -> torch.Tensor:
    """(N,) Dice + BCE of each prompt's K student masks against the teacher's, over valid cells."""
    target = (t_logits > threshold).float() if cfg.target == "binary" else torch.sigmoid(t_logits)
    mask = valid[:, None].expand_as(s_logits)
    dice = dice_loss(s_logits, target, mask, reduction="none")
    bce = bce_loss(s_logits, target, mask, reduction="none")
    return (cfg.dice_weight * dice + cfg.bce_weight * bce).mean(dim=1)


def _check_batch(student_emb: torch.Tensor, teacher_emb: torch.Tensor, prompts: Prompts, image_index: torch.Tensor,
                 cfg: PromptKDConfig) -> None:
    if teacher_emb.shape[0] != student_emb.shape[0] or len(image_index) != len(prompts):
        raise ValueError(
            f"batch mismatch: {len(prompts)} prompts with {len(image_index)} image indices, student "
            f"{tuple(student_emb.shape)}, teacher {tuple(teacher_emb.shape)}"
        )
    if cfg.decode_iters < 1:
        raise ValueError(f"decode_iters must be >= 1, got {cfg.decode_iters}")


def prompt_in_the_loop_loss(
    student_sam: Sam,
    teacher_sam: Sam,
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    prompts: Prompts,
    image_index: torch.Tensor,
    valid: torch.Tensor,
    cfg: PromptKDConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """EdgeSAM's phase-2 loss on a batch of B images, all their prompts decoded together.

    Both models decode the same prompts, the teacher (frozen, no grad) from its stored
    embedding: one student and one teacher decoder call per iteration, whatever B. The loss
    is Dice + BCE (weights from `cfg`) between the student's mask logits and the teacher's
    masks binarized at the mask threshold (or the teacher's probabilities when
    `cfg.target == "logits"`), over the valid region, summed over `cfg.decode_iters`
    iterations and divided by their number; each image's mean over its prompts, averaged
    over images. Between iterations both predictions are binarized; of several masks the
    one the teacher scores highest is taken (same index for both); `cfg.points_per_iter`
    points sampled where they disagree (positive on false negatives, negative on false
    positives) are appended to both models' prompts. Nothing here waits on the device.

    Args:
        student_emb, teacher_emb: (B, 256, h, w) image embeddings (the teacher's may be fp16).
        prompts: the N prompts of all images in the input frame, one kind for all.
        image_index: (N,) image of each prompt (`edgesam.objectives.prompts.batch_prompts`).
        valid: (B, H, W) valid-pixel masks at input resolution (or on the low-res grid).

    Returns:
        the loss, and metrics as 0-d tensors on the device (per-iteration loss and
        student/teacher mask IoU, means over images).
    """
    _check_batch(student_emb, teacher_emb, prompts, image_index, cfg)
    grid = valid_on_grid(valid.to(student_emb.device), (4 * student_emb.shape[-2], 4 * student_emb.shape[-1]))
    valid = grid.index_select(0, image_index)
    weights = image_weights(image_index, student_emb.shape[0])
    teacher_emb = teacher_emb.float()
    threshold, outputs = teacher_sam.mask_threshold, num_mask_outputs(prompts, cfg)
    total, losses, ious, current = student_emb.new_zeros(()), {}, {}, prompts
    for it in range(cfg.decode_iters):
        with torch.no_grad():
            t_logits, t_iou = decode_batched(teacher_sam, teacher_emb, image_index, current.points, current.labels,
                                             current.boxes, num_outputs=outputs)
        s_logits, _ = decode_batched(student_sam, student_emb, image_index, current.points, current.labels,
                                     current.boxes, num_outputs=outputs)
        loss = (_mask_loss(s_logits, t_logits, valid, threshold, cfg) * weights).sum()
        total = total + loss
        rows = torch.arange(len(t_iou), device=t_iou.device)
        best = t_iou.argmax(dim=1)
        t_mask, s_mask = t_logits[rows, best] > threshold, s_logits.detach()[rows, best] > threshold
        losses[f"loss_iter{it}"] = loss.detach()
        ious[f"iou_iter{it}"] = (mask_iou(s_mask, t_mask, valid).float() * weights).sum()
        if it + 1 < cfg.decode_iters:
            points, labels = disagreement_points(t_mask, s_mask, valid, cfg.points_per_iter,
                                                 student_sam.image_encoder.img_size, generator,
                                                 cfg.min_disagreement_cells)
            current = current.with_points(points, labels)
    return total / cfg.decode_iters, {**losses, **ious}


def prompt_in_the_loop_loss_per_image(
    student_sam: Sam,
    teacher_sam: Sam,
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    prompts: list[Prompts],
    valid: torch.Tensor,
    cfg: PromptKDConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss decoded one image at a time (B x decode_iters calls of each model): the
    reference the batched loss is tested against (equal within float rounding; with
    decode_iters 2 both draw the same random numbers) and benchmarked beside."""
    if len(prompts) != student_emb.shape[0]:
        raise ValueError(f"batch mismatch: {len(prompts)} prompt sets for {student_emb.shape[0]} images")
    total, sums = student_emb.new_zeros(()), {}
    for i, image_prompts in enumerate(prompts):
        index = torch.zeros(len(image_prompts), dtype=torch.int64, device=student_emb.device)
        loss, metrics = prompt_in_the_loop_loss(student_sam, teacher_sam, student_emb[i : i + 1],
                                                teacher_emb[i : i + 1], image_prompts, index, valid[i : i + 1],
                                                cfg, generator)
        total = total + loss
        sums = {key: sums.get(key, 0.0) + value for key, value in metrics.items()}
    return total / len(prompts), {key: value / len(prompts) for key, value in sums.items()}
