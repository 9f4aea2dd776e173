"""The runtime every front end shares: a worker owning the pipeline, the batcher in front of it,
and the metrics. The FastAPI app, the Gradio demo and each Ray Serve replica hold one each.

    runtime = ServeRuntime(RuntimeConfig(model=None, backend="onnxruntime"))
    runtime.start()                       # loads, warms up and self-tests in the worker thread
    runtime.wait_ready(timeout=120)
    answer = runtime.generate_sync(GenerateBody(class_label=3, seed=7))
    runtime.close()                       # finishes what is queued, then stops
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Iterable

from diffrt.errors import ArtifactError, BackendUnavailableError, DiffrtError, NonFiniteOutputError, ShapeOutOfRangeError
from diffrt.runtime.backends import TORCH_BACKENDS
from diffrt.serve.batcher import Batcher, ClosedError, Job, QueueFullError
from diffrt.serve.batching import Answer, BatchAbandoned
from diffrt.serve.metrics import ServeMetrics
from diffrt.serve.schema import DEFAULT_COLOR_SCALE, GenerateBody, RequestError
from diffrt.serve.text_to_image_worker import TextToImageWorker
from diffrt.serve.worker import PixelWorker

log = logging.getLogger(__name__)


@dataclass
class RuntimeConfig:
    model: str | None = None  # None: the shipped digits model
    backend: str = "onnxruntime"
    device: str | None = None  # None: cuda when available, else cpu (runtime.backends.resolve_device)
    max_batch_size: int = 8  # images per UNet batch (CFG doubles what the engine sees)
    max_queue: int = 64
    batch_wait_ms: float = 10.0
    timeout_s: float = 60.0
    max_image_bytes: int = 8 << 20
    max_image_side: int = 0  # pixels; 0: twice the model's own side on eager PyTorch, 4096 on engines (batching.largest_side)
    warmup_steps: int = 2
    exact_batching: bool = True  # batch requests only if the backend proves batch-invariant at start-up
    controlnet: str | list[str] | None = None  # ControlNet folder(s) for a text-to-image diffusers folder (artifacts carry theirs)
    loras: list[tuple[str, float]] = field(default_factory=list)  # (file, scale) at open; a request's lora_scale multiplies them
    strict: bool = False  # any fallback (an ONNX Runtime provider that did not start, PyTorch for an artifact) fails the load
    cuda_graph: bool = True  # tensorrt: replay captured CUDA graphs, one per request shape seen

    def __post_init__(self) -> None:
        check_service_settings(max_batch_size=self.max_batch_size, max_queue=self.max_queue, batch_wait_ms=self.batch_wait_ms,
                               timeout_s=self.timeout_s)
        check_max_image_side(self.max_image_side)


def setting_from_text(text: str, kind: type):
    """A setting written as text (config.pbtxt's parameters, `serve run`'s key=value arguments) as its type `kind`: a
    bool is true or false (any case), a number as int() or float() reads it; ValueError otherwise."""
    if kind is bool:
        if text.strip().lower() not in ("true", "false"):
            raise ValueError(text)
        return text.strip().lower() == "true"
    return kind(text)


def check_max_image_side(value) -> None:
    """--max-image-side (`diffrt serve`, Ray, `diffrt triton-repo`): pixels, 0 for the default."""
    if not isinstance(value, int) or value < 0:
        raise DiffrtError(f"--max-image-side must be a number of pixels >= 1 (0: the default), got {value!r}")


def check_service_settings(*, max_batch_size: int, max_queue: int, batch_wait_ms: float, timeout_s: float,
                           wait_name: str = "the batch wait") -> None:
    """The queue's settings, one DiffrtError line each (`diffrt serve`, Ray, `diffrt triton-repo`): a NaN wait
    hung the worker while health checks stayed green, a NaN or negative timeout answered 504 at once."""
    for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
        if not isinstance(value, int) or value < 1:
            raise DiffrtError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if not 0 <= batch_wait_ms < math.inf:
        raise DiffrtError(f"{wait_name} must be a number of milliseconds >= 0, got {batch_wait_ms!r}")
    if not 0 < timeout_s < math.inf:
        raise DiffrtError(f"--timeout must be a number of seconds > 0, got {timeout_s!r}")


def engine_failure(exc: BaseException) -> bool:
    """Whether a failed batch points at the engine (a CUDA error, a crashed session, an execution context TensorRT
    could not make: ArtifactError, BackendUnavailableError), which health checks count, rather than at its requests:
    NaN for one prompt, a shape, a refusal of the call's own arguments (a plain DiffrtError), a batch every client
    gave up on."""
    from diffrt.serve.batching import BatchAbandoned

    if isinstance(exc, (NonFiniteOutputError, ShapeOutOfRangeError, BatchAbandoned)):
        return False
    return not isinstance(exc, DiffrtError) or isinstance(exc, (ArtifactError, BackendUnavailableError))


def served_model(model: str | None, backend: str, *, here: bool = True) -> str | None:
    """What can be checked at once about a model to serve, in one line each, before anything loads:
    the backend is one diffrt knows, a Hub id becomes its cached snapshot, a folder is a model or an
    artifact. Returns the model's folder (None: the shipped digits model). `here`: the model is served on this
    machine, whose backends are checked; else (a Triton repository for another machine) the name only."""
    from pathlib import Path

    from diffrt.hub import resolve_model
    from diffrt.models import require_model_dir
    from diffrt.runtime.backends import require_backend
    from diffrt.runtime.loading import is_artifact

    from diffrt.runtime.backends import REGISTRY

    if here:
        require_backend(backend)
    elif backend not in REGISTRY:
        raise DiffrtError(f"unknown backend {backend!r}; diffrt's backends are {', '.join(REGISTRY)}")
    model = None if model is None else str(resolve_model(model))
    if model is not None and not is_artifact(Path(model)):
        require_model_dir(model)
    return model


def make_worker(config: RuntimeConfig) -> PixelWorker | TextToImageWorker:
    """The worker for the model's kind: text-to-image (prompts, ControlNet) or pixel-space (class labels)."""
    from diffrt.hub import resolve_model
    from diffrt.runtime.backends import resolve_device
    from diffrt.runtime.opening import is_text_to_image
    from diffrt.text_to_image_models import controlnet_paths

    model = served_model(config.model, config.backend)
    controlnet = [str(resolve_model(c)) for c in controlnet_paths(config.controlnet)] or None

    common = dict(warmup_steps=config.warmup_steps, max_batch_size=config.max_batch_size, exact_batching=config.exact_batching,
                  strict=config.strict, cuda_graph=config.cuda_graph, loras=config.loras)
    device = str(resolve_device(config.device, config.backend))  # tensorrt without CUDA: refused before any load
    if is_text_to_image(model):
        return TextToImageWorker(model, config.backend, device, controlnet=controlnet, max_image_bytes=config.max_image_bytes, **common)
    if controlnet is not None:
        raise DiffrtError(f"--controlnet needs a text-to-image model; {model or 'the shipped digits model'} is pixel-space")
    return PixelWorker(model, config.backend, device, **common)


def give_up(jobs: Iterable[Job]) -> None:
    """Nobody waits for these jobs' answers any more (their client has gone): from now they are past
    their deadline and cancelled, so a queued job is dropped before it runs, and a running batch whose
    every job is given up (or timed out) stops at its next step (batching.abandon_when_nobody_waits).
    A running job's future cannot be cancelled; its batch still answers it, to nobody."""
    now = time.monotonic()
    for job in jobs:
        job.deadline = min(job.deadline, now)
        job.future.cancel()


@contextlib.contextmanager
def _queue_refusals():
    """The batcher's refusals as HTTP: a full queue is 429 (retry soon), a closing one 503."""
    try:
        yield
    except QueueFullError as exc:
        raise RequestError(429, f"{exc}; retry later", headers={"Retry-After": "1"}) from None
    except ClosedError as exc:
        raise RequestError(503, str(exc)) from None


def stuck_after(timeout_s: float) -> float:
    """How long a batch may run before the worker counts as stuck: its requests' deadlines are timeout_s after they
    came, and it stops at the first step after them; a step longer than a whole timeout is a worker gone deaf."""
    return 2 * timeout_s + 30


class ServeRuntime:
    def __init__(self, config: RuntimeConfig, metrics: ServeMetrics | None = None):
        self.config = config
        self.metrics = metrics or ServeMetrics()
        self.worker = make_worker(config)
        self.batcher = Batcher(self._run_batch, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                               wait_s=config.batch_wait_ms / 1000, on_start=self._load, on_batch=self._count_batch,
                               engine_failure=engine_failure, stuck_after_s=stuck_after(config.timeout_s),
                               on_failure=self._count_failure)
        self.metrics.watch_queue(lambda: self.batcher.depth)
        self._ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()

    def _load(self) -> None:  # in the worker thread
        self.worker.load()
        self.batcher.max_batch_size = self.worker.max_batch_size  # the engine's profile may allow less
        self.worker.max_image_side = self.config.max_image_side or self.worker.largest_side()
        log.info("requests may ask for sides up to %d pixels (--max-image-side)", self.worker.max_image_side)
        self.metrics.backend.info({"backend": self.worker.pipe.backend, "model": str(self.config.model or "shipped:digits"),
                                   "device": str(self.worker.pipe.device)})
        backends = self.worker.pipe.backends()  # the worker's load made img2img's encoder: a fallback is among them
        self.metrics.fallbacks.set(sum(1 for b in backends.values() if getattr(b, "missing_providers", None)))
        exported = self.worker.pipe.backend not in TORCH_BACKENDS
        self.metrics.torch_fallbacks.set(sum(1 for b in backends.values() if exported and b.name in TORCH_BACKENDS))
        self.metrics.ready.set(1)
        self._ready.set()

    @property
    def ready(self) -> bool:
        # Not the failure streak: out of rotation, a replica would get no batch to recover with; liveness restarts it.
        return self._ready.is_set() and self.batcher.running

    @property
    def loaded(self) -> bool:
        """The model loaded, warmed up and passed its self-test (whether or not it still works)."""
        return self._ready.is_set()

    @property
    def alive(self) -> bool:
        """False once the worker died or failed to load, or while its engine fails every batch (Ray's check_health
        raises on it, so the replica is replaced)."""
        return self.batcher.alive

    @property
    def dead_reason(self) -> str:
        """Why `alive` is False, for health answers."""
        if self.batcher.error is not None:
            return f"the worker is dead: {self.batcher.error}"
        if self.batcher.stuck:
            return (f"a batch has run for {self.batcher.busy_for:.0f} s, past every deadline of its requests (one step "
                    "taking longer than the request timeout); a restart frees the worker")
        return (f"its last {self.batcher.failed_in_row} batches failed (the engine may be broken); the last with: "
                f"{type(self.batcher.last_failure).__name__}: {self.batcher.last_failure}")

    @property
    def error(self) -> BaseException | None:
        return self.batcher.error

    def wait_ready(self, timeout: float) -> None:
        """Block until ready; raise the load error, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.batcher.error is not None:
                raise self.batcher.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model was not ready after {timeout:.0f} s")

    def close(self, timeout: float | None = None) -> bool:
        self.metrics.ready.set(0)
        return self.batcher.close(timeout)

    def describe(self) -> dict:
        return {**self.worker.describe(), "max_batch_size": self.batcher.max_batch_size,
                "max_image_side": self.worker.max_image_side, "warmup_seconds": self.worker.warmup_seconds}

    # -- requests -----------------------------------------------------------------------------

    def submit(self, body: GenerateBody, encoding: str = "png", request_id: str = "") -> Job:
        """Check, plan and queue a request; RequestError (422/413/429/503) when it cannot be.
        `encoding`: the answer's images as "png" bytes or "uint8" [H, W, C] arrays (Job.encoding); `request_id`:
        what the answer and the log lines call it (empty: a new id)."""
        job = self.prepare(body, encoding, request_id)
        self.enqueue(job)
        return job

    def enqueue(self, job: Job) -> None:
        """Queue a prepared job; RequestError 429 (the queue is full) or 503 (closing)."""
        with _queue_refusals():
            self.batcher.submit(job)

    def prepare(self, body: GenerateBody, encoding: str = "png", request_id: str = "") -> Job:
        """submit's first half: check and plan a request into a job, not yet queued (Triton plans every row of the
        requests it hands over before any of them is queued). The queue's room is checked first all the same."""
        if not self.ready:
            reason = f"the model failed to load: {self.error}" if self.error else "the model is still loading; see /readyz"
            raise RequestError(503, reason, headers={"Retry-After": "5"})
        # Cheap refusals first: planning draws the request's noise and decodes its images.
        with _queue_refusals():
            self.batcher.check_room()
        if body.num_images is not None and body.num_images > self.batcher.max_batch_size:
            # The largest batch is the engine's profile (start-up caps it there) or the operator's limit: counted as
            # outside the engine's built ranges only past the engine's.
            engine = self.worker.engine_max_batch
            if engine is not None and body.num_images > engine:
                self.metrics.profile_rejections.labels(field="num_images").inc()
            raise RequestError(422, f"num_images: {body.num_images} is more than this service's largest batch "
                                    f"({self.batcher.max_batch_size}); ask for fewer per request", "num_images")
        for name in ("height", "width"):
            self._check_side(name, getattr(body, name, None))
        # `diffrt generate` refuses it too; the default is let through, which clients that send every field send.
        if "color_scale" in body.model_fields_set and body.color is None and body.color_scale != DEFAULT_COLOR_SCALE:
            raise RequestError(422, "color_scale: it sets how strongly `color` steers the images, and no color was given; "
                                    "send color too, or leave color_scale out", "color_scale")
        try:
            plan = self.worker.plan(body)
        except RequestError as exc:
            if exc.profile:
                self.metrics.profile_rejections.labels(field=exc.field or "").inc()
            raise
        for name in ("height", "width"):  # a size taken from a control image
            given = next((f for f in ("control_image", "image") if getattr(body, f, None)), name)
            self._check_side(given, plan.settings.get(name))
        return Job(self.worker.batch_key(plan), plan.num_images, plan, deadline=time.monotonic() + self.config.timeout_s,
                   encoding=encoding, request_id=request_id)

    def _check_side(self, field: str, size: int | None) -> None:
        largest = self.worker.max_image_side
        if size is not None and largest and size > largest:
            raise RequestError(422, f"{field}: {size} pixels is more than this service's largest side "
                                    f"({largest}, --max-image-side)", field)

    async def generate(self, body: GenerateBody, request_id: str = "") -> Answer:
        """The request's answer. Cancelling the task that awaits it means its client has gone (the HTTP
        app cancels it on a disconnect, Ray Serve when its proxy's client hangs up): its rows are given
        up, queued or running, instead of being generated for nobody ahead of live requests."""
        # Planning draws noise and decodes images: off the event loop, in a thread that a cancel cannot
        # stop. Whichever of the thread and the cancel comes second gives the job up, so a job queued
        # after its client left never runs (whether or not the event loop is still there to see it).
        lock, gone, queued = threading.Lock(), [], []

        def plan_and_queue() -> Job:
            job = self.submit(body, request_id=request_id)
            with lock:
                queued.append(job)
                if gone:
                    self._give_up(job)
            return job

        try:
            job = await asyncio.to_thread(plan_and_queue)
        except asyncio.CancelledError:
            with lock:
                gone.append(True)
                if queued:
                    self._give_up(queued[0])
            raise
        with self._answer_errors(job):
            answer = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=self._time_left(job))
        return self._observed(answer)

    def generate_sync(self, body: GenerateBody) -> Answer:
        return self.wait(self.submit(body))

    def wait(self, job: Job) -> Answer:
        """Block until a submitted job's answer; RequestError (504, 500, 503) when it has none."""
        with self._answer_errors(job):
            answer = job.future.result(timeout=self._time_left(job))
        return self._observed(answer)

    @staticmethod
    def _time_left(job: Job) -> float:
        return max(0.0, job.deadline - time.monotonic())  # the timeout runs from submission, for both ways of waiting

    @contextlib.contextmanager
    def _answer_errors(self, job: Job):
        """What waiting for a job can raise, as the RequestError a client gets: past its deadline
        (or cancelled) a 504 that frees its queue slot, a failed batch 500/503."""
        try:
            yield
        except asyncio.CancelledError:  # the waiting task itself is cancelled (its client gone): give the rows up, stay cancelled
            self._give_up(job)
            raise
        except (TimeoutError, asyncio.TimeoutError, FutureTimeout, CancelledError):  # asyncio's differs from the builtin before 3.11
            job.future.cancel()
            raise self._timeout_error() from None
        except Exception as exc:  # noqa: BLE001 - mapped to an HTTP status
            raise self._run_error(exc, job) from None

    def _give_up(self, job: Job) -> None:
        # Cancelling the task that awaits the job has cancelled a queued job's future already
        # (asyncio.wrap_future passes the cancel on); a running one's cannot be.
        if job.future.running():
            state = "running"
        elif job.future.cancelled() or not job.future.done():
            state = "queued"
        else:
            return  # answered already: nothing left to give up
        give_up([job])
        log.info("request %s given up while %s (%d image(s)): its client has gone, or the service is stopping", job.request_id,
                 state, job.size)

    def _observed(self, answer: Answer) -> Answer:
        self.metrics.observe_timings(answer.timings_ms, len(answer.images))
        return answer

    def _timeout_error(self) -> RequestError:
        return RequestError(504, f"the request took longer than the service's timeout of {self.config.timeout_s:g} s")

    def _run_error(self, exc: Exception, job: Job) -> RequestError:
        if isinstance(exc, BatchAbandoned):
            return self._timeout_error()
        if isinstance(exc, NonFiniteOutputError):
            return RequestError(500, f"the model produced non-finite values: {exc}")
        if isinstance(exc, DiffrtError):  # inputs were checked by plan(); this is the service's fault
            return RequestError(500, str(exc))
        if isinstance(exc, ClosedError):
            return RequestError(503, str(exc))
        log.error("request %s: generation failed", job.request_id, exc_info=exc)
        return RequestError(500, f"generation failed: {type(exc).__name__}: {exc}")

    def _run_batch(self, jobs: list[Job]) -> dict[str, Answer | BaseException]:  # in the worker thread
        """The worker's batch; when it comes out non-finite, each of its requests alone. A NaN is one request's (an
        fp16 overflow for one prompt or seed), and its batchmates, each of which would have succeeded on its own,
        were refused with it. Alone, a request draws the noise it drew in the batch (its step noise too: each
        generator is put back where the batch found it), so its answer is the one it would have had."""
        # eta > 0, LCM, Euler Ancestral: a plan's generator draws step noise, and the failed run moved it on.
        states = [(job.payload.generator, job.payload.generator.get_state()) for job in jobs
                  if getattr(job.payload, "generator", None) is not None]
        try:
            return self.worker.run_batch(jobs)
        except NonFiniteOutputError as exc:
            if len(jobs) == 1:
                raise
            log.warning("a batch of %d requests came out non-finite (%s); running each alone", len(jobs), exc)
        for generator, state in states:
            generator.set_state(state)
        answers: dict[str, Answer | BaseException] = {}
        for job in jobs:
            try:
                self._count_batch([job])
                answers.update(self.worker.run_batch([job]))
            except Exception as exc:  # noqa: BLE001 - this request's answer (a NaN of its own, its client gone)
                self._count_failure([job], exc)
                answers[job.id] = exc
        return answers

    def _count_failure(self, jobs: list[Job], exc: BaseException) -> None:  # in the worker thread
        if isinstance(exc, NonFiniteOutputError):  # whether or not its client still waits
            self.metrics.nonfinite.inc()

    def _count_batch(self, jobs: list[Job]) -> None:  # in the worker thread
        self.metrics.batch_size.observe(sum(job.size for job in jobs))
