"""The one training loop of every trainer: Ray Train TorchTrainer with DDP, AdamW, warm-up +
cosine, gradient clipping, AMP on GPU, Ray Train checkpoints with resume, throughput logging."""

from edgesam.train.checkpoint import last_checkpoint_path, latest_checkpoint, load_checkpoint, run_location
from edgesam.train.fit import fit, training_key, training_summary
from edgesam.train.loop import NonFiniteLossError, WorkerConfig, move_to, total_steps
from edgesam.train.schedule import scaled_lr, warmup_cosine_factor
from edgesam.train.step import param_groups
from edgesam.train.task import TrainTask

__all__ = [
    "NonFiniteLossError", "TrainTask", "WorkerConfig", "fit", "last_checkpoint_path", "latest_checkpoint",
    "load_checkpoint", "move_to", "param_groups", "run_location", "scaled_lr", "total_steps",
    "training_key", "training_summary", "warmup_cosine_factor",
]
