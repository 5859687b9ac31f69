"""Teachers: tiny SAM, prompted decoding, SAM checkpoint loading and its errors."""

from __future__ import annotations

import pytest
import torch

from edgesam.artifacts import file_digests
from edgesam.models import teacher
from edgesam.models.decoding import decode
from edgesam.models.teacher import TeacherCheckpointError, load_teacher
from edgesam.models.tiny_sam import build_tiny_sam, load_tiny_sam, save_tiny_sam, tie_cross_attention_init


@pytest.fixture(scope="module")
def embedding(tiny_sam):
    with torch.no_grad():
        return tiny_sam.image_encoder(torch.randn(1, 3, 256, 256))


def test_tiny_sam_embedding_grid(embedding):
    assert embedding.shape == (1, 256, 16, 16)


def test_tied_cross_attention_attends_to_the_prompt_position():
    torch.manual_seed(0)
    sam = build_tiny_sam(256, 32, 1, 2)
    assert tie_cross_attention_init(sam.mask_decoder) == 5  # 2 layers x 2 directions + final
    layer = sam.mask_decoder.transformer.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight)  # untouched
    attn = layer.cross_attn_token_to_image
    grid_pe = sam.prompt_encoder.get_dense_pe().flatten(2)[0].T  # (16*16, 256), cell centres
    cells = torch.tensor([[3, 5], [12, 2], [8, 14]])  # (row, col)
    xy = (cells.flip(1).float() + 0.5) * 16  # pixel coordinates of those cell centres
    prompt_pe = sam.prompt_encoder.pe_layer.forward_with_coords(xy[None], (256, 256))[0]
    with torch.no_grad():
        logits = attn.q_proj(prompt_pe) @ attn.k_proj(grid_pe).T
    assert logits.argmax(dim=1).tolist() == (cells[:, 0] * 16 + cells[:, 1]).tolist()


@pytest.mark.parametrize("num_outputs", [1, 3, 4])
def test_decode_outputs_match_sam_mask_decoder(tiny_sam, embedding, num_outputs):
    points = torch.tensor([[[40.0, 50.0], [100.0, 90.0]], [[200.0, 20.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    with torch.no_grad():
        masks, iou = decode(tiny_sam, embedding, points=points, labels=labels, num_outputs=num_outputs)
        sparse, dense = tiny_sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        pe = tiny_sam.prompt_encoder.get_dense_pe()
        single, single_iou = tiny_sam.mask_decoder(embedding, pe, sparse, dense, multimask_output=False)
        multi, multi_iou = tiny_sam.mask_decoder(embedding, pe, sparse, dense, multimask_output=True)
    assert masks.shape == (2, num_outputs, 64, 64) and iou.shape == (2, num_outputs)
    if num_outputs == 1:
        torch.testing.assert_close(masks, single)
    elif num_outputs == 3:
        torch.testing.assert_close(masks, multi)
        torch.testing.assert_close(iou, multi_iou)
    else:
        torch.testing.assert_close(masks[:, :1], single)
        torch.testing.assert_close(masks[:, 1:], multi)


def test_decode_box_and_mask_prompts_carry_gradients(tiny_sam):
    emb = torch.randn(1, 256, 16, 16, requires_grad=True)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0]])
    masks, _ = decode(tiny_sam, emb, boxes=boxes, num_outputs=4)
    again, iou = decode(tiny_sam, emb, boxes=boxes, mask_input=masks[:, :1], num_outputs=1)
    (again.mean() + iou.mean()).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert tiny_sam.mask_decoder.iou_token.weight.grad is not None
    tiny_sam.zero_grad(set_to_none=True)


def test_decode_rejects_bad_arguments(tiny_sam, embedding):
    with pytest.raises(ValueError, match="1, 3 or 4"):
        decode(tiny_sam, embedding, boxes=torch.zeros(1, 4), num_outputs=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        decode(tiny_sam, embedding)
    with pytest.raises(ValueError, match="one image"):
        decode(tiny_sam, embedding.expand(2, -1, -1, -1), boxes=torch.zeros(1, 4))


def test_tiny_sam_checkpoint_round_trip(tiny_sam, tmp_path):
    path = tmp_path / "teacher.pt"
    save_tiny_sam(tiny_sam, path, step=7)
    loaded = load_tiny_sam(path)
    assert loaded.image_encoder.img_size == 256
    for (name, a), b in zip(tiny_sam.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.pt"]  # no temp file left


def test_load_teacher_loads_matching_state_dict(tmp_path, monkeypatch):
    # Stand in a small builder for vit_b so the success path runs without 360 MB of weights.
    monkeypatch.setitem(teacher.sam_model_registry, "vit_b", lambda: build_tiny_sam(64, 32, 1, 2))
    source = build_tiny_sam(64, 32, 1, 2)
    path = tmp_path / "my_sam_b.pth"
    torch.save(source.state_dict(), path)
    loaded = load_teacher("vit_b", path, allow_unverified=True)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_teacher_pinned_sha256(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save({"x": torch.zeros(1)}, path)
    sha256, _ = file_digests(path)
    with pytest.raises(TeacherCheckpointError, match=f"{path} has sha256 {sha256}, expected 00ff"):
        load_teacher("vit_b", path, sha256="00ff")
    with pytest.raises(TeacherCheckpointError, match="is not a SAM vit_b checkpoint"):
        load_teacher("vit_b", path, sha256=sha256.upper())  # digest passes, keys do not


def test_load_teacher_missing_file(tmp_path):
    path = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(TeacherCheckpointError, match="not found") as err:
        load_teacher("vit_h", path)
    assert str(path) in str(err.value)


def test_load_teacher_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(TeacherCheckpointError, match="truncated or corrupt") as err:
        load_teacher("vit_b", garbage, allow_unverified=True)
    assert str(garbage) in str(err.value)

    whole = tmp_path / "whole.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8)}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(TeacherCheckpointError, match="truncated or corrupt") as err:
        load_teacher("vit_b", truncated, allow_unverified=True)
    assert str(truncated) in str(err.value)


def test_load_teacher_official_name_with_wrong_digest(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(TeacherCheckpointError, match="does not match the official") as err:
        load_teacher("vit_b", path)
    assert "md5" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(TeacherCheckpointError, match="official SAM vit_b checkpoint, but vit_h"):
        load_teacher("vit_h", path)


def test_load_teacher_wrong_model(tmp_path, tiny_sam):
    path = tmp_path / "tiny_as_vit_b.pth"
    torch.save(tiny_sam.state_dict(), path)
    with pytest.raises(TeacherCheckpointError) as err:
        load_teacher("vit_b", path, allow_unverified=True)
    message = str(err.value)
    assert str(path) in message and "is not a SAM vit_b checkpoint" in message
    assert "missing keys" in message and "shape mismatches" in message
    assert "expected (1, 64, 64, 768), found (1, 16, 16, 64)" in message


def test_load_teacher_rejects_non_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TeacherCheckpointError, match="does not hold a state dict"):
        load_teacher("vit_l", path, allow_unverified=True)


def test_load_teacher_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown SAM kind"):
        load_teacher("vit_x", tmp_path / "x.pth")


def test_an_unofficial_sam_file_is_refused_unless_allowed_or_pinned(tmp_path, monkeypatch):
    monkeypatch.setitem(teacher.sam_model_registry, "vit_b", lambda: build_tiny_sam(64, 32, 1, 2))
    path = tmp_path / "fine_tuned_vit_b.pth"
    torch.save(build_tiny_sam(64, 32, 1, 2).state_dict(), path)
    with pytest.raises(TeacherCheckpointError, match=f"{path} is not an official SAM vit_b release"):
        load_teacher("vit_b", path)
    load_teacher("vit_b", path, sha256=file_digests(path)[0])
    load_teacher("vit_b", path, allow_unverified=True)
