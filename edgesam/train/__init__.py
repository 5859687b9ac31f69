"""The one training loop of every trainer: Ray Train TorchTrainer with DDP, AdamW, warm-up +
cosine, gradient clipping, AMP on GPU, Ray Train checkpoints with resume, throughput logging."""

from edgesam.train.checkpoint import last_checkpoint_path, latest_checkpoint, load_checkpoint, run_location
from edgesam.train.cluster import connect_ray, resolve_device, training_key, use_gpu
from edgesam.train.fit import fit, training_summary
from edgesam.train.loop import NonFiniteLossError, move_to, param_groups, total_steps
from edgesam.train.schedule import scaled_lr, warmup_cosine_factor
from edgesam.train.task import TrainTask

__all__ = [
    "NonFiniteLossError", "TrainTask", "connect_ray", "fit", "last_checkpoint_path", "latest_checkpoint",
    "load_checkpoint", "move_to", "param_groups", "resolve_device", "run_location", "scaled_lr", "total_steps",
    "training_key", "training_summary", "use_gpu", "warmup_cosine_factor",
]
