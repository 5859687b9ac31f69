"""The fixed benchmark of the nightly evaluation: the val split of a shard artifact, prompted under
one protocol of the engine, and what identifies a result measured on it.

A result is the same result when the benchmark's content (the val shards' SHA-256), the protocol
(the engine's `EvalProtocol`, the image and annotation limits, the seed of the clicks and of the
annotation subsets) and the evaluation code are the same. The evaluation code's version is this
module's `code_version`: its syntax tree and that of every first-party module it imports (the
engine, the mIoU run, the datasets, the metric, the models' decoding), docstrings and comments
left out. Edits elsewhere (training, export, the stages) leave every ledger entry valid.

The evaluate stage appends its students' SA-1B results too (`append_stage_results`), under an
evaluation code version of its own (`evaluate-stage:...`): it prompts several models in one
pass, so its IoUs are kept on record beside the nightly ones but never reused for a night.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from segment_anything.modeling import Sam

from edgesam.data.shards import list_shards
from edgesam.eval.datasets import shard_items
from edgesam.eval.engine import EvalProtocol, Segmenter, protocol
from edgesam.eval.ledger import EvaluationKey, Ledger
from edgesam.eval.miou import evaluate
from edgesam.eval.stats import miou_interval, per_image
from edgesam.metrics import IoURecord
from edgesam.store.code import code_version, module_digests
from edgesam.store.files import sha256_of

DATASET = "sa1b"  # the evaluate stage's name of the shard artifact's val split
METRIC = "miou"


def eval_code_version() -> str:
    """The version of the code that turns a model and the benchmark into IoUs."""
    return code_version(module_digests(__name__))


@dataclass(frozen=True)
class Benchmark:
    """A shard artifact's val shards under one protocol."""

    root: Path
    shards: tuple[Path, ...]
    digest: str
    protocol: EvalProtocol
    max_images: int | None = None
    max_annotations: int | None = 64
    seed: int = 0

    @classmethod
    def open(cls, root: str | Path, protocol_name: str = "paper", refine_iters: int = 3,
             max_images: int | None = None, max_annotations: int | None = 64, seed: int = 0) -> Benchmark:
        """The val split of the shard artifact (or any folder with `val/shard-*.tar`) at `root`."""
        root = Path(root).expanduser().resolve()
        shards = tuple(list_shards(root, "val"))
        if not shards:
            raise FileNotFoundError(f"{root / 'val'}: no shard-*.tar files to evaluate on")
        digest = hashlib.sha256("".join(f"{p.name} {sha256_of(p)}\n" for p in shards).encode()).hexdigest()
        return cls(root, shards, digest, protocol(protocol_name, refine_iters), max_images, max_annotations, seed)

    @property
    def protocol_key(self) -> str:
        """How objects are prompted and which are drawn, as canonical JSON (part of a result's key)."""
        return json.dumps({"dataset": DATASET, "engine": asdict(self.protocol), "max_images": self.max_images,
                           "max_annotations": self.max_annotations, "seed": self.seed}, sort_keys=True)

    def measure(self, name: str, sam: Sam) -> tuple[list[IoURecord], list[dict[str, Any]]]:
        """Every annotation's IoU under every prompt type of the protocol, and per prompt type the
        mIoU with its bootstrap 95 % interval over images."""
        items = shard_items(self.shards, self.max_images, self.max_annotations, self.seed)
        records = evaluate([Segmenter(name, sam.eval())], items, DATASET, [self.protocol], self.seed)[0]
        records = records[self.protocol.name]
        if not records:
            raise ValueError(f"{self.root / 'val'}: no annotated image to evaluate on")
        return records, ledger_metrics(records, name)


def ledger_metrics(records: Sequence[IoURecord], name: str) -> list[dict[str, Any]]:
    """Per prompt type of model `name` on the benchmark: mIoU with its bootstrap 95 % interval."""
    prompts = dict.fromkeys(r.prompt for r in records if r.model == name and r.dataset == DATASET)
    return [{"dataset": DATASET, "prompt": prompt, "metric": METRIC, "value": found["miou"], "low": found["low"],
             "high": found["high"], "images": found["images"], "annotations": found["annotations"]}
            for prompt in prompts for found in [miou_interval(per_image(records, name, DATASET, prompt))]]


def append_stage_results(ledger: Ledger, bench: Benchmark, records: dict[str, list[IoURecord]],
                         students: dict[str, tuple[Path, str]], refine_iters: int, eval_code: str,
                         run_id: str) -> list[int]:
    """The evaluate stage's SA-1B IoUs of each student ({name: (weights file, backbone)}) under
    each protocol (`records`, by protocol name), one ledger evaluation each; their ids."""
    ids = []
    for protocol_name, found in records.items():
        prompted = replace(bench, protocol=protocol(protocol_name, refine_iters))
        for name, (weights, backbone) in students.items():
            mine = [r for r in found if r.model == name and r.dataset == DATASET]
            key = EvaluationKey(sha256_of(weights), bench.digest, prompted.protocol_key, f"evaluate-stage:{eval_code}")
            ids.append(ledger.append(key, name, backbone, protocol_name, ledger_metrics(mine, name), mine, run_id))
    return ids
