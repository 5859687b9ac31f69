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
from typing import Any, Callable, Iterator, Mapping

from pydantic import BaseModel

from edgesam.store.files import MANIFEST, sha256_of
from edgesam.store.lock import writer_alive

WORK_DIR = "${work_dir}/"  # how a manifest writes a path inside the work dir


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


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


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
    return sha256_of(path)


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
        fsync_tree(tmp)  # the data reaches the disk before the name does
        if tmp.is_dir() and path.exists():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a directory (before renaming it into place:
    a checkpoint folder that has its final name has all its bytes on the disk)."""
    if Path(path).is_dir():
        for child in Path(path).rglob("*"):
            if child.is_file() or child.is_dir():
                _fsync(child)
    if Path(path).exists():
        _fsync(Path(path))


def _writer_pid(tmp: Path) -> int | None:
    """The pid in a `temp_path` name (`.<stem>.tmp-<pid>-<random>`)."""
    pid = tmp.name.partition(".tmp-")[2].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def clear_partial_writes(directory: Path) -> None:
    """Remove the temporary files (`temp_path`) that interrupted attempts left under
    `directory`: only those whose writer process is gone (a live one may still be writing)."""
    for tmp in Path(directory).rglob(".*.tmp-*"):
        pid = _writer_pid(tmp)
        if pid is not None and pid != os.getpid() and writer_alive(pid):
            continue
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

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object: torch names the zip's records `archive/`, not after the temp file


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
    def root(self) -> Path:
        """The store's root (the work dir), which manifests write paths relative to."""
        return self.path.parents[1]

    @property
    def manifest(self) -> dict[str, Any]:
        if not self.complete:
            raise FileNotFoundError(f"{self.path}: artifact of stage {self.stage!r} is not complete")
        return _map_strings(json.loads(self.manifest_path.read_text()),
                            lambda s: str(self.root / s[len(WORK_DIR):]) if s.startswith(WORK_DIR) else s)

    def commit(self, manifest: Mapping[str, Any]) -> None:
        """Mark the artifact complete. Must be the stage's last write. Paths inside the work dir
        are written relative to it (`${work_dir}/...`), so a moved or copied work dir reads its own files."""
        inside = str(self.root) + os.sep
        body = {"stage": self.stage, "fingerprint": self.fingerprint, "committed_at": time.time(), **manifest}
        write_json_atomic(self.manifest_path, _map_strings(
            _canonical(body), lambda s: WORK_DIR + s[len(inside):] if s.startswith(inside) else s))


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
