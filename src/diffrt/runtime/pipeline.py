"""The pixel-space pipeline: unconditional and class-conditioned models (DDPM/DDIM UNet2DModel).

Arguments follow diffusers (`num_inference_steps`, `guidance_scale`, `eta`, `generator`,
`output_type`); a seed means what it means there: `torch.Generator("cpu").manual_seed(seed)`
draws the initial noise, so a seed gives the same images as diffusers' DDIMPipeline. As there,
`generator` may be a list with one generator per image: each image's initial noise and eta noise
come from its own generator (sampling.randn).
The sampler is DDIM, or LCM for a folder whose scheduler config names LCMScheduler (or with
`scheduler="lcm"`), run as diffusers' DDPMPipeline runs an LCMScheduler: its noise between steps
comes from the same generator, after the initial noise; or DPM-Solver++ for a folder naming
DPMSolverMultistepScheduler (or with `scheduler="dpm"`), as DDPMPipeline runs that scheduler; or Euler
(Ancestral) for a folder naming EulerDiscreteScheduler or EulerAncestralDiscreteScheduler (or with
`scheduler="euler"`, `"euler_a"`), as a loop that scales x_T by init_noise_sigma and the UNet's input
by scale_model_input runs them (DDPMPipeline does neither, so it does not run Euler as Euler).
(diffusers' DDIMPipeline would convert such a folder's scheduler to DDIM; `scheduler="ddim"` does
that here.)
Classifier-free guidance for class labels runs the null label and the requested labels in
one 2B batch.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from diffrt.errors import DiffrtError
from diffrt.images import to_numpy, to_pil, to_unit_range
from diffrt.models import PixelModelInfo, check_one_value_groups
from diffrt.runtime import ddim
from diffrt.runtime.agreement import guard_autograd_denoiser
from diffrt.runtime.backends import Backend
from diffrt.runtime.guidance import Guidance, acting
from diffrt.runtime.lora_scale import RuntimeLora, check_scale_value
from diffrt.runtime.sampling import (Generators, SamplerOptions, Scheduler, assigned_scheduler, check_finite, check_generators,
                                     choose_scheduler, make_sampling_schedule, randn, sample)

OutputType = Literal["pil", "np", "pt", "latent"]  # "latent": text-to-image only

# Seconds each thread has spent loading PyTorch fallbacks on first use (torch_module): a call that loads one (the VAE
# of an artifact exported without its encoder, for image-to-image) leaves that one-time cost out of its timing.
_loading = threading.local()


def loading_seconds() -> float:
    """This thread's seconds spent in torch_module's loads so far: a call's share is the difference over the call."""
    return getattr(_loading, "seconds", 0.0)


class CallClock:
    """Times one call on this thread, leaving out what it spent loading PyTorch fallbacks on first use. On a CUDA
    device the clock waits for the GPU at both ends: kernels queued before the call are not its time, and those it
    queued (the last step, the decode, with output_type "pt" or "latent") are."""

    def __init__(self, device: torch.device):
        self._cuda = device if device.type == "cuda" else None
        self._sync()
        self._start, self._loaded = time.perf_counter(), loading_seconds()

    def _sync(self) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    def stop(self) -> tuple[float, float]:
        """(seconds the call ran, its loads excluded; seconds it spent loading)."""
        self._sync()
        loaded = loading_seconds() - self._loaded
        return time.perf_counter() - self._start - loaded, loaded


@dataclass
class GenerationResult:
    """Images plus what produced them: the backend that really ran (RELIABILITY #15) and timings."""

    images: Any
    backend: str
    seconds: float
    num_inference_steps: int
    metadata: dict = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / max(1, self.num_inference_steps)


def check_output_type(output_type: str, allowed: tuple[str, ...] = ("pil", "np", "pt")) -> None:
    """Before any work: a misspelt output_type is one line, not a failure after the last step."""
    if output_type not in allowed:
        raise DiffrtError(f"output_type must be {', '.join(repr(a) for a in allowed[:-1])} or {allowed[-1]!r}, got {output_type!r}")


def convert_output(images01: torch.Tensor, output_type: OutputType):
    if output_type == "pil":
        return to_pil(images01)
    if output_type == "np":
        return to_numpy(images01)
    if output_type == "pt":
        return images01
    raise DiffrtError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


def check_count(name: str, value, minimum: int | None = 1) -> None:
    """An integer argument (num_images, num_images_per_prompt, num_inference_steps, height, width) must be an int
    (>= minimum unless None): one line here, where 2.0 or "2" would otherwise end deep inside torch and, for
    num_images, 0 would make one image."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise DiffrtError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise DiffrtError(f"{name} must be >= {minimum}, got {value}")


def check_latent_values(latents: torch.Tensor | None) -> None:
    """Caller-given noise that is no noise is refused by name, in both pipelines: integers (cast, they ran), and NaN or
    inf, which would be reported as the UNet's NaN output."""
    if latents is not None and not latents.is_floating_point():
        raise DiffrtError(f"latents must be floating point (standard normal noise), got {latents.dtype}")
    if latents is not None and not torch.isfinite(latents).all():
        raise DiffrtError("latents hold NaN or inf values; pass finite noise (or leave latents out to draw it from the seed)")


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, hint: str = "") -> None:
    """A float argument (guidance_scale, eta, strength, guidance_rescale) must be a finite number in [low, high]:
    one line, where None or "0.5" would end deep inside torch and NaN would pass every comparison (turning
    classifier-free guidance off, for a guidance_scale)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise DiffrtError(f"{name} must be a number{hint}, got {value!r}")
    if not low <= value <= high:
        raise DiffrtError(f"{name} must be in [{low:g}, {high:g}]{hint}, got {value}")


def check_strength(strength: float, num_inference_steps: int) -> int:
    """img2img's first step: the last int(N * strength) steps run, as diffusers' `get_timesteps`
    keeps them; a strength outside [0, 1] or one that leaves no step is one line."""
    check_number("strength", strength, 0.0, 1.0)
    t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    if t_start >= num_inference_steps:
        raise DiffrtError(f"strength {strength} x {num_inference_steps} steps leaves no denoising step; raise either")
    return t_start


# diffusers' pipeline arguments diffrt does not take, and what to do instead: each a DiffrtError line, where an
# unknown keyword would be a TypeError naming only the argument.
NOT_TAKEN = {
    "cross_attention_kwargs": "cross_attention_kwargs is not taken; for a LoRA's scale (diffusers' {'scale': s}) call "
                              "pipe.set_lora_scale(s) before the call",
    "callback_on_step_end": "callback_on_step_end is not taken; pass progress=fn, called with each step's index",
    "callback": "callback is not taken; pass progress=fn, called with each step's index",
    "callback_steps": "callback_steps is not taken; pass progress=fn, called with each step's index",
    "return_dict": "return_dict is not taken: results are a GenerationResult (.images, .metadata)",
    "sigmas": "sigmas is not taken; pass timesteps= (LCM, DPM-Solver++, Euler) or a scheduler config with Karras sigmas",
    "ip_adapter_image": "IP-Adapter is not supported",
    "ip_adapter_image_embeds": "IP-Adapter is not supported",
    "batch_size": "batch_size is DDIMPipeline's; pass num_images (unconditional models) or one class label per image",
    "use_clipped_model_output": "use_clipped_model_output is not supported (diffusers' default, None, is what runs)",
}


def refuse_not_taken(pipeline: object, arguments: dict) -> None:
    """Keyword arguments a pipeline's __call__ did not name: a diffusers argument diffrt does not take is one
    DiffrtError line saying what to do instead; any other is the TypeError Python gives."""
    for name in arguments:
        if name in NOT_TAKEN:
            raise DiffrtError(NOT_TAKEN[name])
        raise TypeError(f"{type(pipeline).__name__}.__call__() got an unexpected keyword argument {name!r}")


def guidance_in_pytorch(guidance, decoder: str | None = None) -> list[str]:
    """The components a call's gradient guidance ran in PyTorch, whatever the backend (engines have no autograd;
    RELIABILITY #15): the UNet on the steps guided in mode "through_unet", and a latent model's VAE `decoder` on
    every guided step (the loss is on images)."""
    return [*(["unet"] if any(g.mode == "through_unet" for g in guidance) else []), *([decoder] if guidance and decoder else [])]


def make_generator(generator: Generators, seed: int | None) -> Generators:
    """The call's generator: the one given, or a CPU generator seeded with `seed`, an integer (numpy's too) that
    torch takes: in [-2^63, 2^64) (it takes a negative seed modulo 2^64)."""
    if generator is not None and seed is not None:
        raise DiffrtError("pass either generator or seed, not both")
    if seed is None:
        return generator
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise DiffrtError(f"seed must be an integer, got {seed!r}")
    if not -2**63 <= seed < 2**64:
        raise DiffrtError(f"seed must be in [-2^63, 2^64), torch's range for a seed, got {seed}")
    return torch.Generator("cpu").manual_seed(int(seed))


TorchModule = torch.nn.Module | Callable[[], torch.nn.Module] | None  # a module, or a loader called on first use


class CallGate:
    """Calls run together; a change of the weights (set_lora_scale re-fuses or refits them in place) waits for
    the calls running to end and holds new ones until it is done, so that no image is made half at one LoRA
    scale and half at another (a reader-writer lock that prefers the writer)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._calls: dict[int, int] = {}  # thread id -> calls it is inside (a progress callback may call again)
        self._changing = False

    @contextmanager
    def call(self):
        me = threading.get_ident()
        with self._cond:
            if me not in self._calls:
                self._cond.wait_for(lambda: not self._changing)
            self._calls[me] = self._calls.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._calls[me] -= 1
                if not self._calls[me]:
                    del self._calls[me]
                self._cond.notify_all()

    @contextmanager
    def change(self):
        with self._cond:
            if threading.get_ident() in self._calls:  # it would wait for its own call to end
                raise DiffrtError("set_lora_scale was called inside a call (from its progress callback?); "
                                  "change the scale between calls")
            self._cond.wait_for(lambda: not self._changing)
            self._changing = True
            try:
                self._cond.wait_for(lambda: not self._calls)
            except BaseException:  # interrupted while waiting (Ctrl-C): the gate must not stay shut
                self._changing = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._changing = False
                self._cond.notify_all()


_GATES = threading.Lock()


def gated(call):
    """A pipeline's __call__, run inside its CallGate, and refused while a failed change of the LoRA's strength left
    its weights at mixed strengths (a refit that failed on its second engine, a re-fuse that raised): it generated on
    them, reporting lora_scale nan."""
    @functools.wraps(call)
    def run(self, *args, **kwargs):
        with self.gate.call():
            if self.lora is not None and math.isnan(self.lora.scale):
                raise DiffrtError("the last change of the LoRA's strength failed partway, leaving weights at mixed "
                                  "strengths; call set_lora_scale again (it starts from the base weights) before generating")
            return call(self, *args, **kwargs)
    return run


class DenoiserPipeline:
    """What every pipeline shares: the backend that runs its UNet (reported, RELIABILITY #15), its
    device, and the PyTorch modules that gradient guidance falls back to, loaded on first use."""

    unet: Backend
    scheduler: ddim.DDIMConfig  # the model's own; an lcm.LCMConfig samples with LCM, a dpm.DPMConfig with DPM-Solver++, ...
    unet_precision: str = "fp32"  # the precision the UNet's engine was built at: sets the eps agreement limit
    _torch: dict[str, TorchModule]
    _torch_loading: threading.RLock  # one load of each, however many calls reach it at once
    lora: RuntimeLora | None = None  # the LoRA it runs, whose strength set_lora_scale changes (lora_scale.py)

    def _set_lora(self, lora: RuntimeLora | None, torch_unet: TorchModule) -> None:
        """A PyTorch UNet fallback given as a loader loads the LoRA at the scale then in effect, so
        it is loaded again after the scale changes; one given as a module is the module that runs,
        which the LoRA rescales in place."""
        self.lora = lora
        reload = lora is not None and torch_unet is not None and not isinstance(torch_unet, torch.nn.Module)
        self._lora_fallbacks = {"unet": torch_unet} if reload else {}

    @property
    def gate(self) -> CallGate:
        """What keeps set_lora_scale from changing weights under a running call (made on first use)."""
        gate = self.__dict__.get("_gate")
        if gate is None:
            with _GATES:
                gate = self.__dict__.setdefault("_gate", CallGate())
        return gate

    @property
    def lora_scale(self) -> float:
        """The multiplier on the opened LoRA scales now in effect (1.0 without LoRA)."""
        return self.lora.scale if self.lora is not None else 1.0

    def check_lora_scale(self, scale: float) -> None:
        """Raise DiffrtError (one line) if the pipeline cannot run at `scale`; 1.0 is always accepted."""
        check_scale_value(scale)
        if self.lora is not None:
            self.lora.check(scale)
        elif scale != 1.0:
            raise DiffrtError(f"lora_scale {scale:g}: this model runs no LoRA; open a diffusers folder with --lora FILE[:SCALE] "
                              "(loras=[...]), or an artifact exported with --lora, to scale one")

    def set_lora_scale(self, scale: float) -> None:
        """Run the LoRA at `scale` times the scales it was opened with, as diffusers' `lora_scale`:
        0 is the base model, 1.0 the LoRA as opened. Changes weights (re-fuse or refit), so callers
        that batch requests change it between batches. Safe beside calls in other threads: it waits for
        them to end, and calls made meanwhile wait for it."""
        self.check_lora_scale(scale)
        if self.lora is None or scale == self.lora.scale:
            return
        with self.gate.change():
            self.lora.set_scale(scale)
            for name, loader in self._lora_fallbacks.items():
                self._torch[name] = loader  # loaded again, at the new scale, on next use

    def sampler_config(self, scheduler: Scheduler = None) -> ddim.DDIMConfig:
        """The scheduler config a call with `scheduler=` samples with (sampling.choose_scheduler)."""
        return choose_scheduler(self.scheduler, scheduler)

    def sampling_schedule(self, num_inference_steps: int, *, scheduler: Scheduler = None, eta: float = 0.0,
                          timesteps: list[int] | None = None, strength: float | None = None, **call):
        """The DDIM, LCM, DPM-Solver++ or Euler schedule such a call runs; DiffrtError (one line) for steps its sampler cannot
        take. Cheap and public, for callers that refuse a request before queueing it (`diffrt serve`).
        `strength`: image-to-image's, which runs the last int(N * strength) steps of the N asked for (check_strength), as
        diffusers' img2img pipelines; only those are checked (an epsilon model on a zero-terminal-SNR schedule can
        start below the timestep it cannot run). `call`: what else the pipeline's sampler_config decides by (text-to-image:
        `control`)."""
        if timesteps is None:
            check_count("num_inference_steps", num_inference_steps, None)  # its range is the sampler's to name
        start = 0 if strength is None else check_strength(strength, len(timesteps) if timesteps is not None else num_inference_steps)
        return make_sampling_schedule(self.sampler_config(scheduler, **call), num_inference_steps, eta=eta, timesteps=timesteps,
                                      start=start)

    def backends(self) -> dict[str, Backend]:
        """Each component's backend, by component name."""
        return {self.unet.spec.name: self.unet}

    def torch_module(self, which: str, why: str) -> torch.nn.Module:
        """The PyTorch module `which`, loaded on first use onto the pipeline's device, once, whichever of the calls
        running at once gets there first (each loaded its own copy: N UNets in memory); a clear error when there is none."""
        with self._torch_loading:
            module = self._torch[which]
            if module is None:
                raise DiffrtError(f"{why} needs the PyTorch {which}, which this pipeline was built without")
            if not isinstance(module, torch.nn.Module):
                start = time.perf_counter()
                try:
                    loaded = module()
                except DiffrtError as exc:  # e.g. an artifact's source folder gone: say what needed it (the call
                    # runs without it: `--color` left out), keeping the error's kind (ArtifactError, DataError)
                    raise type(exc)(f"{why} needs the PyTorch {which}, which could not load: {exc}") from None
                module = self._torch[which] = loaded.to(self.device).eval()
                _loading.seconds = loading_seconds() + time.perf_counter() - start
            return module

    def runtime_metadata(self, backends: dict[str, Backend] | None = None) -> dict:
        """What really runs each component (RELIABILITY #15): its backend, the ONNX Runtime providers
        the session uses (not those asked for), and whether TensorRT replays captured CUDA graphs.
        `backends`: the components one call ran (default: all the pipeline has)."""
        backends = self.backends() if backends is None else backends
        return {"components": {name: b.name for name, b in backends.items()},
                **({"lora_scale": self.lora.scale, "lora_scalable": self.lora.scalable} if self.lora is not None else {}),
                "providers": {name: list(b.providers) for name, b in backends.items() if getattr(b, "providers", None) is not None},
                "cuda_graph": any(getattr(b, "replays_graphs", False) for b in backends.values())}

    @property
    def backend(self) -> str:
        return self.unet.name

    @property
    def device(self) -> torch.device:
        return self.unet.device


class PixelPipeline(DenoiserPipeline):
    """DDIM (or LCM, DPM-Solver++, Euler, Euler Ancestral) sampling of a pixel-space UNet on any backend."""

    def __init__(self, unet: Backend, scheduler: ddim.DDIMConfig, info: PixelModelInfo, *,
                 channels: int, sample_size: int, torch_unet: TorchModule = None,
                 check_outputs: bool = True, unet_precision: str = "fp32", lora: RuntimeLora | None = None,
                 one_value_side: int = 0):
        self.unet = unet
        self.one_value_side = one_value_side  # eager PyTorch on a tiny test UNet (models.one_value_side)
        self.unet_precision = unet_precision
        self._scheduler = scheduler
        self.info = info
        self.channels = channels
        self.sample_size = sample_size
        self._torch = {"unet": torch_unet}  # for guidance mode "through_unet"
        self._torch_loading = threading.RLock()
        self._set_lora(lora, torch_unet)
        self.check_outputs = check_outputs

    @property
    def scheduler(self) -> ddim.DDIMConfig:
        """The scheduler config calls sample with."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, config: ddim.DDIMConfig | str) -> None:
        """diffusers' `pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)`, as the text-to-image pipeline takes
        it: a config, or a sampler's name on the current config's schedule; anything else is one line here, where it
        was taken and failed at the next call with an AttributeError (a review's)."""
        self._scheduler = assigned_scheduler(self._scheduler, config)

    @gated
    def __call__(self, class_labels: list[int] | torch.Tensor | int | None = None, *, num_images: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0,
                 generator: Generators = None, seed: int | None = None, guidance: tuple[Guidance, ...] | list = (),
                 height: int | None = None, width: int | None = None, output_type: OutputType = "pil",
                 use_fused_kernel: bool = True, progress=None, latents: torch.Tensor | None = None,
                 scheduler: Scheduler = None, **not_taken) -> GenerationResult:
        # 1. Check inputs before any work. `scheduler`: None is the model's own (sampling.choose_scheduler).
        refuse_not_taken(self, not_taken)
        check_output_type(output_type)
        labels = self._labels(class_labels, num_images)
        batch = len(labels) if labels is not None else (num_images or 1)
        height = self.sample_size if height is None else height  # 0 is refused below, not read as the default
        width = self.sample_size if width is None else width
        check_count("height", height)
        check_count("width", width)
        check_number("guidance_scale", guidance_scale, hint=" (<= 1 turns classifier-free guidance off)")
        check_number("eta", eta, 0.0, 1.0)
        do_cfg = labels is not None and guidance_scale > 1.0
        spec = self.unet.spec
        spec.check_size("batch", batch * (2 if do_cfg else 1),
                        what=f"batch {batch * 2} ({batch} images x 2 for classifier-free guidance)" if do_cfg else f"batch {batch}")
        spec.check_size("height", height, what=f"height {height}")
        spec.check_size("width", width, what=f"width {width}")
        check_one_value_groups(self.one_value_side, height, width, batch * (2 if do_cfg else 1))
        generator = make_generator(generator, seed)
        check_generators(generator, batch)
        schedule = self.sampling_schedule(num_inference_steps, scheduler=scheduler, eta=eta)
        clock = CallClock(self.device)

        # 2. Initial noise x_T, drawn on the CPU generator as diffusers does, unless the caller
        #    brings its own (diffusers' `latents=`): a server batching requests draws each
        #    request's noise from its own seed, so a batch equals its requests run alone. Both are scaled by the
        #    sampler's init_noise_sigma (Euler's; 1 for the others), as diffusers scales them.
        shape = (batch, self.channels, height, width)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise DiffrtError(f"latents must be a torch tensor {list(shape)} (batch, channels, height, width), got "
                              f"{type(latents).__name__}")
        if latents is not None and tuple(latents.shape) != shape:
            raise DiffrtError(f"latents must have shape {shape} (batch, channels, height, width), got {tuple(latents.shape)}")
        check_latent_values(latents)
        x = schedule.initial_noise(latents.to(self.device, torch.float32) if latents is not None
                          else randn(shape, generator, self.device, torch.float32))

        # 3. The denoiser: both CFG branches (null label, requested label) in one 2B batch.
        model_labels = None
        if labels is not None:
            labels = labels.to(self.device)
            null = torch.full_like(labels, self.info.null_class_label)
            model_labels = torch.cat([null, labels]) if do_cfg else labels

        def denoise(x_t: torch.Tensor, t: torch.Tensor):
            x_in = torch.cat([x_t, x_t]) if do_cfg else x_t
            feed = {"sample": x_in, "timestep": t.to(self.device, torch.float32).expand(x_in.shape[0])}
            if model_labels is not None:
                feed["class_labels"] = model_labels
            eps = self.unet.run(feed)["noise_pred"].float()
            if self.check_outputs:
                check_finite(eps, "unet", self.lora)
            return tuple(eps.chunk(2)) if do_cfg else (None, eps)

        # 4. The guided DDIM, LCM, DPM-Solver++ or Euler loop.
        guidance = acting(guidance)  # one at scale 0 never acts: load nothing for it
        options = SamplerOptions(guidance_scale=guidance_scale, eta=eta, generator=generator, guidance=guidance,
                                 decode=to_unit_range_unclamped,
                                 denoise_autograd=self._autograd_denoiser(model_labels, do_cfg, denoise, guidance),
                                 use_fused_kernel=use_fused_kernel)
        x = sample(denoise, x, schedule, options, progress=progress)

        # 5. Post-process.
        images = to_unit_range(x)
        seconds, loaded = clock.stop()  # a PyTorch fallback's first load is not the call's speed
        meta = {"class_labels": labels.tolist() if labels is not None else None,
                "seed": None if seed is None else int(seed),  # None: the generator(s) given, or torch's global one
                "guidance_scale": guidance_scale, "eta": eta, "scheduler": schedule.name, "timesteps": schedule.timesteps.tolist(),
                "guidance": [g.name for g in guidance], "guidance_pytorch": guidance_in_pytorch(guidance),
                "load_seconds": loaded, **self.runtime_metadata()}
        return GenerationResult(convert_output(images, output_type), self.backend, seconds, num_inference_steps, meta)

    def _labels(self, class_labels, num_images: int | None) -> torch.Tensor | None:
        """The class labels as an int64 [batch] tensor: one label is repeated to num_images, several
        are one per image (num_images, if given, must count them); None for an unconditional model."""
        if num_images is not None:
            check_count("num_images", num_images)
        if self.info.conditioning == "none":
            if class_labels is not None:
                raise DiffrtError("this model is unconditional; leave out class labels")
            return None
        last = self.info.num_classes - 1
        if class_labels is None:
            raise DiffrtError(f"this model is class-conditioned; pass class labels in [0, {last}]")
        try:
            values = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError):
            values = None
        if values is None or values.dtype == torch.bool or values.is_complex():
            raise DiffrtError(f"class labels must be integers in [0, {last}] (an int, a list of ints or an integer tensor), "
                              f"got {type(class_labels).__name__}")
        if values.is_floating_point() and not bool((values == values.round()).all()):
            shown = values.reshape(-1)[values.reshape(-1) != values.reshape(-1).round()][0].item()
            raise DiffrtError(f"class label {shown:g} is not a whole number; pass integer labels in [0, {last}]")
        if values.dim() > 1:  # a [2, 2] made 4 images: the caller meant something else
            raise DiffrtError(f"class labels must be one label or a 1-D list of them, got shape {tuple(values.shape)}; "
                              "flatten them, one label per image")
        flat = values.reshape(-1)
        if flat.numel() == 0:
            raise DiffrtError(f"class labels are empty; pass at least one label in [0, {last}]")
        bad = flat[(flat < 0) | (flat >= self.info.num_classes)]  # before the cast: 1e20 would wrap round in int64
        if bad.numel():
            raise DiffrtError(f"class label {bad[0].item():g} is out of range; this model has classes 0..{last}")
        labels = flat.to(torch.int64)
        if num_images is not None and labels.numel() == 1:
            labels = labels.expand(num_images).clone()
        elif num_images is not None and labels.numel() != num_images:
            raise DiffrtError(f"got {labels.numel()} class labels but num_images {num_images}; pass one label (repeated "
                              "to num_images), or one label per image and leave out num_images")
        return labels

    def _autograd_denoiser(self, model_labels, do_cfg, engine_denoise, guidance):
        """The PyTorch UNet with autograd for guidance mode "through_unet", checked finite and
        against the backend's eps on its first step (agreement.py, RELIABILITY #16)."""
        if not any(g.mode == "through_unet" for g in guidance):
            return None

        def denoise(x_t, t):
            unet = self.torch_module("unet", "guidance mode 'through_unet'")
            x_in = torch.cat([x_t, x_t]) if do_cfg else x_t
            ts = t.to(x_t.device, torch.float32).expand(x_in.shape[0])
            eps = unet(x_in, ts, model_labels) if model_labels is not None else unet(x_in, ts)
            return tuple(eps.float().chunk(2)) if do_cfg else (None, eps.float())

        return guard_autograd_denoiser(denoise, engine_denoise, self.backend, self.unet_precision, self.check_outputs)


def to_unit_range_unclamped(x0: torch.Tensor) -> torch.Tensor:
    """x0 in [-1, 1] -> [0, 1] without the clamp, so guidance gradients do not vanish at the edges."""
    return x0 / 2 + 0.5
