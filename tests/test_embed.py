"""Embed stage: parity with a direct teacher call, reader alignment, per-shard resume, clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from edgesam.artifacts import Artifact, ArtifactStore, clear_partial_writes, sha256_file, temp_path
from edgesam.config import EmbedConfig, RuntimeConfig, load_profile
from edgesam.data.shards import iter_raw, iter_samples, list_shards
from edgesam.data.transforms import preprocess
from edgesam.models.teacher import TeacherCheckpointError
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam
from pipelines import embed
from pipelines.stage import run_dag

# float16 keeps 11 significant bits: a stored value is within 2**-11 (relative) of the float32
# embedding; we allow 2**-10 relative plus 1e-4 absolute for float32 batch-size effects.
FP16_RTOL, FP16_ATOL = 2**-10, 1e-4
RUNTIME = RuntimeConfig(num_workers=1, object_store_mb=128)


@pytest.fixture(scope="module")
def shard_artifact(tmp_path_factory) -> Artifact:
    """3 train shards and 1 val shard of 2 images each, made by the data and shard stages."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_profile("smoke", {
        "runtime": {"work_dir": str(root)},
        "data": {"num_train": 6, "num_val": 2, "images_per_tar": 3},
        "shard": {"max_count": 2, "workers": 1},
    })
    return run_dag(cfg, ArtifactStore(root), stages=["data", "shard"])["shard"][0]


def make_teacher(directory, sam=None) -> Artifact:
    sam = sam or build_tiny_sam(256, embed_dim=32, depth=1, num_heads=2)
    directory.mkdir(parents=True, exist_ok=True)
    save_tiny_sam(sam, directory / "teacher.pt")
    artifact = Artifact("teacher", directory.name, directory)
    artifact.commit({"kind": "synthetic", "checkpoint": "teacher.pt",
                     "sha256": sha256_file(directory / "teacher.pt"), "img_size": 256})
    return artifact


@pytest.fixture(scope="module")
def embedded(shard_artifact, tmp_path_factory):
    import ray

    torch.manual_seed(0)
    sam = build_tiny_sam(256, embed_dim=32, depth=1, num_heads=2)
    teacher = make_teacher(tmp_path_factory.mktemp("teacher"), sam)
    out = tmp_path_factory.mktemp("embed")
    inputs = {"shard": shard_artifact, "teacher": teacher}
    manifest = embed.run(EmbedConfig(batch_size=3), RUNTIME, inputs, out)
    yield sam, inputs, out, manifest
    ray.shutdown()


def test_embeddings_match_a_direct_teacher_call(embedded):
    sam, _, out, manifest = embedded
    assert manifest["embedding_shape"] == [256, 16, 16] and manifest["img_size"] == 256
    samples = list(iter_samples(list_shards(out, "train") + list_shards(out, "val")))
    assert len(samples) == 8
    with torch.no_grad():
        for sample in samples:
            assert sample.embedding.dtype == np.float16 and sample.embedding.shape == (256, 16, 16)
            x, _ = preprocess(sample.image, 256)
            direct = sam.image_encoder(x[None])[0]
            torch.testing.assert_close(torch.from_numpy(sample.embedding).float(), direct,
                                       rtol=FP16_RTOL, atol=FP16_ATOL)


def test_shards_keep_every_input_member_aligned_by_key(embedded):
    _, inputs, out, manifest = embedded
    shard = inputs["shard"]
    for split in ("train", "val"):
        sources = list_shards(shard.path, split)
        assert [p.name for p in list_shards(out, split)] == [p.name for p in sources]
        for source in sources:
            original = dict(iter_raw(source))
            written = dict(iter_raw(out / split / source.name))
            assert list(written) == list(original)  # same keys, same order
            for key, members in written.items():
                assert set(members) == set(original[key]) | {"emb.npy"}
                assert all(members[ext] == original[key][ext] for ext in original[key])
        assert manifest["splits"][split]["samples"] == shard.manifest["splits"][split]["samples"]


def test_rerun_after_kill_recomputes_only_missing_shards(embedded):
    _, inputs, out, _ = embedded
    missing = out / "train" / "shard-000001.tar"
    expected_sha = sha256_file(missing)
    missing.unlink()
    partial = temp_path(missing)  # what a killed attempt leaves behind
    partial.write_bytes(b"partial tar")
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/shard-*.tar")}
    clear_partial_writes(out)  # as the stage runner does before it reruns a stage
    manifest = embed.run(EmbedConfig(batch_size=3), RUNTIME, inputs, out)
    assert manifest["computed_shards"] == 1 and manifest["reused_shards"] == 3
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())
    assert sha256_file(missing) == expected_sha and not partial.exists()


def test_missing_or_changed_teacher_checkpoint_is_a_clear_error(shard_artifact, tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    (teacher.path / "teacher.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherCheckpointError, match=r"teacher\.pt does not match .*manifest\.json"):
        embed.run(EmbedConfig(), RUNTIME, {"shard": shard_artifact, "teacher": teacher}, tmp_path / "out")
    os.remove(teacher.path / "teacher.pt")
    with pytest.raises(TeacherCheckpointError, match=r"teacher\.pt named by .* is missing"):
        embed.run(EmbedConfig(), RUNTIME, {"shard": shard_artifact, "teacher": teacher}, tmp_path / "out")
