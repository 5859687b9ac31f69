"""Training stages as Prefect artifacts: live progress while a stage trains, curves at the end.

`edgesam-progress-<stage>-<profile>`: a progress artifact of the stage's task run, created at
its first logged training step and updated at every later one (the callback that
`pipelines.stage.run_stage` hands to `edgesam.train.fit`). `edgesam-curves-<profile>`: the
training curves of the run's training stages, read from their manifests and plotted by
`edgesam.eval.report`, with the plot inlined.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from edgesam.artifacts import Artifact
from edgesam.eval.plots import plot_training_curves
from edgesam.eval.report import CURVES_PLOT, TRAINING_STAGES
from edgesam.eval.tables import curves_section, training_curve
from flows.evaluation import artifact_key, embed_images


class StageProgress:
    """The `on_progress` callback of one stage's task run: its progress artifact, in percent of
    the training steps, with the latest step and loss as the description."""

    def __init__(self, stage: str, profile: str):
        self.stage = stage
        self.key = artifact_key("progress", stage, profile)
        self.artifact_id: UUID | None = None

    def __call__(self, step: int, total: int, record: dict[str, Any]) -> None:
        percent = 100.0 * step / total
        description = f"{self.stage} training: step {step}/{total}, loss {record['loss']:.4g}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)


def publish_training_curves(artifacts: list[Artifact], profile: str) -> None:
    """The training curves of those of `artifacts` that trained, as one markdown artifact."""
    curves = {a.stage: training_curve(a.manifest) for a in artifacts if a.stage in TRAINING_STAGES}
    if not any(curves.values()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        plot_training_curves(curves, Path(tmp) / CURVES_PLOT)
        body = embed_images("\n".join(curves_section(curves, CURVES_PLOT)), Path(tmp))
    create_markdown_artifact(f"# edgesam training, profile `{profile}`\n\n{body}", key=artifact_key("curves", profile),
                             description="loss and IoU per logged step of the training stages")
