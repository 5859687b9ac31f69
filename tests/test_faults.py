"""Faults injected into real smoke runs of `python -m pipelines` (minutes: their own CI step,
`scripts/test.sh -m faults`): two runs started together on one fresh work dir, a moved and a
copied work dir, and a truncated shard tar named at the next run that reads it and repaired by
the `--force` the error names, each compared with a clean single run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgesam.artifacts import ArtifactStore
from edgesam.config import STAGES
from edgesam.store.verify import verify_store

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[1]
# Files whose bytes hold wall-clock times (latencies, TensorBoard event stamps): compared by
# their accuracy figures instead.
TIMED = ("tensorboard/", "metrics.json", "report.md", "config.json", "MODEL_CARD.md", "speed.json", "speed_vs_miou.png")


def pipelines(work_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGESAM_DIGEST_CACHE": str(work_dir.parent / "digests.json")}
    return subprocess.Popen([sys.executable, "-m", "pipelines", *args, "--profile", "smoke", "--work-dir", str(work_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=1500)
    return process.returncode, out


def results(work_dir: Path) -> dict[str, str]:
    """{stage/file: sha256} of every committed result file that holds no wall-clock time."""
    out = {}
    for manifest in sorted(work_dir.glob("*/*/manifest.json")):
        body = json.loads(manifest.read_text())
        for name, entry in body.get("files", {}).items():
            if not any(name.startswith(t) or name.endswith(t) for t in TIMED):
                out[f"{body['stage']}/{name}"] = entry["sha256"]
    return out


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("clean") / "runs"
    code, out = finish(pipelines(work_dir, "all"))
    assert code == 0, out
    return work_dir


def test_two_runs_at_once_compute_each_stage_once(clean_run, tmp_path):
    work_dir = tmp_path / "runs"
    first, second = pipelines(work_dir, "all"), pipelines(work_dir, "all")
    (code_a, out_a), (code_b, out_b) = finish(first), finish(second)
    assert code_a == 0 and code_b == 0, out_a + out_b
    for stage in STAGES:
        assert (out_a + out_b).count(f"stage {stage}: running ->") == 1, stage
    assert "waiting for it" in out_a + out_b
    assert verify_store(ArtifactStore(work_dir)) == []
    assert results(work_dir) == results(clean_run)


def test_moved_and_copied_work_dirs_rerun_cached_on_their_own_data(clean_run, tmp_path):
    copied, moved = tmp_path / "copied", tmp_path / "moved"
    shutil.copytree(clean_run, copied)
    shutil.copytree(clean_run, tmp_path / "original")
    (tmp_path / "original").rename(moved)
    for work_dir in (copied, moved):
        code, out = finish(pipelines(work_dir, "all"))
        assert code == 0, out
        assert [line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in STAGES
                and len(line.split()) == 3] == ["cached"] * len(STAGES), out
        data = next(work_dir.glob("data/*/manifest.json")).read_text()
        assert str(clean_run) not in data


def test_a_truncated_shard_is_named_and_repaired_by_the_force_it_names(clean_run, tmp_path):
    work_dir = tmp_path / "runs"
    shutil.copytree(clean_run, work_dir)
    shard = sorted(work_dir.glob("shard/*/train/*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, out = finish(pipelines(work_dir, "embed", "--force"))
    assert code == 1 and str(shard) in out and "python -m pipelines shard --force" in out, out
    code, out = finish(pipelines(work_dir, "shard", "--force"))
    assert code == 0, out
    code, out = finish(pipelines(work_dir, "all"))
    assert code == 0, out
    assert results(work_dir) == results(clean_run)
