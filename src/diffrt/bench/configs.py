"""What `diffrt bench` measures: a configuration is a model, one request, and the backends to try.

    name                  model                                    request                                    where
    digits                the shipped digits model                 the demo's (DemoSettings): 10 classes x    CPU
                                                                   8 colours, 25 DDIM steps, CFG, colour guidance
    digits-unguided       the same                                 the same without colour guidance           CPU
    tiny-t2i-controlnet   diffrt.tiny SD + ControlNet (64x64)      1 image, CFG 7.5, 25 DDIM steps            CPU
    sd15                  SD-1.5-sized, random weights, fp16       512x512, 1 image, CFG 7.5, 30 DDIM steps   GPU
    sd15-color            the same                                 + colour guidance (x0 mode)                GPU
    sd15-controlnet       the same + SD-1.5-sized ControlNet       + a control image                          GPU
    sd15-lcm              the same, sampled with LCM               4 LCM steps, guidance 1 (no CFG batch):    GPU
                                                                   what LCM-LoRA deployments run
    sd15-dpm              the same, sampled with DPM-Solver++      20 DPM-Solver++(2M) steps, CFG 7.5:        GPU
                                                                   what most SD deployments run

A configuration opens a `Workload` per backend: the pipeline, a function that runs the request
with a given number of steps, and which pipeline attributes are components (so their calls can
be timed in place). `open_null` gives the same pipeline over `NullBackend`s, for the loop's own
cost per step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from diffrt.components import ComponentSpec, tensor_shape
from diffrt.demo import DemoSettings
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import TORCH_BACKENDS

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt", "optimum-onnxruntime")
EAGER = "torch"


class NullBackend:
    """A Backend that returns zeros of the right shapes at once: the pipeline's own cost is what remains."""

    name = "null"

    def __init__(self, spec: ComponentSpec, device: torch.device, dtype: torch.dtype = torch.float32):
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sizes = {d: s for t in self.spec.inputs for d, s in zip(t.dims, feed[t.name].shape) if isinstance(d, str)}
        return {o.name: torch.zeros(tensor_shape(o, sizes), device=self.device, dtype=self.dtype) for o in self.spec.outputs}


@dataclass
class Workload:
    pipeline: Any
    run: Callable[[int], torch.Tensor]  # num_inference_steps -> images [N, C, H, W] in [0, 1]
    component_attrs: tuple[str, ...] = ()  # pipeline attributes holding a Backend
    details: dict = field(default_factory=dict)


def cache_root() -> Path:
    from diffrt.atomic import cache_dir

    return cache_dir() / "bench"


@dataclass
class BenchConfig:
    name: str
    description: str
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    gpu_only: bool = False
    backends: tuple[str, ...] = BACKENDS  # tried by default, each where present
    eager_baseline: bool = True  # also measure eager torch, whatever backends are asked for
    unguided: str | None = None  # the configuration this one adds colour guidance to
    # max |image - eager image| (images in [0, 1]) that still counts as the same output; None: by precision
    match_tolerance: float | None = None

    def prepare(self, device: torch.device) -> None:
        """Build or locate the model once, before any backend is timed."""

    def open(self, backend: str, device: torch.device) -> Workload:
        raise NotImplementedError

    def open_null(self, device: torch.device) -> Workload:
        raise NotImplementedError

    def workload_on(self, pipeline) -> Workload:
        """This configuration's request on a pipeline another configuration of the same model opened
        (the colour-guided one and its unguided twin alternate on one pipeline)."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {"description": self.description, "num_images": self.num_images, "match_tolerance": self.match_tolerance,
                "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}


# --- pixel-space: the shipped digits model ----------------------------------------------------------------


@dataclass
class DigitsConfig(BenchConfig):
    model: Path | None = None  # None: the shipped digits model
    colours: tuple[str, ...] | None = None  # None: the demo's eight
    colour_guidance: bool = True
    color_scale: float = 2.0
    seed: int = 0

    def _request(self, num_classes: int):
        """The demo's request: one row per class, one column per colour."""
        from diffrt.demo import demo_request

        settings = DemoSettings(colours=self.colours) if self.colours else DemoSettings()
        labels, targets = demo_request(settings, num_classes)
        if len(labels) != self.num_images:
            raise DiffrtError(f"{self.name}: the request has {len(labels)} images ({num_classes} classes x "
                              f"{len(settings.colours)} colours), the configuration says {self.num_images}")
        return labels, targets

    def prepare(self, device):
        from diffrt.models import SHIPPED_DIGITS, require_model_dir

        require_model_dir(self.model or SHIPPED_DIGITS)

    def _workload(self, pipe) -> Workload:
        from diffrt.runtime.guidance import color_guidance

        labels, targets = self._request(pipe.info.num_classes)
        guidance = [color_guidance(targets, self.color_scale)] if self.colour_guidance else []

        def run(steps: int) -> torch.Tensor:
            return pipe(labels, num_inference_steps=steps, guidance_scale=self.guidance_scale, seed=self.seed,
                        guidance=guidance, output_type="pt").images

        return Workload(pipe, run, ("unet",), {"providers": getattr(pipe.unet, "providers", None)})

    def workload_on(self, pipeline):
        return self._workload(pipeline)

    def open(self, backend, device):
        from diffrt.export.options import ExportOptions
        from diffrt.runtime.loading import open_pixel_pipeline

        if backend == "optimum-onnxruntime":
            raise NotApplicable("optimum's ONNX Runtime diffusion pipelines are Stable Diffusion-family (latent, text-"
                                "conditioned); it has none for a class-conditioned pixel-space UNet2DModel")
        unet_batch = 2 * self.num_images  # both CFG branches in one batch
        options = ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx", batch=(1, unet_batch, unet_batch))
        return self._workload(open_pixel_pipeline(self.model, backend, device, export_options=options))

    def open_null(self, device):
        from diffrt.runtime.loading import open_pixel_pipeline

        pipe = open_pixel_pipeline(self.model, "torch", device)
        pipe.unet = NullBackend(pipe.unet.spec, pipe.device)
        return self._workload(pipe)

    def settings(self):
        from diffrt.models import SHIPPED_DIGITS

        return {**super().settings(), "model": str(self.model or SHIPPED_DIGITS), "colour_guidance": self.colour_guidance,
                "color_scale": self.color_scale if self.colour_guidance else None, "seed": self.seed, "precision": "fp32"}


# --- latent text-to-image (+ ControlNet) ----------------------------------------------------------------


@dataclass
class TextToImageConfig(BenchConfig):
    size: int = 64  # image side in pixels
    model: str = "tiny"  # "tiny" (diffrt.tiny) or "sd15" (sd15.py), built once into the cache
    controlnet: bool = False
    precision: str = "fp32"
    colour_guidance: bool = False
    color: str = "#ff8800"
    color_scale: float = 20.0
    prompt: str = "a photo of a cat sitting on a red sofa"
    seed: int = 0
    scheduler: str | None = None  # None: the model's own (DDIM); "lcm" / "dpm" / "euler" / "euler_a": that sampler on its training schedule

    @property
    def folder(self) -> Path:
        # v2: the ControlNet's output convolutions are noised (sd15.py); a v1 folder's add nothing.
        return cache_root() / (f"tiny-t2i-{self.size}-seed{self.seed}" if self.model == "tiny" else f"sd15-random-v2-seed{self.seed}")

    def prepare(self, device):
        folder = self.folder
        if self.model == "sd15":
            from diffrt.bench.sd15 import build_sd15_folder

            build_sd15_folder(folder, seed=self.seed, device=device)
        elif not (folder / "controlnet" / "config.json").is_file():
            import shutil

            from diffrt.tiny import tiny_text_to_image

            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tiny_text_to_image(tmp, seed=self.seed, controlnet=True, sample_size=self.size)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)

    def control_image(self) -> torch.Tensor:
        """A deterministic edge map, as a canny ControlNet gets: white rings on black, [1, 3, H, W]."""
        ax = torch.linspace(-1, 1, self.size)
        r = (ax[None, :] ** 2 + ax[:, None] ** 2).sqrt()
        rings = ((r * 6 * math.pi).sin().abs() < 0.15).float()
        return rings.expand(1, 3, -1, -1).contiguous()

    def _kwargs(self, guidance) -> dict:
        kwargs = dict(negative_prompt="", height=self.size, width=self.size, guidance_scale=self.guidance_scale,
                      num_images_per_prompt=self.num_images, seed=self.seed, guidance=guidance, output_type="pt",
                      scheduler=self.scheduler)
        if self.controlnet:
            kwargs["control_image"] = self.control_image()
        return kwargs

    def _workload(self, pipe) -> Workload:
        from diffrt.runtime.guidance import color_guidance

        kwargs = self._kwargs([color_guidance(self.color, self.color_scale)] if self.colour_guidance else [])

        def run(steps: int) -> torch.Tensor:
            return pipe(self.prompt, num_inference_steps=steps, **kwargs).images

        details = {"providers": getattr(pipe.unet, "providers", None),
                   "precisions": {c.spec.name: str(getattr(c, "dtype", "")).removeprefix("torch.") or None
                                  for c in (pipe.text_encoder, pipe.unet, pipe.vae_decoder)}}
        return Workload(pipe, run, ("text_encoder", "unet", "vae_decoder"), details)

    def workload_on(self, pipeline):
        return self._workload(pipeline)

    def _controlnet_dir(self) -> Path | None:
        return self.folder / "controlnet" if self.controlnet else None

    def _torch_pipeline(self, device, compile: bool = False):
        from diffrt.export.text_to_image import build_precision
        from diffrt.runtime.backends.torch_eager import TorchBackend
        from diffrt.runtime.text_to_image_loading import torch_text_to_image_pipeline
        from diffrt.text_to_image_models import load_text_to_image

        model = load_text_to_image(self.folder, self._controlnet_dir())
        pipe = torch_text_to_image_pipeline(model, device, compile=compile and self.precision == "fp32")
        if self.precision != "fp32":
            # The same precision per component as the export: the VAE stays fp32 where it asks (force_upcast).
            from diffrt.export.options import TORCH_DTYPES

            upcast = bool(getattr(model.vae.config, "force_upcast", False))
            for attr in ("text_encoder", "unet", "vae_decoder"):
                old = getattr(pipe, attr)
                dtype = TORCH_DTYPES[build_precision(old.spec.name, self.precision, upcast)]
                setattr(pipe, attr, TorchBackend(old.module, old.spec, device=device, dtype=dtype, compile=compile))
        return pipe

    def open(self, backend, device):
        if backend == "optimum-onnxruntime":
            from diffrt.bench.optimum_ort import open_optimum

            return open_optimum(self, device)
        if backend in TORCH_BACKENDS:
            return self._workload(self._torch_pipeline(device, compile=backend == "torch-compile"))
        from diffrt.export.options import ExportOptions
        from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

        # The parity check of `diffrt export` is left out: the benchmark compares images with eager itself.
        size = (self.size,) * 3
        options = ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx", precision=self.precision,
                                batch=(1, 2 * self.num_images, 2 * self.num_images), height=size, width=size, verify=False)
        pipe = open_text_to_image_pipeline(self.folder, backend, device, controlnet=self._controlnet_dir(), export_options=options)
        return self._workload(pipe)

    def open_null(self, device):
        pipe = self._torch_pipeline(device)
        for attr in ("text_encoder", "unet", "vae_decoder"):
            setattr(pipe, attr, NullBackend(getattr(pipe, attr).spec, device))
        return self._workload(pipe)

    def settings(self):
        return {**super().settings(), "model": self.model, "folder": str(self.folder), "height": self.size,
                "width": self.size, "controlnet": self.controlnet, "precision": self.precision, "prompt": self.prompt,
                "colour_guidance": self.colour_guidance, "color": self.color if self.colour_guidance else None,
                "color_scale": self.color_scale if self.colour_guidance else None, "seed": self.seed,
                "scheduler": self.scheduler or "ddim"}


class NotApplicable(DiffrtError):
    """This backend does not apply to this configuration (not a failure)."""


# --- the registry -----------------------------------------------------------------------------------------

# The demo's request as the demo has it now (diffrt.demo.DemoSettings), so the two never drift apart.
_DEMO = DemoSettings()
_DIGITS = DigitsConfig("digits", f"shipped digits model, the demo's request: 10 classes x {len(_DEMO.colours)} colours, "
                       f"colour guidance", num_images=10 * len(_DEMO.colours), num_inference_steps=_DEMO.num_inference_steps,
                       guidance_scale=_DEMO.guidance_scale, color_scale=_DEMO.color_scale, seed=_DEMO.seed,
                       unguided="digits-unguided")
_TINY = TextToImageConfig("tiny-t2i-controlnet", "diffrt.tiny Stable Diffusion + ControlNet, 64x64",
                          num_images=1, num_inference_steps=25, guidance_scale=7.5, size=64, model="tiny", controlnet=True)
_SD15 = TextToImageConfig("sd15", "SD-1.5-sized UNet, CLIP text encoder, VAE (random weights), 512x512, fp16",
                          num_images=1, num_inference_steps=30, guidance_scale=7.5, size=512, model="sd15", precision="fp16",
                          gpu_only=True)

CONFIGS: dict[str, BenchConfig] = {c.name: c for c in (
    _DIGITS,
    # Only the guidance-overhead target needs it: the exported backend alone keeps `diffrt bench` short on a CPU.
    dataclasses.replace(_DIGITS, name="digits-unguided", description="shipped digits model, the demo's request without colour guidance",
                        colour_guidance=False, unguided=None, backends=("onnxruntime", "tensorrt"), eager_baseline=False),
    _TINY,
    _SD15,
    dataclasses.replace(_SD15, name="sd15-color", description=_SD15.description + ", colour guidance (x0 mode)",
                        colour_guidance=True, unguided="sd15"),
    dataclasses.replace(_SD15, name="sd15-controlnet", description=_SD15.description + " + SD-1.5-sized ControlNet",
                        controlnet=True),
    # Guidance 1: the UNet runs at batch 1, on the sd15 engines (one build in a GPU session's minutes), whose profile
    # is tuned for CFG's batch 2; TensorRT's LCM row runs off its optimum, which slightly favours the others.
    dataclasses.replace(_SD15, name="sd15-lcm", description=_SD15.description + ", LCM: 4 steps, guidance 1",
                        num_inference_steps=4, guidance_scale=1.0, scheduler="lcm"),
    dataclasses.replace(_SD15, name="sd15-dpm", description=_SD15.description + ", DPM-Solver++(2M): 20 steps",
                        num_inference_steps=20, scheduler="dpm"),
)}
CPU_DEFAULT = ("digits", "digits-unguided", "tiny-t2i-controlnet")
GPU_DEFAULT = ("sd15", "sd15-color", "sd15-controlnet", "sd15-lcm", "sd15-dpm")


def get_config(name: str) -> BenchConfig:
    if name not in CONFIGS:
        raise DiffrtError(f"unknown benchmark configuration {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]
