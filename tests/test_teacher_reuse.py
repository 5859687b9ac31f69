"""The stored teacher evaluation (`edgesam.eval.teacher_reuse`) is an artifact like a stage's:
its manifest records every file's size and SHA-256, `verify` reads it, and a damaged file is
found before any reuse."""

from __future__ import annotations

import numpy as np

from edgesam.artifacts import ArtifactStore
from edgesam.eval.teacher_reuse import STORE_NAME, TeacherResults, _damage, _save
from edgesam.store.verify import verify_store


def test_stored_teacher_results_are_verified_like_a_stage(tmp_path):
    store = ArtifactStore(tmp_path)
    artifact = store.artifact(STORE_NAME, "0123456789abcdef")
    _save(TeacherResults({"paper": []}, [np.ones((4, 4), bool)], {"ms": 1.0}), artifact)
    assert artifact.complete and _damage(artifact) == [] and verify_store(store) == []

    speed = artifact.path / "speed.json"
    speed.write_text(speed.read_text().replace("1.0", "2.0"))  # same size, other bytes
    (problem,) = _damage(artifact)
    assert str(speed) in problem and "sha256" in problem
    assert verify_store(store) == [problem]
