"""The shared training loop: loss falls, schedule, resume after a kill, NaN stops cleanly, Ray Train,
TensorBoard event files and progress callbacks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from edgesam.config import RuntimeConfig, TrainConfig
from edgesam.train import (
    NonFiniteLossError, fit, last_checkpoint_path, load_checkpoint, run_location, warmup_cosine_factor,
)

LOCAL = RuntimeConfig(num_workers=0, seed=0)


class Crash(RuntimeError):
    pass


@dataclass
class LinearTask:
    """Regress y = x @ w_true with a linear layer; optionally crash or emit NaN at a step."""

    samples: int = 64
    crash_at: int | None = None  # raise at this (1-based) loss call: a killed run
    nan_at: int | None = None

    def __post_init__(self) -> None:
        self.calls = 0

    def build_model(self) -> nn.Module:
        return nn.Linear(8, 1)

    def parameters(self, model):
        return model.parameters()

    def num_samples(self) -> int:
        return self.samples

    def batches(self, rank, world_size, epoch, batch_size):
        g = torch.Generator().manual_seed(1000 * epoch + rank)
        w_true = torch.arange(8, dtype=torch.float32).reshape(8, 1) / 8
        x = torch.randn(self.samples // world_size, 8, generator=g)
        for i in range(0, len(x), batch_size):
            yield {"x": x[i:i + batch_size], "y": x[i:i + batch_size] @ w_true}

    def loss(self, model, batch):
        self.calls += 1
        if self.crash_at == self.calls:
            raise Crash(f"killed at call {self.calls}")
        noisy = batch["y"] + 0.01 * torch.randn_like(batch["y"])  # resume must restore the RNG
        loss = ((model(batch["x"]) - noisy) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}

    def batch_size_of(self, batch) -> int:
        return len(batch["x"])

    def save(self, model, out_dir: Path):
        torch.save(model.state_dict(), Path(out_dir) / "model.pt")
        return {"model": "model.pt"}


CFG = TrainConfig(epochs=4, batch_size=8, lr=0.05, lr_ref_batch=8, warmup_steps=3,
                  checkpoint_every=5, log_every=4, grad_clip=1.0)


def test_schedule_warms_up_then_decays_to_min():
    factors = [warmup_cosine_factor(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert warmup_cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    # EdgeSAM's timm schedule: warm-up from a start ratio, then the cosine at the absolute step
    assert warmup_cosine_factor(0, 100, 50, 0.0, warmup_start_ratio=0.01) == pytest.approx(0.01)
    assert warmup_cosine_factor(49, 100, 50, 0.0, warmup_start_ratio=0.01) == pytest.approx(0.01 + 0.99 * 49 / 50)
    assert warmup_cosine_factor(50, 100, 50, 0.0, cosine_from_start=True) == pytest.approx(0.5)
    assert warmup_cosine_factor(50, 100, 50, 0.0) == pytest.approx(1.0)


def test_loss_falls_and_artifacts_written(tmp_path):
    result = fit(LinearTask(), CFG, LOCAL, tmp_path)
    assert result["steps"] == 4 * 8  # 64 samples / batch 8 = 8 steps per epoch
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.2 * losses[0]
    assert all(h["images_per_s"] > 0 and "mse" in h for h in result["history"])
    assert (tmp_path / result["files"]["model"]).is_file()
    assert load_checkpoint(last_checkpoint_path(tmp_path))["step"] == 32


def test_max_steps_caps_the_step_count(tmp_path):
    result = fit(LinearTask(), CFG.model_copy(update={"max_steps": 7}), LOCAL, tmp_path)
    assert result["steps"] == 7 and result["history"][-1]["step"] == 7


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    fit(LinearTask(), CFG, LOCAL, tmp_path / "straight")
    with pytest.raises(Crash):
        fit(LinearTask(crash_at=13), CFG, LOCAL, tmp_path / "killed")
    assert load_checkpoint(last_checkpoint_path(tmp_path / "killed"))["step"] == 10
    resumed = fit(LinearTask(), CFG, LOCAL, tmp_path / "killed")
    assert resumed["steps"] == 32
    a = load_checkpoint(last_checkpoint_path(tmp_path / "straight"))
    b = load_checkpoint(last_checkpoint_path(tmp_path / "killed"))
    assert b["step"] == 32
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    exp_a = a["optimizer"]["state"][0]["exp_avg_sq"]
    torch.testing.assert_close(exp_a, b["optimizer"]["state"][0]["exp_avg_sq"], rtol=0, atol=1e-8)
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]


def test_rerun_of_a_finished_run_trains_nothing_and_brings_the_files_back(tmp_path):
    first = fit(LinearTask(), CFG, LOCAL, tmp_path)
    (tmp_path / "model.pt").unlink()  # e.g. killed after training, before the files were copied
    again = fit(LinearTask(crash_at=1), CFG, LOCAL, tmp_path)  # a single loss call would crash it
    assert again["start_step"] == again["steps"] == 32 and again["history"] == first["history"]
    assert torch.load(tmp_path / "model.pt").keys() == {"weight", "bias"}


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's view of an event directory: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def written_steps(logdir: Path, tag: str) -> list[int]:
    """The steps of `tag` in every event file as written (TensorBoard's reader hides duplicates)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [event.step for path in sorted(logdir.glob("*tfevents*")) for event in EventFileLoader(str(path)).Load()
            for value in event.summary.value if value.tag == tag]


def assert_events_match(logdir: Path, history: list[dict]) -> None:
    found = scalars(logdir)
    assert set(found) == {f"train/{key}" for key in history[0] if key != "step"}
    for key in history[0]:
        if key != "step":
            assert [s for s, _ in found[f"train/{key}"]] == [h["step"] for h in history]
            assert [v for _, v in found[f"train/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-6)


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    result = fit(LinearTask(), CFG, LOCAL, tmp_path)
    assert result["tensorboard"] == "tensorboard" and [h["step"] for h in result["history"]] == list(range(4, 33, 4))
    assert_events_match(tmp_path / "tensorboard", result["history"])
    assert_events_match(Path(run_location(tmp_path, None)) / "tensorboard", result["history"])  # the live file


def test_resumed_run_continues_the_same_curves_without_duplicate_steps(tmp_path):
    straight = fit(LinearTask(), CFG, LOCAL, tmp_path / "straight")
    with pytest.raises(Crash):
        fit(LinearTask(crash_at=15), CFG, LOCAL, tmp_path / "killed")  # logged step 12, checkpoint at 10
    live = Path(run_location(tmp_path / "killed", None)) / "tensorboard"
    assert written_steps(live, "train/loss") == [4, 8, 12]
    resumed = fit(LinearTask(), CFG, LOCAL, tmp_path / "killed")
    assert resumed["start_step"] == 10
    for logdir in (tmp_path / "killed" / "tensorboard", live):
        assert written_steps(logdir, "train/loss") == list(range(4, 33, 4))
        assert_events_match(logdir, resumed["history"])
    # the same curve as without the kill, except at step 12, whose window after the resume is steps 11-12
    losses = {s: v for s, v in scalars(tmp_path / "killed" / "tensorboard")["train/loss"] if s != 12}
    assert losses == pytest.approx({h["step"]: h["loss"] for h in straight["history"] if h["step"] != 12}, rel=1e-5)


def test_progress_callback_sees_every_logged_record_in_step_order(tmp_path):
    calls = []
    result = fit(LinearTask(), CFG, LOCAL, tmp_path / "a", on_progress=lambda *call: calls.append(call))
    assert [step for step, _, _ in calls] == [h["step"] for h in result["history"]] == list(range(4, 33, 4))
    assert {total for _, total, _ in calls} == {32} and [r for _, _, r in calls] == result["history"]

    def broken(step, total, record):
        raise RuntimeError("watcher down")

    assert fit(LinearTask(), CFG, LOCAL, tmp_path / "b", on_progress=broken)["steps"] == 32  # training goes on


def test_progress_reaches_fit_through_an_enclosing_block(tmp_path):
    from edgesam.train.progress import reporting_progress

    calls = []
    with reporting_progress(lambda step, total, record: calls.append(step)):
        fit(LinearTask(), CFG.model_copy(update={"max_steps": 8}), LOCAL, tmp_path / "a")
    fit(LinearTask(), CFG.model_copy(update={"max_steps": 8}), LOCAL, tmp_path / "b")
    assert calls == [4, 8]


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 8.*checkpoint_00000005 \(step 5\)"):
        fit(LinearTask(nan_at=8), CFG, LOCAL, tmp_path)
    state = load_checkpoint(last_checkpoint_path(tmp_path))
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_ray_train_worker_runs_reports_progress_and_surfaces_nan_error(tmp_path):
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path

    runtime = RuntimeConfig(num_workers=1, cpus_per_worker=1, object_store_mb=128)
    calls = []
    try:
        result = fit(LinearTask(), CFG.model_copy(update={"max_steps": 8}), runtime, tmp_path / "ok",
                     on_progress=lambda *call: calls.append(call))
        assert result["steps"] == 8 and math.isfinite(result["history"][-1]["loss"])
        # from the worker process to this one: progress through the relay, events in the final checkpoint
        assert [(step, total) for step, total, _ in calls] == [(4, 8), (8, 8)]
        assert [record for _, _, record in calls] == result["history"]
        assert_events_match(tmp_path / "ok" / "tensorboard", result["history"])
        with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 3"):
            fit(LinearTask(nan_at=3), CFG, runtime, tmp_path / "nan")
    finally:
        ray.shutdown()
