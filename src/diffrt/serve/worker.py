"""Everything the service does with the pipeline: open it, warm it up, plan a request, run a batch.

`load` and `run_batch` run only in the batcher's worker thread (the pipeline's one owner);
`plan` runs in the caller's thread and only reads the model's description (classes, shapes).

Requests are batched by the mechanism in batching.py, which TextToImageWorker shares: each
request's own noise from its own seed, a start-up probe that the backend is batch-invariant,
answers split back by request id. Pixel requests may share a batch when their settings (steps,
sampler, guidance scale, eta, size, colour scale) are equal: with eta > 0 (or LCM, or Euler Ancestral) each brings its
generator for its own block of rows of the per-step noise, and with colour guidance each its own
target colour, one per image row. `color_guidance` sums its loss over the images, so a row's gradient is the one
it gets alone; requests with and without colour never share a batch, since the guided and the
unguided steps take different code paths that round differently. Requests share a batch only at
equal `lora_scale`, which the worker sets on the pipeline before the batch (`lora_scale` below).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from diffrt.errors import DiffrtError, NonFiniteOutputError, ShapeOutOfRangeError
from diffrt.generate import DEFAULT_PIXEL_GUIDANCE_SCALE
from diffrt.images import array_png_bytes, to_uint8
from diffrt.models import check_one_value_groups
from diffrt.runtime.backends.timed import TimedBackend, time_components
from diffrt.runtime.guidance import color_guidance, parse_hex_color
from diffrt.serve.batcher import Job
from diffrt.serve.batching import (Answer, BatchingWorker, abandon_when_nobody_waits, draw_noise, generator_blocks, images_per_batch,
                                   probe_generators, settings_key, split_answers)
from diffrt.serve.schema import GenerateBody, RequestError

log = logging.getLogger(__name__)

UNSUPPORTED_ON_PIXEL = {  # field -> the kind of model that takes it
    "prompt": "a text-to-image model",
    "negative_prompt": "a text-to-image model",
    "image": "a text-to-image model",
    "guidance_rescale": "a text-to-image model",
    "strength": "a text-to-image model",
    "control_image": "a ControlNet model",
    "controlnet_conditioning_scale": "a ControlNet model",
    "control_guidance_start": "a ControlNet model",
    "control_guidance_end": "a ControlNet model",
    "guess_mode": "a ControlNet model",
    "clip_skip": "a text-to-image model",
}


@dataclass
class Plan:
    """One request, ready to batch: its labels, its own noise and colour, and the settings a batch shares."""

    seed: int
    num_images: int
    labels: torch.Tensor | None  # [num_images] int64, None for unconditional models
    latents: torch.Tensor  # [num_images, C, H, W], from this request's seed only
    generator: torch.Generator | None  # eta > 0, LCM or Euler Ancestral only: the seed's generator, past the x_T draw
    settings: dict = field(default_factory=dict)  # num_inference_steps, scheduler, guidance_scale, eta, height, width, color_scale
    color: str | None = None  # this request's colour-guidance target (#RRGGBB); color_scale, in settings, is shared
    lora_scale: float = 1.0  # times the LoRA scales the model opened with; a batch runs at one

    def batch_key(self):
        """Requests with equal keys may share a batch (color_scale None: no colour guidance)."""
        return settings_key(self.settings), self.lora_scale


def row_colors(plans: list[Plan]) -> torch.Tensor:
    """[images, 3]: each request's colour-guidance target, once per image it brought, in the batch's order."""
    return torch.tensor([parse_hex_color(plan.color) for plan in plans for _ in range(plan.num_images)])


def lora_scale(pipe, body: GenerateBody) -> float:
    """The request's `lora_scale` (1.0 when left out: the LoRA as the model opened), checked against
    what the pipeline's weights allow (runtime/lora_scale.py)."""
    scale = 1.0 if body.lora_scale is None else body.lora_scale
    try:
        pipe.check_lora_scale(scale)
    except DiffrtError as exc:
        raise RequestError(422, f"lora_scale: {exc}", "lora_scale") from None
    return scale


def request_schedule(pipe, body: GenerateBody, strength: float | None = None, **call):
    """The schedule the request's sampler (`scheduler`, else the model's own) runs, refused before it queues
    with a 422 naming the field at fault: `scheduler` when the model's config has no such sampler (DDIM
    cannot take an LCM config's dynamic thresholding), `eta` (only DDIM takes one) or `num_inference_steps`
    (LCM: at most original_inference_steps). `call`: what else the pipeline's call decides it by."""
    with refused_as("scheduler"):
        config = pipe.sampler_config(body.scheduler, **call)
    with refused_as("eta"):
        config.check_eta(body.eta)
    with refused_as("num_inference_steps"):
        return pipe.sampling_schedule(body.num_inference_steps, scheduler=body.scheduler, eta=body.eta, strength=strength, **call)


@contextlib.contextmanager
def refused_as(name: str):
    """A DiffrtError raised inside becomes the request's 422 naming the field `name`."""
    try:
        yield
    except DiffrtError as exc:
        raise RequestError(422, f"{name}: {exc}", name) from None


def switch_lora_scale(pipe, scale: float) -> dict[str, float]:
    """Set the batch's lora_scale on the pipeline (a re-fuse or a refit, only when it differs from the
    last batch's); {"lora_scale": ms} when it changed, a stage of its own in the timings and metrics."""
    if scale == pipe.lora_scale:
        return {}
    t0 = time.perf_counter()
    pipe.set_lora_scale(scale)
    return {"lora_scale": 1000 * (time.perf_counter() - t0)}


def component_ms(timed: dict[str, TimedBackend]) -> dict[str, float]:
    """Milliseconds each component spent since the last call (reads CUDA events: one synchronisation):
    every batch reports the time it spent in each (text encoder, UNet x N steps, VAE), latency per
    stage as RELIABILITY's serving conventions ask."""
    return {name: 1000 * proxy.take_s() for name, proxy in timed.items()}


def self_test_passed(result, t0: float) -> float:
    """The warm-up's images must all be finite (the readiness NaN self-test); returns its seconds."""
    if not torch.isfinite(result.images).all():
        raise NonFiniteOutputError(f"self-test: the {result.backend} pipeline produced non-finite images; not serving it")
    seconds = time.perf_counter() - t0
    log.info("warm-up and NaN self-test passed on %s in %.2f s", result.backend, seconds)
    return seconds


def encode_finite(result, jobs: list[Job]) -> tuple[list, float]:
    """A batch's images, each as its job asked (`Job.encoding`: PNG bytes for HTTP, a uint8 [H, W, C]
    array for Triton's tensors), and the milliseconds that took; non-finite images are refused, never sent."""
    if not torch.isfinite(result.images).all():
        raise NonFiniteOutputError(f"the {result.backend} pipeline produced non-finite images")
    t0 = time.perf_counter()
    arrays, encoded, row = to_uint8(result.images), [], 0
    for job in jobs:
        rows = arrays[row : row + job.payload.num_images]
        encoded += [array_png_bytes(a) for a in rows] if job.encoding == "png" else list(rows)
        row += len(rows)
    return encoded, 1000 * (time.perf_counter() - t0)


class PixelWorker(BatchingWorker):
    """Serves a pixel-space pipeline (unconditional or class-conditioned)."""

    def __init__(self, model: str | None, backend: str, device: str, *, warmup_steps: int = 2, max_batch_size: int = 8,
                 exact_batching: bool = True, strict: bool = False, cuda_graph: bool = True, loras: list[tuple[str, float]] = ()):
        self.model = model
        self.loras = list(loras)
        self.backend_asked = backend
        self.device = device
        self.strict = strict
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.max_batch_size = max_batch_size
        self.exact_batching = exact_batching
        self.pipe = None
        self.timed: dict[str, TimedBackend] = {}
        self.warmup_seconds: float | None = None
        self.batch_max_abs_diff: float | None = None  # |batched - alone| measured at start-up; 0.0: bitwise equal

    # -- the worker thread ------------------------------------------------------------------

    def load(self) -> None:
        """Open the pipeline, run one warm-up and the NaN self-test; raises if any of it fails."""
        from diffrt.runtime.opening import is_text_to_image
        from diffrt.runtime.loading import open_pixel_pipeline

        if is_text_to_image(self.model):
            raise DiffrtError(f"{self.model} is a text-to-image model; serve it with TextToImageWorker (serve.runtime.make_worker picks it)")
        t0 = time.perf_counter()
        pipe = open_pixel_pipeline(self.model, self.backend_asked, self.device, loras=self.loras, strict=self.strict,
                                   cuda_graph=self.cuda_graph)
        log.info("opened %s on %s in %.1f s", self.model or "the shipped digits model", pipe.backend, time.perf_counter() - t0)
        if pipe.lora is not None:
            pipe.lora.prepare()  # what a first lora_scale change reads, read here rather than in a request
        self.pipe = pipe
        self.warmup_seconds = self.self_test()
        self.settle_batching(pipe.backend, images_per_batch([(pipe.unet.spec, 2 if self.conditioned else 1)]))  # CFG doubles it
        self.timed = time_components(pipe, ("unet",), recording=True)  # from now on: the warm-up and probe are not requests

    def self_test(self) -> float:
        """Warm-up and NaN self-test in one: a classifier-free-guided generation at the model's own
        size, whose noise predictions (checked by the pipeline) and images must all be finite."""
        t0 = time.perf_counter()
        labels = torch.tensor([0]) if self.conditioned else None
        result = self.pipe(labels, num_images=None if labels is not None else 1, num_inference_steps=self.warmup_steps,
                           guidance_scale=DEFAULT_PIXEL_GUIDANCE_SCALE, seed=0, output_type="pt")
        return self_test_passed(result, t0)

    def probe_batch(self, n: int):
        """n requests with their own labels and noise, for the start-up probe (batching.py). ONNX
        Runtime on CPU measures 0.0 on the digits models; eager PyTorch on CPU (oneDNN) measures
        ~1e-5, which flips a few PNG pixels by one level, and cuDNN/TensorRT also choose kernels by
        batch size (RELIABILITY #18)."""
        size = self.pipe.sample_size
        labels = torch.arange(n) % self.pipe.info.num_classes if self.conditioned else None
        latents, _ = draw_noise(0, (n, self.pipe.channels, size, size), keep_generator=False)
        step_noise = self.pipe.sampling_schedule(self.warmup_steps).draws_step_noise(0.0)  # LCM: each request's own draws

        def run(rows):
            return self.pipe(labels[rows] if labels is not None else None, num_images=None if labels is not None else len(rows),
                             latents=latents[rows], num_inference_steps=self.warmup_steps, guidance_scale=DEFAULT_PIXEL_GUIDANCE_SCALE,
                             generator=probe_generators(rows, step_noise), output_type="pt").images

        return run

    def run_batch(self, jobs: list[Job]) -> dict[str, Answer]:
        plans: list[Plan] = [job.payload for job in jobs]
        first = plans[0]
        s = first.settings
        guidance = [color_guidance(row_colors(plans), s["color_scale"])] if s["color_scale"] is not None else []
        labels = torch.cat([p.labels for p in plans]) if first.labels is not None else None
        latents = torch.cat([p.latents for p in plans])
        n = latents.shape[0]
        started = time.monotonic()
        lora = switch_lora_scale(self.pipe, first.lora_scale)
        t0 = time.perf_counter()
        try:
            result = self.pipe(labels, num_images=None if labels is not None else n, latents=latents,
                               generator=generator_blocks(plans),
                               num_inference_steps=s["num_inference_steps"], scheduler=s["scheduler"],
                               guidance_scale=s["guidance_scale"], eta=s["eta"],
                               guidance=guidance, height=s["height"], width=s["width"], output_type="pt",
                               progress=abandon_when_nobody_waits(jobs))
        finally:  # taken even from a batch abandoned midway, so its calls are not counted in the next one's
            components = component_ms(self.timed)
        sample_ms = 1000 * (time.perf_counter() - t0)
        images, encode_ms = encode_finite(result, jobs)
        timings = {**lora, "sample": sample_ms, **components, "encode": encode_ms}
        return split_answers(jobs, images, result.backend, started, timings)

    # -- any thread (reads the model's description only) ---------------------------------

    @property
    def conditioned(self) -> bool:
        return self.pipe.info.conditioning != "none"

    @property
    def default_side(self) -> int:
        return self.pipe.sample_size

    def describe(self) -> dict:
        info = self.pipe.info
        return {"kind": "pixel", "controlnet": False, "backend": self.pipe.backend, "conditioning": info.conditioning,
                "num_classes": info.num_classes, "class_names": info.class_names, "sample_size": self.pipe.sample_size,
                "channels": self.pipe.channels, "scheduler": self.pipe.scheduler.name,
                "batches_requests": self.batches_requests,
                "batch_max_abs_diff": self.batch_max_abs_diff, **self.pipe.runtime_metadata()}

    def plan(self, body: GenerateBody) -> Plan:
        """Check the request against this model and draw its noise; RequestError names the field at fault."""
        self._check_fields(body)
        pipe, info = self.pipe, self.pipe.info
        labels = None
        if self.conditioned:
            if body.class_label is None:
                raise RequestError(422, f"class_label: required; this model is class-conditioned with classes 0..{info.num_classes - 1}", "class_label")
            if body.class_label >= info.num_classes:
                raise RequestError(422, f"class_label: {body.class_label} is out of range; this model has classes 0..{info.num_classes - 1}", "class_label")
            labels = torch.full((body.num_images,), body.class_label, dtype=torch.int64)
        elif body.class_label is not None:
            raise RequestError(422, "class_label: this model is unconditional; leave class_label out", "class_label")
        elif body.guidance_scale not in (None, 1.0):  # nothing would read it, as `diffrt generate` refuses it
            raise RequestError(422, f"guidance_scale: {body.guidance_scale:g} is classifier-free guidance's, which steers by "
                               "a class label; this model is unconditional: leave guidance_scale out", "guidance_scale")
        guidance_scale = DEFAULT_PIXEL_GUIDANCE_SCALE if body.guidance_scale is None else body.guidance_scale
        height, width = body.height or pipe.sample_size, body.width or pipe.sample_size
        spec = pipe.unet.spec
        cfg = labels is not None and guidance_scale > 1.0
        for name, value, dim in (("height", height, "height"), ("width", width, "width"),
                                 ("num_images", body.num_images * (2 if cfg else 1), "batch")):
            try:
                spec.check_size(dim, value, what=f"{name} {value}" if name != "num_images" else
                                f"batch {value} ({body.num_images} images{' x 2 for guidance' if cfg else ''})")
            except DiffrtError as exc:
                raise RequestError(422, f"{name}: {exc}", name, profile=isinstance(exc, ShapeOutOfRangeError)) from None
        try:  # a tiny test UNet's sizes that one image alone cannot run (it may share no batch)
            check_one_value_groups(pipe.one_value_side, height, width, body.num_images * (2 if cfg else 1))
        except DiffrtError as exc:
            raise RequestError(422, f"height: {exc}", "height") from None
        schedule = request_schedule(pipe, body)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        latents, generator = draw_noise(seed, (body.num_images, pipe.channels, height, width),
                                        keep_generator=schedule.draws_step_noise(body.eta))
        settings = {"num_inference_steps": body.num_inference_steps, "scheduler": schedule.name,
                    "guidance_scale": guidance_scale, "eta": body.eta,
                    "height": height, "width": width, "color_scale": body.color_scale if body.color else None}
        return Plan(seed, body.num_images, labels, latents, generator, settings, body.color, lora_scale(pipe, body))

    def _check_fields(self, body: GenerateBody) -> None:
        kind = "class-conditioned" if self.conditioned else "unconditional"
        for name, needs in UNSUPPORTED_ON_PIXEL.items():  # an image in a field unused here is a 422 at any size, not a 413
            if getattr(body, name) is not None:
                raise RequestError(422, f"{name}: the loaded model is a {kind} pixel-space model; {name} needs {needs}", name)
