"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models") as pure functions over tensors.

The schedule is data: `make_schedule` turns a scheduler config and a step count into the
timesteps and the cumulative alphas each step needs, and `ddim_step` applies Eq. (12) of the
paper to one step. Nothing here keeps state between steps, so the sampler, the fused kernel
and the tests can all call the same functions. The loop (sampling.py) reaches them through the
schedule's and the config's few methods (`DDIMSchedule.step`, `DDIMConfig.make_schedule`, ...), thin
delegations that lcm.py, dpm.py and euler.py define for their schedules alike; so the loop never
asks which sampler it runs. diffusers' `DDIMScheduler` is the test oracle;
we follow its conventions (timestep spacings of Lin et al. 2023, Table 2; `steps_offset`;
`set_alpha_to_one`) so that a diffusers `scheduler_config.json` means the same thing here.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch

from diffrt.errors import DiffrtError

if TYPE_CHECKING:
    from diffrt.runtime.sampling import Guided

log = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
THRESHOLDING_KEYS = frozenset({"thresholding", "dynamic_thresholding_ratio", "sample_max_value"})  # dynamic thresholding (Imagen)
# The diffusers scheduler classes a folder may name that diffrt samples with their own sampler: module, config class.
OWN_SAMPLERS = {
    "LCMScheduler": ("diffrt.runtime.lcm", "LCMConfig"),
    "DPMSolverMultistepScheduler": ("diffrt.runtime.dpm", "DPMConfig"),
    "EulerDiscreteScheduler": ("diffrt.runtime.euler", "EulerConfig"),
    "EulerAncestralDiscreteScheduler": ("diffrt.runtime.euler", "EulerAncestralConfig"),
}
# Schedulers of models trained on another noise process than DDPM's betas (EDM's sigmas, flow matching, VE SDEs,
# consistency models, discrete tokens): read as a beta schedule, their folders would sample pure noise without a word.
OTHER_NOISE_PROCESSES = ("EDM", "FlowMatch", "FlowMap", "CosineDPMSolver", "ScoreSde", "KarrasVe", "CMStochasticIterative", "SCM",
                         "VQDiffusion", "Amused")  # by name: diffusers may stand in for them with a DummyObject


def other_noise_process(scheduler_class: str) -> bool:
    """Whether a scheduler class samples another noise process than a DDPM beta schedule: one of
    OTHER_NOISE_PROCESSES, or a class of the installed diffusers that takes no `beta_schedule` (every beta-schedule
    scheduler does: DDIM, DDPM, PNDM, LMS, Heun, DPM-Solver, UniPC, ...; EDM's, flow matching's, Stable Audio's
    CosineDPMSolverMultistepScheduler do not). A name diffusers does not know, or stands in for (DPMSolverSDEScheduler
    without torchsde), reads as DDIM on its training schedule, as DDIMScheduler.from_config reads it."""
    if scheduler_class.startswith(OTHER_NOISE_PROCESSES):
        return True
    try:
        import diffusers

        cls = getattr(diffusers, scheduler_class, None) if scheduler_class.endswith("Scheduler") else None
    except Exception:  # a broken diffusers install: nothing to tell by
        return False
    if not isinstance(cls, type) or type(cls).__name__ == "DummyObject":  # diffusers' stand-in for a missing extra
        return False
    return "beta_schedule" not in inspect.signature(cls.__init__).parameters


@dataclass(frozen=True)
class DDIMConfig:
    """The subset of diffusers' scheduler config that defines DDIM sampling."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    rescale_betas_zero_snr: bool = False
    # The keys the scheduler config left out, at this class's defaults (diffusers' `_use_default_values`):
    # another sampler made from this config takes its own defaults for them, as `<Other>.from_config` does
    # (SD-1.5's PNDM file has no timestep_spacing: DPMSolverMultistepScheduler.from_config gives "linspace").
    unset: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # The source config's keys this class does not take (PNDM's skip_prk_steps, an Euler file's
    # use_karras_sigmas, DDIM's clip_sample under DPM-Solver++), kept and written back as diffusers keeps
    # them "for compatible classes": `scheduler="dpm"` on a UniPC folder takes its solver_order.
    hidden: dict = field(default_factory=dict, compare=False, repr=False)

    SAMPLER = "DDIM"  # what the pipelines sample this config with
    name = "ddim"  # its `scheduler=` name (sampling.SAMPLERS), as results' metadata reports it
    # and the diffusers class whose from_config it reads as (not dataclass fields: no annotations)
    SCHEDULER_CLASS = "DDIMScheduler"
    FOREIGN_KEYS = ()  # (no annotation: not a field) inherited fields SCHEDULER_CLASS has no key for: read and written as hidden

    @classmethod
    def from_scheduler_config(cls, config: dict, **overrides) -> "DDIMConfig":
        """Read a diffusers scheduler config (any scheduler class) as `<SCHEDULER_CLASS>.from_config`
        does: the keys this sampler takes, its defaults for the rest; `overrides` win over the file's
        values and over its list of left-out keys, as from_config's keyword arguments do.

        Another class's config (SD-1.5 ships PNDMScheduler) gives DDIM on that training schedule, as
        diffusers' `DDIMScheduler.from_config(scheduler.config)` (and DDIMPipeline) do; its own sampler's
        keys (karras sigmas, ...) have no meaning here and are logged. One naming a class of OWN_SAMPLERS
        gives that sampler's config (LCMScheduler an LCMConfig, lcm.py; DPMSolverMultistepScheduler a
        DPMConfig, dpm.py; EulerDiscreteScheduler an EulerConfig, EulerAncestralDiscreteScheduler an
        EulerAncestralConfig, euler.py): DDIMConfigs that the pipelines sample with that sampler, as
        diffusers' pipelines sample such a folder; `sampling.choose_scheduler(config, "ddim")` is DDIM on it."""
        named = config.get("_class_name") or ""
        if other_noise_process(named):
            raise DiffrtError(f"the scheduler config names {named}, whose model was trained on another noise process than a "
                              "DDPM beta schedule (EDM sigmas, flow matching, ...); diffrt's samplers (DDIM, DPM-Solver++, Euler, "
                              "LCM) run beta-schedule models only")
        if cls is DDIMConfig and named in OWN_SAMPLERS:
            module, name = OWN_SAMPLERS[named]  # lcm.py, dpm.py and euler.py build on this module
            return getattr(importlib.import_module(module), name).from_scheduler_config(config, **overrides)
        left_out = set(config.get("_use_default_values") or ())
        config = {k: v for k, v in dict(config).items() if k not in left_out and k != "_use_default_values"}
        config.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)} - {"unset", "hidden"} - set(cls.FOREIGN_KEYS)
        kwargs = {k: v for k, v in config.items() if k in names}
        hidden = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
        other = config.get("_class_name")
        if other not in (None, cls.SCHEDULER_CLASS):
            unused = sorted(k for k in config if k not in names | THRESHOLDING_KEYS and not k.startswith("_"))
            log.info("the scheduler config names %s: diffrt samples with %s on its training schedule, as %s.from_config "
                     "does; not used: %s", other, cls.SAMPLER, cls.SCHEDULER_CLASS, ", ".join(unused) or "nothing")
        check_value_types(cls, kwargs)
        if kwargs.get("trained_betas") is not None:
            betas = kwargs["trained_betas"]
            if not isinstance(betas, (list, tuple)) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
                raise DiffrtError(f"the scheduler config's trained_betas is {str(betas)[:60]}; expected a list of numbers: restore the file")
            kwargs["trained_betas"] = tuple(float(b) for b in betas)
        if "thresholding" not in names and config.get("thresholding"):
            raise DiffrtError(f"dynamic thresholding is not supported by diffrt's {cls.SAMPLER}; set thresholding=false")
        cfg = cls(**kwargs, unset=frozenset(names - set(kwargs)), hidden=hidden)
        if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise DiffrtError(f"unknown prediction_type {cfg.prediction_type!r}; expected epsilon, v_prediction or sample")
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise DiffrtError(f"unknown timestep_spacing {cfg.timestep_spacing!r}; expected leading, trailing or linspace")
        return cfg

    def to_scheduler_config(self) -> dict:
        """The config as diffusers writes it: the hidden keys, this class's keys, and `_use_default_values`
        naming the keys its file left out that still hold this class's default (a value set since, by
        `dataclasses.replace`, is the caller's, not a default)."""
        fields = [f for f in dataclasses.fields(self) if f.name not in ("unset", "hidden") and f.name not in self.FOREIGN_KEYS]
        own = {f.name: getattr(self, f.name) for f in fields}
        own["trained_betas"] = list(self.trained_betas) if self.trained_betas is not None else None
        out = {**self.hidden, **own}
        left = sorted(f.name for f in fields if f.name in self.unset and getattr(self, f.name) == f.default)
        if left:
            out["_use_default_values"] = left
        return out

    def make_schedule(self, num_inference_steps: int, *, timesteps: Sequence[int] | None = None) -> "DDIMSchedule":
        """The schedule this config samples with, N steps or `timesteps` given by hand (each sampler's config
        overrides it). DDIM takes no custom timesteps: diffusers' DDIMScheduler has none either."""
        if timesteps is not None:
            raise DiffrtError("custom timesteps need scheduler='lcm', 'dpm' or 'euler'; DDIM takes num_inference_steps (and timestep_spacing "
                              "in the scheduler config), as diffusers' DDIMScheduler does")
        return make_schedule(self, num_inference_steps)

    def check_eta(self, eta: float) -> None:
        """Refuse an `eta` this config's sampler does not take, in one line: none here, eta is DDIM's (Eq. 16)."""


def check_value_types(cls, values: dict) -> None:
    """A scheduler config's values of the types diffusers writes, each checked against its field's default: a
    hand-edited "num_train_timesteps": "1000" failed deep inside torch (linspace), [1, 2] as the whole file too."""
    for f in dataclasses.fields(cls):
        value, default = values.get(f.name), f.default
        if value is None or default is None or default is dataclasses.MISSING:
            continue  # None: left to the checks of each value (an unknown prediction_type is named there)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise DiffrtError(f"the scheduler config's {f.name} is {value!r}; expected {kind} (as {default!r}): restore the file")


def refuse_eta(eta: float, why: str) -> None:
    """eta is DDIM's (Eq. 16): a sampler that takes none (`why` says what it does instead) refuses it in one
    line, where diffusers' pipelines drop it silently."""
    if eta != 0:
        raise DiffrtError(f"eta {eta:g} is DDIM's; {why}, so leave eta at 0 or use scheduler='ddim'")


def check_custom_timesteps(steps: list, num_train_timesteps: int, example: str = "[999, 666, 333]", *,
                           karras: bool = False) -> None:
    """A schedule given by hand (diffusers' `timesteps=`, for the samplers that take one): at least one
    step, strictly descending (noisiest first), inside the training steps, and not beside Karras sigmas
    (`karras`: the config's use_karras_sigmas, which choose the timesteps themselves; diffusers refuses
    the pair too); one line otherwise."""
    if karras:
        raise DiffrtError("custom timesteps and use_karras_sigmas exclude each other (Karras sigmas choose the timesteps); "
                          "drop one of them")
    if not steps:
        raise DiffrtError(f"timesteps is empty; give at least one training timestep, e.g. {example}")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise DiffrtError(f"timesteps must be strictly descending (noisiest first), got {steps}")
    if steps[-1] < 0 or steps[0] > num_train_timesteps - 1:
        raise DiffrtError(f"timesteps must lie in [0, {num_train_timesteps - 1}] (the model's training steps), got {steps}")


def make_betas(config: DDIMConfig) -> torch.Tensor:
    """beta_1..beta_T in float32, as the model was trained with."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        if len(config.trained_betas) < T:  # diffusers' step() fails with an IndexError at the later timesteps
            raise DiffrtError(f"trained_betas has {len(config.trained_betas)} values but num_train_timesteps is {T}; "
                              "give one beta per training step")
        # The first T: diffusers keeps a longer list whole, but samples and trains (t < num_train_timesteps) on these
        # only; the rest made training draw timesteps that sampling never visits.
        betas = torch.tensor(config.trained_betas[:T], dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        # Cosine schedule of Nichol & Dhariwal 2021, Eq. (17), betas capped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float32
        )
    else:
        raise DiffrtError(f"unknown beta_schedule {config.beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2")
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that the last step has SNR 0.
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    # Grouped as (sqrt_ab - last) * (first / (first - last)) to round as diffusers does: near zero SNR
    # x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) magnifies a last-bit difference in alpha_bar.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_alphas_cumprod(config: DDIMConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), the signal fraction at training step t."""
    return torch.cumprod(1.0 - make_betas(config), dim=0)


def make_timesteps(config: DDIMConfig, num_inference_steps: int) -> torch.Tensor:
    """The training timesteps visited by an N-step sampler, from noisiest to cleanest."""
    T = config.num_train_timesteps
    if not 1 <= num_inference_steps <= T:
        raise DiffrtError(f"num_inference_steps must be in [1, {T}] (the model's training steps), got {num_inference_steps}")
    n = num_inference_steps
    if config.timestep_spacing == "leading":
        return torch.arange(n - 1, -1, -1, dtype=torch.int64) * (T // n) + config.steps_offset
    # linspace and trailing space the steps by a fraction; some land on k + 0.5 give or take the last
    # bit, so the float arithmetic decides the timestep (48 trailing steps of 1000: 936 or 937).
    # diffusers calls numpy's arange (start + i * delta) and linspace (i * step, the end set exactly);
    # torch's fill theirs otherwise, so the same numpy calls make them here.
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, T - 1, n).round()[::-1]
    else:  # trailing
        steps = trailing(T, T, n)
    return torch.from_numpy(steps.astype(np.int64))


def trailing(last: int, T: int, n: int) -> np.ndarray:
    """Lin et al.'s trailing steps from `last` down, by T / n, as diffusers' numpy arange makes them, whole and less
    one; but n of them. The arange's float step leaves a sliver above 0 for 62 counts of 1000 steps (61, 103, 121, ...),
    where diffusers runs an extra step at timestep -1: the UNet is fed -1, and alphas_cumprod[-1] (the noisiest
    alpha_bar) is read for an all but clean image (DDIM's last x0 divides by its square root: the image times ~15 on
    SD-1.5's schedule, ~157 on the linear one)."""
    return (np.arange(last, 0, -T / n).round() - 1)[:n]


def trailing_overruns(T: int, n: int) -> bool:
    """Whether diffusers' trailing arange gives n + 1 timesteps, the last -1 (`trailing`)."""
    return len(np.arange(T, 0, -T / n)) > n


class AlphaBarSchedule:
    """Three of the loop's questions (sampling.Schedule) answered alike by the schedules that step on alpha_bar,
    DDIM's and LCM's: x_T is the unit noise itself (init_noise_sigma 1), img2img noises x0 to the first step's
    alpha_bar (q(x_t | x_0), as both diffusers schedulers' add_noise), and a call keeps nothing between steps."""

    def new_state(self) -> None:
        return None

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, noise, self.alphas_cumprod[self.timesteps[0]])


@dataclass(frozen=True)
class DDIMSchedule(AlphaBarSchedule):
    """Everything the loop needs for N steps: timestep t_i and alpha_bar at t_i and at t_{i-1}."""

    timesteps: torch.Tensor  # int64 [N]
    alpha_bar: torch.Tensor  # float32 [N]
    alpha_bar_prev: torch.Tensor  # float32 [N]
    alphas_cumprod: torch.Tensor  # float32 [T], for noising (img2img) and guidance
    prediction_type: PredictionType
    clip_sample_range: float | None  # None: no clipping of predicted x0

    name = "ddim"  # the sampler, as results' metadata reports it (not a field: no annotation)

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def tail(self, start: int) -> "DDIMSchedule":
        """The steps from `start` on (img2img runs the last ones)."""
        return dataclasses.replace(self, timesteps=self.timesteps[start:], alpha_bar=self.alpha_bar[start:],
                                   alpha_bar_prev=self.alpha_bar_prev[start:])

    # What the loop (sampling.py) asks of a schedule (the rest: AlphaBarSchedule); lcm.py, dpm.py and euler.py answer the same.

    def check(self) -> None:
        """Refuse, before any work, a schedule the model cannot run (check_terminal_snr)."""
        check_terminal_snr(self, ", or steps that skip that timestep (timestep_spacing 'leading')")

    def check_eta(self, eta: float) -> None:
        """As DDIMConfig.check_eta: any eta."""

    def draws_step_noise(self, eta: float) -> bool:
        """Whether `step` draws from the generator: with eta > 0 (sigma_t z of Eq. 12)."""
        return eta > 0

    def predict_clean(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """What guidance scores at step i, differentiable in x: the predicted x0 (Eq. 12)."""
        x0, _ = predict_x0(x, eps, self.alpha_bar[i], self.prediction_type)
        return x0

    def step(self, x: torch.Tensor, guided: "Guided", i: int, *, eta: float, randn_like: Callable[[torch.Tensor], torch.Tensor],
             state: None) -> torch.Tensor:
        """Step i (ddim_step), its noise drawn with randn_like after the prediction, as DDIMScheduler.step draws
        it; with the CFG branches apart (guided.fusable) the fused CFG+step kernel takes them (kernels/)."""
        noise = randn_like(x) if eta > 0 else None
        kwargs = dict(prediction_type=self.prediction_type, clip_sample_range=self.clip_sample_range, eta=eta, noise=noise)
        if guided.fusable:
            from diffrt.kernels import cfg_ddim_step  # Triton on CUDA, the PyTorch reference elsewhere

            x, _ = cfg_ddim_step(x, guided.eps_uncond, guided.eps_cond, guided.scale, float(self.alpha_bar[i]),
                                 float(self.alpha_bar_prev[i]), **kwargs)
        else:
            x, _ = ddim_step(x, guided.eps(), self.alpha_bar[i], self.alpha_bar_prev[i], **kwargs)
        return x


def check_terminal_snr(schedule: "DDIMSchedule", skip: str = "") -> None:
    """Zero terminal SNR, refused in one line before any work: an epsilon model's x0 = (x_t - sqrt(1 - ab) eps)
    / sqrt(ab) divides by zero at an alpha_bar-0 step, where diffusers' DDIM returns NaN images; refused here
    rather than reported later as a NaN in the VAE. `skip`: the message's way out besides v-prediction.
    (Also LCM's; DPM-Solver++ and the Eulers have none: their last alpha_bar is 2^-24, as diffusers',
    dpm.make_dpm_alphas_cumprod.)"""
    if schedule.prediction_type == "epsilon" and bool((schedule.alpha_bar == 0).any()):
        t = int(schedule.timesteps[schedule.alpha_bar == 0][0])
        raise DiffrtError(f"alpha_bar is 0 at timestep {t} (zero terminal SNR: rescale_betas_zero_snr), where an epsilon-"
                          "prediction model cannot give x0 (diffusers returns NaN images); use a v_prediction model "
                          f"(Lin et al. 2023){skip}")


def make_schedule(config: DDIMConfig, num_inference_steps: int) -> DDIMSchedule:
    alphas_cumprod = make_alphas_cumprod(config)
    timesteps = make_timesteps(config, num_inference_steps)
    T = config.num_train_timesteps
    if timesteps.max() >= T:  # diffusers' step() fails on it with an IndexError
        raise DiffrtError(f"steps_offset {config.steps_offset} with {num_inference_steps} leading steps starts at "
                          f"timestep {int(timesteps.max())}, past the model's last training step {T - 1}; "
                          "use fewer steps or steps_offset 0")
    # diffusers steps back by T // N whatever the spacing; the final step lands on alpha_bar = 1
    # (set_alpha_to_one) or on alpha_bar_0.
    prev = timesteps - config.num_train_timesteps // num_inference_steps
    final = torch.tensor(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    alpha_bar_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    return DDIMSchedule(
        timesteps=timesteps,
        alpha_bar=alphas_cumprod[timesteps],
        alpha_bar_prev=alpha_bar_prev,
        alphas_cumprod=alphas_cumprod,
        prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
    )


def predict_x0(
    sample: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor | float, prediction_type: PredictionType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x0, eps) from the model output at a step with signal fraction alpha_bar (Eq. 12, "predicted x0")."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=sample.dtype, device=sample.device)
    sqrt_ab, sqrt_1m_ab = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (sample - sqrt_1m_ab * model_output) / sqrt_ab, model_output
    if prediction_type == "v_prediction":
        # Salimans & Ho 2022: v = sqrt(ab) eps - sqrt(1 - ab) x0.
        return sqrt_ab * sample - sqrt_1m_ab * model_output, sqrt_ab * model_output + sqrt_1m_ab * sample
    if prediction_type == "sample":
        return model_output, (sample - sqrt_ab * model_output) / sqrt_1m_ab
    raise DiffrtError(f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample")


def ddim_sigma(alpha_bar: torch.Tensor | float, alpha_bar_prev: torch.Tensor | float, eta: float) -> torch.Tensor:
    """sigma_t(eta) of Eq. (16): eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)."""
    alpha_bar, alpha_bar_prev = torch.as_tensor(alpha_bar), torch.as_tensor(alpha_bar_prev)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    if eta == 0:  # exactly 0, also where the variance is negative (alpha_bar > alpha_bar_prev: an inversion step)
        return torch.zeros_like(variance)
    return eta * variance.sqrt()


def check_eta_range(eta: float) -> None:
    """eta outside [0, 1] makes sigma_t^2 exceed 1 - alpha_bar_prev (Eq. 16): the direction's variance is
    negative. Refused in one line by both step paths (the pipelines refuse it earlier, check_number)."""
    if not 0.0 <= eta <= 1.0:
        raise DiffrtError(f"eta {eta!r} is outside [0, 1], where DDIM's sigma^2 exceeds 1 - alpha_bar_prev; "
                          "use eta between 0 (deterministic) and 1 (DDPM's noise)")


def ddim_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    alpha_bar_prev: torch.Tensor | float,
    *,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t-1} (Eq. 12). Returns (x_prev, x0).

    `noise` is the standard normal draw for the stochastic part and is required when eta > 0;
    the caller draws it, so that seeding stays in the caller's hands.
    """
    check_eta_range(eta)
    x0, eps = predict_x0(sample, model_output, alpha_bar, prediction_type)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=sample.dtype, device=sample.device)
    alpha_bar_prev = torch.as_tensor(alpha_bar_prev, dtype=sample.dtype, device=sample.device)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
    if use_clipped_model_output:
        # Re-derive eps from the clipped x0 (as in GLIDE) so direction and x0 agree.
        eps = (sample - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    # "direction pointing to x_t" and the deterministic part of x_{t-1}. Its variance is >= 0 for eta in
    # [0, 1], and exactly 0 at eta 1 on a zero-terminal-SNR step (alpha_bar 0), where it rounds to -6e-8:
    # clamped, or its square root is NaN (as in diffusers).
    direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0 + direction * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step needs `noise` when eta > 0")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) = N(sqrt(ab) x0, (1 - ab) I); alpha_bar broadcasts over the batch."""
    alpha_bar = alpha_bar.to(dtype=x0.dtype, device=x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
