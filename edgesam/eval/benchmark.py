"""The fixed benchmark of the nightly evaluation: the val split of a shard artifact, prompted under
one protocol of the engine, and what identifies a result measured on it.

A result is the same result when the benchmark's content (the val shards' SHA-256), the protocol
(the engine's `EvalProtocol`, the image and annotation limits, the seed of the clicks and of the
annotation subsets) and the evaluation code are the same. The evaluation code's version is this
module's `code_version`: its syntax tree and that of every first-party module it imports (the
engine, the mIoU run, the datasets, the metric, the models' decoding), docstrings and comments
left out. Edits elsewhere (training, export, the stages) leave every ledger entry valid.

The evaluate stage appends its results too (`append_stage_results`): every model it measured
(teacher, both students, the student with each RPN prior) on every dataset it measured them on
(the SA-1B-format val shards, the COCO-format sets), under an evaluation code version of its own
(`evaluate-stage:...`) and its artifact's name as the run id. It prompts several models in one
pass, so those IoUs are kept on record beside the nightly ones, never reused for a night; the
README's results tables are rendered from them (`edgesam models results --run evaluate/<fp>`).
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


def ledger_metrics(records: Sequence[IoURecord], name: str, dataset: str | None = DATASET) -> list[dict[str, Any]]:
    """Per dataset (only `dataset`, or every one when None) and prompt type of model `name`: mIoU
    with its bootstrap 95 % interval over images."""
    measured = dict.fromkeys((r.dataset, r.prompt) for r in records
                             if r.model == name and dataset in (None, r.dataset))
    return [{"dataset": where, "prompt": prompt, "metric": METRIC, "value": found["miou"], "low": found["low"],
             "high": found["high"], "images": found["images"], "annotations": found["annotations"]}
            for where, prompt in measured for found in [miou_interval(per_image(records, name, where, prompt))]]


def combined_digest(*digests: str) -> str:
    """One model digest for a model made of several weight files (the student and its RPN prior)."""
    return hashlib.sha256("+".join(digests).encode()).hexdigest()


def append_stage_results(ledger: Ledger, bench: Benchmark, records: dict[str, list[IoURecord]],
                         models: dict[str, tuple[str, str]], refine_iters: int, eval_code: str,
                         run_id: str) -> list[int]:
    """The evaluate stage's IoUs of each model ({name: (weights digest, backbone)}) on every
    dataset it was measured on, under each protocol (`records`, by protocol name): one ledger
    evaluation per model and protocol; their ids."""
    ids = []
    for protocol_name, found in records.items():
        prompted = replace(bench, protocol=protocol(protocol_name, refine_iters))
        for name, (digest, backbone) in models.items():
            mine = [r for r in found if r.model == name]
            if not mine:
                continue
            key = EvaluationKey(digest, bench.digest, prompted.protocol_key, f"evaluate-stage:{eval_code}")
            ids.append(ledger.append(key, name, backbone, protocol_name, ledger_metrics(mine, name, None), mine,
                                     run_id))
    return ids
