"""Run stages from the command line, without Prefect.

    python -m pipelines all --profile smoke
    python -m pipelines shard --profile default --set shard.workers=2
    python -m pipelines.shard --profile smoke          # same as `python -m pipelines shard`
    python -m pipelines shard --help                   # what the stage does, its options
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from edgesam.config import STAGES, available_profiles, load_profile, parse_overrides, profile_summary
from pipelines.stage import run_dag, stage_module


def overview(stages: bool) -> str:
    """One line per stage (its module docstring's) and per profile (its first comment line)."""
    lines = [f"  {s:<11} {stage_module(s).__doc__.splitlines()[0].split(': ', 1)[-1]}" for s in STAGES]
    profiles = [f"  {p:<11} {profile_summary(p)}" for p in available_profiles()]
    return "\n".join((["stages, in DAG order:", *lines, ""] if stages else []) + ["profiles (--profile):", *profiles])


def main(argv: Sequence[str] | None = None, stage: str | None = None) -> None:
    argv, prog = list(sys.argv[1:] if argv is None else argv), "python -m pipelines" + (f".{stage}" if stage else "")
    if stage is None and argv[:1] and argv[0] in STAGES:  # `python -m pipelines <stage>`: the stage's own --help
        stage, prog, argv = argv[0], f"{prog} {argv[0]}", argv[1:]
    parser = argparse.ArgumentParser(prog=prog, description=stage_module(stage).__doc__ if stage else __doc__,
                                     epilog=overview(stage is None), formatter_class=argparse.RawDescriptionHelpFormatter)
    if stage is None:
        parser.add_argument("stage", choices=("all", *STAGES), help="stage to run, or all (listed below)")
    parser.add_argument("--profile", default="default", choices=available_profiles())
    parser.add_argument("--work-dir", default=None, help="artifact root (default: the profile's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="recompute this stage and everything downstream")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    if args.work_dir:
        overrides.setdefault("runtime", {})["work_dir"] = args.work_dir
    cfg = load_profile(args.profile, overrides)
    name = stage or args.stage
    stages = None if name == "all" else [name]
    results = run_dag(cfg, stages=stages, force=(stages or []) if args.force else ())
    for stage_name, (artifact, cached) in results.items():
        print(f"{stage_name:<11} {'cached' if cached else 'done':<7} {artifact.path}")
