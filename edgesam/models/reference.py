"""The reference teacher shipped with the project (the repository's `data/reference_teacher/`, see its CARD.md).

A tiny SAM (segment-anything's ViT, prompt encoder and decoder) trained by the teacher stage
on the embedded benchmark, stored as a float16 state dict beside `reference_teacher.json`,
which pins its SHA-256, architecture, the benchmark it was trained on and its val mIoU. The
teacher stage verifies it like a SAM checkpoint and warns when the shards it is used on are
not that benchmark.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from segment_anything.modeling import Sam

from edgesam.artifacts import atomic_torch_save, file_digests, write_json_atomic
from edgesam.models.checkpoint import TeacherCheckpointError, check_state, read_checkpoint
from edgesam.models.tiny_sam import build_tiny_sam, load_tiny_sam, tiny_sam_config

log = logging.getLogger(__name__)

WEIGHTS, META = "reference_teacher.pt", "reference_teacher.json"


def reference_metadata(directory: Path) -> dict[str, Any]:
    """The shipped reference teacher's metadata (architecture, sha256, benchmark, val mIoU)."""
    path = Path(directory) / META
    if not path.is_file():
        raise TeacherCheckpointError(f"reference teacher metadata not found: {path}")
    return json.loads(path.read_text())


def verify_reference(path: Path, sha256: str | None = None, allow_unverified: bool = False) -> tuple[str, dict]:
    """Hash a reference-teacher file once against the SHA-256 its metadata (or `sha256`) pins;
    returns (sha256, metadata). A mismatch is refused unless `allow_unverified` (then a warning)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(f"reference teacher checkpoint not found: {path}")
    meta = reference_metadata(path.parent)
    actual, _ = file_digests(path)
    expected = (sha256 or meta["sha256"]).lower()
    if actual != expected:
        if not allow_unverified:
            raise TeacherCheckpointError(f"{path} has sha256 {actual}, but {path.parent / META} pins "
                                         f"{expected}: a damaged or different file (teacher.allow_unverified: true "
                                         "uses it anyway)")
        log.warning("reference teacher %s is unverified: sha256 %s, pinned %s", path, actual, expected)
    return actual, meta


def load_reference_sam(path: Path, arch: dict) -> Sam:
    """The reference teacher: a tiny SAM of `arch` from its float16 state dict (keys and shapes checked)."""
    state = read_checkpoint(path, "reference teacher", TeacherCheckpointError)
    sam = build_tiny_sam(**arch)
    check_state(sam.state_dict(), state, Path(path), f"reference teacher {arch}", TeacherCheckpointError)
    sam.load_state_dict(state)  # float16 -> the model's float32
    return sam.eval()


def load_reference(path: Path) -> Sam:
    """The reference teacher at `path`, built from the metadata beside it (no hashing)."""
    return load_reference_sam(path, reference_metadata(Path(path).parent)["arch"])


def describe_reference(checkpoint: Path, sha256: str | None, allow_unverified: bool,
                       shard_manifest: dict[str, Any]) -> dict[str, Any]:
    """Verify the reference teacher once and describe it for the teacher stage's manifest,
    warning when the shards are not the benchmark it was trained on."""
    path = Path(checkpoint).expanduser().resolve()
    digest, meta = verify_reference(path, sha256, allow_unverified)
    load_reference_sam(path, meta["arch"])  # every key and shape checked
    trained_on = meta["benchmark"]
    used_on = {"data_checksum": shard_manifest.get("data_checksum"), "target_size": shard_manifest["target_size"]}
    matches = all(used_on[k] == trained_on[k] for k in used_on)
    if not matches:
        log.warning("the reference teacher %s was trained on the embedded benchmark %s, but these shards are %s: its "
                    "masks are not what it learned, so distilling it measures little", path, trained_on, used_on)
    log.info("teacher: the reference teacher at %s (sha256 %s)", path, digest)
    return {"kind": "reference", "checkpoint": str(path), "sha256": digest, "arch": meta["arch"],
            "img_size": meta["arch"]["img_size"], "val": meta["val"], "benchmark_matches": matches}


def pack_reference(trained: Path, out_dir: Path, benchmark: dict[str, Any], val: dict[str, Any],
                   recipe: dict[str, Any]) -> dict[str, Any]:
    """Write a trained tiny SAM (`save_tiny_sam` file) as the shipped reference teacher: float16
    weights and the metadata that pins them; returns the metadata."""
    sam = load_tiny_sam(trained)
    weights = Path(out_dir) / WEIGHTS
    atomic_torch_save({k: v.half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}, weights)
    meta = {"arch": tiny_sam_config(sam), "sha256": file_digests(weights)[0], "bytes": weights.stat().st_size,
            "benchmark": benchmark, "val": val, "recipe": recipe}
    write_json_atomic(Path(out_dir) / META, meta)
    return meta
