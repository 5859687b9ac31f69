import copy

import pytest
import torch

import edgesam.objectives.distill as distill
from edgesam.config import PromptKDConfig
from edgesam.objectives.distill import encoder_kd_loss, image_weights, prompt_in_the_loop_loss, valid_on_grid
from edgesam.models.tiny_sam import build_tiny_sam
from edgesam.objectives.prompts import PAD_LABEL, Prompts, batch_prompts

IMG = 64  # embeddings 4 x 4, low-res masks 16 x 16


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_tiny_sam(img_size=IMG, embed_dim=32, depth=1, num_heads=1).requires_grad_(False)


def test_encoder_kd_loss_ignores_padding():
    teacher_emb = torch.randn(2, 8, 4, 4)
    student_emb = teacher_emb.clone()
    student_emb[0, :, :, 3] += 100.0  # garbage in the padded last column of image 0
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[0, :, 3] = False
    assert encoder_kd_loss(student_emb, teacher_emb, valid).item() == pytest.approx(0.0)
    valid[0, :, 3] = True
    assert encoder_kd_loss(student_emb, teacher_emb, valid).item() > 100.0


def test_encoder_kd_loss_is_the_mse_over_valid_cells():
    teacher_emb, student_emb = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4, requires_grad=True)
    valid = torch.zeros(1, 64, 64, dtype=torch.bool)
    valid[0, :40, :] = True  # rows 0..39 of 64: embedding rows 0..2 (row 2 partly)
    loss = encoder_kd_loss(student_emb, teacher_emb, valid)
    expected = ((student_emb - teacher_emb)[:, :, :3] ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student_emb.grad[:, :, 3].abs().sum() == 0
    with pytest.raises(ValueError, match="differ in shape"):
        encoder_kd_loss(student_emb, torch.randn(1, 8, 2, 2), valid)


def test_valid_on_grid_marks_cells_touching_the_image():
    valid = torch.zeros(1, 64, 64, dtype=torch.bool)
    valid[0, :33, :64] = True
    grid = valid_on_grid(valid, (4, 4))
    assert grid[0, :, 0].tolist() == [True, True, True, False]


def _prompts(kind: str) -> tuple[Prompts, torch.Tensor]:
    """Two images' prompts joined (`batch_prompts`): boxes or points, 2 on image 0, 1 on image 1."""
    if kind == "box":
        per_image = [Prompts(boxes=torch.tensor([[4.0, 4.0, 40.0, 40.0], [20.0, 10.0, 60.0, 30.0]])),
                     Prompts(boxes=torch.tensor([[8.0, 30.0, 50.0, 60.0]]))]
    else:
        per_image = [Prompts(torch.tensor([[[30.0, 30.0]], [[10.0, 50.0]]]), torch.ones(2, 1, dtype=torch.long)),
                     Prompts(torch.tensor([[[12.0, 40.0]]]), torch.ones(1, 1, dtype=torch.long))]
    return batch_prompts(per_image)


@pytest.mark.parametrize("kind", ["box", "point"])
def test_prompt_loss_is_small_for_an_identical_student_and_trains_the_student(teacher, kind):
    student = copy.deepcopy(teacher).requires_grad_(True)
    teacher_emb = torch.randn(2, 256, 4, 4)
    student_emb = teacher_emb.clone().requires_grad_(True)
    valid = torch.ones(2, IMG, IMG, dtype=torch.bool)
    cfg = PromptKDConfig(decode_iters=2)
    prompts, index = _prompts(kind)
    loss, metrics = prompt_in_the_loop_loss(student, teacher, student_emb, teacher_emb.half(), prompts, index, valid,
                                            cfg)
    assert float(metrics["iou_iter0"]) == pytest.approx(1.0) and float(metrics["iou_iter1"]) == pytest.approx(1.0)
    assert loss.item() == pytest.approx(float(metrics["loss_iter0"] + metrics["loss_iter1"]) / 2, rel=1e-5)
    loss.backward()
    assert student_emb.grad.abs().sum() > 0
    assert student.mask_decoder.output_upscaling[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="batch mismatch"):
        prompt_in_the_loop_loss(student, teacher, student_emb, teacher_emb, prompts, index[:1], valid, cfg)


def test_image_weights_average_each_image_over_its_own_prompts():
    weights = image_weights(torch.tensor([0, 0, 0, 1, 2, 2]), 3)
    assert weights.tolist() == pytest.approx([1 / 9] * 3 + [1 / 3] + [1 / 6] * 2)
    per_prompt = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0, 6.0])
    assert (per_prompt * weights).sum().item() == pytest.approx((2.0 + 10.0 + 5.0) / 3)


class _FakeDecode:
    """Stands in for `decode_batched`: the teacher's token 1 (its best-scored) covers the upper
    left quadrant, the student predicts background everywhere; records every call."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def __call__(self, sam, emb, image_index, points, labels, boxes, mask_input=None, num_outputs=1):
        n = len(image_index)
        self.calls.append({"teacher": sam is self.teacher, "points": points, "labels": labels, "boxes": boxes,
                           "outputs": num_outputs, "image_index": image_index})
        logits = torch.full((n, num_outputs, 16, 16), -5.0)
        iou = torch.tensor([0.1, 0.9, 0.2, 0.3])[:num_outputs].repeat(n, 1)
        if sam is self.teacher:
            logits[:, min(1, num_outputs - 1), :8, :8] = 5.0
        else:
            logits = logits + emb.sum() * 0
        return logits, iou


@pytest.mark.parametrize("kind, initial, outputs", [("box", 0, 1), ("point", 1, 4)])
def test_prompt_loop_adds_false_negative_points_to_both_models(teacher, monkeypatch, kind, initial, outputs):
    fake = _FakeDecode(teacher)
    monkeypatch.setattr(distill, "decode_batched", fake)
    student = copy.deepcopy(teacher)
    emb = torch.zeros(2, 256, 4, 4, requires_grad=True)
    valid = torch.ones(2, IMG, IMG, dtype=torch.bool)
    cfg = PromptKDConfig(decode_iters=3, points_per_iter=1)
    prompts, index = _prompts(kind)
    _, metrics = prompt_in_the_loop_loss(student, teacher, emb, emb.detach(), prompts, index, valid, cfg,
                                         torch.Generator().manual_seed(0))
    assert len(fake.calls) == 3 * 2  # iterations x (teacher, student), whatever the number of images
    assert [c["outputs"] for c in fake.calls] == [outputs] * 6
    for it in range(3):
        t, s = fake.calls[2 * it], fake.calls[2 * it + 1]
        assert t["teacher"] and not s["teacher"] and torch.equal(t["image_index"], index)
        for key in ("points", "labels", "boxes"):  # the same prompts for both models
            assert (t[key] is None and s[key] is None) or torch.equal(t[key], s[key])
        if it:
            assert t["labels"].shape == (3, initial + it)
            added = t["points"][:, initial:]
            assert (t["labels"][:, initial:] == 1).all()  # false negatives: positive points
            assert (added < 32).all() and (added >= 0).all()  # inside the teacher's quadrant
    assert kind == "point" or (fake.calls[-1]["boxes"] is not None and fake.calls[-1]["points"].shape == (3, 2, 2))
    assert float(metrics["iou_iter0"]) == 0.0


def test_prompt_loop_pads_when_models_agree_and_single_iteration_adds_nothing(teacher, monkeypatch):
    fake = _FakeDecode(teacher)
    monkeypatch.setattr(distill, "decode_batched", fake)
    emb = torch.zeros(2, 256, 4, 4)
    valid = torch.zeros(2, IMG, IMG, dtype=torch.bool)  # nothing valid: nothing to disagree on
    prompts, index = _prompts("point")
    prompt_in_the_loop_loss(teacher, teacher, emb, emb, prompts, index, valid, PromptKDConfig(decode_iters=2))
    assert (fake.calls[2]["labels"][:, 1:] == PAD_LABEL).all()
    fake.calls.clear()
    prompt_in_the_loop_loss(teacher, teacher, emb, emb, prompts, index, valid, PromptKDConfig(decode_iters=1))
    assert len(fake.calls) == 2


def test_prompt_loss_targets(teacher):
    student = copy.deepcopy(teacher)
    for p in student.mask_decoder.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    emb = torch.randn(2, 256, 4, 4)
    valid = torch.ones(2, IMG, IMG, dtype=torch.bool)
    prompts, index = _prompts("box")
    binary, _ = prompt_in_the_loop_loss(student, teacher, emb, emb, prompts, index, valid,
                                        PromptKDConfig(decode_iters=1))
    soft, _ = prompt_in_the_loop_loss(student, teacher, emb, emb, prompts, index, valid,
                                      PromptKDConfig(decode_iters=1, target="logits"))
    assert binary.item() > 0 and soft.item() > 0 and binary.item() != pytest.approx(soft.item())


def test_compare_with_teacher_against_ground_truth_and_teacher(teacher):
    import numpy as np

    from edgesam.eval.datasets import EvalItem
    from edgesam.eval.miou import compare_with_teacher

    masks = np.zeros((2, 48, 64), dtype=bool)
    masks[0, 4:20, 4:30] = True
    masks[1, 30:44, 40:60] = True
    image = np.where(masks.any(0)[..., None], 220, 30).astype(np.uint8).repeat(3, axis=2)
    item = EvalItem("a", image, masks, np.array([[4, 4, 30, 20], [40, 30, 60, 44]], dtype=float))
    results = compare_with_teacher([item, item], teacher, {"copy": copy.deepcopy(teacher)})
    assert results["copy"]["box_teacher"] == 1.0 and results["copy"]["point_teacher"] == 1.0
    assert results["copy"]["box_gt"] == results["teacher"]["box_gt"]
    assert results["teacher"]["objects"] == results["copy"]["objects"] == 4
    assert 0.0 <= results["teacher"]["point_gt"] <= 1.0
