"""Reproducible sample tars: members `<key>.<ext>` with fixed metadata, written atomically.

webdataset's TarWriter does the same but imports torch, which the SA-1B conversion workers and
the benchmark generator do without (they start small and fast), so every tar the project
writes goes through `tar_writer`, except the shard splitting of `webdataset.ShardWriter`.
"""

from __future__ import annotations

import io
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from edgesam.artifacts import atomic_path

WriteSample = Callable[[str, Mapping[str, bytes]], None]


@contextmanager
def tar_writer(path: str | Path) -> Iterator[WriteSample]:
    """Yield `write(key, {ext: payload})`; the tar appears at `path` only if the block succeeds.

    Members have mtime 0, mode 0644 and no owner, and come in extension order, so the same
    samples give the same bytes.
    """
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        def write(key: str, members: Mapping[str, bytes]) -> None:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[ext]))

        yield write
