import random

import pytest
import torch

from edgesam.objectives.prompts import (
    PAD_LABEL,
    Prompts,
    batch_prompts,
    choose_prompt_kind,
    disagreement_points,
    gt_boxes,
    gt_points,
    sample_annotations,
)


def _masks(h: int = 8, w: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt 0: false negatives only; prompt 1: false positives only; prompt 2: agreement."""
    teacher = torch.zeros(3, h, w, dtype=torch.bool)
    student = torch.zeros(3, h, w, dtype=torch.bool)
    teacher[0, 2:4, 5:7] = True  # teacher fg, student bg
    teacher[1, 1:3, 1:3] = student[1, 1:3, 1:3] = True
    student[1, 6, 0] = True  # student fg, teacher bg
    teacher[2, 3:6, 3:6] = student[2, 3:6, 3:6] = True
    return teacher, student


def _cell(point: torch.Tensor, cell: float) -> tuple[int, int]:
    """Grid (row, col) of a point in SAM's pixel convention."""
    return int((point[1] + 0.5) // cell), int((point[0] + 0.5) // cell)


def test_disagreement_points_land_in_error_regions_and_are_scaled():
    teacher, student = _masks()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        points, labels = disagreement_points(teacher, student, None, 1, input_size=32, generator=gen)
        assert points.shape == (3, 1, 2) and labels.shape == (3, 1)
        assert labels.tolist() == [[1], [0], [PAD_LABEL]]
        row, col = _cell(points[0, 0], 4.0)
        assert teacher[0, row, col] and not student[0, row, col]
        assert _cell(points[1, 0], 4.0) == (6, 0)
    # the one false-positive cell (6, 0) has its centre at pixel (0.5 * 4 - 0.5, 6.5 * 4 - 0.5)
    assert points[1, 0].tolist() == [1.5, 25.5]


def test_disagreement_points_cover_the_region_uniformly_and_deterministically():
    teacher, student = _masks()
    seen = set()
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        points, _ = disagreement_points(teacher, student, None, 1, 32, gen)
        seen.add(_cell(points[0, 0], 4.0))
    assert seen == {(2, 5), (2, 6), (3, 5), (3, 6)}
    a = disagreement_points(teacher, student, None, 2, 32, torch.Generator().manual_seed(7))
    b = disagreement_points(teacher, student, None, 2, 32, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_disagreement_points_pad_when_region_is_small_and_respect_valid():
    teacher, student = _masks()
    points, labels = disagreement_points(teacher, student, None, 3, 32, torch.Generator().manual_seed(0))
    assert labels[0].tolist() == [1, 1, 1]
    assert labels[1].tolist() == [0, PAD_LABEL, PAD_LABEL]  # a single false-positive cell
    assert len({tuple(p) for p in points[0].tolist()}) == 3  # without replacement
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[:, 5:] = False  # the false negatives of prompt 0 lie in the padding
    _, labels = disagreement_points(teacher, student, valid, 1, 32, torch.Generator().manual_seed(0))
    assert labels.tolist() == [[PAD_LABEL], [0], [PAD_LABEL]]
    # EdgeSAM's threshold: fewer disagreeing cells than min_cells -> no point at all
    counts = (teacher ^ student).flatten(1).sum(1).tolist()
    _, labels = disagreement_points(teacher, student, None, 1, 32, torch.Generator().manual_seed(0),
                                    min_cells=counts[0])
    assert labels[0].tolist() == [1] and labels[1].tolist() == [PAD_LABEL]


def test_disagreement_points_take_a_valid_region_per_prompt():
    teacher, student = _masks()
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    valid[0, :, 5:] = False  # prompt 0's false negatives lie in its image's padding
    _, labels = disagreement_points(teacher, student, valid, 1, 32, torch.Generator().manual_seed(0))
    assert labels.tolist() == [[PAD_LABEL], [0], [PAD_LABEL]]


def test_disagreement_points_rejects_mismatched_masks_and_too_many_points():
    with pytest.raises(ValueError, match="must both be"):
        disagreement_points(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5), None, 1, 16)
    with pytest.raises(ValueError, match="num_points must be in 1..16"):
        disagreement_points(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), None, 17, 16)


def test_batch_prompts_joins_the_images_prompts_with_their_image_index():
    a = Prompts(boxes=torch.zeros(2, 4))
    b = Prompts(boxes=torch.ones(3, 4))
    joined, index = batch_prompts([a, b])
    assert joined.boxes.shape == (5, 4) and joined.points is None and index.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="mix kinds"):
        batch_prompts([a, Prompts(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.long))])


ANNOTATIONS = [
    {"id": 1, "bbox": [10, 20, 30, 40], "point_coords": [[25.0, 40.0]]},
    {"id": 2, "bbox": [0, 0, 5, 5], "point_coords": [[2.0, 3.0]]},
    {"id": 3, "bbox": [50, 60, 10, 10], "point_coords": [[55.0, 65.0]]},
]


def test_gt_boxes_and_points_in_the_input_frame():
    assert gt_boxes(ANNOTATIONS[:1], scale=0.5).tolist() == [[5.0, 10.0, 20.0, 30.0]]
    points, labels = gt_points(ANNOTATIONS, scale=2.0)
    assert points.shape == (3, 1, 2) and points[0, 0].tolist() == [50.0, 80.0]
    assert labels.tolist() == [[1], [1], [1]]
    with pytest.raises(ValueError, match="annotation 9 has no point_coords"):
        gt_points([{"id": 9, "bbox": [0, 0, 1, 1], "point_coords": []}])


def test_sample_annotations_caps_and_choose_prompt_kind():
    rng = random.Random(0)
    assert len(sample_annotations(3, 2, rng)) == 2 and sample_annotations(3, 16, rng) == [0, 1, 2]
    with pytest.raises(ValueError, match="without annotations"):
        sample_annotations(0, 16, rng)
    assert choose_prompt_kind("box", 0.0) == "box" and choose_prompt_kind("point", 1.0) == "point"
    kinds = [choose_prompt_kind("both", 0.5, random.Random(i)) for i in range(400)]
    assert 150 < kinds.count("box") < 250

    def draws(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [choose_prompt_kind("both", 0.3, rng) for _ in range(40)]

    assert draws(5) == draws(5) != draws(6)


def test_prompts_with_points_keeps_the_box():
    box = Prompts(boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    grown = box.with_points(torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.long))
    assert grown.boxes is box.boxes and grown.points.shape == (1, 1, 2)
    again = grown.with_points(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long))
    assert again.points.shape == (1, 2, 2) and again.labels.tolist() == [[1, 0]]
