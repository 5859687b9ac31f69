"""Content-addressed stage artifacts.

A stage's output lives in `<root>/<stage>/<fingerprint>/`, where the fingerprint hashes
(stage, its config, upstream fingerprints, code version). The directory is committed by
writing `manifest.json` last (atomically): a directory without a manifest is work in
progress, which the stage may resume, and is never taken as done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pydantic import BaseModel

MANIFEST = "manifest.json"
_PACKAGE_ROOT = Path(__file__).resolve().parent


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def source_hash(*paths: Path) -> str:
    """SHA-256 over the Python sources under `paths` (files or directories)."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def code_version(stage_module_file: str | Path | None = None) -> str:
    """Version of the code that produces an artifact: the library plus the stage module."""
    paths = [_PACKAGE_ROOT] + ([Path(stage_module_file)] if stage_module_file else [])
    return source_hash(*paths)


def path_identity(path: Path) -> dict[str, Any]:
    """What a cache key knows of an external input: a file's size and mtime, or a directory's
    file list with sizes and mtimes (digested), so that changed inputs change the key."""
    path = Path(path).expanduser()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        listing = hashlib.sha256()
        count = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            listing.update(f"{file.relative_to(path).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
            count += 1
        return {"path": str(path), "files": count, "listing": listing.hexdigest()}
    return {"path": str(path), "missing": True}


def fingerprint(stage: str, config: Any, upstream: Mapping[str, str], code: str) -> str:
    """Stable 16-hex-digit fingerprint of a stage's inputs."""
    payload = json.dumps(
        {"stage": stage, "config": _canonical(config), "upstream": _canonical(upstream), "code": code},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_digests(path: Path, chunk: int = 1 << 24) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read once (the pipeline's hashing; bundles: `edgesam.client.bundle.sha256`)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digests(path)[0]


def temp_path(path: Path) -> Path:
    """A hidden name beside `path` (same filesystem, same suffix) for writing it atomically."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path` to; it replaces `path` only when the block succeeds.

    Readers see the old file or the complete new one, never a partial one; on error the
    temporary file (or directory) is removed. Works for directories (e.g. `.mlpackage`) too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def clear_partial_writes(directory: Path) -> None:
    """Remove the temporary files (`temp_path`) an interrupted attempt left under `directory`."""
    for tmp in Path(directory).rglob(".*.tmp-*"):
        if tmp.is_file():
            tmp.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(_canonical(data), indent=2, sort_keys=True))


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # lazy: the orchestration layer imports this module without torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass(frozen=True)
class Artifact:
    """A committed (or in-progress) stage output directory."""

    stage: str
    fingerprint: str
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def complete(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def manifest(self) -> dict[str, Any]:
        if not self.complete:
            raise FileNotFoundError(f"{self.path}: artifact of stage {self.stage!r} is not complete")
        return json.loads(self.manifest_path.read_text())

    def commit(self, manifest: Mapping[str, Any]) -> None:
        """Mark the artifact complete. Must be the stage's last write."""
        body = {"stage": self.stage, "fingerprint": self.fingerprint, "committed_at": time.time(), **manifest}
        write_json_atomic(self.manifest_path, body)


class ArtifactStore:
    """Artifacts of all stages under one root directory (made absolute: stage workers, such as
    Ray's, may run in another working directory)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def artifact(self, stage: str, fp: str) -> Artifact:
        return Artifact(stage, fp, self.root / stage / fp)

    def upstream(self, artifact: Artifact, stage: str) -> Artifact:
        """The artifact of `stage` that `artifact`'s manifest names as its input."""
        return self.artifact(stage, artifact.manifest["upstream"][stage])

    @classmethod
    def of(cls, artifact_dir: str | Path) -> tuple["ArtifactStore", Artifact]:
        """The store holding the artifact folder `root/<stage>/<fingerprint>`, and that artifact."""
        path = Path(artifact_dir).expanduser().resolve()
        store = cls(path.parents[1])
        return store, store.artifact(path.parent.name, path.name)
