from dataclasses import replace

import pytest
import torch

from edgesam.models.rpn import (PRIOR_RULES, RPN, assign_targets, contains, load_rpn, prior_boxes, proposals, rpn_loss,
                                save_rpn)


WEIGHTED, OFFICIAL = PRIOR_RULES["weighted"], PRIOR_RULES["official"]


def test_weighted_merge_averages_the_nearest_by_confidence():
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 2, 14, 14], [100, 100, 120, 120]])
    scores = torch.tensor([0.75, 0.25, 1.0])
    rule = replace(WEIGHTED, k=2)
    merged, found = prior_boxes(torch.tensor([[6.0, 6.0]]), boxes, scores, rule)
    torch.testing.assert_close(merged, (0.75 * boxes[0] + 0.25 * boxes[1])[None])
    assert found.tolist() == [True]
    # k beyond the proposal count uses them all; several points are merged independently
    merged, _ = prior_boxes(torch.tensor([[4.0, 5.0], [46.0, 5.0]]), boxes[:2], torch.ones(2), replace(WEIGHTED, k=10))
    torch.testing.assert_close(merged, boxes[:2].mean(0, keepdim=True).expand(2, 4))
    assert prior_boxes(torch.tensor([[1.0, 1.0]]), boxes[:0], scores[:0], WEIGHTED)[1].tolist() == [False]


def test_official_merge_takes_the_best_of_the_nearest_boxes_that_contain_the_click():
    boxes = torch.tensor([
        [0.0, 0, 20, 20],    # contains (10, 10), centre at the click
        [5.0, 5, 40, 40],    # contains it, farther, best score
        [9.0, 9, 11, 11],    # contains it, nearest, low score
        [30.0, 30, 50, 50],  # does not contain it, high score
    ])
    scores = torch.tensor([0.5, 0.8, 0.2, 0.99])
    point = torch.tensor([[10.0, 10.0], [45.0, 5.0]])  # the second click lies in no box
    merged, found = prior_boxes(point, boxes, scores, OFFICIAL)
    assert found.tolist() == [True, False]
    torch.testing.assert_close(merged[0], boxes[1])
    # with k = 2 only the two nearest containing boxes compete
    merged, _ = prior_boxes(point[:1], boxes, scores, replace(OFFICIAL, k=2))
    torch.testing.assert_close(merged[0], boxes[0])
    assert contains(merged, point[:1]).tolist() == [True]


def _features(rpn: RPN, batch: int, size: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(rpn.config["in_channels"], rpn.strides)]


def test_assignment_prefers_the_level_of_the_box_size():
    rpn = RPN([8, 8, 8], channels=16, num_convs=1)
    shapes = [(32, 32), (16, 16), (8, 8)]  # a 256 x 256 input
    small = torch.tensor([[40.0, 40, 60, 60]])  # extent ~10 < 64 -> stride 8
    medium = torch.tensor([[0.0, 0, 180, 180]])  # extent ~90 in [64, 128) -> stride 16
    large = torch.tensor([[0.0, 0, 256, 256]])  # extent >= 128 -> stride 32
    for box, level in ((small, 0), (medium, 1), (large, 2)):
        labels, targets = assign_targets(rpn, shapes, [box])
        sizes = [h * w for h, w in shapes]
        per_level = labels[0].split(sizes)
        counts = torch.stack([p.sum() for p in per_level])
        assert counts.argmax() == level, counts  # centre sampling may also reach a neighbour level
        assert torch.isfinite(targets[labels > 0]).all()


def test_rpn_overfits_a_box_and_proposes_it(tmp_path):
    rpn = RPN([8, 8, 8], channels=16, num_convs=1)
    features = _features(rpn, 1, 128)
    gt = [torch.tensor([[30.0, 20, 90, 70]])]
    opt = torch.optim.Adam(rpn.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits, deltas = rpn(features)
        loss, parts = rpn_loss(rpn, logits, deltas, gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    save_rpn(rpn, tmp_path / "rpn.pt", note="test")
    loaded = load_rpn(tmp_path / "rpn.pt")
    boxes, scores = proposals(loaded, *loaded(features), valid_hw=[(128, 128)], score_threshold=0.3)[0]
    assert len(boxes) >= 1
    assert (boxes[0] - gt[0][0]).abs().max() < 8
    for rule in PRIOR_RULES.values():
        merged, found = prior_boxes(torch.tensor([[60.0, 45.0]]), boxes, scores, rule)
        assert found.all() and (merged[0] - gt[0][0]).abs().max() < 8


@pytest.fixture(scope="module")
def rpn_inputs(tmp_path_factory):
    from stage_chain import upstream_chain

    root = tmp_path_factory.mktemp("rpn_stage")
    arts = upstream_chain(root, with_rpn=False)
    return {"data": arts["data"], "prompt_kd": arts["prompt_kd"]}, root


def test_rpn_stage_trains_loss_falls_and_measures_ap(rpn_inputs):
    from edgesam.config import RPNConfig, RuntimeConfig, TrainConfig
    from pipelines import rpn as stage

    inputs, root = rpn_inputs
    cfg = RPNConfig(channels=32, num_convs=1, cache_features=True, train=TrainConfig(
        epochs=12, batch_size=4, lr=5e-3, lr_ref_batch=4, warmup_steps=2, log_every=2, checkpoint_every=10,
        loader_workers=0))
    out = root / "rpn"
    manifest = stage.run(cfg, RuntimeConfig(num_workers=0), inputs, out)
    assert manifest["steps"] == 24
    assert manifest["loss"]["last"] < 0.7 * manifest["loss"]["first"]
    quality = manifest["proposals"]
    assert set(quality) >= {"ap", "ap50", "ar100"} and 0.0 <= quality["ap"] <= quality["ap50"] <= 1.0
    assert quality["ar100"] > 0.0
    rpn = load_rpn(out / manifest["rpn"])
    assert torch.load(out / manifest["rpn"], weights_only=True)["meta"]["merge"] == cfg.merge == "official"
    assert rpn.config["channels"] == 32


def test_feature_cache_skips_the_frozen_encoder(student_256):
    from edgesam.tasks.rpn import FrozenEncoderRPN
    from edgesam.models.rpn import build_rpn

    import copy

    encoder = copy.deepcopy(student_256.image_encoder)
    model = FrozenEncoderRPN(encoder, build_rpn(encoder, 16, 1), cache_features=True).train()
    assert not model.encoder.training  # frozen encoder stays in eval mode
    calls = []
    model.encoder.backbone.register_forward_hook(lambda *args: calls.append(1))
    images, indices = torch.randn(2, 3, 256, 256), torch.tensor([5, 9])
    first = model.features(images, indices)
    second = model.features(torch.zeros_like(images), indices)  # served from the cache
    assert len(calls) == 1
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    model.features(images, torch.tensor([5, 10]))  # one unseen image: the encoder runs again
    assert len(calls) == 2


def test_rpn_stage_without_coco_names_the_missing_settings(tmp_path):
    from edgesam.artifacts import Artifact
    from edgesam.config import RPNConfig, RuntimeConfig
    from pipelines import rpn as stage

    data = Artifact("data", "real", tmp_path / "data")
    data.path.mkdir()
    data.commit({"sa1b_dir": str(tmp_path), "coco_train": None, "coco_val": None, "coco_images": None})
    student = Artifact("prompt_kd", "x", tmp_path / "prompt_kd")
    student.path.mkdir()
    student.commit({"student": "student.pt", "img_size": 128})
    with pytest.raises(ValueError, match="data.coco_train"):
        stage.run(RPNConfig(), RuntimeConfig(num_workers=0), {"data": data, "prompt_kd": student}, tmp_path / "out")
