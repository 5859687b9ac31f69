"""The evaluate report's matplotlib figures, written atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edgesam.artifacts import atomic_path  # noqa: E402
from edgesam.eval.miou import Overlay  # noqa: E402
from edgesam.eval.tables import DATASET_ORDER, MODEL_ORDER, ordered, prompt_order  # noqa: E402

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_miou_by_prompt(miou: dict[str, Any], path: Path) -> None:
    """Grouped bars: one panel per dataset, prompt types on x, one bar (colour) per model."""
    datasets = ordered(miou, DATASET_ORDER)
    everyone = ordered({m: None for d in datasets for m in miou[d]}, MODEL_ORDER)
    color = {m: COLORS[i % len(COLORS)] for i, m in enumerate(everyone)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        models = ordered(miou[dataset], MODEL_ORDER)
        prompts = sorted({p for m in models for p in miou[dataset][m]}, key=prompt_order)
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            values = [miou[dataset][model].get(p, {}).get("all", np.nan) for p in prompts]
            ax.bar(np.arange(len(prompts)) + i * width - 0.4 + width / 2, values, width, label=model,
                   color=color[model])
        ax.set_xticks(np.arange(len(prompts)), prompts)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mIoU")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color[m]) for m in everyone]
    fig.legend(handles, everyone, loc="upper center", ncol=len(everyone), fontsize=8, bbox_to_anchor=(0.5, 1.06))
    _save(fig, path)


def plot_speed_vs_miou(speed: dict[str, dict[str, float]], miou: dict[str, dict[str, float]], path: Path,
                       label: str) -> None:
    """Encoder latency against mIoU (one point per model)."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for i, (model, value) in enumerate(miou.items()):
        if model not in speed:
            continue
        ax.scatter(speed[model]["encoder_ms"], value, s=60, color=COLORS[i % len(COLORS)])
        ax.annotate(model, (speed[model]["encoder_ms"], value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("encoder latency on this machine (ms, PyTorch eager)")
    ax.set_ylabel(label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_training_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    """One column per training stage: the loss against steps, and below it the stage's IoU
    signals where it logs any (phase 2: student/teacher mask IoU per decoding iteration)."""
    stages = [stage for stage, curve in curves.items() if curve]
    fig, axes = plt.subplots(2, len(stages), figsize=(4.2 * len(stages), 5.6), squeeze=False, sharex="col",
                             layout="constrained")
    for (loss_ax, iou_ax), stage in zip(axes.T, stages):
        curve = curves[stage]
        steps = [r["step"] for r in curve]
        losses = [r["loss"] for r in curve]
        loss_ax.plot(steps, losses, color=COLORS[0], marker="." if len(curve) < 30 else None)
        if min(losses) > 0:
            loss_ax.set_yscale("log")
        loss_ax.set_title(stage)
        loss_ax.set_ylabel("loss")
        loss_ax.grid(alpha=0.3)
        ious = sorted({key for r in curve for key in r if "iou" in key})
        for i, key in enumerate(ious):
            iou_ax.plot(steps, [r.get(key, np.nan) for r in curve], label=key, color=COLORS[(i + 1) % len(COLORS)])
        if ious:
            iou_ax.set_ylim(0, 1)
            iou_ax.set_ylabel("IoU")
            iou_ax.legend(fontsize=7)
            iou_ax.grid(alpha=0.3)
        else:
            iou_ax.set_yticks([])
            iou_ax.text(0.5, 0.5, "no IoU logged", ha="center", va="center", transform=iou_ax.transAxes, color="gray")
        iou_ax.set_xlabel("step")
    _save(fig, path)


def _tint(image: np.ndarray, mask: np.ndarray, color: tuple[float, float, float]) -> np.ndarray:
    out = image.astype(np.float32) / 255
    out[mask] = 0.45 * out[mask] + 0.55 * np.array(color)
    return out


def plot_overlays(overlays: Sequence[Overlay], path: Path) -> None:
    """One row per image: ground truth, then each model's mask for the same centre click."""
    models = list(overlays[0].masks)
    cols = 1 + len(models)
    fig, axes = plt.subplots(len(overlays), cols, figsize=(2.6 * cols, 2.6 * len(overlays)), squeeze=False)
    for row, overlay in zip(axes, overlays):
        panels = [("ground truth", overlay.gt, (0.1, 0.8, 0.1))] + [
            (name, overlay.masks[name], (0.9, 0.2, 0.2)) for name in models
        ]
        for ax, (title, mask, color) in zip(row, panels):
            ax.imshow(_tint(overlay.image, mask, color))
            ax.plot(*overlay.point, marker="*", color="yellow", markersize=10, markeredgecolor="black")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    _save(fig, path)
