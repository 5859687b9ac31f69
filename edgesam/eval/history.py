"""What the ledger says over time and about one night: the history table, the trend plot and the
results tables that README and docs quote, stamped with the night, its commit and its date."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgesam.artifacts import atomic_path  # noqa: E402
from edgesam.eval.gate import GATED_PROMPTS, compare, deltas_markdown  # noqa: E402
from edgesam.eval.ledger import Evaluation, Ledger, LedgerError  # noqa: E402
from edgesam.eval.registry import CANDIDATE, CHAMPION  # noqa: E402
from edgesam.eval.stats import LEVEL, paired_difference  # noqa: E402
from edgesam.eval.tables import describe_protocol, prompt_order  # noqa: E402


def interval(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def label(name: str, version: int | None) -> str:
    return name if version is None else f"{name} v{version}"


def history_rows(ledger: Ledger, prompts: Sequence[str] = GATED_PROMPTS, nights: int = 60) -> list[dict[str, Any]]:
    """One row per night and model (oldest night first): its evaluation, new or reused, and the
    mIoU of `prompts` with intervals."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in ledger.history(prompts, nights):
        row = rows.setdefault((r["run_id"], r["model_name"]), {
            "night": r["started_at"], "run": r["run_id"][:8], "model": label(r["model_name"], r["version"]),
            "aliases": r["aliases"], "digest": r["model_digest"][:12], "evaluation": r["evaluation_id"],
            "evaluated": "reused" if r["reused"] else "new"})
        row[f"{r['dataset']} {r['prompt']}"] = interval(r["value"], r["low"], r["high"])
    return list(rows.values())


def plot_trend(ledger: Ledger, path: Path, prompts: Sequence[str] = GATED_PROMPTS, nights: int = 60) -> None:
    """mIoU per night per model, one panel per prompt type, bars for the 95 % intervals (PNG)."""
    found = ledger.history(prompts, nights)
    order = list(dict.fromkeys(r["run_id"] for r in found))
    ticks = {r["run_id"]: r["started_at"][5:16].replace("T", " ") for r in found}
    fig, axes = plt.subplots(1, len(prompts), figsize=(5.5 * len(prompts), 3.6), squeeze=False)
    models = list(dict.fromkeys(r["model_name"] for r in found))
    for ax, prompt in zip(axes[0], prompts):
        for i, model in enumerate(models):
            points = [r for r in found if r["model_name"] == model and r["prompt"] == prompt]
            dodge = (i - (len(models) - 1) / 2) * 0.06  # models side by side, their bars apart
            x = [order.index(r["run_id"]) + dodge for r in points]
            y = [r["value"] for r in points]
            error = [[r["value"] - r["low"] for r in points], [r["high"] - r["value"] for r in points]]
            ax.errorbar(x, y, yerr=error, marker="o", capsize=3, label=model)
        ax.set_title(f"{prompt} prompts")
        ax.set_xticks(range(len(order)), [ticks[run] for run in order], rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("night (UTC)")
        ax.set_ylabel(f"mIoU, {LEVEL:.0%} interval")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def results_markdown(ledger: Ledger, run_id: str | None = None) -> str:
    """The results tables of one night (the latest by default), for README and docs: every model's
    mIoU with intervals and the candidate's paired difference to the champion, stamped with the
    night, the commit that measured each row and the benchmark."""
    night, models = ledger.night(run_id)
    first = models[0]
    protocol = json.loads(first["protocol"])
    prompts = _table_prompts(ledger, [m["id"] for m in models])
    lines = [f"Nightly evaluation `{night['run_id']}` of {night['started_at']} (UTC), commit "
             f"`{night['git_commit'] or 'unknown'}`; benchmark `{night['benchmark_digest'][:12]}` "
             f"({first['images']} images, {first['annotations']} objects, {protocol['dataset']} val shards). "
             + describe_protocol(protocol["engine"]) + f" Brackets: bootstrap {LEVEL:.0%} intervals over images.",
             "", "| model | aliases | backbone | weights SHA-256 | " + " | ".join(prompts) + " | measured at |",
             "|---|---|---|---|" + "---|" * len(prompts) + "---|"]
    for m in models:
        values = {metric["prompt"]: metric for metric in ledger.metrics(m["id"])}
        cells = [interval(values[p]["value"], values[p]["low"], values[p]["high"]) if p in values else "-"
                 for p in prompts]
        lines.append(f"| {label(m['registered_name'], m['version'])} | {m['aliases'] or '-'} | {m['backbone']} | "
                     f"`{m['model_digest'][:12]}` | " + " | ".join(cells)
                     + f" | evaluation {m['id']}, commit `{m['git_commit'][:12] or 'unknown'}` |")
    holders = {alias: m for m in models for alias in m["aliases"].split(",") if alias}
    if CHAMPION in holders and CANDIDATE in holders and holders[CHAMPION]["id"] != holders[CANDIDATE]["id"]:
        champion, candidate = holders[CHAMPION], holders[CANDIDATE]
        deltas = compare(ledger, _evaluation(candidate), _evaluation(champion), "candidate vs champion",
                         label(candidate["registered_name"], candidate["version"]),
                         label(champion["registered_name"], champion["version"]))
        lines += ["", deltas_markdown(deltas)]
    return "\n".join(lines)


def _table_prompts(ledger: Ledger, evaluation_ids: Sequence[int]) -> list[str]:
    """Each prompt type's first prompt and its last refinement (box, box+3, point, point+3)."""
    prompts = {m["prompt"] for e in evaluation_ids for m in ledger.metrics(e)}
    kinds = {p.partition("+")[0] for p in prompts}
    chosen = {p for kind in kinds for p in (kind, max((q for q in prompts if q.partition("+")[0] == kind),
                                                      key=prompt_order)) if p in prompts}
    return sorted(chosen, key=prompt_order)


def _evaluation(row: dict[str, Any]) -> Evaluation:
    return Evaluation(**{field: row[field] for field in Evaluation.__dataclass_fields__})


# The README's paired comparisons of an evaluate stage's run: (model, baseline, dataset, prompt).
STAGE_COMPARISONS = (("prompt_kd", "teacher", "sa1b", "box"), ("prompt_kd", "teacher", "coco", "box"),
                     ("prompt_kd", "encoder_kd", "sa1b", "point"),
                     ("prompt_kd+rpn:official", "prompt_kd", "coco", "point"))
DATASET_NAMES = {"sa1b": "SA-1B", "coco": "COCO"}
SHORT_NAMES = {"encoder_kd": "phase 1", "prompt_kd": "phase 2", "prompt_kd+rpn:official": "RPN official",
               "prompt_kd+rpn:weighted": "RPN weighted"}


def stage_label(model: str, backbone: str) -> str:
    """How the README names an evaluate stage's model."""
    if model == "teacher":
        return backbone
    if model.startswith("prompt_kd+rpn:"):
        return f"phase 2 + RPN prior (`{model.partition(':')[2]}`)"
    return {"encoder_kd": "phase 1 (encoder KD)", "prompt_kd": "phase 2 (prompt-in-the-loop KD)"}.get(model, model)


def stage_results_markdown(ledger: Ledger, run_id: str, protocol_name: str = "paper") -> str:
    """The results tables of one evaluate stage's run (`evaluate/<fingerprint>`, as it appended
    them): every model's first-prompt mIoU per dataset with intervals, then the paired
    differences the README quotes, stamped with the run, its date, commit and benchmark."""
    found = [e for e in ledger.run(run_id) if e.protocol_name == protocol_name]
    if not found:
        raise LedgerError(f"run {run_id!r} has no evaluation under protocol {protocol_name!r}")
    by_model = {e.model_name: e for e in found}
    metrics = {e.model_name: {(m["dataset"], m["prompt"]): m for m in ledger.metrics(e.id)} for e in found}
    columns = sorted({key for ms in metrics.values() for key in ms if "+" not in key[1]},
                     key=lambda key: (list(DATASET_NAMES).index(key[0]) if key[0] in DATASET_NAMES else 99, key[0],
                                      prompt_order(key[1])))
    sizes = {ds: m for ms in metrics.values() for (ds, _), m in ms.items()}
    first = found[0]
    lines = [f"Evaluate stage `{first.run_id}` of {first.created_at} (UTC), commit `{first.git_commit or 'unknown'}`; "
             f"benchmark `{first.benchmark_digest[:12]}`: "
             + ", ".join(f"{DATASET_NAMES.get(ds, ds)} {m['images']} images, {m['annotations']} objects"
                         for ds, m in sizes.items()) + ". "
             + describe_protocol(json.loads(first.protocol)["engine"]) + f" Brackets: bootstrap {LEVEL:.0%} intervals "
             "over images.", "",
             "| model | " + " | ".join(f"{DATASET_NAMES.get(ds, ds)} {p}" for ds, p in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, evaluation in by_model.items():
        cells = [interval(m["value"], m["low"], m["high"]) if (m := metrics[name].get(key)) else "" for key in columns]
        lines.append(f"| {stage_label(name, evaluation.backbone)} | " + " | ".join(cells) + " |")
    lines += ["", f"| comparison | difference [{LEVEL:.0%}] | ratio [{LEVEL:.0%}] |", "|---|---|---|"]
    for model, baseline, ds, prompt in STAGE_COMPARISONS:
        if model not in by_model or baseline not in by_model or (ds, prompt) not in metrics[model]:
            continue
        d = paired_difference(ledger.per_image(by_model[model].id, ds, prompt),
                              ledger.per_image(by_model[baseline].id, ds, prompt))
        what = (f"{SHORT_NAMES.get(model, model)} vs {SHORT_NAMES.get(baseline, baseline)}, "
                f"{DATASET_NAMES.get(ds, ds)} {prompt}")
        lines.append(f"| {what} | {d['diff']:+.3f} [{d['diff_low']:+.3f}, {d['diff_high']:+.3f}] | "
                     f"{d['ratio']:.3f} [{d['ratio_low']:.3f}, {d['ratio_high']:.3f}] |")
    return "\n".join(lines)
