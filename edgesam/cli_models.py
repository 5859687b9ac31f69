"""`edgesam models`: the model registry (`edgesam.eval.registry`) that the nightly flow evaluates.

    edgesam models register BUNDLE|CHECKPOINT --name NAME [--alias champion] [--img-size 1024]
    edgesam models alias ALIAS NAME [--version V]       # move an alias, e.g. promote the candidate
    edgesam models list
    edgesam models results [--night RUN_ID]           # a night's results tables, stamped (docs)
    edgesam models results --run evaluate/<fp>        # an evaluate stage's tables, stamped (README)
    edgesam models results --run ablations/<key>      # an ablations run's table, stamped (docs)

The registry lives in the ledger file: `--ledger`, else `EDGESAM_LEDGER`, else `runs/default/ledger.sqlite`
(the default profile's work dir, where its nightly runs and evaluate stages write).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgesam.eval.ledger import default_path


def _errors() -> tuple[type[Exception], ...]:
    from edgesam.client.bundle import BundleError
    from edgesam.eval.ledger import LedgerError
    from edgesam.eval.registry import RegistryError
    from edgesam.models.checkpoint import CheckpointError

    return BundleError, CheckpointError, LedgerError, RegistryError


def _print_versions(models: list[Any]) -> None:
    rows = [{"name": m.name, "version": str(m.version), "aliases": ",".join(m.aliases) or "-", "kind": m.kind,
             "backbone": m.backbone, "px": str(m.img_size), "sha256": m.digest[:12], "registered": m.registered_at,
             "path": m.path} for m in models]
    if not rows:
        print("no model registered: edgesam models register BUNDLE --name NAME --alias champion")
        return
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    for row in [{k: k for k in rows[0]}, *rows]:
        print("  ".join(f"{row[k]:<{widths[k]}}" for k in row).rstrip())


def cmd_models(args: argparse.Namespace) -> None:
    from edgesam.eval.registry import Registry

    registry = Registry(args.ledger or default_path())
    try:
        if args.models_command == "register":
            _print_versions([registry.register(args.path, args.name, tuple(args.alias or ()), args.img_size)])
        elif args.models_command == "alias":
            _print_versions([registry.move_alias(args.alias, args.name, args.version)])
        elif args.models_command == "results":
            from edgesam.eval.ablation import RUN_PREFIX, ablation_markdown
            from edgesam.eval.history import results_markdown, stage_results_markdown
            from edgesam.eval.ledger import Ledger

            ledger = Ledger(registry.path)
            if args.run and args.run.startswith(RUN_PREFIX):
                print(ablation_markdown(ledger, args.run))
            else:
                print(stage_results_markdown(ledger, args.run, args.protocol) if args.run
                      else results_markdown(ledger, args.night))
        else:
            _print_versions(registry.versions())
    except _errors() as exc:
        raise SystemExit(f"error: {exc}") from exc


def add_models_parser(sub: Any) -> None:
    """The `models` command and its subcommands, on the `edgesam` parser's subparsers `sub`."""
    models = sub.add_parser("models", help="the model registry: register models, move aliases, list them")
    commands = models.add_subparsers(dest="models_command", required=True)
    p = commands.add_parser("register", help="register a bundle or checkpoint as the next version of a name")
    p.add_argument("path", type=Path, help="an exported bundle folder, an EdgeSAM checkpoint or an official "
                                           "EdgeSAM release file (edge_sam.pth)")
    p.add_argument("--name", required=True)
    p.add_argument("--alias", action="append", metavar="ALIAS", help="move this alias to it (repeatable): champion, "
                                                                     "candidate, ...")
    p.add_argument("--img-size", type=int, default=1024, help="official release files: the input size to build at")
    p = commands.add_parser("alias", help="point an alias at a registered version (its latest by default)")
    p.add_argument("alias")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=None)
    commands.add_parser("list", help="every registered version and its aliases")
    p = commands.add_parser("results", help="a night's results tables from the ledger, stamped with its commit")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--night", default=None, help="the night's run id or a unique prefix (default: the latest)")
    which.add_argument("--run", default=None, help="an evaluate stage's run instead: evaluate/<fingerprint> (or a "
                                                   "unique prefix), the README's tables; or an ablations run: "
                                                   "ablations/<key>, the ablation table")
    p.add_argument("--protocol", default="paper", help="with --run: the protocol whose results to show")
    for p in commands.choices.values():
        p.add_argument("--ledger", type=Path, default=None, help="ledger file (default: EDGESAM_LEDGER or "
                                                                 "runs/default/ledger.sqlite)")
        p.set_defaults(func=cmd_models)
