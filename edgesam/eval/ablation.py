"""Ablation runs in the results ledger, and their table rendered from it.

Each variant's phase-2 student is measured by its own prompt_kd run on the val images (its
`val_ious.jsonl`: box and point prompts against ground truth and against the teacher's masks).
`append_ablations` records those measurements as ledger evaluations under one run id
(`ablations/<key>`), keyed like every ledger result: the student's SHA-256, the val data's
content (the embed artifact's val shards and the teacher), the report's settings and the
prompt_kd code version. `ablation_markdown` renders the table from the ledger alone, stamped
with the run, its date and commit, so the docs' ablation figures name the code that made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from edgesam.artifacts import Artifact, ArtifactStore
from edgesam.eval.benchmark import ledger_metrics
from edgesam.eval.ledger import Evaluation, EvaluationKey, Ledger, LedgerError
from edgesam.eval.stats import LEVEL, miou_interval, paired_difference
from edgesam.metrics import IoURecord
from edgesam.store.code import code_version

ABLATION_PROMPTS = ("box_gt", "point_gt", "box_teacher", "point_teacher")
BASELINE = "baseline"
PROTOCOL_NAME = "prompt_kd-val"  # the prompt_kd stage's own val report
DATASET = "val"
RUN_PREFIX = "ablations/"  # the ledger run ids of ablations runs
STUDENT = "prompt_kd"  # the model name of the phase-2 student in a prompt_kd run's val_ious.jsonl


def read_ious(path: Path) -> list[IoURecord]:
    """The IoU records of an `ious.jsonl` / `val_ious.jsonl` file (`records_jsonl`)."""
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return [IoURecord(**{k: v for k, v in row.items() if k != "protocol"}) for row in rows]


def ablation_run_id(runs: Mapping[str, Artifact]) -> str:
    """`ablations/<key>`: one id per set of prompt_kd runs (the same runs give the same id)."""
    return RUN_PREFIX + hashlib.sha256("".join(run.fingerprint for run in runs.values()).encode()).hexdigest()[:16]


def val_benchmark_digest(embed: Artifact, teacher: Artifact) -> str:
    """The content a prompt_kd val report measures on: the embed artifact's val shards (images,
    annotations, teacher embeddings) by their recorded SHA-256, and the teacher's weights."""
    shards = sorted((s["path"], s["sha256"]) for s in embed.manifest["splits"][DATASET]["shards"])
    text = "".join(f"{Path(path).name} {digest}\n" for path, digest in shards)
    return hashlib.sha256(f"{text}teacher {teacher.manifest['content']}\n".encode()).hexdigest()


def _evaluation(run: Artifact) -> tuple[EvaluationKey, list[IoURecord], str]:
    """A prompt_kd run's val measurement as a ledger key, its student's IoUs and its backbone."""
    manifest, store = run.manifest, ArtifactStore(run.root)
    records = [r for r in read_ious(run.path / manifest["val_ious"]) if r.model == STUDENT]
    protocol = json.dumps({"report": PROTOCOL_NAME, "dataset": DATASET, "eval_images": manifest["config"]["eval_images"],
                           "prompts": list(ABLATION_PROMPTS)}, sort_keys=True)
    key = EvaluationKey(manifest["files"][manifest["student"]]["sha256"],
                        val_benchmark_digest(store.upstream(run, "embed"), store.upstream(run, "teacher")),
                        protocol, code_version(manifest["code"]))
    return key, records, store.upstream(run, "encoder_kd").manifest["config"]["backbone"]


def _evaluations(ledger: Ledger, run_id: str) -> list[Evaluation]:
    """The ablation evaluations of `run_id`, in the order they were appended."""
    return [e for e in ledger.run(run_id) if e.protocol_name == PROTOCOL_NAME]


def _recorded(ledger: Ledger, run_id: str) -> set[EvaluationKey]:
    """The keys already recorded under `run_id` (none before its first append)."""
    try:
        return {e.key for e in _evaluations(ledger, run_id)}
    except LedgerError:  # no ledger, or no evaluation under this id yet
        return set()


def append_ablations(ledger: Ledger, runs: Mapping[str, Artifact]) -> str:
    """Record each variant's (name -> its prompt_kd artifact) val measurement in `ledger` under
    the runs' id, once (a rerun of the same runs appends nothing); returns the run id."""
    run_id = ablation_run_id(runs)
    recorded = _recorded(ledger, run_id)
    for name, run in runs.items():
        key, records, backbone = _evaluation(run)
        if key not in recorded:
            ledger.append(key, name, backbone, PROTOCOL_NAME, ledger_metrics(records, STUDENT, DATASET), records, run_id)
    return run_id


def ablation_rows(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    """Per variant of the run and prompt: the val mIoU with its interval, and the paired
    difference to the baseline (the same val annotations), from the ledger's IoUs."""
    by_name = {e.model_name: e for e in _evaluations(ledger, run_id)}
    if BASELINE not in by_name:
        raise LedgerError(f"run {run_id!r} has no {BASELINE!r} evaluation (variants: {sorted(by_name)})")
    ious = {name: {p: ledger.per_image(e.id, DATASET, p) for p in ABLATION_PROMPTS} for name, e in by_name.items()}
    rows = []
    for name in by_name:
        row: dict[str, Any] = {"variant": name}
        for prompt in ABLATION_PROMPTS:
            row[prompt] = miou_interval(ious[name][prompt])
            if name != BASELINE:
                row[f"{prompt}_vs_baseline"] = paired_difference(ious[name][prompt], ious[BASELINE][prompt])
        rows.append(row)
    return rows


def ablation_table(rows: list[dict[str, Any]]) -> list[str]:
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
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return lines


def ablation_markdown(ledger: Ledger, run_id: str) -> str:
    """The ablation table of one ablations run, stamped with its id, date, commit and val data."""
    rows = ablation_rows(ledger, run_id)
    first = _evaluations(ledger, run_id)[0]
    size = rows[0][ABLATION_PROMPTS[0]]
    return "\n".join([
        f"Ablations `{first.run_id}` of {first.created_at} (UTC), commit `{first.git_commit or 'unknown'}`; val data "
        f"`{first.benchmark_digest[:12]}`: {size['images']} images, {size['annotations']} objects. Each variant's "
        f"phase-2 student on its prompt_kd run's val report: mIoU vs ground truth (`_gt`) and vs the teacher's masks "
        f"(`_teacher`) [bootstrap {LEVEL:.0%} over images]; for each variant also its paired difference to the "
        f"baseline [{LEVEL:.0%}], `*` where that interval excludes 0.", "", *ablation_table(rows)])
