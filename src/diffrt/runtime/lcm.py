"""Latent Consistency Model sampling (Luo et al. 2023, "Latent Consistency Models") as pure functions over tensors.

A consistency model maps any x_t on the trajectory to its clean end, f(x_t, t) = c_skip(t) x_t +
c_out(t) x0(x_t, t), where x0 is the usual reading of the model output (DDIM Eq. 12) and the
boundary condition scalings of Song et al. 2023 ("Consistency Models", Eq. 7) with sigma_data = 0.5
make f the identity at t = 0. Multistep sampling (their Algorithm 1) alternates: denoise to
f(x_t), then noise back to the next, lower timestep with fresh z ~ N(0, I); the last step returns
f(x_t) itself. LCM-LoRA (Luo et al. 2023b) runs this loop on a plain Stable Diffusion UNet in 2-8
steps.

Like ddim.py, the schedule is data: `make_lcm_schedule` turns a config and a step count into the
timesteps and the per-step constants, and `lcm_step` applies one step; `LCMConfig.make_schedule` and
the methods of `LCMSchedule` are the loop's way to them (sampling.py). diffusers' `LCMScheduler` is
the test oracle, and its `scheduler_config.json` means the same here: the inference steps are
chosen, evenly by index, from the `original_inference_steps` timesteps of the distillation
schedule (every T // original_inference_steps-th training step); `timestep_scaling` multiplies t
in the boundary condition; `timestep_spacing` and `steps_offset` do not apply to LCM.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.ddim import (AlphaBarSchedule, BetaSchedule, DDIMConfig, PredictionType, check_custom_timesteps,
                                 check_terminal_snr, make_alphas_cumprod, predict_x0, refuse_eta)

if TYPE_CHECKING:
    from diffrt.runtime.sampling import Guided

log = logging.getLogger(__name__)

SIGMA_DATA = 0.5  # the data standard deviation of the boundary condition (Consistency Models, section 3)


@dataclass(frozen=True)
class LCMConfig(DDIMConfig):
    """diffusers' LCMScheduler config: the training schedule DDIM reads, with LCMScheduler's defaults,
    plus LCM's own keys.

    It is a DDIMConfig so that everything that keeps a model's scheduler config (TextToImageModel,
    PixelModel, an artifact's manifest through `to_scheduler_config`) keeps an LCM folder's as it
    is, and so that `scheduler="ddim"` can still run DDIM on its training schedule, as
    `DDIMScheduler.from_config(lcm.config)` does. The pipelines sample an LCMConfig with LCM."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    clip_sample: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    SAMPLER = "LCM"
    name = "lcm"
    SCHEDULER_CLASS = "LCMScheduler"

    @classmethod
    def from_scheduler_config(cls, config: dict, **overrides) -> "LCMConfig":
        """DDIMConfig.from_scheduler_config as `LCMScheduler.from_config` reads it: another class's config
        (an SD folder's PNDM or DDIM) gives LCM on that training schedule, how LCM-LoRA runs on a plain
        Stable Diffusion folder."""
        cfg = super().from_scheduler_config(config, **overrides)
        if cfg.original_inference_steps < 1:
            raise DiffrtError(f"original_inference_steps must be >= 1 (LCM's distillation steps, 50 for LCM-LoRA), "
                              f"got {cfg.original_inference_steps}")
        return cfg

    def to_scheduler_config(self) -> dict:
        """With the class name, so that a manifest written from it reads back as LCM."""
        return {"_class_name": "LCMScheduler", **super().to_scheduler_config()}

    def make_schedule(self, num_inference_steps: int, *, timesteps: Sequence[int] | None = None) -> "LCMSchedule":
        """N steps, or `timesteps` given by hand (which then decide the count)."""
        return make_lcm_schedule(self, None if timesteps is not None else num_inference_steps, timesteps=timesteps)

    def check_eta(self, eta: float) -> None:
        """LCM takes no eta (NO_ETA)."""
        refuse_eta(eta, NO_ETA)


NO_ETA = "LCM draws fresh noise between its steps whatever eta is (LCMScheduler has no eta)"  # ddim.refuse_eta's why


def make_lcm_timesteps(config: LCMConfig, num_inference_steps: int | None = None, *,
                       original_inference_steps: int | None = None, strength: float = 1.0,
                       timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """The training timesteps an LCM sampler visits, noisiest first, as LCMScheduler.set_timesteps picks them.

    The distillation schedule is every k-th training step, k = T // original_inference_steps
    (t = k - 1, 2k - 1, ...), cut to its first int(original_inference_steps * strength) steps
    (`strength` < 1: LCM's own image-to-image); N steps are then taken from it, noisiest first,
    evenly by index. `timesteps` instead gives them by hand (StableDiffusionPipeline's
    `timesteps=`); `strength` then keeps the last int(N * strength) of them."""
    T = config.num_train_timesteps
    if (num_inference_steps is None) == (timesteps is None):
        raise DiffrtError("give either num_inference_steps or timesteps (a custom schedule), not both or neither")
    original = config.original_inference_steps if original_inference_steps is None else original_inference_steps
    if not 1 <= original <= T:
        raise DiffrtError(f"original_inference_steps must be in [1, {T}] (the model's training steps), got {original}")
    if not 0.0 < strength <= 1.0:
        raise DiffrtError(f"strength must be in (0, 1], got {strength}")
    k = T // original  # the skipping step k of the paper (section 4.3)
    origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * k - 1  # the distillation timesteps, ascending
    if timesteps is not None:
        return torch.from_numpy(_custom_timesteps(config, timesteps, origin, original, strength))
    n = num_inference_steps
    if n < 1:
        raise DiffrtError(f"num_inference_steps must be >= 1, got {n}")
    if n > len(origin):
        # diffusers: "The combination of `original_steps x strength` ... is smaller than `num_inference_steps`"
        cut = f" x strength {strength:g} = {len(origin)}" if strength != 1.0 else ""
        raise DiffrtError(f"LCM takes its steps from the {original} steps of its distillation schedule (original_inference_steps "
                          f"{original}{cut}), so num_inference_steps {n} is too many; use at most {len(origin)} steps "
                          "(LCM-LoRA: 2-8)" + (" or a higher strength" if strength != 1.0 else ""))
    # Evenly spaced indices (floor of a linspace without its end) into the schedule, noisiest first.
    indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[::-1][indices].copy())


def _custom_timesteps(config: LCMConfig, timesteps: Sequence[int], origin: np.ndarray, original: int,
                      strength: float) -> np.ndarray:
    """A schedule given by hand: strictly descending training steps, as LCMScheduler takes them, with
    its warnings; a timestep past either end of the training steps is refused (diffusers indexes with it)."""
    T = config.num_train_timesteps
    steps = [int(t) for t in timesteps]
    check_custom_timesteps(steps, T, example="[999, 759, 499, 259]")
    if strength == 1.0 and steps[0] != T - 1:
        log.warning("the custom LCM schedule starts at timestep %d, not %d (pure noise); images may be off", steps[0], T - 1)
    distilled = set(origin.tolist())
    off = [t for t in steps[1:] if t not in distilled]
    if off:
        log.warning("custom LCM timesteps %s are not on the distillation schedule (every %d-th step); images may be off",
                    off, T // original)
    if len(steps) > original:
        log.warning("the custom LCM schedule has %d steps, more than the %d it was distilled with", len(steps), original)
    n = len(steps)
    start = n - min(int(n * strength), n)
    if start >= n:
        raise DiffrtError(f"strength {strength} x {n} timesteps leaves no step; raise either")
    return np.asarray(steps[start:], dtype=np.int64)


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at each timestep (Consistency Models, Eq. 7, with t scaled by `timestep_scaling`):
    c_skip = sd^2 / (t^2 + sd^2), c_out = t / sqrt(t^2 + sd^2). At t = 0, f is the identity."""
    scaled = torch.as_tensor(timesteps) * timestep_scaling  # int64 steps -> float32, as LCMScheduler computes them
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, section 2.3): per image, s = the `ratio`
    quantile of |x0| clamped to [1, max_value]; x0 is clamped to [-s, s] and divided by s."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # torch.quantile needs float32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


@dataclass(frozen=True)
class LCMSchedule(AlphaBarSchedule):
    """Everything the loop needs for N LCM steps: t_i, alpha_bar at t_i and at t_{i+1} (the noise level
    the next step starts from; at the last step the final alpha, unused: it returns f(x_t)), and the
    boundary scalings at t_i."""

    timesteps: torch.Tensor  # int64 [N]
    alpha_bar: torch.Tensor  # float32 [N]
    alpha_bar_next: torch.Tensor  # float32 [N]
    c_skip: torch.Tensor  # float32 [N]
    c_out: torch.Tensor  # float32 [N]
    alphas_cumprod: torch.Tensor  # float32 [T], for noising (img2img) and guidance
    prediction_type: PredictionType
    clip_sample_range: float | None  # None: no clipping of predicted x0
    threshold: tuple[float, float] | None  # (ratio, max value) for dynamic thresholding, which replaces clipping

    name = "lcm"  # the sampler, as results' metadata reports it (not a field: no annotation)

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def tail(self, start: int) -> "LCMSchedule":
        """The steps from `start` on (img2img runs the last ones); the last step stays the last."""
        return dataclasses.replace(self, timesteps=self.timesteps[start:], alpha_bar=self.alpha_bar[start:],
                                   alpha_bar_next=self.alpha_bar_next[start:], c_skip=self.c_skip[start:], c_out=self.c_out[start:])

    # What the loop (sampling.py) asks of a schedule, as ddim.DDIMSchedule (the rest: AlphaBarSchedule).

    def check(self) -> None:
        """Refuse, before any work, a schedule the model cannot run (ddim.check_terminal_snr)."""
        check_terminal_snr(self)

    def check_eta(self, eta: float) -> None:
        """As LCMConfig.check_eta: no eta."""
        refuse_eta(eta, NO_ETA)

    def draws_step_noise(self, eta: float) -> bool:
        """Whether `step` draws from the generator: on every step but the last, so with two steps or more."""
        return len(self) > 1

    def predict_clean(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """What guidance scores at step i, differentiable in x: f(x_t, t) = c_skip x_t + c_out x0, the clean sample
        the step returns (unclipped, so gradients do not vanish at the clip)."""
        x0, _ = predict_x0(x, eps, self.alpha_bar[i], self.prediction_type)
        return consistency_output(x, x0, self.c_skip[i], self.c_out[i])

    def step(self, x: torch.Tensor, guided: "Guided", i: int, *, eta: float, randn_like: Callable[[torch.Tensor], torch.Tensor],
             state: None) -> torch.Tensor:
        """Step i (lcm_step) with the CFG-combined prediction, its noise drawn with randn_like after the prediction,
        as LCMScheduler.step draws it; none on the final step (nor for one-step sampling)."""
        noise = None if i == len(self) - 1 else randn_like(x)
        x, _ = lcm_step(x, guided.eps(), self.alpha_bar[i], self.alpha_bar_next[i], self.c_skip[i], self.c_out[i],
                        prediction_type=self.prediction_type, clip_sample_range=self.clip_sample_range, threshold=self.threshold,
                        noise=noise)
        return x


def make_lcm_schedule(config: LCMConfig, num_inference_steps: int | None = None, *, original_inference_steps: int | None = None,
                      strength: float = 1.0, timesteps: Sequence[int] | None = None) -> LCMSchedule:
    alphas_cumprod = make_alphas_cumprod(config)
    steps = make_lcm_timesteps(config, num_inference_steps, original_inference_steps=original_inference_steps,
                               strength=strength, timesteps=timesteps)
    final = torch.tensor([1.0]) if config.set_alpha_to_one else alphas_cumprod[:1]
    c_skip, c_out = boundary_scalings(steps, config.timestep_scaling)
    return LCMSchedule(
        timesteps=steps,
        alpha_bar=alphas_cumprod[steps],
        alpha_bar_next=torch.cat([alphas_cumprod[steps[1:]], final]),
        c_skip=c_skip,
        c_out=c_out,
        alphas_cumprod=alphas_cumprod,
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
        threshold=(config.dynamic_thresholding_ratio, config.sample_max_value) if config.thresholding else None,
    )


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """The embedding of the guidance scale w that a guidance-distilled UNet (LCM's, config
    `time_cond_proj_dim`) takes as `timestep_cond`: LCM's guided distillation puts CFG at scale w
    into the model (Luo et al. 2023, the augmented consistency function f(z_t, w, c, t)), which sees
    w as a sinusoidal Fourier embedding of 1000 w (as VDM embeds t, Kingma et al. 2021).

    w [B] -> float32 [B, embedding_dim]: sin then cos of 1000 w * 10000^(-i / (half - 1)),
    i < half = embedding_dim // 2, zero-padded to an odd dim. diffusers' `get_guidance_scale_embedding`
    computes the same in float32; its pipelines pass w = guidance_scale - 1 (Imagen's w + 1 = scale)."""
    if w.dim() != 1:
        raise DiffrtError(f"the guidance scales must be one per image, shape [batch]; got shape {tuple(w.shape)}")
    if embedding_dim < 4:
        raise DiffrtError(f"time_cond_proj_dim must be >= 4 for a guidance-scale embedding, got {embedding_dim}")
    half = embedding_dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, embedding_dim % 2))


def consistency_output(sample: torch.Tensor, x0: torch.Tensor, c_skip, c_out) -> torch.Tensor:
    """f(x_t, t) = c_skip x_t + c_out x0: the model's clean sample under the boundary condition."""
    return c_out * x0 + c_skip * sample


def lcm_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    alpha_bar_next: torch.Tensor | float,
    c_skip: torch.Tensor | float,
    c_out: torch.Tensor | float,
    *,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
    threshold: tuple[float, float] | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One multistep-LCM step (LCM Algorithm 1). Returns (x_next, denoised).

    denoised = f(x_t, t) from x0 (clipped or thresholded as the config asks); with `noise` (z ~ N(0, I),
    drawn by the caller on every step but the last) x_next = sqrt(ab_next) denoised + sqrt(1 - ab_next) z,
    the forward process to the next timestep; without it x_next = denoised (the last step)."""
    x0, _ = predict_x0(sample, model_output, alpha_bar, prediction_type)
    if threshold is not None:
        x0 = dynamic_threshold(x0, *threshold)
    elif clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    denoised = consistency_output(sample, x0, c_skip, c_out)
    if noise is None:
        return denoised, denoised
    alpha_bar_next = torch.as_tensor(alpha_bar_next, dtype=sample.dtype, device=sample.device)
    return alpha_bar_next.sqrt() * denoised + (1 - alpha_bar_next).sqrt() * noise, denoised
