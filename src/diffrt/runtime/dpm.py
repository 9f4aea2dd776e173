"""DPM-Solver++ multistep sampling (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models") as pure functions over tensors.

The diffusion ODE is solved in the half-log-SNR lambda = log(alpha_t / sigma_t) with the model read as a
data predictor x0 (their section 4): the exact solution from s to t < s is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0(x_lambda) d lambda,

and a k-th order solver approximates x0 along the way by a polynomial in lambda through the last k data
predictions. Order 1 is DDIM; order 2 is DPM-Solver++(2M) (their Algorithm 2) with the "midpoint" form
of that algorithm, or the "heun" (Taylor) form of DPM-Solver's multistep method (Lu et al. 2022a,
appendix); order 3 uses the last three. Near the end, where steps are long and few, lower orders are
steadier (`lower_order_final`), and the last step to sigma = 0 is always first order (h is infinite).

As in ddim.py and lcm.py the schedule is data: `make_dpm_schedule` turns a config and a step count into
timesteps and the per-step sigma, alpha_t, sigma_t and lambda, and `dpm_solver_step` applies one step
given the data predictions so far, which the caller keeps: `DPMSchedule.step`, the loop's way to it
(sampling.py), keeps them in the state `DPMSchedule.new_state` makes for each call, never on the shared
schedule. diffusers'
`DPMSolverMultistepScheduler` is the test oracle and its `scheduler_config.json` means the same here;
its sigmas are the VE ones, sigma = sqrt((1 - alpha_bar) / alpha_bar), with alpha_t = 1 / sqrt(1 + sigma^2)
and sigma_t = sigma * alpha_t the VP coefficients.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.ddim import (DDIMConfig, PredictionType, TimestepSpacing, check_custom_timesteps, make_alphas_cumprod,
                                 refuse_eta, trailing)
from diffrt.runtime.lcm import dynamic_threshold

if TYPE_CHECKING:
    from diffrt.runtime.sampling import Guided

log = logging.getLogger(__name__)

SolverType = Literal["midpoint", "heun"]
FinalSigmas = Literal["zero", "sigma_min"]
KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. (5): the rho of their experiments
MIN_ALPHA_BAR = 2.0**-24  # zero terminal SNR: the last alpha_bar, so that sigma_max is finite (diffusers' choice)
# What DPMSolverMultistepScheduler accepts and diffrt does not run: refused by name, never run as something else.
UNSUPPORTED_FLAGS = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")
# Other solvers' settings that DPMSolverMultistepScheduler's __init__ reads as DPM-Solver++'s (DEIS's and UniPC's
# solver types). DEIS's algorithm_type "deis" is refused: diffusers maps it too, but only past a check that
# refuses it with the default final_sigmas_type.
ALIASES = {"solver_type": ({"logrho", "bh1", "bh2"}, "midpoint")}


@dataclass(frozen=True)
class DPMConfig(DDIMConfig):
    """diffusers' DPMSolverMultistepScheduler config: the training schedule (DDIMConfig's keys, with
    DPMSolverMultistepScheduler's defaults) plus the solver's own keys.

    A DDIMConfig, as LCMConfig is, so that a model keeps a DPM folder's config as it is (an artifact's
    manifest through `to_scheduler_config`) and `scheduler="ddim"` still runs DDIM on its training
    schedule. DDIM's clip_sample and set_alpha_to_one have no meaning here (DPM-Solver never clips and
    ends at sigma 0 or sigma_min): they are left at defaults and out of the written config."""

    clip_sample: bool = False
    timestep_spacing: TimestepSpacing = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: SolverType = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False
    final_sigmas_type: FinalSigmas = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    SAMPLER = "DPM-Solver++"
    name = "dpm"
    SCHEDULER_CLASS = "DPMSolverMultistepScheduler"
    FOREIGN_KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one")  # DPMSolverMultistepScheduler has none of them

    def __post_init__(self) -> None:
        # One line per setting diffusers accepts that diffrt does not run, before anything samples with it.
        if self.algorithm_type != "dpmsolver++":
            raise DiffrtError(f"algorithm_type {self.algorithm_type!r} is not supported by diffrt's DPM-Solver; only 'dpmsolver++' "
                              "(the deterministic multistep DPM-Solver++, diffusers' default) is; set algorithm_type to 'dpmsolver++'")
        for flag in UNSUPPORTED_FLAGS:
            if getattr(self, flag):
                raise DiffrtError(f"{flag} is not supported by diffrt's DPM-Solver, which runs the training schedule's own "
                                  f"sigmas or use_karras_sigmas; set {flag} to false")
        if self.variance_type is not None:
            raise DiffrtError(f"variance_type {self.variance_type!r} (a model that also predicts its variance) is not supported by "
                              "diffrt's DPM-Solver; it takes models whose output is the prediction alone: set variance_type to null")
        if self.solver_order not in (1, 2, 3):
            raise DiffrtError(f"solver_order must be 1, 2 or 3, got {self.solver_order}")
        if self.solver_type not in ("midpoint", "heun"):
            raise DiffrtError(f"solver_type must be 'midpoint' or 'heun', got {self.solver_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise DiffrtError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigmas_type!r}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise DiffrtError(f"prediction_type {self.prediction_type!r} is not supported by diffrt's DPM-Solver; "
                              "expected epsilon, v_prediction or sample")

    @classmethod
    def from_scheduler_config(cls, config: dict, **overrides) -> "DPMConfig":
        """DDIMConfig.from_scheduler_config as `DPMSolverMultistepScheduler.from_config` reads it: another
        class's config (an SD folder's PNDM) gives DPM-Solver++ on that training schedule, and the DEIS/UniPC
        solver types diffusers' __init__ maps to "midpoint" map the same way here."""
        config, overrides = _read_as_dpm(config), _read_as_dpm(overrides)
        return super().from_scheduler_config(config, **overrides)

    def to_scheduler_config(self) -> dict:
        """With the class name, so that a manifest written from it reads back as DPM-Solver++."""
        return {"_class_name": self.SCHEDULER_CLASS, **super().to_scheduler_config()}

    def make_schedule(self, num_inference_steps: int, *, timesteps: Sequence[int] | None = None) -> "DPMSchedule":
        """N steps, or `timesteps` given by hand (which then decide the count)."""
        return make_dpm_schedule(self, None if timesteps is not None else num_inference_steps, timesteps=timesteps)

    def check_eta(self, eta: float) -> None:
        """DPM-Solver++ takes no eta (NO_ETA)."""
        refuse_eta(eta, NO_ETA)


NO_ETA = "DPM-Solver++ is deterministic and takes none (DPMSolverMultistepScheduler has no eta)"  # ddim.refuse_eta's why


def _read_as_dpm(config: dict) -> dict:
    """The DEIS/UniPC solver types as DPMSolverMultistepScheduler's __init__ reads them; a null
    lambda_min_clipped (diffusers' JSON of -inf) left out, so the default -inf holds."""
    config = dict(config)
    for key, (aliases, value) in ALIASES.items():
        if config.get(key) in aliases:
            log.info("%s %r reads as %r, as DPMSolverMultistepScheduler.from_config reads it", key, config[key], value)
            config[key] = value
    if "lambda_min_clipped" in config and config["lambda_min_clipped"] is None:
        config.pop("lambda_min_clipped")
    return config


def make_dpm_alphas_cumprod(config: DPMConfig) -> torch.Tensor:
    """alpha_bar_t of the training schedule; with zero terminal SNR the last is 2^-24 instead of 0, so
    that its sigma (and the first step of a "trailing" schedule) stays finite, as diffusers has it."""
    alphas_cumprod = make_alphas_cumprod(config)
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = MIN_ALPHA_BAR
    return alphas_cumprod


def make_dpm_timesteps(config: DPMConfig, num_inference_steps: int, alphas_cumprod: torch.Tensor) -> np.ndarray:
    """The training timesteps of `timestep_spacing` (Lin et al. 2023, Table 2), noisiest first, as int64.

    The steps stop short of where lambda falls below `lambda_min_clipped` (for the cosine schedule, whose
    last lambdas plunge). The spacing's own arithmetic is numpy's, as diffusers computes it: several steps
    land on k + 0.5 and round by the last bit."""
    T, n = config.num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise DiffrtError(f"num_inference_steps must be in [1, {T}] (the model's training steps), got {n}")
    lambdas = torch.log(alphas_cumprod.sqrt()) - torch.log((1 - alphas_cumprod).sqrt())
    last = T - int(torch.searchsorted(torch.flip(lambdas, [0]), config.lambda_min_clipped))
    if config.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = last // (n + 1)
        if ratio == 0:  # diffusers would run every step at timestep steps_offset
            raise DiffrtError(f"timestep_spacing 'leading' spaces {n} steps by {last} // ({n} + 1) = 0 timesteps; "
                              f"use at most {last - 1} steps, or timestep_spacing 'linspace'")
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return trailing(last, T, n).astype(np.int64)
    raise DiffrtError(f"unknown timestep_spacing {config.timestep_spacing!r}; expected linspace, leading or trailing")


def karras_sigmas(sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
    """N sigmas from sigma_max to sigma_min evenly spaced in sigma^(1/rho) (Karras et al. 2022, Eq. 5);
    `sigmas` ascending: its first is sigma_min, its last sigma_max."""
    sigma_min, sigma_max = float(sigmas[0]), float(sigmas[-1])
    ramp = np.linspace(0, 1, num_inference_steps)
    max_inv, min_inv = sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO)
    return (max_inv + ramp * (min_inv - max_inv)) ** KARRAS_RHO


def sigma_to_timestep(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: linear interpolation in log sigma between the
    two training steps around it, clamped to the schedule's ends."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, lambda_t) of VE sigmas: alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t,
    lambda_t = log alpha_t - log sigma_t (inf at sigma 0, the end of a "zero" schedule)."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def solver_orders(config: DPMConfig, num_steps: int) -> torch.Tensor:
    """The highest order each of N steps may take; the warm-up (no order above the number of data
    predictions so far) is the caller's. Fewer than 15 steps with lower_order_final: the last two steps
    at most 1 and 2; euler_at_final, or a final sigma of 0 (h infinite), make the last step first order."""
    orders = [config.solver_order] * num_steps
    short = config.lower_order_final and num_steps < 15
    if num_steps >= 2 and short:
        orders[-2] = min(orders[-2], 2)
    if config.euler_at_final or short or config.final_sigmas_type == "zero":
        orders[-1] = 1
    return torch.tensor(orders, dtype=torch.int64)


def _limit_orders_at_flat_steps(orders: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """A step that does not move (h = 0: Karras sigmas ending at sigma_min with final_sigmas_type "sigma_min",
    custom timesteps ending at 0, or two linspace steps on one timestep when N is the training steps) taken at
    first order, which is exactly the identity there; and no later step reaching back across it, since order k
    at step i divides by the gaps of steps i - k + 1 .. i - 1 (r0, r1), 0 at a flat one. The higher orders divide
    by zero there, and diffusers returns NaN images for such schedules."""
    flat = (lambdas[1:] == lambdas[:-1]).tolist()
    if any(flat):
        log.info("DPM-Solver++: %d step(s) of zero length taken at first order, and the steps after them at orders "
                 "that do not reach back across them (diffusers' higher orders give NaN there)", sum(flat))
    # moving: how many steps in a row before step i moved (from the start: the warm-up is the caller's, `step`).
    limited, moving = [], len(flat)
    for order, is_flat in zip(orders.tolist(), flat):
        limited.append(1 if is_flat else min(order, moving + 1))
        moving = 0 if is_flat else moving + 1
    return torch.tensor(limited, dtype=orders.dtype)


@dataclass(frozen=True)
class DPMSchedule:
    """Everything the loop needs for N DPM-Solver++ steps: t_i, and sigma, alpha_t, sigma_t, lambda at
    the N steps and the end (index N: 0 or sigma_min). Step i goes from index i to i + 1 and reads the
    lambdas of the steps before it for its higher orders."""

    timesteps: torch.Tensor  # int64 [N]
    sigmas: torch.Tensor  # float32 [N + 1], VE: sqrt((1 - alpha_bar) / alpha_bar)
    alpha_t: torch.Tensor  # float32 [N + 1]
    sigma_t: torch.Tensor  # float32 [N + 1]
    lambdas: torch.Tensor  # float32 [N + 1]
    orders: torch.Tensor  # int64 [N], each step's highest order (solver_orders)
    alphas_cumprod: torch.Tensor  # float32 [T]
    prediction_type: PredictionType
    solver_type: SolverType
    threshold: tuple[float, float] | None  # (ratio, max value): dynamic thresholding of x0

    name = "dpm"  # the sampler, as results' metadata reports it (not a field: no annotation)

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def tail(self, start: int) -> "DPMSchedule":
        """The steps from `start` on, as diffusers' img2img runs them (`set_begin_index(start)`): the same
        sigmas and order limits (set by the full N), the warm-up again from the first step kept."""
        return dataclasses.replace(self, timesteps=self.timesteps[start:], sigmas=self.sigmas[start:], alpha_t=self.alpha_t[start:],
                                   sigma_t=self.sigma_t[start:], lambdas=self.lambdas[start:], orders=self.orders[start:])

    # What the loop (sampling.py) asks of a schedule, as ddim.DDIMSchedule.

    def check(self) -> None:
        """Nothing to refuse: with zero terminal SNR the last alpha_bar is 2^-24 (make_dpm_alphas_cumprod), not 0."""

    def check_eta(self, eta: float) -> None:
        """As DPMConfig.check_eta: no eta."""
        refuse_eta(eta, NO_ETA)

    def draws_step_noise(self, eta: float) -> bool:
        """Whether `step` draws from the generator: never (deterministic)."""
        return False

    def new_state(self) -> list[torch.Tensor]:
        """What `step` keeps across one call's steps: the last data predictions, oldest first (a fresh list
        per call, as the schedule is shared across calls)."""
        return []

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T from unit noise: the noise itself (init_noise_sigma 1)."""
        return noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 noised to the first step (img2img) at its sigma (add_noise)."""
        return add_noise(x0, noise, self, 0)

    def predict_clean(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """What guidance scores at step i, differentiable in x: the data prediction x0 (unthresholded, so
        gradients do not vanish at the threshold)."""
        return data_prediction(x, eps, self.alpha_t[i], self.sigma_t[i], self.prediction_type)

    def step(self, x: torch.Tensor, guided: "Guided", i: int, *, eta: float, randn_like: Callable[[torch.Tensor], torch.Tensor],
             state: list[torch.Tensor]) -> torch.Tensor:
        """Step i (dpm_solver_step) with the CFG-combined prediction, its data prediction added to `state`.
        Warm-up: the order is at most the number of data predictions so far (diffusers' lower_order_nums)."""
        state.append(thresholded_data_prediction(x, guided.eps(), self, i))
        del state[:-int(self.orders.max())]
        return dpm_solver_step(x, state[-min(int(self.orders[i]), len(state)):], self, i)


def make_dpm_schedule(config: DPMConfig, num_inference_steps: int | None = None, *,
                      timesteps: Sequence[int] | None = None) -> DPMSchedule:
    """The schedule of DPMSolverMultistepScheduler.set_timesteps: N steps of `timestep_spacing`, or
    Karras sigmas (use_karras_sigmas: sigmas spaced per Karras et al., each at its fractional timestep,
    rounded), or timesteps given by hand; then the final sigma (final_sigmas_type)."""
    T = config.num_train_timesteps
    if (num_inference_steps is None) == (timesteps is None):
        raise DiffrtError("give either num_inference_steps or timesteps (a custom schedule), not both or neither")
    alphas_cumprod = make_dpm_alphas_cumprod(config)
    # diffusers computes the sigmas in float32 and interpolates them in float64: so do we, for equal schedules.
    sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    log_sigmas = np.log(sigmas)
    if timesteps is not None:
        steps = _custom_timesteps(config, timesteps)
    elif config.use_karras_sigmas:
        if not 1 <= num_inference_steps <= T:
            raise DiffrtError(f"num_inference_steps must be in [1, {T}] (the model's training steps), got {num_inference_steps}")
        # A config may bound them (sigma_min / sigma_max: not DPMSolverMultistepScheduler's arguments, but kept
        # as hidden keys, which its _convert_to_karras reads: an Euler folder's, or one converted from it).
        low, high = (config.hidden.get(key) for key in ("sigma_min", "sigma_max"))
        sigmas = karras_sigmas(np.array([sigmas[0] if low is None else float(low), sigmas[-1] if high is None else float(high)]),
                               num_inference_steps)
        steps = sigma_to_timestep(sigmas, log_sigmas)
        # The cosine schedule keeps the fractional steps, which int64 truncates (as diffusers casts them).
        steps = (steps if config.beta_schedule == "squaredcos_cap_v2" else steps.round()).astype(np.int64)
        if len(steps) > 1 and steps[0] == steps[1]:
            # Karras sigmas past the last training sigma share its timestep: the cosine schedule's 16 steps
            # visit t = 998 seven times, at noise levels the UNet cannot tell apart. diffusers' step() looks
            # its first step up by timestep, starts at the second and fails with an IndexError at the end;
            # here every step runs, in order, with a warning.
            log.warning("use_karras_sigmas starts %d steps with %d at timestep %d (sigmas past the %s schedule's last); "
                        "the UNet sees them as one noise level: consider use_karras_sigmas false",
                        num_inference_steps, int((steps == steps[0]).sum()), int(steps[0]), config.beta_schedule)
    else:
        steps = make_dpm_timesteps(config, num_inference_steps, alphas_cumprod)
    if not config.use_karras_sigmas:
        if steps.max() >= T:  # diffusers' step() indexes past the training steps
            raise DiffrtError(f"steps_offset {config.steps_offset} puts timestep {int(steps.max())} past the model's last training "
                              f"step {T - 1}; use fewer steps or steps_offset 0")
        sigmas = np.interp(steps, np.arange(0, len(sigmas)), sigmas)
    final = 0.0 if config.final_sigmas_type == "zero" else float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
    alpha_t, sigma_t, lambdas = vp_coefficients(sigmas)
    return DPMSchedule(
        timesteps=torch.from_numpy(np.ascontiguousarray(steps)),
        sigmas=sigmas,
        alpha_t=alpha_t,
        sigma_t=sigma_t,
        lambdas=lambdas,
        orders=_limit_orders_at_flat_steps(solver_orders(config, len(steps)), lambdas),
        alphas_cumprod=alphas_cumprod,
        prediction_type=config.prediction_type,
        solver_type=config.solver_type,
        threshold=(config.dynamic_thresholding_ratio, config.sample_max_value) if config.thresholding else None,
    )


def _custom_timesteps(config: DPMConfig, timesteps: Sequence[int]) -> np.ndarray:
    """Training steps given by hand (diffusers' `timesteps=`): strictly descending, inside the training steps."""
    steps = [int(t) for t in timesteps]
    check_custom_timesteps(steps, config.num_train_timesteps, karras=config.use_karras_sigmas)
    return np.asarray(steps, dtype=np.int64)


def data_prediction(sample: torch.Tensor, model_output: torch.Tensor, alpha_t, sigma_t,
                    prediction_type: PredictionType) -> torch.Tensor:
    """x0 from the model output at a step with VP coefficients (alpha_t, sigma_t): what DPM-Solver++
    integrates (their section 4.1). epsilon: (x - sigma_t eps) / alpha_t; v (Salimans & Ho 2022):
    alpha_t x - sigma_t v; sample: the output itself."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    raise DiffrtError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def thresholded_data_prediction(sample: torch.Tensor, model_output: torch.Tensor, schedule: DPMSchedule, i: int) -> torch.Tensor:
    """The x0 step i integrates: data_prediction, dynamically thresholded when the config asks
    (Saharia et al. 2022; x0 in pixel range, as for pixel models)."""
    x0 = data_prediction(sample, model_output, schedule.alpha_t[i], schedule.sigma_t[i], schedule.prediction_type)
    return dynamic_threshold(x0, *schedule.threshold) if schedule.threshold is not None else x0


def dpm_solver_step(sample: torch.Tensor, x0s: Sequence[torch.Tensor], schedule: DPMSchedule, i: int) -> torch.Tensor:
    """One multistep DPM-Solver++ step i -> i + 1 of order len(x0s) (1, 2 or 3).

    x0s are the data predictions at steps i - k + 1 .. i, oldest first (the caller keeps them and picks
    k <= schedule.orders[i]). With h = lambda_{i+1} - lambda_i and r_j the earlier steps' lambda gaps over h:

        order 1 (DDIM):  x = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0
        order 2:         + midpoint: - alpha_t (e^-h - 1) D1 / 2        (DPM-Solver++(2M), Algorithm 2)
                           heun:     + alpha_t ((e^-h - 1) / h + 1) D1   (DPM-Solver's Taylor form)
        order 3:         + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2

    with D0 = x0_i and D1, D2 the divided differences of the x0s in lambda, scaled by h. The scalar
    coefficients are float32 0-d tensors, computed in the order diffusers computes them."""
    order = len(x0s)
    alpha_t, sigma_t, sigma_s0 = schedule.alpha_t[i + 1], schedule.sigma_t[i + 1], schedule.sigma_t[i]
    lambda_t, lambda_s0 = schedule.lambdas[i + 1], schedule.lambdas[i]
    h = lambda_t - lambda_s0
    m0 = x0s[-1]
    x = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    if order == 1:
        return x
    m1, lambda_s1 = x0s[-2], schedule.lambdas[i - 1]
    r0 = (lambda_s0 - lambda_s1) / h
    if order == 2:
        d1 = (1.0 / r0) * (m0 - m1)
        if schedule.solver_type == "midpoint":
            return x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        return x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
    if order != 3:
        raise ValueError(f"dpm_solver_step takes 1 to 3 data predictions, got {order}")
    m2, lambda_s2 = x0s[-3], schedule.lambdas[i - 2]
    r1 = (lambda_s1 - lambda_s2) / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1 - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2


def add_noise(x0: torch.Tensor, noise: torch.Tensor, schedule: DPMSchedule, i: int = 0) -> torch.Tensor:
    """The forward process to step i: alpha_t x0 + sigma_t noise, at that step's sigma (with Karras sigmas
    not alpha_bar of its rounded timestep), as DPMSolverMultistepScheduler.add_noise after set_begin_index."""
    alpha_t, sigma_t, _ = vp_coefficients(schedule.sigmas[i].to(x0.dtype))
    return alpha_t.to(x0.device) * x0 + sigma_t.to(x0.device) * noise
