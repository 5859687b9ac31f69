"""The stage registry and the cached, resumable stage runner (no Prefect here).

Every stage module in `pipelines/` defines

    STAGE: str                      # its name, one of edgesam.config.STAGES
    UPSTREAM: tuple[str, ...]       # the stages whose artifacts it reads
    def run(cfg, runtime, inputs, out) -> dict
    def runtime_key(cfg, runtime) -> dict    # optional: the runtime settings its result depends on

where `cfg` is its own section of `PipelineConfig` (named as the stage), `runtime` the shared
`RuntimeConfig`, `inputs` the committed upstream artifacts by stage name, and `out` the
artifact directory to fill. The fingerprint hashes the section (`cache_view`: without the
fields that cannot change the result, external files by content), `runtime_key`, the upstream
fingerprints and the stage's code version (`edgesam.store.code`). `run` returns the manifest
body; the runner adds the file list, the upstreams' content digests and what `plan` needs to
say why, and commits it last. `out` may hold a previous interrupted attempt's partial files
(checkpoints, finished shards), which `run` may resume from; a forced stage never sees them.
One process writes an artifact at a time (`edgesam.store.lock`).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

from edgesam.artifacts import Artifact, ArtifactStore, clear_partial_writes, fingerprint
from edgesam.cluster import resolve_device
from edgesam.config import STAGES, PipelineConfig, RuntimeConfig, cache_view
from edgesam.models.backbones import BackboneCheck, require_student
from edgesam.store.code import code_version, environment, module_digests
from edgesam.store.explain import nearest_committed, reasons
from edgesam.store.files import content_digest, list_files
from edgesam.store.lock import artifact_lock
from edgesam.store.replace import move_aside
from edgesam.store.verify import stale_reason, verify_inputs
from edgesam.train.progress import ProgressCallback, reporting_progress

log = logging.getLogger("edgesam.pipelines")

class MissingUpstreamError(RuntimeError):
    """A stage was asked to run but an upstream artifact it needs is not committed."""


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"pipelines.{name}")


@dataclass(frozen=True)
class PlannedStage:
    name: str
    fingerprint: str
    upstream: dict[str, str]  # upstream stage -> fingerprint
    key: dict[str, Any]  # the config section and runtime settings the fingerprint hashes
    code: dict[str, str]  # module -> digest of its code, over the stage's import closure


def plan(cfg: PipelineConfig) -> dict[str, PlannedStage]:
    """Fingerprint every stage from the config (its device decided: `resolve_device`), in DAG order."""
    runtime = resolve_device(cfg.runtime)
    planned: dict[str, PlannedStage] = {}
    for name in STAGES:
        module = stage_module(name)
        section = getattr(cfg, name)
        upstream = {u: planned[u].fingerprint for u in module.UPSTREAM}
        key = {"section": cache_view(section), "runtime": getattr(module, "runtime_key", lambda c, r: {})(section, runtime)}
        code = module_digests(module.__name__)
        fp = fingerprint(name, key, upstream, code_version(code))
        planned[name] = PlannedStage(name, fp, upstream, key, code)
    return planned


def downstream_closure(stages: Iterable[str]) -> set[str]:
    """The given stages and every stage that (transitively) reads them."""
    closed = set(stages)
    for name in STAGES:
        if set(stage_module(name).UPSTREAM) & closed:
            closed.add(name)
    return closed


def select(stages: Iterable[str] | None = None, force: Iterable[str] = ()) -> tuple[list[str], set[str]]:
    """(the selected stages in DAG order, those of them to recompute: `force` and downstream)."""
    selected = list(STAGES) if stages is None else [s for s in STAGES if s in set(stages)]
    return selected, downstream_closure(force) & set(selected)


def check_upstream(selected: list[str], store: ArtifactStore, planned: dict[str, PlannedStage]) -> None:
    """Fail before running anything when a selected stage's upstream is neither selected nor committed."""
    missing = [
        f"{name} needs {up} ({store.artifact(up, fp).path})"
        for name in selected
        for up, fp in planned[name].upstream.items()
        if up not in selected and not store.artifact(up, fp).complete
    ]
    if missing:
        raise MissingUpstreamError(
            "upstream artifacts are not committed: " + "; ".join(missing)
            + ". Add those stages to `stages`, or run the whole flow."
        )



def committed_inputs(name: str, planned: PlannedStage, store: ArtifactStore) -> dict[str, Artifact]:
    inputs = {up: store.artifact(up, fp) for up, fp in planned.upstream.items()}
    for up, artifact in inputs.items():
        if not artifact.complete:
            raise MissingUpstreamError(f"stage {name!r} needs the {up!r} artifact {artifact.path}, which is not "
                                       f"committed; run stage {up!r} first (or the whole flow)")
    return inputs


def _training_run(artifact: Artifact, runtime: RuntimeConfig) -> str | None:
    from edgesam.train import run_location

    return run_location(artifact.path, runtime.storage_path) if runtime.storage_path else None


def run_stage(
    name: str, cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, planned: PlannedStage | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[Artifact, bool]:
    """Run one stage (or take it from the cache). Returns (artifact, was_cached).

    `planned` is the stage's entry of a `plan(cfg)` made at the start of a run (default: plan
    now), so that every stage of one run agrees on the fingerprints even if source files
    are edited while it runs. `force` recomputes from scratch: the earlier folder and training
    run are moved aside (`edgesam.store.replace`). `on_progress(step, total, record)` is
    called, on this process, for every logged step of the stage's training, if it trains.
    """
    planned = planned or plan(cfg)[name]
    artifact = store.artifact(name, planned.fingerprint)
    inputs = committed_inputs(name, planned, store)
    with artifact_lock(artifact.path, f"stage {name}"):
        why = "forced" if force else stale_reason(artifact, inputs) if artifact.complete else None
        if artifact.complete and why is None:
            log.info("stage %s: cached (%s)", name, artifact.path)
            return artifact, True
        if why is not None:
            log.info("stage %s: recomputing from scratch (%s)", name, why)
            move_aside(artifact.path, _training_run(artifact, cfg.runtime))
        verify_inputs(name, inputs)
        artifact.path.mkdir(parents=True, exist_ok=True)
        clear_partial_writes(artifact.path)
        log.info("stage %s: running -> %s", name, artifact.path)
        start = time.perf_counter()
        with reporting_progress(on_progress):
            body = stage_module(name).run(getattr(cfg, name), cfg.runtime, inputs, artifact.path)
        _commit(artifact, planned, body, inputs, getattr(cfg, name).model_dump(mode="json"), time.perf_counter() - start)
    return artifact, False


def _commit(artifact: Artifact, planned: PlannedStage, body: dict[str, Any], inputs: dict[str, Artifact],
            config: dict[str, Any], seconds: float) -> None:
    start = time.perf_counter()
    files = list_files(artifact.path)
    log.info("stage %s: done in %.1fs; %d files hashed in %.2fs", artifact.stage, seconds, len(files),
             time.perf_counter() - start)
    artifact.commit({
        **body, "config": config, "upstream": planned.upstream, "seconds": round(seconds, 2),
        "key": planned.key, "code": planned.code, "environment": environment(), "files": files,
        "content": content_digest(files, artifact.fingerprint),
        "upstream_content": {up: a.manifest["content"] for up, a in inputs.items()},
    })


def run_dag(
    cfg: PipelineConfig,
    store: ArtifactStore | None = None,
    stages: Iterable[str] | None = None,
    force: Iterable[str] = (),
) -> dict[str, tuple[Artifact, bool]]:
    """Run the DAG (or only `stages`, reading the rest from the cache) without Prefect."""
    store = store or ArtifactStore(cfg.runtime.work_dir)
    cfg = cfg.model_copy(update={"runtime": resolve_device(cfg.runtime)})
    selected, forced = select(stages, force)
    planned = plan(cfg)
    check_upstream(selected, store, planned)
    return {name: run_stage(name, cfg, store, force=name in forced, planned=planned[name]) for name in selected}


def preflight(cfg: PipelineConfig, store: ArtifactStore, selected: Iterable[str], forced: Iterable[str],
              planned: dict[str, PlannedStage]) -> BackboneCheck | None:
    """Check the student backbone (`edgesam.models.backbones`, seconds) before any stage runs when
    this run will build one: encoder_kd selected, not committed (or forced), not started from
    `init`. A backbone that cannot work raises `BackboneCheckError` naming `encoder_kd.backbone`
    here, not hours later inside a Ray worker after data, shard and embed."""
    if "encoder_kd" not in set(selected) or cfg.encoder_kd.init is not None:
        return None
    if "encoder_kd" not in set(forced) and store.artifact("encoder_kd", planned["encoder_kd"].fingerprint).complete:
        return None
    return require_student(cfg.encoder_kd, cfg.shard.target_size)


def status(cfg: PipelineConfig, store: ArtifactStore, forced: Iterable[str] = ()) -> list[dict[str, str]]:
    """`plan`'s table: per stage in DAG order, cached / stale / will run, and why."""
    planned, rows, changing = plan(cfg), [], set(downstream_closure(forced))
    for name, stage in planned.items():
        artifact = store.artifact(name, stage.fingerprint)
        inputs = {up: store.artifact(up, fp) for up, fp in stage.upstream.items()}
        if name in changing or (artifact.complete and changing & set(inputs)):
            state = "will run"
            why = ["forced"] if name in set(forced) else [f"upstream {u} will be recomputed" for u in sorted(changing & set(inputs))]
        elif artifact.complete:
            reason = stale_reason(artifact, inputs) if all(a.complete for a in inputs.values()) else "an upstream is missing"
            state, why = ("stale", [reason]) if reason else ("cached", [])
        else:
            state, why = "will run", reasons(nearest_committed(artifact.path.parent), stage.key, stage.code, stage.upstream)
        if state != "cached":
            changing.add(name)
        rows.append({"stage": name, "status": state, "fingerprint": stage.fingerprint, "why": "; ".join(why)})
    return rows
