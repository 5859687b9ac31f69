"""The client decoder `PromptDecoder`: parity with SAM's decoding, N prompts per call, static shapes."""

from __future__ import annotations

import pytest
import torch

from edgesam.export.onnx import _as_decode_prompts, export_prompt_decoder, export_sam_decoder
from edgesam.export.graph_checks import StaticShapeError, check_static_shapes, float_shape_operands
from edgesam.models.decoding import decode
from edgesam.export.decoder import PromptDecoder

TOLERANCE = 1e-4  # float reordering only: measured ~3e-7 on logits of magnitude ~0.4


@pytest.mark.parametrize("labels", [[2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 0.0, 1.0, -1.0]],
                         ids=["box", "point+box", "point set"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_prompt_decoder_matches_sam_decoding(student_256, labels, with_mask):
    n = 5
    embedding = torch.randn(1, 256, 16, 16)
    coords, labels = torch.rand(n, len(labels), 2) * 256, torch.tensor([labels]).repeat(n, 1)
    mask = torch.randn(n, 1, 64, 64) if with_mask else None
    with torch.no_grad():
        scores, masks = PromptDecoder(student_256)(embedding, coords, labels,
                                                   torch.zeros(n, 1, 64, 64) if mask is None else mask,
                                                   torch.full((n,), float(with_mask)))
        low, iou = decode(student_256, embedding, *_as_decode_prompts(coords, labels), mask_input=mask, num_outputs=4)
    torch.testing.assert_close(masks, low, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(scores, iou, atol=TOLERANCE, rtol=0)


def test_client_decoder_has_only_static_shapes(student_256, tmp_path):
    export_prompt_decoder(student_256, tmp_path / "decoder.onnx")
    dims = check_static_shapes(tmp_path / "decoder.onnx")
    assert dims == {"scores": ["num_prompts", 4], "masks": ["num_prompts", 4, 64, 64]}


def test_static_shape_check_rejects_the_orig_im_size_pattern(student_256, tmp_path):
    export_sam_decoder(student_256, tmp_path / "decoder_sam.onnx")
    assert any("orig_im_size" in p for p in float_shape_operands(tmp_path / "decoder_sam.onnx"))
    with pytest.raises(StaticShapeError, match="orig_im_size"):
        check_static_shapes(tmp_path / "decoder_sam.onnx")
