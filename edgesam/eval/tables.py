"""Markdown tables of evaluation results, shared by the evaluate report and the model card."""

from __future__ import annotations

from typing import Any, Sequence

from edgesam.metrics import SIZES

MODEL_ORDER = ("teacher", "encoder_kd", "prompt_kd", "prompt_kd+rpn:official", "prompt_kd+rpn:weighted",
               "prompt_kd+rpn")
DATASET_ORDER = ("sa1b", "coco")


def ordered(names: Any, preferred: Sequence[str]) -> list[str]:
    """`names` with the preferred ones first, in that order, then the rest alphabetically."""
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def prompt_order(prompt: str) -> tuple[int, int]:
    kind, _, rounds = prompt.partition("+")
    return ({"box": 0, "point": 1}.get(kind, 2), int(rounds or 0))


def fmt(value: Any, digits: int = 3) -> str:
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
    for dataset in ordered(miou, DATASET_ORDER):
        models = {m: miou[dataset][m] for m in ordered(miou[dataset], MODEL_ORDER)}
        prompts = sorted({p for m in models.values() for p in m}, key=prompt_order)
        title = f"### {dataset}" + (f", protocol `{protocol}`" if protocol else "")
        lines += [title, "", "| model | " + " | ".join(prompts) + " | annotations |",
                  "|---|" + "---|" * (len(prompts) + 1)]
        for model, values in models.items():
            count = next(iter(values.values()))["count"]
            lines.append(f"| {model} | " + " | ".join(fmt(values.get(p, {}).get("all")) for p in prompts)
                         + f" | {count} |")
        lines += ["", "By object size (COCO small / medium / large, scaled to the frame):", "",
                  "| model | prompt | " + " | ".join(SIZES) + " |", "|---|---|" + "---|" * len(SIZES)]
        for model, values in models.items():
            for prompt in prompts:
                if prompt in values:
                    lines.append(f"| {model} | {prompt} | "
                                 + " | ".join(fmt(values[prompt].get(s)) for s in SIZES) + " |")
        lines.append("")
    return lines


def speed_table(speed: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| model | encoder params (M) | decoder params (M) | encoder GMACs | encoder ms | decoder ms | RPN ms |",
             "|---|---|---|---|---|---|---|"]
    for model in ordered(speed, MODEL_ORDER):
        s = speed[model]
        lines.append(f"| {model} | {fmt(s['encoder_params_m'], 2)} | {fmt(s['decoder_params_m'], 2)} | "
                     f"{fmt(s['encoder_gmacs'], 2)} | {fmt(s['encoder_ms'], 1)} | {fmt(s['decoder_ms'], 1)} | "
                     f"{fmt(s.get('rpn_ms'), 1)} |")
    return lines


def comparison_table(rows: list[dict[str, Any]], protocol: str) -> list[str]:
    """Paired comparisons with their bootstrap 95% intervals over images."""
    lines = [f"### Comparisons, protocol `{protocol}`", "",
             "Paired bootstrap over images (2000 resamples), 95% intervals; * where the difference's interval "
             "excludes 0.", "",
             "| dataset | prompt | model | baseline | model mIoU | baseline mIoU | difference [95%] | ratio [95%] |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['prompt']} | {r['model']} | {r['baseline']} | {fmt(r['a'])} | "
                     f"{fmt(r['b'])} | {r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
                     f"{' *' if r['significant'] else ''} | {r['ratio']:.3f} [{r['ratio_low']:.3f}, "
                     f"{r['ratio_high']:.3f}] |")
    return lines + [""]


def prior_section(prior: dict[str, Any]) -> list[str]:
    """The report's granularity-prior section: proposal AP, point mIoU off / per merge rule, click statistics."""
    rules = [r for r in ("official", "weighted") if r in next(iter(prior["point_miou"].values()))]
    lines = [
        "## Granularity prior (RPN)", "",
        f"Proposals on the COCO-format val set (class-agnostic COCOeval, NMS 0.6, top 100): box AP "
        f"{fmt(prior['proposals']['ap'])}, AP50 {fmt(prior['proposals']['ap50'])}, AR@100 "
        f"{fmt(prior['proposals']['ar100'])}. The bundle's rule: `{prior['merge']}` (edgesam/models/rpn.py).", "",
        "Point-prompt mIoU against COCO-format instance masks, RPN off and with each merge rule:", "",
        "| protocol | RPN off | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules),
        *[f"| {name} | {fmt(v['off'])} | " + " | ".join(fmt(v[r]) for r in rules) + " |"
          for name, v in prior["point_miou"].items()], "",
        "First clicks and their boxes: how many got a box, and how many boxes contain their click:", "",
        "| dataset | rule | clicks | with a box | box contains the click | box misses the click |", "|---|---|---|---|---|---|",
    ]
    for dataset, models in prior["clicks"].items():
        for model, c in models.items():
            lines.append(f"| {dataset} | {model.split(':')[-1]} | {c['clicks']} | {c['with_box']} | "
                         f"{c['box_contains_click']} | {c['with_box'] - c['box_contains_click']} |")
    return lines + [""]


def training_curve(manifest: dict[str, Any]) -> list[dict[str, float]]:
    """The logged records of a training stage's manifest (`training_summary`; the teacher's
    sits under `train`), or [] for a stage that trained nothing (e.g. a verified SAM teacher)."""
    return manifest.get("train", manifest).get("loss", {}).get("curve", [])


def curves_section(curves: dict[str, list[dict[str, float]]], plot: str) -> list[str]:
    """The report's training section: first and last logged loss per stage, and the plot."""
    lines = ["## Training curves", "",
             "Mean loss per logged window (`train.log_every` steps) of each training stage; `tensorboard --logdir "
             "<stage artifact>/tensorboard` shows every logged scalar.", "",
             "| stage | steps | first loss | last loss | last IoU |", "|---|---|---|---|---|"]
    for stage, curve in curves.items():
        if curve:
            last = ", ".join(f"{key} {fmt(value)}" for key, value in sorted(curve[-1].items()) if "iou" in key)
            lines.append(f"| {stage} | {curve[-1]['step']} | {fmt(curve[0]['loss'], 4)} | "
                         f"{fmt(curve[-1]['loss'], 4)} | {last or '-'} |")
    return lines + ["", f"![training curves]({plot})", ""]
