"""Content identities of external inputs (SA-1B tars, COCO JSON, a teacher checkpoint).

A cache key identifies a user's file by its content (names, sizes, SHA-256), not its path or
mtime: SA-1B copied to another disk keeps every key. Hashing is paid once per file: digests
are cached locally (`EDGESAM_DIGEST_CACHE`, default `~/.cache/edgesam/digests.json`) keyed by
the file's absolute path, size, mtime and inode, so an unchanged file is never read twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgesam.store.files import sha256_of


def cache_file() -> Path:
    return Path(os.environ.get("EDGESAM_DIGEST_CACHE", Path.home() / ".cache" / "edgesam" / "digests.json"))


class DigestCache:
    """SHA-256 digests by (path, size, mtime, inode), loaded once and saved under a lock."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or cache_file())
        self.entries: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.added: dict[str, str] = {}

    def digest(self, file: Path) -> str:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
        if key not in self.entries:
            self.entries[key] = self.added[key] = sha256_of(file)
        return self.entries[key]

    def save(self) -> None:
        """Merge what this process hashed into the cache file (other processes may have added theirs)."""
        if not self.added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = json.loads(self.path.read_text()) if self.path.is_file() else {}
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({**current, **self.added}))
            os.replace(tmp, self.path)
        self.added = {}


def content_identity(path: Path, cache: DigestCache | None = None) -> dict[str, Any]:
    """What a cache key knows of an external input: a file's name, size and SHA-256, or a
    directory's listing of relative names, sizes and SHA-256s (digested); never its location."""
    path = Path(path).expanduser()
    own = cache is None
    cache = cache or DigestCache()
    try:
        if path.is_file():
            return {"name": path.name, "bytes": path.stat().st_size, "sha256": cache.digest(path)}
        if path.is_dir():
            listing = hashlib.sha256()
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                listing.update(f"{file.relative_to(path).as_posix()} {file.stat().st_size} {cache.digest(file)}\n".encode())
            return {"files": len(files), "content": listing.hexdigest()}
        return {"missing": str(path)}
    finally:
        if own:
            cache.save()
