"""End to end on the `smoke` profile through a real local Prefect server and served deployments.

Starts `prefect server start --host 127.0.0.1` (temporary PREFECT_HOME, SQLite, a free port)
and `python -m flows.serve`, triggers runs with `prefect deployment run ... --watch`, checks
artifacts, manifests and task states, and stops both process groups by PID at the end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from edgesam.config import STAGES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 480


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and its process group (it leads a session of its own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # children left in the group (flow-run processes, a local Ray)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
        }
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(proc)
        return proc, log

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def deployments_served(self) -> bool:
        from flows.serve import deployments

        return len(self.client(lambda c: c.read_deployments())) == len(deployments())

    def client(self, call):
        async def go():
            async with get_client() as client:
                return await call(client)

        with temporary_settings({PREFECT_API_URL: self.api}):
            return run_coro_as_sync(go())

    def run_deployment(self, name: str, **params) -> dict:
        args = [str(BIN / "prefect"), "deployment", "run", name, "--watch", "--watch-timeout", str(RUN_TIMEOUT)]
        for key, value in params.items():
            args += ["--param", f"{key}={value}"]
        start = time.monotonic()
        done = subprocess.run(args, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60)
        wall = time.monotonic() - start
        output = done.stdout + done.stderr
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert match, output
        run_id = match.group(1)
        flow_run = self.client(lambda c: c.read_flow_run(run_id))
        runs_of_flow = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        tasks = self.client(lambda c: c.read_task_runs(flow_run_filter=runs_of_flow))
        seconds = flow_run.total_run_time.total_seconds()
        print(f"\n{name} {params}: {wall:.1f}s wall, {seconds:.1f}s running")
        return {
            "rc": done.returncode, "output": output, "wall": wall, "flow_run": flow_run,
            "tasks": {t.name: t.state.name for t in tasks}, "seconds": seconds,
        }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("e2e"))
    try:
        server, server_log = stack.start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(stack.port)], "server")
        wait_for(stack.healthy, 180, "prefect server", server, server_log)
        serve, serve_log = stack.start([sys.executable, "-m", "flows.serve"], "serve")
        wait_for(stack.deployments_served, 180, "served deployments", serve, serve_log)
        yield stack
    finally:
        for proc in reversed(stack.procs):
            stop(proc)
        for proc in stack.procs:
            assert proc.poll() is not None, f"process {proc.pid} still running"


def describe(run: dict) -> str:
    return f"{run['output'][-2000:]}\nstate message: {run['flow_run'].state.message}"


def committed(work_dir: Path, stage: str) -> dict[str, float]:
    """fingerprint -> manifest mtime of every committed artifact of `stage`."""
    return {m.parent.name: m.stat().st_mtime for m in (work_dir / stage).glob("*/manifest.json")}


def flow_logs(stack: Stack, run: dict) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = stack.client(lambda c: c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run["flow_run"].id]))))
    return "\n".join(log.message for log in logs)


@pytest.fixture(scope="module")
def work_dir(stack) -> Path:
    return stack.root / "runs"


@pytest.fixture(scope="module")
def first_run(stack, work_dir) -> dict:
    return stack.run_deployment("edgesam/full", profile="smoke", work_dir=work_dir)


def test_full_run_commits_every_stage(first_run, work_dir):
    assert first_run["rc"] == 0, describe(first_run)
    assert first_run["tasks"] == {name: "Completed" for name in STAGES}
    for name in STAGES:
        assert len(committed(work_dir, name)) == 1, name


def _close(got, want, path: str = "") -> list[str]:
    """Differences between nested metric dicts beyond float tolerance, as readable lines."""
    if isinstance(want, dict):
        return [d for k in want for d in _close(got.get(k) if isinstance(got, dict) else None, want[k], f"{path}.{k}")]
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return [] if abs(got - want) <= 1e-4 else [f"{path}: {got} != {want}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_smoke_metrics_match_the_recorded_run(first_run, work_dir):
    """The smoke DAG's numbers as recorded (tests/data/smoke_metrics.json): a change of any result
    fails here. A deliberate change re-records them from `python -m pipelines all --profile smoke`."""
    import json

    def manifest(stage: str) -> dict:
        (path,) = (work_dir / stage).glob("*/manifest.json")
        return json.loads(path.read_text())

    got = {"teacher": manifest("teacher")["val"], "encoder_kd": manifest("encoder_kd")["miou"],
           "prompt_kd": manifest("prompt_kd")["miou"], "rpn": manifest("rpn")["proposals"],
           "evaluate": manifest("evaluate")["miou"]}
    want = json.loads((REPO / "tests" / "data" / "smoke_metrics.json").read_text())
    assert not _close(got, want), "\n".join(_close(got, want))
    # the numbers guard quality too: the smoke teacher (the reference teacher) segments
    teacher = got["evaluate"]["paper"]["sa1b"]["teacher"]
    assert teacher["box"]["all"] > 0.5 and teacher["point"]["all"] > 0.3, teacher


def test_second_run_is_cached_and_fast(stack, first_run, work_dir):
    before = {name: committed(work_dir, name) for name in STAGES}
    second = stack.run_deployment("edgesam/full", profile="smoke", work_dir=work_dir)
    assert second["rc"] == 0, describe(second)
    assert second["tasks"] == {name: "Cached" for name in STAGES}
    logs = flow_logs(stack, second)
    assert all(f"{name}: cached" in logs for name in STAGES), logs
    assert {name: committed(work_dir, name) for name in STAGES} == before
    assert second["seconds"] < 0.2 * first_run["seconds"], (second["seconds"], first_run["seconds"])


def test_force_evaluate_recomputes_only_evaluate_and_export(stack, first_run, work_dir):
    before = {name: committed(work_dir, name) for name in STAGES}
    run = stack.run_deployment("edgesam/full", profile="smoke", work_dir=work_dir, force='["evaluate"]')
    assert run["rc"] == 0, describe(run)
    assert run["tasks"] == {name: "Completed" if name in ("evaluate", "export") else "Cached" for name in STAGES}
    after = {name: committed(work_dir, name) for name in STAGES}
    for name in STAGES:
        assert after[name].keys() == before[name].keys()
        changed = after[name] != before[name]
        assert changed == (name in ("evaluate", "export")), name


def test_other_backbone_makes_a_new_student_from_cached_data(stack, first_run, work_dir):
    import json

    before = committed(work_dir, "encoder_kd")
    run = stack.run_deployment(
        "edgesam/full", profile="smoke", work_dir=work_dir, backbone="mobilenetv3_small_050",
        stages='["data", "shard", "teacher", "embed", "encoder_kd"]',
    )
    assert run["rc"] == 0, describe(run)
    assert run["tasks"] == {"data": "Cached", "shard": "Cached", "teacher": "Cached", "embed": "Cached",
                            "encoder_kd": "Completed"}
    new = set(committed(work_dir, "encoder_kd")) - set(before)
    assert len(new) == 1
    manifest = json.loads((work_dir / "encoder_kd" / new.pop() / "manifest.json").read_text())
    assert manifest["config"]["backbone"] == "mobilenetv3_small_050"
    assert manifest["upstream"] == {"embed": next(iter(committed(work_dir, "embed"))),
                                    "teacher": next(iter(committed(work_dir, "teacher")))}


def test_corrupt_teacher_checkpoint_fails_clearly_and_keeps_upstream(stack, first_run, work_dir):
    checkpoint = stack.root / "corrupt_vit_b.pth"
    checkpoint.write_bytes(b"PK\x03\x04 this is not a SAM checkpoint" * 64)
    upstream = {name: committed(work_dir, name) for name in ("data", "shard")}
    teachers = committed(work_dir, "teacher")
    run = stack.run_deployment("edgesam/full", profile="smoke", work_dir=work_dir,
                               teacher_kind="vit_b", teacher_checkpoint=checkpoint,
                               overrides='{"teacher": {"allow_unverified": true}}')
    assert run["rc"] != 0 and run["flow_run"].state.is_failed()
    assert run["tasks"]["data"] == run["tasks"]["shard"] == "Cached"
    assert run["tasks"]["teacher"] == "Failed" and "embed" not in run["tasks"]
    message = run["flow_run"].state.message + flow_logs(stack, run)
    assert "TeacherCheckpointError" in message and str(checkpoint) in message and "corrupt" in message
    assert {name: committed(work_dir, name) for name in ("data", "shard")} == upstream
    assert committed(work_dir, "teacher") == teachers


def test_nightly_deployment_evaluates_the_latest_export(stack, first_run, work_dir):
    deployment = stack.client(lambda c: c.read_deployment_by_name("edgesam-nightly/nightly"))
    (schedule,) = deployment.schedules
    assert schedule.active and schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    run = stack.run_deployment("edgesam-nightly/nightly", profile="smoke", work_dir=work_dir)
    assert run["rc"] == 0, describe(run)
    assert "evaluated latest-export-smoke" in flow_logs(stack, run)
    keys = ["edgesam-nightly-gate", "edgesam-nightly-history", "edgesam-nightly-trend"]
    artifacts = stack.client(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=keys))))
    assert {a.key: a.type for a in artifacts} == dict(zip(keys, ["markdown", "table", "markdown"]))
    assert (work_dir / "ledger.sqlite").is_file()
