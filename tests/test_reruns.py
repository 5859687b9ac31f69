"""Reruns you can trust, on a fake stage registry (seconds): per-stage code versions, force
from scratch, stale downstream, verified reads, one writer per artifact, portable work dirs,
content identities of external inputs and validation before work (exit code 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

import pipelines.stage
from edgesam.artifacts import ArtifactStore, clear_partial_writes
from edgesam.config import STAGES, DataConfig, cache_view, load_profile
from edgesam.store.code import module_digests
from edgesam.store.external import DigestCache, content_identity
from edgesam.store.files import DamagedArtifactError
from edgesam.store.lock import artifact_lock
from edgesam.store.verify import verify_store
from pipelines.cli import main as pipelines_main
from pipelines.stage import run_dag, status

REPO = Path(__file__).resolve().parents[1]
DAG = {
    "data": (), "shard": ("data",), "teacher": ("shard",), "embed": ("shard", "teacher"),
    "encoder_kd": ("embed", "teacher"), "prompt_kd": ("embed", "teacher", "encoder_kd"),
    "rpn": ("data", "prompt_kd"), "evaluate": ("data", "shard", "teacher", "encoder_kd", "prompt_kd", "rpn"),
    "export": ("shard", "prompt_kd", "rpn", "evaluate"),
}


# -- code versions ------------------------------------------------------------------------

@pytest.fixture
def source_copy(tmp_path):
    """A copy of edgesam/ and pipelines/ to edit."""
    for package in ("edgesam", "pipelines"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(root: Path) -> dict[str, dict[str, str]]:
    return {s: module_digests(f"pipelines.{s}", root) for s in STAGES}


def changed(before: dict, after: dict) -> set[str]:
    return {s for s in STAGES if before[s] != after[s]}


def test_comments_and_docstrings_change_no_code_version(source_copy):
    before = versions(source_copy)
    for path in (source_copy / "edgesam").rglob("*.py"):
        text = path.read_text().replace('"""', '"""Edited. ', 1)  # the module's (or first) docstring
        path.write_text("# a new comment\n" + text.replace("\n\n\ndef ", "\n\n\n# spacing\ndef ", 1))
    assert changed(before, versions(source_copy)) == set()


def test_an_edit_rekeys_exactly_the_stages_that_import_it(source_copy):
    before = versions(source_copy)
    with open(source_copy / "edgesam" / "train" / "schedule.py", "a") as f:
        f.write("\nEDITED = 1\n")
    assert changed(before, versions(source_copy)) == {"teacher", "encoder_kd", "prompt_kd", "rpn"}
    with open(source_copy / "edgesam" / "cli.py", "a") as f:
        f.write("\nEDITED = 1\n")
    assert changed(before, versions(source_copy)) == {"teacher", "encoder_kd", "prompt_kd", "rpn"}


# -- the runner on fake stages -------------------------------------------------------------

class FakeStages:
    """Stage modules that write `result.json` (a fresh token each run) and count their runs."""

    def __init__(self):
        self.runs: dict[str, int] = {}
        self.modules = {}
        for name, upstream in DAG.items():
            module = types.ModuleType(f"fake_{name}")
            module.STAGE, module.UPSTREAM, module.run = name, upstream, self._runner(name)
            self.modules[name] = module

    def _runner(self, name):
        def run(cfg, runtime, inputs, out):
            self.runs[name] = self.runs.get(name, 0) + 1
            assert not (out / "leftover.txt").exists(), "a forced stage saw an earlier attempt's files"
            (out / "result.json").write_text(json.dumps({"token": uuid.uuid4().hex}))
            (out / "leftover.txt").write_text("partial files of this attempt")
            return {"result": str(out / "result.json")}
        return run


@pytest.fixture
def fake(monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(pipelines.stage, "stage_module", stages.modules.__getitem__)
    monkeypatch.setattr(pipelines.stage, "module_digests", lambda module: {module: "fake"})
    return stages


@pytest.fixture
def cfg(tmp_path):
    return load_profile("smoke", {"runtime": {"work_dir": str(tmp_path / "runs"), "use_gpu": False}})


def test_force_recomputes_from_scratch_and_downstream_follows(fake, cfg):
    first = run_dag(cfg)
    assert all(fake.runs[s] == 1 for s in STAGES)
    prompt_kd = first["prompt_kd"][0]
    (prompt_kd.path / ".ray_train").mkdir()  # a finished training run that must not be resumed
    run_dag(cfg, stages=["prompt_kd"], force=["prompt_kd"])
    assert fake.runs["prompt_kd"] == 2 and not (prompt_kd.path / ".ray_train").exists()
    replaced = list((prompt_kd.path.parent / ".replaced").iterdir())
    assert len(replaced) == 1 and (replaced[0] / ".ray_train").is_dir()
    rows = {r["stage"]: r for r in status(cfg, ArtifactStore(cfg.runtime.work_dir))}
    assert [s for s in STAGES if rows[s]["status"] != "cached"] == ["rpn", "evaluate", "export"]
    assert "upstream prompt_kd has other content" in rows["rpn"]["why"]
    run_dag(cfg)  # a stale artifact is recomputed, never served
    assert [s for s in STAGES if fake.runs[s] == 2] == ["prompt_kd", "rpn", "evaluate", "export"]
    run_dag(cfg, force=STAGES)
    assert all(fake.runs[s] >= 2 for s in STAGES) and fake.runs["data"] == 2


@pytest.mark.parametrize("damage", ["truncate", "zeros", "delete"])
def test_damaged_input_is_named_and_its_force_repairs_it(fake, cfg, damage):
    results = run_dag(cfg)
    result = results["embed"][0].path / "result.json"
    if damage == "truncate":
        result.write_bytes(result.read_bytes()[:10])
    elif damage == "zeros":
        result.write_bytes(b"\0" * result.stat().st_size)
    else:
        result.unlink()
    with pytest.raises(DamagedArtifactError) as error:
        run_dag(cfg, stages=["encoder_kd"], force=["encoder_kd"])
    message = str(error.value)
    assert str(result) in message and "python -m pipelines embed --force" in message
    if damage == "zeros":
        assert "sha256" in message
    run_dag(cfg, stages=["embed"], force=["embed"])
    run_dag(cfg)
    assert verify_store(ArtifactStore(cfg.runtime.work_dir)) == []


def test_plan_says_why_a_stage_will_run(fake, cfg):
    store = ArtifactStore(cfg.runtime.work_dir)
    assert {r["status"] for r in status(cfg, store)} == {"will run"}
    run_dag(cfg)
    assert {r["status"] for r in status(cfg, store)} == {"cached"}
    edited = cfg.model_copy(update={"encoder_kd": cfg.encoder_kd.model_copy(update={"backbone": "resnet18"})})
    rows = {r["stage"]: r for r in status(edited, store)}
    assert [s for s in STAGES if rows[s]["status"] == "will run"] == ["encoder_kd", "prompt_kd", "rpn", "evaluate",
                                                                      "export"]
    assert "config section.backbone" in rows["encoder_kd"]["why"] and "repvit_m1" in rows["encoder_kd"]["why"]
    assert "upstream encoder_kd" in rows["prompt_kd"]["why"]


def test_a_second_writer_waits_for_the_lock_then_finds_the_artifact(tmp_path):
    folder, order = tmp_path / "stage" / "abc", []
    holding = threading.Event()

    def first():
        with artifact_lock(folder, "first"):
            holding.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    with artifact_lock(folder, "second"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_only_temporary_files_of_dead_writers_are_cleared(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        mine = tmp_path / f".shard.tmp-{live.pid}-abcdef01.tar"
        orphan = tmp_path / f".shard.tmp-{dead.stdout.strip()}-abcdef02.tar"
        mine.write_bytes(b"being written")
        orphan.write_bytes(b"left by a killed run")
        clear_partial_writes(tmp_path)
        assert mine.exists() and not orphan.exists()
    finally:
        live.kill()


def test_moved_and_copied_work_dirs_read_their_own_files(fake, cfg, tmp_path):
    run_dag(cfg)
    root = Path(cfg.runtime.work_dir)
    text = (root / "data").glob("*/manifest.json").__next__().read_text()
    assert str(root) not in text and "${work_dir}/data/" in text
    moved, copied = tmp_path / "moved", tmp_path / "copied"
    shutil.copytree(root, copied)
    root.rename(moved)
    for where in (moved, copied):
        other = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"work_dir": where})})
        results = run_dag(other)
        assert all(cached for _, cached in results.values())
        assert results["embed"][0].manifest["result"].startswith(str(where))


def test_external_inputs_are_keyed_by_content_not_place(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESAM_DIGEST_CACHE", str(tmp_path / "digests.json"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sa_1.tar").write_bytes(b"tar bytes")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.utime(tmp_path / "b" / "sa_1.tar", (1, 1))
    keys = [cache_view(DataConfig(sa1b_path=tmp_path / d)) for d in ("a", "b")]
    assert keys[0] == keys[1] and "content" in keys[0]["sa1b_path"]
    (tmp_path / "b" / "sa_1.tar").write_bytes(b"other bytes")
    assert cache_view(DataConfig(sa1b_path=tmp_path / "b")) != keys[0]
    cache = DigestCache()
    assert len(cache.entries) == 3  # a/, b/ before and after the edit: each hashed once
    content_identity(tmp_path / "a", cache)
    assert not cache.added  # a second run hashes nothing


@pytest.mark.parametrize("setting, key", [
    ("data.coco_train=/no/such.json", "data.coco_train"),
    ("encoder_kd.batch_size=many", "encoder_kd.batch_size"),
    ("data.sa1b_path=/no/such/dir", "data.sa1b_path"),
    ("teacher.kind=vit_h", "teacher.checkpoint"),
    ("data.coco_images=.", "data.coco_images"),  # an existing path the generated benchmark would ignore
    ("encoder_kd.backbone=repvit_m9", "encoder_kd.backbone"),  # timm has no such model
    ("encoder_kd.backbone=vit_tiny_patch16_224", "encoder_kd.backbone"),  # one stride-16 map, no 8 or 32
])
def test_config_mistakes_exit_2_before_any_stage(tmp_path, capsys, setting, key):
    with pytest.raises(SystemExit) as exit_:
        pipelines_main(["all", "--profile", "smoke", "--work-dir", str(tmp_path), "--set", setting])
    assert exit_.value.code == 2 and key.split(".")[-1] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
