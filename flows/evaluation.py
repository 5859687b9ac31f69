"""Evaluation results as Prefect artifacts, published by every flow run that includes `evaluate`.

Published under stable keys per profile and student backbone, so every rerun adds a version and
runs of different backbones keep their own history: `edgesam-eval-<profile>-<backbone>` (the
report, plots embedded) and `edgesam-eval-<profile>-<backbone>-metrics` (table).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

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


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from `parts`."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(("edgesam", *parts)).lower())


def publish_evaluation(evaluate_dir: Path, profile: str) -> None:
    """The evaluate stage's report (plots inlined) and metrics as Prefect artifacts of this run."""
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    backbone = metrics.get("backbone", "student")
    key = artifact_key("eval", profile, backbone)
    report = evaluate_dir / "report.md"
    body = embed_images(report.read_text(), evaluate_dir) if report.is_file() else ""
    header = (f"# EdgeSAM evaluation, profile `{profile}`, student `{backbone}`\n\n"
              f"Evaluation artifact: `{evaluate_dir}`\n\n")
    create_markdown_artifact(header + body, key=key, description="evaluation report")
    create_table_artifact(flatten(metrics), key=f"{key}-metrics", description="all metrics")
