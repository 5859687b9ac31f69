"""The training loop that runs on every Ray Train worker (rank 0 logs and writes checkpoints).

Gradients are averaged by DDP (`ray.train.torch.prepare_model`); checkpoints go through
`ray.train.report` and come back through `ray.train.get_checkpoint`, so no rank ever reads
another node's disk.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
import time
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
from edgesam.train.schedule import build_scheduler, scaled_lr
from edgesam.train.task import TrainTask

log = logging.getLogger("edgesam.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without touching the last checkpoint."""

    def __init__(self, step: int, loss: float, checkpoint: str | None, checkpoint_step: int | None):
        self.step, self.loss = step, loss
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        where = (
            f"the last good checkpoint is {checkpoint} (step {checkpoint_step}), left intact"
            if checkpoint else "no checkpoint was written yet"
        )
        super().__init__(
            f"non-finite loss ({loss}) at step {step}; training stopped, {where}. "
            "Lower the learning rate or tighten grad_clip, then rerun to resume."
        )

    def __reduce__(self):
        return (type(self), (self.step, self.loss, self.checkpoint, self.checkpoint_step))


def total_steps(cfg: TrainConfig, num_samples: int, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total steps): `epochs` of the data, capped by `max_steps`."""
    steps_per_epoch = max(1, math.ceil(num_samples / (cfg.batch_size * world_size)))
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    return steps_per_epoch, steps


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to `device`."""
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

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.task.loss(self.model, batch)


def _prepare(task: TrainTask, model: nn.Module, device: torch.device) -> nn.Module:
    """`TaskForward(task, model)` on `device`, in DDP when world > 1.

    `find_unused_parameters=True`: trainable parameters that the loss does not use (e.g. the
    IoU head in phase 2) are marked ready instead of stalling the reducer, and those unused on
    every rank keep `grad=None`, so AdamW skips them (no weight decay); measured in
    tests/test_train_cluster.py.
    """
    import ray.train.torch

    return ray.train.torch.prepare_model(
        TaskForward(task, model), move_to_device=device, parallel_strategy_kwargs={"find_unused_parameters": True}
    )


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().float().reshape(1)
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's `train_loop_per_worker`: train `config["task"]`; report checkpoints.

    Every rank resumes from the same checkpoint (`ray.train.get_checkpoint()`: the run's
    latest, after a worker restart or a rerun with the same storage and name). Every
    `checkpoint_every` steps and at the end, rank 0 writes the state into a temporary
    directory and reports it; the other ranks report metrics only. The final checkpoint
    also holds the task's files (`task.save`) and the TensorBoard event file (`EventLog`),
    which `fit` copies to the artifact directory. Rank 0 hands every logged record to
    `config["progress"]` (`edgesam.train.progress`), when set.
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    task: TrainTask = config["task"]
    cfg: TrainConfig = config["cfg"]
    run: str = config["run"]
    local_run = LocalRun(run) if config["local"] else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    is_main = rank == 0
    if is_main:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    _seed_everything(config["seed"])  # identical initial weights on every rank
    model = task.build_model()
    if config["sync_bn"] and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects
    trainable = list(task.parameters(model))
    trainable_ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable_ids)  # frozen: outside DDP and the optimizer

    checkpoint = ray.train.get_checkpoint() or (local_run.latest() if local_run else None)
    state, finished = load_state(checkpoint) if checkpoint is not None else (None, False)
    if state is not None:
        model.load_state_dict(state["model"])  # the same checkpoint on every rank
    forward = _prepare(task, model, device)
    _seed_everything(config["seed"] + 1000 * rank)

    steps_per_epoch, steps = total_steps(cfg, task.num_samples(), world)
    lr = scaled_lr(cfg.lr, cfg.batch_size, world, cfg.lr_ref_batch)
    optimizer = torch.optim.AdamW(param_groups(model, trainable, cfg.weight_decay, cfg.no_decay_norm_bias), lr=lr)
    scheduler = build_scheduler(optimizer, steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.warmup_start_ratio,
                                cfg.cosine_from_start)
    amp = cfg.amp and device.type == "cuda"

    step, history, ckpt_step = 0, [], None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, ckpt_step = state["step"], list(state["history"]), state["step"]
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if step > steps or (step == steps and not finished):
            raise ValueError(
                f"{run}: the checkpoint at step {step} does not belong to a run of {steps} steps; "
                "the run's name or storage is reused by another configuration"
            )
        if is_main:
            log.info("resuming from %s at step %d/%d", checkpoint.path, step, steps)
    start_step = step
    progress = config.get("progress") if is_main else None
    events = EventLog(run, history) if is_main and step < steps else None

    def report(final: bool) -> None:
        """Report a checkpoint of the current step (collective: every rank calls it)."""
        nonlocal ckpt_step
        rngs = _gather(rng_state(), world)
        name = checkpoint_dir_name(step)
        metrics = {**(history[-1] if history else {}), "step": step}  # the last logged window
        with tempfile.TemporaryDirectory() as tmp:
            if is_main:
                write_state(Path(tmp), {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "rng": rngs, "history": history,
                })
                if final:
                    (Path(tmp) / ARTIFACT).mkdir()
                    write_artifact(Path(tmp), task.save(model, Path(tmp) / ARTIFACT))
                    events.copy_to(Path(tmp))
            if local_run is not None:
                local_run.persist(Path(tmp), name)
                ray.train.report(metrics)
            else:
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if is_main else None,
                                 checkpoint_dir_name=name)
        ckpt_step = step

    if is_main:
        log.info("%s: %d steps (%d per epoch), %d worker(s) x batch %d, peak lr %.2e, device %s%s",
                 type(task).__name__, steps, steps_per_epoch, world, cfg.batch_size, lr, device,
                 ", bf16 autocast" if amp else "")
        if finished:
            log.info("%s: already trained (%s)", type(task).__name__, checkpoint.path)
    forward.train()
    stream = _batch_stream(task, rank, world, cfg.batch_size, steps_per_epoch, step)
    bar = tqdm(total=steps, initial=step, desc=type(task).__name__, disable=not is_main, mininterval=2.0)
    window_images, window_start, window_losses = 0, time.perf_counter(), []
    window_metrics: dict[str, list[float]] = {}
    start = time.perf_counter()
    images_total = 0
    try:
        while step < steps:
            batch = move_to(next(stream), device)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with autocast:
                loss, metrics = forward(batch)
            optimizer.zero_grad(set_to_none=True)  # unused parameters keep grad None: AdamW skips them
            loss.backward()
            loss_value = _mean_over_ranks(loss, world)
            if not math.isfinite(loss_value):
                where = f"{run}/{checkpoint_dir_name(ckpt_step)}" if ckpt_step is not None else None
                raise NonFiniteLossError(step + 1, loss_value, where, ckpt_step)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            images = task.batch_size_of(batch) * world
            window_images += images
            images_total += images
            window_losses.append(loss_value)
            for key, value in metrics.items():
                window_metrics.setdefault(key, []).append(float(value))
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step, "loss": float(np.mean(window_losses)), "lr": scheduler.get_last_lr()[0],
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    **{k: float(np.mean(v)) for k, v in window_metrics.items()},
                }
                history.append(record)
                if is_main:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record['images_per_s']:.1f}")
                    log.info("step %d/%d loss %.4f lr %.2e %.1f images/s", step, steps, record["loss"],
                             record["lr"], record["images_per_s"])
                    events.log(record)
                    if progress is not None:
                        progress(step, steps, record)
                window_images, window_start, window_losses, window_metrics = 0, time.perf_counter(), [], {}
            if step % cfg.checkpoint_every == 0 or step == steps:
                report(final=step == steps)
    finally:
        if events is not None:
            events.close()
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "steps": steps, "start_step": start_step, "history": history, "train_seconds": round(seconds, 2),
        "images_per_s": images_total / max(seconds, 1e-9),
    }
