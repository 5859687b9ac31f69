"""TensorBoard event files of a training run, written by rank 0.

Rank 0 writes every logged record (`history`) to one event file as it is logged, in the
run's directory (`<storage>/<run name>/tensorboard`, next to the checkpoints; a temporary
directory when the storage is a URI), so `tensorboard --logdir` on that directory shows a
run as it trains. A (re)started run rewrites that file from the checkpoint's history before
it appends: a resumed run continues the same curves, without the steps logged after the
checkpoint it resumes from. The final checkpoint carries a copy, which `fit` brings back to
the artifact directory on the driver, wherever rank 0 ran.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgesam.train.checkpoint import TENSORBOARD, is_uri

def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a history field (`loss` -> `train/loss`)."""
    return f"train/{key}"


class EventLog:
    """One event file of the records logged so far, rewritten from `history` on every start."""

    def __init__(self, run: str, history: list[dict[str, Any]]):
        from torch.utils.tensorboard import SummaryWriter

        self._temporary = is_uri(run)
        if self._temporary:
            self.directory = Path(tempfile.mkdtemp(prefix="edgesam-tensorboard-"))
        else:
            self.directory = Path(run) / TENSORBOARD
        shutil.rmtree(self.directory, ignore_errors=True)  # a previous attempt's file may run past the checkpoint
        self.directory.mkdir(parents=True)
        self._writer = SummaryWriter(str(self.directory))
        for record in history:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step":
                self._writer.add_scalar(scalar_tag(key), value, record["step"])

    def copy_to(self, checkpoint_dir: Path) -> None:
        """Flush and copy the event file into a checkpoint directory that is not reported yet."""
        self._writer.flush()
        shutil.copytree(self.directory, Path(checkpoint_dir) / TENSORBOARD)

    def close(self) -> None:
        self._writer.close()
        if self._temporary:
            shutil.rmtree(self.directory, ignore_errors=True)
