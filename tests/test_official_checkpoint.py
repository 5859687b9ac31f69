"""Official EdgeSAM release checkpoints -> our student, checked against the official model's
state-dict names and shapes (tests/data/edgesam_official_state.json) without the release file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from segment_anything import SamPredictor
from timm.models.repvit import RepViTBlock, RepVitDownsample

from edgesam.models.checkpoint import CheckpointError
from edgesam.models.edgesam import build_edgesam, save_edgesam
from edgesam.models.official import (
    OfficialCheckpointError,
    load_official_edgesam,
    map_official_state,
    official_key_map,
    repvit_blocks,
)

FIXTURE = Path(__file__).parent / "data" / "edgesam_official_state.json"
RPN_EXTRAS = {"fpn.convs.0.conv.weight": (256, 256, 3, 3), "rpn_head.rpn_cls.weight": (3, 256, 1, 1)}


@pytest.fixture(scope="module")
def official_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads(FIXTURE.read_text())["tensors"].items()}


@pytest.fixture(scope="module")
def meta_sam():
    with torch.device("meta"):
        return build_edgesam("repvit_m1", 1024, upsample_mode="bicubic")


def _fake_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Random tensors with the official names and shapes (BN counters int64, variances positive)."""
    g = torch.Generator().manual_seed(0)

    def fake(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("num_batches_tracked"):
            return torch.randint(0, 1000, shape, generator=g)
        if name.endswith("running_var"):
            return torch.rand(shape, generator=g) + 0.5
        return 0.02 * torch.randn(shape, generator=g)  # small: 26 random blocks stay finite

    return {k: fake(k, s) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def fake_state(official_shapes) -> dict[str, torch.Tensor]:
    return _fake_state(official_shapes)


def test_fixture_is_the_official_model(official_shapes):
    assert len(official_shapes) == 821
    blocks = {int(k.split(".")[2]) for k in official_shapes if k.startswith("image_encoder.features.")}
    assert blocks == set(range(27))  # stem + 26 RepViT blocks
    assert official_shapes["image_encoder.fuse_stage2.weight"] == (256, 192, 1, 1)


def test_mapping_is_one_to_one_with_equal_shapes(official_shapes, meta_sam):
    ours = meta_sam.state_dict()
    mapping = official_key_map(official_shapes, meta_sam)
    assert set(mapping) == set(official_shapes), "official tensors not covered"
    assert len(set(mapping.values())) == len(mapping), "two official tensors map to one of ours"
    assert set(mapping.values()) == set(ours), "ours not filled / unknown names"
    assert all(official_shapes[k] == tuple(ours[v].shape) for k, v in mapping.items())
    state = {k: torch.empty(s, device="meta") for k, s in official_shapes.items()}
    assert set(map_official_state(state, meta_sam)) == set(ours)


def test_fuse_stage2_reads_the_last_block_of_our_stride16_stage(official_shapes, meta_sam):
    """Official `fuse_stage2` reads `features.23`, the last 192-channel block: it must be ours
    that `lateral16` reads, the last block of the stride-16 stage (not the next downsample)."""
    backbone = meta_sam.image_encoder.backbone
    last16 = f"image_encoder.backbone.stages_2.blocks.{len(backbone.stages_2.blocks) - 1}."
    mapping = official_key_map(official_shapes, meta_sam)
    f23 = {v for k, v in mapping.items() if k.startswith("image_encoder.features.23.")}
    assert f23 and all(v.startswith(last16) for v in f23)
    assert all(v.startswith("image_encoder.backbone.stages_3.downsample.")
               for k, v in mapping.items() if k.startswith("image_encoder.features.24."))
    assert mapping["image_encoder.fuse_stage2.weight"] == "image_encoder.lateral16.weight"
    assert backbone.feature_info.reduction()[-2] == 16  # lateral16 reads stages_2's output


def test_block_walk_is_forward_order():
    """`repvit_blocks` lists blocks in the order the backbone runs them (forward hooks)."""
    backbone = build_edgesam("repvit_m1", 64).image_encoder.backbone
    names = {m: n for n, m in backbone.named_modules()}
    ran: list[str] = []
    for module in names:
        if isinstance(module, (RepViTBlock, RepVitDownsample)):
            module.register_forward_hook(lambda m, i, o: ran.append(names[m]))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 64))
    assert [name for name, _ in repvit_blocks(backbone)] == ran
    assert len(ran) == 26


def test_timm_layout_is_rejected():
    with torch.device("meta"):
        timm_layout = timm.create_model("repvit_m1", features_only=True)
    with pytest.raises(ValueError, match="official_repvit_layout"):
        repvit_blocks(timm_layout)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_load_round_trip(tmp_path, fake_state, official_shapes, meta_sam, wrapper, caplog):
    """A fake release file (fixture names, random tensors; `_rpn` extras) loads tensor for
    tensor where the mapping says, into a bicubic model in eval mode that SamPredictor runs."""
    rpn = {k: torch.randn(s) for k, s in RPN_EXTRAS.items()}
    flat = {**fake_state, **rpn}
    path = tmp_path / "edge_sam_3x_rpn.pth"
    torch.save(flat if wrapper is None else {wrapper: flat, "epoch": 3}, path)
    with caplog.at_level(logging.WARNING, logger="edgesam.models.official"):
        sam = load_official_edgesam(path, img_size=256)
    assert "dropping 2 RPN tensors" in caplog.text and str(path) in caplog.text
    ours = sam.state_dict()
    for official, name in official_key_map(official_shapes, meta_sam).items():
        assert torch.equal(ours[name], fake_state[official]), (official, name)
    assert sam.image_encoder.upsample_mode == "bicubic" and not sam.training
    if wrapper is None:
        predictor = SamPredictor(sam)
        predictor.set_image(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
        masks, scores, _ = predictor.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]))
        assert masks.shape == (3, 96, 128) and np.isfinite(scores).all()


def _save(tmp_path: Path, obj: object, name: str = "edge_sam.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_error_is_a_checkpoint_error():
    assert issubclass(OfficialCheckpointError, CheckpointError)


def test_missing_file(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="not found.*edge_sam.pth"):
        load_official_edgesam(tmp_path / "edge_sam.pth")


def test_corrupt_file(tmp_path, fake_state):
    path = _save(tmp_path, fake_state)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(OfficialCheckpointError, match=f"{path}.*truncated or corrupt"):
        load_official_edgesam(path)


def test_sam_vit_checkpoint(tmp_path):
    path = _save(tmp_path, {"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8),
                            "image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, "sam_vit_b.pth")
    with pytest.raises(OfficialCheckpointError, match=f"{path} is a SAM ViT checkpoint.*load_teacher"):
        load_official_edgesam(path)


@pytest.mark.parametrize("obj, problem", [
    ({"fc.weight": torch.zeros(2, 2)}, "no image_encoder.features"),
    ({"features.0.0.c.weight": torch.zeros(2, 2)}, "encoder-only training checkpoint"),
    ({"a": 1, "b": "text"}, "does not hold a state dict of tensors"),
    ([torch.zeros(2)], "found list"),
])
def test_unrelated_content(tmp_path, obj, problem):
    path = _save(tmp_path, obj)
    with pytest.raises(OfficialCheckpointError, match=f"{path}.*{problem}"):
        load_official_edgesam(path)


def test_our_own_checkpoint_points_to_load_edgesam(tmp_path):
    path = tmp_path / "ours.pt"
    save_edgesam(build_edgesam("repvit_m1", 64), path)
    with pytest.raises(OfficialCheckpointError, match=f"{path} is one of our EdgeSAM checkpoints.*load_edgesam"):
        load_official_edgesam(path)


def test_shape_mismatch_names_file_and_key(tmp_path, fake_state):
    state = dict(fake_state)
    state["image_encoder.fuse_stage2.weight"] = torch.zeros(256, 96, 1, 1)
    path = _save(tmp_path, state)
    with pytest.raises(OfficialCheckpointError, match=rf"{path}.*1 shape mismatches.*fuse_stage2.*\(256, 96, 1, 1\)"):
        load_official_edgesam(path)


def test_unexpected_key_is_rejected_not_dropped(tmp_path, fake_state):
    path = _save(tmp_path, {**fake_state, "image_encoder.extra_head.weight": torch.zeros(2)})
    problem = "1 official tensors the mapping does not cover.*extra_head"
    with pytest.raises(OfficialCheckpointError, match=rf"{path}.*{problem}"):
        load_official_edgesam(path)


def test_missing_key_leaves_ours_unfilled(official_shapes, meta_sam):
    state = {k: torch.empty(s, device="meta") for k, s in official_shapes.items()}
    del state["image_encoder.features.23.channel_mixer.m.2.bn.running_var"]
    ours = r"stages_2\.blocks\.14\.channel_mixer\.conv2\.bn\.running_var"
    with pytest.raises(OfficialCheckpointError, match=rf"1 tensors of ours left unfilled.*{ours}"):
        map_official_state(state, meta_sam)


def test_extra_official_block_is_not_covered(official_shapes, meta_sam):
    state = {k: torch.empty(s, device="meta") for k, s in official_shapes.items()}
    state["image_encoder.features.27.token_mixer.0.conv.c.weight"] = torch.empty(384, 1, 3, 3, device="meta")
    with pytest.raises(OfficialCheckpointError, match=r"does not cover.*features\.27"):
        map_official_state(state, meta_sam)


def test_an_official_release_file_registers_and_loads_for_the_nightly(tmp_path, fake_state):
    """`edgesam models register edge_sam.pth --name ... --alias candidate`: kind `official`, its
    file's digest, and the nightly's `load_model` builds it at the registered size, fused."""
    from edgesam.cli import main
    from edgesam.eval.registry import Registry, RegistryError, load_model

    path = _save(tmp_path, {"model": fake_state})
    ledger = tmp_path / "ledger.sqlite"
    main(["models", "register", str(path), "--name", "edgesam-release", "--alias", "candidate", "--img-size", "128",
          "--ledger", str(ledger)])
    (model,) = Registry(ledger).aliased()
    assert (model.kind, model.label, model.img_size, model.backbone) == ("official", "edgesam-release v1", 128,
                                                                         "repvit_m1")
    sam = load_model(model)
    assert sam.image_encoder.img_size == 128 and not sam.training
    predictor = SamPredictor(sam)
    predictor.set_image(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    masks, _, _ = predictor.predict(box=np.array([10.0, 10.0, 80.0, 60.0]), multimask_output=False)
    assert masks.shape == (1, 96, 128)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(RegistryError, match="changed since it was registered"):
        load_model(model)
