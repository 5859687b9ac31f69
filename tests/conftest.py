"""Shared fixtures: tiny models and real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sam():
    """A small SAM (ViT 64-d, 2 blocks) at 256x256 input, random weights."""
    from edgesam.models.tiny_sam import build_tiny_sam

    torch.manual_seed(0)
    return build_tiny_sam(img_size=256, embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="session")
def student_256(tiny_sam):
    """A random-weight RepViT-M1 EdgeSAM at 256x256 input, decoder from `tiny_sam`."""
    from edgesam.models.edgesam import build_edgesam

    torch.manual_seed(0)
    return build_edgesam("repvit_m1", img_size=256, decoder_init=tiny_sam)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """A real photo (512x512 RGB uint8) from skimage.data."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """A real photo (400x600 RGB uint8, non-square) from skimage.data."""
    from skimage import data

    return data.coffee()


@pytest.fixture(scope="session")
def bundle_256(student_256, astronaut, tmp_path_factory):
    """An exported bundle (fp32, int8 with both weight modes measured, fp16) of `student_256` with
    a random RPN that proposes boxes everywhere."""
    from edgesam.config import ExportConfig
    from edgesam.export.bundle import build_bundle
    from edgesam.eval.datasets import EvalItem
    from edgesam.models.rpn import build_rpn, save_rpn
    from edgesam.models.edgesam import save_edgesam

    out = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    rpn = build_rpn(student_256.image_encoder, channels=32, num_convs=1).eval()
    rpn.objectness.bias.data.fill_(5.0)  # random weights: make every location a confident proposal
    save_edgesam(student_256, out / "student.pt")
    save_rpn(rpn, out / "rpn_in.pt")
    masks = np.zeros((2, 512, 512), bool)
    masks[0, 100:300, 150:350], masks[1, 320:480, 40:200] = True, True
    item = EvalItem("astronaut", astronaut, masks, np.array([[150, 100, 350, 300], [40, 320, 200, 480]], float))
    cfg = ExportConfig(calibration_images=1, latency_repeats=1)
    build_bundle(cfg, student_256, out / "student.pt", rpn, out / "rpn_in.pt",
                 "official", [astronaut], [item], out)
    (out / "student.pt").unlink()
    (out / "rpn_in.pt").unlink()
    return out
