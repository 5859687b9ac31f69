"""The files of an artifact as its manifest records them, and their verification.

A manifest lists every file of its artifact folder with its size and SHA-256 (hidden names,
such as Ray Train's `.ray_train` checkpoints and temporary files, are not results). Readers
trust that list, not the folder: a missing, resized, rewritten or unexpected file is damage,
named with the stage, the file, the expected and actual digest and the command that repairs it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


class DamagedArtifactError(RuntimeError):
    """A committed artifact's files do not match its manifest."""


def _result_files(directory: Path) -> Iterator[Path]:
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and relative.as_posix() != MANIFEST and not any(p.startswith(".") for p in relative.parts):
            yield path


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def list_files(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of the artifact's result files (read once each)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
            for p in _result_files(directory)}


def content_digest(files: dict[str, dict[str, Any]], fingerprint: str) -> str:
    """What downstream manifests record of an upstream: its fingerprint and its files' digests,
    so that an upstream recomputed under the same fingerprint with other content is noticed."""
    payload = json.dumps({"fingerprint": fingerprint, "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_problems(directory: Path, files: dict[str, dict[str, Any]], digests: bool) -> list[str]:
    """What differs between the folder and its recorded `files`: missing, resized, unexpected
    files, and with `digests` also rewritten ones (same size, other SHA-256)."""
    directory = Path(directory)
    problems = []
    present = {p.relative_to(directory).as_posix() for p in _result_files(directory)}
    for name in sorted(present - set(files)):
        problems.append(f"{directory / name}: not in the manifest (an unexpected file)")
    for name, entry in files.items():
        path = directory / name
        if name not in present:
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest records {entry['bytes']}")
        elif digests and (actual := sha256_of(path)) != entry["sha256"]:
            problems.append(f"{path}: sha256 {actual}, the manifest records {entry['sha256']}")
    return problems
