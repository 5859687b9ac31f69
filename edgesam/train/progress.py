"""Training progress for whoever drives `fit`: a callback on the driver, fed by rank 0.

Rank 0 hands every logged record (`log_every` steps) to the run's progress sink. In-process
(`num_workers=0`) the sink is the callback itself. On Ray workers it is a `QueueSink`, which
puts the records on a `ray.util.queue.Queue` that a thread of the driver drains into the
callback. Ray Train's own driver-side hook (`ray.train.UserCallback.after_report`) is not
used: it runs in the controller actor, not in the driver's process, and it sees only
`ray.train.report` calls, which every rank must make and which wait for the controller's
poll (one report per worker every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, 2 s, ray 2.60), too
slow to make at every logged step.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from ray.util.queue import Queue

log = logging.getLogger("edgesam.train")

# on_progress(step, total steps, the logged record: step, loss, lr, images_per_s, the task's metrics)
ProgressCallback = Callable[[int, int, dict[str, Any]], None]

_ambient: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("edgesam_progress", default=None)


@contextmanager
def reporting_progress(callback: ProgressCallback | None) -> Iterator[None]:
    """Every `fit` called inside this block without its own `on_progress` reports to `callback`.

    The stage runner reaches the stages' `fit` calls this way, so the stage contract
    `run(cfg, runtime, inputs, out)` stays the same for every stage.
    """
    token = _ambient.set(callback)
    try:
        yield
    finally:
        _ambient.reset(token)


def ambient_progress() -> ProgressCallback | None:
    """The callback of the innermost `reporting_progress` block, or None."""
    return _ambient.get()


def guarded(callback: ProgressCallback) -> ProgressCallback:
    """`callback` whose errors are logged, not raised: watching a run must never stop it."""

    def call(step: int, total: int, record: dict[str, Any]) -> None:
        try:
            callback(step, total, record)
        except Exception:  # noqa: BLE001 - any error of the watcher
            log.warning("progress callback failed at step %d/%d", step, total, exc_info=True)

    return call


@dataclass
class QueueSink:
    """Rank 0's end of the relay to the driver (picklable: it travels in the loop's config)."""

    queue: Queue

    def __call__(self, step: int, total: int, record: dict[str, Any]) -> None:
        self.queue.put_nowait((step, total, record))


@contextmanager
def relay(callback: ProgressCallback) -> Iterator[QueueSink]:
    """A sink for Ray workers whose records reach `callback` on this process while the block runs.

    A daemon thread (in a copy of this thread's context, so e.g. a Prefect task run's context
    holds there) calls `callback` in step order; the block's end waits for the last records.
    """
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})  # needs no free CPU next to the training workers
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                item = queue.get(timeout=0.2)
            except Empty:
                if done.is_set():
                    return
                continue
            callback(*item)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(drain,), name="edgesam-progress",
                              daemon=True)
    thread.start()
    try:
        yield QueueSink(queue)
    finally:
        done.set()
        thread.join()
        queue.shutdown()
