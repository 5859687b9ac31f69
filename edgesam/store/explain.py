"""Why a stage will run: what differs between the plan and the nearest committed artifact of
that stage (config keys, code modules, upstream artifacts), as `dvc status` says it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgesam.store.files import MANIFEST


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of nested dicts (lists stay leaves)."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name: old -> new` for every leaf that differs."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def code_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The modules whose code differs (or that were added to / dropped from the stage's imports)."""
    return [f"{m} {'added' if m not in old else 'dropped' if m not in new else 'changed'}"
            for m in sorted(set(old) | set(new)) if old.get(m) != new.get(m)]


def nearest_committed(stage_dir: Path) -> dict[str, Any] | None:
    """The most recently committed manifest among a stage's artifacts, if any."""
    manifests = [json.loads(p.read_text()) for p in Path(stage_dir).glob(f"*/{MANIFEST}")]
    return max(manifests, key=lambda m: m.get("committed_at", 0), default=None)


def reasons(nearest: dict[str, Any] | None, key: dict[str, Any], code: dict[str, str],
            upstream: dict[str, str]) -> list[str]:
    """Why the planned artifact differs from `nearest` (config, code, upstream), in that order."""
    if nearest is None:
        return ["never run in this work dir"]
    if "key" not in nearest or "code" not in nearest:
        return ["the nearest artifact predates recorded keys"]
    why = [f"config {c}" for c in key_changes(nearest["key"], key)]
    why += [f"code {c}" for c in code_changes(nearest["code"], code)]
    why += [f"upstream {up} {nearest['upstream'].get(up)} -> {fp}" for up, fp in upstream.items()
            if nearest.get("upstream", {}).get(up) != fp]
    return why or ["same inputs as a committed artifact under another fingerprint"]
