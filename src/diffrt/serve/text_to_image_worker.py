"""The worker for latent text-to-image models (issue 7): prompt, negative prompt, ControlNet.

Same contract as PixelWorker (worker.py): `load` and `run_batch` run only in the batcher's
worker thread, `plan` runs in the caller's thread and only reads the model's description.

Batching (batching.py, the mechanism PixelWorker uses): requests share a batch when they differ
only in prompt, negative prompt, seed, num_images and control image, that is when size, steps,
sampler (`scheduler`: DDIM, LCM, DPM-Solver++, Euler or Euler Ancestral), guidance scale and eta are equal and, for ControlNet requests,
the control images' size and the conditioning scales are equal too (a request without a control
image never shares with one that has one). A shared batch gives each ControlNet one control image row per image, each
request's image repeated for its num_images. With eta > 0 (or LCM or Euler Ancestral, which draw fresh
noise between their steps) each request brings its generator, and the sampler draws each request's rows of
the per-step noise from it as the request draws them alone (batching.generator_blocks).

A request with colour guidance runs alone. Its gradient is taken through the PyTorch VAE decoder
(engines have no autograd), which the start-up probe does not run, and which is not
batch-invariant: on the tiny test model over ONNX Runtime on the CPU, a colour request batched
with another differs from it alone by ~1e-6 (oneDNN, like cuDNN, picks convolution kernels by
batch size), while the same requests without colour agree bit for bit. A probe of that path would
only turn colour batching off again on such backends.

`plan` draws a request's x_T from its own seed with the shape `diffrt generate` draws
([num_images, C, H/8, W/8], CPU generator). A request alone makes the very call `diffrt generate`
makes (one prompt, num_images_per_prompt=num_images) with that noise; a shared batch gives the
pipeline one prompt row per image (num_images_per_prompt=1), so requests with different
num_images mix, and each request takes back its images and its truncated-prompt metadata from
the rows it brought (RELIABILITY #13, #18). Batches form only when the start-up probe finds the
backend batch-invariant, or when `exact_batching=False` accepts a last-bit difference.

LoRA: `lora_scale` multiplies the scales the model opened with (`--lora FILE:SCALE`, or the
artifact's). Requests share a batch only at equal `lora_scale`, and the worker sets it before each
batch (runtime/lora_scale.py: a re-fuse in PyTorch, an in-memory refit of TensorRT engines built
from base weights); an ONNX graph with its LoRA baked in takes 1.0 only, and other values are
refused with a 422 when the request arrives.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from diffrt.errors import DiffrtError, ShapeOutOfRangeError
from diffrt.images import WEB_FORMATS, decode_image
from diffrt.runtime.backends.timed import time_components
from diffrt.runtime.guidance import color_guidance
from diffrt.runtime.text_to_image import DEFAULT_GUIDANCE_SCALE, default_guidance_scale
from diffrt.runtime.text_to_image_inputs import DEFAULT_STRENGTH, check_strength, control_windows, image_side
from diffrt.serve.batcher import Job
from diffrt.serve.batching import (Answer, BatchingWorker, abandon_when_nobody_waits, draw_noise, generator_blocks, images_per_batch,
                                   probe_generators, settings_key, split_answers)
from diffrt.serve.schema import MAX_SIDE, GenerateBody, RequestError
from diffrt.serve.worker import component_ms, encode_finite, lora_scale, request_schedule, self_test_passed, switch_lora_scale

log = logging.getLogger(__name__)

MAX_CONTROL_PIXELS = MAX_SIDE * MAX_SIDE  # the schema's largest height x width


@dataclass
class TextToImagePlan:
    """One request, checked: its prompts, its own initial noise and the settings a batch shares."""

    seed: int
    num_images: int
    prompt: str
    negative_prompt: str | None
    latents: torch.Tensor | None  # [num_images, C, H/8, W/8], from this request's seed only; None for image-to-image
    generator: torch.Generator | None  # eta > 0, LCM or Euler Ancestral only: the seed's generator, past the x_T draw
    settings: dict = field(default_factory=dict)  # height, width, num_inference_steps, scheduler, guidance_scale, eta, ...
    control: list[torch.Tensor] | None = None  # one [3, H, W] image per ControlNet
    control_scale: float | list[float] = 1.0
    guidance: list = field(default_factory=list)
    lora_scale: float = 1.0  # times the LoRA scales the model opened with; a batch runs at one
    init: torch.Tensor | None = None  # image-to-image: the [3, H, W] image to start from
    strength: float = 0.8

    def batch_key(self):
        """Requests with equal keys may share a batch; None runs alone (see the module docstring)."""
        if self.guidance or self.init is not None:
            # Colour guidance goes through the PyTorch VAE, which is not batch-invariant; image-to-image
            # draws its VAE posterior and noise from the seed inside the pipeline, as `diffrt generate --image`.
            return None
        if self.control is None:
            return settings_key(self.settings), self.lora_scale, None
        scales = tuple(self.control_scale) if isinstance(self.control_scale, list) else (self.control_scale,)
        return settings_key(self.settings), self.lora_scale, (tuple(self.control[0].shape), scales)


class TextToImageWorker(BatchingWorker):
    """Serves a text-to-image pipeline (a diffusers folder, optionally with a ControlNet, or an artifact)."""

    def __init__(self, model: str, backend: str, device: str, *, controlnet: str | list[str] | None = None, warmup_steps: int = 2,
                 max_image_bytes: int = 8 << 20, max_batch_size: int = 8, exact_batching: bool = True,
                 strict: bool = False, cuda_graph: bool = True, loras: list[tuple[str, float]] = ()):
        self.model = model
        self.loras = list(loras)
        self.strict = strict
        self.cuda_graph = cuda_graph
        self.controlnet = controlnet
        self.backend_asked = backend
        self.device = device
        self.warmup_steps = warmup_steps
        self.max_image_bytes = max_image_bytes
        self.max_batch_size = max_batch_size
        self.exact_batching = exact_batching
        self.pipe = None
        self.timed = {}
        self.warmup_seconds: float | None = None
        self.batch_max_abs_diff: float | None = None  # |batched - alone| measured at start-up; 0.0: bitwise equal
        self.color_unavailable: str | None = None  # why colour guidance cannot run here, when it cannot
        self.img2img_unavailable: str | None = None  # and image-to-image (no encoder: none exported, no source VAE, strict)

    # -- the worker thread ------------------------------------------------------------------

    def load(self) -> None:
        """Open the pipeline, run one warm-up and the NaN self-test; raises if any of it fails."""
        from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

        t0 = time.perf_counter()
        self.pipe = open_text_to_image_pipeline(self.model, self.backend_asked, self.device, loras=self.loras,
                                                controlnet=self.controlnet, strict=self.strict, cuda_graph=self.cuda_graph)
        log.info("opened %s%s on %s in %.1f s", self.model, f" with {self.pipe.num_controlnets} ControlNet(s)" if self.pipe.has_controlnet else "",
                 self.pipe.backend, time.perf_counter() - t0)
        if self.pipe.lora is not None:
            self.pipe.lora.prepare()  # what a first lora_scale change reads, read here rather than in a request
        # Colour guidance takes its gradient through the PyTorch VAE; an artifact loads it from its
        # source model, which a deployment may not carry: find out now, not in a request (a 500).
        try:
            self.pipe.torch_module("vae", "colour guidance")
            self.color_unavailable = None
        except DiffrtError as exc:
            self.color_unavailable = str(exc)
            log.warning("colour guidance is off for this service: %s", exc)
        self.warmup_seconds = self.self_test()
        pipe = self.pipe  # a shared batch feeds the text encoder one prompt per image; guidance doubles both
        self.settle_batching(pipe.backend, images_per_batch([(pipe.text_encoder.spec, 2), (pipe.unet.spec, 2), (pipe.vae_decoder.spec, 1)]))
        # img2img's encoder: the artifact's (--vae-encoder) or eager PyTorch's, else the PyTorch fallback made
        # now rather than in a first request, so that it is described and timed like the others.
        try:
            pipe.image_encoder()
        except Exception as exc:  # noqa: BLE001 - no source VAE, strict, out of memory: img2img off, not the service
            self.img2img_unavailable = str(exc) if isinstance(exc, DiffrtError) else f"{type(exc).__name__}: {exc}"
            log.warning("image-to-image is off for this service: %s", self.img2img_unavailable)
        # Timed in place from now on: the warm-up and probe are not requests.
        encoder = ("vae_encoder",) if pipe.vae_encoder is not None else ()
        self.timed = time_components(pipe, ("text_encoder", "unet", "vae_decoder", *encoder), recording=True)

    def self_test(self) -> float:
        """Warm-up and NaN self-test: a guided generation at the model's default size, which must be finite."""
        t0 = time.perf_counter()
        result = self.pipe("a self-test", num_inference_steps=self.warmup_steps, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                           seed=0, output_type="pt")
        return self_test_passed(result, t0)

    def probe_batch(self, n: int):
        """n requests with their own prompts and noise, at the default size, for the start-up probe (batching.py)."""
        pipe, size = self.pipe, self.pipe.default_size
        prompts = [f"a batching probe, request {i}" for i in range(n)]
        latents, _ = draw_noise(0, (n, pipe.latent_channels, size // pipe.vae_factor, size // pipe.vae_factor), keep_generator=False)
        step_noise = pipe.sampling_schedule(self.warmup_steps).draws_step_noise(0.0)  # LCM: each request's own draws

        def run(rows):
            return pipe([prompts[i] for i in rows], latents=latents[rows], num_inference_steps=self.warmup_steps,
                        guidance_scale=DEFAULT_GUIDANCE_SCALE, generator=probe_generators(rows, step_noise), output_type="pt").images

        return run

    def run_batch(self, jobs: list[Job]) -> dict[str, Answer]:
        plans: list[TextToImagePlan] = [job.payload for job in jobs]
        first = plans[0]
        if len(plans) == 1:  # the call `diffrt generate` makes, with the noise it draws
            prompt, negative, per_prompt = first.prompt, first.negative_prompt, first.num_images
        else:  # one prompt row per image, so requests with different num_images share the batch
            prompt = [p.prompt for p in plans for _ in range(p.num_images)]
            negative = [p.negative_prompt or "" for p in plans for _ in range(p.num_images)]  # None is encoded as ""
            per_prompt = 1
        control = first.control
        if control is not None and len(plans) > 1:  # per ControlNet, one image row per prompt row, in the batch's order
            control = [torch.stack([p.control[k] for p in plans for _ in range(p.num_images)]) for k in range(len(control))]
        if first.init is not None:  # alone (batch_key): the seed draws as it does in `diffrt generate --image`
            noise = dict(image=first.init.unsqueeze(0), strength=first.strength, seed=first.seed)
        else:
            noise = dict(latents=torch.cat([p.latents for p in plans]), generator=generator_blocks(plans))
        started = time.monotonic()
        lora = switch_lora_scale(self.pipe, first.lora_scale)
        t0 = time.perf_counter()
        try:
            result = self.pipe(prompt, negative_prompt=negative, num_images_per_prompt=per_prompt, **noise,
                               **first.settings, control_image=control,
                               controlnet_conditioning_scale=first.control_scale if control is not None else None,
                               guidance=first.guidance, output_type="pt", progress=abandon_when_nobody_waits(jobs))
        finally:  # taken even from a batch abandoned midway, so its calls are not counted in the next one's
            components = component_ms(self.timed)
        sample_ms = 1000 * (time.perf_counter() - t0)
        images, encode_ms = encode_finite(result, jobs)
        meta = result.metadata

        def truncated(row: int) -> dict:
            # Alone, the request's one prompt is row 0; in a shared batch each image has its prompt row,
            # so the request whose images start at `row` finds its prompt there.
            return {key: None if meta.get(key) is None else meta[key][row : row + 1] for key in ("truncated", "truncated_negative")}

        timings = {**lora, "sample": sample_ms, **components, "encode": encode_ms}
        return split_answers(jobs, images, result.backend, started, timings, truncated)

    # -- any thread (reads the model's description only) ---------------------------------

    @property
    def default_side(self) -> int:
        return self.pipe.default_size

    def describe(self) -> dict:
        return {"kind": "text-to-image", "controlnet": self.pipe.has_controlnet, "controlnets": self.pipe.num_controlnets, "backend": self.pipe.backend,
                "conditioning": "text", "sample_size": self.pipe.default_size,
                "scheduler": self.pipe.scheduler.name, "batches_requests": self.batches_requests,
                "batch_max_abs_diff": self.batch_max_abs_diff, "color_guidance": self.color_unavailable is None,
                "image_to_image": self.img2img_unavailable is None,
                "guidance_embedded": self.pipe.guidance_embed_dim is not None,  # LCM's default guidance is not 1.0 then
                **self.pipe.runtime_metadata()}

    def plan(self, body: GenerateBody) -> TextToImagePlan:
        """Check the request against this model and draw its noise; RequestError names the field at fault."""
        pipe = self.pipe
        if body.class_label is not None:
            raise RequestError(422, "class_label: the loaded model is a text-to-image model; send prompt instead", "class_label")
        if body.prompt is None:
            raise RequestError(422, "prompt: required; the loaded model is a text-to-image model", "prompt")
        if body.color is not None and self.color_unavailable is not None:
            raise RequestError(422, f"color: colour guidance is unavailable on this service ({self.color_unavailable})", "color")
        control_fields = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "guess_mode")
        for name in ("control_image", *control_fields):
            if getattr(body, name) is not None and not pipe.has_controlnet:
                raise RequestError(422, f"{name}: the loaded model has no ControlNet; serve one with `--controlnet DIR` "
                                   "or an artifact exported with it", name)
        for name in control_fields:
            if getattr(body, name) is not None and body.control_image is None:
                raise RequestError(422, f"{name}: needs control_image", name)
        try:
            pipe.check_clip_skip(body.clip_skip)  # before the request queues
        except DiffrtError as exc:
            raise RequestError(422, f"clip_skip: {exc}", "clip_skip") from None
        try:
            pipe.guess_mode_for(bool(body.guess_mode), body.control_image is not None)  # an older artifact's graph refuses it
        except DiffrtError as exc:
            raise RequestError(422, f"guess_mode: {exc}", "guess_mode") from None
        windows = {}
        if body.control_guidance_start is not None or body.control_guidance_end is not None:
            start = 0.0 if body.control_guidance_start is None else body.control_guidance_start
            end = 1.0 if body.control_guidance_end is None else body.control_guidance_end
            try:
                control_windows(start, end, pipe.num_controlnets)  # the pipeline's own rule, before the request queues
            except DiffrtError as exc:
                # The field at fault: a list of the wrong length, else the one the message names, else the start.
                k, message = pipe.num_controlnets, str(exc)
                wrong_length = [name for name, value in (("control_guidance_end", end), ("control_guidance_start", start))
                                if isinstance(value, list) and len(value) != k]
                field_ = (wrong_length[0] if wrong_length else "control_guidance_end" if message.startswith("control_guidance_end")
                          or body.control_guidance_start is None else "control_guidance_start")
                raise RequestError(422, f"{field_}: {exc}", field_) from None
            # In the settings a batch shares (hashable): requests with other windows never share one.
            windows = {"control_guidance_start": tuple(start) if isinstance(start, list) else start,
                       "control_guidance_end": tuple(end) if isinstance(end, list) else end}
        if body.image is not None and self.img2img_unavailable is not None:
            raise RequestError(422, f"image: image-to-image is unavailable on this service ({self.img2img_unavailable})", "image")
        if body.strength is not None and body.image is None:
            raise RequestError(422, "strength: needs image, the image to start from (image-to-image)", "strength")
        control = self._decode_control_images(body) if body.control_image is not None else None
        init = self._decode_image(body.image, "image", body) if body.image is not None else None
        if control is not None and init is not None and control[0].shape != init.shape:
            raise RequestError(422, f"image: it is {init.shape[-2]}x{init.shape[-1]} pixels but control_image "
                               f"{control[0].shape[-2]}x{control[0].shape[-1]}; send images of one size, or give height and "
                               "width to resize both", "image")
        # diffusers' defaults: 0.8 in its ControlNet img2img pipeline, 1.0 in the ControlNet pipeline
        scale = body.controlnet_conditioning_scale
        if scale is None:
            scale = 0.8 if init is not None else 1.0
        if isinstance(scale, list) and len(scale) != pipe.num_controlnets:
            raise RequestError(422, f"controlnet_conditioning_scale: {len(scale)} values for {pipe.num_controlnets} ControlNet(s); "
                               "send one number, or one per ControlNet", "controlnet_conditioning_scale")
        sized = control[0] if control is not None else init
        # The size an image brings, as `diffrt generate` takes it: rounded down to the VAE's multiple.
        height = image_side(body.height, sized.shape[-2], pipe.vae_factor) if sized is not None else body.height or pipe.default_size
        width = image_side(body.width, sized.shape[-1], pipe.vae_factor) if sized is not None else body.width or pipe.default_size
        if control is not None and len({tuple(c.shape[-2:]) for c in control}) > 1:
            raise RequestError(422, "control_image: the images differ in size; send images of one size, or give height and "
                               "width to resize them all", "control_image")
        strength = DEFAULT_STRENGTH if body.strength is None else body.strength
        if init is not None:
            try:
                check_strength(strength, body.num_inference_steps)  # the pipeline's own rule, before the request queues
            except DiffrtError as exc:
                raise RequestError(422, f"strength: {exc}", "strength") from None
        # the chosen sampler's rules, before it queues (of the steps image-to-image runs)
        schedule = request_schedule(pipe, body, strength if init is not None else None, control=control is not None)
        guidance_scale = default_guidance_scale(pipe, schedule) if body.guidance_scale is None else body.guidance_scale
        try:
            pipe.check_size(height, width)
        except DiffrtError as exc:
            message = str(exc)
            name = "width" if message.startswith("width") else "height"
            if getattr(body, name) is None and sized is not None:
                name = "control_image" if control is not None else "image"  # the size came from that image
            raise RequestError(422, f"{name}: {message}", name, profile=isinstance(exc, ShapeOutOfRangeError)) from None
        try:
            pipe.check_batch(1, body.num_images, pipe.uses_cfg(guidance_scale))  # never for an LCM-distilled UNet
        except DiffrtError as exc:
            raise RequestError(422, f"num_images: {exc}", "num_images", profile=isinstance(exc, ShapeOutOfRangeError)) from None
        apart = pipe.guess_mode_for(bool(body.guess_mode), control is not None) or not pipe.uses_cfg(guidance_scale)
        try:  # a tiny test UNet's sizes that one image alone cannot run (it may share no batch)
            pipe.check_deepest(height, width, body.num_images * (1 if apart else 2))
        except DiffrtError as exc:
            raise RequestError(422, f"height: {exc}", "height") from None
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        f = pipe.vae_factor
        latents, generator = None, None
        if init is None:
            latents, generator = draw_noise(seed, (body.num_images, pipe.latent_channels, height // f, width // f),
                                            keep_generator=schedule.draws_step_noise(body.eta))
        # The resolved size: with an image, its own rounded down to the VAE's multiple (the pipeline resizes to it).
        settings = {"height": height, "width": width, "num_inference_steps": body.num_inference_steps,
                    "scheduler": schedule.name, "guidance_scale": guidance_scale, "eta": body.eta,
                    "guidance_rescale": body.guidance_rescale or 0.0, "clip_skip": body.clip_skip or 0,
                    "guess_mode": bool(body.guess_mode), **windows}
        return TextToImagePlan(seed, body.num_images, body.prompt, body.negative_prompt, latents, generator, settings, control, scale,
                               [color_guidance(body.color, body.color_scale)] if body.color else [], lora_scale(pipe, body),
                               init, strength)

    def _decode_control_images(self, body: GenerateBody) -> list[torch.Tensor]:
        """One [3, H, W] image in [0, 1] per ControlNet, in their order (a single string: one ControlNet)."""
        texts = body.control_image if isinstance(body.control_image, list) else [body.control_image]
        k = self.pipe.num_controlnets
        if len(texts) != k:
            raise RequestError(422, f"control_image: {len(texts)} image(s) for {k} ControlNet(s); send one base64 PNG per "
                               "ControlNet, in their order", "control_image")
        return [self._decode_image(text, "control_image", body) for text in texts]

    def _decode_image(self, text: str, field: str, body: GenerateBody) -> torch.Tensor:
        """base64 PNG -> [3, H, W] in [0, 1], resized as `diffrt generate --control-image` / `--image` resize their files."""
        if len(text) * 3 // 4 > self.max_image_bytes:
            size = len(text) * 3 / 4 / 2**20
            raise RequestError(413, f"{field}: the image is {size:.1f} MiB; the limit is {self.max_image_bytes / 2**20:.1f} MiB", field)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{field}: not valid base64; send the PNG file's bytes base64-encoded", field) from None
        try:  # resized as `diffrt generate` resizes files, and diffusers PIL images (images.decode_image)
            return decode_image(data, (body.height, body.width), max_pixels=MAX_CONTROL_PIXELS, multiple=self.pipe.vae_factor,
                                max_side=self.max_image_side or None, formats=WEB_FORMATS)
        except DiffrtError as exc:
            raise RequestError(422, f"{field}: {exc}", field) from None
