"""The worker for latent text-to-image models (issue 7): prompt, negative prompt, ControlNet.

Same contract as PixelWorker (worker.py): `load` and `run_batch` run only in the batcher's
worker thread, `plan` runs in the caller's thread and only reads the model's description.

Each request runs alone (its batch key is None), with its own seed passed to the pipeline, so
its image equals `diffrt generate` with the same seed and settings. Batching prompts together
would need the pipeline's per-prompt draws split by request and a start-up probe that the
backend is batch-invariant (as PixelWorker.probe_batch_invariance); until then one request per
run is the exact choice whatever `exact_batching` says.

LoRA is fused when the pipeline opens (torch) or baked in at export (artifacts), so a
per-request `lora_scale` is refused: it cannot be honoured without re-fusing the weights.
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
from diffrt.images import decode_image
from diffrt.runtime.guidance import color_guidance
from diffrt.runtime.text_to_image import DEFAULT_GUIDANCE_SCALE
from diffrt.serve.batcher import Job
from diffrt.serve.schema import GenerateBody, RequestError
from diffrt.serve.worker import Answer, BatchAbandoned, component_ms, encode_finite, self_test_passed, time_components

log = logging.getLogger(__name__)

MAX_CONTROL_PIXELS = 4096 * 4096  # the schema's largest height x width
LORA_AT_OPEN = ("lora_scale: LoRA is fused when the model opens (or baked in at export), not applied per request; "
                "restart `diffrt serve` on a model exported with `diffrt export --lora FILE:SCALE`")


@dataclass
class TextToImagePlan:
    """One request, checked: the pipeline's keyword arguments, with the request's own seed."""

    seed: int
    num_images: int
    kwargs: dict = field(default_factory=dict)

    def batch_key(self):
        return None  # always alone: see the module docstring


class TextToImageWorker:
    """Serves a text-to-image pipeline (a diffusers folder, optionally with a ControlNet, or an artifact)."""

    def __init__(self, model: str, backend: str, device: str, *, controlnet: str | list[str] | None = None, warmup_steps: int = 2,
                 max_image_bytes: int = 8 << 20, max_batch_size: int = 8, exact_batching: bool = True,
                 strict: bool = False, cuda_graph: bool = True):
        self.model = model
        self.strict = strict
        self.cuda_graph = cuda_graph
        self.controlnet = controlnet
        self.backend_asked = backend
        self.device = device
        self.warmup_steps = warmup_steps
        self.max_image_bytes = max_image_bytes
        self.max_batch_size = max_batch_size
        self.exact_batching = exact_batching  # kept for the shared interface; solo runs are exact anyway
        self.pipe = None
        self.timed = {}
        self.warmup_seconds: float | None = None
        self.batch_max_abs_diff: float | None = None  # not probed: requests are not batched

    # -- the worker thread ------------------------------------------------------------------

    def load(self) -> None:
        """Open the pipeline, run one warm-up and the NaN self-test; raises if any of it fails."""
        from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

        t0 = time.perf_counter()
        self.pipe = open_text_to_image_pipeline(self.model, self.backend_asked, self.device, controlnet=self.controlnet,
                                                strict=self.strict, cuda_graph=self.cuda_graph)
        log.info("opened %s%s on %s in %.1f s", self.model, f" with {self.pipe.num_controlnets} ControlNet(s)" if self.pipe.has_controlnet else "",
                 self.pipe.backend, time.perf_counter() - t0)
        self.warmup_seconds = self.self_test()
        self.timed = time_components(self.pipe)  # after the warm-up, which is not a request

    def self_test(self) -> float:
        """Warm-up and NaN self-test: a guided generation at the model's default size, which must be finite."""
        t0 = time.perf_counter()
        result = self.pipe("a self-test", num_inference_steps=self.warmup_steps, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                           seed=0, output_type="pt")
        return self_test_passed(result, t0)

    @property
    def batches_requests(self) -> bool:
        return False

    def batch_key(self, plan: TextToImagePlan):
        return None

    def run_batch(self, jobs: list[Job]) -> dict[str, Answer]:
        (job,) = jobs  # batch keys are None: the batcher runs each job alone
        plan: TextToImagePlan = job.payload

        def abandon_if_nobody_waits(step: int) -> None:
            if job.expired:
                raise BatchAbandoned(f"the request timed out by step {step}")

        started, t0 = time.monotonic(), time.perf_counter()
        result = self.pipe(**plan.kwargs, seed=plan.seed, output_type="pt", progress=abandon_if_nobody_waits)
        sample_ms = 1000 * (time.perf_counter() - t0)
        pngs, encode_ms = encode_finite(result)
        timings = {"queue": 1000 * (started - job.enqueued), "sample": sample_ms, **component_ms(self.timed),
                   "encode": encode_ms}
        truncated = {key: result.metadata.get(key) for key in ("truncated", "truncated_negative")}
        return {job.id: Answer(job.id, plan.seed, pngs, result.backend, len(pngs), timings, truncated)}

    # -- any thread (reads the model's description only) ---------------------------------

    def describe(self) -> dict:
        return {"kind": "text-to-image", "controlnet": self.pipe.has_controlnet, "controlnets": self.pipe.num_controlnets, "backend": self.pipe.backend,
                "conditioning": "text", "sample_size": self.pipe.default_size, "batches_requests": False,
                "batch_max_abs_diff": self.batch_max_abs_diff, **self.pipe.runtime_metadata()}

    def plan(self, body: GenerateBody) -> TextToImagePlan:
        """Check the request against this model; RequestError names the field at fault."""
        pipe = self.pipe
        if body.class_label is not None:
            raise RequestError(422, "class_label: the loaded model is a text-to-image model; send prompt instead", "class_label")
        if body.prompt is None:
            raise RequestError(422, "prompt: required; the loaded model is a text-to-image model", "prompt")
        if body.lora_scale is not None:
            raise RequestError(422, LORA_AT_OPEN, "lora_scale")
        for name in ("control_image", "controlnet_conditioning_scale"):
            if getattr(body, name) is not None and not pipe.has_controlnet:
                raise RequestError(422, f"{name}: the loaded model has no ControlNet; serve one with `--controlnet DIR` "
                                   "or an artifact exported with it", name)
        if body.controlnet_conditioning_scale is not None and body.control_image is None:
            raise RequestError(422, "controlnet_conditioning_scale: needs control_image", "controlnet_conditioning_scale")
        control = self._decode_control_images(body) if body.control_image is not None else None
        scale = 1.0 if body.controlnet_conditioning_scale is None else body.controlnet_conditioning_scale
        if isinstance(scale, list) and len(scale) != pipe.num_controlnets:
            raise RequestError(422, f"controlnet_conditioning_scale: {len(scale)} values for {pipe.num_controlnets} ControlNet(s); "
                               "send one number, or one per ControlNet", "controlnet_conditioning_scale")
        height = body.height or (control[0].shape[-2] if control is not None else pipe.default_size)
        width = body.width or (control[0].shape[-1] if control is not None else pipe.default_size)
        if control is not None and len({tuple(c.shape[-2:]) for c in control}) > 1:
            raise RequestError(422, "control_image: the images differ in size; send images of one size, or give height and "
                               "width to resize them all", "control_image")
        guidance_scale = DEFAULT_GUIDANCE_SCALE if body.guidance_scale is None else body.guidance_scale
        try:
            pipe.check_shapes(height, width, 1, body.num_images, guidance_scale)
        except DiffrtError as exc:
            message = str(exc)
            name = "num_images" if message.startswith("batch") else "width" if message.startswith("width") else "height"
            if name != "num_images" and getattr(body, name) is None and control is not None:
                name = "control_image"  # the size came from the control image
            raise RequestError(422, f"{name}: {message}", name, profile=isinstance(exc, ShapeOutOfRangeError)) from None
        kwargs = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "height": body.height, "width": body.width,
                  "num_inference_steps": body.num_inference_steps, "guidance_scale": guidance_scale,
                  "num_images_per_prompt": body.num_images, "eta": body.eta, "control_image": control,
                  "controlnet_conditioning_scale": scale,
                  "guidance": [color_guidance(body.color, body.color_scale)] if body.color else []}
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return TextToImagePlan(seed, body.num_images, kwargs)

    def _decode_control_images(self, body: GenerateBody) -> list[torch.Tensor]:
        """One [3, H, W] image in [0, 1] per ControlNet, in their order (a single string: one ControlNet)."""
        texts = body.control_image if isinstance(body.control_image, list) else [body.control_image]
        k = self.pipe.num_controlnets
        if len(texts) != k:
            raise RequestError(422, f"control_image: {len(texts)} image(s) for {k} ControlNet(s); send one base64 PNG per "
                               "ControlNet, in their order", "control_image")
        return [self._decode_control_image(text, body) for text in texts]

    def _decode_control_image(self, text: str, body: GenerateBody) -> torch.Tensor:
        """base64 PNG -> [3, H, W] in [0, 1], resized as `diffrt generate --control-image` resizes its file."""
        if len(text) * 3 // 4 > self.max_image_bytes:
            size = len(text) * 3 / 4 / 2**20
            raise RequestError(413, f"control_image: the image is {size:.1f} MiB; the limit is {self.max_image_bytes / 2**20:.1f} MiB", "control_image")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "control_image: not valid base64; send the PNG file's bytes base64-encoded", "control_image") from None
        size = (body.height, body.width) if body.height and body.width else None
        try:
            return decode_image(data, size, max_pixels=MAX_CONTROL_PIXELS)
        except DiffrtError as exc:
            raise RequestError(422, f"control_image: {exc}", "control_image") from None
