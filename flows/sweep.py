"""The `edgesam-sweep` flow: several student backbones distilled from one teacher, one leaderboard.

    python -m flows.sweep --profile default --backbones repvit_m1,tiny_vit_5m_224,efficientvit_b1 --seeds 0,1
    prefect deployment run edgesam-sweep/default --param 'backbones=["repvit_m1","resnet18"]' --watch

1. Every backbone passes the pre-flight check (`edgesam.models.backbones`) first, in seconds; one
   that cannot work gets its row `failed: <reason>` and nothing is trained for it.
2. The stages every run shares (data, shard, teacher, embed: the same fingerprints) run once.
3. Per run, encoder_kd -> prompt_kd -> rpn -> evaluate -> export, as the `edgesam` flow's stage
   tasks (cached by fingerprint; `concurrency` chains at a time). The evaluate stage evaluates
   the teacher once for all runs (`edgesam.eval.teacher_reuse`). A stage that fails ends its
   run's row as `failed at <stage>: <error>`; the other runs go on.
4. Every backbone's speed at `latency_size`, measured one after another in one task
   (`edgesam.export.latency`), kept in the store so a rerun prints the same numbers.
5. The leaderboard (`edgesam.eval.leaderboard`): CSV, Markdown, JSON and the Pareto plot under
   `<work_dir>/sweep/<name>-<key>/`, and Prefect artifacts keyed by profile and sweep name.

The baseline backbone is trained with every seed of `seeds` (the others with the first), so a
difference between backbones can be told from training noise as well as from image noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from edgesam.artifacts import ArtifactStore, fingerprint, write_json_atomic, write_text_atomic
from edgesam.config import STAGES, PipelineConfig, deep_merge, parse_overrides
from edgesam.cluster import resolve_device
from edgesam.data.shards import iter_samples, list_shards
from edgesam.eval.leaderboard import OK, Entry, leaderboard_csv, leaderboard_markdown, leaderboard_rows, plot_pareto
from edgesam.export.latency import backbone_speed
from edgesam.models.backbones import check_student
from edgesam.store.code import code_version, module_digests
from flows.evaluation import artifact_key, embed_images
from flows.params import Profile, pipeline_config
from flows.pipeline import forward_stage_logs, ray_connection, stage_task
from pipelines.stage import PlannedStage, plan

DEFAULT_BACKBONES = ["repvit_m1", "tiny_vit_5m_224", "efficientvit_b1", "mobilenetv3_large_100"]
SPEED_STORE, RESULT = "sweep_speed", "result.json"
CALIBRATION_IMAGES = 4
PARETO = "pareto.png"


@dataclass
class SweepRun:
    """One student of the sweep: its row label, backbone, training seed and whole config."""

    label: str
    backbone: str
    seed: int
    cfg: PipelineConfig


def sweep_runs(profile: str, backbones: list[str], seeds: list[int] | None, overrides: dict[str, Any] | None,
               backbone_overrides: dict[str, dict[str, Any]] | None, pretrained: dict[str, Path] | None,
               work_dir: Path | None) -> list[SweepRun]:
    """The runs in order: every backbone with the first seed, then the first backbone with the others."""
    if not backbones:
        raise ValueError("backbones: name at least one timm model")
    unknown = sorted(set(backbone_overrides or {}) | set(pretrained or {}) - set(backbones))
    if unknown:
        raise ValueError(f"backbone_overrides / pretrained name backbones that are not swept: {unknown}")

    def config(backbone: str, seed: int | None) -> PipelineConfig:
        own = deep_merge(overrides or {}, (backbone_overrides or {}).get(backbone, {}))
        if backbone in (pretrained or {}):
            own = deep_merge(own, {"encoder_kd": {"pretrained": str(pretrained[backbone])}})
        if seed is not None:
            own = deep_merge(own, {"runtime": {"seed": seed}})
        return pipeline_config(profile, own, backbone=backbone, work_dir=work_dir)

    first = config(backbones[0], None).runtime.seed if not seeds else seeds[0]
    runs = [SweepRun(b, b, first, config(b, first)) for b in dict.fromkeys(backbones)]
    runs += [SweepRun(f"{backbones[0]} seed {s}", backbones[0], s, config(backbones[0], s))
             for s in dict.fromkeys(seeds or []) if s != first]
    return runs


@task(name="preflight", task_run_name="preflight-{run.label}", cache_policy=NO_CACHE)
def preflight_task(run: SweepRun) -> dict[str, Any]:
    """The pre-flight check of the run's student at its teacher's input size."""
    return check_student(run.cfg.encoder_kd, run.cfg.shard.target_size).as_dict()


def memoized(store: ArtifactStore, name: str, key: dict[str, Any], module: str, compute: Callable[[], Any]) -> Any:
    """`compute()`'s JSON result, kept under `<store>/<name>/<fingerprint of key and module's code>`."""
    artifact = store.artifact(name, fingerprint(name, key, {}, code_version(module_digests(module))))
    if artifact.complete:
        return json.loads((artifact.path / RESULT).read_text())
    value = compute()
    artifact.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(artifact.path / RESULT, value)
    artifact.commit({"files": [RESULT], "key": key})
    return value


@task(name="speed", cache_policy=NO_CACHE)  # kept in the artifact store instead
def speed_task(store_root: Path, backbones: list[str], img_size: int, repeats: int, shard_dir: Path) -> dict[str, Any]:
    """Every backbone's speed at `img_size`, one after another in this process (measured once per store)."""
    images = [s.image for _, s in zip(range(CALIBRATION_IMAGES), iter_samples(list_shards(shard_dir, "train")))]

    def measure() -> dict[str, Any]:
        return {b: backbone_speed(b, img_size, repeats, images) for b in backbones}

    key = {"backbones": backbones, "img_size": img_size, "repeats": repeats, "calibration": shard_dir.name}
    return memoized(ArtifactStore(store_root), SPEED_STORE, key, backbone_speed.__module__, measure)


def shared_stages(plans: list[dict[str, PlannedStage]]) -> list[str]:
    """The leading stages whose fingerprints every run shares (data, shard, teacher, embed)."""
    shared = []
    for name in STAGES:
        if len({p[name].fingerprint for p in plans}) > 1:
            break
        shared.append(name)
    return shared


def _failure(futures: dict[str, PrefectFuture]) -> str | None:
    """None when every stage of a run completed, else `failed at <stage>: <its error>`."""
    for name, future in futures.items():
        state = future.state
        if state.is_failed() or state.is_crashed():
            error = future.result(raise_on_failure=False)
            return f"failed at {name}: {type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
        if not state.is_completed():
            return f"failed at {name}: not run ({state.name})"
    return None


def run_chains(runs: list[SweepRun], plans: dict[str, dict[str, PlannedStage]], stages: list[str],
               concurrency: int) -> dict[str, str | None]:
    """Each run's `stages` in order, `concurrency` runs at a time; label -> failure (None: completed)."""
    futures: dict[str, dict[str, PrefectFuture]] = {r.label: {} for r in runs}
    order = ([(r, s) for r in runs for s in stages] if concurrency == 1  # one run after another
             else [(r, s) for s in stages for r in runs])  # a free worker never waits on a queued stage
    with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
        for run, name in order:
            previous = list(futures[run.label].values())[-1:]
            futures[run.label][name] = runner.submit(
                stage_task, {"name": name, "cfg": run.cfg, "planned": plans[run.label][name]}, wait_for=previous)
        for chain in futures.values():
            for future in chain.values():
                future.wait()
    return {label: _failure(chain) for label, chain in futures.items()}


def write_leaderboard(rows: list[dict[str, Any]], out: Path, title: str) -> str:
    """leaderboard.{csv,md,json} and the Pareto plot in `out`; returns the Markdown."""
    plot_pareto(rows, out / PARETO)
    markdown = "\n".join([f"# {title}", "", *leaderboard_markdown(rows), "", *legend(rows), "",
                          f"![Pareto: mIoU vs encoder latency]({PARETO})", ""])
    write_text_atomic(out / "leaderboard.csv", leaderboard_csv(rows))
    write_json_atomic(out / "leaderboard.json", rows)
    write_text_atomic(out / "leaderboard.md", markdown)
    return markdown


def legend(rows: list[dict[str, Any]]) -> list[str]:
    """How to read the table: the data set, the protocol, the speed conditions and the seed gap."""
    row = rows[0]
    gaps = ", ".join(f"{p} {row[f'{p}_seed_gap']:.3f}" for p in ("box", "point") if row.get(f"{p}_seed_gap") is not None)
    return [f"mIoU of the phase-2 student, first prompt, `{row['dataset']}` val set, protocol `{row['protocol']}`; "
            "[95%]: bootstrap over images; vs baseline: paired difference on the same annotations. "
            "`*`: the interval excludes 0; `**`: it also exceeds the baseline's seed gap"
            + (f" (largest mIoU difference between its seeds: {gaps})." if gaps else " (one seed: not measured)."),
            "Speed: backbones rebuilt at the latency size with random weights, measured one after another in one "
            "process (median ms, CPU); GMACs: torch.utils.flop_counter FLOPs / 2."]


def publish(rows: list[dict[str, Any]], markdown: str, out: Path, profile: str, name: str,
            runs: list[SweepRun], evaluated: dict[str, Path]) -> None:
    """The leaderboard as a table and a Markdown artifact, and every run's evaluation report,
    each under a key naming the profile, the sweep and (reports) the run."""
    create_table_artifact([{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows],
                          key=artifact_key("sweep", profile, name), description="backbone leaderboard")
    create_markdown_artifact(embed_images(markdown, out), key=artifact_key("sweep", profile, name, "report"),
                             description=f"backbone sweep leaderboard ({out})")
    for run in runs:
        report = evaluated.get(run.label)
        if report is not None and (report / "report.md").is_file():
            body = embed_images((report / "report.md").read_text(), report)
            create_markdown_artifact(f"Evaluation artifact: `{report}`\n\n{body}",
                                     key=artifact_key("sweep", profile, name, run.label),
                                     description=f"evaluation of student {run.label}")


@flow(name="edgesam-sweep", log_prints=True)
def edgesam_sweep(
    profile: Profile = "default",
    backbones: list[str] | None = None,
    seeds: list[int] | None = None,
    baseline: str | None = None,
    name: str = "default",
    work_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    backbone_overrides: dict[str, dict[str, Any]] | None = None,
    pretrained: dict[str, Path] | None = None,
    latency_size: int = 1024,
    latency_repeats: int = 5,
    dataset: str = "sa1b",
    concurrency: int = 1,
) -> dict[str, Any]:
    """Distil every backbone of `backbones` (default: `DEFAULT_BACKBONES`) through the whole DAG
    and rank them in one leaderboard (see the module docstring).

    Args:
        profile: the profile every run starts from (`smoke`, `default`, `paper`).
        backbones: timm model names; the first is the baseline unless `baseline` names another.
        seeds: training seeds (`runtime.seed`) of the baseline backbone; the others train with the first.
        baseline: the backbone the differences are taken against.
        name: the sweep's name, in its output folder and Prefect artifact keys.
        work_dir: artifact root (default: the profile's); one store for every run, so the shared stages run once.
        overrides: settings for every run, nested by config section (as the `edgesam` flow's).
        backbone_overrides: per backbone, settings on top, e.g. `{"tiny_vit_5m_224": {"encoder_kd": {"train": {"lr": 5e-4}}}}`.
        pretrained: per backbone, a local timm weights file (`encoder_kd.pretrained`).
        latency_size, latency_repeats: input size and repeats of the speed columns.
        dataset: the val set of the accuracy columns (`sa1b`, `coco` or an `evaluate.extra_sets` name).
        concurrency: runs trained at a time (their stages take Ray resources, so runs beyond the
            cluster's capacity wait).
    """
    logger = get_run_logger()
    forward_stage_logs()
    runs = sweep_runs(profile, backbones or DEFAULT_BACKBONES, seeds, overrides, backbone_overrides, pretrained, work_dir)
    base = next((r for r in runs if r.backbone == (baseline or runs[0].backbone)), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not among the backbones {[r.backbone for r in runs]}")
    checks = {r.label: preflight_task(r) for r in runs}
    status = {label: OK if c["ok"] else f"failed: {c['reason']}" for label, c in checks.items()}
    for label, c in checks.items():
        logger.info("pre-flight %s: %s (%.1fs)", label, "ok" if c["ok"] else c["reason"], c["seconds"])
    passing = [r for r in runs if status[r.label] == OK]
    store = ArtifactStore(runs[0].cfg.runtime.work_dir)
    evaluated: dict[str, Path] = {}
    speeds: dict[str, Any] = {}
    if passing:
        with ray_connection(passing[0].cfg.runtime):
            for r in passing:
                r.cfg = r.cfg.model_copy(update={"runtime": resolve_device(r.cfg.runtime)})
            plans = {r.label: plan(r.cfg) for r in passing}
            shared = shared_stages(list(plans.values()))
            logger.info("shared stages, once: %s", ", ".join(shared))
            for stage in shared:
                stage_task(stage, passing[0].cfg, plans[passing[0].label][stage], return_state=True).result()
            failures = run_chains(passing, plans, [s for s in STAGES if s not in shared], concurrency)
        for r in passing:
            status[r.label] = failures[r.label] or OK
            if status[r.label] == OK:
                evaluated[r.label] = store.artifact("evaluate", plans[r.label]["evaluate"].fingerprint).path
            logger.info("run %s: %s", r.label, status[r.label])
        done = list(dict.fromkeys(r.backbone for r in passing if status[r.label] == OK))
        shard = store.artifact("shard", plans[passing[0].label]["shard"].fingerprint).path
        speeds = speed_task(store.root, done, latency_size, latency_repeats, shard) if done else {}
    if status[base.label] != OK:
        raise RuntimeError(f"the baseline {base.label} has no result ({status[base.label]}); statuses: {status}")
    entries = [Entry(r.label, r.backbone, r.seed, status[r.label], evaluated.get(r.label)) for r in runs]
    rows = leaderboard_rows(entries, speeds, base.label, dataset)
    key = hashlib.sha256(json.dumps([[e.label, e.status, str(e.evaluate_dir)] for e in entries]
                                    + [latency_size, latency_repeats, dataset]).encode()).hexdigest()[:12]
    out = store.root / "sweep" / f"{name}-{key}"
    markdown = write_leaderboard(rows, out, f"EdgeSAM backbone sweep `{name}`, profile `{profile}`")
    publish(rows, markdown, out, profile, name, runs, evaluated)
    logger.info("leaderboard: %s", out / "leaderboard.md")
    return {"leaderboard": str(out / "leaderboard.md"), "dir": str(out), "rows": rows, "table": markdown}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES), help="comma-separated timm names")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds of the baseline")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--name", default="default")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of every run, e.g. prompt_kd.train.epochs=1")
    parser.add_argument("--backbone-set", action="append", default=[], metavar="BACKBONE:KEY=VALUE",
                        help="a setting of one backbone's run, e.g. tiny_vit_5m_224:encoder_kd.train.lr=5e-4")
    parser.add_argument("--latency-size", type=int, default=1024)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    per_backbone: dict[str, dict[str, Any]] = {}
    for item in args.backbone_set:
        backbone, sep, setting = item.partition(":")
        if not sep:
            parser.error(f"--backbone-set expects BACKBONE:KEY=VALUE, got {item!r}")
        per_backbone[backbone] = deep_merge(per_backbone.get(backbone, {}), parse_overrides([setting]))
    result = edgesam_sweep(
        profile=args.profile, backbones=args.backbones.split(","), baseline=args.baseline, name=args.name,
        seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None, work_dir=args.work_dir,
        overrides=parse_overrides(args.overrides), backbone_overrides=per_backbone or None,
        latency_size=args.latency_size, latency_repeats=args.latency_repeats, concurrency=args.concurrency)
    print(result["table"])


if __name__ == "__main__":
    main()
