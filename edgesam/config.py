"""Typed configuration of every stage, and YAML profiles (`smoke`, `default`, `paper`).

One `PipelineConfig` describes a whole run; each stage receives only its own section
(plus the shared `RuntimeConfig`). Profiles live in `edgesam/profiles/<name>.yaml` and
are deep-merged with user overrides before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

PROFILES_DIR = Path(__file__).parent / "profiles"
STAGES = (
    "data", "shard", "teacher", "embed", "encoder_kd", "prompt_kd", "rpn", "evaluate", "export",
)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TrainConfig(_Config):
    """Shared optimisation settings of every training stage (see `edgesam.train`)."""

    epochs: float = 1.0
    max_steps: int | None = None  # caps the step count computed from epochs
    batch_size: int = 8  # per worker
    lr: float = 1e-3  # learning rate at `lr_ref_batch`, scaled linearly with the global batch
    lr_ref_batch: int = 8
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float | None = 1.0
    amp: bool = True  # only takes effect on GPU
    checkpoint_every: int = 200  # steps
    log_every: int = 20  # steps
    loader_workers: int = 1


class RuntimeConfig(_Config):
    """Where artifacts go and what compute the stages may use."""

    work_dir: Path = Path("runs")
    ray_address: str | None = None  # None: use RAY_ADDRESS or start a local Ray
    num_workers: int = 1  # Ray Train workers (0: in-process, for unit tests only)
    cpus_per_worker: int = 1  # CPU workers: Ray CPUs and torch threads per worker
    object_store_mb: int = 512  # object store of a local Ray (bounds Ray Data's memory)
    use_gpu: bool | None = None  # None: use GPUs when present
    seed: int = 0


class DataConfig(_Config):
    """The embedded benchmark (generated when no SA-1B path is given)."""

    sa1b_path: Path | None = None  # directory of sa_*.tar (or extracted pairs); skips synthesis
    coco_train: Path | None = None  # COCO instances JSON for the RPN (real COCO)
    coco_val: Path | None = None
    coco_images: Path | None = None
    num_train: int = 800
    num_val: int = 100
    images_per_tar: int = 100
    min_side: int = 384
    max_side: int = 640
    objects_per_image: tuple[int, int] = (3, 6)
    object_scale: tuple[float, float] = (0.2, 0.5)  # object extent / shorter image side
    # Visible masks smaller than this fraction of the image are not annotated: >= ~130 px
    # once the longest side is 256, so that SAM's 64x64 low-res masks can represent them
    # (data/README.md, "Sizes").
    min_mask_fraction: float = 0.003
    seed: int = 0


class ShardConfig(_Config):
    target_size: int = 256  # longest side after resizing (1024 for real SAM)
    subset_fraction: float | None = None  # deterministic by image id
    subset_ids_file: Path | None = None
    val_fraction: float = 0.01  # held out by image id when the input has no train/ and val/ dirs
    max_count: int = 256  # samples per shard
    max_size: int = 256 * 1024**2  # bytes per shard
    jpeg_quality: int = 95
    workers: int = 2
    max_reject_ratio: float = 0.05


class TeacherConfig(_Config):
    kind: Literal["synthetic", "vit_h", "vit_l", "vit_b"] = "synthetic"
    checkpoint: Path | None = None  # required unless kind == "synthetic"
    # Small ViT of the synthetic reference teacher.
    embed_dim: int = 256
    depth: int = 6
    num_heads: int = 8
    train: TrainConfig = Field(default_factory=TrainConfig)
    max_prompts: int = 16
    corrective_clicks: int = 2
    loss_stride: int = 2  # mask losses on a grid of img_size / loss_stride (SAM: 1)
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    tied_attention_init: bool = True  # prompts attend to their own place from step 1
    hflip: bool = False  # mirror half the training images (long runs over a small train split)


class EmbedConfig(_Config):
    batch_size: int = 8
    concurrency: int = 1  # actors in the pool
    cpus_per_actor: int = 1  # Ray CPUs (and torch threads) of each CPU actor
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # autocast on GPU only


class EncoderKDConfig(_Config):
    backbone: str = "repvit_m1"  # any timm model name with features_only support
    upsample_mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval_images: int | None = None  # val images of the mIoU report (None: all)


class PromptKDConfig(_Config):
    train: TrainConfig = Field(default_factory=TrainConfig)
    max_prompts: int = 16
    box_prob: float = 0.5
    prompt_types: Literal["both", "box", "point"] = "both"
    decode_iters: int = 2  # 1 = no prompt loop
    points_per_iter: int = 1
    point_multimask: int = 4  # mask outputs for point prompts: 1, 3 or 4
    box_multimask: int = 1
    freeze_encoder: bool = False
    freeze_decoder: bool = False
    freeze_prompt_encoder: bool = True
    target: Literal["binary", "logits"] = "binary"
    dice_weight: float = 5.0
    bce_weight: float = 5.0
    eval_images: int | None = None  # val images of the mIoU report (None: all)


class RPNConfig(_Config):
    train: TrainConfig = Field(default_factory=TrainConfig)
    k: int = 3  # proposals merged around a point prompt
    channels: int = 128  # FPN and head width
    num_convs: int = 2  # shared head tower depth
    cache_features: bool = False  # keep the frozen encoder's features in memory after epoch 1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    huber_beta: float = 0.1
    score_threshold: float = 0.05
    max_proposals: int = 100


class EvaluateConfig(_Config):
    max_images: int | None = None  # per dataset
    point_mode: Literal["center", "random"] = "center"
    point_outputs: Literal[1, 3, 4] = 3  # masks decoded for a single click (SAM: 3)
    refine_iters: int = 0  # corrective clicks after the first
    multimask_select: Literal["score", "area", "oracle"] = "score"
    max_annotations_per_image: int = 32
    # More COCO/LVIS-format val sets by name: (instances JSON, images directory).
    extra_sets: dict[str, tuple[Path, Path]] = Field(default_factory=dict)
    overlay_images: int = 4
    speed_repeats: int = 5


class ExportConfig(_Config):
    opset: int = 17
    coreml: bool = False  # also convert the encoder with coremltools (skipped if not installed)
    parity_atol: float = 1e-3  # onnxruntime vs PyTorch: |diff| <= atol + rtol * |PyTorch value|
    parity_rtol: float = 1e-3
    latency_repeats: int = 10
    precisions: list[Literal["int8", "fp16"]] = Field(default_factory=lambda: ["int8", "fp16"])  # besides fp32
    int8_weights: Literal["auto", "per_tensor", "per_channel"] = "auto"  # auto: calibrate both, keep the better
    calibration_images: int = 32  # int8 calibration images, from the shard artifact's `calibration_split`
    calibration_split: Literal["train", "val"] = "train"  # train: the images that measure the files stay unseen
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    check_images: int | None = 50  # val images of each file's mIoU check (None: all)
    check_annotations: int = 32  # objects per image in that check


class PipelineConfig(_Config):
    profile: str = "default"
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    encoder_kd: EncoderKDConfig = Field(default_factory=EncoderKDConfig)
    prompt_kd: PromptKDConfig = Field(default_factory=PromptKDConfig)
    rpn: RPNConfig = Field(default_factory=RPNConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build the pipeline config of profile `name`, with `overrides` deep-merged on top."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    values = yaml.safe_load(path.read_text()) or {}
    values = deep_merge(values, overrides or {})
    values["profile"] = name
    return PipelineConfig.model_validate(values)
