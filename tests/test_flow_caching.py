"""Caching, `stages`, `force` and retry semantics of the `edgesam` flow, on a fake stage registry,
and the training stages' Prefect artifacts (progress, curves).

The fake stages have the real names and DAG but only write a small file (the training ones
also report progress and a loss curve), so these tests exercise the flow and Prefect's
caching against a temporary Prefect server in seconds.
"""

from __future__ import annotations

import errno
import json
import types
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

import flows.pipeline
import pipelines.stage
from edgesam.config import STAGES
from edgesam.train.progress import ambient_progress
from flows.pipeline import edgesam
from pipelines.stage import MissingUpstreamError

DAG = {
    "data": (), "shard": ("data",), "teacher": ("shard",), "embed": ("shard", "teacher"),
    "encoder_kd": ("embed", "teacher"), "prompt_kd": ("embed", "teacher", "encoder_kd"),
    "rpn": ("data", "prompt_kd"), "evaluate": ("data", "shard", "teacher", "encoder_kd", "prompt_kd", "rpn"),
    "export": ("shard", "prompt_kd", "rpn", "evaluate"),
}
TRAINING = ("encoder_kd", "prompt_kd")  # the fakes that "train": 3 logged steps, as `fit` reports them


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


class FakeStages:
    """Stage modules that record their calls and write `out/result.json`."""

    def __init__(self, source_dir: Path):
        self.calls: list[str] = []
        self.failures: dict[str, list[BaseException]] = {}  # stage -> errors to raise, in order
        self.modules = {}
        for name, upstream in DAG.items():
            source = source_dir / f"{name}.py"
            source.write_text(f"# fake stage {name}\n")
            module = types.ModuleType(f"fake_{name}")
            module.STAGE, module.UPSTREAM, module.__file__ = name, upstream, str(source)
            module.run = self._runner(name)
            self.modules[name] = module

    def _runner(self, name):
        def run(cfg, runtime, inputs, out):
            self.calls.append(name)
            if self.failures.get(name):
                raise self.failures[name].pop(0)
            assert set(inputs) == set(DAG[name]) and all(a.complete for a in inputs.values())
            (out / "result.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
            if name == "evaluate":  # what the flow publishes as Prefect artifacts
                (out / "metrics.json").write_text(json.dumps({"miou": {"box": 0.5}, "backbone": "repvit_m1"}))
            if name not in TRAINING:
                return {"inputs": sorted(inputs)}
            curve = [{"step": step, "loss": 1.0 / step, "lr": 1e-3, "images_per_s": 5.0} for step in (1, 2, 3)]
            progress = ambient_progress()  # what `edgesam.train.fit` calls back
            for record in curve:
                progress(record["step"], 3, record)
            return {"inputs": sorted(inputs), "loss": {"curve": curve}}
        return run

    def module(self, name):
        return self.modules[name]


@pytest.fixture
def fake(tmp_path, monkeypatch, prefect_server):
    stages = FakeStages(tmp_path)
    monkeypatch.setattr(pipelines.stage, "stage_module", stages.module)
    # Fingerprints from the fake sources only, so edits elsewhere cannot change them mid-test.
    monkeypatch.setattr(pipelines.stage, "module_digests", lambda module: {module: "fake"})
    monkeypatch.setattr(flows.pipeline, "stage_task", flows.pipeline.stage_task.with_options(retry_delay_seconds=0))
    return stages


def run_flow(tmp_path, **params):
    state = edgesam(profile="smoke", work_dir=tmp_path / "runs", return_state=True, **params)
    return state


def read_from_server(read):
    """`await read(client)` against the test server."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def run():
        async with get_client() as client:
            return await read(client)

    return run_coro_as_sync(run())


def task_runs(flow_state) -> list:
    """Task runs of a flow run; waits (up to 30 s) for the server to have recorded all their states."""
    import asyncio

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))

    async def read(client):
        for _ in range(60):
            runs = await client.read_task_runs(flow_run_filter=flow_runs)
            if all(run.state is not None for run in runs):
                break
            await asyncio.sleep(0.5)
        return runs

    return read_from_server(read)


def task_states(flow_state) -> dict[str, str]:
    return {run.name: run.state.name for run in task_runs(flow_state)}


def run_artifacts(flow_state) -> list:
    artifacts = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_state.state_details.flow_run_id]))
    return read_from_server(lambda client: client.read_artifacts(artifact_filter=artifacts))


def test_training_stages_show_progress_and_publish_their_curves(tmp_path, fake):
    state = run_flow(tmp_path)
    assert state.is_completed()
    artifacts = run_artifacts(state)
    progress = {a.key: a for a in artifacts if a.type == "progress"}
    assert set(progress) == {"edgesam-progress-encoder-kd-smoke", "edgesam-progress-prompt-kd-smoke"}
    assert sum(a.type == "progress" for a in artifacts) == 2  # one per stage, created once and then updated
    names = {run.id: run.name for run in task_runs(state)}
    for stage in TRAINING:
        artifact = progress[f"edgesam-progress-{stage.replace('_', '-')}-smoke"]
        assert artifact.data == 100.0  # created at step 1 (33 %), updated to the last step
        assert artifact.description == f"{stage} training: step 3/3, loss 0.3333"
        assert names[artifact.task_run_id] == stage  # on the stage's own task run
    (curves,) = [a for a in artifacts if a.key == "edgesam-curves-smoke"]
    assert "data:image/png;base64," in curves.data
    assert "| encoder_kd | 3 | 1.0000 | 0.3333 | - |" in curves.data and "| prompt_kd | 3 |" in curves.data
    # the evaluation is keyed by profile and backbone, so other backbones keep their own history
    assert {"edgesam-eval-smoke-repvit-m1", "edgesam-eval-smoke-repvit-m1-metrics"} <= {a.key for a in artifacts}

    cached = run_artifacts(run_flow(tmp_path))  # nothing trains, the curves are published again
    assert not [a for a in cached if a.type == "progress"] and [a for a in cached if a.key == "edgesam-curves-smoke"]


def test_cached_rerun_force_and_deleted_artifact(tmp_path, fake):
    first = run_flow(tmp_path)
    assert first.is_completed() and fake.calls == list(STAGES)
    assert all(state == "Completed" for state in task_states(first).values())
    result = first.result()
    for name in STAGES:
        assert (Path(result[name]["path"]) / "manifest.json").is_file()
        assert result[name]["status"] == "done"

    fake.calls.clear()
    second = run_flow(tmp_path)
    assert fake.calls == []
    assert task_states(second) == {name: "Cached" for name in STAGES}
    assert {r["status"] for r in second.result().values()} == {"cached"}

    third = run_flow(tmp_path)  # now served by Prefect's own cache, keyed on the fingerprint
    assert fake.calls == [] and task_states(third) == {name: "Cached" for name in STAGES}

    forced = run_flow(tmp_path, force=["evaluate"])
    assert fake.calls == ["evaluate", "export"]
    states = task_states(forced)
    assert states["evaluate"] == states["export"] == "Completed"
    assert all(states[name] == "Cached" for name in STAGES[:7])

    # The manifest is the truth: a deleted artifact recomputes although Prefect holds a result.
    fake.calls.clear()
    rpn_dir = Path(result["rpn"]["path"])
    (rpn_dir / "manifest.json").unlink()
    run_flow(tmp_path)
    assert fake.calls == ["rpn"] and (rpn_dir / "manifest.json").is_file()


def test_stages_reuse_upstream_and_fail_clearly_when_missing(tmp_path, fake):
    base = run_flow(tmp_path).result()
    fake.calls.clear()

    variant = run_flow(tmp_path, backbone="resnet18", stages=["encoder_kd"]).result()
    assert fake.calls == ["encoder_kd"] and list(variant) == ["encoder_kd"]
    assert variant["encoder_kd"]["fingerprint"] != base["encoder_kd"]["fingerprint"]
    config = json.loads((Path(variant["encoder_kd"]["path"]) / "result.json").read_text())["config"]
    assert config["backbone"] == "resnet18"

    state = run_flow(tmp_path, backbone="resnet18", stages=["rpn", "evaluate"])
    assert state.is_failed() and fake.calls == ["encoder_kd"]
    with pytest.raises(MissingUpstreamError, match=r"rpn needs prompt_kd .*prompt_kd/[0-9a-f]{16}"):
        state.result()


def test_overrides_and_named_parameters_reach_the_stage_config(tmp_path, fake):
    (tmp_path / "sa1b").mkdir()  # input paths are checked before any stage
    result = run_flow(
        tmp_path, stages=["data"], sa1b_path=tmp_path / "sa1b",
        overrides={"data": {"num_train": 3, "sa1b_path": "/ignored"}},
    ).result()
    config = json.loads((Path(result["data"]["path"]) / "result.json").read_text())["config"]
    assert config["num_train"] == 3 and config["sa1b_path"] == str(tmp_path / "sa1b")
    bad = run_flow(tmp_path, stages=["data"], overrides={"data": {"no_such_setting": 1}})
    with pytest.raises(Exception, match="no_such_setting"):
        bad.result()


def test_retries_transient_io_only(tmp_path, fake):
    fake.failures["data"] = [OSError(errno.EIO, "flaky disk")]
    assert run_flow(tmp_path, stages=["data"]).is_completed()
    assert fake.calls == ["data", "data"]

    fake.calls.clear()
    fake.failures["shard"] = [ValueError("corrupt shard"), ValueError("corrupt shard")]
    state = run_flow(tmp_path, stages=["shard"])
    assert state.is_failed() and fake.calls == ["shard"]
    with pytest.raises(ValueError, match="corrupt shard"):
        state.result()
    assert not list((tmp_path / "runs" / "shard").glob("*/manifest.json"))


def test_ablation_flow_reruns_prompt_kd_per_variant_and_tabulates_intervals_from_the_ledger(
        tmp_path, fake, monkeypatch, capsys):
    from edgesam.cli import main as edgesam_cli
    from edgesam.eval.ledger import Ledger
    from edgesam.eval.miou import records_jsonl
    from edgesam.metrics import IoURecord
    from flows.ablations import edgesam_ablations

    monkeypatch.delenv("EDGESAM_LEDGER", raising=False)
    run_prompt_kd, run_embed = fake._runner("prompt_kd"), fake._runner("embed")

    def prompt_kd(cfg, runtime, inputs, out):  # IoUs that depend on the variant's decoding iterations
        records = [IoURecord("prompt_kd", "val", prompt, "all", min(1.0, 0.3 + 0.1 * cfg.decode_iters + 0.01 * (i % 3)),
                             f"img{i}") for prompt in ("box_gt", "point_gt", "box_teacher", "point_teacher")
                   for i in range(12)]
        records.append(IoURecord("teacher", "val", "box_gt", "all", 0.9, "img0"))  # not the student's: not recorded
        (out / "val_ious.jsonl").write_text(records_jsonl({"val": records}))
        (out / "student.pt").write_bytes(f"weights {cfg.decode_iters}".encode())
        return run_prompt_kd(cfg, runtime, inputs, out) | {"student": "student.pt", "val_ious": "val_ious.jsonl"}

    def embed(cfg, runtime, inputs, out):
        return run_embed(cfg, runtime, inputs, out) | {"splits": {"val": {"shards": [
            {"path": "val/shard-000000.tar", "sha256": "ab" * 32}]}}}

    fake.modules["prompt_kd"].run, fake.modules["embed"].run = prompt_kd, embed
    edgesam(profile="smoke", work_dir=tmp_path / "runs")  # the upstream, committed
    fake.calls.clear()
    variants = ["decode_iters=1", "decode_iters=3"]
    result = edgesam_ablations(profile="smoke", work_dir=tmp_path / "runs", variants=variants)
    assert fake.calls == ["prompt_kd"] * 2  # the variants; the baseline (smoke: 2 iterations) is cached
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["decode_iters=3"]["box_gt_vs_baseline"]["diff"] > 0 and rows["decode_iters=3"]["box_gt_vs_baseline"]["significant"]
    assert rows["decode_iters=1"]["box_gt_vs_baseline"]["diff"] < 0
    table = Path(result["table"]).read_text()
    assert "| decode_iters=3 |" in table and "| baseline |" in table and result["run_id"] in table

    ledger = Ledger(tmp_path / "runs" / "ledger.sqlite")  # the work dir's ledger holds the runs' results
    evaluations = ledger.run(result["run_id"])
    assert [e.model_name for e in evaluations] == ["baseline", *variants]
    assert all(e.annotations == 12 and e.images == 12 and e.backbone == "repvit_m1" for e in evaluations)
    assert len({e.model_digest for e in evaluations}) == 3 and len({e.benchmark_digest for e in evaluations}) == 1
    other = edgesam_ablations(profile="smoke", work_dir=tmp_path / "runs", variants=variants[:1])
    assert other["run_id"] != result["run_id"] and len(ledger.run(other["run_id"])) == 2  # the baseline again, own id
    again = edgesam_ablations(profile="smoke", work_dir=tmp_path / "runs", variants=variants)
    assert again["run_id"] == result["run_id"] and len(ledger.run(result["run_id"])) == 3  # nothing appended twice

    edgesam_cli(["models", "results", "--run", result["run_id"], "--ledger", str(ledger.path)])
    printed = capsys.readouterr().out
    assert f"Ablations `{result['run_id']}`" in printed and "commit `" in printed
    assert [line for line in printed.splitlines() if line.startswith("|")] == \
        [line for line in table.splitlines() if line.startswith("|")]
