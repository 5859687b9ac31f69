"""The official EdgeSAM release checkpoints (`edge_sam.pth`, `edge_sam_3x.pth`) in our student.

The official model (chongzhou96/EdgeSAM, `build_edge_sam`) is RepViT-M1 with EdgeSAM's FPN
fusion, SAM's prompt encoder and mask decoder; ours is the same network built from timm's
`repvit_m1` (legacy blocks) in the official layout (`student.official_repvit_layout`). Only the
names differ, so the weights are renamed by rule, not by a table:

- `image_encoder.features.0.{0,2}` (stem convs) -> `image_encoder.backbone.stem.conv{1,2}`;
- `image_encoder.features.{i}`, i >= 1, is the i-th RepViT block of ours in forward order
  (`repvit_blocks`): an ordinary block renames its parts with `BLOCK_PARTS`, a stride-2 block
  (timm's `RepVitDownsample`) with `DOWNSAMPLE_PARTS`;
- `fuse_stage2` / `fuse_stage3.op_list.0` are our `lateral16` / `lateral32`, `neck` is `neck`;
- `prompt_encoder.*` and `mask_decoder.*` are segment-anything's and keep their names.

The mapping is strict (`map_official_state`): every official tensor lands in exactly one of
ours with the same shape and every tensor of ours is filled. The release files are flat state
dicts; the `_rpn` variant adds an mmdet RPN (`fpn.*`, `rpn_head.*`) that we cannot use, which is
dropped with a warning. The official neck upsamples bicubically in PyTorch (its ONNX/CoreML
exports use bilinear), so `load_official_edgesam` builds ours with `upsample_mode="bicubic"`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from segment_anything.modeling import Sam
from timm.models.repvit import RepViTBlock, RepVitDownsample
from torch import nn

from edgesam.models.checkpoint import CheckpointError, read_checkpoint
from edgesam.models.edgesam import CHECKPOINT_FORMAT, build_edgesam, load_edgesam

log = logging.getLogger(__name__)

BlockKind = Literal["block", "downsample"]
STEM_PARTS = {"0.": "stem.conv1.", "2.": "stem.conv2."}
# official RepViTBlock (stride 1): token_mixer = (RepVGGDW, SE), channel_mixer = Residual(m)
BLOCK_PARTS = {
    "token_mixer.0.conv.": "token_mixer.conv.",
    "token_mixer.0.conv1.": "token_mixer.conv1.",
    "token_mixer.1.": "se.",
    "channel_mixer.m.0.": "channel_mixer.conv1.",
    "channel_mixer.m.2.": "channel_mixer.conv2.",
}
# official RepViTBlock (stride 2): token_mixer = (depthwise conv, Identity, pointwise conv)
DOWNSAMPLE_PARTS = {
    "token_mixer.0.": "spatial_downsample.",
    "token_mixer.2.": "channel_downsample.",
    "channel_mixer.m.0.": "ffn.conv1.",
    "channel_mixer.m.2.": "ffn.conv2.",
}
PREFIXES = {
    "image_encoder.fuse_stage2.": "image_encoder.lateral16.",
    "image_encoder.fuse_stage3.op_list.0.": "image_encoder.lateral32.",
    "image_encoder.neck.": "image_encoder.neck.",
    "prompt_encoder.": "prompt_encoder.",
    "mask_decoder.": "mask_decoder.",
}
RPN_PREFIXES = ("fpn.", "rpn_head.")  # the `_rpn` release variant's mmdet RPN
_FEATURE = re.compile(r"image_encoder\.features\.(\d+)\.(.*)")


class OfficialCheckpointError(CheckpointError):
    """An official EdgeSAM checkpoint is missing, corrupt, or holds another model."""


def repvit_blocks(backbone: nn.Module) -> list[tuple[str, BlockKind]]:
    """Our RepViT blocks in forward order (module names under `backbone`, kind).

    timm registers each stage's `downsample` before its `blocks`, and runs them in that order,
    so module order is forward order. The backbone must be in the official layout: a
    `downsample.pre_block` still in place would be one official block placed a stage late.
    """
    blocks: list[tuple[str, BlockKind]] = []
    for name, module in backbone.named_modules():
        if isinstance(module, RepVitDownsample):
            if isinstance(module.pre_block, RepViTBlock):
                raise ValueError(f"{name}.pre_block is in timm's layout; apply official_repvit_layout first")
            blocks.append((name, "downsample"))
        elif isinstance(module, RepViTBlock):
            blocks.append((name, "block"))
    return blocks


def official_key_map(names: Iterable[str], sam: Sam) -> dict[str, str]:
    """Our name for each official name the rule covers (names it does not cover are left out)."""
    blocks = repvit_blocks(sam.image_encoder.backbone)
    backbone = "image_encoder.backbone."
    mapping: dict[str, str] = {}
    for name in names:
        ours: str | None = None
        feature = _FEATURE.fullmatch(name)
        if feature:
            index, rest = int(feature.group(1)), feature.group(2)
            if index == 0:
                ours = _rename(rest, STEM_PARTS, backbone)
            elif index <= len(blocks):
                block, kind = blocks[index - 1]
                ours = _rename(rest, BLOCK_PARTS if kind == "block" else DOWNSAMPLE_PARTS, f"{backbone}{block}.")
        else:
            ours = _rename(name, PREFIXES, "")
        if ours is not None:
            mapping[name] = ours
    return mapping


def _rename(name: str, parts: Mapping[str, str], prefix: str) -> str | None:
    for old, new in parts.items():
        if name.startswith(old):
            return prefix + new + name[len(old):]
    return None


def map_official_state(
    state: Mapping[str, torch.Tensor], sam: Sam, source: str = "official state dict"
) -> dict[str, torch.Tensor]:
    """`state` (official names) renamed to `sam`'s names, strictly.

    Raises `OfficialCheckpointError` (naming `source` and the keys) unless every official
    tensor maps to exactly one tensor of ours with the same shape and all of ours are filled.
    """
    ours = sam.state_dict()
    mapping = official_key_map(state, sam)
    unmapped = [k for k in state if k not in mapping]
    targets: dict[str, list[str]] = {}
    for official, name in mapping.items():
        targets.setdefault(name, []).append(official)
    unknown = sorted(name for name in targets if name not in ours)
    doubled = [f"{name} <- {sources}" for name, sources in targets.items() if len(sources) > 1]
    unfilled = [name for name in ours if name not in targets]
    wrong = [
        f"{official} -> {name}: official {tuple(state[official].shape)}, ours {tuple(ours[name].shape)}"
        for official, name in mapping.items()
        if name in ours and state[official].shape != ours[name].shape
    ]
    problems = [
        f"{len(keys)} {what} (e.g. {keys[:3]})"
        for what, keys in (
            ("official tensors the mapping does not cover", unmapped),
            ("mapped names that our model lacks", unknown),
            ("tensors of ours mapped more than once", doubled),
            ("tensors of ours left unfilled", unfilled),
            ("shape mismatches", wrong),
        )
        if keys
    ]
    if problems:
        raise OfficialCheckpointError(f"{source} does not match our RepViT-M1 EdgeSAM: " + "; ".join(problems))
    return {mapping[k]: v for k, v in state.items()}


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The official state dict in `path`: unwrapped, RPN extras dropped, recognizably EdgeSAM."""
    path = Path(path)
    ckpt: Any = read_checkpoint(path, "official EdgeSAM", OfficialCheckpointError)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        raise OfficialCheckpointError(f"{path} is one of our EdgeSAM checkpoints; load it with load_edgesam")
    for wrapper in ("model", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    tensors = isinstance(ckpt, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items())
    if not tensors:
        found = type(ckpt).__name__ + (f" with keys {list(ckpt)[:5]}" if isinstance(ckpt, dict) else "")
        raise OfficialCheckpointError(f"{path} does not hold a state dict of tensors; found {found}")
    if "image_encoder.pos_embed" in ckpt or "image_encoder.patch_embed.proj.weight" in ckpt:
        raise OfficialCheckpointError(
            f"{path} is a SAM ViT checkpoint, not EdgeSAM; SAM teachers load with edgesam.models.teacher.load_teacher"
        )
    if not any(k.startswith("image_encoder.features.") for k in ckpt):
        hint = (" (an encoder-only training checkpoint? the official scripts/convert_weights.py "
                "--encoder-only turns it into a release file)") if any(k.startswith("features.") for k in ckpt) else ""
        raise OfficialCheckpointError(
            f"{path} is not an official EdgeSAM checkpoint: no image_encoder.features.* tensors "
            f"(keys e.g. {list(ckpt)[:5]}){hint}"
        )
    rpn = [k for k in ckpt if k.startswith(RPN_PREFIXES)]
    if rpn:
        log.warning("%s: dropping %d RPN tensors (fpn.*, rpn_head.*: the official mmdet RPN, not loadable here)",
                    path, len(rpn))
    return {k: v for k, v in ckpt.items() if not k.startswith(RPN_PREFIXES)}


def load_official_edgesam(path: str | Path, img_size: int = 1024) -> Sam:
    """Our EdgeSAM (RepViT-M1, bicubic FPN upsampling) with an official release checkpoint's
    weights, in eval mode. The weights do not depend on `img_size` (divisible by 32)."""
    state = read_official_state(path)
    sam = build_edgesam("repvit_m1", img_size, upsample_mode="bicubic")
    sam.load_state_dict(map_official_state(state, sam, source=str(path)), strict=True)
    return sam.eval()


def load_student(path: str | Path, img_size: int) -> Sam:
    """A student to start from: an EdgeSAM checkpoint of this project (a previous run's
    `student.pt` / exported `edgesam.pt`) or an official EdgeSAM release file, told apart by
    content. Ours must have been built for `img_size`; the official model (convolutional, SAM's
    decoder) is built at it."""
    ckpt = read_checkpoint(path, "student to start from", OfficialCheckpointError)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        sam = load_edgesam(path)
        if sam.image_encoder.img_size != img_size:
            raise OfficialCheckpointError(f"{path} is an EdgeSAM student for {sam.image_encoder.img_size} px inputs, "
                                          f"but this run uses {img_size} px")
        return sam
    return load_official_edgesam(path, img_size)
