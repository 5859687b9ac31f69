"""Connecting to Ray: an existing cluster (`RAY_ADDRESS`) or a quiet local one."""

from __future__ import annotations

import logging
import os
from typing import Any

from edgesam.config import RuntimeConfig, TrainConfig

log = logging.getLogger("edgesam.train")


def connect_ray(runtime: RuntimeConfig) -> None:
    """Reuse an initialized Ray, join `runtime.ray_address` / `RAY_ADDRESS`, else start locally."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    log.info("starting a local Ray (%d CPUs, object store %d MiB)",
             os.cpu_count() or 1, runtime.object_store_mb)
    ray.init(
        num_cpus=os.cpu_count() or 1,
        object_store_memory=runtime.object_store_mb * 1024**2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def use_gpu(runtime: RuntimeConfig) -> bool:
    """`runtime.use_gpu`, or whether the connected cluster has GPUs when it is None."""
    import ray

    if runtime.use_gpu is not None:
        return runtime.use_gpu
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def resolve_device(runtime: RuntimeConfig) -> RuntimeConfig:
    """`runtime` with `use_gpu` decided once for a whole run (cache keys depend on it): as
    configured, else whether the cluster at the configured address has GPUs, else this machine."""
    if runtime.use_gpu is not None:
        return runtime
    if runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        connect_ray(runtime)
        gpu = use_gpu(runtime)
    else:
        import torch

        gpu = torch.cuda.is_available()
    return runtime.model_copy(update={"use_gpu": gpu})


def training_key(train: TrainConfig, runtime: RuntimeConfig) -> dict[str, Any]:
    """The runtime settings that change a training stage's result: the seed, the number of
    workers (the global batch and the scaled lr) and the precision (bf16 autocast on GPUs)."""
    return {"seed": runtime.seed, "world_size": max(1, runtime.num_workers),
            "precision": "bf16" if train.amp and runtime.use_gpu else "fp32"}
