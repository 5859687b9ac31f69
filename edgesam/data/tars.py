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
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from edgesam.artifacts import atomic_path

WriteSample = Callable[[str, Mapping[str, bytes]], None]


class _Digesting:
    """The write side of a file that also feeds every byte to a hashlib object."""

    def __init__(self, file: BinaryIO, digest: Any):
        self.file, self.digest = file, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


@contextmanager
def tar_writer(path: str | Path, digest: Any = None) -> Iterator[WriteSample]:
    """Yield `write(key, {ext: payload})`; the tar appears at `path` only if the block succeeds.

    Members have mtime 0, mode 0644 and no owner, and come in extension order, so the same
    samples give the same bytes. `digest` (a hashlib object) is fed the bytes as they are
    written, which spares re-reading a large tar (over the network, on shared storage) to hash it.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as file, \
            tarfile.open(fileobj=_Digesting(file, digest) if digest is not None else file, mode="w",
                         format=tarfile.USTAR_FORMAT) as tar:
        def write(key: str, members: Mapping[str, bytes]) -> None:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[ext]))

        yield write
