"""The paper profile against EdgeSAM's released recipe (docs/PAPER_RECIPE.md sources each value)."""

from __future__ import annotations

import pytest

from edgesam.config import load_profile
from edgesam.train import scaled_lr

PAPER = load_profile("paper")


@pytest.mark.parametrize("phase, peak", [("encoder_kd", 1.25e-2), ("prompt_kd", 1e-4)])
def test_effective_peak_lr_at_the_papers_global_batch(phase, peak):
    train = getattr(PAPER, phase).train
    global_batch = train.batch_size * PAPER.runtime.num_workers
    assert global_batch == {"encoder_kd": 64, "prompt_kd": 16}[phase]  # 8 GPUs x 8, 8 GPUs x 2
    assert scaled_lr(train.lr, train.batch_size, PAPER.runtime.num_workers, train.lr_ref_batch) == pytest.approx(peak)


def test_paper_profile_keeps_the_official_switches():
    assert PAPER.encoder_kd.upsample_mode == "bicubic" and PAPER.encoder_kd.pretrained is True
    assert PAPER.prompt_kd.freeze_iou_head and PAPER.prompt_kd.freeze_prompt_encoder
    assert PAPER.prompt_kd.train.warmup_steps == 0 and PAPER.prompt_kd.train.grad_clip == 0.01
    assert PAPER.rpn.merge == "official" and PAPER.evaluate.protocols[0] == "paper"


def test_finetune_profile_starts_phase_2_from_a_released_student():
    cfg = load_profile("finetune")
    assert cfg.encoder_kd.init is not None and cfg.encoder_kd.train.epochs == 0
    train = cfg.prompt_kd.train
    assert scaled_lr(train.lr, train.batch_size, cfg.runtime.num_workers, train.lr_ref_batch) == pytest.approx(1e-4)
