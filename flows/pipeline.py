"""The `edgesam` flow: the stage DAG in order, one Prefect task per stage, no ML logic."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed

from edgesam.artifacts import Artifact, ArtifactStore
from edgesam.config import CocoSource, PipelineConfig, RuntimeConfig
from edgesam.cluster import connect_ray, resolve_device
from flows.caching import ManifestCache, retry_on_transient_io
from flows.evaluation import publish_evaluation
from flows.params import Profile, StageName, TeacherKind, pipeline_config
from flows.training import StageProgress, publish_training_curves
from pipelines.stage import PlannedStage, check_upstream, plan, preflight, run_stage, select
from pipelines.stage import status as plan_status

STAGE_LOGGERS = ("edgesam", "pipelines")


@task(
    name="stage",
    task_run_name="{name}",
    cache_policy=ManifestCache(),
    persist_result=True,
    retries=2,
    retry_delay_seconds=15,
    retry_condition_fn=retry_on_transient_io,
)
def stage_task(name: str, cfg: PipelineConfig, planned: PlannedStage, force: bool = False) -> Any:
    """Run stage `name` through `pipelines.stage.run_stage`; a committed artifact ends as "Cached".

    A stage that trains shows its progress as a Prefect progress artifact (`flows.training`).
    """
    artifact, cached = run_stage(name, cfg, ArtifactStore(cfg.runtime.work_dir), force=force, planned=planned,
                                 on_progress=StageProgress(name, cfg.profile))
    result = {"stage": name, "fingerprint": artifact.fingerprint, "path": str(artifact.path)}
    if cached:
        get_run_logger().info("stage %s: cached, committed artifact %s", name, artifact.path)
        return Completed(name="Cached", message=f"committed artifact {artifact.path}", data=result)
    return result


def forward_stage_logs() -> None:
    """Send the stages' own `logging` records (INFO and up) to the Prefect run logs."""
    handlers = logging.getLogger("prefect.extra").handlers
    for name in STAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)


@contextmanager
def ray_connection(runtime: RuntimeConfig) -> Iterator[None]:
    """Join the Ray cluster once for the whole flow run when an address is given.

    Without `runtime.ray_address` or RAY_ADDRESS the stages start a local Ray themselves.
    """
    if not (runtime.ray_address or os.environ.get("RAY_ADDRESS")):
        yield
        return
    import ray

    joined = not ray.is_initialized()
    connect_ray(runtime)
    try:
        yield
    finally:
        if joined:
            ray.shutdown()


def summary_markdown(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# edgesam run, profile `{cfg.profile}`",
        "",
        f"Artifacts under `{cfg.runtime.work_dir}`; backbone `{cfg.encoder_kd.backbone}`, "
        f"teacher `{cfg.teacher.kind}`.",
        "",
        "| stage | status | seconds | fingerprint | artifact |",
        "|---|---|---:|---|---|",
    ]
    lines += [
        f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | `{r['fingerprint']}` | `{r['path']}` |" for r in rows
    ]
    return "\n".join(lines)


@flow(name="edgesam", log_prints=True)
def edgesam(
    profile: Profile = "default",
    sa1b_path: Path | None = None,
    coco_sources: list[CocoSource] | None = None,
    coco_train: Path | None = None,
    coco_val: Path | None = None,
    coco_images: Path | None = None,
    teacher_kind: TeacherKind | None = None,
    teacher_checkpoint: Path | None = None,
    backbone: str | None = None,
    ray_address: str | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    work_dir: Path | None = None,
    stages: list[StageName] | None = None,
    force: list[StageName] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the EdgeSAM DAG: data -> shard -> teacher -> embed -> encoder_kd -> prompt_kd -> rpn
    -> evaluate -> export. Committed artifacts are reused (task state "Cached"). Training stages
    show a progress artifact while they train, and the run publishes their curves; when the run
    includes evaluate, its report and metrics are published as Prefect artifacts.

    Args:
        profile: `smoke` (minutes), `default` (the embedded benchmark, about an hour on 2 CPU
            cores) or `paper` (SA-1B, SAM ViT-H, GPUs).
        sa1b_path: directory of SA-1B `sa_*.tar` files; without it (or coco_sources) the embedded
            benchmark is generated.
        coco_sources: COCO/LVIS instances JSONs + images to distil on (alone or with sa1b_path), e.g.
            `[{"annotations": "a.json", "images": "img/", "split": "train"}]`; split train, val or auto.
        coco_train, coco_val, coco_images: COCO instances JSONs and image directory for the RPN.
        teacher_kind, teacher_checkpoint: `synthetic` (trained here) or a SAM ViT and its checkpoint.
        backbone: the student's timm model name, e.g. `repvit_m1`, `resnet18`, `mobilenetv3_large_100`.
        ray_address: an existing Ray cluster (else RAY_ADDRESS, else a local Ray).
        num_workers, use_gpu: Ray Train workers per training stage and whether they take a GPU.
        work_dir: artifact root (default: the profile's `runs/<profile>`).
        stages: run only these; the others must already be committed (taken from the cache).
        force: recompute these stages and everything downstream of them.
        overrides: any other setting, nested by section, e.g. `{"prompt_kd": {"decode_iters": 3}}`;
            the named parameters above take precedence.
    """
    logger = get_run_logger()
    forward_stage_logs()
    cfg = pipeline_config(
        profile, overrides, sa1b_path=sa1b_path, coco_sources=coco_sources, coco_train=coco_train,
        coco_val=coco_val, coco_images=coco_images, teacher_kind=teacher_kind,
        teacher_checkpoint=teacher_checkpoint, backbone=backbone, ray_address=ray_address,
        num_workers=num_workers, use_gpu=use_gpu, work_dir=work_dir,
    )
    selected, forced = select(stages, force or ())
    rows: list[dict[str, Any]] = []
    with ray_connection(cfg.runtime):
        cfg = cfg.model_copy(update={"runtime": resolve_device(cfg.runtime)})  # GPUs or not, once
        planned = plan(cfg)  # once: every stage of this run agrees on the fingerprints
        check_upstream(selected, ArtifactStore(cfg.runtime.work_dir), planned)
        check = preflight(cfg, ArtifactStore(cfg.runtime.work_dir), selected, forced, planned)
        if check is not None:
            logger.info("backbone %s: pre-flight check passed in %.1fs", check.backbone, check.seconds)
        create_table_artifact(plan_status(cfg, ArtifactStore(cfg.runtime.work_dir), forced), key=f"edgesam-plan-{cfg.profile}",
                              description="per stage: cached, stale or will run, and why (python -m pipelines plan)")
        logger.info("profile %s, artifacts under %s, stages %s%s", cfg.profile, cfg.runtime.work_dir,
                    ", ".join(selected), f", forced {', '.join(s for s in selected if s in forced)}" if forced else "")
        for index, name in enumerate(selected, 1):
            logger.info("[%d/%d] %s", index, len(selected), name)
            start = time.perf_counter()
            state = stage_task(name, cfg, planned[name], force=name in forced, return_state=True)
            result = state.result()  # raises the stage's own error when it failed
            status = "cached" if state.name == "Cached" else "done"
            rows.append({**result, "status": status, "seconds": time.perf_counter() - start})
            logger.info("[%d/%d] %s: %s in %.1fs -> %s", index, len(selected), name, status,
                        rows[-1]["seconds"], result["path"])
    create_markdown_artifact(
        summary_markdown(cfg, rows), key=f"edgesam-run-{cfg.profile}", description="stages, cache status, artifacts"
    )
    results = {row["stage"]: row for row in rows}
    publish_training_curves([Artifact(r["stage"], r["fingerprint"], Path(r["path"])) for r in rows], cfg.profile)
    if "evaluate" in results:
        publish_evaluation(Path(results["evaluate"]["path"]), cfg.profile)
    return results

