"""EdgeSAM's student image encoder: any timm CNN backbone plus an FPN neck.

The backbone (timm, `features_only`) returns its last feature map at strides 8, 16 and 32
(`out_indices`): the pyramid, which the granularity-prior RPN reads too. The stride-16 and
stride-32 maps are projected to 256 channels by 1x1 convolutions, the stride-32 map is
upsampled x2 and added, and a SAM-style neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d)
produces the 256 x S/16 x S/16 embedding that SAM's mask decoder expects.

RepViT backbones are laid out as the official RepViT and EdgeSAM read them: timm places the
last block before each downsampling at the start of the next stage (`downsample.pre_block`);
EdgeSAM's stride-16 (and the RPN's stride-8) features come after that block, so it is moved to
the end of the previous stage (same weights, one block later than timm's stage outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.models.repvit import RepViTBlock
from timm.utils import reparameterize_model
from torch import nn

from edgesam.models.checkpoint import CheckpointError, check_state, read_checkpoint

UpsampleMode = Literal["bilinear", "bicubic", "nearest"]
PYRAMID_STRIDES = (8, 16, 32)


def official_repvit_layout(backbone: nn.Module) -> int:
    """Move every RepViT stage's `downsample.pre_block` to the end of the previous stage, in
    place (the features then equal the official RepViT's); returns the number of blocks moved."""
    stages = [m for name, m in backbone.named_children() if name.startswith("stages")]
    moved = 0
    for previous, stage in zip(stages, stages[1:]):
        downsample = getattr(stage, "downsample", None)
        if isinstance(getattr(downsample, "pre_block", None), RepViTBlock):
            previous.blocks.append(downsample.pre_block)
            downsample.pre_block = nn.Identity()
            moved += 1
    return moved


class PretrainedWeightsError(CheckpointError):
    """The backbone's pretrained weights cannot be had: no network for timm's download, or a bad file."""


def create_backbone(name: str, pretrained: bool | str | Path, out_indices: list[int]) -> nn.Module:
    """timm `features_only` backbone, with timm's pretrained weights (True: downloaded; a path:
    that local weights file, through timm's `pretrained_cfg_overlay`) or random (False)."""
    kwargs: dict = {"features_only": True, "out_indices": out_indices}
    if pretrained is False:
        return timm.create_model(name, **kwargs)
    if pretrained is True:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # hub unreachable, offline mode, no weights for the name
            raise PretrainedWeightsError(
                f"timm could not download pretrained weights for {name!r} ({type(exc).__name__}: {exc}); without "
                "network access, download them elsewhere (e.g. the model's timm/Hugging Face file) and set "
                "encoder_kd.pretrained to the local file path"
            ) from exc
    path = Path(pretrained).expanduser()
    state = read_checkpoint(path, "pretrained backbone", PretrainedWeightsError)
    with torch.device("meta"):  # timm's loader is lenient with stray keys: check them here
        check_state(timm.create_model(name).state_dict(), state, path, f"timm {name}", PretrainedWeightsError)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def pyramid_indices(backbone: str, strides: tuple[int, ...] = PYRAMID_STRIDES) -> list[int]:
    """timm feature indices of the last map at each of `strides` that the backbone has (16, 32 required)."""
    with torch.device("meta"):  # feature_info only: no weights allocated
        reductions = timm.create_model(backbone, features_only=True).feature_info.reduction()
    if 16 not in reductions or 32 not in reductions:
        raise ValueError(f"timm backbone {backbone!r} has feature strides {reductions}; 16 and 32 are needed")
    return [max(i for i, r in enumerate(reductions) if r == s) for s in strides if s in reductions]


class StudentEncoder(nn.Module):
    """timm backbone (features_only) + FPN neck -> (B, out_chans, S/16, S/16)."""

    def __init__(
        self,
        backbone: str = "repvit_m1",
        img_size: int = 1024,
        out_chans: int = 256,
        upsample_mode: UpsampleMode = "bilinear",
        pretrained: bool | str | Path = False,
    ) -> None:
        super().__init__()
        if img_size % 32:
            raise ValueError(f"img_size must be divisible by 32, got {img_size}")
        if upsample_mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"upsample_mode must be bilinear, bicubic or nearest, got {upsample_mode!r}")
        self.backbone_name = backbone
        self.img_size = img_size  # read by segment_anything's SamPredictor
        self.upsample_mode = upsample_mode
        self.fused = False
        self.backbone = create_backbone(backbone, pretrained, pyramid_indices(backbone))
        official_repvit_layout(self.backbone)
        self.feature_strides = tuple(self.backbone.feature_info.reduction())
        self.feature_channels = tuple(self.backbone.feature_info.channels())
        self.lateral16 = nn.Conv2d(self.feature_channels[-2], out_chans, kernel_size=1, bias=False)
        self.lateral32 = nn.Conv2d(self.feature_channels[-1], out_chans, kernel_size=1, bias=False)
        self.neck = nn.Sequential(
            nn.Conv2d(out_chans, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward_pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embedding, the backbone's maps at `feature_strides`) from one pass."""
        features = self.backbone(x)
        top = self.lateral32(features[-1])
        kwargs = {} if self.upsample_mode == "nearest" else {"align_corners": False}
        top = F.interpolate(top, scale_factor=2.0, mode=self.upsample_mode, **kwargs)
        return self.neck(self.lateral16(features[-2]) + top), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pyramid(x)[0]

    def fuse(self) -> StudentEncoder:
        """Reparameterize the backbone for inference in place (conv+BN, RepVGG branches).

        Backbones without fusable modules are left unchanged. Call on a model in eval mode.
        """
        self.backbone = reparameterize_model(self.backbone.eval(), inplace=True)
        self.fused = True
        return self
