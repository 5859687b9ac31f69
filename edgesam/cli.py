"""The `edgesam` command.

    edgesam predict IMAGE|FOLDER --point X,Y [--point X,Y --label 1 --label 0] [--box X0,Y0,X1,Y1 ...]
                    --checkpoint CKPT|BUNDLE --out DIR [--rpn] [--backend torch|onnx] [--device cpu|cuda]
    edgesam everything IMAGE|FOLDER --checkpoint CKPT|BUNDLE --out DIR [--rpn] [--backend torch|onnx]
    edgesam info CKPT
    edgesam data synth --profile default --out DIR
    edgesam teacher pack TEACHER_ARTIFACT --out data/reference_teacher
    edgesam models register|alias|list ...     (the model registry: edgesam.cli_models)
    edgesam demo BUNDLE [--port 8765]          (the student in the browser, on 127.0.0.1)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def parse_floats(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{what} expects {count} comma-separated numbers, got {text!r}")
    return values


def cmd_info(args: argparse.Namespace) -> None:
    from edgesam.models.edgesam import EdgeSAMCheckpointError, load_edgesam, read_edgesam_checkpoint

    try:
        ckpt = read_edgesam_checkpoint(args.checkpoint)
        model = load_edgesam(args.checkpoint)
    except EdgeSAMCheckpointError as exc:
        raise SystemExit(f"error: {exc}") from exc
    cfg = ckpt["config"]

    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    rows = [
        ("checkpoint", str(args.checkpoint)),
        ("backbone", cfg["backbone"]),
        ("input size", f"{cfg['img_size']}x{cfg['img_size']}"),
        ("embedding", f"256x{cfg['img_size'] // 16}x{cfg['img_size'] // 16}"),
        ("upsample mode", cfg["upsample_mode"]),
        ("fused", str(cfg["fused"])),
        ("params (total)", millions(model)),
        ("  image encoder", millions(model.image_encoder)),
        ("  prompt encoder", millions(model.prompt_encoder)),
        ("  mask decoder", millions(model.mask_decoder)),
    ]
    rows += [(f"meta.{k}", json.dumps(v, default=str)) for k, v in ckpt["meta"].items()]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def cmd_data_synth(args: argparse.Namespace) -> None:
    from edgesam.config import load_profile
    from edgesam.data.synth import write_benchmark

    cfg = load_profile(args.profile).data
    summary = write_benchmark(args.out, cfg)
    print(json.dumps(summary, indent=2, default=str))


def cmd_teacher_pack(args: argparse.Namespace) -> None:
    """Pack a committed synthetic teacher artifact as the reference teacher: the benchmark is the
    data artifact upstream of its shards (checksum) at the shards' size; val and recipe its own."""
    from edgesam.artifacts import ArtifactStore
    from edgesam.models.checkpoint import TeacherCheckpointError
    from edgesam.models.reference import pack_reference

    store, teacher = ArtifactStore.of(args.artifact)
    manifest = teacher.manifest
    if manifest.get("kind") != "synthetic":
        raise TeacherCheckpointError(f"{teacher.path} is a {manifest.get('kind')} teacher, not one trained here")
    shard = store.upstream(teacher, "shard")
    data = store.upstream(shard, "data").manifest
    benchmark = {"data_checksum": data["checksum"], "target_size": shard.manifest["target_size"]}
    recipe = {"teacher": manifest["config"], "steps": manifest["train"]["steps"],
              "train_seconds": manifest["train"].get("train_seconds", manifest["train"].get("seconds"))}
    meta = pack_reference(teacher.path / manifest["checkpoint"], args.out, benchmark, manifest["val"], recipe)
    print(json.dumps({k: meta[k] for k in ("arch", "sha256", "bytes", "benchmark", "val")}, indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from edgesam.client.demo import serve

    serve(args.bundle, args.port)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", type=Path, help="an image, or a folder of images")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="EdgeSAM checkpoint (save_edgesam), or an exported bundle folder (or its edgesam.pt)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="onnx: the bundle's ONNX files with onnxruntime (the bundle folder of --checkpoint)")
    p.add_argument("--precision", choices=("fp32", "int8", "fp16"), default="fp32", help="onnx backend: encoder file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rpn-checkpoint", type=Path, metavar="RPN_CKPT",
                   help="torch backend: an RPN checkpoint (save_rpn) other than the rpn.pt beside --checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    from edgesam.cli_models import add_models_parser
    from edgesam.cli_segment import cmd_everything, cmd_predict

    parser = argparse.ArgumentParser(prog="edgesam", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="segment prompted objects and write mask + overlay PNGs")
    _model_arguments(p)
    p.add_argument("--point", action="append", type=lambda s: parse_floats(s, 2, "--point"), metavar="X,Y",
                   help="a click (repeat for several clicks on one object)")
    p.add_argument("--label", action="append", type=int, choices=(0, 1),
                   help="1 foreground, 0 background: one per --point, in order (default: all 1)")
    p.add_argument("--box", action="append", type=lambda s: parse_floats(s, 4, "--box"), metavar="X0,Y0,X1,Y1",
                   help="a box (repeat for several objects; one box may go with points)")
    p.add_argument("--rpn", action="store_true",
                   help="granularity prior: the RPN turns the point into a box (the bundle's rpn.pt / rpn.onnx)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("everything", help="segment everything (SAM's automatic mask generator): COCO-RLE JSON + overlay")
    _model_arguments(p)
    p.add_argument("--rpn", action="store_true", help="prompt the RPN's proposal centres instead of the point grid")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64, help="prompts per decoder call")
    p.add_argument("--pred-iou-thresh", type=float, default=0.88)
    p.add_argument("--stability-score-thresh", type=float, default=0.95)
    p.set_defaults(func=cmd_everything)

    p = sub.add_parser("info", help="print an EdgeSAM checkpoint's model summary")
    p.add_argument("checkpoint", type=Path)
    p.set_defaults(func=cmd_info)

    teacher = sub.add_parser("teacher", help="teacher tools").add_subparsers(dest="teacher_command", required=True)
    p = teacher.add_parser("pack", help="write a trained teacher artifact as the shipped reference teacher")
    p.add_argument("artifact", type=Path, help="a committed teacher artifact of kind synthetic")
    p.add_argument("--out", type=Path, required=True, help="e.g. data/reference_teacher")
    p.set_defaults(func=cmd_teacher_pack)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write the embedded benchmark (SA-1B tars + COCO JSON)")
    p.add_argument("--profile", default="default")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_data_synth)

    add_models_parser(sub)
    p = sub.add_parser("demo", help="serve a page on 127.0.0.1 that runs a bundle's encoder and decoder in the browser")
    p.add_argument("bundle", type=Path, help="an exported bundle folder")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
