"""The paper's phase-2 ablations as a flow: prompt_kd reruns from the cached upstream artifacts.

Each variant is the `edgesam` flow (a subflow) with `stages=["prompt_kd"]` and one change to
the `prompt_kd` section; embed, teacher and encoder_kd come from the cache (run the DAG
first). The measurement is each run's own val report (the phase-2 student's box and point
mIoU against ground truth and against the teacher, on the same val annotations). It goes into
the work dir's results ledger under one run id (`ablations/<key>`), and the table, with
bootstrap intervals and the paired difference to the baseline, is rendered from the ledger
(`edgesam.eval.ablation`; again later with `edgesam models results --run ablations/<key>`).

    python -m flows.ablations --profile default        # or: prefect deployment run edgesam-ablations/default
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from edgesam.artifacts import Artifact, write_json_atomic, write_text_atomic
from edgesam.config import deep_merge
from edgesam.eval.ablation import BASELINE, ablation_markdown, ablation_rows, append_ablations
from edgesam.eval.ledger import Ledger, default_path
from flows.params import Profile
from flows.pipeline import edgesam

# EdgeSAM's ablations of prompt-in-the-loop KD (paper Sec. 4.3): decoding iterations, prompt
# types, a frozen decoder, and soft (logit) instead of binary teacher targets.
VARIANTS: dict[str, dict[str, Any]] = {
    "decode_iters=1": {"decode_iters": 1},
    "decode_iters=3": {"decode_iters": 3},
    "box prompts only": {"prompt_types": "box"},
    "point prompts only": {"prompt_types": "point"},
    "frozen decoder": {"freeze_decoder": True},
    "logit targets": {"target": "logits"},
}


@flow(name="edgesam-ablations", log_prints=True)
def edgesam_ablations(
    profile: Profile = "default",
    work_dir: Path | None = None,
    variants: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rerun prompt_kd for the baseline (the profile as is) and each variant (default: all of
    `VARIANTS`), then write and publish the ablation table with intervals."""
    logger = get_run_logger()
    names = variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {sorted(VARIANTS)}")
    runs: dict[str, Artifact] = {}
    for name in [BASELINE, *names]:
        change = {} if name == BASELINE else {"prompt_kd": VARIANTS[name]}
        logger.info("ablation %s: prompt_kd with %s", name, change or "the profile's settings")
        result = edgesam(profile=profile, work_dir=work_dir, stages=["prompt_kd"],
                         overrides=deep_merge(overrides or {}, change))
        runs[name] = Artifact("prompt_kd", result["prompt_kd"]["fingerprint"], Path(result["prompt_kd"]["path"]))
    store_root = runs[BASELINE].root
    ledger = Ledger(default_path(store_root))
    run_id = append_ablations(ledger, runs)
    table = "\n".join([f"# EdgeSAM phase-2 ablations, profile `{profile}`", "", ablation_markdown(ledger, run_id), "",
                       *[f"- `{name}`: `{run.path}`" for name, run in runs.items()], "",
                       f"The same table from the ledger: `edgesam models results --run {run_id}"
                       f" --ledger {ledger.path}`", ""])
    rows = ablation_rows(ledger, run_id)
    out = store_root / run_id
    write_json_atomic(out / "ablations.json", {"run_id": run_id, "runs": {n: str(r.path) for n, r in runs.items()},
                                               "rows": rows})
    write_text_atomic(out / "ablations.md", table)
    create_markdown_artifact(table, key=f"edgesam-ablations-{profile}", description="phase-2 ablations")
    logger.info("ablation table: %s (ledger run %s)", out / "ablations.md", run_id)
    return {"table": str(out / "ablations.md"), "rows": rows, "run_id": run_id}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.ablations", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    args = parser.parse_args()
    print(edgesam_ablations(profile=args.profile, work_dir=args.work_dir, variants=args.variants)["table"])


if __name__ == "__main__":
    main()
