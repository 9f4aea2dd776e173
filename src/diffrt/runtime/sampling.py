"""The guided sampling loop, DDIM, LCM, DPM-Solver++, Euler or Euler Ancestral, independent of any backend.

The loop sees the model only as `denoise(x, t) -> (eps_uncond, eps_cond)`: eps_uncond is None
when classifier-free guidance is off. It never learns which backend computed them. Per step:

    1. predict noise (both CFG branches in one 2B batch, inside `denoise`);
    2. on guided steps, move x_t down the gradient of the guidance losses (guidance.py);
    3. take the sampler's step, `schedule.step`: DDIM (ddim.py, fused with the CFG combine on CUDA,
       kernels/), multistep LCM (lcm.py), multistep DPM-Solver++ (dpm.py), which reads the data
       predictions of the steps before, kept in the state the schedule makes for each call
       (`new_state`), or Euler / Euler Ancestral (euler.py).

The loop never asks which sampler it runs: each schedule (ddim.DDIMSchedule, lcm.LCMSchedule,
dpm.DPMSchedule, euler.EulerSchedule) answers the few questions of `Schedule` with thin methods over
its module's pure functions, and each config (ddim.DDIMConfig and its subclasses) makes its schedule
and refuses an eta it does not take. A new sampler is a module with such a schedule and config, an
entry in SAMPLERS and one in ddim.OWN_SAMPLERS for its diffusers class.

x is always the UNet's input (the variance-preserving x_t): Euler's VE sample is the sampler's own
business (euler.py); x_T's scale and img2img's noising are the schedule's (`initial_noise`, `add_noise`).

Random draws after x_T come from `options.generator`: one generator for the batch, one per image
(diffusers' list), or blocks of rows each from its own (GeneratorBlocks). DDIM draws a step's noise
when eta > 0; LCM on every step but the last, as LCMScheduler.step does (it has no eta); Euler Ancestral
on every step, the last one too, as EulerAncestralDiscreteScheduler.step does; DPM-Solver++ and Euler
never (deterministic, no eta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch

from diffrt.errors import DiffrtError, NonFiniteOutputError
from diffrt.runtime import ddim, dpm, euler, lcm
from diffrt.runtime.guidance import Guidance

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor]]
Decode = Callable[[torch.Tensor], torch.Tensor]  # x0 in model space -> images in [0, 1], differentiable


def combine_cfg(eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + s * (eps_c - eps_u).

    `rescale` > 0 (diffusers' `guidance_rescale`; Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", section 3.4) blends in the guided prediction rescaled to the
    per-image standard deviation of the conditional one, which strong guidance inflates (over-exposed
    images, mostly with zero-terminal-SNR v-prediction models)."""
    if eps_uncond is None:
        return eps_cond
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale > 0:
        dims = tuple(range(1, guided.dim()))
        rescaled = guided * (eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


@dataclass(frozen=True)
class Guided:
    """A step's noise prediction as `Schedule.step` takes it: the CFG branches (eps_uncond None when CFG is
    off, or already combined on a guided step), with combine_cfg's scale and rescale. `fuse`: the step may
    combine them itself (SamplerOptions.use_fused_kernel)."""

    eps_uncond: torch.Tensor | None
    eps_cond: torch.Tensor
    scale: float
    rescale: float = 0.0
    fuse: bool = False

    @property
    def fusable(self) -> bool:
        """Whether a fused CFG+step kernel may take the branches apart (DDIM's): rescale is not fused."""
        return self.eps_uncond is not None and self.fuse and self.rescale == 0

    def eps(self) -> torch.Tensor:
        """The CFG-combined prediction."""
        return combine_cfg(self.eps_uncond, self.eps_cond, self.scale, self.rescale)


@dataclass(frozen=True)
class GeneratorBlocks:
    """Rows drawn in blocks, each from its own generator: rows 0..n1-1 from g1, the next n2 from g2, ...

    `randn` draws each block with the block's own shape [n_i, ...], so a block of n rows from g is
    exactly what g draws for [n, ...] alone. A server that batches requests gives each request's
    rows its generator, and every draw (x_T, each step's eta noise) is the one the request makes
    alone (serve/batching.py). diffusers' list of generators is the case of blocks of one row."""

    blocks: tuple[tuple[torch.Generator, int], ...]

    def __post_init__(self) -> None:
        if any(n < 1 for _, n in self.blocks):
            raise DiffrtError(f"generator blocks must have at least one row each, got {[n for _, n in self.blocks]}")

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.blocks)


# One generator for the whole batch, one per image (diffusers' list), or blocks of rows (GeneratorBlocks).
Generators = torch.Generator | list[torch.Generator] | GeneratorBlocks | None


def check_generators(generator: Generators, batch: int) -> None:
    """A list (or blocks) of generators must cover the batch, one row each: a one-line DiffrtError otherwise."""
    one_or_list = [generator] if not isinstance(generator, (list, tuple)) else generator
    # None alone is the default generator; in a list it names no device to draw on (nor does diffusers' randn_tensor take it).
    if not isinstance(generator, GeneratorBlocks) and generator is not None and not all(isinstance(g, torch.Generator) for g in one_or_list):
        bad = next(g for g in one_or_list if not isinstance(g, torch.Generator))
        raise DiffrtError(f"generator must be a torch.Generator or a list of them (one per image), got {type(bad).__name__}"
                          + ("; for a seed, pass seed=" if isinstance(bad, int) else ""))
    if isinstance(generator, GeneratorBlocks) and generator.rows != batch:
        raise DiffrtError(f"generator: the generator blocks cover {generator.rows} rows but the batch has {batch} images; "
                          "make the blocks' rows add up to the batch")
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise DiffrtError(f"generator: got a list of {len(generator)} generators for a batch of {batch} images; "
                          "pass one generator, or a list with one per image")


def randn(shape, generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Draw on the generator's device, then move: a seed means the same noise on every device,
    as with diffusers' `randn_tensor` and a CPU generator. With a list of generators, row i is
    drawn from generator i with shape [1, ...], as `randn_tensor` draws it; with GeneratorBlocks,
    each block with its own shape [n_i, ...]."""
    if isinstance(generator, (list, tuple)):
        generator = generator[0] if len(generator) == 1 else GeneratorBlocks(tuple((g, 1) for g in generator))
    if not isinstance(generator, GeneratorBlocks):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
    check_generators(generator, shape[0])
    rest = tuple(shape[1:])
    return torch.cat([torch.randn((n, *rest), generator=g, device=g.device, dtype=dtype).to(device) for g, n in generator.blocks])


def check_finite(tensor: torch.Tensor, component: str, lora=None) -> torch.Tensor:
    """RELIABILITY #4: NaN/inf (e.g. fp16 overflow) is reported with the component's name. `lora`: the LoRA the
    pipeline runs (lora_scale.RuntimeLora), None without one: one at a large strength overflows an fp32 model too."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        hint = ""
        if lora is not None:
            hint = (f", or a smaller LoRA strength (lora_scale {lora.scale:g} times the LoRA scales opened)" if lora.scalable else
                    ", or its LoRA at a smaller scale (--lora FILE:SCALE or --lora-scale; fixed in these weights)")
        # The precision is the export's (`diffrt export --precision`, one for all components): `generate` and `serve`
        # have no such flag, and a model already in fp32 gains nothing from it.
        raise NonFiniteOutputError(f"{component} produced {bad} non-finite values (NaN/inf): in half precision it overflows "
                                   "(export the model again with `diffrt export --precision fp32`); in fp32 its weights or "
                                   f"inputs hold NaN/inf{hint}")
    return tensor


@dataclass
class SamplerOptions:
    guidance_scale: float = 1.0
    eta: float = 0.0
    generator: Generators = None  # one for the batch, one per image, or GeneratorBlocks
    guidance: tuple[Guidance, ...] = ()
    decode: Decode | None = None  # needed when guidance is on
    denoise_autograd: Denoise | None = None  # a PyTorch denoiser for guidance mode "through_unet"
    use_fused_kernel: bool = True
    guidance_rescale: float = 0.0  # combine_cfg's rescale (diffusers' guidance_rescale); not fused
    # Told each step's index before its model calls: for inputs that change by step, not by timestep value (a
    # Karras schedule may repeat a timestep), such as diffusers' controlnet_keep under control_guidance_start/end.
    at_step: Callable[[int], None] | None = None


class Schedule(Protocol):
    """What the loop asks of a schedule (ddim.DDIMSchedule, lcm.LCMSchedule, dpm.DPMSchedule, euler.EulerSchedule):
    data shared across calls and threads, with thin methods over its module's pure functions. Random draws come
    from `randn_like` (the call's generators), inside `step`, after the prediction as diffusers' step() draws."""

    timesteps: torch.Tensor
    prediction_type: ddim.PredictionType
    name: str  # the sampler's `scheduler=` name (its config's), as results' metadata reports it

    def __len__(self) -> int: ...
    def tail(self, start: int) -> "Schedule": ...  # the steps from `start` on (img2img)
    def check(self) -> None: ...  # refuse, before any work, a schedule the model cannot run (zero terminal SNR)
    def check_eta(self, eta: float) -> None: ...  # refuse an eta the sampler does not take, in one line
    def draws_step_noise(self, eta: float) -> bool: ...  # whether `step` draws from the generator
    def new_state(self) -> object: ...  # what `step` keeps across one call's steps (DPM-Solver++: its data predictions)
    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor: ...  # x_T from unit noise
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...  # x0 noised to the first step
    def predict_clean(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor: ...  # what guidance scores
    def step(self, x: torch.Tensor, guided: Guided, i: int, *, eta: float,
             randn_like: Callable[[torch.Tensor], torch.Tensor], state: object) -> torch.Tensor: ...


Scheduler = Literal["ddim", "lcm", "dpm", "euler", "euler_a"] | ddim.DDIMConfig | None  # a pipeline's `scheduler=`: None is the model's own
# `scheduler=` names -> their configs
SAMPLERS = {cls.name: cls for cls in (ddim.DDIMConfig, lcm.LCMConfig, dpm.DPMConfig, euler.EulerConfig, euler.EulerAncestralConfig)}


def choose_scheduler(own: ddim.DDIMConfig, choice: Scheduler) -> ddim.DDIMConfig:
    """The config a pipeline samples with: its model's own (None; an LCMConfig, DPMConfig, EulerConfig or
    EulerAncestralConfig for a folder naming LCMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    or EulerAncestralDiscreteScheduler), that model's training schedule under another sampler ("ddim", "lcm",
    "dpm", "euler", "euler_a": diffusers' `pipe.scheduler = <that class>.from_config(pipe.scheduler.config)`),
    or a config given."""
    if choice is None or isinstance(choice, ddim.DDIMConfig):
        return own if choice is None else choice
    cls = SAMPLERS.get(choice) if isinstance(choice, str) else None
    if cls is None:
        got = repr(choice) if isinstance(choice, str) else f"a {type(choice).__name__}"  # a diffusers scheduler's repr is its config
        hint = ("; for a diffusers scheduler, pass DPMConfig.from_scheduler_config(scheduler.config) (or DDIMConfig, ...)"
                if hasattr(choice, "config") else "")
        raise DiffrtError("scheduler must be 'ddim', 'lcm', 'dpm', 'euler' or 'euler_a' (or a DDIMConfig / LCMConfig / DPMConfig / "
                          f"EulerConfig / EulerAncestralConfig), got {got}{hint}")
    if type(own) is cls:
        return own
    if cls is ddim.DDIMConfig:
        # DDIMScheduler.from_config(lcm.config): the keys DDIM shares, dynamic thresholding refused by name.
        return ddim.DDIMConfig.from_scheduler_config({**own.to_scheduler_config(), "_class_name": "DDIMScheduler"})
    return cls.from_scheduler_config(own.to_scheduler_config())


def assigned_scheduler(own: ddim.DDIMConfig, choice: Scheduler) -> ddim.DDIMConfig:
    """What `pipe.scheduler = choice` sets: choose_scheduler's config, None refused (a call's None keeps the model's
    own; an assignment of None is a mistake)."""
    if choice is None:
        raise DiffrtError("pipe.scheduler takes a DDIMConfig / LCMConfig / DPMConfig / EulerConfig / EulerAncestralConfig "
                          "or a sampler's name, not None")
    return choose_scheduler(own, choice)


def make_sampling_schedule(config: ddim.DDIMConfig, num_inference_steps: int, *, eta: float = 0.0,
                           timesteps: list[int] | None = None, start: int = 0) -> Schedule:
    """The schedule for `config`'s sampler (config.make_schedule), from step `start` on (image-to-image's tail), with
    what only one sampler takes refused in one line: DDIM's `eta` for LCM, DPM-Solver++ and the Eulers (their step()
    has none; diffusers' pipelines drop it silently), custom `timesteps` for DDIM and Euler Ancestral (diffusers'
    DDIMScheduler and EulerAncestralDiscreteScheduler take none either), and steps the model cannot run
    (Schedule.check, of the steps that run)."""
    config.check_eta(eta)
    schedule = config.make_schedule(num_inference_steps, timesteps=timesteps)
    if start:
        schedule = schedule.tail(start)
    schedule.check()
    return schedule


def sample(denoise: Denoise, x: torch.Tensor, schedule: Schedule, options: SamplerOptions,
           progress: Callable | None = None) -> torch.Tensor:
    """Run the DDIM, LCM, DPM-Solver++ or Euler loop (the schedule's own step) from x = x_T (initial_noise) to x_0
    and return it. What a sampler keeps between steps (a multistep solver's data predictions) is made here, per call."""
    schedule.check()  # again, for a schedule not made by make_sampling_schedule
    if schedule.prediction_type == "sample" and any(g.mode == "x0" and g.scale != 0 for g in options.guidance):
        # x0 IS the model output here: held constant, it does not depend on x_t and the gradient is zero.
        raise DiffrtError("guidance mode 'x0' cannot steer a model with prediction_type 'sample' (its x0 is the model "
                          "output, which mode x0 holds constant); use guidance mode 'through_unet'")
    schedule.check_eta(options.eta)
    state = schedule.new_state()

    def randn_like(like: torch.Tensor) -> torch.Tensor:  # a step's noise, from the call's generators
        return randn(like.shape, options.generator, like.device, like.dtype)

    for i, t in enumerate(schedule.timesteps):
        if options.at_step is not None:
            options.at_step(i)
        active = [g for g in options.guidance if g.active(i)]
        if any(g.mode == "through_unet" for g in active):
            x, eps = _guide_through_unet(x, t, i, schedule, options, active)
            eps_u, eps_c, g = None, eps, 1.0
        else:
            eps_u, eps_c = denoise(x, t)
            g = options.guidance_scale
            if active:
                eps_c, eps_u, g = combine_cfg(eps_u, eps_c, g, options.guidance_rescale), None, 1.0
                x = _guide_x0(x, eps_c, i, schedule, options.decode, active)
        # Step 3, with the CFG branches apart for a step that fuses their combine.
        guided = Guided(eps_u, eps_c, g, options.guidance_rescale, options.use_fused_kernel)
        x = schedule.step(x, guided, i, eta=options.eta, randn_like=randn_like, state=state)
        if progress is not None:
            progress(i)
    return x


def _guidance_grad(x: torch.Tensor, eps: torch.Tensor, schedule: Schedule, decode: Decode, active: list[Guidance],
                   step: int) -> torch.Tensor:
    """d/d x_t of the sum of scale * loss over the active guidances. Each keeps its own mode: on a
    step where one runs "through_unet" (eps carries its graph), one in mode "x0" still sees eps held
    constant, so adding a guidance never changes the gradient of another."""
    losses, decoded = [], []
    for held, group in ((eps, [g for g in active if g.mode == "through_unet"]),
                        (eps.detach(), [g for g in active if g.mode == "x0"])):
        if group:
            images = decode(schedule.predict_clean(x, held, step))
            decoded.append(images)
            losses += [(g, _checked_loss(g, images)) for g in group]
    total = sum(g.scale * loss for g, loss in losses)
    (grad,) = torch.autograd.grad(total, x, allow_unused=True)
    if grad is None:
        raise DiffrtError(f"guidance {', '.join(repr(g.name) for g in active)}: the loss does not depend on the images; "
                          "compute it from the images it is given with differentiable torch operations")
    # The one host sync of a guided step. A NaN/inf loss can have a finite gradient (log of a negative pixel:
    # the images are not clamped), which would otherwise steer the sampling unnoticed.
    if not bool(torch.isfinite(total) & torch.isfinite(grad).all()):
        # Not the loss's fault when what it was given is not finite: an earlier guided update overflowed the latents
        # (a scale too large), or the decoder overflows them.
        named = ", ".join(f"{g.name!r} at scale {g.scale:g}" for g in active)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteOutputError(f"guidance {named}: the latents are no longer finite at step {step} (an earlier "
                                       "step's update overflowed); lower the scale")
        if not all(bool(torch.isfinite(images).all()) for images in decoded):
            raise NonFiniteOutputError(f"guidance {named}: the images the loss is given are not finite at step {step}: an "
                                       "earlier guided update pushed the latents out of the decoder's range (lower the "
                                       "scale), or the decoder overflows (try --precision fp32 for it)")
        for g, loss in losses:
            if not torch.isfinite(loss):
                raise NonFiniteOutputError(f"guidance {g.name!r}: the loss is {loss.item()} at step {step}; "
                                           "return a finite loss (the images it is given are not clamped to [0, 1]: "
                                           "clamp them before a log or a square root)")
        raise NonFiniteOutputError(f"guidance {', '.join(repr(g.name) for g in active)}: the gradient of the loss is not finite "
                                   f"(NaN/inf) at step {step}; make the loss differentiable where the images are")
    return grad


def _checked_loss(g: Guidance, images: torch.Tensor) -> torch.Tensor:
    """g.loss(images), refused in one line unless it is one float that the images' graph reaches:
    autograd's own errors ("grad can be implicitly created only for scalar outputs") name neither
    the guidance nor the fix. (A NaN/inf loss is named where the gradient is checked, without a
    host sync of its own.)"""
    value = g.loss(images)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise DiffrtError(f"guidance {g.name!r}: the loss returned {got}; return a float torch scalar computed from the images")
    if value.numel() != 1:
        raise DiffrtError(f"guidance {g.name!r}: the loss returned a tensor of shape {tuple(value.shape)}; "
                          "return one scalar, e.g. the per-image losses summed over the batch")
    if not value.requires_grad:
        if torch.is_inference_mode_enabled():  # no autograd at all: the loss is not at fault
            raise DiffrtError(f"guidance {g.name!r} needs autograd, which torch.inference_mode() turns off; call the "
                              "pipeline outside it (torch.no_grad() is fine)")
        raise DiffrtError(f"guidance {g.name!r}: the loss does not depend on the images (no gradient reaches them); "
                          "compute it from the images it is given with differentiable torch operations, without detach()")
    return value.reshape(())


def _guide_x0(x, eps, step: int, schedule: Schedule, decode, active) -> torch.Tensor:
    """Mode x0: eps is a constant, the gradient flows through x0(x_t) (LCM: f(x_t)) and the decoder only."""
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        grad = _guidance_grad(x_req, eps.detach(), schedule, decode, active, step)
    return (x - grad).detach()


def _guide_through_unet(x, t, step: int, schedule: Schedule, options: SamplerOptions, active):
    """Mode through_unet: the PyTorch denoiser runs with autograd, so d eps / d x_t counts too
    (for the guidances in that mode; those in mode x0 active on the same step hold eps constant)."""
    if options.denoise_autograd is None:
        raise DiffrtError("guidance mode 'through_unet' needs a PyTorch denoiser (denoise_autograd): pass one in SamplerOptions, or use mode 'x0'")
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        eps_u, eps_c = options.denoise_autograd(x_req, t)
        eps = combine_cfg(eps_u, eps_c, options.guidance_scale, options.guidance_rescale)
        grad = _guidance_grad(x_req, eps, schedule, options.decode, active, step)
    return (x - grad).detach(), eps.detach()
