"""EdgeSAM model: segment-anything's predictor and mask generator unchanged, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from edgesam.models.decoding import decode
from edgesam.models.edgesam import (
    EdgeSAMCheckpointError,
    build_edgesam,
    load_edgesam,
    read_edgesam_checkpoint,
    save_edgesam,
)
from edgesam.models.student import StudentEncoder
from edgesam.models.tiny_sam import save_tiny_sam


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_student_is_a_sam_with_teacher_decoder(student_256, tiny_sam):
    assert isinstance(student_256, Sam)
    assert isinstance(student_256.image_encoder, StudentEncoder)
    for name in ("prompt_encoder", "mask_decoder"):
        _assert_same_weights(getattr(student_256, name), getattr(tiny_sam, name))


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
def test_sam_predictor_runs_unchanged(student_256, photo, request):
    image = request.getfixturevalue(photo)
    h, w = image.shape[:2]
    predictor = SamPredictor(student_256)
    predictor.set_image(image)
    assert predictor.features.shape == (1, 256, 16, 16)
    masks, scores, low_res = predictor.predict(
        point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]), multimask_output=True
    )
    assert masks.shape == (3, h, w) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 64, 64)
    masks, scores, _ = predictor.predict(box=np.array([10, 20, w - 30, h - 40]), multimask_output=False)
    assert masks.shape == (1, h, w)


def test_automatic_mask_generator_runs_unchanged(student_256, coffee):
    generator = SamAutomaticMaskGenerator(
        student_256, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    records = generator.generate(coffee)
    assert records, "with thresholds at 0 every non-duplicate mask is kept"
    for record in records:
        assert record["segmentation"].shape == coffee.shape[:2]
        assert len(record["bbox"]) == 4


def test_decode_four_outputs_on_student(student_256):
    with torch.no_grad():
        emb = student_256.image_encoder(torch.randn(1, 3, 256, 256))
        masks, iou = decode(student_256, emb, boxes=torch.tensor([[16.0, 16.0, 200.0, 180.0]]), num_outputs=4)
    assert masks.shape == (1, 4, 64, 64) and iou.shape == (1, 4)


def test_checkpoint_round_trip_is_identical(student_256, tmp_path):
    path = tmp_path / "edgesam.pt"
    save_edgesam(student_256, path, stage="prompt_kd", step=12)
    loaded = load_edgesam(path)
    _assert_same_weights(student_256, loaded)
    assert loaded.image_encoder.backbone_name == "repvit_m1" and loaded.image_encoder.img_size == 256
    assert read_edgesam_checkpoint(path)["meta"] == {"stage": "prompt_kd", "step": 12}
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(student_256.image_encoder(x), loaded.image_encoder(x))
    assert [p.name for p in tmp_path.iterdir()] == ["edgesam.pt"]  # no temp file left


def test_fused_checkpoint_round_trip(tmp_path):
    model = build_edgesam("mobilenetv3_small_100", img_size=128, upsample_mode="nearest")
    model.image_encoder.fuse()
    save_edgesam(model, tmp_path / "fused.pt")
    loaded = load_edgesam(tmp_path / "fused.pt")
    assert loaded.image_encoder.fused and loaded.image_encoder.upsample_mode == "nearest"
    _assert_same_weights(model, loaded)


def test_decoder_init_from_checkpoint_files(tiny_sam, student_256, tmp_path):
    save_tiny_sam(tiny_sam, tmp_path / "teacher.pt")
    save_edgesam(student_256, tmp_path / "student.pt")
    torch.save(tiny_sam.state_dict(), tmp_path / "sam_layout.pth")  # official SAM layout
    for name in ("teacher.pt", "student.pt", "sam_layout.pth"):
        model = build_edgesam("resnet18", img_size=256, decoder_init=tmp_path / name)
        _assert_same_weights(model.mask_decoder, tiny_sam.mask_decoder)
        _assert_same_weights(model.prompt_encoder, tiny_sam.prompt_encoder)


def test_decoder_init_must_match_input_size(tiny_sam):
    with pytest.raises(ValueError, match="built for 256x256 inputs"):
        build_edgesam("resnet18", img_size=512, decoder_init=tiny_sam)


def test_load_errors_name_the_file(tmp_path, tiny_sam):
    missing = tmp_path / "missing.pt"
    with pytest.raises(EdgeSAMCheckpointError, match="not found") as err:
        load_edgesam(missing)
    assert str(missing) in str(err.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(EdgeSAMCheckpointError, match="truncated or corrupt"):
        load_edgesam(corrupt)
    teacher = tmp_path / "teacher.pt"
    save_tiny_sam(tiny_sam, teacher)
    with pytest.raises(EdgeSAMCheckpointError, match="not an EdgeSAM checkpoint") as err:
        load_edgesam(teacher)
    assert str(teacher) in str(err.value)
