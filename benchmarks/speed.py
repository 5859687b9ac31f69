"""Size, compute and CPU latency of the EdgeSAM student beside SAM's ViT-B and ViT-H encoders.

    python -m benchmarks.speed --out runs/bench/speed.json [--threads 2] [--repeats 10]

Every model has random weights (speed does not depend on them) and runs in PyTorch eager
mode at 1024x1024. Reported:

* params: parameters of the module (buffers excluded).
* GMACs: multiply-accumulates of Conv2d, ConvTranspose2d and Linear layers only, counted
  from their input/output shapes by forward hooks on a meta-device pass. This is the
  convention of the EdgeSAM paper's "GFLOPs" (22.1 for encoder + decoder with one box).
  `all_gmacs` adds the attention matmuls and everything else `torch.utils.flop_counter`
  counts (its FLOPs / 2), for reference.
* latency: median wall time of `--repeats` runs after `--warmup` runs, at `--threads`
  intra-op threads; SAM ViT-H runs `--vit-h-repeats` times (default 1: ~30-50 s each).

glibc malloc: by default the script re-executes itself with MALLOC_MMAP_MAX_=0 and a large
MALLOC_TRIM_THRESHOLD_, so large tensors are reused from the heap instead of being mmap'd and
returned to the OS on every call (measured here as a 1.5-1.7x slowdown of the encoders).
`--no-malloc-tuning` measures glibc's defaults instead. The JSON records which was used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
PAPER = {"params_m": 9.6, "gmacs": 22.1}  # EdgeSAM (arXiv 2312.06660): encoder + decoder, one box


def ensure_malloc_tuning(enabled: bool) -> None:
    """Re-exec this script with the glibc malloc settings, unless already set or disabled."""
    if enabled and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def count_macs(model: Any, forward: Callable[[], Any]) -> tuple[float, float]:
    """(conv/linear GMACs, all GMACs from torch.utils.flop_counter) of `forward()`, which
    runs (parts of) `model`. Use meta tensors: shapes only, so even ViT-H takes milliseconds.
    """
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    macs = 0

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(m, nn.Linear):
            macs += out.numel() * m.in_features
        elif isinstance(m, nn.Conv2d):
            macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.ConvTranspose2d):  # every input pixel scatters a k x k x out/groups patch
            macs += args[0].numel() * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    layers = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    model.requires_grad_(False)  # no autograd graph: FlopCounterMode's module tracker needs none
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    try:
        with FlopCounterMode(display=False) as counter:
            forward()
    finally:
        for h in handles:
            h.remove()
    return macs / 1e9, counter.get_total_flops() / 2e9


def median_latency(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, Any]:
    """Median, min and max seconds of `repeats` calls after `warmup` calls."""
    from edgesam.eval.speed import run_times

    times = run_times(fn, repeats, warmup)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": repeats, "warmup": warmup}


def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    import torch
    from segment_anything import sam_model_registry

    from edgesam.eval.speed import params_m
    from edgesam.models.decoding import decode
    from edgesam.models.edgesam import build_edgesam

    torch.set_num_threads(args.threads)
    size = args.img_size
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, params: float, run: Callable[[], Any] | None, meta_model: Any,
            meta_run: Callable[[], Any], warmup: int, repeats: int) -> None:
        conv_linear, everything = count_macs(meta_model, meta_run)
        row = {"params_m": params, "gmacs": conv_linear, "all_gmacs": everything}
        if run is not None:
            print(f"timing {name}: {warmup} warm-up + {repeats} runs ...", flush=True)
            with torch.inference_mode():
                row |= median_latency(run, warmup, repeats)
            print(f"  median {row['median_s']:.3f} s", flush=True)
        rows[name] = row

    image = torch.randn(1, 3, size, size)
    box = torch.tensor([[size * 0.2, size * 0.25, size * 0.7, size * 0.8]])
    with torch.device("meta"):
        m_image, m_box = torch.empty(1, 3, size, size), torch.empty(1, 4)
        m_emb = torch.empty(1, 256, size // 16, size // 16)
        m_student = build_edgesam(args.backbone, img_size=size)
    m_encoder = m_student.image_encoder
    student = build_edgesam(args.backbone, img_size=size)
    encoder = student.image_encoder
    decoder_params = params_m(student.prompt_encoder) + params_m(student.mask_decoder)

    def with_decoder(sam: Any, images: Any, boxes: Any) -> Any:
        return decode(sam, sam.image_encoder(images), boxes=boxes, num_outputs=4)

    # Conv/linear MACs do not change with fusing (BatchNorm is not counted), so the
    # unfused meta model counts them for the fused rows too.
    add("student encoder", params_m(encoder), lambda: encoder(image),
        m_encoder, lambda: m_encoder(m_image), args.warmup, args.repeats)
    add("student encoder + decoder, 1 box", params_m(encoder) + decoder_params, None,
        m_student, lambda: with_decoder(m_student, m_image, m_box), 0, 0)
    encoder.fuse()
    add("student encoder (fused)", params_m(encoder), lambda: encoder(image),
        m_encoder, lambda: m_encoder(m_image), args.warmup, args.repeats)
    add("student encoder (fused) + decoder, 1 box", params_m(encoder) + decoder_params,
        lambda: with_decoder(student, image, box),
        m_student, lambda: with_decoder(m_student, m_image, m_box), args.warmup, args.repeats)
    with torch.inference_mode():
        emb = encoder(image)
    for prompts in (1, 16):
        boxes, m_boxes = box.repeat(prompts, 1), m_box.repeat(prompts, 1)
        add(f"mask decoder, {prompts} box{'es' if prompts > 1 else ''}", decoder_params,
            lambda b=boxes: decode(student, emb, boxes=b, num_outputs=4),
            m_student, lambda b=m_boxes: decode(m_student, m_emb, boxes=b, num_outputs=4),
            args.warmup, args.repeats)
    if not args.skip_onnx:
        onnx_rows(student, m_student, m_image, m_emb, m_box, box, image, emb, args, add)
    student = None  # freed before the ViT rows (the closures above have run)

    for kind, warmup, repeats in (("vit_b", 1, args.vit_b_repeats), ("vit_h", 0, args.vit_h_repeats)):
        if repeats == 0:
            continue
        if size != 1024:
            raise SystemExit("SAM's encoders are built for 1024x1024 inputs; add --skip-sam")
        print(f"building SAM {kind} (random weights) ...", flush=True)
        with torch.device("meta"):
            m_vit = sam_model_registry[kind]().image_encoder
        vit = sam_model_registry[kind]().image_encoder.eval()
        add(f"SAM {kind} encoder", params_m(vit), lambda m=vit: m(image),
            m_vit, lambda: m_vit(m_image), warmup, repeats)
        del vit
    return rows


def cpu_flags() -> dict[str, bool]:
    """The x86 features that decide int8 and fp16 speed (Linux /proc/cpuinfo)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split())
    except (OSError, IndexError):
        flags = set()
    return {name: name in flags for name in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16")}


def write_bundle(student: Any, out: Path, calibration: list[Any]) -> None:
    """A bundle of `student` for the ONNX rows: fp32 / int8 / fp16 encoders, client and compact
    decoders, config.json (no checks: the export stage does those)."""
    from edgesam.artifacts import write_json_atomic
    from edgesam.client.bundle import CONFIG, file_entry
    from edgesam.export.bundle import bundle_config, encoder_inputs
    from edgesam.export.onnx import export_compact_decoder, export_encoder, export_prompt_decoder
    from edgesam.export.quantize import prepare_encoder, quantize_encoder, to_fp16

    print("exporting the fused student to ONNX (fp32, int8 calibrated on 4 photos, fp16) ...", flush=True)
    export_encoder(student, out / "encoder.onnx")
    export_prompt_decoder(student, out / "decoder.onnx")
    export_compact_decoder(student, out / "decoder_edgesam.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        quantize_encoder(prepare_encoder(student, Path(tmp)), out / "encoder_int8.onnx",
                         encoder_inputs(calibration, student.image_encoder.img_size), per_channel=False)
    to_fp16(out / "encoder.onnx", out / "encoder_fp16.onnx")
    entries = {p.stem: file_entry(p) for p in sorted(out.glob("*.onnx"))}
    write_json_atomic(out / CONFIG, bundle_config(student, entries, "official", 17))


def onnx_rows(student: Any, m_student: Any, m_image: Any, m_emb: Any, m_box: Any, box: Any, image: Any,
              emb: Any, args: argparse.Namespace, add: Callable[..., None]) -> None:
    """ONNX Runtime (CPU) rows beside the PyTorch eager ones, at the same thread count: the
    fused encoder in fp32, int8 (static QDQ) and fp16; the compact decoder on one box; the
    client decoder on 1 and 16 boxes in one call; `OnnxPredictor`'s click-to-mask path on a
    683 x 1024 photo (encoder once in `set_image`, then one decoder call and the upsampling
    per click). Files go to a temporary directory."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos

    from edgesam.eval.speed import params_m
    from edgesam.export.onnx import session
    from edgesam.models.decoding import decode
    from edgesam.client.transforms import decoder_feeds, prompt_arrays
    from edgesam.client.predictor import OnnxPredictor

    encoder_params = params_m(student.image_encoder)
    decoder_params = params_m(student.prompt_encoder) + params_m(student.mask_decoder)
    fp16_note = "" if cpu_flags()["avx512_fp16"] else " (no AVX512-FP16: emulated)"
    calibration = [photos.astronaut(), photos.coffee(), photos.chelsea(), photos.rocket()]
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle(student, Path(tmp), calibration)
        image_np = image.numpy()
        for precision, note in (("", ""), ("_int8", ""), ("_fp16", fp16_note)):
            encoder = session(Path(tmp) / f"encoder{precision}.onnx", args.threads)
            add(f"student encoder (fused), ONNX Runtime {precision[1:] or 'fp32'}{note}", encoder_params,
                lambda e=encoder: e.run(None, {"image": image_np}),
                m_student.image_encoder, lambda: m_student.image_encoder(m_image), args.warmup, args.repeats)
        compact = session(Path(tmp) / "decoder_edgesam.onnx", args.threads)
        feeds = {"image_embeddings": emb.numpy(), "point_coords": box.reshape(1, 2, 2).numpy(),
                 "point_labels": np.array([[2.0, 3.0]], dtype=np.float32)}
        add("mask decoder, 1 box, ONNX Runtime", decoder_params, lambda: compact.run(None, feeds),
            m_student, lambda: decode(m_student, m_emb, boxes=m_box, num_outputs=4), args.warmup, args.repeats)
        client = session(Path(tmp) / "decoder.onnx", args.threads)
        for n in (1, 16):
            feeds = decoder_feeds(emb.numpy(), *prompt_arrays(None, None, np.repeat(box.reshape(1, 4).numpy(), n, 0)))
            m_boxes = m_box.repeat(n, 1)
            add(f"client decoder (decoder.onnx), {n} box{'es' if n > 1 else ''} in one call", decoder_params,
                lambda f=feeds: client.run(None, f),
                m_student, lambda b=m_boxes: decode(m_student, m_emb, boxes=b, num_outputs=4), args.warmup, args.repeats)
        photo = np.asarray(Image.fromarray(photos.coffee()).resize((1024, 683), Image.BILINEAR))
        clicks = iter(np.random.default_rng(0).uniform([0, 0], [1024, 683], (args.warmup + args.repeats, 2)))
        for precision in ("fp32", "int8"):
            predictor = OnnxPredictor(tmp, encoder_precision=precision, threads=args.threads)
            add(f"OnnxPredictor set_image ({precision} encoder), 683x1024 photo", encoder_params,
                lambda p=predictor: p.set_image(photo),
                m_student.image_encoder, lambda: m_student.image_encoder(m_image), args.warmup, args.repeats)
        add("OnnxPredictor click -> 3 masks at 683x1024 (per click)", decoder_params,
            lambda: predictor.predict(point_coords=next(clicks)[None], point_labels=np.array([1])),
            m_student, lambda: decode(m_student, m_emb, boxes=m_box, num_outputs=4), args.warmup, args.repeats)


def ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Add each row's speed-up relative to the SAM encoders (where both were timed)."""
    for ref in ("SAM vit_b encoder", "SAM vit_h encoder"):
        if "median_s" not in rows.get(ref, {}):
            continue
        for row in rows.values():
            if "median_s" in row:
                row[f"speedup_vs_{ref.split()[1]}"] = rows[ref]["median_s"] / row["median_s"]


def table(rows: dict[str, dict[str, Any]]) -> str:
    width = max(50, *(len(name) for name in rows))
    head = (f"{'model':<{width}} {'params M':>9} {'GMACs':>8} {'all GMACs':>9} {'median s':>9} {'min s':>7} {'runs':>4} "
            f"{'x ViT-B':>8} {'x ViT-H':>8}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        def fmt(key: str, spec: str) -> str:
            return format(r[key], spec) if key in r else "-"
        lines.append(
            f"{name:<{width}} {r['params_m']:>9.2f} {r['gmacs']:>8.2f} {r['all_gmacs']:>9.2f} "
            f"{fmt('median_s', '9.3f'):>9} {fmt('min_s', '7.3f'):>7} {fmt('runs', 'd'):>4} "
            f"{fmt('speedup_vs_vit_b', '8.1f'):>8} {fmt('speedup_vs_vit_h', '8.1f'):>8}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--backbone", default="repvit_m1")
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--vit-b-repeats", type=int, default=3)
    parser.add_argument("--vit-h-repeats", type=int, default=1)
    parser.add_argument("--skip-sam", action="store_true", help="time the student only")
    parser.add_argument("--skip-onnx", action="store_true", help="no ONNX Runtime rows")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc malloc defaults")
    args = parser.parse_args()
    ensure_malloc_tuning(not args.no_malloc_tuning)
    if args.skip_sam:
        args.vit_b_repeats = args.vit_h_repeats = 0

    import torch

    malloc = {k: os.environ[k] for k in MALLOC_ENV if k in os.environ} or "glibc defaults"
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"malloc: {malloc}, load average before {os.getloadavg()[0]:.2f}", flush=True)
    load_before = os.getloadavg()[0]
    rows = measure(args)
    load_after = os.getloadavg()[0]
    ratios(rows)
    paper_row = rows["student encoder + decoder, 1 box"]
    paper = {
        "params_m": PAPER["params_m"], "gmacs": PAPER["gmacs"],
        "params_rel_diff": paper_row["params_m"] / PAPER["params_m"] - 1,
        "gmacs_rel_diff": paper_row["gmacs"] / PAPER["gmacs"] - 1,
    }
    print()
    print(table(rows))
    print(f"\npaper (encoder + decoder, one box): {PAPER['params_m']} M params, {PAPER['gmacs']} GMACs; "
          f"ours {paper_row['params_m']:.2f} M ({paper['params_rel_diff']:+.1%}), "
          f"{paper_row['gmacs']:.2f} GMACs ({paper['gmacs_rel_diff']:+.1%})")
    print("GMACs: Conv2d/ConvTranspose2d/Linear multiply-accumulates; all GMACs: flop_counter FLOPs / 2")
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after "
          f"({os.cpu_count()} CPUs; other processes inflate latencies)")
    result = {
        "img_size": args.img_size, "backbone": args.backbone, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after}, "malloc": malloc,
        "mac_convention": "conv2d + conv_transpose2d + linear multiply-accumulates (forward hooks)",
        "cpu_flags": cpu_flags(), "rows": rows, "paper": paper,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
