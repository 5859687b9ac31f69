"""The nightly flow (`flows/nightly.py`) on a temporary Prefect server and a smoke-profile work dir:
unchanged models are not evaluated again (also after a comment-only edit under edgesam/), every
night is in the history, and a candidate worse than the champion fails the run, emits
`edgesam.eval.regressed` (read back through Prefect's API) and sends the automation's notification.

    scripts/test.sh -m nightly          # about 6 minutes on 2 idle cores, most of it the smoke DAG

EDGESAM_SMOKE_WORK_DIR=DIR uses a copy of an existing smoke work dir (`python -m pipelines all
--profile smoke --work-dir DIR`, nothing registered in it) instead of building one.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.events.filters import EventFilter, EventNameFilter

from edgesam.eval.ledger import Ledger
from edgesam.eval.registry import Registry
from flows.nightly import REGRESSED

pytestmark = pytest.mark.nightly
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A temporary Prefect server (the e2e test's harness) and, built while it starts, a smoke
    work dir: the whole DAG by `python -m pipelines all --profile smoke`."""
    from test_e2e_prefect import Stack, stop, wait_for

    stack = Stack(tmp_path_factory.mktemp("nightly"))
    stack.env.pop("EDGESAM_LEDGER", None)
    stack.work_dir = stack.root / "runs"
    try:
        server, server_log = stack.start([str(Path(sys.executable).parent / "prefect"), "server", "start",
                                          "--host", "127.0.0.1", "--port", str(stack.port)], "server")
        if os.environ.get("EDGESAM_SMOKE_WORK_DIR"):
            shutil.copytree(os.environ["EDGESAM_SMOKE_WORK_DIR"], stack.work_dir)
        else:
            smoke = subprocess.run([sys.executable, "-m", "pipelines", "all", "--profile", "smoke", "--work-dir",
                                    str(stack.work_dir)], cwd=REPO, env=stack.env, capture_output=True, text=True,
                                   timeout=900)
            assert smoke.returncode == 0, smoke.stderr[-3000:]
        wait_for(stack.healthy, 180, "prefect server", server, server_log)
        yield stack
    finally:
        for proc in stack.procs:
            stop(proc)


def night(stack, cwd: Path = REPO) -> dict:
    """One nightly run, as `python -m flows.nightly` (a process of its own, as a deployment runs it)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.nightly", "--profile", "smoke", "--work-dir",
                           str(stack.work_dir)], cwd=cwd, env=stack.env, capture_output=True, text=True, timeout=600)
    print(f"\nnight: rc {done.returncode}, {time.monotonic() - start:.1f}s wall")
    return {"rc": done.returncode, "output": done.stdout + done.stderr}


def latest_artifact(stack, key: str):
    found = stack.client(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))))
    return max(found, key=lambda a: a.created)


def student(stack, stage: str) -> Path:
    (path,) = (stack.work_dir / stage).glob("*/student.pt")
    return path


def comment_edited_checkout(root: Path) -> Path:
    """A copy of the code (not a git checkout) with comment-only edits under edgesam/, the
    evaluation engine's included."""
    copy = root / "edited"
    for part in ("edgesam", "flows", "pipelines"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for module in ("eval/engine.py", "eval/miou.py", "train/__init__.py"):
        path = copy / "edgesam" / module
        if path.exists():
            path.write_text("# a comment-only edit\n" + path.read_text())
    return copy


def test_unchanged_models_are_not_evaluated_again(stack):
    ledger = Ledger(stack.work_dir / "ledger.sqlite")
    with sqlite3.connect(ledger.path) as db:  # the evaluate stage appended every model's results
        stage = db.execute("SELECT DISTINCT model_name, protocol_name FROM evaluations "
                           "WHERE eval_code LIKE 'evaluate-stage:%'").fetchall()
    models = ("encoder_kd", "prompt_kd", "prompt_kd+rpn:official", "prompt_kd+rpn:weighted", "teacher")
    assert sorted(stage) == [(m, p) for m in models for p in ("paper", "sam")]
    # On the smoke profile the phase-1 student is the better one (tests/data/smoke_metrics.json).
    Registry(ledger.path).register(student(stack, "encoder_kd"), "phase1", ("champion",))
    first = night(stack)
    assert first["rc"] == 0, first["output"][-3000:]
    assert "evaluated phase1 v1; 0 of 1 results from the ledger" in first["output"]

    second = night(stack, cwd=comment_edited_checkout(stack.root))
    assert second["rc"] == 0, second["output"][-3000:]
    assert "evaluated nothing; 1 of 1 results from the ledger" in second["output"]
    assert "phase1 v1: in the ledger (evaluation" in second["output"]
    nights = ledger.nights()
    assert [(n["evaluated"], n["reused"]) for n in nights] == [(0, 1), (1, 0)]
    assert nights[0]["git_commit"] == "" and nights[1]["git_commit"]  # the second night ran the edited copy
    history = json.loads(latest_artifact(stack, "edgesam-nightly-history").data)
    assert [(row["model"], row["evaluated"]) for row in history] == [("phase1 v1", "new"), ("phase1 v1", "reused")]
    assert history[0]["sa1b box"] == history[1]["sa1b box"]


class Hook(http.server.BaseHTTPRequestHandler):
    """The notification's receiver: appends each POST body to `Hook.file`."""

    file: Path

    def do_POST(self) -> None:  # the http.server API's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(self.file, "ab") as f:
            f.write(body + b"\n")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        """No request log on stderr (the http.server default)."""


def test_a_worse_candidate_fails_the_night_and_alerts(stack):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import create_regression_automation

    Hook.file = stack.root / "notifications.jsonl"
    receiver = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        with temporary_settings({PREFECT_API_URL: stack.api}):
            CustomWebhookNotificationBlock(name="edgesam-test", url=f"http://127.0.0.1:{receiver.server_port}/",
                                           json_data={"text": "{{subject}}\n{{body}}"},
                                           allow_private_urls=True).save("edgesam-test", overwrite=True)
            create_regression_automation("custom-webhook/edgesam-test")
        ledger = Ledger(stack.work_dir / "ledger.sqlite")
        Registry(ledger.path).register(student(stack, "prompt_kd"), "phase2", ("candidate",))
        run = night(stack)
        assert run["rc"] != 0 and "RegressionError" in run["output"], run["output"][-3000:]
        assert "evaluated phase2 v1; 1 of 2 results from the ledger" in run["output"]

        gate = latest_artifact(stack, "edgesam-nightly-gate").data
        row = next(line for line in gate.splitlines() if "candidate vs champion" in line and "box" in line)
        assert "| phase2 v1 | phase1 v1 | sa1b box mIoU |" in row and "**regressed**" in row and " [-0." in row

        payloads, events = {}, []
        regressed = EventFilter(event=EventNameFilter(name=[REGRESSED]))
        for _ in range(90):  # events reach the server's store, and the notification its receiver, asynchronously
            events = stack.client(lambda c: c.read_events(regressed, limit=50)).events  # the server's maximum
            payloads = {e.payload["metric"]: e.payload for e in events}
            if "sa1b box mIoU" in payloads and Hook.file.exists():
                break
            time.sleep(1)
        box = payloads["sa1b box mIoU"]
        assert box["model"] == "phase2 v1" and box["baseline"] == "phase1 v1"
        low, high = box["interval"]
        assert low <= box["delta"] <= high < -box["tolerance"]
        assert {e.resource.id for e in events} == {"edgesam.model.phase2"}
        sent = Hook.file.read_text()
        assert "phase2 v1 regressed on sa1b" in sent, sent
    finally:
        receiver.shutdown()
