"""Embed stage: parity with a direct teacher call, byte-identical shards, reader alignment, no
embeddings through the driver, per-shard resume, clear errors."""

from __future__ import annotations

import copy
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from edgesam.artifacts import Artifact, ArtifactStore, clear_partial_writes, sha256_file, temp_path
from edgesam.config import EmbedConfig, RuntimeConfig, load_profile
from edgesam.tasks.embed import EMBEDDING, encode_npy, write_shard
from edgesam.data.shards import iter_raw, iter_samples, list_shards
from edgesam.data.transforms import preprocess
from edgesam.models.teacher import TeacherCheckpointError
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam
from pipelines import embed
from pipelines.stage import run_dag

# float16 keeps 11 significant bits: a stored value is within 2**-11 (relative) of the float32
# embedding; we allow 2**-10 relative plus 1e-4 absolute for float32 batch-size effects.
FP16_RTOL, FP16_ATOL = 2**-10, 1e-4
RUNTIME = RuntimeConfig(num_workers=1, object_store_mb=128, use_gpu=False)  # float32 parity, also on GPU hosts


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
    """The stage run once, with every object the driver fetched from Ray's object store recorded."""
    import ray

    torch.manual_seed(0)
    sam = build_tiny_sam(256, embed_dim=32, depth=1, num_heads=2)
    teacher = make_teacher(tmp_path_factory.mktemp("teacher"), sam)
    out = tmp_path_factory.mktemp("embed")
    inputs = {"shard": shard_artifact, "teacher": teacher}
    fetched = []
    get = ray.get

    def recording_get(*args, **kwargs):  # Ray Data's iterators resolve every block with ray.get
        value = get(*args, **kwargs)
        fetched.extend(value if isinstance(value, list) else [value])
        return value

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "get", recording_get)
        manifest = embed.run(EmbedConfig(batch_size=3), RUNTIME, inputs, out)
    yield sam, inputs, out, manifest, fetched
    ray.shutdown()


def test_embeddings_match_a_direct_teacher_call(embedded):
    sam, _, out, manifest, _ = embedded
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


def test_shards_are_byte_identical_to_a_direct_teacher_pass_written_with_write_shard(embedded, tmp_path):
    """What the stage wrote before its actors wrote their own shards: the input members plus
    the float16 embedding of a direct (unbatched, float32) teacher call, through `write_shard`
    (its attention through SDPA, as the stage's default `embed.sdpa`)."""
    from edgesam.models.sdpa import use_sdpa

    sam, inputs, out, manifest, _ = embedded
    sam = copy.deepcopy(sam)
    use_sdpa(sam.image_encoder)
    for split in ("train", "val"):
        for entry in manifest["splits"][split]["shards"]:
            source = inputs["shard"].path / entry["path"]
            samples = []
            with torch.no_grad():
                for key, members in iter_raw(source):
                    x, _ = preprocess(np.asarray(Image.open(io.BytesIO(members["jpg"])).convert("RGB")), 256)
                    embedding = sam.image_encoder(x[None])[0].numpy().astype(np.float16)
                    samples.append((key, {**members, EMBEDDING: encode_npy(embedding)}))
            expected = tmp_path / split / source.name
            write_shard(samples, expected, len(samples), str(source))
            written = out / entry["path"]
            assert written.read_bytes() == expected.read_bytes(), f"{written} differs from {expected}"
            assert (entry["bytes"], entry["sha256"]) == (written.stat().st_size, sha256_file(written))


def test_driver_receives_shard_summaries_never_embeddings(embedded):
    _, _, out, manifest, fetched = embedded
    import pyarrow as pa

    blocks = [value for value in fetched if isinstance(value, pa.Table)]
    assert sum(block.num_rows for block in blocks) == 4  # one summary per computed shard, nothing else
    assert all(set(block.column_names) == {"source", "path", "samples", "bytes", "sha256"} for block in blocks)
    one_embedding = 256 * 16 * 16 * 2
    assert sum(block.nbytes for block in blocks) < one_embedding / 10  # the shards hold 8 embeddings
    assert not any(isinstance(value, (bytes, np.ndarray)) and len(value) >= one_embedding for value in fetched)
    assert manifest["computed_shards"] == 4 and len(list(out.glob("*/shard-*.tar"))) == 4


def test_shards_keep_every_input_member_aligned_by_key(embedded):
    _, inputs, out, manifest, _ = embedded
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
    _, inputs, out, _, _ = embedded
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


def test_teacher_input_normalized_on_the_device_equals_preprocess():
    """The actor uploads uint8 and normalizes on the device: bit-identical to `preprocess`."""
    from edgesam.tasks.data import device_images
    from edgesam.tasks.embed import teacher_input

    image = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    padded, hw = teacher_input("shard.tar", "k", {"jpg": buffer.getvalue()}, 256)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    expected, expected_hw = preprocess(decoded, 256)
    assert padded.dtype == torch.uint8 and tuple(hw.tolist()) == expected_hw
    assert torch.equal(device_images(padded[None], hw[None])[0], expected)


def test_background_encoding_keeps_order_and_reraises_errors():
    from edgesam.tasks.embed import in_background

    def items():
        yield from range(5)
        raise ValueError("sample 5: cannot decode its jpg")

    seen = []
    with pytest.raises(ValueError, match="sample 5"):
        for item in in_background(items(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
