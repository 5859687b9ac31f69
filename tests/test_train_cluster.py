"""The training engine on Ray Train with 2 CPU workers: DDP averages gradients (also when the
loss calls a sub-module's method), unused and frozen parameters keep their weights, checkpoints
and final files travel through Ray Train's storage, a rerun resumes from the latest one."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from edgesam.config import RuntimeConfig, TrainConfig
from edgesam.train import fit, latest_checkpoint, load_checkpoint, param_groups, run_location
from edgesam.train.checkpoint import ARTIFACT, NUM_TO_KEEP, STATE

TWO = RuntimeConfig(num_workers=2, cpus_per_worker=1, object_store_mb=128, seed=0)
LOCAL = RuntimeConfig(num_workers=0, seed=0)
# 64 samples in global batches of 16: 4 steps per epoch, 8 in all; checkpoints at 3, 6 and 8.
CFG = TrainConfig(epochs=2, batch_size=8, lr=0.05, lr_ref_batch=16, warmup_steps=2, weight_decay=0.5,
                  checkpoint_every=3, log_every=2, grad_clip=None)
W_TRUE = torch.arange(8, dtype=torch.float32).reshape(8, 1) / 8


class Crash(RuntimeError):
    """The failure a test injects into a training worker."""


class Probe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)
        self.unused = nn.Linear(4, 4)  # trainable, never in the loss
        self.frozen = nn.Linear(4, 4)  # not in task.parameters()

    def predict(self, x: torch.Tensor) -> torch.Tensor:  # the loss calls this, not forward
        return self.lin(x)


def initial_probe() -> Probe:
    torch.manual_seed(TWO.seed)  # as the loop seeds every rank before build_model
    return Probe()


@dataclass
class ProbeTask:
    """Regress y = x @ W_TRUE. The global batches are the same for any world size (each rank
    takes its slice), so 2 workers x 8 must train like 1 worker x 16 if gradients are averaged."""

    dump: str | None = None  # each rank saves `lin` here at every loss call
    crash_at: int | None = None  # every rank raises at this (1-based) loss call
    die_once: str | None = None  # marker file: rank 1's process dies at call 5 unless it exists

    def __post_init__(self) -> None:
        self.calls = 0

    def build_model(self) -> nn.Module:
        return Probe()

    def parameters(self, model):
        return [*model.lin.parameters(), *model.unused.parameters()]

    def num_samples(self) -> int:
        return 64

    def batches(self, rank, world_size, epoch, batch_size):
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(epoch))
        step = batch_size * world_size
        for i in range(0, 64, step):
            part = slice(i + rank * batch_size, i + (rank + 1) * batch_size)
            yield {"x": x[part], "y": x[part] @ W_TRUE}

    def loss(self, model, batch):
        self.calls += 1
        if self.crash_at == self.calls:
            raise Crash(f"killed at call {self.calls}")
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        if self.die_once and rank == 1 and self.calls == 5 and not Path(self.die_once).exists():
            Path(self.die_once).touch()
            # Ray Train registers a reported checkpoint when its controller next polls the
            # workers (every 2 s): a real run trains for longer than that between a checkpoint
            # and a failure.
            time.sleep(5)
            os._exit(1)  # a lost node: no exception, the worker process is gone
        if self.dump:
            Path(self.dump).mkdir(parents=True, exist_ok=True)
            torch.save(model.lin.state_dict(), Path(self.dump) / f"rank{rank}_call{self.calls:03d}.pt")
        loss = ((model.predict(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {}

    def batch_size_of(self, batch) -> int:
        return len(batch["x"])

    def save(self, model, out_dir: Path):
        torch.save(model.state_dict(), Path(out_dir) / "probe.pt")
        (Path(out_dir) / "saved_in.txt").write_text(str(Path(out_dir).resolve()))
        return {"probe": "probe.pt"}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    ray.init(address="local",  # never a cluster left recorded in /tmp/ray
             num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(ray_cluster, tmp_path_factory):
    """One 2-worker run with its checkpoints in a storage outside the artifact directory."""
    root = tmp_path_factory.mktemp("two_workers")
    runtime = TWO.model_copy(update={"storage_path": str(root / "shared")})
    result = fit(ProbeTask(dump=str(root / "dump")), CFG, runtime, root / "artifact")
    return root, runtime, result


def _final_state(root: Path, runtime: RuntimeConfig) -> dict:
    return load_checkpoint(Path(latest_checkpoint(run_location(root / "artifact", runtime.storage_path)).path) / STATE)


def test_two_workers_keep_identical_weights(two_workers):
    root, _, result = two_workers
    assert result["steps"] == 8
    calls = sorted(p.name.split("_", 1)[1] for p in (root / "dump").glob("rank0_*"))
    assert len(calls) == 8
    for call in calls:
        a, b = (torch.load(root / "dump" / f"rank{r}_{call}") for r in (0, 1))
        for key in a:
            assert torch.equal(a[key], b[key]), (call, key)
    first, last = (torch.load(root / "dump" / f"rank0_{c}") for c in (calls[0], calls[-1]))
    assert not torch.equal(first["weight"], last["weight"])  # the ranks did train (on different data)


def test_two_workers_average_gradients(two_workers, tmp_path):
    root, _, _ = two_workers
    single = fit(ProbeTask(), CFG.model_copy(update={"batch_size": 16}), LOCAL, tmp_path)
    assert single["steps"] == 8
    two = torch.load(root / "artifact" / "probe.pt")
    one = torch.load(tmp_path / "probe.pt")
    for key in ("lin.weight", "lin.bias"):
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)


def test_trainable_but_unused_parameters_keep_their_weights(two_workers):
    root, runtime, _ = two_workers
    init, final = initial_probe().state_dict(), _final_state(root, runtime)["model"]
    assert not torch.equal(final["lin.weight"], init["lin.weight"])
    for key in ("unused.weight", "unused.bias"):  # weight decay 0.5 would have shrunk them
        assert torch.equal(final[key], init[key]), key


def test_frozen_parameters_stay_out_of_the_optimizer(two_workers):
    root, runtime, _ = two_workers
    state = _final_state(root, runtime)
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == 4  # lin and unused
    init = initial_probe().state_dict()
    for key in ("frozen.weight", "frozen.bias"):
        assert torch.equal(state["model"][key], init[key]), key


def test_final_files_come_back_through_the_checkpoint(two_workers):
    root, runtime, result = two_workers
    artifact, run = root / "artifact", Path(run_location(root / "artifact", runtime.storage_path))
    assert result["files"] == {"probe": "probe.pt"}
    final = Path(latest_checkpoint(run).path)
    assert final.parent == run and Path(result["checkpoint"]) == final
    assert (artifact / "probe.pt").read_bytes() == (final / ARTIFACT / "probe.pt").read_bytes()
    assert Path((artifact / "saved_in.txt").read_text()) != artifact  # task.save wrote into the checkpoint
    assert not (artifact / ".ray_train").exists()  # checkpoints live in the storage only
    checkpoints = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints[-1] == "checkpoint_00000008" and len(checkpoints) <= NUM_TO_KEEP
    assert json.loads((final / "artifact.json").read_text()) == result["files"]


def test_rerun_after_a_crash_resumes_every_rank_from_the_ray_checkpoint(two_workers, tmp_path):
    root, _, straight = two_workers
    with pytest.raises(Crash):
        fit(ProbeTask(crash_at=5), CFG, TWO, tmp_path / "killed")  # checkpoint at step 3
    run = run_location(tmp_path / "killed", None)
    assert load_checkpoint(Path(latest_checkpoint(run).path) / STATE)["step"] == 3
    resumed = fit(ProbeTask(), CFG, TWO, tmp_path / "killed")
    assert resumed["start_step"] == 3 and resumed["steps"] == 8
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in straight["history"]]
    a = torch.load(root / "artifact" / "probe.pt")
    b = torch.load(tmp_path / "killed" / "probe.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_a_lost_worker_is_restarted_from_the_latest_checkpoint(two_workers, tmp_path):
    root, _, straight = two_workers
    runtime = TWO.model_copy(update={"max_failures": 1})
    result = fit(ProbeTask(die_once=str(tmp_path / "died")), CFG, runtime, tmp_path / "artifact")
    assert (tmp_path / "died").exists() and result["start_step"] == 3  # the retry resumed at step 3
    a = torch.load(root / "artifact" / "probe.pt")
    b = torch.load(tmp_path / "artifact" / "probe.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_sync_bn_on_cpu_workers_is_refused(ray_cluster, tmp_path):
    with pytest.raises(ValueError, match="sync_bn needs GPU"):
        fit(ProbeTask(), CFG.model_copy(update={"sync_bn": True}), TWO.model_copy(update={"use_gpu": False}), tmp_path)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.ln2 = nn.LayerNorm((2, 2))  # 2-D weight: exempt as a norm layer's, not as 1-D
        self.scale = nn.Parameter(torch.ones(4))  # 1-D, no norm layer
        self.head = nn.Linear(4, 2)


def test_no_decay_groups_hold_biases_and_norms():
    model = Normed()
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = list(model.parameters())
    (decay, no_decay) = param_groups(model, trainable, 0.05, no_decay_norm_bias=True)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "head.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "bn.bias", "bn.weight", "conv.bias", "head.bias", "ln.bias", "ln.weight", "ln2.bias", "ln2.weight", "scale"]
    (only,) = param_groups(model, trainable, 0.05, no_decay_norm_bias=False)
    assert len(only["params"]) == len(trainable) and only["weight_decay"] == 0.05


def test_no_decay_norm_bias_reaches_the_optimizer(tmp_path):
    cfg = CFG.model_copy(update={"no_decay_norm_bias": True, "max_steps": 3, "batch_size": 16})
    fit(ProbeTask(), cfg, LOCAL, tmp_path)
    groups = load_checkpoint(Path(latest_checkpoint(run_location(tmp_path, None)).path) / STATE)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.5, 2), (0.0, 2)]  # weights | biases
