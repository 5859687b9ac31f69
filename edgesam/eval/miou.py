"""Prompted mIoU runs on the engine: against ground truth (the evaluate stage, the teacher's
own val) and against the teacher (the distillation stages' val reports)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from edgesam.data.transforms import scale_coords
from edgesam.eval.datasets import EvalItem
from edgesam.eval.engine import Encoded, EvalProtocol, Segmenter, first_clicks
from edgesam.metrics import IoURecord, mask_iou, size_bucket
from edgesam.models.rpn import contains


@dataclass
class Overlay:
    """One object of one image prompted with a point, and each model's mask."""

    image: np.ndarray
    gt: np.ndarray
    point: tuple[float, float]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class PriorStats:
    """How often the granularity prior gave a click a box, and a box that contains the click."""

    clicks: int = 0
    with_box: int = 0
    box_contains_click: int = 0


def evaluate(
    segmenters: Sequence[Segmenter],
    items: Iterable[EvalItem],
    dataset: str,
    protocols: Sequence[EvalProtocol],
    seed: int = 0,
    overlays: int = 0,
) -> tuple[dict[str, list[IoURecord]], list[Overlay], dict[str, PriorStats]]:
    """Run every model under every protocol on every item (one encoder pass per model and
    image, the same first clicks for every model): IoU records against ground truth by
    protocol name, point-prompt overlays of the first `overlays` images (their largest object,
    first protocol), and the prior's statistics of the models with an RPN."""
    records: dict[str, list[IoURecord]] = {p.name: [] for p in protocols}
    shown: list[Overlay] = []
    stats = {s.name: PriorStats() for s in segmenters if s.rpn is not None}
    for index, item in enumerate(tqdm(items, desc=f"evaluate {dataset}", unit="img", mininterval=5.0, disable=None)):
        if len(item.masks) == 0:
            continue
        sizes = [size_bucket(float(m.sum()), item.image.shape[:2]) for m in item.masks]
        clicks = {p.name: first_clicks(item, p.point_mode, np.random.default_rng([seed, index])) for p in protocols}
        largest = int(np.argmax(item.masks.reshape(len(item.masks), -1).sum(1)))
        first = clicks[protocols[0].name]
        overlay = Overlay(item.image, item.masks[largest], tuple(first[largest])) if index < overlays else None
        gt = torch.as_tensor(item.masks)
        for segmenter in segmenters:
            encoded = segmenter.encode(item.image)
            for number, protocol in enumerate(protocols):
                masks = segmenter.segment(item, protocol, clicks[protocol.name], encoded,
                                          np.random.default_rng([seed, index, number]))
                for prompt, predicted in masks.items():
                    ious = mask_iou(predicted.cpu(), gt).numpy()
                    records[protocol.name] += [IoURecord(segmenter.name, dataset, prompt, s, float(v), item.image_id)
                                               for s, v in zip(sizes, ious)]
                if overlay is not None and number == 0:
                    overlay.masks[segmenter.name] = masks["point"][largest].cpu().numpy()
            if segmenter.name in stats:
                _count_prior(stats[segmenter.name], segmenter, encoded, item, first)
        if overlay is not None:
            shown.append(overlay)
    return records, shown, stats


def records_jsonl(records: dict[str, list[IoURecord]]) -> str:
    """One JSON line per annotation IoU, with its protocol: the raw material of intervals."""
    return "".join(json.dumps({"protocol": name, **asdict(r)}) + "\n" for name, rs in records.items() for r in rs)


def _count_prior(stats: PriorStats, segmenter: Segmenter, encoded: Encoded, item: EvalItem, clicks: np.ndarray) -> None:
    points = torch.as_tensor(scale_coords(clicks, item.image.shape[:2], segmenter.img_size), dtype=torch.float32,
                             device=segmenter.sam.device)
    boxes, found = segmenter.prior(encoded, points)
    stats.clicks += len(points)
    stats.with_box += int(found.sum())
    stats.box_contains_click += int((found & contains(boxes, points)).sum())


def compare_with_teacher(
    items: Iterable[EvalItem], teacher: Sam, students: Mapping[str, Sam], protocol: EvalProtocol = EvalProtocol(),
    records: list[IoURecord] | None = None,
) -> dict[str, dict[str, float]]:
    """Box and point mIoU over objects, against ground truth and against the teacher's mask
    for the same prompt: {model: {"box_gt", "point_gt", ["box_teacher", "point_teacher"], "objects"}}.
    `records` collects every annotation's IoU (prompt `box_gt`, ...), for intervals."""
    models = {"teacher": Segmenter("teacher", teacher)} | {n: Segmenter(n, s) for n, s in students.items()}
    ious: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in models}
    for segmenter in models.values():
        segmenter.sam.eval()
    for index, item in enumerate(tqdm(items, desc="prompt mIoU", unit="img", leave=False, disable=None)):
        if len(item.masks) == 0:
            continue
        gt = torch.as_tensor(item.masks)
        clicks = first_clicks(item, protocol.point_mode, np.random.default_rng([0, index]))
        teacher_masks = models["teacher"].segment(item, protocol, clicks)
        for name, segmenter in models.items():
            masks = teacher_masks if name == "teacher" else segmenter.segment(item, protocol, clicks)
            for kind in ("box", "point"):
                found = {f"{kind}_gt": mask_iou(masks[kind].cpu(), gt)}
                if name != "teacher":
                    found[f"{kind}_teacher"] = mask_iou(masks[kind].cpu(), teacher_masks[kind].cpu())
                for key, values in found.items():
                    ious[name].setdefault(key, []).append(values)
                    if records is not None:
                        records += [IoURecord(name, "val", key, "all", float(v), item.image_id) for v in values]
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
