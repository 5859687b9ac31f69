"""Prefect caching keyed on artifact fingerprints, with the committed manifest as the truth.

Prefect's own result cache cannot see an artifact directory being deleted, so the cache key
exists only while the stage's manifest is committed and the artifact is not stale (its files
as recorded, its upstreams' content as when it was computed), and it names the artifact's
content: delete, damage or force anything upstream and the key disappears or changes, the task
runs, and the stage recomputes.
"""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

from edgesam.artifacts import ArtifactStore
from edgesam.cluster import RayConnectionError
from edgesam.store.verify import stale_reason

# errno values of I/O failures that a retry can cure (network filesystems, busy devices).
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
    errno.ESTALE,
})


def cache_key(stage: str, fingerprint: str, artifact_path: str) -> str:
    """Cache key of a stage artifact: its fingerprint, qualified by where it lives."""
    where = hashlib.sha256(artifact_path.encode()).hexdigest()[:8]
    return f"edgesam-{stage}-{fingerprint}-{where}"


@dataclass
class ManifestCache(CachePolicy):
    """Key = the stage fingerprint, defined only while the artifact's manifest is committed.

    Reads the task inputs `name`, `cfg` (the `PipelineConfig`), `planned` (its `PlannedStage`)
    and `force`.
    """

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if inputs.get("force"):
            return None
        store, planned = ArtifactStore(inputs["cfg"].runtime.work_dir), inputs["planned"]
        artifact = store.artifact(inputs["name"], planned.fingerprint)
        upstream = {up: store.artifact(up, fp) for up, fp in planned.upstream.items()}
        if not artifact.complete or not all(a.complete for a in upstream.values()) or stale_reason(artifact, upstream):
            return None  # the task runs, and `run_stage` recomputes what is stale
        return f"{cache_key(artifact.stage, artifact.fingerprint, str(artifact.path))}-{artifact.manifest['content']}"


def is_transient_io_error(exc: BaseException) -> bool:
    """True for I/O errors worth retrying; never for bugs, bad input, missing files or a Ray
    cluster that refused to be joined (a retry cannot fix its address or token)."""
    if isinstance(exc, RayConnectionError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, BlockingIOError, InterruptedError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def retry_on_transient_io(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect `retry_condition_fn`: retry a failed stage only on transient I/O errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient_io_error(exc)
