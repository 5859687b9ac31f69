"""Flow `edgesam-nightly`: the registered models evaluated every night, a regression gate, an alert.

The pinned set is every registered model version an alias points at (`edgesam models register
BUNDLE --name N --alias champion`), plus, with `latest_export`, the newest committed export of
the profile. Each is evaluated on a fixed benchmark (a shard artifact's val split) unless the
ledger already holds its (model, benchmark, protocol, evaluation code) result, so a night on
unchanged models evaluates nothing and says so. Each model evaluated anew is compared with its
previous entry, and the `candidate` with the `champion`, by the paired bootstrap
(`edgesam.eval.gate`). A regression emits the Prefect event `edgesam.eval.regressed` (one per
regressed metric) and fails the run with the table of deltas; the automation of
`create_regression_automation` sends the user's notification block on that event. Artifacts:
`edgesam-nightly-gate` (the deltas), `edgesam-nightly-history` (metric per night per model) and
`edgesam-nightly-trend` (its plot). Nothing is written into a bundle: models are only read.

    python -m flows.nightly                                        # one night, now
    python -m flows.nightly --notify custom-webhook/edgesam-alerts # create the automation
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.automations import Automation, EventTrigger, SendNotification
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.events import emit_event
from prefect.runtime import flow_run

from edgesam.eval.benchmark import Benchmark, eval_code_version
from edgesam.eval.gate import GATED_PROMPTS, TOLERANCE, Delta, compare, deltas_markdown
from edgesam.eval.history import history_rows, plot_trend
from edgesam.eval.ledger import EvaluationKey, Ledger, NightEntry, default_path
from edgesam.eval.registry import CANDIDATE, CHAMPION, ModelVersion, Registry, describe, load_model
from edgesam.store.explain import nearest_committed
from flows.evaluation import embed_images
from edgesam.config import load_profile
from flows.params import Profile

REGRESSED = "edgesam.eval.regressed"
AUTOMATION = "edgesam-eval-regressed"
NOTIFICATION_SUBJECT = "edgesam: {{ event.payload.model }} regressed on {{ event.payload.metric }}"
NOTIFICATION_BODY = (
    "{{ event.payload.model }} ({{ event.payload.comparison }}, baseline {{ event.payload.baseline }}): "
    "{{ event.payload.metric }} changed by {{ event.payload.delta }}, 95% interval {{ event.payload.interval }}, "
    "beyond the tolerance {{ event.payload.tolerance }} ({{ event.payload.images }} images, "
    "{{ event.payload.annotations }} objects). Event {{ event.id }} at {{ event.occurred }}."
)


class RegressionError(RuntimeError):
    """A model of the pinned set is worse than its baseline beyond the gate's tolerance."""


def newest_committed(work_dir: Path, stage: str) -> Path:
    """The most recently committed artifact of `stage` under `work_dir`."""
    manifest = nearest_committed(work_dir / stage)
    if manifest is None:
        raise FileNotFoundError(f"{work_dir / stage}: no committed {stage} artifact; run the pipeline first or "
                                f"pass the parameter {'benchmark' if stage == 'shard' else 'latest_export=false'}")
    return work_dir / stage / manifest["fingerprint"]


def pinned_models(ledger: Path, export: Path | None, export_name: str) -> list[ModelVersion]:
    """Every aliased version, and the bundle `export` (unregistered) as `export_name` when given."""
    models = Registry(ledger).aliased()
    if export is not None:
        models.append(describe(export, export_name))
    if not models:
        raise ValueError(f"{ledger}: no model to evaluate; register one first: "
                         "edgesam models register BUNDLE --name NAME --alias champion")
    return models


@task(name="evaluate-model", task_run_name="evaluate {model.name}", cache_policy=NO_CACHE)
def evaluate_model(ledger: Path, model: ModelVersion, benchmark: Benchmark, key: EvaluationKey, run_id: str) -> int:
    """Evaluate one model on the benchmark and append the result to the ledger (its id)."""
    records, metrics = benchmark.measure(model.name, load_model(model))
    return Ledger(ledger).append(key, model.name, model.backbone, benchmark.protocol.name, metrics, records, run_id)


def night_deltas(ledger: Ledger, models: Sequence[ModelVersion], entries: Sequence[NightEntry],
                 tolerance: float) -> list[Delta]:
    """Each model evaluated anew vs its previous entry, and the candidate vs the champion."""
    current = {m.label: ledger.get(e.evaluation_id) for m, e in zip(models, entries)}
    deltas = []
    for model, entry in zip(models, entries):
        previous = None if entry.reused else ledger.previous(model.name, current[model.label])
        if previous is not None:
            why = "new weights" if previous.model_digest != current[model.label].model_digest else "new evaluation code"
            deltas += compare(ledger, current[model.label], previous, f"vs previous entry ({why})", model.label,
                              f"evaluation {previous.id} of {previous.created_at}", tolerance)
    holders = {alias: m for m in models for alias in m.aliases}
    if {CHAMPION, CANDIDATE} <= set(holders):
        champion, candidate = current[holders[CHAMPION].label], current[holders[CANDIDATE].label]
        if champion.id != candidate.id:
            deltas += compare(ledger, candidate, champion, "candidate vs champion", holders[CANDIDATE].label,
                              holders[CHAMPION].label, tolerance)
    return deltas


def publish(ledger: Ledger, deltas: Sequence[Delta], summary: str) -> None:
    """The gate's deltas, the history table and the trend plot (also written beside the ledger)."""
    create_markdown_artifact(f"# edgesam nightly gate\n\n{summary}\n\n{deltas_markdown(deltas)}\n",
                             key="edgesam-nightly-gate", description="deltas with paired bootstrap intervals")
    create_table_artifact(history_rows(ledger), key="edgesam-nightly-history",
                          description=f"mIoU per night per model ({', '.join(GATED_PROMPTS)} prompts)")
    trend = ledger.path.with_name(f"{ledger.path.stem}-trend.png")
    plot_trend(ledger, trend)
    create_markdown_artifact(embed_images(f"# edgesam nightly trend\n\n![trend]({trend.name})\n", trend.parent),
                             key="edgesam-nightly-trend", description="mIoU per night per model")


def alert(deltas: Sequence[Delta], models: Sequence[ModelVersion]) -> None:
    """One `edgesam.eval.regressed` event per regressed metric, about the model that regressed."""
    names = {m.label: m.name for m in models}
    for delta in deltas:
        emit_event(event=REGRESSED, resource={"prefect.resource.id": f"edgesam.model.{names[delta.model]}",
                                              "prefect.resource.name": delta.model}, payload=delta.payload())


@flow(name="edgesam-nightly", log_prints=True)
def edgesam_nightly(
    profile: Profile = "default",
    work_dir: Path | None = None,
    ledger: Path | None = None,
    benchmark: Path | None = None,
    latest_export: bool = False,
    protocol: Literal["paper", "sam"] = "paper",
    refine_iters: int = 3,
    max_images: int | None = None,
    max_annotations: int | None = 64,
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Evaluate the pinned models where the ledger has no result, gate candidate vs champion and
    each new result vs its previous entry; fail with the deltas and an event on a regression.

    Args:
        profile, work_dir: the work dir (default: the profile's) that holds the ledger, the
            default benchmark and the latest export.
        ledger: the ledger file (default `EDGESAM_LEDGER` or `<work_dir>/ledger.sqlite`).
        benchmark: a shard artifact directory whose val split is the benchmark (default: the
            newest committed shard artifact of the work dir).
        latest_export: also evaluate the newest committed export of `profile`.
        protocol, refine_iters: the engine's prompting protocol and its corrective clicks.
        max_images, max_annotations, seed: which val images and objects, and the clicks' seed.
        tolerance: a drop counts when its 95 % interval lies below -tolerance (mIoU).
    """
    logger = get_run_logger()
    work_dir = Path(work_dir or load_profile(profile).runtime.work_dir).expanduser().resolve()
    store = Ledger(ledger or default_path(work_dir))
    bench = Benchmark.open(benchmark or newest_committed(work_dir, "shard"), protocol, refine_iters, max_images,
                           max_annotations, seed)
    export = newest_committed(work_dir, "export") if latest_export else None
    models = pinned_models(store.path, export, f"latest-export-{profile}")
    run_id, code = str(flow_run.id), eval_code_version()
    logger.info("benchmark %s (%s), protocol %s, evaluation code %s, ledger %s", bench.root, bench.digest[:12],
                bench.protocol.name, code, store.path)
    entries = []
    for model in models:
        key = EvaluationKey(model.digest, bench.digest, bench.protocol_key, code)
        hit = store.find(key)
        if hit is None:
            evaluation_id = evaluate_model(store.path, model, bench, key, run_id)
        else:
            evaluation_id = hit.id
            logger.info("%s: in the ledger (evaluation %d, %s), not evaluated again", model.label, hit.id,
                        hit.created_at)
        entries.append(NightEntry(model.name, model.version, model.aliases, evaluation_id, hit is not None))
    store.record_night(run_id, bench.digest, bench.protocol_key, entries)
    evaluated = [m.label for m, e in zip(models, entries) if not e.reused]
    summary = (f"Night `{run_id}`: evaluated {', '.join(evaluated) or 'nothing'}; "
               f"{sum(e.reused for e in entries)} of {len(entries)} results from the ledger.")
    logger.info(summary)
    deltas = night_deltas(store, models, entries, tolerance)
    publish(store, deltas, summary)
    regressions = [d for d in deltas if d.regressed]
    alert(regressions, models)
    if regressions:
        raise RegressionError(f"{len(regressions)} regression(s) beyond -{tolerance:g} mIoU:\n"
                              f"{deltas_markdown(deltas)}")
    logger.info("no regression:\n%s", deltas_markdown(deltas))
    return {"run_id": run_id, "evaluated": evaluated, "entries": [e.evaluation_id for e in entries],
            "deltas": [d.row() for d in deltas]}


def regression_automation(block_document_id: Any) -> Automation:
    """The automation that sends the notification block `block_document_id` on every regression event."""
    return Automation(
        name=AUTOMATION, description="edgesam nightly: a model got worse (flows/nightly.py)",
        trigger=EventTrigger(expect={REGRESSED}, match={"prefect.resource.id": "edgesam.model.*"}, posture="Reactive",
                             threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_document_id, subject=NOTIFICATION_SUBJECT,
                                  body=NOTIFICATION_BODY)],
    )


def create_regression_automation(block: str) -> Automation:
    """Create the automation (replacing an earlier one of the same name) for the saved notification
    block `block`, named `<block type slug>/<block name>` (e.g. `slack-webhook/edgesam-alerts`)."""
    slug, _, name = block.partition("/")
    if not name:
        raise ValueError(f"notification block {block!r}: expected <block type slug>/<name>, "
                         "e.g. custom-webhook/edgesam-alerts (see `prefect block ls`)")
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name=name, block_type_slug=slug)
        for old in client.read_automations_by_name(AUTOMATION):
            client.delete_automation(old.id)
    return regression_automation(document.id).create()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--notify", metavar="SLUG/NAME",
                        help="create the regression automation for this saved notification block, and exit")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: the profile's")
    parser.add_argument("--ledger", type=Path, default=None)
    parser.add_argument("--benchmark", type=Path, default=None, help="a shard artifact directory (its val split)")
    parser.add_argument("--latest-export", action="store_true")
    args = parser.parse_args(argv)
    if args.notify:
        print(f"automation {create_regression_automation(args.notify).id} ({AUTOMATION}) -> {args.notify}")
        return
    result = edgesam_nightly(profile=args.profile, work_dir=args.work_dir, ledger=args.ledger,
                             benchmark=args.benchmark, latest_export=args.latest_export)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
