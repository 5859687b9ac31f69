"""The evaluate stage's report.md: its tables (`eval.tables`) and plots (`eval.plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edgesam.artifacts import write_text_atomic
from edgesam.eval.miou import Overlay
from edgesam.eval.plots import plot_miou_by_prompt, plot_overlays, plot_speed_vs_miou, plot_training_curves
from edgesam.eval.tables import comparison_table, curves_section, describe_protocol, miou_tables, prior_section, speed_table

MIOU_PLOT = "miou_by_prompt.png"
SPEED_PLOT = "speed_vs_miou.png"
OVERLAY_PLOT = "overlays.png"
CURVES_PLOT = "training_curves.png"
TRAINING_STAGES = ("teacher", "encoder_kd", "prompt_kd", "rpn")  # the stages whose manifests hold a loss curve


def write_report(metrics: dict[str, Any], overlays: Sequence[Overlay], out: Path,
                 curves: dict[str, list[dict[str, float]]] | None = None) -> list[str]:
    """report.md and its plots in `out`, with the upstream training `curves` (stage -> logged
    records) when any; returns the written file names."""
    out = Path(out)
    miou, speed = metrics["miou"], metrics["speed"]
    files = [MIOU_PLOT, SPEED_PLOT]
    headline = metrics["headline"]
    first = next(iter(metrics["protocols"]))
    plot_miou_by_prompt(miou[first], out / MIOU_PLOT)
    plot_speed_vs_miou(speed, headline["miou"], out / SPEED_PLOT, headline["label"])
    student = f", student `{metrics['backbone']}`" if "backbone" in metrics else ""
    lines = [f"# EdgeSAM evaluation{student}", "", "IoU per annotation at the image's resolution, averaged over annotations.", ""]
    for name, protocol in metrics["protocols"].items():
        lines += [f"## mIoU, protocol `{name}`", "", describe_protocol(protocol), "", *miou_tables(miou[name], name),
                  *comparison_table(metrics["comparisons"][name], name)]
    lines += [f"![mIoU per prompt type, protocol {first}]({MIOU_PLOT})", ""]
    prior = metrics.get("granularity_prior")
    if prior:
        lines += prior_section(prior)
    lines += ["## Speed", "", f"Measured on this machine ({metrics['machine']}), PyTorch eager, batch 1; "
              "decoder: one point prompt, four mask outputs; GMACs: every operation torch.utils.flop_counter counts, "
              "FLOPs / 2 (benchmarks/speed.py also reports conv/linear-only MACs).", "", *speed_table(speed), "",
              f"![speed vs mIoU]({SPEED_PLOT})", ""]
    if overlays:
        plot_overlays(overlays, out / OVERLAY_PLOT)
        files.append(OVERLAY_PLOT)
        lines += ["## Teacher vs students", "", "The first click (star) on the largest object of the first val images.",
                  "", f"![overlays]({OVERLAY_PLOT})", ""]
    if curves and any(curves.values()):
        plot_training_curves(curves, out / CURVES_PLOT)
        files.append(CURVES_PLOT)
        lines += curves_section(curves, CURVES_PLOT)
    write_text_atomic(out / "report.md", "\n".join(lines))
    return ["report.md", *files]
