"""The `edgesam-eval` flow: evaluate the exported model and publish the results as Prefect artifacts.

Published under stable keys, so every nightly run adds a version and the UI shows the history:
`edgesam-eval-<profile>` (the report, plots embedded) and `edgesam-eval-<profile>-metrics` (table).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import Profile, TeacherKind
from flows.pipeline import edgesam

IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.(?:png|jpg|jpeg|svg))\)")
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
MAX_EMBEDDED_BYTES = 2 * 1024**2


def flatten(metrics: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Nested metrics -> rows of {metric, value} with dotted names (lists indexed)."""
    if isinstance(metrics, dict):
        items = metrics.items()
    elif isinstance(metrics, list):
        items = enumerate(metrics)
    else:
        return [{"metric": prefix, "value": metrics}]
    return [row for key, value in items for row in flatten(value, f"{prefix}.{key}" if prefix else str(key))]


def embed_images(markdown: str, base: Path) -> str:
    """Inline the report's local images as data URIs, so the Prefect UI shows them."""

    def inline(match: re.Match[str]) -> str:
        alt, link = match.groups()
        path = (base / link).resolve()
        if not path.is_file() or path.stat().st_size > MAX_EMBEDDED_BYTES:
            return f"[{alt or path.name}](file://{path})"
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{alt}](data:{MIME[path.suffix.lower()]};base64,{data})"

    return IMAGE_LINK.sub(inline, markdown)


def publish(evaluate_dir: Path, export_dir: Path, profile: str) -> dict[str, Any]:
    """Markdown + table artifacts of one evaluation; returns the metrics."""
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    report = evaluate_dir / "report.md"
    body = embed_images(report.read_text(), evaluate_dir) if report.is_file() else ""
    header = (
        f"# EdgeSAM evaluation, profile `{profile}`\n\n"
        f"Exported model: `{export_dir}`  \nEvaluation artifact: `{evaluate_dir}`\n\n"
    )
    create_markdown_artifact(header + body, key=f"edgesam-eval-{profile}", description="evaluation report")
    create_table_artifact(flatten(metrics), key=f"edgesam-eval-{profile}-metrics", description="all metrics")
    return metrics


@flow(name="edgesam-eval", log_prints=True)
def edgesam_eval(
    profile: Profile = "default",
    work_dir: Path | None = None,
    sa1b_path: Path | None = None,
    coco_train: Path | None = None,
    coco_val: Path | None = None,
    coco_images: Path | None = None,
    teacher_kind: TeacherKind | None = None,
    teacher_checkpoint: Path | None = None,
    backbone: str | None = None,
    overrides: dict[str, Any] | None = None,
    reevaluate: bool = True,
) -> dict[str, Any]:
    """Evaluate the exported model of these parameters and publish report and metrics.

    Runs only `evaluate` and `export` (recomputed when `reevaluate`, which also re-measures
    speed on today's machine); the trained stages must be committed already (run `edgesam`
    first), otherwise it fails naming the missing artifacts.
    """
    results = edgesam(
        profile=profile, work_dir=work_dir, sa1b_path=sa1b_path, coco_train=coco_train, coco_val=coco_val,
        coco_images=coco_images, teacher_kind=teacher_kind, teacher_checkpoint=teacher_checkpoint,
        backbone=backbone, overrides=overrides, stages=["evaluate", "export"],
        force=["evaluate"] if reevaluate else None,
    )
    metrics = publish(Path(results["evaluate"]["path"]), Path(results["export"]["path"]), profile)
    get_run_logger().info("published evaluation of %s", results["export"]["path"])
    return metrics
