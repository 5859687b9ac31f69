"""Run stages from the command line, without Prefect.

    python -m pipelines all --profile smoke
    python -m pipelines shard --profile default --set shard.workers=2
    python -m pipelines.shard --profile smoke          # same as `python -m pipelines shard`
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from edgesam.config import STAGES, load_profile, parse_overrides
from pipelines.stage import run_dag


def main(argv: Sequence[str] | None = None, stage: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines" + (f".{stage}" if stage else ""))
    if stage is None:
        parser.add_argument("stage", choices=("all", *STAGES), help="stage to run, or all")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--work-dir", default=None, help="artifact root (default: the profile's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="recompute this stage and everything downstream")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = parse_overrides(args.overrides)
    if args.work_dir:
        overrides.setdefault("runtime", {})["work_dir"] = args.work_dir
    cfg = load_profile(args.profile, overrides)
    name = stage or args.stage
    stages = None if name == "all" else [name]
    results = run_dag(cfg, stages=stages, force=(stages or []) if args.force else ())
    for stage_name, (artifact, cached) in results.items():
        print(f"{stage_name:<11} {'cached' if cached else 'done':<7} {artifact.path}")
