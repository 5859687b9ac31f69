"""The backbone leaderboard: one row per distilled student, accuracy with intervals beside speed.

Accuracy is the phase-2 student's mIoU on one val set of its evaluate run (`ious.jsonl`,
first prompt, one protocol) with a bootstrap 95 % interval over images, the paired difference
to the baseline backbone's student on the same annotations, and its ratio to the teacher.
Intervals over images do not cover what training varies (initialisation, data order, prompt
draws): when the baseline was trained with several seeds, the largest gap between its seeds is
the seed noise, and a row's difference counts as real only when its interval excludes zero
*and* it is larger than that gap. Speed comes from `edgesam.export.latency.backbone_speed`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgesam.artifacts import atomic_path  # noqa: E402
from edgesam.eval.plots import COLORS  # noqa: E402
from edgesam.eval.stats import miou_interval, paired_difference, per_image  # noqa: E402
from edgesam.metrics import IoURecord  # noqa: E402

PROMPTS = ("box", "point")
STUDENT, TEACHER = "prompt_kd", "teacher"
SPEED_KEYS = ("encoder_params_m", "decoder_params_m", "encoder_gmacs", "decoder_gmacs", "torch_fused_ms",
              "onnx_fp32_ms", "onnx_int8_ms")
OK = "ok"


@dataclass(frozen=True)
class Entry:
    """One trained (or refused) student of a sweep: `status` is `ok` or `failed: <reason>`."""

    label: str
    backbone: str
    seed: int
    status: str
    evaluate_dir: Path | None = None


def read_records(path: Path, protocol: str) -> list[IoURecord]:
    """The IoU records of one protocol in an evaluate run's `ious.jsonl`."""
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return [IoURecord(**{k: v for k, v in row.items() if k != "protocol"}) for row in rows
            if row["protocol"] == protocol]


def _paired(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, Any] | None:
    try:
        return paired_difference(a, b)
    except ValueError:  # other images or annotation subsets (another evaluation seed drew them)
        return None


def _accuracy(records: list[IoURecord], baseline: list[IoURecord], dataset: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for prompt in PROMPTS:
        mine = per_image(records, STUDENT, dataset, prompt)
        m = miou_interval(mine)
        row |= {f"{prompt}_miou": m["miou"], f"{prompt}_low": m["low"], f"{prompt}_high": m["high"],
                f"{prompt}_annotations": m["annotations"]}
        d = _paired(mine, per_image(baseline, STUDENT, dataset, prompt))
        row |= {f"{prompt}_diff": d and d["diff"], f"{prompt}_diff_low": d and d["diff_low"],
                f"{prompt}_diff_high": d and d["diff_high"]}
        t = paired_difference(mine, per_image(records, TEACHER, dataset, prompt))
        row |= {f"{prompt}_teacher_ratio": t["ratio"], f"{prompt}_teacher_ratio_low": t["ratio_low"],
                f"{prompt}_teacher_ratio_high": t["ratio_high"]}
    return row


def seed_gaps(rows: Sequence[dict[str, Any]], baseline: str) -> dict[str, float | None]:
    """Per prompt, the largest |mIoU difference| between the baseline backbone's seeds (None: one seed)."""
    base = next(r for r in rows if r["label"] == baseline)
    others = [r for r in rows if r["backbone"] == base["backbone"] and r["label"] != baseline and r["status"] == OK]
    return {p: max((abs(r[f"{p}_miou"] - base[f"{p}_miou"]) for r in others), default=None) for p in PROMPTS}


def _verdict(row: dict[str, Any], prompt: str, gap: float | None, baseline: dict[str, Any]) -> str:
    if row["label"] == baseline["label"]:
        return "baseline"
    if row["backbone"] == baseline["backbone"]:
        return "seed replicate"
    low, high = row[f"{prompt}_diff_low"], row[f"{prompt}_diff_high"]
    if low is None:
        return "not paired"
    if not (low > 0 or high < 0):
        return "within image noise"
    if gap is None:
        return "beyond image noise (seed noise not measured)"
    return "beyond image and seed noise" if abs(row[f"{prompt}_diff"]) > gap else "beyond image noise, within seed noise"


def leaderboard_rows(entries: Sequence[Entry], speeds: dict[str, dict[str, Any]], baseline: str,
                     dataset: str = "sa1b", protocol: str = "paper") -> list[dict[str, Any]]:
    """One row per entry (in order): status, speed of its backbone, accuracy and verdicts against
    `baseline` (an entry label whose status is ok)."""
    records = {e.label: read_records(e.evaluate_dir / "ious.jsonl", protocol) for e in entries if e.status == OK}
    if baseline not in records:
        raise ValueError(f"the baseline {baseline!r} has no evaluation; rows: {[e.label for e in entries]}")
    rows = []
    for e in entries:
        row: dict[str, Any] = {"label": e.label, "backbone": e.backbone, "seed": e.seed, "status": e.status,
                               "dataset": dataset, "protocol": protocol}
        row |= {key: speeds.get(e.backbone, {}).get(key) for key in SPEED_KEYS}
        if e.status == OK:
            row |= _accuracy(records[e.label], records[baseline], dataset)
            row["evaluate"] = str(e.evaluate_dir)
        rows.append(row)
    gaps = seed_gaps(rows, baseline)
    base = next(r for r in rows if r["label"] == baseline)
    for row in rows:
        for prompt in PROMPTS:
            row[f"{prompt}_seed_gap"] = gaps[prompt]
            row[f"{prompt}_verdict"] = _verdict(row, prompt, gaps[prompt], base) if row["status"] == OK else None
    return rows


def leaderboard_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Every field of every row (failed rows leave the measurements empty)."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _miou_cell(row: dict[str, Any], prompt: str) -> str:
    return f"{row[f'{prompt}_miou']:.3f} [{row[f'{prompt}_low']:.3f}, {row[f'{prompt}_high']:.3f}]"


MARKS = {"beyond image and seed noise": " **", "beyond image noise, within seed noise": " *",
         "beyond image noise (seed noise not measured)": " *"}


def _diff_cell(row: dict[str, Any], prompt: str) -> str:
    if row[f"{prompt}_diff"] is None or row[f"{prompt}_verdict"] == "baseline":
        return "-" if row[f"{prompt}_verdict"] != "baseline" else "baseline"
    return (f"{row[f'{prompt}_diff']:+.3f} [{row[f'{prompt}_diff_low']:+.3f}, {row[f'{prompt}_diff_high']:+.3f}]"
            f"{MARKS.get(row[f'{prompt}_verdict'], '')}")


def _ratio_cell(row: dict[str, Any]) -> str:
    return " / ".join(f"{row[f'{p}_teacher_ratio']:.3f} [{row[f'{p}_teacher_ratio_low']:.3f}, "
                      f"{row[f'{p}_teacher_ratio_high']:.3f}]" for p in PROMPTS)


def _speed_cells(row: dict[str, Any]) -> list[str]:
    total = None if row["encoder_params_m"] is None else row["encoder_params_m"] + row["decoder_params_m"]
    gmacs = None if row["encoder_gmacs"] is None else row["encoder_gmacs"] + row["decoder_gmacs"]
    return [f"{_num(row['encoder_params_m'], 2)} / {_num(total, 2)}", _num(gmacs, 2), _num(row["torch_fused_ms"]),
            _num(row["onnx_fp32_ms"]), _num(row["onnx_int8_ms"])]


def leaderboard_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table: speed, mIoU [95 %], difference to the baseline [95 %] (* beyond image noise,
    ** beyond image and seed noise), phase 2 / teacher [95 %], status."""
    lines = ["| student | params M (encoder / + decoder) | GMACs (encoder + decoder, 1 box) | PyTorch fused ms | "
             "ONNX fp32 ms | ONNX int8 ms | box mIoU [95%] | point mIoU [95%] | box vs baseline [95%] | "
             "point vs baseline [95%] | phase 2 / teacher, box / point [95%] | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"`{row['label']}`", *_speed_cells(row)]
        if row["status"] == OK:
            cells += [_miou_cell(row, "box"), _miou_cell(row, "point"), _diff_cell(row, "box"),
                      _diff_cell(row, "point"), _ratio_cell(row)]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join([*cells, row["status"]]) + " |")
    return lines


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both latency (lower) and mIoU (higher), by latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path, latency: str = "onnx_fp32_ms") -> None:
    """mIoU [95 %] against encoder latency, one panel per prompt type, the Pareto frontier drawn."""
    done = [r for r in rows if r["status"] == OK and r.get(latency) is not None]
    fig, axes = plt.subplots(1, len(PROMPTS), figsize=(5.6 * len(PROMPTS), 4.2), squeeze=False)
    fig.subplots_adjust(wspace=0.3)
    for ax, prompt in zip(axes[0], PROMPTS):
        for i, r in enumerate(done):
            y = r[f"{prompt}_miou"]
            ax.errorbar(r[latency], y, yerr=[[y - r[f"{prompt}_low"]], [r[f"{prompt}_high"] - y]], fmt="o",
                        color=COLORS[i % len(COLORS)], capsize=3)
            ax.annotate(r["label"], (r[latency], y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = _frontier([(r[latency], r[f"{prompt}_miou"]) for r in done])
        if front:  # a step per frontier point, held to the slowest run: the best mIoU within each latency
            front.append((max(r[latency] for r in done), front[-1][1]))
            ax.step(*zip(*front), where="post", color="gray", linestyle="--", label="Pareto frontier")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(f"encoder latency, {latency.replace('_ms', '').replace('_', ' ')} (ms, this machine)")
        ax.set_ylabel(f"{prompt} mIoU, phase-2 student [95%]")
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
