"""The nightly regression gate: paired bootstrap differences between two evaluations in the ledger,
and the rule that calls a difference a regression.

A regression is a drop the interval is sure of, beyond a tolerance: the upper end of the 95 %
paired bootstrap interval over images of mIoU(model) - mIoU(baseline) lies below -`TOLERANCE`.
On one benchmark under one protocol the clicks and annotation subsets are seeded, so an
unchanged model gives the same IoUs every night (difference exactly 0): a flagged drop comes
from the model or from the evaluation code. The tolerance, half a point of mIoU, keeps drops
that are real but too small to act on from failing the night; a drop whose interval reaches
above -0.005 (noise, or a loss under half a point) passes. Only the first-prompt types
(`GATED_PROMPTS`: one box, one click) are gated, so that each comparison makes two tests, not
one per corrective click; the refined prompt types are measured and tabulated all the same.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from edgesam.eval.ledger import Evaluation, Ledger
from edgesam.eval.stats import LEVEL, paired_difference

TOLERANCE = 0.005
GATED_PROMPTS = ("box", "point")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """mIoU(model) - mIoU(baseline) on one dataset and prompt type, with its paired interval."""

    comparison: str  # "candidate vs champion" or "vs previous entry"
    model: str
    baseline: str
    dataset: str
    prompt: str
    model_miou: float
    baseline_miou: float
    diff: float
    low: float
    high: float
    images: int
    annotations: int
    tolerance: float

    @property
    def regressed(self) -> bool:
        return self.high < -self.tolerance

    @property
    def metric(self) -> str:
        return f"{self.dataset} {self.prompt} mIoU"

    def payload(self) -> dict[str, Any]:
        """The regression event's payload: model, metric, delta and interval (and what it was compared with)."""
        return {"model": self.model, "baseline": self.baseline, "comparison": self.comparison, "metric": self.metric,
                "delta": round(self.diff, 4), "interval": [round(self.low, 4), round(self.high, 4)],
                "level": LEVEL, "tolerance": self.tolerance, "images": self.images, "annotations": self.annotations}

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "regressed": self.regressed}


def compare(ledger: Ledger, model: Evaluation, baseline: Evaluation, comparison: str, model_label: str,
            baseline_label: str, tolerance: float = TOLERANCE, prompts: Sequence[str] = GATED_PROMPTS) -> list[Delta]:
    """Paired differences of `model` against `baseline` for each gated prompt type both measured.
    A prompt type whose images or annotation counts differ (another benchmark subset) is left
    out with a warning: an unpaired difference says nothing about the model."""
    measured = {(m["dataset"], m["prompt"]) for m in ledger.metrics(baseline.id)}
    out = []
    for metric in ledger.metrics(model.id):
        where = (metric["dataset"], metric["prompt"])
        if metric["prompt"] not in prompts or where not in measured:
            continue
        try:
            found = paired_difference(ledger.per_image(model.id, *where), ledger.per_image(baseline.id, *where))
        except ValueError:
            log.warning("%s vs %s (%s %s): not the same images and annotations, not compared",
                        model_label, baseline_label, *where)
            continue
        out.append(Delta(comparison, model_label, baseline_label, *where, found["a"], found["b"], found["diff"],
                         found["diff_low"], found["diff_high"], found["images"], found["annotations"], tolerance))
    return out


def deltas_markdown(deltas: Sequence[Delta]) -> str:
    """The gate's table: every comparison of the night, regressions marked."""
    if not deltas:
        return "No comparison this night (no candidate beside a champion, no model with an earlier entry)."
    lines = [f"| comparison | model | baseline | metric | model | baseline | difference [{LEVEL:.0%}] | verdict |",
             "|---|---|---|---|---:|---:|---|---|"]
    for d in deltas:
        verdict = f"**regressed** (below -{d.tolerance:g})" if d.regressed else "ok"
        lines.append(f"| {d.comparison} | {d.model} | {d.baseline} | {d.metric} | {d.model_miou:.3f} | "
                     f"{d.baseline_miou:.3f} | {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {verdict} |")
    return "\n".join(lines)
