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


def test_torch_files_have_the_same_bytes_whoever_writes_them(tmp_path):
    """The same state saved twice (two temp names, as two processes would) gives identical
    bytes: results compare by SHA-256, and torch names a zip's records after a file path."""
    import hashlib
    import zipfile

    import torch

    from edgesam.artifacts import atomic_torch_save

    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    first, second = tmp_path / "a" / "rpn.pt", tmp_path / "b" / "rpn.pt"
    atomic_torch_save(state, first)
    atomic_torch_save(state, second)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)}
    assert len(digests) == 1
    assert all(name.startswith("archive/") for name in zipfile.ZipFile(first).namelist())
    assert torch.equal(torch.load(first, weights_only=True)["weight"], state["weight"])
