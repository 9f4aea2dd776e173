"""Dynamic batching, one mechanism for both serve workers (PixelWorker, TextToImageWorker).

A batched request's answer is the answer it gets alone, through three pieces (RELIABILITY #18):

1. Its own noise. `draw_noise` draws a request's initial noise x_T from `torch.Generator("cpu")
   .manual_seed(seed)` with the shape `diffrt generate` draws for it alone; a batch passes the
   stacked noise to the pipeline as `latents`, so no request's image depends on another's seed.
   With eta > 0 the sampler also draws fresh noise every step. Alone, a request of n images draws
   it from its seed's generator (past its x_T draw) with shape [n, ...]; in a batch,
   `generator_blocks` hands the sampler one block of rows per request (sampling.GeneratorBlocks),
   each block drawn from that request's generator with that shape, so requests with equal eta
   share a batch and each still gets its own noise, draw for draw.
   Per-request conditioning travels the same way, one row per image: text-to-image requests with
   control images of one size and equal conditioning scales share a batch, each image row taking
   its request's control image (text_to_image_worker.py), and pixel requests with colour guidance
   at equal scale share one, each image row pulled toward its request's colour (worker.py).
2. A batch-invariant backend. Same noise is not yet same pixels: a backend may pick other kernels
   for another batch size and round differently. At start-up `BatchingWorker.settle_batching`
   caps the batch to what every engine profile takes, then runs a full batch of distinct requests
   and two of them alone (`probe_batch_invariance`). Unless they agree bit for bit, requests run
   one at a time, unless the service was told a last-bit difference is acceptable
   (`exact_batching=False`). What the probe runs must cover what a batch runs: the eta noise and
   the pixel colour loss are per row and per element, with no model of their own, so they add
   nothing to cover; text-to-image colour guidance backpropagates through the PyTorch VAE, which
   the probe does not run, so those requests stay alone (text_to_image_worker.py).
3. Its own answer. `split_answers` hands each job the rows it brought, matched by job id, never
   by position in the reply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from diffrt.runtime.sampling import GeneratorBlocks, randn
from diffrt.serve.batcher import Job
from diffrt.serve.schema import MAX_SIDE

log = logging.getLogger(__name__)


class BatchAbandoned(Exception):
    """Every request of the running batch is past its deadline; stop sampling for nobody."""


@dataclass
class Answer:
    """One request's images, encoded as its job asked, and how they were made."""

    request_id: str  # the job's (Job.request_id)
    seed: int
    images: list  # per image: PNG bytes, or a uint8 [H, W, C] array (Job.encoding)
    backend: str
    batch_size: int  # images in the batch this request ran in
    timings_ms: dict[str, float]
    truncated: dict | None = None  # text-to-image: prompt text the text encoder cut off (RELIABILITY #13)

    def cut_off(self, key: str) -> str | None:
        """The text the encoder cut off the prompt (`key` "truncated") or the negative prompt ("truncated_negative"),
        None where it fit (one prompt per request: its first entry)."""
        return ((self.truncated or {}).get(key) or [None])[0]


def draw_noise(seed: int, shape: tuple[int, ...], *, keep_generator: bool) -> tuple[torch.Tensor, torch.Generator | None]:
    """A request's x_T, as the pipeline draws it alone from `seed` (on the CPU generator, float32),
    and, if asked (eta > 0), the generator past that draw, from which the sampler draws the
    request's per-step noise (its block of `generator_blocks`)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn(shape, generator, torch.device("cpu"), torch.float32)
    return latents, generator if keep_generator else None


def generator_blocks(plans) -> GeneratorBlocks | None:
    """The batch's per-step noise (eta > 0): each plan's `num_images` rows from its own generator, in
    the batch's order, each block drawn with shape [num_images, ...] as the request draws it alone.
    None when the plans keep no generator (eta 0); a batch shares eta, so all keep one or none."""
    if all(plan.generator is None for plan in plans):
        return None
    return GeneratorBlocks(tuple((plan.generator, plan.num_images) for plan in plans))


def probe_generators(rows: list[int], step_noise: bool) -> GeneratorBlocks | None:
    """The start-up probe's per-step noise: one generator per probe request (row), seeded by its row,
    as each request brings its own; None for a sampler that draws none (DDIM at eta 0)."""
    return GeneratorBlocks(tuple((torch.Generator().manual_seed(1 + i), 1) for i in rows)) if step_noise else None


def settings_key(settings: dict):
    """Requests whose settings are all equal may share a batch."""
    return tuple(sorted(settings.items()))


def images_per_batch(components: Iterable[tuple[object, int]]) -> int:
    """How many images one batch may hold so that each component's batch fits its engine profile;
    a component fed `rows` rows per image (2 under classifier-free guidance) takes max // rows."""
    return min(spec.ranges.get("batch", (1, 1, 1 << 30))[2] // rows for spec, rows in components)


def probe_batch_invariance(run: Callable[[list[int]], torch.Tensor], n: int) -> float:
    """max |batched - alone| over the images of the first and last of n requests: `run(rows)`
    generates the probe's requests `rows` in one batch and returns their images."""
    batched = run(list(range(n)))
    return max((batched[i] - run([i])[0]).abs().max().item() for i in (0, n - 1))


def abandon_when_nobody_waits(jobs: list[Job]) -> Callable[[int], None]:
    """The pipeline's per-step progress hook: stop sampling once every job of the batch has expired."""

    def check(step: int) -> None:
        if all(job.expired for job in jobs):
            raise BatchAbandoned(f"every request of this batch timed out by step {step}")

    return check


def split_answers(jobs: list[Job], images: list, backend: str, started: float, timings: dict[str, float],
                  truncated: Callable[[int], dict | None] = lambda row: None) -> dict[str, Answer]:
    """Each job's own images (encoded, one per row), keyed by its id: the `payload.num_images` rows it
    brought, in the batch's order. `truncated(row)` is the prompt metadata of the job whose images start at `row`."""
    answers, row = {}, 0
    for job in jobs:
        plan = job.payload
        answers[job.id] = Answer(job.request_id, plan.seed, images[row : row + plan.num_images], backend, len(images),
                                 {"queue": 1000 * (started - job.enqueued), **timings}, truncated(row))
        row += plan.num_images
    return answers


class BatchingWorker:
    """The batching half of a worker. A subclass sets `max_batch_size` and `exact_batching`, gives
    its plans a `batch_key()` (None: alone), and implements `probe_batch(n)`."""

    max_batch_size: int
    exact_batching: bool
    batch_max_abs_diff: float | None = None  # |batched - alone| measured at start-up; 0.0: bitwise equal
    engine_max_batch: int | None = None  # the images one batch of the engines takes, CFG included (settle_batching)
    max_image_side: int = 0  # the largest height or width a request may ask for (0: unchecked); set by the runtime
    default_side: int  # the model's own height and width, in pixels

    def largest_side(self) -> int:
        """The largest side a request may ask for unless the operator says: twice the model's own on eager PyTorch,
        which runs any size at a cost growing faster than its pixels (one 512 x 512 step of the 16-pixel digits
        model took 112 s, past every deadline, the worker deaf the while), else the schema's MAX_SIDE (an engine's
        built ranges refuse what it cannot run)."""
        return 2 * self.default_side if self.pipe.unet.spec.eager else MAX_SIDE

    def probe_batch(self, n: int) -> Callable[[list[int]], torch.Tensor]:
        """`run(rows)` over n distinct probe requests (own prompts or labels, own noise), at the warm-up's steps."""
        raise NotImplementedError

    def settle_batching(self, backend: str, fits: int) -> None:
        """Cap the batch to `fits` images (the engine profiles, CFG included), then measure how far a
        batched request is from the same request alone. Runs in the worker thread, after the self-test."""
        self.engine_max_batch = fits
        if self.max_batch_size > fits:
            log.warning("max batch size %d is more than the engines take with guidance; using %d", self.max_batch_size, fits)
            self.max_batch_size = max(1, fits)
        if self.max_batch_size > 1:
            self.batch_max_abs_diff = probe_batch_invariance(self.probe_batch(self.max_batch_size), self.max_batch_size)
            if self.batch_max_abs_diff > 0:
                log.warning("%s: a request batched with others differs from the same request alone by up to %.1e; %s",
                            backend, self.batch_max_abs_diff,
                            "running requests one at a time (`diffrt serve --allow-inexact-batching` batches them anyway)"
                            if self.exact_batching else "batching anyway (--allow-inexact-batching)")

    @property
    def batches_requests(self) -> bool:
        """Whether requests may share a batch: yes when the probe found no difference, or when told
        that a last-bit difference is acceptable."""
        return self.max_batch_size > 1 and (not self.exact_batching or self.batch_max_abs_diff == 0)

    def batch_key(self, plan):
        return plan.batch_key() if self.batches_requests else None
