"""Prompted mIoU runs on the engine: against ground truth (the evaluate stage, the teacher's
own val) and against the teacher (the distillation stages' val reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from edgesam.eval.datasets import EvalItem
from edgesam.eval.engine import EvalProtocol, Segmenter, first_clicks
from edgesam.metrics import IoURecord, mask_iou, size_bucket


@dataclass
class Overlay:
    """One object of one image prompted with a point, and each model's mask."""

    image: np.ndarray
    gt: np.ndarray
    point: tuple[float, float]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(
    segmenters: Sequence[Segmenter],
    items: Iterable[EvalItem],
    dataset: str,
    protocol: EvalProtocol,
    seed: int = 0,
    overlays: int = 0,
) -> tuple[list[IoURecord], list[Overlay]]:
    """Run every model on every item with the same clicks; IoU records against ground truth,
    and point-prompt overlays of the first `overlays` images (their largest object)."""
    records: list[IoURecord] = []
    shown: list[Overlay] = []
    for index, item in enumerate(tqdm(items, desc=f"evaluate {dataset}", unit="img", mininterval=5.0)):
        if len(item.masks) == 0:
            continue
        sizes = [size_bucket(float(m.sum()), item.image.shape[:2]) for m in item.masks]
        clicks = first_clicks(item, protocol.point_mode, np.random.default_rng([seed, index]))
        largest = int(np.argmax(item.masks.reshape(len(item.masks), -1).sum(1)))
        overlay = Overlay(item.image, item.masks[largest], tuple(clicks[largest])) if index < overlays else None
        gt = torch.as_tensor(item.masks)
        for segmenter in segmenters:
            masks = segmenter.segment(item, protocol, clicks)
            for prompt, predicted in masks.items():
                ious = mask_iou(predicted.cpu(), gt).numpy()
                records += [IoURecord(segmenter.name, dataset, prompt, s, float(v)) for s, v in zip(sizes, ious)]
            if overlay is not None:
                overlay.masks[segmenter.name] = masks["point"][largest].cpu().numpy()
        if overlay is not None:
            shown.append(overlay)
    return records, shown


def compare_with_teacher(
    items: Iterable[EvalItem], teacher: Sam, students: Mapping[str, Sam], protocol: EvalProtocol = EvalProtocol()
) -> dict[str, dict[str, float]]:
    """Box and point mIoU over objects, against ground truth and against the teacher's mask
    for the same prompt: {model: {"box_gt", "point_gt", ["box_teacher", "point_teacher"], "objects"}}."""
    models = {"teacher": Segmenter("teacher", teacher)} | {n: Segmenter(n, s) for n, s in students.items()}
    ious: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in models}
    for segmenter in models.values():
        segmenter.sam.eval()
    for index, item in enumerate(tqdm(items, desc="prompt mIoU", unit="img", leave=False)):
        if len(item.masks) == 0:
            continue
        gt = torch.as_tensor(item.masks)
        clicks = first_clicks(item, protocol.point_mode, np.random.default_rng([0, index]))
        teacher_masks = models["teacher"].segment(item, protocol, clicks)
        for name, segmenter in models.items():
            masks = teacher_masks if name == "teacher" else segmenter.segment(item, protocol, clicks)
            for kind in ("box", "point"):
                ious[name].setdefault(f"{kind}_gt", []).append(mask_iou(masks[kind].cpu(), gt))
                if name != "teacher":
                    ious[name].setdefault(f"{kind}_teacher", []).append(
                        mask_iou(masks[kind].cpu(), teacher_masks[kind].cpu()))
    results: dict[str, dict[str, float]] = {}
    for name, per_key in ious.items():
        if per_key:
            results[name] = {key: round(float(torch.cat(v).mean()), 4) for key, v in per_key.items()}
            results[name]["objects"] = int(sum(len(v) for v in per_key["box_gt"]))
    return results


def ground_truth_miou(sam: Sam, items: Iterable[EvalItem]) -> dict[str, float]:
    """mIoU vs ground truth: box prompts (1 mask), and each object's SA-1B point (its mask
    centre where the data has none), best of 3 masks and the mask SAM's IoU head picks."""
    segmenter = Segmenter("model", sam.eval())
    oracle, scored = EvalProtocol(point_outputs=3, multimask_select="oracle"), EvalProtocol(point_outputs=3)
    box, point_best, point_score = [], [], []
    images = 0
    for item in items:
        if len(item.masks) == 0:
            continue
        images += 1
        gt = torch.as_tensor(item.masks)
        clicks = item.points if item.points is not None else first_clicks(item, "center", np.random.default_rng(0))
        encoded = segmenter.encode(item.image)
        best = segmenter.segment(item, oracle, clicks, encoded)
        chosen = segmenter.segment(item, scored, clicks, encoded)
        box.extend(mask_iou(best["box"].cpu(), gt).tolist())
        point_best.extend(mask_iou(best["point"].cpu(), gt).tolist())
        point_score.extend(mask_iou(chosen["point"].cpu(), gt).tolist())
    if not box:
        raise ValueError("no annotated image to evaluate")
    return {
        "images": images,
        "annotations": len(box),
        "box_miou": float(np.mean(box)),
        "point_best_of_3_miou": float(np.mean(point_best)),
        "point_score_selected_miou": float(np.mean(point_score)),
    }
