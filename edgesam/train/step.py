"""One optimizer step without host syncs, and what the loop reads back only at logging steps.

On a GPU, every value read back to the host (`float(loss)`, `.item()`, a `nonzero`) makes the
CPU wait until the device has finished all queued work, so the next step cannot be queued
while this one runs. `TrainStep` therefore leaves the loss and the task's metrics on the
device, `LogWindow` sums them there and reads them back once per logged record, and
`NonFiniteGuard` finds a non-finite loss with a device-side flag that the fused AdamW reads
as GradScaler's `found_inf`: the update of a bad step (and of every later one, the flag being
sticky) is skipped on the device, and the host raises at the next logging or checkpoint step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from edgesam.config import TrainConfig

# Parameters of these layers (and every 1-D parameter) are not decayed with `no_decay_norm_bias`.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def param_groups(model: nn.Module, trainable: list[nn.Parameter], weight_decay: float,
                 no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """AdamW parameter groups of `trainable`: one group, or with `no_decay_norm_bias` a second
    one with weight decay 0 for biases, other 0-/1-D parameters and normalization layers'
    parameters (decaying norm scales and biases only pulls them towards 0)."""
    if not no_decay_norm_bias:
        return [{"params": trainable, "weight_decay": weight_decay}]
    exempt = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for name, p in model.named_parameters() if p.ndim <= 1 or name.endswith(".bias")}
    groups = [
        {"params": [p for p in trainable if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, trainable: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA kernels): the implementation that can skip a step on the
    device (`found_inf`), and one kernel launch for all parameters on a GPU."""
    groups = param_groups(model, trainable, cfg.weight_decay, cfg.no_decay_norm_bias)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def batch_samples(batch: Any) -> list[str] | None:
    """The sample keys a batch carries (`key` of each example), for error messages."""
    keys = batch.get("key") if isinstance(batch, dict) else None
    return [str(k) for k in keys] if isinstance(keys, (list, tuple)) else None


class NonFiniteGuard:
    """A device-side record of the first non-finite loss; read by the host only in `check`.

    `flag` is 1.0 from the first step whose loss (averaged over ranks, so every rank agrees)
    is NaN or infinite; `TrainStep` hands it to the fused AdamW as `found_inf`. The sample keys
    of each step's batch are kept on the host until the next check, so the error can name
    the batch that went bad when it was this rank's.
    """

    def __init__(self, device: torch.device):
        self.flag = torch.zeros((), device=device)
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), device=device)
        self.first_local = torch.zeros((), dtype=torch.bool, device=device)
        self.samples: dict[int, list[str]] = {}

    def observe(self, step: int, loss: torch.Tensor, local_loss: torch.Tensor, samples: list[str] | None) -> None:
        bad = (~torch.isfinite(loss)).float()
        first = (bad * (1.0 - self.flag)) > 0
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss.detach().float(), self.first_loss)
        self.first_local = torch.where(first, ~torch.isfinite(local_loss.detach()), self.first_local)
        self.flag = torch.maximum(self.flag, bad)
        if samples:
            self.samples[step] = samples

    def check(self) -> tuple[int, float, list[str] | None] | None:
        """(first bad step, its loss, its samples when this rank's batch was bad), or None
        when every loss since the start was finite. One host sync."""
        flag, step, loss, local = torch.stack([self.flag, self.first_step.float(), self.first_loss,
                                               self.first_local.float()]).tolist()
        if not flag:
            self.samples.clear()
            return None
        return int(step), loss, self.samples.get(int(step)) if local else None


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over the ranks, left on the device (the all-reduce is queued)."""
    value = value.detach().float().reshape(1).clone()  # the all-reduce must not overwrite this rank's loss
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value[0]


@dataclass
class TrainStep:
    """Forward, backward, gradient clipping and AdamW update of one batch already on the device."""

    forward: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    grad_clip: float | None
    guard: NonFiniteGuard
    world: int = 1
    amp: bool = False

    def __call__(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Returns the loss averaged over ranks and the task's metrics, both left on the device."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with autocast:
            loss, metrics = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)  # unused parameters keep grad None: AdamW skips them
        loss.backward()
        mean_loss = mean_over_ranks(loss, self.world)
        self.guard.observe(step, mean_loss, loss, batch_samples(batch))
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.found_inf = self.guard.flag  # read by the fused kernel: no update while set
        self.optimizer.step()
        return mean_loss, metrics


class LogWindow:
    """The steps since the last logged record: their loss and metrics summed on the device."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.images, self.sums = 0, 0, {}
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], images: int) -> None:
        self.steps += 1
        self.images += images
        for key, value in {"loss": loss, **metrics}.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value

    def record(self, step: int, lr: float) -> dict[str, Any]:
        """The window's means as floats (one host sync), in the history's field order."""
        on_device = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        read = dict(zip(on_device, torch.stack([self.sums[k] for k in on_device]).tolist())) if on_device else {}
        means = {k: read.get(k, v) / self.steps for k, v in self.sums.items()}
        elapsed = time.perf_counter() - self.start  # after the read-back: the device work is done
        metrics = {k: v for k, v in means.items() if k != "loss"}
        return {"step": step, "loss": means["loss"], "lr": lr, "images_per_s": self.images / max(elapsed, 1e-9),
                **metrics}
