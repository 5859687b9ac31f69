"""Typed configuration of every stage, and YAML profiles (`smoke`, `default`, `paper`).

One `PipelineConfig` describes a whole run; each stage receives only its own section
(plus the shared `RuntimeConfig`). Profiles live in `edgesam/profiles/<name>.yaml` and
are deep-merged with user overrides before validation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgesam.store.external import content_identity

PROFILES_DIR = Path(__file__).parent / "profiles"
# Fields marked with this do not change an artifact's content (parallelism, logging, checkpoint
# cadence): they stay out of the stage's cache key (`cache_view`).
NOT_IN_KEY = {"cache_key": False}
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
    warmup_start_ratio: float | None = None  # warm-up starts at lr * this (None: lr / warmup_steps)
    cosine_from_start: bool = False  # cosine over all steps, as timm's warmup_prefix=False (EdgeSAM)
    weight_decay: float = 0.05
    grad_clip: float | None = 1.0
    amp: bool = Field(True, json_schema_extra=NOT_IN_KEY)  # GPUs only; keyed as the precision (training_key)
    sync_bn: bool = False  # SyncBatchNorm across GPU workers (needs GPUs when num_workers > 1)
    checkpoint_every: int = Field(200, json_schema_extra=NOT_IN_KEY)  # steps
    # AdamW without weight decay for biases, other 1-D parameters and normalization layers
    # (the official EdgeSAM phase-1 recipe); False decays every trainable parameter.
    no_decay_norm_bias: bool = False
    log_every: int = Field(20, json_schema_extra=NOT_IN_KEY)  # steps
    loader_workers: int = 1


class RuntimeConfig(_Config):
    """Where artifacts go and what compute the stages may use."""

    work_dir: Path = Path("runs")
    ray_address: str | None = None  # None: use RAY_ADDRESS or start a local Ray
    # Joining `ray_address`: the TCP check and Ray's own connection retries (about one a
    # second) give up after this long, with an error naming the likely cause.
    connect_timeout_s: float = Field(20.0, gt=0, json_schema_extra=NOT_IN_KEY)
    num_workers: int = 1  # Ray Train workers (0: in-process, for unit tests only)
    # Ray CPUs per training worker (its train.loader_workers processes run on them); CPU workers
    # also use them as torch threads.
    cpus_per_worker: int = 1
    object_store_mb: int = 512  # object store of a local Ray (bounds Ray Data's memory)
    use_gpu: bool | None = None  # None: use GPUs when present
    # Where Ray Train keeps training checkpoints: a directory every node sees (NFS) or a URI
    # such as s3://bucket/edgesam. None: the artifact directory itself, which is only right on
    # one machine or a shared filesystem. Final files are copied to the artifact directory anyway.
    storage_path: str | None = None
    # Ray Train restarts after a worker or node failure (from the latest checkpoint); -1: no
    # limit. Node preemptions Ray detects are retried separately, without limit.
    max_failures: int = 0
    seed: int = 0


class CocoSource(_Config):
    """A COCO- or LVIS-format instances JSON and its images directory, as distillation input.

    Its samples are keyed `<name>_<image id>`, so keys stay unique across sources and apart
    from SA-1B's `sa_<id>`.
    """

    annotations: Path
    images: Path
    split: Literal["train", "val", "auto"] = "auto"  # auto: held out by image id with shard.val_fraction
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9-]+$")  # None: the JSON's file stem

    @model_validator(mode="after")
    def _default_name(self) -> CocoSource:
        if self.name is None:
            self.name = re.sub(r"[^A-Za-z0-9-]+", "-", self.annotations.stem).strip("-") or "coco"
        if self.name == "sa":
            raise ValueError("coco source name 'sa' is reserved for SA-1B keys (sa_<id>)")
        return self


class DataConfig(_Config):
    """The embedded benchmark (generated when neither SA-1B nor COCO sources are given)."""

    sa1b_path: Path | None = None  # directory of sa_*.tar (or extracted pairs); skips synthesis
    # COCO/LVIS instances JSONs + images to distil on, alone or with sa1b_path; skips synthesis.
    coco_sources: list[CocoSource] = Field(default_factory=list)
    coco_train: Path | None = None  # COCO instances JSON for the RPN (default: the train coco_source)
    coco_val: Path | None = None  # (default: the val coco_source)
    coco_images: Path | None = None  # (default: their images directory when they share one)
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

    @model_validator(mode="after")
    def _distinct_sources(self) -> DataConfig:
        names = [s.name for s in self.coco_sources]
        if len(set(names)) < len(names):
            raise ValueError(f"data.coco_sources: names {names} repeat; give each source a distinct `name`")
        ignored = [k for k in ("coco_train", "coco_val", "coco_images") if getattr(self, k) is not None]
        if ignored and self.sa1b_path is None and not self.coco_sources:
            raise ValueError(f"data.{ignored[0]} would be ignored: the embedded benchmark is generated unless "
                             "data.sa1b_path or data.coco_sources is set (the RPN then reads those COCO paths)")
        return self


class ShardConfig(_Config):
    target_size: int = 256  # longest side after resizing (1024 for real SAM)
    subset_fraction: float | None = None  # deterministic by image id
    subset_ids_file: Path | None = None
    val_fraction: float = 0.01  # held out by image id when the input has no train/ and val/ dirs
    max_count: int = 256  # samples per shard
    max_size: int = 256 * 1024**2  # bytes per shard
    jpeg_quality: int = 95
    workers: int = Field(2, json_schema_extra=NOT_IN_KEY)
    # Per level: rejected images / images and rejected annotations / annotations.
    max_reject_ratio: float = 0.05
    # COCO crowd regions (iscrowd=1, one mask over many objects): left out of the sample
    # (skip), kept as one more mask (as_mask), or their whole image rejected (reject_image).
    crowd: Literal["skip", "as_mask", "reject_image"] = "skip"
    coco_unit_images: int = Field(256, ge=1)  # images of a COCO source per conversion unit


class TeacherConfig(_Config):
    # synthetic: train a tiny SAM here; reference: the one shipped in data/reference_teacher/
    # (trained on the embedded benchmark); vit_h/l/b: a SAM checkpoint.
    kind: Literal["synthetic", "reference", "vit_h", "vit_l", "vit_b"] = "synthetic"
    checkpoint: Path | None = None  # required for vit_*; reference: the shipped file unless given
    sha256: str | None = None  # pin the checkpoint file
    # A SAM file that is not an official release (nor pinned) is refused unless this is set.
    allow_unverified: bool = False
    # Small ViT of the synthetic teacher.
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
    concurrency: int = Field(1, json_schema_extra=NOT_IN_KEY)  # actors in the pool
    # Ray CPUs of each actor: its JPEG decoding threads (and torch threads on CPU).
    cpus_per_actor: int = Field(1, json_schema_extra=NOT_IN_KEY)
    # Autocast on GPUs only; keyed as the precision (pipelines/embed.py runtime_key).
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", json_schema_extra=NOT_IN_KEY)
    sdpa: bool = True  # SAM's ViT attention through fused SDPA kernels (edgesam/models/sdpa.py)
    compile: bool = False  # torch.compile the teacher's encoder (GPU actors only)


class EncoderKDConfig(_Config):
    backbone: str = "repvit_m1"  # any timm model name with features_only support
    # ImageNet start of the backbone: false; true (timm's weights, downloaded: needs network);
    # or the path of a local weights file of that timm model (every worker must read it).
    pretrained: bool | Path = False
    # The student to start from instead of a fresh one: an EdgeSAM checkpoint of this project or an
    # official release file (edge_sam.pth, edge_sam_3x.pth). With train.epochs 0 it is passed on as is.
    init: Path | None = None
    upsample_mode: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval_images: int | None = None  # val images of the mIoU report (None: all)
    # GPU options for the student's fixed-shape image encoder: channels-last layout, torch.compile.
    channels_last: bool = False
    compile: bool = False


class PromptKDConfig(_Config):
    train: TrainConfig = Field(default_factory=TrainConfig)
    init: Path | None = None  # start from this student (ours or the official release), not phase 1's
    max_prompts: int = 16
    box_prob: float = 0.5
    prompt_types: Literal["both", "box", "point"] = "both"
    decode_iters: int = 2  # 1 = no prompt loop
    points_per_iter: int = 1
    min_disagreement_cells: int = 10  # fewer disagreeing low-res cells: no new point (EdgeSAM)
    point_multimask: int = 4  # mask outputs for point prompts: 1, 3 or 4
    box_multimask: int = 1
    freeze_encoder: bool = False
    freeze_decoder: bool = False
    freeze_prompt_encoder: bool = True
    freeze_iou_head: bool = True  # EdgeSAM never trains it: the scores stay the teacher's
    target: Literal["binary", "logits"] = "binary"
    dice_weight: float = 5.0
    bce_weight: float = 5.0
    eval_images: int | None = None  # val images of the mIoU report (None: all)
    # GPU options for the student's fixed-shape image encoder: channels-last layout, torch.compile.
    channels_last: bool = False
    compile: bool = False


class RPNConfig(_Config):
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: Literal["official", "weighted"] = "official"  # how proposals become a click's box (models/rpn.py)
    channels: int = 128  # FPN and head width
    num_convs: int = 2  # shared head tower depth
    cache_features: bool = False  # keep the frozen encoder's features in memory after epoch 1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    huber_beta: float = 0.1


class EvaluateConfig(_Config):
    max_images: int | None = None  # per dataset
    # Prompting protocols (edgesam/eval/engine.py): "paper" is EdgeSAM's eval_mIoU.py, "sam" SAM's
    # interactive style; every table of the report names its protocol.
    protocols: list[Literal["paper", "sam"]] = Field(default_factory=lambda: ["paper", "sam"])
    refine_iters: int = 3  # corrective clicks after the first prompt
    max_annotations_per_image: int | None = 64  # SA-1B-format sets, drawn at random (EdgeSAM: 64); COCO: all
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
    check_protocol: Literal["paper", "sam"] = "paper"  # how that check prompts (`edgesam.eval.engine.PROTOCOLS`)
    check_refine_iters: int = 3


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


def cache_view(section: BaseModel) -> dict[str, Any]:
    """A config section as its stage's cache key sees it: fields marked `NOT_IN_KEY` dropped,
    paths replaced by the content identity of what they point to (`content_identity`: names,
    sizes and SHA-256s, never the location, so moved or copied inputs keep their key)."""
    view: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        if (field.json_schema_extra or {}).get("cache_key") is False:
            continue
        view[name] = _key_value(getattr(section, name))
    return view


def _key_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return cache_view(value)
    if isinstance(value, Path):
        return content_identity(value)
    if isinstance(value, dict):
        return {str(k): _key_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_key_value(v) for v in value]
    return value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn `a.b=value` strings into a nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_summary(name: str) -> str:
    """The first comment line of profile `name`: its one-line description (`--help`)."""
    for line in (PROFILES_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


class ConfigError(ValueError):
    """A setting that cannot work, found before any stage runs; the message names the key."""


def _input_paths(cfg: PipelineConfig) -> dict[str, Path]:
    """Every user path the run will read, by its config key."""
    data, paths = cfg.data, {}
    for key in ("sa1b_path", "coco_train", "coco_val", "coco_images"):
        if getattr(data, key) is not None:
            paths[f"data.{key}"] = getattr(data, key)
    for i, source in enumerate(data.coco_sources):
        paths[f"data.coco_sources[{i}].annotations"], paths[f"data.coco_sources[{i}].images"] = (
            source.annotations, source.images)
    optional = {"teacher.checkpoint": cfg.teacher.checkpoint, "shard.subset_ids_file": cfg.shard.subset_ids_file,
                "encoder_kd.init": cfg.encoder_kd.init, "prompt_kd.init": cfg.prompt_kd.init}
    if isinstance(cfg.encoder_kd.pretrained, Path):
        optional["encoder_kd.pretrained"] = cfg.encoder_kd.pretrained
    paths.update({k: v for k, v in optional.items() if v is not None})
    return paths


def validate_before_work(cfg: PipelineConfig) -> None:
    """Checks that need no model: every input path exists, and a teacher checkpoint is given
    where one is needed. Raises `ConfigError` naming the key."""
    for key, path in _input_paths(cfg).items():
        if not Path(path).expanduser().exists():
            raise ConfigError(f"{key} = {path}: no such file or directory")
    if cfg.teacher.kind.startswith("vit_") and cfg.teacher.checkpoint is None:
        raise ConfigError(f"teacher.checkpoint: teacher.kind {cfg.teacher.kind} needs the SAM checkpoint file")


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build the pipeline config of profile `name`, with `overrides` deep-merged on top."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    values = yaml.safe_load(path.read_text()) or {}
    values = deep_merge(values, overrides or {})
    values["profile"] = name
    return PipelineConfig.model_validate(values)
