"""Checking committed artifacts against their manifests before they are served or read.

Sizes are checked whenever an artifact is served from the cache (a stat per file); SHA-256s
whenever a stage reads it as an input (once per stage run) and by `python -m pipelines
verify`. Hashing runs at disk speed on one core, so at SA-1B scale (the embed artifact holds
about 2 MiB per image) it is the I/O of one more pass over the inputs of each stage run.
"""

from __future__ import annotations

import logging
import time

from edgesam.artifacts import Artifact, ArtifactStore
from edgesam.store.files import DamagedArtifactError, file_problems

log = logging.getLogger(__name__)


def damage(artifact: Artifact, digests: bool) -> list[str]:
    """What of a committed artifact's files differs from its manifest (sizes; SHA-256s with `digests`)."""
    files = artifact.manifest.get("files")
    if files is None:
        return [f"{artifact.manifest_path}: records no file list (written by an older version)"]
    return file_problems(artifact.path, files, digests)


def verify_inputs(name: str, inputs: dict[str, Artifact]) -> None:
    """Sizes and SHA-256s of every upstream file, once per stage run; a mismatch names the repair."""
    for up, artifact in inputs.items():
        start = time.perf_counter()
        problems = damage(artifact, digests=True)
        if problems:
            raise DamagedArtifactError(
                f"stage {name!r} cannot read its input {up!r}: " + "; ".join(problems)
                + f". Recompute it with: python -m pipelines {up} --force (same --profile/--set)")
        size = sum(f["bytes"] for f in artifact.manifest["files"].values())
        log.info("stage %s: verified %s (%d files, %.1f MB) in %.2fs", name, up, len(artifact.manifest["files"]),
                 size / 1e6, time.perf_counter() - start)


def stale_reason(artifact: Artifact, inputs: dict[str, Artifact]) -> str | None:
    """Why a committed artifact may not be served: an upstream recomputed with other content
    under the same fingerprint (e.g. forced), or damage of its own files (sizes)."""
    recorded = artifact.manifest.get("upstream_content", {})
    for up, upstream in inputs.items():
        if recorded.get(up) != upstream.manifest.get("content"):
            return f"upstream {up} has other content than when it was computed"
    problems = damage(artifact, digests=False)
    return "; ".join(problems) if problems else None


def verify_store(store: ArtifactStore) -> list[str]:
    """Problems of every committed artifact of the work dir: its files (sizes and SHA-256s) and
    upstream contents that changed after it was computed."""
    problems = []
    for manifest_path in sorted(store.root.glob("*/*/manifest.json")):
        artifact = store.artifact(manifest_path.parent.parent.name, manifest_path.parent.name)
        problems += damage(artifact, digests=True)
        for up, fp in artifact.manifest.get("upstream", {}).items():
            upstream = store.artifact(up, fp)
            recorded = artifact.manifest.get("upstream_content", {}).get(up)
            if not upstream.complete:
                problems.append(f"{artifact.path}: its upstream {upstream.path} is not committed")
            elif recorded != upstream.manifest.get("content"):
                problems.append(f"{artifact.path}: computed from other {up} content than {upstream.path} holds")
    return problems
