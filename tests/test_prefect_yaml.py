"""`prefect.yaml`: the same three deployments as `flows/serve.py` (names, flows, tags, the nightly
schedule and parameters), and Prefect's production path on a temporary local server:
`prefect work-pool create edgesam --type process`, `prefect deploy --all`, then a worker
(`--run-once`) runs `edgesam/full` on a one-stage selection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.serve import NIGHTLY_CRON, NIGHTLY_PARAMETERS, NIGHTLY_TIMEZONE, deployments

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def entrypoint_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    path, name = entrypoint.split(":")
    assert (REPO / path).is_file(), entrypoint
    return load_flow_from_entrypoint(str(REPO / path) + ":" + name)


def test_prefect_yaml_matches_serve() -> None:
    spec = prefect_yaml()
    yaml_deps = {d["name"]: d for d in spec["deployments"]}
    served = {d.name: d for d in deployments()}
    assert set(yaml_deps) == set(served) == {"full", "nightly", "default"}
    for name, dep in yaml_deps.items():
        runner = served[name]
        assert entrypoint_flow(dep["entrypoint"]).name == runner.flow_name
        assert dep["tags"] == runner.tags
        assert " ".join(dep["description"].split()) == " ".join(runner.description.split())
        assert dep["parameters"] == runner.parameters
        assert dep["work_pool"]["name"] == "edgesam"
        assert dep["work_pool"]["job_variables"]["working_dir"] == "{{ $PWD }}"
    nightly = yaml_deps["nightly"]
    assert served["nightly"].flow_name == "edgesam-nightly"  # the registry's nightly, not a DAG rerun
    assert nightly["parameters"] == NIGHTLY_PARAMETERS
    assert nightly["schedules"] == [{"cron": NIGHTLY_CRON, "timezone": NIGHTLY_TIMEZONE, "active": True}]
    assert [s.schedule.cron for s in served["nightly"].schedules] == [NIGHTLY_CRON]
    assert yaml_deps["full"]["schedules"] == [] and not served["full"].schedules
    assert spec["pull"] == []  # the code is the checkout the worker runs in (working_dir)


@pytest.mark.slow
def test_deploy_all_and_a_worker_run(tmp_path: Path) -> None:
    from test_e2e_prefect import Stack, stop, wait_for  # the e2e test's server harness

    stack = Stack(tmp_path)
    stack.env["PWD"] = str(REPO)  # as a shell in the repo root has it: `{{ $PWD }}` in prefect.yaml

    def prefect(*args: str, timeout: float = 180) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=stack.env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    try:
        server, server_log = stack.start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                          "--port", str(stack.port)], "server")
        wait_for(stack.healthy, 180, "prefect server", server, server_log)
        prefect("work-pool", "create", "edgesam", "--type", "process")
        prefect("deploy", "--all", "--no-prompt")

        deps = {d.name: d for d in stack.client(lambda c: c.read_deployments())}
        assert set(deps) == {"full", "nightly", "default"}
        for dep in deps.values():
            assert dep.work_pool_name == "edgesam"
            assert dep.job_variables == {"working_dir": str(REPO)}
            assert not dep.pull_steps
        nightly = deps["nightly"]
        assert nightly.parameters == NIGHTLY_PARAMETERS
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [
            (NIGHTLY_CRON, NIGHTLY_TIMEZONE, True)]
        assert deps["full"].parameters == {} and not deps["full"].schedules

        work_dir = tmp_path / "runs"
        out = prefect("deployment", "run", "edgesam/full", "--param", 'stages=["data"]',
                      "--param", "profile=smoke", "--param", f"work_dir={work_dir}")
        run_id = out.split("UUID: ")[1].split()[0]
        # --run-once: submit what is due, wait for it, exit (the deployment run above is due now).
        prefect("worker", "start", "--pool", "edgesam", "--limit", "1", "--run-once", timeout=300)
        flow_run = stack.client(lambda c: c.read_flow_run(run_id))
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.deployment_id == deps["full"].id
        assert list((work_dir / "data").glob("*/manifest.json"))
    finally:
        for proc in stack.procs:
            stop(proc)
