"""Teacher stage: the reference teacher trains (loss falls) and is evaluated; SAM checkpoints
are verified with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgesam.artifacts import Artifact, ArtifactStore
from edgesam.config import RuntimeConfig, TeacherConfig, TrainConfig, load_profile
from edgesam.models.teacher import TeacherCheckpointError, TeacherSource
from edgesam.models.tiny_sam import build_tiny_sam, load_tiny_sam
from pipelines import teacher
from pipelines.stage import run_dag

LOCAL = RuntimeConfig(num_workers=0)  # Ray Train's in-process mode: same loop, no cluster start


@pytest.fixture(scope="module")
def shard_artifact(tmp_path_factory) -> Artifact:
    root = tmp_path_factory.mktemp("runs")
    cfg = load_profile("smoke", {
        "runtime": {"work_dir": str(root)},
        "data": {"num_train": 4, "num_val": 2, "images_per_tar": 4},
        "shard": {"max_count": 4, "workers": 1},
    })
    return run_dag(cfg, ArtifactStore(root), stages=["data", "shard"])["shard"][0]


def tiny_teacher_config(**train) -> TeacherConfig:
    return TeacherConfig(
        embed_dim=32, depth=1, num_heads=2, max_prompts=4, corrective_clicks=1,
        train=TrainConfig(**{"epochs": 100, "max_steps": 16, "batch_size": 2, "lr": 2e-3, "warmup_steps": 2,
                             "checkpoint_every": 8, "log_every": 2, **train}),
    )


def test_reference_teacher_trains_loss_falls_and_is_evaluated(shard_artifact, tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    manifest = teacher.run(tiny_teacher_config(), LOCAL, {"shard": shard_artifact}, out)
    losses = [h["loss"] for h in manifest["train"]["loss"]["curve"]]
    assert manifest["train"]["steps"] == 16 and len(losses) == 8
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0]
    val = manifest["val"]
    assert val["images"] == 2 and val["annotations"] > 0
    for key in ("box_miou", "point_best_of_3_miou", "point_score_selected_miou"):
        assert 0.0 <= val[key] <= 1.0
    assert val["point_best_of_3_miou"] >= val["point_score_selected_miou"]
    assert manifest["arch"] == {"img_size": 256, "embed_dim": 32, "depth": 1, "num_heads": 2}

    artifact = Artifact("teacher", "fp", out)
    artifact.commit(manifest)
    source = TeacherSource.from_artifact(artifact)
    reference = load_tiny_sam(out / "teacher.pt")
    for (name, a), b in zip(source.load().state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    path = Path(source.checkpoint)
    path.write_bytes(path.read_bytes()[:-10])  # damaged after the artifact was committed
    with pytest.raises(TeacherCheckpointError, match="changed since"):
        TeacherSource.from_artifact(artifact)


def test_sam_checkpoint_missing_or_wrong_is_a_clear_error(shard_artifact, tmp_path):
    inputs = {"shard": shard_artifact}
    with pytest.raises(TeacherCheckpointError, match="needs teacher.checkpoint"):
        teacher.run(TeacherConfig(kind="vit_b"), LOCAL, inputs, tmp_path)
    missing = tmp_path / "sam_vit_b.pth"
    with pytest.raises(TeacherCheckpointError, match=f"not found: {missing}"):
        teacher.run(TeacherConfig(kind="vit_b", checkpoint=missing), LOCAL, inputs, tmp_path)
    missing.write_bytes(b"\x00garbage")
    with pytest.raises(TeacherCheckpointError, match="is not an official SAM vit_b release.*allow_unverified"):
        teacher.run(TeacherConfig(kind="vit_b", checkpoint=missing), LOCAL, inputs, tmp_path)
    unverified = TeacherConfig(kind="vit_b", checkpoint=missing, allow_unverified=True)
    with pytest.raises(TeacherCheckpointError, match="corrupt"):
        teacher.run(unverified, LOCAL, inputs, tmp_path)
    torch.save(build_tiny_sam(256, 32, 1, 2).state_dict(), missing)  # a valid file of another model
    with pytest.raises(TeacherCheckpointError, match="is not a SAM vit_b checkpoint"):
        teacher.run(unverified, LOCAL, inputs, tmp_path)


def test_an_unofficial_sam_file_is_used_with_a_warning_when_allowed(shard_artifact, tmp_path, monkeypatch, caplog):
    from edgesam.artifacts import file_digests
    from edgesam.models import teacher as teacher_module

    monkeypatch.setitem(teacher_module.sam_model_registry, "vit_b", lambda: build_tiny_sam(64, 32, 1, 2))
    path = tmp_path / "my_sam_b.pth"
    torch.save(build_tiny_sam(64, 32, 1, 2).state_dict(), path)
    with caplog.at_level("WARNING"):
        manifest = teacher.run(TeacherConfig(kind="vit_b", checkpoint=path, allow_unverified=True), LOCAL,
                               {"shard": shard_artifact}, tmp_path)
    assert f"teacher {path} is an unverified SAM vit_b checkpoint" in caplog.text
    assert manifest["sha256"] == file_digests(path)[0]
    pinned = TeacherConfig(kind="vit_b", checkpoint=path, sha256=manifest["sha256"])  # pinned: no warning needed
    assert teacher.run(pinned, LOCAL, {"shard": shard_artifact}, tmp_path)["sha256"] == manifest["sha256"]


def _packed_reference(tmp_path, shard_artifact) -> Path:
    """A reference teacher packed from a tiny SAM, trained (as far as the test cares) on `shard_artifact`."""
    from edgesam.models.reference import pack_reference
    from edgesam.models.tiny_sam import save_tiny_sam

    trained = tmp_path / "trained.pt"
    save_tiny_sam(build_tiny_sam(256, 32, 1, 2), trained)
    manifest = shard_artifact.manifest
    benchmark = {"data_checksum": manifest["data_checksum"], "target_size": manifest["target_size"]}
    out = tmp_path / "reference"
    meta = pack_reference(trained, out, benchmark, {"box_miou": 0.5}, {"profile": "test"})
    assert meta["arch"] == {"img_size": 256, "embed_dim": 32, "depth": 1, "num_heads": 2}
    return out / "reference_teacher.pt"


def test_reference_teacher_is_verified_by_sha256_and_loads_like_a_sam_checkpoint(shard_artifact, tmp_path):
    from edgesam.models.tiny_sam import load_tiny_sam

    weights = _packed_reference(tmp_path, shard_artifact)
    state = torch.load(weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    cfg = TeacherConfig(kind="reference", checkpoint=weights)
    manifest = teacher.run(cfg, LOCAL, {"shard": shard_artifact}, tmp_path)
    assert manifest["kind"] == "reference" and manifest["benchmark_matches"] and manifest["img_size"] == 256
    artifact = Artifact("teacher", "ref", tmp_path)
    artifact.commit(manifest)
    loaded, trained = TeacherSource.from_artifact(artifact).load(), load_tiny_sam(tmp_path / "trained.pt")
    for (name, a), b in zip(loaded.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(a, b.half().float(), msg=name)  # float16 weights, float32 model
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte off
    with pytest.raises(TeacherCheckpointError, match="has sha256 .* pins .*damaged or different file"):
        teacher.run(cfg, LOCAL, {"shard": shard_artifact}, tmp_path)


def test_reference_teacher_on_another_benchmark_warns(shard_artifact, tmp_path, caplog):
    weights = _packed_reference(tmp_path, shard_artifact)
    other = Artifact("shard", "other", tmp_path / "other")
    other.path.mkdir()
    other.commit({**shard_artifact.manifest, "data_checksum": "0" * 64})
    with caplog.at_level("WARNING"):
        manifest = teacher.run(TeacherConfig(kind="reference", checkpoint=weights), LOCAL, {"shard": other}, tmp_path)
    assert not manifest["benchmark_matches"] and "was trained on the embedded benchmark" in caplog.text


def test_interior_points_and_corrective_clicks_sample_the_right_regions():
    from edgesam.objectives.prompts import error_region_clicks, interior_points

    target = torch.zeros(3, 16, 16, dtype=torch.bool)
    target[:, 4:8, 4:8] = True
    points, labels = interior_points(target)
    xy = points[:, 0].long()
    assert labels.tolist() == [[1]] * 3 and target[0, xy[:, 1], xy[:, 0]].all()
    prediction = torch.zeros_like(target)
    prediction[1] = target[1]
    prediction[1, 10:12, 10:12] = True  # a false positive only
    prediction[2] = target[2]  # exact
    points, labels = error_region_clicks(target, prediction)
    x, y = points[:, 0, 0].long(), points[:, 0, 1].long()
    assert labels[:, 0].tolist() == [1, 0, -1]
    assert target[0, y[0], x[0]] and 10 <= x[1] < 12 and 10 <= y[1] < 12
