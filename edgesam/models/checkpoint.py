"""Reading checkpoint files safely: `weights_only` loads and errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or holds another model."""


class TeacherCheckpointError(CheckpointError):
    """A teacher checkpoint is missing, corrupt, or of another model."""


def read_checkpoint(path: str | Path, what: str, error: type[CheckpointError] = CheckpointError) -> Any:
    """`torch.load(path, weights_only=True)`; `error` names the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, disallowed pickle globals
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise error(
            f"{what} checkpoint {path} is truncated or corrupt and cannot be read ({type(exc).__name__}: {first_line})"
        ) from exc


def check_state(want: dict[str, torch.Tensor], state: Any, path: Path, expected: str,
                error: type[CheckpointError] = CheckpointError) -> None:
    """Raise `error` if `state` differs from `want` in keys or shapes, in terms of the file."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(
            f"{path} does not hold a state dict of tensors (expected {expected}); found {type(state).__name__}"
            + (f" with keys {list(state)[:5]}" if isinstance(state, dict) else "")
        )
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k}: expected {tuple(want[k].shape)}, found {tuple(state[k].shape)}"
             for k in want if k in state and want[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:2]})")
    if problems:
        raise error(f"{path} is not a {expected} checkpoint: " + "; ".join(problems))


def load_state_checked(model: torch.nn.Module, state: Any, path: Path, expected: str,
                       error: type[CheckpointError] = CheckpointError) -> None:
    check_state(model.state_dict(), state, path, expected, error)
    model.load_state_dict(state)
