"""A bounded queue in front of ONE worker thread, which groups compatible requests into batches.

Diffusion is compute-bound: a replica's throughput comes from running several requests in one
UNet batch, not from running several batches at once. So exactly one thread runs the model
(RELIABILITY #14: no engine context shared across threads) and everything else only queues.

Batching: the worker takes the oldest job, then, for at most `wait_s`, adds queued jobs with
the same `key` until `max_batch_size` images. A job whose key is None always runs alone. Every
job carries its own id into the batch and its answer is matched back by that id, never by
position (RELIABILITY #18). A job whose future was cancelled (its client timed out) before the
worker reached it is dropped without running.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The queue holds `max_queue` jobs already."""


class ClosedError(Exception):
    """The batcher is shutting down (or its worker died) and takes no new jobs."""


@dataclass(eq=False)  # a job is itself: removed from the queue by identity, never by comparing payloads (tensors)
class Job:
    key: Hashable | None  # jobs with equal, non-None keys may share a batch
    size: int  # images this job adds to a batch
    payload: Any
    deadline: float  # time.monotonic() after which nobody waits for the answer
    encoding: str = "png"  # how the answer carries its images: "png" bytes (HTTP) or "uint8" [H, W, C] arrays (Triton)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # unique: the batch's answers are matched by it
    request_id: str = ""  # what the client and the log lines call the request (its X-Request-Id); empty: `id`
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.request_id = self.request_id or self.id

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.deadline


RunBatch = Callable[[list[Job]], dict[str, Any]]  # jobs -> {job.id: answer}


FAILING_BATCHES = 3  # batches failed in a row after which the worker counts as dead to health checks, until one succeeds


class Batcher:
    """`submit` from any thread; `run_batch` is only ever called from the one worker thread.

    `on_start` runs first in that thread (load the model there, so the thread that owns the
    pipeline is the one that built it); if it raises, the batcher is dead and says why.
    `on_batch` sees each batch before it runs, `on_failure` each batch that raised (once, whatever its size).
    """

    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_queue: int, wait_s: float,
                 on_start: Callable[[], None] | None = None, on_batch: Callable[[list[Job]], None] | None = None,
                 name: str = "diffrt-serve-worker", engine_failure: Callable[[BaseException], bool] = lambda exc: True,
                 stuck_after_s: float = math.inf, on_failure: Callable[[list[Job], BaseException], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, wait_s >= 0; got {max_batch_size}, {max_queue}, {wait_s}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.wait_s = wait_s
        self.on_start = on_start
        self.on_batch = on_batch
        self.on_failure = on_failure
        self.error: BaseException | None = None  # why the worker died, if it did
        # A sticky engine error (a CUDA illegal address) fails every batch with the thread alive: counted, so that
        # health checks fail and an orchestrator replaces the replica.
        # `engine_failure` tells those from a batch's own (NaN for one prompt, every client gone), which do not count.
        self.failed_in_row = 0
        self.last_failure: BaseException | None = None
        self.engine_failure = engine_failure
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._busy_since = 0.0  # time.monotonic() when the batch now running began
        self.stuck_after_s = stuck_after_s  # a batch running longer is a stuck worker (liveness fails)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- any thread -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        """The worker thread runs (it loaded, and has not died)."""
        return self._thread.is_alive() and self.error is None

    @property
    def alive(self) -> bool:
        """running, the engine not failing batch after batch, and no batch running for longer than stuck_after_s
        (liveness: a restart is the remedy)."""
        return self.running and self.failed_in_row < FAILING_BATCHES and not self.stuck

    @property
    def busy_for(self) -> float:
        """Seconds the batch now running has run (0 when none runs)."""
        return time.monotonic() - self._busy_since if self._busy else 0.0

    @property
    def stuck(self) -> bool:
        return self.busy_for > self.stuck_after_s

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the batch being run, nor those their clients gave up on)."""
        return sum(not job.future.cancelled() for job in list(self._queue))

    def check_room(self) -> None:
        """Raise what `submit` would for a full or closed queue (a cheap check before planning a job)."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:  # under self._cond
        if self._closing or self.error is not None:
            raise ClosedError("the service is shutting down" if self._closing else f"the worker died: {self.error}")
        self._drop_cancelled()  # a request that already got its 504 holds no slot
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")

    @property
    def in_flight(self) -> int:
        return len(self._queue) + int(self._busy)

    def submit(self, job: Job) -> Future:
        with self._cond:
            self._check_room()
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def _drop_cancelled(self) -> None:  # under self._cond
        if any(job.future.cancelled() for job in self._queue):
            self._queue = deque(job for job in self._queue if not job.future.cancelled())

    def close(self, timeout: float | None = None) -> bool:
        """Take no new jobs, let the worker finish every queued one, then stop. True if it stopped in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self.on_start is not None:
                self.on_start()
        except BaseException as exc:  # noqa: BLE001 - recorded, reported by health checks and to waiting jobs
            log.exception("the serve worker failed to start")
            self._die(exc)
            return
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait(0.5)  # a bounded wait, so a lost notify costs half a second, not a hang
                if not self._queue:
                    return None  # closing and drained
                first = self._queue.popleft()
                if first.future.set_running_or_notify_cancel():
                    break  # else its client gave up before we started it: drop it
            batch, size = [first], first.size
            window_end = time.monotonic() + self.wait_s
            while first.key is not None and size < self.max_batch_size:
                for job in list(self._queue):
                    if job.key == first.key and size + job.size <= self.max_batch_size:
                        self._queue.remove(job)
                        if job.future.set_running_or_notify_cancel():
                            batch.append(job)
                            size += job.size
                remaining = window_end - time.monotonic()
                if size >= self.max_batch_size or remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            self._busy, self._busy_since = True, time.monotonic()
            return batch

    def _run(self, batch: list[Job]) -> None:
        try:
            if self.on_batch is not None:
                self.on_batch(batch)
            answers = self.run_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - every job of the batch gets the error
            if self.engine_failure(exc):
                self.failed_in_row, self.last_failure = self.failed_in_row + 1, exc
            if self.on_failure is not None:
                self.on_failure(batch, exc)
            for job in batch:
                job.future.set_exception(exc)
        else:
            # A batch run again request by request (serve.runtime: after a NaN) answers some with their own errors: an
            # engine's among them counts, as a failed batch would, so that health checks still see a broken engine.
            broken = next((a for a in answers.values() if isinstance(a, BaseException) and self.engine_failure(a)), None)
            self.failed_in_row, self.last_failure = (self.failed_in_row + 1, broken) if broken else (0, self.last_failure)
            for job in batch:
                if isinstance(answers.get(job.id), BaseException):  # one request's own failure (the others' answers stand)
                    job.future.set_exception(answers[job.id])
                elif job.id in answers:
                    job.future.set_result(answers[job.id])
                else:
                    job.future.set_exception(RuntimeError(f"the batch returned no answer for request {job.request_id}"))
        finally:
            with self._cond:
                self._busy = False

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            pending = list(self._queue)
            self._queue.clear()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ClosedError(f"the worker died: {exc}"))
