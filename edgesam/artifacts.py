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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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


def fingerprint(stage: str, config: Any, upstream: Mapping[str, str], code: str) -> str:
    """Stable 16-hex-digit fingerprint of a stage's inputs."""
    payload = json.dumps(
        {"stage": stage, "config": _canonical(config), "upstream": _canonical(upstream), "code": code},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either nothing or the whole file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_canonical(data), indent=2, sort_keys=True))
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same directory, then os.replace: never a partial file."""
    import torch  # lazy: the orchestration layer imports this module without torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def latest(self, stage: str) -> Artifact | None:
        """The most recently committed artifact of `stage`, if any."""
        done = [a for a in self.list(stage) if a.complete]
        return max(done, key=lambda a: a.manifest_path.stat().st_mtime, default=None)

    def list(self, stage: str) -> list[Artifact]:
        base = self.root / stage
        if not base.is_dir():
            return []
        return [self.artifact(stage, p.name) for p in sorted(base.iterdir()) if p.is_dir()]
