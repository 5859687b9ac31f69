"""The training loop that runs on every Ray Train worker (rank 0 logs and writes checkpoints).

Gradients are averaged by DDP (`ray.train.torch.prepare_model`); checkpoints go through
`ray.train.report` and come back through `ray.train.get_checkpoint`, so no rank ever reads
another node's disk. `TrainWorker` is one rank's run in named steps: set up the process,
build the model, resume from a checkpoint, build the optimizer, then train (`run`): steps
(`edgesam.train.step.TrainStep`, no host sync), a logged record every `log_every` steps and
a checkpoint every `checkpoint_every`.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from edgesam.config import TrainConfig
from edgesam.train.checkpoint import (
    ARTIFACT,
    LocalRun,
    checkpoint_dir_name,
    load_state,
    rng_state,
    set_rng_state,
    write_artifact,
    write_state,
)
from edgesam.train.events import EventLog
from edgesam.train.progress import ProgressCallback
from edgesam.train.schedule import build_scheduler, scaled_lr
from edgesam.train.step import LogWindow, NonFiniteGuard, TrainStep, build_optimizer
from edgesam.train.task import TrainTask

log = logging.getLogger("edgesam.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without touching the last checkpoint."""

    def __init__(self, step: int, loss: float, checkpoint: str | None, checkpoint_step: int | None,
                 samples: list[str] | None = None):
        self.step, self.loss, self.samples = step, loss, samples
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        where = (
            f"the last good checkpoint is {checkpoint} (step {checkpoint_step}), left intact"
            if checkpoint else "no checkpoint was written yet"
        )
        batch = f" on the batch of samples {', '.join(samples)}" if samples else ""
        super().__init__(
            f"non-finite loss ({loss}) at step {step}{batch}; training stopped, {where}. "
            "Lower the learning rate or tighten grad_clip, then rerun to resume."
        )

    def __reduce__(self):
        return (type(self), (self.step, self.loss, self.checkpoint, self.checkpoint_step, self.samples))


@dataclass
class WorkerConfig:
    """What every Ray Train worker runs; `fit` passes it as `train_loop_config={"worker": ...}`
    (Ray's config is a dict)."""

    task: TrainTask
    train: TrainConfig
    run: str  # <storage>/<run name>: where checkpoints and the live event file go
    local: bool = False  # in-process (runtime.num_workers 0): checkpoints kept by a LocalRun
    use_gpu: bool = False
    seed: int = 0
    threads: int | None = None  # torch threads of a CPU worker
    progress: ProgressCallback | None = None  # rank 0's progress sink


def total_steps(cfg: TrainConfig, num_samples: int, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total steps): `epochs` of the data, capped by `max_steps`."""
    steps_per_epoch = max(1, math.ceil(num_samples / (cfg.batch_size * world_size)))
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return steps_per_epoch, steps


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device` (asynchronously from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _batch_stream(task: TrainTask, rank: int, world: int, batch_size: int, steps_per_epoch: int,
                  start_step: int) -> Iterator[Any]:
    """Batches from `start_step` on: each epoch yields at most `steps_per_epoch` batches."""
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        taken = 0
        for index, batch in enumerate(task.batches(rank, world, epoch, batch_size)):
            if index >= steps_per_epoch:
                break
            taken += 1
            if index < skip:
                continue
            yield batch
        if taken == 0:
            raise RuntimeError(f"{type(task).__name__}.batches() yielded no batch for epoch {epoch}")
        epoch, skip = epoch + 1, 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TaskForward(nn.Module):
    """The task's loss as the forward of one module, which the loop wraps in DDP.

    DDP averages only the gradients of a backward that follows its own forward (measured with
    torch 2.14: a loss from a sub-module's method called on the bare model leaves each rank
    with its own gradients), and `find_unused_parameters` searches from that forward's
    outputs. `TrainTask.loss` calls sub-modules and their methods freely, so the loop runs it
    as this module's forward.
    """

    def __init__(self, task: TrainTask, model: nn.Module):
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.task.loss(self.model, batch)


def _prepare(task: TrainTask, model: nn.Module, device: torch.device) -> nn.Module:
    """`TaskForward(task, model)` on `device`, in DDP when world > 1, set as the official code sets it.

    `find_unused_parameters` (the task's attribute, default True) costs a graph traversal per
    step: tasks whose loss reaches every trainable parameter set it False. With it, trainable
    parameters that the loss does not use (e.g. the IoU head in phase 2) are marked ready
    instead of stalling the reducer, and those unused on every rank keep `grad=None`, so AdamW
    skips them (no weight decay); measured in tests/test_train_cluster.py.
    `broadcast_buffers=False`: no copy of rank 0's buffers before every forward.
    """
    import ray.train.torch

    kwargs = {"find_unused_parameters": getattr(task, "find_unused_parameters", True), "broadcast_buffers": False}
    return ray.train.torch.prepare_model(TaskForward(task, model), move_to_device=device,
                                         parallel_strategy_kwargs=kwargs)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class TrainWorker:
    """One rank's training run (`train_worker`). Every rank resumes from the same checkpoint
    (`ray.train.get_checkpoint()`: the run's latest, after a worker restart or a rerun with the
    same storage and name). Every `checkpoint_every` steps and at the end, rank 0 writes the
    state into a temporary directory and reports it; the other ranks report metrics only. The
    final checkpoint also holds the task's files (`task.save`) and the TensorBoard event file
    (`EventLog`), which `fit` copies to the artifact directory. Rank 0 hands every logged
    record to `config.progress` (`edgesam.train.progress`), when set."""

    def __init__(self, config: WorkerConfig):
        import ray.train
        import ray.train.torch

        self.config, self.task, self.cfg = config, config.task, config.train
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
        self.is_main = self.rank == 0
        self.local_run = LocalRun(config.run) if config.local else None
        self._set_up_process()
        model, trainable = self._build_model()
        self.checkpoint = ray.train.get_checkpoint() or (self.local_run.latest() if self.local_run else None)
        state, self.finished = load_state(self.checkpoint) if self.checkpoint is not None else (None, False)
        if state is not None:
            model.load_state_dict(state["model"])  # the same checkpoint on every rank
        self.model = model
        self.forward = _prepare(self.task, model, self.device)
        _seed_everything(config.seed + 1000 * self.rank)
        self.steps_per_epoch, self.steps = total_steps(self.cfg, self.task.num_samples(), self.world)
        self._build_optimizer(trainable)
        self.step, self.history, self.checkpoint_step = 0, [], None
        if state is not None:
            self._resume(state)
        self.start_step = self.step

    def _set_up_process(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest kernels once
        if self.is_main:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def _build_model(self) -> tuple[nn.Module, list[nn.Parameter]]:
        """The task's model with identical initial weights on every rank; only `task.parameters` train."""
        _seed_everything(self.config.seed)
        model = self.task.build_model()
        if self.cfg.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects
        trainable = list(self.task.parameters(model))
        trainable_ids = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable_ids)  # frozen: outside DDP and the optimizer
        return model, trainable

    def _build_optimizer(self, trainable: list[nn.Parameter]) -> None:
        cfg = self.cfg
        self.lr = scaled_lr(cfg.lr, cfg.batch_size, self.world, cfg.lr_ref_batch)
        self.optimizer = build_optimizer(self.model, trainable, cfg, self.lr)
        self.scheduler = build_scheduler(self.optimizer, self.steps, cfg.warmup_steps, cfg.min_lr_ratio,
                                         cfg.warmup_start_ratio, cfg.cosine_from_start)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.guard = NonFiniteGuard(self.device)
        self.train_step = TrainStep(self.forward, self.optimizer, trainable, cfg.grad_clip, self.guard, self.world,
                                    self.amp)

    def _resume(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history, self.checkpoint_step = state["step"], list(state["history"]), state["step"]
        set_rng_state(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
        if self.step > self.steps or (self.step == self.steps and not self.finished):
            raise ValueError(
                f"{self.config.run}: the checkpoint at step {self.step} does not belong to a run of {self.steps} "
                "steps; the run's name or storage is reused by another configuration"
            )
        if self.is_main:
            log.info("resuming from %s at step %d/%d", self.checkpoint.path, self.step, self.steps)

    def run(self) -> dict[str, Any]:
        """Train to the last step; the summary `fit` returns (steps, history, time, throughput)."""
        self._log_start()
        self.forward.train()
        stream = _batch_stream(self.task, self.rank, self.world, self.cfg.batch_size, self.steps_per_epoch, self.step)
        bar = tqdm(total=self.steps, initial=self.step, desc=type(self.task).__name__, disable=None if self.is_main else True,
                   mininterval=2.0)
        events = EventLog(self.config.run, self.history) if self.is_main and self.step < self.steps else None
        window, start, images_total = LogWindow(), time.perf_counter(), 0
        try:
            while self.step < self.steps:
                batch = move_to(next(stream), self.device)
                loss, metrics = self.train_step(batch, self.step + 1)
                self.scheduler.step()
                self.step += 1
                images = self.task.batch_size_of(batch) * self.world
                window.add(loss, metrics, images)
                images_total += images
                bar.update(1)
                self._at_step_end(window, events, bar)
        finally:
            if events is not None:
                events.close()
        bar.close()
        seconds = time.perf_counter() - start
        return {"steps": self.steps, "start_step": self.start_step, "history": self.history,
                "train_seconds": round(seconds, 2), "images_per_s": images_total / max(seconds, 1e-9)}

    def _log_start(self) -> None:
        if not self.is_main:
            return
        log.info("%s: %d steps (%d per epoch), %d worker(s) x batch %d, peak lr %.2e, device %s%s",
                 type(self.task).__name__, self.steps, self.steps_per_epoch, self.world, self.cfg.batch_size, self.lr,
                 self.device, ", bf16 autocast" if self.amp else "")
        if self.finished:
            log.info("%s: already trained (%s)", type(self.task).__name__, self.checkpoint.path)

    def _at_step_end(self, window: LogWindow, events: EventLog | None, bar: tqdm) -> None:
        """The host's part of a step: at logging and checkpoint steps only, read the device back."""
        last = self.step == self.steps
        log_now = self.step % self.cfg.log_every == 0 or last
        checkpoint_now = self.step % self.cfg.checkpoint_every == 0 or last
        if log_now or checkpoint_now:
            self._raise_if_non_finite()
        if log_now:
            self._log(window.record(self.step, self.scheduler.get_last_lr()[0]), events, bar)
            window.reset()
        if checkpoint_now:
            self._report_checkpoint(final=last, events=events)

    def _raise_if_non_finite(self) -> None:
        found = self.guard.check()
        if found is None:
            return
        step, loss, samples = found
        ckpt = self.checkpoint_step
        where = f"{self.config.run}/{checkpoint_dir_name(ckpt)}" if ckpt is not None else None
        raise NonFiniteLossError(step, loss, where, ckpt, samples)

    def _log(self, record: dict[str, Any], events: EventLog | None, bar: tqdm) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        bar.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record['images_per_s']:.1f}")
        log.info("step %d/%d loss %.4f lr %.2e %.1f images/s", self.step, self.steps, record["loss"], record["lr"],
                 record["images_per_s"])
        events.log(record)
        if self.config.progress is not None:
            self.config.progress(self.step, self.steps, record)

    def _report_checkpoint(self, final: bool, events: EventLog | None) -> None:
        """Report a checkpoint of the current step (collective: every rank calls it)."""
        import ray.train
        from ray.train import Checkpoint

        rngs = _gather(rng_state(), self.world)
        name = checkpoint_dir_name(self.step)
        metrics = {**(self.history[-1] if self.history else {}), "step": self.step}  # the last logged window
        with tempfile.TemporaryDirectory() as tmp:
            if self.is_main:
                write_state(Path(tmp), {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": rngs,
                    "history": self.history,
                })
                if final:
                    (Path(tmp) / ARTIFACT).mkdir()
                    write_artifact(Path(tmp), self.task.save(self.model, Path(tmp) / ARTIFACT))
                    events.copy_to(Path(tmp))
            if self.local_run is not None:
                self.local_run.persist(Path(tmp), name)
                ray.train.report(metrics)
            else:
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if self.is_main else None,
                                 checkpoint_dir_name=name)
        self.checkpoint_step = self.step


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's `train_loop_per_worker`: `TrainWorker(config["worker"]).run()`."""
    return TrainWorker(config["worker"]).run()
