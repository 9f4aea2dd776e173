"""Euler and Euler Ancestral sampling (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"; k-diffusion's `sample_euler` and `sample_euler_ancestral`) as pure functions over tensors.

In the variance-exploding parameterisation x = x0 + sigma * n, with sigma = sqrt((1 - alpha_bar) / alpha_bar),
the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma, D the denoiser's clean estimate (their
Eq. 3 with sigma(t) = t). Euler is their Algorithm 2 without churn and without the Heun correction:

    d = (x_i - D(x_i; sigma_i)) / sigma_i,    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d.

Euler Ancestral steps the same ODE down to sigma_down and adds fresh noise of sigma_up, so that the step
is a sample of the reverse process from sigma_i to sigma_{i+1} (ancestral sampling, Song et al. 2021):

    sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),  sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2),
    x_{i+1} = x_i + (sigma_down - sigma_i) d + sigma_up z,  z ~ N(0, I), one draw per step, the last one too.

The loop's x is not the VE sample but the UNet's input, x / sqrt(1 + sigma^2), the variance-preserving
x_t of the same point (diffusers' `scale_model_input`). So the pipelines, guidance (x0, `data_prediction`),
img2img's noising and the service see what they see with DDIM, and `euler_step` goes to the VE sample and
back around the update, which is the same arithmetic as diffusers'. The one place the scale shows is x_T:
diffusers draws randn * `init_noise_sigma` (sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing),
so `initial_noise` returns that over sqrt(sigma_0^2 + 1). After the last step x is diffusers' final
sample, unscaled (a "sigma_min" schedule ends there, not at sigma 0), which the pipeline decodes.

As in ddim.py and dpm.py the schedule is data: `make_euler_schedule` turns a config and a step count into the
timesteps (float: "linspace" spacing and Karras sigmas land between training steps, and the UNet takes them
as they are) and the sigmas, with the per-step scales; the configs' `make_schedule` and the methods of
`EulerSchedule` are the loop's way to them (sampling.py). diffusers' `EulerDiscreteScheduler` and
`EulerAncestralDiscreteScheduler` are the test oracles and their `scheduler_config.json` means the same here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.ddim import (DDIMConfig, PredictionType, TimestepSpacing, check_custom_timesteps, refuse_eta, trailing,
                                 trailing_overruns)
from diffrt.runtime.dpm import karras_sigmas, make_dpm_alphas_cumprod, sigma_to_timestep

if TYPE_CHECKING:
    from diffrt.runtime.sampling import Guided

FinalSigmas = Literal["zero", "sigma_min"]
# What EulerDiscreteScheduler accepts and diffrt does not run: refused by name, never run as something else.
UNSUPPORTED_FLAGS = ("use_exponential_sigmas", "use_beta_sigmas")


class _VESamplerConfig:
    """What both Euler configs share: DDIM's clip_sample, clip_sample_range and set_alpha_to_one have no
    meaning for them (their schedulers have none: no clipping, the end is sigma 0 or sigma_min), so they
    are kept as hidden keys, as diffusers keeps them; the written config names its class, so a manifest
    reads back as it. Both sample with make_euler_schedule and take no eta."""

    FOREIGN_KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one")

    def to_scheduler_config(self) -> dict:
        return {"_class_name": self.SCHEDULER_CLASS, **super().to_scheduler_config()}

    def make_schedule(self, num_inference_steps: int, *, timesteps: Sequence[float] | None = None) -> "EulerSchedule":
        """N steps, or `timesteps` given by hand (which then decide the count; Euler only)."""
        return make_euler_schedule(self, None if timesteps is not None else num_inference_steps, timesteps=timesteps)

    def check_eta(self, eta: float) -> None:
        """The Eulers take no eta (no_eta)."""
        refuse_eta(eta, no_eta(isinstance(self, EulerAncestralConfig)))


def no_eta(ancestral: bool) -> str:
    """What ddim.refuse_eta says of the Eulers."""
    return ("Euler Ancestral draws fresh noise every step whatever eta is (EulerAncestralDiscreteScheduler has no eta)"
            if ancestral else "Euler is deterministic and takes none (EulerDiscreteScheduler has no eta)")


@dataclass(frozen=True)
class EulerConfig(_VESamplerConfig, DDIMConfig):
    """diffusers' EulerDiscreteScheduler config: the training schedule (DDIMConfig's keys, with its defaults)
    plus its own. A DDIMConfig, as LCMConfig and DPMConfig are, so that a model keeps an Euler folder's config
    as it is and `scheduler="ddim"` still runs DDIM on its training schedule.

    sigma_min / sigma_max bound the Karras sigmas, as in diffusers (without use_karras_sigmas they are unused
    there too). The churn of Algorithm 2 (s_churn, s_tmin, s_tmax, s_noise) is an argument of diffusers'
    step(), not of its config, and its pipelines never pass it: diffrt runs churn 0, drawing nothing."""

    clip_sample: bool = False
    timestep_spacing: TimestepSpacing = "linspace"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: FinalSigmas = "zero"

    SAMPLER = "Euler"
    name = "euler"
    SCHEDULER_CLASS = "EulerDiscreteScheduler"

    def __post_init__(self) -> None:
        # One line per setting diffusers accepts that diffrt does not run, before anything samples with it.
        for flag in UNSUPPORTED_FLAGS:
            if getattr(self, flag):
                raise DiffrtError(f"{flag} is not supported by diffrt's Euler, which runs the training schedule's own sigmas "
                                  f"or use_karras_sigmas; set {flag} to false")
        if self.interpolation_type != "linear":
            raise DiffrtError(f"interpolation_type {self.interpolation_type!r} is not supported by diffrt's Euler; only "
                              "'linear' (the sigmas of the training steps, diffusers' default) is: set interpolation_type to 'linear'")
        if self.timestep_type not in ("discrete", "continuous"):
            raise DiffrtError(f"timestep_type must be 'discrete' or 'continuous', got {self.timestep_type!r}")
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            # diffusers then feeds the UNet 0.25 log(sigma) (EDM's c_noise) instead of the training timestep.
            raise DiffrtError("timestep_type 'continuous' (the UNet fed 0.25 log sigma, for EDM-style v-prediction models) is not "
                              "supported by diffrt's Euler; set timestep_type to 'discrete'")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise DiffrtError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigmas_type!r}")
        _check_prediction_type(self)


@dataclass(frozen=True)
class EulerAncestralConfig(_VESamplerConfig, DDIMConfig):
    """diffusers' EulerAncestralDiscreteScheduler config: only the training schedule's keys (no Karras sigmas,
    no final sigma: it always ends at 0), with its defaults. A sibling of EulerConfig, not a kind of it: the
    folder's `_class_name` decides, as diffusers decides which class to build."""

    clip_sample: bool = False
    timestep_spacing: TimestepSpacing = "linspace"

    SAMPLER = "Euler Ancestral"
    name = "euler_a"
    SCHEDULER_CLASS = "EulerAncestralDiscreteScheduler"

    def __post_init__(self) -> None:
        if self.prediction_type == "sample":  # diffusers: NotImplementedError in step(), after the UNet ran
            raise DiffrtError("prediction_type 'sample' is not supported by Euler Ancestral (EulerAncestralDiscreteScheduler "
                              "has none); use scheduler='euler' or 'ddim' for this model")
        _check_prediction_type(self)


def _check_prediction_type(config: DDIMConfig) -> None:
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise DiffrtError(f"prediction_type {config.prediction_type!r} is not supported by diffrt's {config.SAMPLER}; "
                          "expected epsilon, v_prediction or sample")


@dataclass(frozen=True)
class EulerSchedule:
    """Everything the loop needs for N Euler (or Euler Ancestral) steps. Step i goes from sigma_i to
    sigma_{i+1} (index N: 0 or sigma_min); the loop's x at step i is the VE sample over input_scales[i]."""

    timesteps: torch.Tensor  # float32 [N], what the UNet is fed
    sigmas: torch.Tensor  # float32 [N + 1], VE: sqrt((1 - alpha_bar) / alpha_bar)
    sigma_down: torch.Tensor  # float32 [N]: where the ODE step lands (sigma_{i+1} for Euler)
    sigma_up: torch.Tensor  # float32 [N]: the fresh noise's scale (0 for Euler)
    input_scales: torch.Tensor  # float32 [N + 1]: sqrt(sigma^2 + 1), and 1 at the end (the final sample, unscaled)
    init_noise_sigma: torch.Tensor  # float32 0-d: diffusers' x_T = randn * init_noise_sigma (VE)
    alphas_cumprod: torch.Tensor  # float32 [T]
    prediction_type: PredictionType
    ancestral: bool  # draw fresh noise each step (Euler Ancestral)

    @property
    def name(self) -> str:
        """The sampler, as results' metadata reports it."""
        return "euler_a" if self.ancestral else "euler"

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def tail(self, start: int) -> "EulerSchedule":
        """The steps from `start` on, as diffusers' img2img runs them (`set_begin_index(start)`)."""
        return dataclasses.replace(self, timesteps=self.timesteps[start:], sigmas=self.sigmas[start:],
                                   sigma_down=self.sigma_down[start:], sigma_up=self.sigma_up[start:],
                                   input_scales=self.input_scales[start:])

    # What the loop (sampling.py) asks of a schedule, as ddim.DDIMSchedule.

    def check(self) -> None:
        """Nothing to refuse: with zero terminal SNR the last alpha_bar is 2^-24 (make_dpm_alphas_cumprod), not 0."""

    def check_eta(self, eta: float) -> None:
        """As the configs' check_eta: no eta."""
        refuse_eta(eta, no_eta(self.ancestral))

    def draws_step_noise(self, eta: float) -> bool:
        """Whether `step` draws from the generator: Euler Ancestral on every step, the last one too; Euler never."""
        return self.ancestral

    def new_state(self) -> None:
        """What `step` keeps across one call's steps: nothing."""
        return None

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from unit noise, scaled by init_noise_sigma as the UNet's input (initial_noise)."""
        return initial_noise(noise, self)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 noised to the first step (img2img) at its sigma (add_noise)."""
        return add_noise(x0, noise, self, 0)

    def predict_clean(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """What guidance scores at step i, differentiable in x (predict_clean)."""
        return predict_clean(x, eps, self, i)

    def step(self, x: torch.Tensor, guided: "Guided", i: int, *, eta: float, randn_like: Callable[[torch.Tensor], torch.Tensor],
             state: None) -> torch.Tensor:
        """Step i (euler_step) with the CFG-combined prediction; Euler Ancestral's noise drawn with randn_like
        after the prediction, as EulerAncestralDiscreteScheduler.step draws it."""
        return euler_step(x, guided.eps(), self, i, randn_like(x) if self.ancestral else None)


def make_euler_timesteps(config: EulerConfig | EulerAncestralConfig, num_inference_steps: int) -> np.ndarray:
    """The (float32) training timesteps of `timestep_spacing` (Lin et al. 2023, Table 2), noisiest first, in
    numpy's arithmetic as diffusers computes them: "linspace" keeps the fractional steps, the others are whole."""
    T, n = config.num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise DiffrtError(f"num_inference_steps must be in [1, {T}] (the model's training steps), got {n}")
    if config.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        steps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + np.float32(config.steps_offset)
        if steps.max() >= T:  # diffusers feeds the UNet a timestep past its training steps
            raise DiffrtError(f"steps_offset {config.steps_offset} puts timestep {int(steps.max())} past the model's last training "
                              f"step {T - 1}; use fewer steps or steps_offset 0")
        return steps
    if config.timestep_spacing == "trailing":
        return trailing(T, T, n).astype(np.float32)
    raise DiffrtError(f"unknown timestep_spacing {config.timestep_spacing!r}; expected linspace, leading or trailing")


def make_euler_schedule(config: EulerConfig | EulerAncestralConfig, num_inference_steps: int | None = None, *,
                        timesteps: Sequence[float] | None = None) -> EulerSchedule:
    """The schedule of EulerDiscreteScheduler.set_timesteps (or EulerAncestralDiscreteScheduler's): N steps of
    `timestep_spacing`, or timesteps given by hand (Euler only), each at the training sigma linearly
    interpolated at it; or Karras sigmas (Eq. 5) between the ends of those, each at its fractional timestep;
    then the final sigma."""
    ancestral = isinstance(config, EulerAncestralConfig)
    if (num_inference_steps is None) == (timesteps is None):
        raise DiffrtError("give either num_inference_steps or timesteps (a custom schedule), not both or neither")
    alphas_cumprod = make_dpm_alphas_cumprod(config)  # zero terminal SNR: the last alpha_bar 2^-24, as diffusers'
    # diffusers computes the sigmas in float32 and interpolates them in float64: so do we, for equal schedules.
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    if timesteps is not None:
        steps = _custom_timesteps(config, timesteps)
    else:
        steps = make_euler_timesteps(config, num_inference_steps)
    sigmas = np.interp(steps, np.arange(0, len(train_sigmas)), train_sigmas)
    karras = not ancestral and bool(config.use_karras_sigmas)
    if karras:
        # Karras' ends from diffusers' own timesteps: where its trailing arange runs on to -1 (ddim.trailing), the last
        # is the model's smallest sigma (interpolated at -1), though no step runs there.
        overrun = timesteps is None and config.timestep_spacing == "trailing" and trailing_overruns(len(train_sigmas), num_inference_steps)
        sigma_min = config.sigma_min if config.sigma_min is not None else float(train_sigmas[0] if overrun else sigmas[-1])
        sigma_max = config.sigma_max if config.sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(np.array([sigma_min, sigma_max]), len(steps))
        steps = sigma_to_timestep(sigmas, np.log(train_sigmas)).astype(np.float32)
    final = 0.0 if ancestral or config.final_sigmas_type == "zero" else float(train_sigmas[0])
    sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
    sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
    if ancestral:  # k-diffusion's get_ancestral_step, in diffusers' float32 order
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    else:
        sigma_up, sigma_down = torch.zeros_like(sigma_to), sigma_to
    max_sigma = sigmas.max()
    init_noise_sigma = max_sigma if config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    return EulerSchedule(
        timesteps=torch.from_numpy(np.ascontiguousarray(steps, dtype=np.float32)),
        sigmas=sigmas,
        sigma_down=sigma_down,
        sigma_up=sigma_up,
        input_scales=torch.cat([(sigma_from**2 + 1) ** 0.5, torch.ones(1)]),
        init_noise_sigma=init_noise_sigma,
        alphas_cumprod=alphas_cumprod,
        prediction_type=config.prediction_type,
        ancestral=ancestral,
    )


def _custom_timesteps(config: EulerConfig | EulerAncestralConfig, timesteps: Sequence[float]) -> np.ndarray:
    """Training timesteps given by hand (diffusers' `timesteps=`; fractional ones too): strictly descending,
    inside the training steps."""
    if isinstance(config, EulerAncestralConfig):  # its set_timesteps takes a step count only
        raise DiffrtError("custom timesteps need scheduler='lcm', 'dpm' or 'euler'; Euler Ancestral takes num_inference_steps "
                          "(and timestep_spacing in the scheduler config), as diffusers' EulerAncestralDiscreteScheduler does")
    steps = [float(t) for t in timesteps]
    check_custom_timesteps(steps, config.num_train_timesteps, karras=config.use_karras_sigmas)
    return np.asarray(steps, dtype=np.float32)


def data_prediction(sample_ve: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor,
                    prediction_type: PredictionType) -> torch.Tensor:
    """D(x; sigma), the clean estimate from the model output at a VE sample (diffusers' pred_original_sample).
    epsilon: x - sigma eps; v (Salimans & Ho 2022, in VE terms): -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1);
    sample: the output itself."""
    if prediction_type == "epsilon":
        return sample_ve - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample_ve / (sigma**2 + 1))
    if prediction_type == "sample":
        return model_output
    raise DiffrtError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def predict_clean(sample: torch.Tensor, model_output: torch.Tensor, schedule: EulerSchedule, i: int) -> torch.Tensor:
    """x0 at step i from the loop's x (the UNet's input), differentiable in it: what guidance scores."""
    return data_prediction(sample * schedule.input_scales[i], model_output, schedule.sigmas[i], schedule.prediction_type)


def euler_step(sample: torch.Tensor, model_output: torch.Tensor, schedule: EulerSchedule, i: int,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step i -> i + 1 on the loop's x: to the VE sample, d = (x - D) / sigma_i, x + (sigma_down - sigma_i) d
    (+ sigma_up z for Euler Ancestral, `noise` = z, which the caller draws), back to the next step's input."""
    if schedule.ancestral and noise is None:
        raise ValueError("euler_step needs `noise` for Euler Ancestral")
    sigma = schedule.sigmas[i]
    x = sample * schedule.input_scales[i]
    derivative = (x - data_prediction(x, model_output, sigma, schedule.prediction_type)) / sigma
    x = x + derivative * (schedule.sigma_down[i] - sigma)
    if schedule.ancestral:
        x = x + noise * schedule.sigma_up[i]
    return x / schedule.input_scales[i + 1]


def initial_noise(noise: torch.Tensor, schedule: EulerSchedule) -> torch.Tensor:
    """The loop's x_T from unit noise: diffusers' randn * init_noise_sigma (VE), as the UNet's first input."""
    return noise * schedule.init_noise_sigma.to(noise.device) / schedule.input_scales[0].to(noise.device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, schedule: EulerSchedule, i: int = 0) -> torch.Tensor:
    """The forward process to step i: x0 + sigma_i noise (VE), as Euler's add_noise after set_begin_index, as the
    UNet's input there."""
    sigma, scale = schedule.sigmas[i].to(x0.device, x0.dtype), schedule.input_scales[i].to(x0.device, x0.dtype)
    return (x0 + noise * sigma) / scale
