"""Teachers: official SAM ViT-H/L/B checkpoints, and the tiny SAM of the embedded benchmark.

`load_teacher` builds the model with segment-anything's own builders and loads the weights
with `torch.load(weights_only=True)`, after checking the file: it must exist, hash to the
official digest when it carries an official file name, unpickle, and hold the state dict of
the requested model kind. Every failure raises `TeacherCheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.transformer import Attention

from edgesam.artifacts import atomic_torch_save

log = logging.getLogger(__name__)

PROMPT_EMBED_DIM = 256
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

# Official release files. Meta publishes no SHA-256; the six hex characters in each file
# name are the prefix of the file's MD5, and the full MD5 below is the digest widely used
# to verify these downloads. We therefore verify the MD5 and report the SHA-256 we computed.
OFFICIAL_CHECKPOINTS = {
    "vit_h": ("sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6"),
    "vit_l": ("sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"),
    "vit_b": ("sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"),
}


class TeacherCheckpointError(RuntimeError):
    """A teacher checkpoint is missing, corrupt, or of another model."""


def build_mask_decoder() -> MaskDecoder:
    """SAM's mask decoder (two-way transformer, 4 mask tokens), as in segment-anything."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_prompt_encoder(img_size: int, embedding_size: int) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )


def build_tiny_sam(
    img_size: int = 256, embed_dim: int = 256, depth: int = 6, num_heads: int = 8
) -> Sam:
    """A small SAM: ViT with patch 16 and global attention, SAM's prompt encoder and decoder.

    Embeddings are 256 x img_size/16 x img_size/16, like SAM's at 1024.
    """
    if img_size % 16:
        raise ValueError(f"img_size must be divisible by 16, got {img_size}")
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=0,  # global attention in every block
        global_attn_indexes=(),
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=build_prompt_encoder(img_size, img_size // 16),
        mask_decoder=build_mask_decoder(),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def tie_cross_attention_init(decoder: MaskDecoder) -> int:
    """Start every token<->image cross-attention of `decoder` with equal query and key projections.

    Queries and keys both carry positional encodings (prompts: their point's, image: its
    cell's), so with W_q = W_k the attention logits start as about (W pe_prompt)·(W pe_cell),
    which peaks where the two positions agree: prompts attend to their own place from the
    first step. From SAM's random init a decoder trained from scratch first collapses to
    empty masks and must discover that alignment (the embedded benchmark's teacher at lr
    5e-4: train IoU 0 for ~200 steps, ~110 tied; 300-600 untied at 1.5e-3). Returns the
    number of attentions tied.
    """
    tied = 0
    for name, module in decoder.transformer.named_modules():
        if isinstance(module, Attention) and "self_attn" not in name:
            module.k_proj.load_state_dict(module.q_proj.state_dict())
            tied += 1
    return tied


def tiny_sam_config(sam: Sam) -> dict[str, int]:
    """The `build_tiny_sam` arguments that rebuild `sam`."""
    enc = sam.image_encoder
    return {
        "img_size": enc.img_size,
        "embed_dim": enc.patch_embed.proj.out_channels,
        "depth": len(enc.blocks),
        "num_heads": enc.blocks[0].attn.num_heads,
    }


def load_checkpoint_file(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(f"{what} checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, disallowed pickle globals
        raise TeacherCheckpointError(
            f"{what} checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def save_tiny_sam(sam: Sam, path: Path, **meta: Any) -> None:
    """Save a tiny SAM with its build config, so `load_tiny_sam` needs nothing else."""
    atomic_torch_save(
        {"kind": "tiny_sam", "config": tiny_sam_config(sam), "meta": meta,
         "state_dict": sam.state_dict()},
        path,
    )


def load_tiny_sam(path: Path) -> Sam:
    """Rebuild a tiny SAM saved by `save_tiny_sam`."""
    ckpt = load_checkpoint_file(path, "tiny SAM")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "tiny_sam":
        raise TeacherCheckpointError(f"{path} is not a tiny SAM checkpoint (no 'kind': 'tiny_sam')")
    sam = build_tiny_sam(**ckpt["config"])
    _load_state(sam, ckpt["state_dict"], path, f"tiny SAM {ckpt['config']}")
    return sam


def file_digests(path: Path, chunk: int = 1 << 24) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def load_teacher(kind: str, checkpoint: Path, sha256: str | None = None) -> Sam:
    """Load an official SAM (`vit_h`, `vit_l` or `vit_b`) from `checkpoint`, verified.

    A file carrying an official name must match the official digest; `sha256`, when given,
    pins the file's SHA-256. Any file must hold a state dict whose keys and shapes are
    exactly those of the `kind` model.
    """
    if kind not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"unknown SAM kind {kind!r}; expected one of {sorted(OFFICIAL_CHECKPOINTS)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise TeacherCheckpointError(f"SAM {kind} checkpoint not found: {path}")
    official = {name: (k, digest) for k, (name, digest) in OFFICIAL_CHECKPOINTS.items()}
    official_kind, official_md5 = official.get(path.name, (kind, None))
    if official_kind != kind:
        raise TeacherCheckpointError(
            f"{path} is the official SAM {official_kind} checkpoint, but {kind} was requested"
        )
    actual_sha256, md5 = file_digests(path)
    if official_md5 is not None and md5 != official_md5:
        raise TeacherCheckpointError(
            f"{path} does not match the official {path.name}: md5 {md5}, expected {official_md5} "
            "(incomplete download or a different file)"
        )
    if sha256 is not None and actual_sha256 != sha256.lower():
        raise TeacherCheckpointError(f"{path} has sha256 {actual_sha256}, expected {sha256}")
    log.info("SAM %s checkpoint %s sha256=%s", kind, path, actual_sha256)
    state = load_checkpoint_file(path, f"SAM {kind}")
    with torch.device("meta"):  # shapes only: reject a wrong model before allocating it
        _check_state(sam_model_registry[kind]().state_dict(), state, path, f"SAM {kind}")
    sam = sam_model_registry[kind]()
    sam.load_state_dict(state)
    return sam.eval()


def _load_state(model: torch.nn.Module, state: Any, path: Path, expected: str) -> None:
    _check_state(model.state_dict(), state, path, expected)
    model.load_state_dict(state)


def _check_state(want: dict[str, torch.Tensor], state: Any, path: Path, expected: str) -> None:
    """Raise if `state` differs from `want` in keys or shapes, in terms of the file."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherCheckpointError(
            f"{path} does not hold a state dict of tensors (expected {expected}); "
            f"found {type(state).__name__}"
            + (f" with keys {list(state)[:5]}" if isinstance(state, dict) else "")
        )
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{k}: expected {tuple(want[k].shape)}, found {tuple(state[k].shape)}"
        for k in want
        if k in state and want[k].shape != state[k].shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:2]})")
        raise TeacherCheckpointError(
            f"{path} is not a {expected} checkpoint: " + "; ".join(problems)
        )
