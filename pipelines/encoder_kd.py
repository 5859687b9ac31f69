"""Stage `encoder_kd`: EdgeSAM phase 1, the student encoder learns the teacher's embeddings.

Reads the embed artifact's training shards (image + stored teacher embedding), trains a
`StudentEncoder` with pixel-wise MSE over the unpadded cells in the shared loop (Ray Train),
then saves `student.pt`: a complete EdgeSAM `Sam` whose prompt encoder and mask decoder are
copied from the teacher, evaluated on the val split with box and point prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import nn

from edgesam.artifacts import Artifact
from edgesam.config import EncoderKDConfig, RuntimeConfig
from edgesam.data.shards import Sample, SampleDataset, list_shards
from edgesam.data.transforms import preprocess, valid_mask
from edgesam.distill import encoder_kd_loss
from edgesam.evaluation import shard_items
from edgesam.models.edgesam import build_edgesam, load_edgesam, save_edgesam
from edgesam.models.student import StudentEncoder
from edgesam.models.teacher import load_teacher, load_tiny_sam
from edgesam.prompt_eval import evaluate_prompts
from edgesam.train import fit, training_summary
from pipelines.teacher import load_teacher_artifact

STAGE = "encoder_kd"
UPSTREAM = ("embed", "teacher")
STUDENT_FILE = "student.pt"

log = logging.getLogger("edgesam.pipelines.encoder_kd")


def embedding_example(sample: Sample, img_size: int, valid_stride: int = 16) -> dict[str, torch.Tensor]:
    """Preprocessed image, stored teacher embedding and the valid cells of one sample on the
    grid of stride `valid_stride` (16: the embedding, 4: the low-res masks)."""
    if sample.embedding is None:
        raise ValueError(f"sample {sample.key} has no teacher embedding (emb.npy): not an embed artifact")
    image, hw = preprocess(sample.image, img_size)
    embedding = torch.from_numpy(sample.embedding.astype(np.float32))
    return {"image": image, "teacher_emb": embedding, "valid": valid_mask(hw, img_size, img_size // valid_stride)}


def embed_inputs(embed: Artifact) -> tuple[int, list[str], int]:
    """(img_size, training shard paths, training samples) of an embed artifact."""
    manifest = embed.manifest
    shards = [str(p) for p in list_shards(embed.path, "train")]
    if not shards:
        raise FileNotFoundError(f"{embed.path}/train: the embed artifact has no training shards")
    return int(manifest["img_size"]), shards, int(manifest["splits"]["train"]["samples"])


def load_teacher_model(kind: str, checkpoint: str) -> Sam:
    """The teacher: the synthetic reference teacher (a tiny SAM) or a verified SAM checkpoint."""
    return load_tiny_sam(Path(checkpoint)) if kind == "synthetic" else load_teacher(kind, Path(checkpoint))


def loader(
    dataset: SampleDataset, batch_size: int, workers: int, seed: int, collate=None
) -> torch.utils.data.DataLoader:
    """A DataLoader with its own generator: starting it leaves the global RNG (restored on
    resume, and used by the prompt loop) untouched."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
        persistent_workers=False, prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class EncoderKDTask:
    """Phase 1 as a `TrainTask`: the student encoder alone, MSE to stored embeddings."""

    backbone: str
    upsample_mode: str
    img_size: int
    shards: list[str]
    samples: int
    loader_workers: int
    teacher_checkpoint: str
    seed: int = 0

    def build_model(self) -> nn.Module:
        return StudentEncoder(self.backbone, self.img_size, upsample_mode=self.upsample_mode)

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return model.parameters()

    def num_samples(self) -> int:
        return self.samples

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterable[Any]:
        dataset = SampleDataset(
            self.shards, partial(embedding_example, img_size=self.img_size), shuffle=True,
            seed=self.seed, rank=rank, world_size=world_size,
        )
        dataset.set_epoch(epoch)
        return loader(dataset, batch_size, self.loader_workers, self.seed + epoch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return encoder_kd_loss(model(batch["image"]), batch["teacher_emb"], batch["valid"]), {}

    def batch_size_of(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["image"])

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        sam = build_edgesam(self.backbone, self.img_size, self.teacher_checkpoint, self.upsample_mode)
        sam.image_encoder.load_state_dict(model.state_dict())
        save_edgesam(sam, Path(out_dir) / STUDENT_FILE, stage=STAGE)
        return {"student": STUDENT_FILE}


def evaluate_val(embed: Artifact, teacher: Sam, students: dict[str, Sam], max_images: int | None) -> dict[str, Any]:
    """Box/point mIoU on the embed artifact's val split (its first `max_images` images, all
    when None), vs ground truth and vs the teacher."""
    shards = list_shards(embed.path, "val")
    log.info("evaluating %s on %s val images", ", ".join(["teacher", *students]), max_images or "all")
    return evaluate_prompts(shard_items(shards, max_images), teacher, students)


def run(cfg: EncoderKDConfig, runtime: RuntimeConfig, inputs: dict[str, Artifact], out: Path) -> dict[str, Any]:
    embed, teacher_artifact = inputs["embed"], inputs["teacher"]
    img_size, shards, samples = embed_inputs(embed)
    teacher, teacher_checkpoint = load_teacher_artifact(teacher_artifact)  # verifies its sha256
    task = EncoderKDTask(
        cfg.backbone, cfg.upsample_mode, img_size, shards, samples, cfg.train.loader_workers,
        str(teacher_checkpoint), runtime.seed,
    )
    summary = fit(task, cfg.train, runtime, out)
    miou = evaluate_val(embed, teacher, {STAGE: load_edgesam(out / STUDENT_FILE)}, cfg.eval_images)
    log.info("val mIoU: %s", miou)
    return {
        "student": STUDENT_FILE,
        "backbone": cfg.backbone,
        "img_size": img_size,
        "train_samples": samples,
        **training_summary(summary),
        "miou": miou,
    }


if __name__ == "__main__":
    from pipelines.cli import main

    main(stage=STAGE)
