"""The exported bundle: a directory whose `config.json` lists every file with its SHA-256.

Torch-free (the `OnnxPredictor` reads bundles). A file is looked up by role (``encoder``,
``encoder_int8``, ``decoder_fp16``, ``rpn_onnx``, ``checkpoint``, ...) and verified before use,
so a missing, truncated, replaced or foreign file fails with an error naming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.json"
CHECKPOINT, RPN_CHECKPOINT = "edgesam.pt", "rpn.pt"  # the PyTorch files beside the ONNX ones
FORMAT = "edgesam-bundle"
VERSION = 2


class BundleError(ValueError):
    """A bundle directory, its config.json or one of its files is missing or does not match."""


def sha256(path: Path) -> str:
    """SHA-256 of a file; not `edgesam.artifacts.sha256_file`: bundle clients need no pydantic."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, **info: Any) -> dict[str, Any]:
    """config.json's entry of one file: its name, size, digest and what else describes it."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path), **info}


@dataclass
class Bundle:
    root: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> Bundle:
        """Read `root/config.json` (a bundle written by the export stage)."""
        root = Path(root)
        path = root / CONFIG
        if not path.is_file():
            raise BundleError(f"{root} is not an EdgeSAM bundle: {CONFIG} not found")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} cannot be read as JSON: {exc}") from exc
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise BundleError(f"{path} is not an EdgeSAM bundle config (no 'format': '{FORMAT}')")
        if config.get("version") != VERSION:
            raise BundleError(f"{path} has bundle version {config.get('version')}, this code reads {VERSION}")
        return cls(root, config)

    @property
    def roles(self) -> list[str]:
        return sorted(self.config["files"])

    def has(self, role: str) -> bool:
        return role in self.config["files"]

    def path(self, role: str, verify: bool = True) -> Path:
        """The file of `role`, checked to exist and (with `verify`) to match its SHA-256."""
        if role not in self.config["files"]:
            raise BundleError(f"bundle {self.root} has no {role!r} file (it has: {', '.join(self.roles)})")
        entry = self.config["files"][role]
        path = self.root / entry["file"]
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path} ({role}, listed in {self.root / CONFIG})")
        if verify and sha256(path) != entry["sha256"]:
            raise BundleError(f"{path} does not match {self.root / CONFIG} (SHA-256 differs): the file was "
                              "replaced, truncated or comes from another export")
        return path
