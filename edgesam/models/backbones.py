"""Pre-flight check of a student backbone: can this timm model be an EdgeSAM student at all?

A backbone that does not fit (a typo, a ViT with one stride-16 map, a model whose attention
windows break at the profile's input size, an op the ONNX exporter cannot trace) otherwise fails
only when `encoder_kd` starts, after data, shards, teacher and embeddings, or at export, after
all the training. `check_backbone` tries in seconds what those stages will need of it, in the
order they need it, and returns the first failure as a sentence:

1. timm knows the name (with the closest names when it does not);
2. `features_only` gives maps at strides 8, 16 and 32 (the FPN neck reads 16 and 32, the
   granularity-prior RPN all three);
3. the `StudentEncoder` builds at the profile's `img_size` (with the `pretrained` file, if any)
   and embeds to 256 x S/16 x S/16;
4. one forward/backward pass on a dummy batch in train mode gives finite gradients;
5. the fused encoder traces to ONNX with its pyramid outputs (the export stage's encoder graph).
"""

from __future__ import annotations

import difflib
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from edgesam.config import EncoderKDConfig
from edgesam.models.rpn import RPN_STRIDES
from edgesam.models.student import StudentEncoder, UpsampleMode

DUMMY_BATCH = 2  # BatchNorm in train mode needs more than one value per channel
ONNX_OPSET = 17


@dataclass
class BackboneCheck:
    """The verdict on one backbone: `ok`, or the first `reason` it cannot work, and how long it took."""

    backbone: str
    img_size: int
    ok: bool = False
    reason: str = ""
    seconds: float = 0.0
    strides: list[int] = field(default_factory=list)
    params_m: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BackboneCheckError(ValueError):
    """A backbone failed its pre-flight check; the message is the reason."""


class _PyramidGraph(nn.Module):
    """image -> (embedding, *pyramid maps): what the export stage traces."""

    def __init__(self, encoder: StudentEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, features = self.encoder.forward_pyramid(image)
        return (embedding, *features)


def _known_name(name: str) -> str | None:
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f"timm has no model {name!r}" + (f" (closest: {', '.join(close)})" if close else "")


def _strides(name: str) -> tuple[list[int], str | None]:
    try:
        with torch.device("meta"):  # feature_info only: no weights allocated
            strides = list(timm.create_model(name, features_only=True).feature_info.reduction())
    except Exception as exc:  # timm raises RuntimeError / TypeError / AssertionError by model
        return [], f"timm cannot build {name!r} with features_only ({type(exc).__name__}: {exc})"
    missing = [s for s in RPN_STRIDES if s not in strides]
    if missing:
        return strides, (f"features_only gives strides {strides}; the student needs maps at strides "
                         f"{list(RPN_STRIDES)} (missing {missing})")
    return strides, None


def _train_step(encoder: StudentEncoder, img_size: int) -> str | None:
    encoder.train()
    embedding = encoder(torch.randn(DUMMY_BATCH, 3, img_size, img_size))
    want = (DUMMY_BATCH, 256, img_size // 16, img_size // 16)
    if tuple(embedding.shape) != want:
        return f"the student embeds to {tuple(embedding.shape)}, not {want}"
    embedding.square().mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    if not any(g is not None for g in grads):
        return "the backward pass reached no parameter"
    if not all(torch.isfinite(g).all() for g in grads if g is not None):
        return "the backward pass gave non-finite gradients"
    return None


def _onnx_trace(encoder: StudentEncoder, img_size: int) -> None:
    fused = encoder.eval().fuse()
    with torch.no_grad():
        torch.onnx.export(_PyramidGraph(fused), (torch.randn(1, 3, img_size, img_size),), io.BytesIO(),
                          dynamo=False, opset_version=ONNX_OPSET, do_constant_folding=False)


def _checks(result: BackboneCheck, upsample_mode: UpsampleMode, pretrained: bool | str | Path) -> str | None:
    """Steps 1-5 in order; the first failure's reason, or None."""
    name, size = result.backbone, result.img_size
    reason = _known_name(name)
    if reason:
        return reason
    result.strides, reason = _strides(name)
    if reason:
        return reason
    try:
        encoder = StudentEncoder(name, size, upsample_mode=upsample_mode, pretrained=pretrained)
    except Exception as exc:  # timm / torch raise many kinds; the message is what a user needs
        return f"cannot build the student at img_size {size} ({type(exc).__name__}: {exc})"
    result.params_m = sum(p.numel() for p in encoder.parameters()) / 1e6
    try:
        reason = _train_step(encoder, size)
    except Exception as exc:
        return f"forward/backward at img_size {size} fails ({type(exc).__name__}: {exc})"
    if reason:
        return reason
    try:
        _onnx_trace(encoder, size)
    except Exception as exc:
        return f"the fused encoder does not trace to ONNX opset {ONNX_OPSET} ({type(exc).__name__}: {exc})"
    return None


def check_backbone(name: str, img_size: int, upsample_mode: UpsampleMode = "bilinear",
                   pretrained: bool | str | Path = False) -> BackboneCheck:
    """Try `name` as an EdgeSAM student at `img_size` (see the module docstring); never raises
    for a backbone that does not fit: the result says why."""
    result = BackboneCheck(name, img_size)
    start = time.perf_counter()
    with torch.random.fork_rng():  # the dummy batch leaves the caller's RNG as it was
        torch.manual_seed(0)
        reason = _checks(result, upsample_mode, pretrained)
    result.ok, result.reason = reason is None, _first_line(reason or "")
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_student(cfg: EncoderKDConfig, img_size: int) -> BackboneCheck:
    """`check_backbone` of the student that `encoder_kd` with `cfg` will build at `img_size`
    (the teacher's input size: the shard stage's `target_size`)."""
    return check_backbone(cfg.backbone, img_size, cfg.upsample_mode, cfg.pretrained)


def require_student(cfg: EncoderKDConfig, img_size: int) -> BackboneCheck:
    """`check_student`, raising `BackboneCheckError` with the reason when the backbone cannot work."""
    result = check_student(cfg, img_size)
    if not result.ok:
        raise BackboneCheckError(f"encoder_kd.backbone {cfg.backbone!r} cannot be an EdgeSAM student at img_size "
                                 f"{img_size}: {result.reason} (pre-flight check, {result.seconds:.1f}s)")
    return result
