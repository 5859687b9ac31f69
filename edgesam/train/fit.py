"""`fit`: run a `TrainTask` with Ray Train's TorchTrainer (or in-process for unit tests)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from edgesam.config import RuntimeConfig, TrainConfig
from edgesam.train.checkpoint import NUM_TO_KEEP, TENSORBOARD, LocalRun, export_artifact, is_uri, run_storage
from edgesam.cluster import connect_ray, use_gpu
from edgesam.train.loop import WorkerConfig, train_worker
from edgesam.train.progress import ProgressCallback, ambient_progress, guarded, relay
from edgesam.train.task import TrainTask

log = logging.getLogger("edgesam.train")


def _warn_if_node_local(runtime: RuntimeConfig) -> None:
    import ray

    if runtime.storage_path is None and sum(node["Alive"] for node in ray.nodes()) > 1:
        log.warning("runtime.storage_path is not set on a multi-node Ray cluster: checkpoints go to the "
                    "artifact directory, which must then be on a filesystem every node shares")


def _worker_config(task: TrainTask, cfg: TrainConfig, runtime: RuntimeConfig, run: str, local: bool, gpu: bool,
                   progress: ProgressCallback | None) -> WorkerConfig:
    if cfg.sync_bn and runtime.num_workers > 1 and not gpu:
        raise ValueError("train.sync_bn needs GPU workers: torch's SyncBatchNorm only runs on CUDA")
    return WorkerConfig(task, cfg, run, local=local, use_gpu=gpu, seed=runtime.seed,
                        threads=None if gpu or local else runtime.cpus_per_worker, progress=progress)


def _trainer(worker: WorkerConfig, runtime: RuntimeConfig, storage: str, name: str) -> Any:
    """Ray Train's TorchTrainer: `runtime.cpus_per_worker` CPUs (its loader processes run on
    them) and one GPU per worker, the run's storage, failure and checkpoint settings."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": runtime.cpus_per_worker, **({"GPU": 1} if worker.use_gpu else {})}
    return TorchTrainer(
        train_worker,
        train_loop_config={"worker": worker},
        scaling_config=ScalingConfig(num_workers=runtime.num_workers, use_gpu=worker.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=runtime.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=NUM_TO_KEEP)),
    )


def fit(task: TrainTask, cfg: TrainConfig, runtime: RuntimeConfig, out_dir: Path,
        on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train `task` on `runtime.num_workers` Ray Train workers; write its files into `out_dir`.

    Checkpoints live in Ray Train's storage (`runtime.storage_path`, default
    `out_dir/.ray_train`) under a name stable per artifact: a rerun after a kill resumes from
    the latest one, and Ray restarts failed workers from it up to `runtime.max_failures`
    times. The task's final files come back inside the final checkpoint and are copied into
    `out_dir` here, on the driver, with rank 0's TensorBoard event files in
    `out_dir/tensorboard` (`edgesam.train.events`). `runtime.num_workers == 0` runs Ray
    Train's local mode in this process (unit tests).

    `on_progress(step, total, record)` (default: the one of an enclosing
    `edgesam.train.progress.reporting_progress` block) is called on this process for every
    logged record, in step order; its errors are logged, never raised.

    Returns {"steps", "start_step" (where this call resumed), "history" (loss curve),
    "files" (from task.save), "tensorboard" (the event files' directory in `out_dir`),
    "checkpoint" (the final one), "train_seconds", "images_per_s", "wall_seconds"}. A
    worker's exception is re-raised here as itself (e.g. `NonFiniteLossError`), with Ray's
    wrapper as its cause.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage, name = run_storage(out_dir, runtime.storage_path)
    run = f"{storage}/{name}"
    local = runtime.num_workers == 0
    if local:
        if is_uri(storage):
            raise ValueError(f"num_workers=0 (in-process) keeps checkpoints on a local disk, not at {storage}")
        gpu = runtime.use_gpu if runtime.use_gpu is not None else torch.cuda.is_available()
    else:
        connect_ray(runtime)
        gpu = use_gpu(runtime)
        _warn_if_node_local(runtime)
    on_progress = on_progress or ambient_progress()
    callback = guarded(on_progress) if on_progress else None
    start = time.perf_counter()
    with relay(callback) if callback and not local else nullcontext(callback) as progress:
        result = _run(_trainer(_worker_config(task, cfg, runtime, run, local, gpu, progress), runtime, storage, name))
    final = LocalRun(run).latest() if local else result.checkpoint
    if final is None:
        raise RuntimeError(f"{type(task).__name__}: training reported no checkpoint to {run}")
    summary = {**result.return_value, "files": export_artifact(final, out_dir), "checkpoint": final.path,
               "tensorboard": TENSORBOARD if (out_dir / TENSORBOARD).is_dir() else None,
               "wall_seconds": round(time.perf_counter() - start, 2)}
    log.info("%s: %d steps in %.1fs (%.1f images/s), files %s in %s", type(task).__name__, summary["steps"],
             summary["wall_seconds"], summary["images_per_s"], sorted(summary["files"]), out_dir)
    return summary


def _run(trainer: Any) -> Any:
    """`trainer.fit()`, re-raising a worker's exception as itself, with Ray's wrapper as its cause."""
    try:
        return trainer.fit()
    except Exception as exc:
        failures = getattr(exc, "worker_failures", None)
        if failures:
            raise failures[min(failures)] from exc
        raise


def training_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields of a `fit` result: steps, time, throughput, the logged loss curve and
    the TensorBoard event files' directory (`tensorboard --logdir <artifact>/tensorboard`)."""
    history = summary["history"]
    loss = {}
    if history:
        curve = [{k: round(v, 6) if isinstance(v, float) else v for k, v in h.items()} for h in history]
        loss = {"first": history[0]["loss"], "last": history[-1]["loss"], "curve": curve}
    return {
        "steps": summary["steps"],
        "resumed_from_step": summary.get("start_step", 0),  # > 0: continued from a checkpoint
        "train_seconds": summary["train_seconds"],
        "images_per_s": round(summary["images_per_s"], 3),
        "loss": loss,
        **({"tensorboard": summary["tensorboard"]} if summary.get("tensorboard") else {}),
    }


def training_key(train: TrainConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    """The runtime settings that change a training stage's result: the seed, the number of
    workers (the global batch and the scaled lr) and the precision (bf16 autocast on GPUs)."""
    return {"seed": runtime.seed, "world_size": max(1, runtime.num_workers),
            "precision": "bf16" if train.amp and runtime.use_gpu else "fp32"}
