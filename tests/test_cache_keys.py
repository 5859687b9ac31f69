"""Cache keys tell the truth: every setting that changes an artifact's result changes exactly the
fingerprints of the stages that depend on it, and settings that cannot (parallelism, logging,
where Ray runs) change none."""

from __future__ import annotations

import os

import pytest

from edgesam.config import STAGES, load_profile
from pipelines.stage import downstream_closure, plan

AFTER_TEACHER = downstream_closure(["teacher"])


def fingerprints(overrides: dict) -> dict[str, str]:
    return {name: p.fingerprint for name, p in plan(load_profile("smoke", overrides)).items()}


def changed(base: dict, overrides: dict) -> set[str]:
    a, b = fingerprints(base), fingerprints(overrides)
    return {name for name in STAGES if a[name] != b[name]}


def merge(*dicts: dict) -> dict:
    from edgesam.config import deep_merge

    out: dict = {}
    for d in dicts:
        out = deep_merge(out, d)
    return out


@pytest.mark.parametrize("setting, expected", [
    ({"runtime": {"seed": 1}}, AFTER_TEACHER),  # the synthetic teacher trains, then every later stage
    ({"runtime": {"num_workers": 2}}, AFTER_TEACHER),  # the global batch and the scaled lr
    ({"runtime": {"use_gpu": True}}, AFTER_TEACHER),  # bf16 autocast in training and embedding
    ({"encoder_kd": {"train": {"amp": False}}}, set()),  # autocast is off on CPUs anyway
    ({"runtime": {"ray_address": "127.0.0.1:6379", "cpus_per_worker": 3, "object_store_mb": 64,
                  "storage_path": "/shared/ckpt", "max_failures": 2}}, set()),
    ({"encoder_kd": {"train": {"log_every": 1, "checkpoint_every": 1}}, "shard": {"workers": 8},
      "embed": {"concurrency": 4, "cpus_per_actor": 2}}, set()),
    ({"evaluate": {"refine_iters": 2}}, {"evaluate", "export"}),
    ({"encoder_kd": {"train": {"loader_workers": 2}}}, downstream_closure(["encoder_kd"])),
])
def test_settings_change_exactly_the_dependent_stages(setting, expected, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = {"runtime": {"use_gpu": False}, "teacher": {"kind": "synthetic"}}  # a teacher trained here
    assert changed(base, merge(base, setting)) == expected


def test_external_inputs_are_keyed_by_their_content(tmp_path, monkeypatch):
    sa1b = tmp_path / "sa1b"
    sa1b.mkdir()
    (sa1b / "sa_000000.tar").write_bytes(b"tar bytes")
    teacher = tmp_path / "sam_b.pth"
    teacher.write_bytes(b"weights")
    init = tmp_path / "edge_sam.pth"
    init.write_bytes(b"student")
    base = {"runtime": {"use_gpu": False}, "data": {"sa1b_path": str(sa1b)},
            "teacher": {"kind": "vit_b", "checkpoint": str(teacher)}, "encoder_kd": {"init": str(init)}}
    before = fingerprints(base)

    def touched(path, what: bytes) -> set[str]:
        path.write_bytes(what)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        after = fingerprints(base)
        return {name for name in STAGES if after[name] != before[name]}

    assert touched(init, b"student v2") == downstream_closure(["encoder_kd"])
    before = fingerprints(base)
    assert touched(teacher, b"weights v2") == AFTER_TEACHER
    before = fingerprints(base)
    (sa1b / "sa_000001.tar").write_bytes(b"a new tar")
    assert {n for n, f in fingerprints(base).items() if f != before[n]} == set(STAGES)
    before = fingerprints(base)
    assert touched(sa1b / "sa_000000.tar", b"tar bytes, changed") == set(STAGES)
    assert fingerprints(base) == fingerprints(base)  # nothing else moves the key


def test_embedding_precision_counts_on_gpus_only():
    gpu = {"runtime": {"use_gpu": True}}
    assert changed(gpu, merge(gpu, {"embed": {"dtype": "float16"}})) == downstream_closure(["embed"])
    cpu = {"runtime": {"use_gpu": False}}
    assert changed(cpu, merge(cpu, {"embed": {"dtype": "float16"}})) == set()
