"""The embedded run: the whole `edgesam` flow in this process, then where everything is.

    python -m flows.run_local                              # profile default
    python -m flows.run_local --profile smoke --set encoder_kd.backbone=resnet18
    python -m flows.run_local --force evaluate             # recompute evaluate and export

Prefect reports to PREFECT_API_URL when set, else to a temporary local server.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from edgesam.config import STAGES, parse_overrides
from flows.pipeline import edgesam


def headline(metrics: dict[str, Any], export_manifest: dict[str, Any] | None = None) -> str:
    """Teacher vs students: mIoU and speed from the evaluate stage's metrics.json (and the
    export stage's onnxruntime latency of the deployed student)."""
    head, speed = metrics["headline"], metrics["speed"]
    protocol = next(iter(metrics["protocols"]))
    lines = [
        f"{'model':<12} {'mIoU':>6} {'box':>6} {'point':>6} {'enc params':>10} {'enc GMACs':>9} "
        f"{'enc ms':>8} {'dec ms':>7}",
    ]
    for name, value in sorted(head["miou"].items(), key=lambda item: item[0] != "teacher"):
        sa1b, s = metrics["miou"][protocol]["sa1b"][name], speed[name]
        lines.append(
            f"{name:<12} {value:6.3f} {sa1b['box']['all']:6.3f} {sa1b['point']['all']:6.3f} "
            f"{s['encoder_params_m']:9.2f}M {s['encoder_gmacs']:9.2f} {s['encoder_ms']:8.1f} {s['decoder_ms']:7.1f}"
        )
    lines.append(f"mIoU: {head['label']}; latency: PyTorch eager, batch 1, {metrics['machine']}")
    if export_manifest:
        ort = export_manifest["latency_ms"]["onnxruntime"]
        lines.append(f"exported student (onnxruntime): encoder {ort['encoder_ms']:.1f} ms, "
                     f"decoder {ort['decoder_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.run_local", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", choices=("smoke", "default", "paper"))
    parser.add_argument("--work-dir", type=Path, default=None, help="artifact root (default: the profile's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config setting, e.g. encoder_kd.backbone=resnet18")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="run only these (upstream from the cache)")
    parser.add_argument("--force", nargs="+", choices=STAGES, default=[], help="recompute these and downstream")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as exc:
        parser.error(str(exc))

    start = time.perf_counter()
    results = edgesam(profile=args.profile, work_dir=args.work_dir, overrides=overrides,
                      stages=args.stages, force=args.force)
    elapsed = time.perf_counter() - start

    print(f"\nedgesam, profile {args.profile}: {len(results)} stages in {elapsed / 60:.1f} min "
          f"({sum(r['status'] == 'cached' for r in results.values())} cached)")
    for name, row in results.items():
        print(f"  {name:<11} {row['status']:<7} {row['seconds']:8.1f}s  {row['path']}")
    export = Path(results["export"]["path"]) if "export" in results else None
    if export:
        print(f"\nmodel:   {export}  (ONNX, checkpoints, MODEL_CARD.md)")
    if "evaluate" in results:
        evaluate = Path(results["evaluate"]["path"])
        print(f"report:  {evaluate / 'report.md'}\nmetrics: {evaluate / 'metrics.json'}\n")
        metrics = json.loads((evaluate / "metrics.json").read_text())
        print(headline(metrics, json.loads((export / "manifest.json").read_text()) if export else None))

if __name__ == "__main__":
    main()
