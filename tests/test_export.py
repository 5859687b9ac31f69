import numpy as np
import pytest
import torch

from edgesam.data.transforms import preprocess
from edgesam.export.onnx import (
    ParityError,
    check_parity,
    export_coreml,
    export_onnx,
    fused_copy,
    ort_latency_ms,
    session,
)
from edgesam.models.rpn import build_rpn

ATOL, RTOL = 1e-3, 1e-3  # the export stage's default tolerance


@pytest.fixture(scope="module")
def exported(student_256, tmp_path_factory):
    sam = fused_copy(student_256)
    rpn = build_rpn(sam.image_encoder, channels=32, num_convs=1).eval()
    files = export_onnx(sam, tmp_path_factory.mktemp("onnx"), rpn=rpn)
    return sam, files, rpn


def test_fused_copy_keeps_the_embedding(student_256, coffee):
    x, _ = preprocess(coffee, 256)
    with torch.no_grad():
        torch.testing.assert_close(fused_copy(student_256).image_encoder(x[None]), student_256.image_encoder(x[None]),
                                   atol=1e-3, rtol=1e-3)
    assert not student_256.image_encoder.fused  # the original is untouched


@pytest.mark.parametrize("photo", ["coffee", "astronaut"])  # 2:3 like the export example, and square
def test_onnx_files_match_pytorch_for_every_interface(exported, photo, request):
    sam, files, rpn = exported
    image = request.getfixturevalue(photo)
    x, _ = preprocess(image, 256)
    report = check_parity(sam, files, x[None], image.shape[:2], atol=ATOL, rtol=RTOL, rpn=rpn)
    assert report["passed"]
    assert set(report["encoder"]) == {"image_embeddings", "features_s8", "features_s16", "features_s32"}
    assert report["encoder"]["image_embeddings"]["max_abs_diff"] < 1e-3
    assert len(report["decoder_sam"]) == 6 and len(report["decoder_edgesam"]) == 4
    assert len(report["decoder"]) == 4 and set(report["rpn"]) == {"rpn_scores", "rpn_boxes"}
    for part in ("decoder", "decoder_sam", "decoder_edgesam", "rpn"):
        assert all(v["within_tolerance"] for v in report[part].values())


def test_exported_interfaces_shapes(exported):
    _, files, _ = exported
    # the SAM interface upsamples to the original image size; the compact one returns 4 low-res masks
    masks = session(files["decoder_sam"]).run(["masks"], {
        "image_embeddings": np.zeros((1, 256, 16, 16), np.float32),
        "point_coords": np.array([[[10.0, 20.0], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1.0, -1.0]], np.float32),
        "mask_input": np.zeros((1, 1, 64, 64), np.float32), "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([400, 600], np.float32)})[0]
    assert masks.shape == (1, 4, 400, 600)
    scores, low = session(files["decoder_edgesam"]).run(None, {
        "image_embeddings": np.zeros((1, 256, 16, 16), np.float32),
        "point_coords": np.zeros((1, 7, 2), np.float32), "point_labels": np.ones((1, 7), np.float32)})
    assert scores.shape == (1, 4) and low.shape == (1, 4, 64, 64)
    scores, low = session(files["decoder"]).run(None, {  # 16 boxes in one call
        "image_embeddings": np.zeros((1, 256, 16, 16), np.float32),
        "point_coords": np.tile(np.array([[[10.0, 20.0], [90.0, 80.0]]], np.float32), (16, 1, 1)),
        "point_labels": np.tile(np.array([[2.0, 3.0]], np.float32), (16, 1)),
        "mask_input": np.zeros((16, 1, 64, 64), np.float32), "has_mask_input": np.zeros(16, np.float32)})
    assert scores.shape == (16, 4) and low.shape == (16, 4, 64, 64)


def test_parity_failure_is_loud(exported, coffee):
    sam, files, _ = exported
    x, _ = preprocess(coffee, 256)
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias += 1.0  # PyTorch now differs from the files
    try:
        with pytest.raises(ParityError, match="iou_predictions|scores"):
            check_parity(sam, files, x[None], coffee.shape[:2], atol=ATOL, rtol=RTOL)
    finally:
        with torch.no_grad():
            sam.mask_decoder.iou_prediction_head.layers[-1].bias -= 1.0


def test_ort_latency_and_coreml_skip(exported):
    _, files, _ = exported
    ms = ort_latency_ms(files["encoder"], {"image": np.zeros((1, 3, 256, 256), np.float32)}, repeats=2)
    assert ms > 0
    result = export_coreml(exported[0], files["encoder"].with_name("encoder.mlpackage"))
    assert result["status"] in ("skipped", "exported")
    if result["status"] == "skipped":
        assert "coremltools" in result["reason"]


def test_export_stage_writes_a_checked_bundle(tmp_path):
    import json

    from stage_chain import LOCAL, upstream_chain

    from edgesam.artifacts import Artifact
    from edgesam.client.bundle import Bundle
    from edgesam.config import EvaluateConfig, ExportConfig
    from edgesam.models.edgesam import load_edgesam
    from edgesam.models.rpn import load_rpn
    from pipelines import evaluate, export

    inputs = upstream_chain(tmp_path)
    inputs["evaluate"] = Artifact("evaluate", "fixture", tmp_path / "evaluate")
    inputs["evaluate"].path.mkdir()
    inputs["evaluate"].commit(evaluate.run(EvaluateConfig(max_images=1, max_annotations_per_image=2, overlay_images=0,
                                                          speed_repeats=1), LOCAL,
                                           {k: inputs[k] for k in evaluate.UPSTREAM}, inputs["evaluate"].path))
    out = tmp_path / "export"
    out.mkdir()
    cfg = ExportConfig(latency_repeats=1, calibration_images=2, check_images=1, check_annotations=2,
                       int8_weights="per_tensor")  # "auto" (both, the better kept): test_int8_weights_auto...
    manifest = export.run(cfg, LOCAL, {k: inputs[k] for k in export.UPSTREAM}, out)
    for name in manifest["files"]:
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(manifest["files"])  # no candidate or temporary left
    assert manifest["parity"]["passed"] and manifest["parity"]["fusion_max_abs_diff"] < 1e-3
    assert set(manifest["latency_ms"]) == {"onnxruntime", "pytorch"}
    assert manifest["coreml"]["status"] == "skipped"
    load_edgesam(out / manifest["checkpoint"])
    load_rpn(out / manifest["rpn"])
    config = json.loads((out / "config.json").read_text())
    assert config["img_size"] == 128 and config["rpn"]["merge"] == "official"
    bundle = Bundle.open(out)
    assert set(bundle.roles) == {"encoder", "encoder_int8", "encoder_fp16", "decoder", "decoder_int8", "decoder_fp16",
                                 "decoder_sam", "decoder_edgesam", "rpn_onnx", "checkpoint", "rpn_checkpoint"}
    assert all(bundle.path(role) for role in bundle.roles)  # every digest matches
    variants = config["accuracy"]["variants"]
    assert {"pytorch", "fp32", "int8 per_tensor", "int8 decoder", "fp16 encoder", "fp16 decoder"} <= set(variants)
    assert config["files"]["decoder_int8"]["accuracy"]["variant"] == "int8 decoder"
    assert config["files"]["decoder_int8"]["bytes"] < config["files"]["decoder"]["bytes"]
    assert abs(variants["fp32"]["box"] - variants["pytorch"]["box"]) < 1e-3  # fp32 ONNX = PyTorch on the same prompts
    assert set(config["files"]["decoder"]["latency_ms"]) == set(config["files"]["decoder_int8"]["latency_ms"]) == {
        "1_box", "16_boxes"}
    card = (out / "MODEL_CARD.md").read_text()
    for role in bundle.roles:
        assert f"`{config['files'][role]['file']}`" in card
    prior = inputs["evaluate"].manifest["granularity_prior"]
    assert f"| paper | {prior['point_miou']['paper']['off']:.3f} |" in card
    assert f"AR@100 {prior['proposals']['ar100']:.3f}" in card


def test_int8_weights_auto_measures_both_and_keeps_the_better(bundle_256):
    import json

    config = json.loads((bundle_256 / "config.json").read_text())
    variants = config["accuracy"]["variants"]
    modes = ("per_tensor", "per_channel")
    assert variants["int8_weights"] in modes
    best = max(modes, key=lambda m: (variants[f"int8 {m}"]["box"], variants[f"int8 {m}"]["point"]))
    assert variants["int8_weights"] == best
    accuracy = config["files"]["encoder_int8"]["accuracy"]
    assert accuracy["variant"] == f"int8 {best}"
    assert accuracy["box_drop"] == variants["fp32"]["box"] - variants[f"int8 {best}"]["box"]
