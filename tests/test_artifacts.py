"""The artifact store resolves its root: stage workers (Ray's) run in another directory."""

from __future__ import annotations

import os

from edgesam.artifacts import ArtifactStore


def test_relative_root_is_resolved_at_creation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("runs/default")
    os.chdir("/")
    assert store.root == tmp_path / "runs" / "default"
    assert store.artifact("shard", "abc").path == tmp_path / "runs" / "default" / "shard" / "abc"
