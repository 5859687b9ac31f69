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
