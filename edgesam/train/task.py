"""The interface between a trainer (teacher, encoder KD, prompt KD, RPN) and `fit`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainTask(Protocol):
    """What `edgesam.train.fit` needs to know about one training job.

    A task is a small picklable object (e.g. a dataclass of paths and settings): it is
    shipped to every Ray Train worker, which builds the model and reads its data shard.

    Optional attribute `find_unused_parameters` (default True): False tells DDP that the loss
    reaches every trainable parameter, which spares it a search of the graph every step.
    """

    def build_model(self) -> nn.Module:
        """The model to train, on CPU (the loop moves it to the worker's device)."""

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The trainable parameters; every other parameter of `model` is frozen."""

    def num_samples(self) -> int:
        """Samples in one epoch over all workers (sets the steps per epoch)."""

    def batches(self, rank: int, world_size: int, epoch: int, batch_size: int) -> Iterable[Any]:
        """This worker's batches of `epoch`, deterministic in (rank, world_size, epoch)."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Scalar loss of a batch (already on the model's device) and metrics to log: floats or
        0-d tensors, which the loop keeps on the device and reads back only at logging steps
        (a `.item()` here would make every step wait for the device).

        `model` is the bare model; the loop calls this inside the forward of the module it
        wraps in DDP, so the loss may call any sub-module or method of `model`. Trainable
        parameters that the loss leaves unused keep no gradient and are not decayed.
        """

    def batch_size_of(self, batch: Any) -> int:
        """Images in `batch` (for throughput)."""

    def save(self, model: nn.Module, out_dir: Path) -> dict[str, Any]:
        """Write the final artifact files into `out_dir`; return their manifest entries (JSON).

        Called on rank 0 only, with the final checkpoint's directory as `out_dir`: `fit`
        copies its files into the artifact directory on the driver, so entries must name
        files relative to `out_dir`, never by absolute path.
        """
