"""`fit`: run a `TrainTask` with Ray Train's TorchTrainer (or in-process for unit tests)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from edgesam.config import RuntimeConfig, TrainConfig
from edgesam.train.cluster import connect_ray, use_gpu
from edgesam.train.loop import train_worker
from edgesam.train.task import TrainTask

log = logging.getLogger("edgesam.train")


def fit(task: TrainTask, cfg: TrainConfig, runtime: RuntimeConfig, out_dir: Path) -> dict[str, Any]:
    """Train `task` on `runtime.num_workers` Ray Train workers; resume from `out_dir`'s checkpoint.

    `runtime.num_workers == 0` runs Ray Train's local mode in this process (unit tests).
    Returns {"steps", "history" (loss curve), "files" (from task.save), "train_seconds",
    "images_per_s"}. A worker's exception is re-raised here as itself (e.g.
    `NonFiniteLossError`), with Ray's wrapper as its cause.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    local = runtime.num_workers == 0
    if local:
        gpu = runtime.use_gpu if runtime.use_gpu is not None else torch.cuda.is_available()
    else:
        connect_ray(runtime)
        gpu = use_gpu(runtime)
    config = {
        "task": task, "cfg": cfg, "out_dir": str(out_dir.resolve()), "use_gpu": gpu,
        "seed": runtime.seed, "threads": None if gpu or local else runtime.cpus_per_worker,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=runtime.num_workers,
            use_gpu=gpu,
            resources_per_worker=None if gpu else {"CPU": runtime.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str((out_dir / ".ray_train").resolve()),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:
        failures = getattr(exc, "worker_failures", None)
        if failures:
            raise failures[min(failures)] from exc
        raise
    summary = dict(result.return_value)
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    log.info("%s: %d steps in %.1fs (%.1f images/s)", type(task).__name__, summary["steps"],
             summary["wall_seconds"], summary["images_per_s"])
    return summary


def training_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields of a `fit` result: steps, time, throughput, and the logged loss curve."""
    history = summary["history"]
    loss = {}
    if history:
        curve = [{k: round(v, 6) if isinstance(v, float) else v for k, v in h.items()} for h in history]
        loss = {"first": history[0]["loss"], "last": history[-1]["loss"], "curve": curve}
    return {
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "images_per_s": round(summary["images_per_s"], 3),
        "loss": loss,
    }
