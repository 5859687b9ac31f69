"""Student encoder: embedding shapes, other timm backbones, fused == unfused."""

from __future__ import annotations

import pytest
import torch

from edgesam.models.student import StudentEncoder


def _randomize_batchnorm(model: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics so fusing has something to fold."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


@pytest.fixture(scope="module")
def repvit() -> StudentEncoder:
    torch.manual_seed(0)
    return StudentEncoder("repvit_m1", img_size=1024).eval()


@pytest.mark.parametrize("size", [1024, 256])
def test_embedding_shape(repvit, size):
    with torch.no_grad():
        out = repvit(torch.randn(1, 3, size, size))
    assert out.shape == (1, 256, size // 16, size // 16)
    assert torch.isfinite(out).all()


def test_non_square_input_divisible_by_32(repvit):
    with torch.no_grad():
        out = repvit(torch.randn(2, 3, 320, 192))
    assert out.shape == (2, 256, 20, 12)


def test_default_backbone_parameter_count(repvit):
    # EdgeSAM's RepViT-M1 encoder: ~5.4 M parameters in the paper (9.6 M with the decoder).
    params = sum(p.numel() for p in repvit.parameters()) / 1e6
    assert 5.0 < params < 5.9, params


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_100"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_other_timm_backbones_and_upsampling(backbone, mode):
    enc = StudentEncoder(backbone, img_size=256, upsample_mode=mode).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 256, 16, 16)
    assert enc.img_size == 256 and enc.upsample_mode == mode


def test_fused_equals_unfused():
    enc = StudentEncoder("repvit_m1", img_size=256).eval()
    _randomize_batchnorm(enc)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        before = enc(x)
        n_before = sum(p.numel() for p in enc.parameters())
        enc.fuse()
        after = enc(x)
    assert enc.fused
    assert sum(p.numel() for p in enc.parameters()) < n_before  # BatchNorms folded away
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.backbone.modules())
    # float32 re-association of folded conv+BN: outputs are LayerNorm-ed, O(1) in magnitude.
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="divisible by 32"):
        StudentEncoder("repvit_m1", img_size=1000)
    with pytest.raises(ValueError, match="upsample_mode"):
        StudentEncoder("repvit_m1", img_size=256, upsample_mode="area")


def test_repvit_reads_its_pyramid_after_the_official_blocks():
    """The official RepViT (EdgeSAM) taps stride 8/16 after the block timm starts the next stage with."""
    from edgesam.models.student import StudentEncoder

    encoder = StudentEncoder("repvit_m1", img_size=64)
    stages = dict(encoder.backbone.named_children())
    assert all(isinstance(stages[f"stages_{i}"].downsample.pre_block, torch.nn.Identity) for i in (1, 2, 3))
    # RepViT-M1: 2, 2, 14, 2 blocks per timm stage; each next stage's pre_block joins the previous
    assert [len(stages[f"stages_{i}"].blocks) for i in range(4)] == [3, 3, 15, 2]


def test_pretrained_backbone_from_a_local_weights_file(tmp_path):
    """encoder_kd.pretrained = <file>: timm's own loader puts the file's weights into the backbone."""
    import timm

    from edgesam.models.student import PretrainedWeightsError, StudentEncoder

    source = timm.create_model("mobilenetv3_small_050")
    torch.nn.init.constant_(source.conv_stem.weight, 0.125)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    encoder = StudentEncoder("mobilenetv3_small_050", img_size=64, pretrained=path)
    torch.testing.assert_close(encoder.backbone.conv_stem.weight, source.conv_stem.weight)
    assert not torch.equal(StudentEncoder("mobilenetv3_small_050", img_size=64).backbone.conv_stem.weight,
                           source.conv_stem.weight)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        StudentEncoder("mobilenetv3_small_050", img_size=64, pretrained=tmp_path / "missing.pth")
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(PretrainedWeightsError, match="is not a timm mobilenetv3_small_050 checkpoint"):
        StudentEncoder("mobilenetv3_small_050", img_size=64, pretrained=tmp_path / "other.pth")


def test_pretrained_true_without_network_says_how_to_give_a_file(monkeypatch):
    from edgesam.models.student import PretrainedWeightsError, StudentEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="set encoder_kd.pretrained to the local file path"):
        StudentEncoder("mobilenetv3_small_050", img_size=64, pretrained=True)
