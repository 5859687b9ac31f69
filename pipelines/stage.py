"""The stage registry and the cached, resumable stage runner (no Prefect here).

Every stage module in `pipelines/` defines

    STAGE: str                      # its name, one of edgesam.config.STAGES
    UPSTREAM: tuple[str, ...]       # the stages whose artifacts it reads
    def run(cfg, runtime, inputs, out) -> dict
    def runtime_key(cfg, runtime) -> dict    # optional: the runtime settings its result depends on

where `cfg` is its own section of `PipelineConfig` (named as the stage), `runtime` the shared `RuntimeConfig`,
`inputs` the committed upstream artifacts by stage name, and `out` the artifact directory to
fill. The fingerprint hashes the section (`cache_view`: without the fields that cannot change
the result, with external files identified by size and mtime), `runtime_key`, the upstream
fingerprints and the code version. `run` returns the
manifest body; the runner commits it last. `out` may hold a previous interrupted
attempt's partial files (checkpoints, finished shards), which `run` may resume from.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Iterable

from edgesam.artifacts import Artifact, ArtifactStore, clear_partial_writes, code_version, fingerprint
from edgesam.config import STAGES, PipelineConfig, cache_view
from edgesam.cluster import resolve_device
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


def plan(cfg: PipelineConfig) -> dict[str, PlannedStage]:
    """Fingerprint every stage from the config (its device decided: `resolve_device`), in DAG order."""
    runtime = resolve_device(cfg.runtime)
    planned: dict[str, PlannedStage] = {}
    for name in STAGES:
        module = stage_module(name)
        section = getattr(cfg, name)
        upstream = {u: planned[u].fingerprint for u in module.UPSTREAM}
        key = {"section": cache_view(section), "runtime": getattr(module, "runtime_key", lambda c, r: {})(section, runtime)}
        planned[name] = PlannedStage(name, fingerprint(name, key, upstream, code_version(module.__file__)), upstream)
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


def run_stage(
    name: str, cfg: PipelineConfig, store: ArtifactStore, *, force: bool = False, planned: PlannedStage | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[Artifact, bool]:
    """Run one stage (or take it from the cache). Returns (artifact, was_cached).

    `planned` is the stage's entry of a `plan(cfg)` made at the start of a run (default: plan
    now), so that every stage of one run agrees on the fingerprints even if source files
    are edited while it runs. `on_progress(step, total, record)` is called, on this process,
    for every logged step of the stage's training (`edgesam.train.fit`), if it trains.
    """
    planned = planned or plan(cfg)[name]
    artifact = store.artifact(name, planned.fingerprint)
    if artifact.complete and not force:
        log.info("stage %s: cached (%s)", name, artifact.path)
        return artifact, True
    inputs: dict[str, Artifact] = {}
    for up, fp in planned.upstream.items():
        upstream_artifact = store.artifact(up, fp)
        if not upstream_artifact.complete:
            raise MissingUpstreamError(
                f"stage {name!r} needs the {up!r} artifact {upstream_artifact.path}, which is not committed; "
                f"run stage {up!r} first (or the whole flow)"
            )
        inputs[up] = upstream_artifact
    if artifact.complete:  # forced: uncommit before recomputing
        artifact.manifest_path.unlink()
    artifact.path.mkdir(parents=True, exist_ok=True)
    clear_partial_writes(artifact.path)
    log.info("stage %s: running -> %s", name, artifact.path)
    start = time.perf_counter()
    module = stage_module(name)
    with reporting_progress(on_progress):
        body = module.run(getattr(cfg, name), cfg.runtime, inputs, artifact.path)
    elapsed = time.perf_counter() - start
    artifact.commit({
        **body,
        "config": getattr(cfg, name).model_dump(mode="json"),
        "upstream": planned.upstream,
        "seconds": round(elapsed, 2),
    })
    log.info("stage %s: done in %.1fs", name, elapsed)
    return artifact, False


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
