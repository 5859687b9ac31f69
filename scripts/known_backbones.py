"""Which timm families can be EdgeSAM students: each run through the whole DAG at profile `smoke`.

    python -m scripts.known_backbones                       # writes docs/BACKBONES.md
    python -m scripts.known_backbones --work-dir /tmp/kb --backbones repvit_m1,resnet18 --out /tmp/kb.md

One `edgesam-sweep` run (`flows.sweep`) at `smoke`: the pre-flight check, then encoder KD, prompt
KD, RPN, evaluate and export of every backbone that passes it. The table gives each backbone's
status (ok: exported; failed: the pre-flight check's reason, or the stage that failed and its
error), its size and its encoder's speed at 256 px; the smoke budget trains a few steps only, so
accuracy is not compared here (that is what `python -m flows.sweep --profile default` is for).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import timm
import torch

from edgesam.artifacts import write_text_atomic
from flows.sweep import edgesam_sweep

# (family, timm model): the peers' encoders (MobileSAM's TinyViT, EfficientViT-SAM's EfficientViT,
# SAM 2's Hiera), EdgeSAM's RepViT, and the usual mobile and classic CNN families.
FAMILIES = [
    ("RepViT", "repvit_m1"), ("TinyViT", "tiny_vit_5m_224"), ("EfficientViT (MIT)", "efficientvit_b0"),
    ("EfficientViT (MSRA)", "efficientvit_m0"), ("Hiera (SAM 2)", "sam2_hiera_tiny"), ("FastViT", "fastvit_t8"),
    ("MobileNetV4", "mobilenetv4_conv_small"), ("MobileNetV3", "mobilenetv3_small_050"), ("ConvNeXt", "convnext_atto"),
    ("ResNet", "resnet18"), ("EfficientNet", "efficientnet_b0"), ("MobileOne", "mobileone_s0"),
    ("EfficientFormerV2", "efficientformerv2_s0"), ("ViT", "vit_tiny_patch16_224"),
]


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def backbones_page(rows: list[dict[str, Any]], families: dict[str, str], command: str) -> str:
    """docs/BACKBONES.md: one row per backbone with its status and reason."""
    passed = sum(r["status"] == "ok" for r in rows)
    lines = [
        "# Known student backbones", "",
        "Produced by `python -m scripts.known_backbones` (do not edit by hand; rerun it). Each timm model ran "
        "through the whole DAG at profile `smoke` in one `edgesam-sweep` run: the pre-flight check "
        "(`edgesam.models.backbones`: the name, `features_only` strides 8/16/32, the student built at the "
        "profile's 256 px, one forward/backward pass, an ONNX trace of the fused encoder), then encoder KD, "
        "prompt KD, RPN, evaluate and export. `ok` means the export stage committed the ONNX bundle "
        "(fp32, int8, fp16, parity-checked against PyTorch). Backbones start from random weights.", "",
        f"Run: `{command}`; timm {timm.__version__}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s). {passed} of {len(rows)} exported.", "",
        "| family | timm model | status | encoder params (M) | GMACs at 256 | ONNX fp32 encoder ms at 256 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gmacs = None if r["encoder_gmacs"] is None else r["encoder_gmacs"] + r["decoder_gmacs"]
        lines.append(f"| {families.get(r['backbone'], '-')} | `{r['backbone']}` | {r['status']} | "
                     f"{_num(r['encoder_params_m'], 2)} | {_num(gmacs, 2)} | {_num(r['onnx_fp32_ms'], 1)} |")
    lines += ["", "Speed: measured on the machine above while other work shared it; compare rows of one run only.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.known_backbones", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/known_backbones"))
    parser.add_argument("--backbones", default=",".join(name for _, name in FAMILIES), help="comma-separated timm names")
    parser.add_argument("--out", type=Path, default=Path("docs/BACKBONES.md"))
    args = parser.parse_args()
    backbones = args.backbones.split(",")
    result = edgesam_sweep(profile="smoke", backbones=backbones, name="known-backbones", work_dir=args.work_dir,
                           latency_size=256, latency_repeats=3)
    command = "python -m scripts.known_backbones" + ("" if backbones == [n for _, n in FAMILIES]
                                                     else f" --backbones {args.backbones}")
    write_text_atomic(args.out, backbones_page(result["rows"], dict((n, f) for f, n in FAMILIES), command))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
