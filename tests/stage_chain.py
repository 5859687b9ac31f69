"""A tiny committed chain of upstream artifacts (data .. rpn) for the rpn/evaluate/export stage tests.

Real code paths everywhere (synthetic benchmark, shard stage, RPN stage); only the
training stages are replaced by random-weight models at 128 px, saved in their formats, with
made-up loss curves in their manifests (the rpn's is real).
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import DataConfig, RPNConfig, RuntimeConfig, ShardConfig, TrainConfig
from edgesam.data.synth import write_benchmark
from edgesam.models.edgesam import build_edgesam, save_edgesam
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam

IMG = 128
LOCAL = RuntimeConfig(num_workers=0)


def made_up_curve(steps: int, **iou_keys: float) -> list[dict[str, float]]:
    """Logged records as `edgesam.train.fit` writes them: a falling loss and rising IoUs."""
    return [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "images_per_s": 10.0,
             **{key: min(1.0, start + s / (2 * steps)) for key, start in iou_keys.items()}} for s in range(1, steps + 1)]


def _artifact(root: Path, stage: str) -> Artifact:
    artifact = Artifact(stage, "fixture", root / stage)
    artifact.path.mkdir(parents=True, exist_ok=True)
    return artifact


def upstream_chain(root: Path, with_rpn: bool = True) -> dict[str, Artifact]:
    """Committed data, shard, teacher, encoder_kd, prompt_kd (and rpn) artifacts under `root`."""
    from pipelines import shard

    arts = {}
    data = _artifact(root, "data")
    data.commit(write_benchmark(data.path, DataConfig(num_train=8, num_val=3, images_per_tar=8, min_side=192,
                                                      max_side=256, objects_per_image=(2, 3))))
    arts["data"] = data
    shards = _artifact(root, "shard")
    shards.commit(shard.run(ShardConfig(target_size=IMG, max_count=8, workers=1), LOCAL, {"data": data}, shards.path))
    arts["shard"] = shards
    torch.manual_seed(0)
    teacher = _artifact(root, "teacher")
    tiny = build_tiny_sam(img_size=IMG, embed_dim=32, depth=1, num_heads=2)
    save_tiny_sam(tiny, teacher.path / "teacher.pt")
    teacher.commit({"kind": "synthetic", "checkpoint": "teacher.pt", "sha256": sha256_file(teacher.path / "teacher.pt"),
                    "img_size": IMG, "train": {"loss": {"curve": made_up_curve(6, train_box_iou=0.3)}}})
    arts["teacher"] = teacher
    for stage in ("encoder_kd", "prompt_kd"):
        student = _artifact(root, stage)
        save_edgesam(build_edgesam("repvit_m1", img_size=IMG, decoder_init=tiny), student.path / "student.pt")
        iou = {"iou_iter0": 0.2, "iou_iter1": 0.4} if stage == "prompt_kd" else {}
        student.commit({"student": "student.pt", "img_size": IMG, "loss": {"curve": made_up_curve(5, **iou)}})
        arts[stage] = student
    if with_rpn:
        from pipelines import rpn

        artifact = _artifact(root, "rpn")
        cfg = RPNConfig(channels=32, num_convs=1, train=TrainConfig(
            epochs=1, max_steps=2, batch_size=4, warmup_steps=1, log_every=1, loader_workers=0))
        artifact.commit(rpn.run(cfg, LOCAL, {"data": data, "prompt_kd": arts["prompt_kd"]}, artifact.path))
        arts["rpn"] = artifact
    return arts
