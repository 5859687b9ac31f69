"""Run stages from the command line, without Prefect.

    python -m pipelines all --profile smoke
    python -m pipelines plan --profile smoke           # per stage: cached / stale / will run, and why
    python -m pipelines verify --profile smoke         # every committed artifact against its manifest
    python -m pipelines shard --profile default --set shard.workers=2
    python -m pipelines.shard --profile smoke          # same as `python -m pipelines shard`
    python -m pipelines shard --help                   # what the stage does, its options
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from edgesam.artifacts import ArtifactStore
from edgesam.config import (STAGES, ConfigError, PipelineConfig, available_profiles, load_profile, parse_overrides,
                            profile_summary, validate_before_work)
from edgesam.store.verify import verify_store
from edgesam.store.files import DamagedArtifactError
from edgesam.models.backbones import BackboneCheckError
from pipelines.stage import MissingUpstreamError, plan, preflight, run_dag, select, stage_module, status


def overview(stages: bool) -> str:
    """One line per stage (its module docstring's) and per profile (its first comment line)."""
    lines = [f"  {s:<11} {stage_module(s).__doc__.splitlines()[0].split(': ', 1)[-1]}" for s in STAGES]
    profiles = [f"  {p:<11} {profile_summary(p)}" for p in available_profiles()]
    return "\n".join((["stages, in DAG order:", *lines, ""] if stages else []) + ["profiles (--profile):", *profiles])


def _print_table(rows: list[dict[str, str]]) -> None:
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    for row in [{k: k for k in rows[0]}, *rows]:
        print("  ".join(f"{row[k]:<{widths[k]}}" for k in row).rstrip())


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> PipelineConfig:
    """The profile with --set and --work-dir applied, validated (errors name the key: exit 2)."""
    try:
        overrides = parse_overrides(args.overrides)
        if args.work_dir:
            overrides.setdefault("runtime", {})["work_dir"] = args.work_dir
        cfg = load_profile(args.profile, overrides)
        validate_before_work(cfg)
        return cfg
    except (ValueError, ConfigError) as exc:  # pydantic's ValidationError is a ValueError
        parser.exit(2, f"{parser.prog}: error: invalid configuration: {exc}\n")


def main(argv: Sequence[str] | None = None, stage: str | None = None) -> None:
    argv, prog = list(sys.argv[1:] if argv is None else argv), "python -m pipelines" + (f".{stage}" if stage else "")
    if stage is None and argv[:1] and argv[0] in STAGES:  # `python -m pipelines <stage>`: the stage's own --help
        stage, prog, argv = argv[0], f"{prog} {argv[0]}", argv[1:]
    parser = argparse.ArgumentParser(prog=prog, description=stage_module(stage).__doc__ if stage else __doc__,
                                     epilog=overview(stage is None), formatter_class=argparse.RawDescriptionHelpFormatter)
    if stage is None:
        parser.add_argument("stage", choices=("all", "plan", "verify", *STAGES),
                            help="stage to run, all, plan (what a run would do) or verify (the stored artifacts)")
    parser.add_argument("--profile", default="default", choices=available_profiles())
    parser.add_argument("--work-dir", default=None, help="artifact root (default: the profile's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="recompute this stage (all: every stage) and "
                        "everything downstream from scratch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, name = _config(args, parser), stage or args.stage
    store = ArtifactStore(cfg.runtime.work_dir)
    if name in ("plan", "verify"):
        _inspect(name, cfg, store, STAGES if args.force else ())
        return
    stages = None if name == "all" else [name]
    force = (stages or STAGES) if args.force else ()
    try:
        preflight(cfg, store, *select(stages, force), plan(cfg))
    except BackboneCheckError as exc:
        parser.exit(2, f"{parser.prog}: error: invalid configuration: {exc}\n")
    try:
        results = run_dag(cfg, store, stages=stages, force=force)
    except (DamagedArtifactError, MissingUpstreamError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    for stage_name, (artifact, cached) in results.items():
        print(f"{stage_name:<11} {'cached' if cached else 'done':<7} {artifact.path}")


def _inspect(name: str, cfg: PipelineConfig, store: ArtifactStore, forced: Sequence[str]) -> None:
    if name == "plan":
        _print_table(status(cfg, store, forced))
        return
    problems = verify_store(store)
    print("\n".join(problems) if problems else f"every committed artifact under {store.root} matches its manifest")
    sys.exit(1 if problems else 0)
