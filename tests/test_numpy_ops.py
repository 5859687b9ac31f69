"""The numpy twins of the PyTorch transforms and of the RPN prior equal them (the torch-free predictor's base)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD, preprocess
from edgesam.models.rpn import PRIOR_RULES, RPN, prior_boxes, proposals
from edgesam.client.transforms import preprocess as np_preprocess
from edgesam.client.transforms import upsample_logits
from edgesam.client.prior import prior_boxes as np_prior_boxes
from edgesam.client.prior import proposals as np_proposals
from edgesam.export.modules import RPNGraph


def test_preprocess_is_segment_anythings(coffee, astronaut):
    for image in (coffee, astronaut, coffee[:, :333]):
        want, want_hw = preprocess(image, 256)
        got, got_hw = np_preprocess(image, 256, PIXEL_MEAN, PIXEL_STD)
        assert got_hw == want_hw
        np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5)


def test_upsampling_matches_postprocess_masks(student_256):
    low = torch.randn(2, 3, 64, 64)
    for input_hw, original in (((171, 256), (400, 600)), ((256, 256), (512, 512)), ((256, 128), (200, 100))):
        want = student_256.postprocess_masks(low, input_hw, original).numpy()
        np.testing.assert_allclose(upsample_logits(low.numpy(), 256, input_hw, original), want, atol=1e-4)


def test_proposals_and_prior_boxes_match_the_pytorch_prior():
    """Fails when a PyTorch prior rule (models/rpn.py) changes until edgesam.client.prior follows it."""
    torch.manual_seed(0)
    rpn = RPN([8, 16, 32], channels=16, num_convs=1).eval()
    rpn.objectness.bias.data.fill_(0.0)
    features = [torch.randn(1, c, 128 // s, 128 // s) for c, s in zip((8, 16, 32), rpn.strides)]
    with torch.no_grad():
        logits, deltas = rpn(features)
        flat_scores, flat_boxes = (t.numpy() for t in RPNGraph(rpn, 128)(*features))
    points = np.array([[10.0, 20.0], [64.0, 48.0], [127.0, 95.0], [-5.0, -5.0]])
    for name, rule in PRIOR_RULES.items():
        boxes, scores = proposals(rpn, logits, deltas, [(96, 128)], rule.score_threshold, rule.max_proposals,
                                  nms_iou=rule.nms_iou)[0]
        assert len(boxes) > 5, name
        np_boxes, np_scores = np_proposals(flat_scores, flat_boxes, (96, 128), rule.score_threshold,
                                           rule.max_proposals, nms_iou=rule.nms_iou)
        np.testing.assert_allclose(np_boxes, boxes.numpy(), atol=1e-4)
        np.testing.assert_allclose(np_scores, scores.numpy(), atol=1e-6)
        want, want_found = prior_boxes(torch.as_tensor(points, dtype=torch.float32), boxes, scores, rule)
        got, found = np_prior_boxes(points, np_boxes, np_scores, asdict(rule))
        np.testing.assert_array_equal(found, want_found.numpy())
        np.testing.assert_allclose(got, want.numpy(), atol=1e-3)
        assert not np_prior_boxes(points, np_boxes[:0], np_scores[:0], asdict(rule))[1].any()
        assert found[-1] == (rule.pick == "weighted")  # official: a click outside every proposal gets no box
