"""Classifier-free guidance and one DDIM step fused into a single pass over the latents.

Unfused, a guided DDIM step is about ten elementwise PyTorch kernels (the CFG combine of Ho &
Salimans 2022, x0 and eps from the model output, the clip, Eq. (12) and the noise of Eq. (16)),
each reading and writing the whole latent. At SD-1.5 size that is launch-bound; the fused kernel
reads sample, both model outputs and the noise once and writes x_{t-1} and x0 once.

`cfg_ddim_step_reference` defines the result: it combines the two outputs and calls
`diffrt.runtime.ddim.ddim_step`. `cfg_ddim_step_triton` computes the same in float32 and stores
in the sample's dtype. `cfg_ddim_step` picks one by the rule in `diffrt.kernels.launch`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from diffrt.kernels import launch
from diffrt.runtime import ddim
from diffrt.runtime.ddim import PredictionType

try:
    import triton.language as tl
except ImportError:  # the reference path needs no Triton; the kernel body is only decorated on use
    tl = None


@dataclass(frozen=True)
class PredictionCoefficients:
    """x0 and eps as linear functions of (x_t, model output) at one alpha_bar (Eq. 12)."""

    x0_from_sample: float
    x0_from_output: float
    eps_from_sample: float
    eps_from_output: float


def prediction_coefficients(alpha_bar: float, prediction_type: PredictionType) -> PredictionCoefficients:
    """Read the coefficients off `ddim.predict_x0`, in float64.

    predict_x0 is linear in (sample, model_output), so evaluating it on the two unit vectors
    gives its coefficients exactly; the kernels then cannot drift from the reference's formulas.
    The ends of [0, 1] are taken where the prediction is defined there: v-prediction at a zero
    terminal SNR step (alpha_bar 0: x0 = -v, eps = x_t), refused where it divides by zero.
    """
    if not 0.0 <= alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must lie in [0, 1], got {alpha_bar}")
    unit = torch.eye(2, dtype=torch.float64)
    x0, eps = ddim.predict_x0(unit[0], unit[1], alpha_bar, prediction_type)
    coefficients = PredictionCoefficients(float(x0[0]), float(x0[1]), float(eps[0]), float(eps[1]))
    if not all(map(math.isfinite, dataclasses.astuple(coefficients))):
        raise ValueError(f"{prediction_type} prediction divides by zero at alpha_bar {alpha_bar}")
    return coefficients


def cfg_ddim_step_reference(
    sample: torch.Tensor,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    guidance_scale: float,
    alpha_bar: float,
    alpha_bar_prev: float,
    *,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused PyTorch: combine the outputs (same formula for eps, v or x0), then `ddim.ddim_step`."""
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return ddim.ddim_step(
        sample,
        guided,
        alpha_bar,
        alpha_bar_prev,
        prediction_type=prediction_type,
        clip_sample_range=clip_sample_range,
        eta=eta,
        noise=noise,
    )


def _cfg_ddim_kernel(
    sample_ptr, uncond_ptr, cond_ptr, noise_ptr, x_prev_ptr, x0_ptr, n_elements,
    guidance_scale, x0_from_sample, x0_from_output, eps_from_sample, eps_from_output,
    clip_range, x0_weight, eps_weight, sigma,
    HAS_NOISE: tl.constexpr, CLIP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # 64-bit offsets: in int32, program 2**31 / BLOCK_SIZE wraps negative and reads and writes before the buffers.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # Everything is upcast once: fp16/bf16 latents lose too much in the 1/sqrt(alpha_bar) of x0.
    x = tl.load(sample_ptr + offsets, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + offsets, mask=mask).to(tl.float32)
    cond = tl.load(cond_ptr + offsets, mask=mask).to(tl.float32)
    output = uncond + guidance_scale * (cond - uncond)
    x0 = x0_from_sample * x + x0_from_output * output
    eps = eps_from_sample * x + eps_from_output * output
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    # Eq. (12): sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z.
    x_prev = x0_weight * x0 + eps_weight * eps
    if HAS_NOISE:
        x_prev += sigma * tl.load(noise_ptr + offsets, mask=mask).to(tl.float32)
    tl.store(x_prev_ptr + offsets, x_prev.to(x_prev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def cfg_ddim_step_triton(
    sample: torch.Tensor,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    guidance_scale: float,
    alpha_bar: float,
    alpha_bar_prev: float,
    *,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel; same arguments and results as `cfg_ddim_step_reference`.

    CPU tensors run in Triton's interpreter (for tests); CUDA tensors run compiled.
    """
    launch.check_same_shape("sample", sample, eps_uncond=eps_uncond, eps_cond=eps_cond, noise=noise)
    ddim.check_eta_range(eta)
    if eta > 0 and noise is None:
        raise ValueError("cfg_ddim_step needs `noise` when eta > 0")
    alpha_bar, alpha_bar_prev = float(alpha_bar), float(alpha_bar_prev)
    if not 0.0 < alpha_bar_prev <= 1.0:
        raise ValueError(f"alpha_bar_prev must lie in (0, 1], got {alpha_bar_prev}")
    coef = prediction_coefficients(alpha_bar, prediction_type)
    # Eq. (16) in float64 on the host; the kernel gets the rounded float32 weights.
    f64 = torch.float64
    sigma = float(ddim.ddim_sigma(torch.tensor(alpha_bar, dtype=f64), torch.tensor(alpha_bar_prev, dtype=f64), eta))
    # >= 0 for eta in [0, 1]; exactly 0 at eta 1 on a zero-terminal-SNR step, where it may round below 0.
    eps_weight = max(1.0 - alpha_bar_prev - sigma**2, 0.0) ** 0.5
    use_noise = eta > 0

    inputs = [t.contiguous() for t in (sample, eps_uncond, eps_cond)]
    noise_in = noise.contiguous() if use_noise else inputs[0]  # placeholder pointer, never read
    x_prev, x0 = torch.empty_like(inputs[0]), torch.empty_like(inputs[0])
    n_elements = inputs[0].numel()
    if n_elements == 0:
        return x_prev, x0
    kernel = launch.jit_kernel(_cfg_ddim_kernel, interpret=launch.needs_interpreter(sample))
    with launch.on_device(sample):
        kernel[launch.launch_grid(n_elements)](
            *inputs, noise_in, x_prev, x0, n_elements,
            float(guidance_scale), coef.x0_from_sample, coef.x0_from_output, coef.eps_from_sample, coef.eps_from_output,
            float(clip_sample_range or 0.0), alpha_bar_prev**0.5, eps_weight, sigma,
            HAS_NOISE=use_noise, CLIP=clip_sample_range is not None, BLOCK_SIZE=launch.BLOCK_SIZE, **launch.LAUNCH_OPTIONS,
        )  # fmt: skip
    return x_prev, x0


def cfg_ddim_step(
    sample: torch.Tensor,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    guidance_scale: float,
    alpha_bar: float,
    alpha_bar_prev: float,
    *,
    prediction_type: PredictionType = "epsilon",
    clip_sample_range: float | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance then DDIM x_t -> x_{t-1} (Eq. 12, sigma of Eq. 16). Returns (x_prev, x0).

    `eps_uncond`/`eps_cond` are the model's outputs without and with the condition, in its
    parameterisation (`prediction_type`); the combine `u + g (c - u)` is applied to them as they
    are. `noise` is the standard normal draw, required when eta > 0. x0 is clipped to
    +-clip_sample_range when that is given.
    """
    step = cfg_ddim_step_triton if launch.should_use_triton(sample, eps_uncond, eps_cond, noise) else cfg_ddim_step_reference
    return step(
        sample,
        eps_uncond,
        eps_cond,
        guidance_scale,
        alpha_bar,
        alpha_bar_prev,
        prediction_type=prediction_type,
        clip_sample_range=clip_sample_range,
        eta=eta,
        noise=noise,
    )
