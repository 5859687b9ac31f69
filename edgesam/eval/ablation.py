"""Ablation tables: each variant's val mIoU with its bootstrap interval and the paired
difference to the baseline, from the runs' per-annotation IoU files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgesam.eval.stats import miou_interval, paired_difference, per_image
from edgesam.metrics import IoURecord

ABLATION_PROMPTS = ("box_gt", "point_gt", "box_teacher", "point_teacher")


def read_ious(path: Path) -> list[IoURecord]:
    """The IoU records of an `ious.jsonl` / `val_ious.jsonl` file (`records_jsonl`)."""
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return [IoURecord(**{k: v for k, v in row.items() if k != "protocol"}) for row in rows]


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
