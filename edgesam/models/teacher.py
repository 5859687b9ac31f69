"""Teachers: official SAM ViT-H/L/B checkpoints and the tiny SAM of the embedded benchmark.

`build_teacher(kind, path)` is the one place that decides how each teacher kind is built.
`verify_sam_checkpoint` hashes a SAM file once (the official MD5 where the file carries an
official name, an optional pinned SHA-256); `TeacherSource` is what a committed teacher
artifact hands to later stages and their workers: verified once per stage process against
the SHA-256 the teacher stage recorded, then loaded without hashing again. Every failure
raises `TeacherCheckpointError` naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from edgesam.artifacts import Artifact, file_digests
from edgesam.models.checkpoint import TeacherCheckpointError, check_state, read_checkpoint
from edgesam.models.reference import load_reference
from edgesam.models.tiny_sam import load_tiny_sam

log = logging.getLogger(__name__)

SYNTHETIC, REFERENCE = "synthetic", "reference"
# Official release files. Meta publishes no SHA-256; the six hex characters in each file
# name are the prefix of the file's MD5, and the full MD5 below is the digest widely used
# to verify these downloads. We therefore verify the MD5 and report the SHA-256 we computed.
OFFICIAL_CHECKPOINTS = {
    "vit_h": ("sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6"),
    "vit_l": ("sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"),
    "vit_b": ("sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"),
}


def _check_kind(kind: str) -> None:
    if kind not in (SYNTHETIC, REFERENCE) and kind not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected {SYNTHETIC}, {REFERENCE} or one of "
                         f"{sorted(OFFICIAL_CHECKPOINTS)}")


def verify_sam_checkpoint(kind: str, path: Path, sha256: str | None = None, allow_unverified: bool = False) -> str:
    """Hash a SAM `kind` checkpoint once and check it: the official MD5 (by file name, or by
    content for a renamed release), or the pinned `sha256`. Any other file is refused unless
    `allow_unverified`, and then used with a warning naming it. Returns the file's SHA-256."""
    _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise TeacherCheckpointError(f"SAM {kind} checkpoint not found: {path}")
    official = {name: (k, digest) for k, (name, digest) in OFFICIAL_CHECKPOINTS.items()}
    official_kind, official_md5 = official.get(path.name, (kind, None))
    if official_kind != kind:
        raise TeacherCheckpointError(f"{path} is the official SAM {official_kind} checkpoint, but {kind} was requested")
    actual_sha256, md5 = file_digests(path)
    if official_md5 is not None and md5 != official_md5:
        raise TeacherCheckpointError(
            f"{path} does not match the official {path.name}: md5 {md5}, expected {official_md5} "
            "(incomplete download or a different file)"
        )
    if sha256 is not None and actual_sha256 != sha256.lower():
        raise TeacherCheckpointError(f"{path} has sha256 {actual_sha256}, expected {sha256}")
    if sha256 is None and md5 != OFFICIAL_CHECKPOINTS.get(kind, ("", ""))[1]:
        if not allow_unverified:
            raise TeacherCheckpointError(
                f"{path} is not an official SAM {kind} release (md5 {md5} matches none) and no teacher.sha256 "
                "pins it: set teacher.allow_unverified: true to use it anyway, or teacher.sha256 to pin it"
            )
        log.warning("teacher %s is an unverified SAM %s checkpoint (not an official release, sha256 %s)",
                    path, kind, actual_sha256)
    return actual_sha256


def load_sam_checkpoint(kind: str, path: Path) -> Sam:
    """Build SAM `kind` with segment-anything's builder and load `path` (keys and shapes checked)."""
    state = read_checkpoint(path, f"SAM {kind}", TeacherCheckpointError)
    with torch.device("meta"):  # shapes only: reject a wrong model before allocating it
        check_state(sam_model_registry[kind]().state_dict(), state, Path(path), f"SAM {kind}", TeacherCheckpointError)
    sam = sam_model_registry[kind]()
    sam.load_state_dict(state)
    return sam.eval()


def load_teacher(kind: str, checkpoint: Path, sha256: str | None = None, allow_unverified: bool = False) -> Sam:
    """An official SAM (`vit_h`, `vit_l` or `vit_b`) from `checkpoint`: verified, then loaded."""
    if kind not in OFFICIAL_CHECKPOINTS:
        raise ValueError(f"unknown SAM kind {kind!r}; expected one of {sorted(OFFICIAL_CHECKPOINTS)}")
    digest = verify_sam_checkpoint(kind, checkpoint, sha256, allow_unverified)
    log.info("SAM %s checkpoint %s sha256=%s", kind, checkpoint, digest)
    return load_sam_checkpoint(kind, checkpoint)


def build_teacher(kind: str, path: Path) -> Sam:
    """The teacher `Sam` of `kind` stored at `path` (eval mode, CPU), without hashing the file."""
    _check_kind(kind)
    if kind == SYNTHETIC:
        return load_tiny_sam(Path(path), TeacherCheckpointError).eval()
    if kind == REFERENCE:
        return load_reference(Path(path))
    return load_sam_checkpoint(kind, path)


@dataclass(frozen=True)
class TeacherSource:
    """A committed teacher artifact's checkpoint, verified: small and picklable, for workers."""

    kind: str
    checkpoint: str
    sha256: str
    img_size: int

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> TeacherSource:
        """Check the artifact's checkpoint against the SHA-256 its manifest recorded (one read)."""
        manifest = artifact.manifest
        path = Path(manifest["checkpoint"])
        path = path if path.is_absolute() else artifact.path / path
        if not path.is_file():
            raise TeacherCheckpointError(f"teacher checkpoint {path} named by {artifact.manifest_path} is missing")
        digest, _ = file_digests(path)
        if digest != manifest["sha256"]:
            raise TeacherCheckpointError(
                f"teacher checkpoint {path} does not match {artifact.manifest_path}: it changed since the teacher "
                f"stage ran (sha256 {digest}, recorded {manifest['sha256']}); rerun the teacher stage"
            )
        return cls(manifest["kind"], str(path), digest, int(manifest["img_size"]))

    def load(self) -> Sam:
        return build_teacher(self.kind, Path(self.checkpoint))


def describe_sam_teacher(kind: str, checkpoint: Path | None, sha256: str | None, allow_unverified: bool,
                         target_size: int) -> dict:
    """Verify a SAM ViT teacher file once (digest, then every key and shape) and describe it for
    the teacher stage's manifest (nothing big is copied: the manifest references the file)."""
    if checkpoint is None:
        raise TeacherCheckpointError(f"teacher.kind={kind} needs teacher.checkpoint (the path of the official "
                                     f"SAM {kind} checkpoint), or use teacher.kind=synthetic or reference")
    path = Path(checkpoint).expanduser().resolve()
    digest = verify_sam_checkpoint(kind, path, sha256, allow_unverified)
    img_size = load_sam_checkpoint(kind, path).image_encoder.img_size
    if target_size != img_size:
        log.warning("shards are resized to %d but SAM %s runs at %d: images are resized again", target_size, kind,
                    img_size)
    log.info("teacher: verified SAM %s at %s (sha256 %s)", kind, path, digest)
    return {"kind": kind, "checkpoint": str(path), "sha256": digest, "arch": {"kind": kind}, "img_size": img_size}
