"""Training checkpoints as Ray Train `Checkpoint` directories, and where to find them.

A checkpoint directory holds `state.pt` (model, optimizer, scheduler, step, per-rank RNG,
loss history). The final one also holds `artifact/` (what `task.save` wrote),
`artifact.json` (its manifest entries) and `tensorboard/` (the run's event files): the
stage's files travel to the driver inside the checkpoint, never through a worker's local disk.

Ray Train persists reported checkpoints under `<storage>/<run name>/` and, on a restart or a
rerun with the same storage and name, gives the latest to every worker
(`ray.train.get_checkpoint`). In-process runs (`num_workers=0`) keep theirs in a `LocalRun`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgesam.artifacts import atomic_path, fsync_tree, write_json_atomic

if TYPE_CHECKING:  # ray.train is imported where used: it takes seconds to import
    from ray.train import Checkpoint

STATE = "state.pt"
ARTIFACT = "artifact"
ARTIFACT_MANIFEST = "artifact.json"
TENSORBOARD = "tensorboard"  # the run's event files (edgesam.train.events), in the final checkpoint and the artifact
NUM_TO_KEEP = 2  # checkpoints kept per run (Ray Train never deletes the latest)


def checkpoint_dir_name(step: int) -> str:
    """Checkpoint directory name of `step`: unique per run and ordered like the steps."""
    return f"checkpoint_{step:08d}"


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this worker's device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """`random.setstate` wants nested tuples; a round trip through torch.load may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the training state into a checkpoint directory that is not reported yet."""
    torch.save(state, Path(directory) / STATE)


def write_artifact(directory: Path, files: dict[str, Any]) -> None:
    """Record `task.save`'s manifest entries next to the files it wrote into `directory/artifact`."""
    write_json_atomic(Path(directory) / ARTIFACT_MANIFEST, files)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training state file (`state.pt`, weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(
            f"training checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
            "delete its run directory to restart training from scratch"
        ) from exc


def load_state(checkpoint: Checkpoint) -> tuple[dict[str, Any], bool]:
    """(training state, whether it is the final checkpoint) of a reported checkpoint."""
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory) / STATE)
        final = (Path(directory) / ARTIFACT_MANIFEST).is_file()
    return state, final


def _copy_files(source: Path, target: Path) -> None:
    """Copy every file under `source` to the same place under `target`, each atomically."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            with atomic_path(target / path.relative_to(source)) as tmp:
                shutil.copyfile(path, tmp)


def export_artifact(checkpoint: Checkpoint, out_dir: Path) -> dict[str, Any]:
    """Copy the final checkpoint's artifact files into `out_dir`, and its TensorBoard event
    files into `out_dir/tensorboard`, each atomically; return the artifact's manifest entries."""
    with checkpoint.as_directory() as directory:
        manifest_path = Path(directory) / ARTIFACT_MANIFEST
        if not manifest_path.is_file():
            raise RuntimeError(
                f"checkpoint {checkpoint.path} has no {ARTIFACT_MANIFEST} here: it is not a final checkpoint, or "
                "it was written on another node's disk (on several nodes, set runtime.storage_path to a shared "
                "directory or a URI)"
            )
        files = json.loads(manifest_path.read_text())
        _copy_files(Path(directory) / ARTIFACT, Path(out_dir))
        _copy_files(Path(directory) / TENSORBOARD, Path(out_dir) / TENSORBOARD)
    return files


class LocalRun:
    """The checkpoints of an in-process run (`num_workers=0`), in Ray Train's layout.

    Ray Train's local mode keeps no checkpoint (ray 2.60: `ray.train.report` only remembers
    the last one in memory, and `ray.train.get_checkpoint` starts empty), so in-process runs
    persist their own: each one under `<storage>/<run name>/checkpoint_<step>`, moved into
    place whole, the newest `num_to_keep` kept. The newest is the one with the highest step.
    """

    def __init__(self, path: str | Path, num_to_keep: int = NUM_TO_KEEP):
        self.path = Path(path)
        self.num_to_keep = num_to_keep

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.path.glob("checkpoint_*") if p.is_dir())

    def latest(self) -> Checkpoint | None:
        from ray.train import Checkpoint

        checkpoints = self.checkpoints()
        return Checkpoint.from_directory(str(checkpoints[-1])) if checkpoints else None

    def persist(self, directory: Path, name: str) -> Checkpoint:
        """Copy a written checkpoint directory into the run as `name`; drop the oldest."""
        from ray.train import Checkpoint

        self.path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.path))
        try:
            shutil.copytree(directory, tmp, dirs_exist_ok=True)
            fsync_tree(tmp)  # complete on the disk before it has the name resume looks for
            os.replace(tmp, self.path / name)  # fails, rather than merging, if `name` exists
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-self.num_to_keep]:
            shutil.rmtree(old)
        return Checkpoint.from_directory(str(self.path / name))


def is_uri(path: str) -> bool:
    return "://" in path


def run_storage(out_dir: Path, storage_path: str | None) -> tuple[str, str]:
    """(Ray Train `storage_path`, run `name`) of the training run of artifact `out_dir`.

    The name is stable per artifact: `<parent>-<name>` of `out_dir`, i.e.
    `<stage>-<fingerprint>` in an `ArtifactStore`, so a rerun of the same stage finds its run
    again in a shared storage (and a run of another configuration never does).
    """
    out_dir = Path(out_dir).resolve()
    name = f"{out_dir.parent.name}-{out_dir.name}"
    if storage_path is None:
        return str(out_dir / ".ray_train"), name
    if is_uri(storage_path):
        return storage_path.rstrip("/"), name
    return str(Path(storage_path).expanduser().resolve()), name


def run_location(out_dir: Path, storage_path: str | None) -> str:
    """`<storage>/<name>`: the directory (or URI) where Ray Train keeps the run's checkpoints."""
    storage, name = run_storage(out_dir, storage_path)
    return f"{storage}/{name}"


def latest_checkpoint(run: str | Path) -> Checkpoint | None:
    """The newest checkpoint of the run directory `run` (`<storage>/<run name>`), or None.

    A Ray Train run is read through Ray's own record of its reported checkpoints
    (`ray.train.Result.from_path`); an in-process run, which has none, through `LocalRun`.
    """
    from ray.train import Result

    try:
        return Result.from_path(str(run)).checkpoint
    except RuntimeError:  # no Ray Train run snapshot there
        return None if is_uri(str(run)) else LocalRun(run).latest()


def last_checkpoint_path(out_dir: Path, storage_path: str | None = None) -> Path:
    """The state file of the newest checkpoint of the training run of artifact `out_dir`
    (inspection and tests; local storage only)."""
    run = run_location(Path(out_dir), storage_path)
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise FileNotFoundError(f"no training checkpoint under {run}")
    return Path(checkpoint.path) / STATE
