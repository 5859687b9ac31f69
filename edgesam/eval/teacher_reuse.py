"""The teacher's evaluation, computed once and reused by every student's evaluate run.

The teacher's IoUs depend on the teacher, the val data, the evaluate settings and the seed, not
on the student: the engine draws every click from (seed, image, protocol), the same for every
model (`edgesam.eval.miou.evaluate`). So a sweep over N backbones, or a re-evaluation of a
retrained student, evaluates and times the teacher once. The result is kept in the artifact
store as `evaluate_teacher/<fingerprint>` (fingerprint of those inputs and of this module's
code), written like a stage artifact: files first, the manifest (their sizes and SHA-256s, as
every stage's) last; a reuse checks them, and damaged files are recomputed, never served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from edgesam.artifacts import Artifact, ArtifactStore, atomic_path, fingerprint, write_json_atomic, write_text_atomic
from edgesam.config import EvaluateConfig, cache_view
from edgesam.eval.datasets import EvalItem
from edgesam.eval.engine import EvalProtocol, Segmenter
from edgesam.eval.miou import Overlay, evaluate, records_jsonl
from edgesam.eval.speed import model_speed
from edgesam.metrics import IoURecord
from edgesam.models.teacher import TeacherSource
from edgesam.store.code import code_version, module_digests
from edgesam.store.files import content_digest, file_problems, list_files

STORE_NAME = "evaluate_teacher"
TEACHER = "teacher"
RECORDS_FILE, SPEED_FILE, OVERLAYS_FILE = "ious.jsonl", "speed.json", "overlays.npz"
KEY_INPUTS = ("data", "shard", "teacher")  # the upstream artifacts the teacher's results depend on

log = logging.getLogger("edgesam.eval.teacher_reuse")

# dataset name -> (a factory of its items, how many overlays to draw from it)
EvalSets = Mapping[str, tuple[Callable[[], Iterable[EvalItem]], int]]


@dataclass
class TeacherResults:
    """The teacher's IoU records by protocol, its overlay masks (first dataset) and its speed."""

    records: dict[str, list[IoURecord]]
    overlay_masks: list[np.ndarray]
    speed: dict[str, float]

    def merge_into(self, records: dict[str, list[IoURecord]], overlays: Sequence[Overlay]) -> None:
        """Put the teacher first in the students' `records` and `overlays`, as if evaluated with them."""
        for name in records:
            records[name][:0] = self.records[name]
        for overlay, mask in zip(overlays, self.overlay_masks):
            overlay.masks = {TEACHER: mask, **overlay.masks}


def teacher_artifact(inputs: Mapping[str, Artifact], cfg: EvaluateConfig, seed: int) -> Artifact:
    """Where the teacher's results for these inputs live (committed or not)."""
    key = {"section": cache_view(cfg), "seed": seed}
    upstream = {name: inputs[name].fingerprint for name in KEY_INPUTS}
    fp = fingerprint(STORE_NAME, key, upstream, code_version(module_digests(__name__)))
    return ArtifactStore(inputs["teacher"].root).artifact(STORE_NAME, fp)


def _compute(source: TeacherSource, sets: EvalSets, protocols: Sequence[EvalProtocol], seed: int,
             repeats: int) -> TeacherResults:
    teacher = Segmenter(TEACHER, source.load())
    records: dict[str, list[IoURecord]] = {p.name: [] for p in protocols}
    masks: list[np.ndarray] = []
    for index, (name, (items, overlays)) in enumerate(sets.items()):
        found, shown, _ = evaluate([teacher], items(), name, protocols, seed, overlays=overlays)
        for key in records:
            records[key] += found[key]
        if index == 0:
            masks = [overlay.masks[TEACHER] for overlay in shown]
    return TeacherResults(records, masks, model_speed(teacher.sam, repeats))


def _save(results: TeacherResults, artifact: Artifact) -> None:
    artifact.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(artifact.path / RECORDS_FILE, records_jsonl(results.records))
    write_json_atomic(artifact.path / SPEED_FILE, results.speed)
    with atomic_path(artifact.path / OVERLAYS_FILE) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, *results.overlay_masks)
    files = list_files(artifact.path)
    artifact.commit({"files": files, "content": content_digest(files, artifact.fingerprint), "models": [TEACHER]})


def _load(artifact: Artifact, protocols: Sequence[EvalProtocol]) -> TeacherResults:
    records: dict[str, list[IoURecord]] = {p.name: [] for p in protocols}
    for line in (artifact.path / RECORDS_FILE).read_text().splitlines():
        row: dict[str, Any] = json.loads(line)
        records[row.pop("protocol")].append(IoURecord(**row))
    with np.load(artifact.path / OVERLAYS_FILE) as saved:
        masks = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return TeacherResults(records, masks, json.loads((artifact.path / SPEED_FILE).read_text()))


def _damage(artifact: Artifact) -> list[str]:
    """What is wrong with a committed teacher artifact's files (an older manifest lists no digests)."""
    files = artifact.manifest.get("files")
    if not isinstance(files, dict):
        return [f"{artifact.manifest_path}: records no file digests"]
    return file_problems(artifact.path, files, digests=True)


def teacher_results(inputs: Mapping[str, Artifact], cfg: EvaluateConfig, seed: int, sets: EvalSets,
                    protocols: Sequence[EvalProtocol]) -> TeacherResults:
    """The teacher's results on `sets` under `protocols`: from the store when another evaluate run
    with the same inputs made them, else computed (and timed) now and stored."""
    artifact = teacher_artifact(inputs, cfg, seed)
    damaged = artifact.complete and _damage(artifact)
    if artifact.complete and not damaged:
        log.info("teacher: evaluated before, reusing %s", artifact.path)
        return _load(artifact, protocols)
    if damaged:
        log.warning("teacher: stored results damaged (%s), evaluating again", "; ".join(damaged))
    log.info("teacher: evaluating on %s (%s)", ", ".join(sets), ", ".join(p.name for p in protocols))
    results = _compute(TeacherSource.from_artifact(inputs["teacher"]), sets, protocols, seed, cfg.speed_repeats)
    _save(results, artifact)
    return results

