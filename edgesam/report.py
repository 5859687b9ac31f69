"""The evaluation report: Markdown tables and matplotlib plots, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from edgesam.artifacts import atomic_path, write_text_atomic  # noqa: E402
from edgesam.data.transforms import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from edgesam.eval.miou import Overlay  # noqa: E402
from edgesam.eval.stats import miou_interval, paired_difference, per_image  # noqa: E402
from edgesam.metrics import SIZES, IoURecord  # noqa: E402

MIOU_PLOT = "miou_by_prompt.png"
SPEED_PLOT = "speed_vs_miou.png"
OVERLAY_PLOT = "overlays.png"
CURVES_PLOT = "training_curves.png"
TRAINING_STAGES = ("teacher", "encoder_kd", "prompt_kd", "rpn")  # the stages whose manifests hold a loss curve
MODEL_ORDER = ("teacher", "encoder_kd", "prompt_kd", "prompt_kd+rpn:official", "prompt_kd+rpn:weighted",
               "prompt_kd+rpn")
DATASET_ORDER = ("sa1b", "coco")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_miou_by_prompt(miou: dict[str, Any], path: Path) -> None:
    """Grouped bars: one panel per dataset, prompt types on x, one bar (colour) per model."""
    datasets = _ordered(miou, DATASET_ORDER)
    everyone = _ordered({m: None for d in datasets for m in miou[d]}, MODEL_ORDER)
    color = {m: COLORS[i % len(COLORS)] for i, m in enumerate(everyone)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        models = _ordered(miou[dataset], MODEL_ORDER)
        prompts = sorted({p for m in models for p in miou[dataset][m]}, key=_prompt_order)
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


def training_curve(manifest: dict[str, Any]) -> list[dict[str, float]]:
    """The logged records of a training stage's manifest (`training_summary`; the teacher's
    sits under `train`), or [] for a stage that trained nothing (e.g. a verified SAM teacher)."""
    return manifest.get("train", manifest).get("loss", {}).get("curve", [])


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


def curves_section(curves: dict[str, list[dict[str, float]]]) -> list[str]:
    """The report's training section: first and last logged loss per stage, and the plot."""
    lines = ["## Training curves", "",
             "Mean loss per logged window (`train.log_every` steps) of each training stage; `tensorboard --logdir "
             "<stage artifact>/tensorboard` shows every logged scalar.", "",
             "| stage | steps | first loss | last loss | last IoU |", "|---|---|---|---|---|"]
    for stage, curve in curves.items():
        if curve:
            last = ", ".join(f"{key} {_fmt(value)}" for key, value in sorted(curve[-1].items()) if "iou" in key)
            lines.append(f"| {stage} | {curve[-1]['step']} | {_fmt(curve[0]['loss'], 4)} | "
                         f"{_fmt(curve[-1]['loss'], 4)} | {last or '-'} |")
    return lines + ["", f"![training curves]({CURVES_PLOT})", ""]


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


def _ordered(names: Any, preferred: Sequence[str]) -> list[str]:
    """`names` with the preferred ones first, in that order, then the rest alphabetically."""
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _prompt_order(prompt: str) -> tuple[int, int]:
    kind, _, rounds = prompt.partition("+")
    return ({"box": 0, "point": 1}.get(kind, 2), int(rounds or 0))


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def describe_protocol(protocol: dict[str, Any]) -> str:
    """One sentence on how a protocol prompts (its `EvalProtocol` fields)."""
    first = "centre (farthest from the boundary)" if protocol["point_mode"] == "center" else "random interior pixel"
    clicks = ("a random pixel of the error region, no mask input" if protocol["click"] == "random"
              else "the centre of the larger error region, previous logits as mask input")
    refined = "box and point prompts" if protocol["refine_boxes"] else "point prompts"
    return (f"Protocol `{protocol['name']}`: box prompts from ground-truth boxes, point prompts at the mask {first}; "
            f"{protocol['point_outputs']} mask output(s) for a click"
            + (f" selected by {protocol['multimask_select']}" if protocol["point_outputs"] > 1 else "")
            + f"; `+r`: {refined} after r corrective clicks, each at {clicks}.")


def miou_tables(miou: dict[str, Any], protocol: str = "") -> list[str]:
    lines = []
    for dataset in _ordered(miou, DATASET_ORDER):
        models = {m: miou[dataset][m] for m in _ordered(miou[dataset], MODEL_ORDER)}
        prompts = sorted({p for m in models.values() for p in m}, key=_prompt_order)
        title = f"### {dataset}" + (f", protocol `{protocol}`" if protocol else "")
        lines += [title, "", "| model | " + " | ".join(prompts) + " | annotations |",
                  "|---|" + "---|" * (len(prompts) + 1)]
        for model, values in models.items():
            count = next(iter(values.values()))["count"]
            lines.append(f"| {model} | " + " | ".join(_fmt(values.get(p, {}).get("all")) for p in prompts)
                         + f" | {count} |")
        lines += ["", "By object size (COCO small / medium / large, scaled to the frame):", "",
                  "| model | prompt | " + " | ".join(SIZES) + " |", "|---|---|" + "---|" * len(SIZES)]
        for model, values in models.items():
            for prompt in prompts:
                if prompt in values:
                    lines.append(f"| {model} | {prompt} | "
                                 + " | ".join(_fmt(values[prompt].get(s)) for s in SIZES) + " |")
        lines.append("")
    return lines


def speed_table(speed: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | encoder params (M) | decoder params (M) | encoder GMACs | encoder ms | decoder ms | RPN ms |",
             "|---|---|---|---|---|---|---|"]
    for model in _ordered(speed, MODEL_ORDER):
        s = speed[model]
        lines.append(f"| {model} | {_fmt(s['encoder_params_m'], 2)} | {_fmt(s['decoder_params_m'], 2)} | "
                     f"{_fmt(s['encoder_gmacs'], 2)} | {_fmt(s['encoder_ms'], 1)} | {_fmt(s['decoder_ms'], 1)} | "
                     f"{_fmt(s.get('rpn_ms'), 1)} |")
    return lines


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
    lines = ["# EdgeSAM evaluation", "", "IoU per annotation at the image's resolution, averaged over annotations.", ""]
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
        lines += curves_section(curves)
    write_text_atomic(out / "report.md", "\n".join(lines))
    return ["report.md", *files]


def comparison_table(rows: list[dict[str, Any]], protocol: str) -> list[str]:
    """Paired comparisons with their bootstrap 95% intervals over images."""
    lines = [f"### Comparisons, protocol `{protocol}`", "",
             "Paired bootstrap over images (2000 resamples), 95% intervals; * where the difference's interval "
             "excludes 0.", "",
             "| dataset | prompt | model | baseline | model mIoU | baseline mIoU | difference [95%] | ratio [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['prompt']} | {r['model']} | {r['baseline']} | {_fmt(r['a'])} | "
                     f"{_fmt(r['b'])} | {r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
                     f"{' *' if r['significant'] else ''} | {r['ratio']:.3f} [{r['ratio_low']:.3f}, "
                     f"{r['ratio_high']:.3f}] |")
    return lines + [""]


def prior_section(prior: dict[str, Any]) -> list[str]:
    """The report's granularity-prior section: proposal AP, point mIoU off / per merge rule, click statistics."""
    rules = [r for r in ("official", "weighted") if r in next(iter(prior["point_miou"].values()))]
    lines = [
        "## Granularity prior (RPN)", "",
        f"Proposals on the COCO-format val set (class-agnostic COCOeval, NMS 0.6, top 100): box AP "
        f"{_fmt(prior['proposals']['ap'])}, AP50 {_fmt(prior['proposals']['ap50'])}, AR@100 "
        f"{_fmt(prior['proposals']['ar100'])}. The bundle's rule: `{prior['merge']}` (edgesam/models/rpn.py).", "",
        "Point-prompt mIoU against COCO-format instance masks, RPN off and with each merge rule:", "",
        "| protocol | RPN off | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules),
        *[f"| {name} | {_fmt(v['off'])} | " + " | ".join(_fmt(v[r]) for r in rules) + " |"
          for name, v in prior["point_miou"].items()], "",
        "First clicks and their boxes: how many got a box, and how many boxes contain their click:", "",
        "| dataset | rule | clicks | with a box | box contains the click | box misses the click |", "|---|---|---|---|---|---|",
    ]
    for dataset, models in prior["clicks"].items():
        for model, c in models.items():
            lines.append(f"| {dataset} | {model.split(':')[-1]} | {c['clicks']} | {c['with_box']} | "
                         f"{c['box_contains_click']} | {c['with_box'] - c['box_contains_click']} |")
    return lines + [""]


def _latency(ms: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.1f} ms" for k, v in ms.items())


def file_table(config: dict[str, Any]) -> list[str]:
    """One row per bundle file: precision, size, measured mIoU (and drop from fp32), latency."""
    lines = ["| file | precision | MB | box mIoU | point mIoU | box / point drop vs fp32 | onnxruntime CPU latency |",
             "|---|---|---|---|---|---|---|"]
    for role, entry in sorted(config["files"].items()):
        acc = entry.get("accuracy") or {}
        drop = f"{acc['box_drop']:+.3f} / {acc['point_drop']:+.3f}" if acc else "-"
        lines.append(f"| `{entry['file']}` | {entry.get('precision', '-')} | {entry['bytes'] / 1e6:.1f} | "
                     f"{_fmt(acc.get('box_miou'))} | {_fmt(acc.get('point_miou'))} | {drop} | "
                     f"{_latency(entry['latency_ms']) if 'latency_ms' in entry else '-'} |")
    return lines


def variant_table(variants: dict[str, Any]) -> list[str]:
    lines = ["| variant (encoder + decoder) | box mIoU | point mIoU |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(v['box'])} | {_fmt(v['point'])} |" for name, v in variants.items() if isinstance(v, dict)]
    return lines


def model_card(config: dict[str, Any], evaluation: dict[str, Any], parity: dict[str, Any],
               timings: dict[str, dict[str, float]], coreml: dict[str, Any]) -> str:
    """MODEL_CARD.md of an exported bundle: every file with its measured accuracy and speed,
    the evaluate stage's measurements, ONNX parity."""
    prior, model, accuracy = evaluation["granularity_prior"], config["model"], config["accuracy"]
    variants = accuracy["variants"]
    worst = {part: max(v["max_abs_diff"] for v in parity[part].values())
             for part in ("encoder", "decoder", "decoder_sam", "decoder_edgesam", "rpn") if part in parity}
    lines = [
        "# EdgeSAM model card", "",
        f"Student: `{model['backbone']}` encoder (fused) + SAM's prompt encoder and mask decoder, "
        f"input {config['img_size']} x {config['img_size']}, distilled with prompt-in-the-loop KD (EdgeSAM, "
        "arXiv 2312.06660). Optional granularity prior: an RPN whose proposals around a click become a box "
        f"prompt (merge rule `{prior['merge']}`).", "",
        "## Files", "",
        f"Accuracy: box and point mIoU of each file through the evaluation engine ({variants['pytorch']['annotations']} "
        f"objects of the val split, protocol `{accuracy['protocol']['name']}`, "
        f"{accuracy['protocol']['refine_iters']} corrective clicks); the other files of the variant are fp32. "
        f"int8: static QDQ, U8S8, calibrated on {accuracy['calibration_images']} {accuracy['calibration_split']} images; "
        f"weights {variants.get('int8_weights', '-')} (the better of those measured). fp16: inputs and outputs stay "
        "float32. Latency: onnxruntime CPU on this machine, median (x86 without AVX512-FP16 runs fp16 slower than fp32).",
        "", *file_table(config), "", *variant_table(variants), "",
        f"- `encoder*.onnx`: `image` (1, 3, S, S), resized so the longest side is S, normalized with mean "
        f"{list(PIXEL_MEAN)} and std {list(PIXEL_STD)}, zero-padded bottom-right -> `image_embeddings`, then the "
        "backbone maps `features_s8/s16/s32` (the input of `rpn.onnx`).",
        "- `decoder*.onnx`: N prompt sets per call (image_embeddings, point_coords (N, P, 2), point_labels (N, P), "
        "mask_input (N, 1, S/4, S/4), has_mask_input (N,) -> scores (N, 4), masks (N, 4, S/4, S/4) low-res logits of "
        "all four mask tokens: token 0 single-mask, 1-3 SAM's multimask). Every shape is static or N / P "
        "(TensorRT-friendly); crop and resize the logits on the client (`edgesam.onnx_predictor`).",
        "- `decoder_sam.onnx`: segment-anything's ONNX interface (image_embeddings, point_coords, point_labels, "
        "mask_input, has_mask_input, orig_im_size -> masks, iou_predictions, low_res_masks).",
        "- `decoder_edgesam.onnx`: EdgeSAM's compact interface (image_embeddings, point_coords, point_labels -> "
        "scores, masks).",
        "- Point coordinates are in the resized frame; labels 1 / 0 / 2, 3 (box corners) / -1 (padding; add one "
        "padding point when there is no box).",
        "- `rpn.onnx`: per-location RPN scores and boxes; thresholding, NMS and the merge run on the client "
        f"(settings in config.json: {config['rpn']}).",
        "- `edgesam.pt` (`edgesam.models.edgesam.load_edgesam`), `rpn.pt` (`edgesam.models.rpn.load_rpn`), "
        "`config.json` (every file with its SHA-256; `edgesam.onnx_predictor.OnnxPredictor` reads the bundle).",
        f"- CoreML: {coreml.get('file', coreml.get('reason', coreml['status']))}.", "",
        "## Measured accuracy (evaluate stage)", "",
        *[line for name, m in evaluation["miou"].items() for line in miou_tables(m, name)],
        *prior_section(prior),
        "## Speed (evaluate stage, PyTorch eager, this machine)", "", *speed_table(evaluation["speed"]), "",
        "## ONNX parity", "",
        f"onnxruntime vs PyTorch (tolerance |diff| <= {parity['atol']} + {parity['rtol']} |value|): "
        + ", ".join(f"{part} max |diff| {value:.2e}" for part, value in worst.items()) + ".", "",
        "| runtime (CPU) | encoder ms | decoder ms (1 box) |", "|---|---|---|",
        *[f"| {name} | {t['encoder_ms']:.1f} | {t['decoder_ms']:.1f} |" for name, t in timings.items()], "",
        "## Limitations", "",
        "Trained and measured on the data this pipeline ran on (the embedded synthetic benchmark unless real "
        "SA-1B / COCO paths were configured); numbers above are those measurements, not the paper's.", "",
    ]
    return "\n".join(lines)


def read_ious(path: Path) -> list[IoURecord]:
    """The IoU records of an `ious.jsonl` / `val_ious.jsonl` file (`records_jsonl`)."""
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return [IoURecord(**{k: v for k, v in row.items() if k != "protocol"}) for row in rows]


ABLATION_PROMPTS = ("box_gt", "point_gt", "box_teacher", "point_teacher")


def ablation_rows(val_ious: dict[str, Path], baseline: str, model: str = "prompt_kd") -> list[dict[str, Any]]:
    """Per variant and prompt: the phase-2 student's val mIoU with its interval, and the paired
    difference to `baseline` (the same val annotations), from each run's `val_ious.jsonl`."""
    records = {name: read_ious(path) for name, path in val_ious.items()}
    rows = []
    for name, found in records.items():
        row: dict[str, Any] = {"variant": name}
        for prompt in ABLATION_PROMPTS:
            mine = per_image(found, model, "val", prompt)
            row[prompt] = miou_interval(mine)
            if name != baseline:
                row[f"{prompt}_vs_baseline"] = paired_difference(mine, per_image(records[baseline], model, "val", prompt))
        rows.append(row)
    return rows


def ablation_table(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """Markdown: mIoU [95%] per prompt, and the difference to the baseline [95%] (* when significant)."""
    head = " | ".join(ABLATION_PROMPTS)
    lines = [f"| variant | {head} |", "|---|" + "---|" * len(ABLATION_PROMPTS)]
    for row in rows:
        cells = []
        for prompt in ABLATION_PROMPTS:
            m = row[prompt]
            cell = f"{m['miou']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
            if f"{prompt}_vs_baseline" in row:
                d = row[f"{prompt}_vs_baseline"]
                cell += f"; {d['diff']:+.3f} [{d['diff_low']:+.3f}, {d['diff_high']:+.3f}]{' *' if d['significant'] else ''}"
            cells.append(cell)
        lines.append(f"| {row['variant']}{' (baseline)' if row['variant'] == baseline else ''} | " + " | ".join(cells) + " |")
    return lines
