"""One writer per artifact: an OS lock (`fcntl.flock`) per artifact folder, held for a whole
stage run. The kernel releases it when the holder dies (kill -9 included), so a stale lock
never blocks; a second run waits for the first, then finds the artifact committed. flock is
per host: a work dir shared by several machines over NFS needs one driver per work dir."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def lock_path(folder: Path) -> Path:
    """The lock file beside the folder (hidden, so that a forced stage can move the folder aside)."""
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def artifact_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold the lock of `folder` for the block; when another process holds it, log who and wait."""
    path = lock_path(Path(folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            log.info("%s: %s is being written by %s; waiting for it", what, folder, handle.read().strip() or "another run")
            start = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("%s: the other writer finished after %.1fs", what, time.perf_counter() - start)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def writer_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a temporary file's writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
