"""EdgeSAM: a segment-anything `Sam` whose image encoder is a `StudentEncoder`.

The prompt encoder and mask decoder are segment-anything's own modules, optionally
initialized from a teacher. Checkpoints carry their build config, so `load_edgesam(path)`
needs nothing but the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from edgesam.artifacts import atomic_torch_save
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD
from edgesam.models.checkpoint import CheckpointError, read_checkpoint
from edgesam.models.sam_parts import build_mask_decoder, build_prompt_encoder
from edgesam.models.student import StudentEncoder, UpsampleMode
from edgesam.models.tiny_sam import KIND as TINY_SAM

CHECKPOINT_FORMAT = "edgesam"
CHECKPOINT_VERSION = 2  # 2: RepViT in the official layout (models/student.py)
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


class EdgeSAMCheckpointError(CheckpointError):
    """An EdgeSAM checkpoint is missing, corrupt, or not an EdgeSAM checkpoint."""


def build_edgesam(
    backbone: str = "repvit_m1",
    img_size: int = 1024,
    decoder_init: Sam | str | Path | None = None,
    upsample_mode: UpsampleMode = "bilinear",
    pretrained_backbone: bool | str | Path = False,
) -> Sam:
    """Build an EdgeSAM model (in eval mode).

    Args:
        backbone: timm model name with `features_only` support.
        img_size: square input size, divisible by 32; embeddings are img_size/16.
        decoder_init: a teacher `Sam`, or a path to an EdgeSAM or SAM checkpoint, whose
            prompt encoder and mask decoder weights are copied; None leaves them random.
        upsample_mode: how the FPN upsamples the stride-32 map.
        pretrained_backbone: timm's ImageNet weights: True downloads them (network), a path loads that file.
    """
    sam = Sam(
        image_encoder=StudentEncoder(
            backbone, img_size=img_size, upsample_mode=upsample_mode, pretrained=pretrained_backbone
        ),
        prompt_encoder=build_prompt_encoder(img_size, img_size // 16),
        mask_decoder=build_mask_decoder(),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    if decoder_init is not None:
        init_decoder(sam, decoder_init)
    return sam.eval()


def init_decoder(sam: Sam, source: Sam | str | Path) -> None:
    """Copy prompt encoder and mask decoder weights from a teacher `Sam` or a checkpoint."""
    if isinstance(source, Sam):
        state, source_size, name = source.state_dict(), source.image_encoder.img_size, "teacher"
    else:
        state, source_size = _decoder_state_from_file(Path(source))
        name = str(source)
    img_size = sam.image_encoder.img_size
    if source_size != img_size:
        raise ValueError(
            f"decoder_init {name} was built for {source_size}x{source_size} inputs "
            f"(embedding grid {source_size // 16}), but the student uses {img_size}x{img_size}"
        )
    decoder_state = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}
    own = {k for k in sam.state_dict() if k.startswith(DECODER_PREFIXES)}
    if set(decoder_state) != own:
        raise ValueError(
            f"decoder_init {name} lacks SAM prompt encoder / mask decoder weights: "
            f"missing {sorted(own - set(decoder_state))[:3]}, unexpected "
            f"{sorted(set(decoder_state) - own)[:3]}"
        )
    sam.load_state_dict(decoder_state, strict=False)


def _decoder_state_from_file(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """State dict and input size of an EdgeSAM, tiny SAM or official SAM checkpoint."""
    ckpt = read_checkpoint(path, "decoder_init", EdgeSAMCheckpointError)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        return ckpt["state_dict"], ckpt["config"]["img_size"]
    if isinstance(ckpt, dict) and ckpt.get("kind") == TINY_SAM:
        return ckpt["state_dict"], ckpt["config"]["img_size"]
    if isinstance(ckpt, dict) and "image_encoder.pos_embed" in ckpt:  # official SAM layout
        return ckpt, ckpt["image_encoder.pos_embed"].shape[1] * 16
    raise EdgeSAMCheckpointError(
        f"{path} is neither an EdgeSAM, a tiny SAM nor an official SAM checkpoint"
    )


def edgesam_config(sam: Sam) -> dict[str, Any]:
    """The build config that `load_edgesam` uses to rebuild `sam`."""
    enc = sam.image_encoder
    if not isinstance(enc, StudentEncoder):
        raise TypeError(f"not an EdgeSAM model: image encoder is {type(enc).__name__}")
    return {
        "backbone": enc.backbone_name,
        "img_size": enc.img_size,
        "upsample_mode": enc.upsample_mode,
        "fused": enc.fused,
    }


def save_edgesam(sam: Sam, path: str | Path, **meta: Any) -> None:
    """Save weights, build config and `meta` (weights_only-loadable values) atomically."""
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": edgesam_config(sam),
            "meta": meta,
            "state_dict": sam.state_dict(),
        },
        Path(path),
    )


def read_edgesam_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict (format, version, config, meta, state_dict), validated."""
    path = Path(path)
    ckpt = read_checkpoint(path, "EdgeSAM", EdgeSAMCheckpointError)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise EdgeSAMCheckpointError(
            f"{path} is not an EdgeSAM checkpoint (no 'format': 'edgesam'; "
            "official SAM weights load with edgesam.models.teacher.load_teacher)"
        )
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise EdgeSAMCheckpointError(
            f"{path} has checkpoint version {ckpt.get('version')}, this code reads {CHECKPOINT_VERSION}"
        )
    return ckpt


def load_edgesam(path: str | Path, fuse: bool = False) -> Sam:
    """Rebuild an EdgeSAM model from a checkpoint written by `save_edgesam` (eval mode); `fuse`
    reparameterizes its encoder for inference."""
    ckpt = read_edgesam_checkpoint(path)
    config = dict(ckpt["config"])
    fused = config.pop("fused")
    sam = build_edgesam(**config)
    if fused:
        sam.image_encoder.fuse()
    try:
        sam.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise EdgeSAMCheckpointError(f"{path}: weights do not match its config {ckpt['config']}: {exc}") from exc
    if fuse and not fused:
        sam.image_encoder.fuse()
    return sam.eval()
