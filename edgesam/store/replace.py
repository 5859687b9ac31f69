"""Moving an artifact aside so that a forced stage recomputes from scratch.

The folder (with Ray Train's `.ray_train` checkpoints inside it) goes to
`<stage>/.replaced/<fingerprint>-<time>-<random>`, and a run kept in an external `storage_path` (a
local folder or a URI: pyarrow's filesystems, as Ray Train uses them) is moved the same way,
so that nothing of the earlier attempt is resumed. Nothing is deleted: `rm -rf
<work_dir>/*/.replaced` frees the space.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def move_aside(folder: Path, training_run: str | None = None) -> Path | None:
    """Move `folder` (and the training run at `training_run`, if it exists) aside; returns the new place."""
    folder = Path(folder)
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    moved = None
    if folder.exists():
        moved = folder.parent / ".replaced" / f"{folder.name}-{stamp}"
        moved.parent.mkdir(parents=True, exist_ok=True)
        folder.rename(moved)
        log.info("moved the earlier %s aside to %s", folder, moved)
    if training_run is not None:
        _move_run(training_run, stamp)
    return moved


def _move_run(run: str, stamp: str) -> None:
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(run if "://" in run else str(Path(run).resolve()))
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return
    target = f"{path.rstrip('/')}.replaced-{stamp}"
    filesystem.move(path, target)
    log.info("moved the earlier training run %s aside to %s", run, target)
