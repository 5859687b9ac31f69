"""Data formats: the embedded benchmark, SA-1B reading, WebDataset shards, SAM transforms.

Names are imported lazily, so that `edgesam.data.sa1b` (used in worker processes) loads
without torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "shards", "SampleDataset": "shards", "iter_samples": "shards", "list_shards": "shards",
    "write_shards": "shards", "preprocess": "transforms", "valid_mask": "transforms",
    "write_benchmark": "synth",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgesam.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgesam.data.{_EXPORTS[name]}"), name)
