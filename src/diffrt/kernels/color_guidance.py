"""Colour guidance with its analytic gradient: x_t <- x_t - scale * d color_loss / d x_t.

`diffrt.runtime.guidance` takes this gradient with autograd in mode "x0": the model output is
held constant and the loss sees x0(x_t) of DDIM Eq. (12), mapped from [-1, 1] to [0, 1]. For
`color_loss` that gradient has a closed form, so no graph is needed. With img = x0 / 2 + 1/2 and
loss = sum_b mean_{c,h,w} |img - target[b, c]|,

    d loss / d x_t = sign(img - target[b, c]) / (C H W) * 1/2 * d x0 / d x_t,

where d x0 / d x_t is 1 / sqrt(alpha_bar) for epsilon prediction and sqrt(alpha_bar) for
v-prediction (Salimans & Ho 2022, x0 = sqrt(ab) x_t - sqrt(1 - ab) v). sign(0) = 0, as in the
autograd of abs. Under prediction_type="sample" x0 does not depend on x_t, so that is refused.

Both functions also return x0 as predicted at the unguided x_t (the point where the gradient is
taken), which the sampler can show as a preview without recomputing it.
"""

from __future__ import annotations

import torch

from diffrt.kernels import launch
from diffrt.kernels.cfg_ddim import prediction_coefficients
from diffrt.runtime import ddim
from diffrt.runtime.ddim import PredictionType

try:
    import triton.language as tl
except ImportError:  # the reference path needs no Triton; the kernel body is only decorated on use
    tl = None


def _per_image_target(target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """target [C] or [B, C] -> float32 [B, C], one colour per image."""
    batch, channels = x.shape[0], x.shape[1]
    if target.shape not in ((channels,), (1, channels), (batch, channels)):
        raise ValueError(f"target has shape {tuple(target.shape)}; expected [{channels}] or [{batch}, {channels}] for x of shape {tuple(x.shape)}")
    return target.to(device=x.device, dtype=torch.float32).reshape(-1, channels).expand(batch, channels)


def _gradient_step(x: torch.Tensor, alpha_bar: float, prediction_type: PredictionType, scale: float) -> float:
    """scale * 1/2 * dx0/dx_t / (C H W): the size of each element's move, before its sign."""
    if x.dim() != 4:
        raise ValueError(f"colour guidance needs images [B, C, H, W]; got shape {tuple(x.shape)}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"colour guidance supports prediction_type 'epsilon' or 'v_prediction', got {prediction_type!r}")
    dx0_dx = prediction_coefficients(float(alpha_bar), prediction_type).x0_from_sample
    return float(scale) * 0.5 * dx0_dx / (x.shape[1] * x.shape[2] * x.shape[3])


def color_guidance_step_reference(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar: float,
    target: torch.Tensor,
    scale: float,
    *,
    prediction_type: PredictionType = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form gradient step in PyTorch, computed in float32. Returns (x_guided, x0)."""
    step = _gradient_step(x, alpha_bar, prediction_type, scale)
    target = _per_image_target(target, x)[:, :, None, None]
    # float32 throughout: in fp16, img - target rounds to zero (and flips sign) near the target.
    x32 = x.float()
    x0, _ = ddim.predict_x0(x32, model_output.float(), float(alpha_bar), prediction_type)
    x_guided = x32 - step * torch.sign(x0 / 2 + 0.5 - target)
    return x_guided.to(x.dtype), x0.to(x.dtype)


def _color_guidance_kernel(
    x_ptr, output_ptr, target_ptr, x_guided_ptr, x0_ptr, n_elements, plane_size,
    x0_from_sample, x0_from_output, step,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    # 64-bit offsets: in int32, program 2**31 / BLOCK_SIZE wraps negative and reads and writes before the buffers.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    output = tl.load(output_ptr + offsets, mask=mask).to(tl.float32)
    # Contiguous [B, C, H, W]: offset // (H W) = b C + c, the row of the [B, C] target table.
    target = tl.load(target_ptr + offsets // plane_size, mask=mask)
    x0 = x0_from_sample * x + x0_from_output * output
    diff = x0 * 0.5 + 0.5 - target
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    tl.store(x_guided_ptr + offsets, (x - step * sign).to(x_guided_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offsets, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def color_guidance_step_triton(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar: float,
    target: torch.Tensor,
    scale: float,
    *,
    prediction_type: PredictionType = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel; same arguments and results as `color_guidance_step_reference`.

    CPU tensors run in Triton's interpreter (for tests); CUDA tensors run compiled.
    """
    launch.check_same_shape("x", x, model_output=model_output)
    step = _gradient_step(x, alpha_bar, prediction_type, scale)
    coef = prediction_coefficients(float(alpha_bar), prediction_type)
    target = _per_image_target(target, x).contiguous()
    x_in, output_in = x.contiguous(), model_output.contiguous()
    x_guided, x0 = torch.empty_like(x_in), torch.empty_like(x_in)
    n_elements = x_in.numel()
    if n_elements == 0:
        return x_guided, x0
    kernel = launch.jit_kernel(_color_guidance_kernel, interpret=launch.needs_interpreter(x))
    with launch.on_device(x):
        kernel[launch.launch_grid(n_elements)](
            x_in, output_in, target, x_guided, x0, n_elements, x.shape[2] * x.shape[3],
            coef.x0_from_sample, coef.x0_from_output, step,
            BLOCK_SIZE=launch.BLOCK_SIZE, **launch.LAUNCH_OPTIONS,
        )  # fmt: skip
    return x_guided, x0


def color_guidance_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar: float,
    target: torch.Tensor,
    scale: float,
    *,
    prediction_type: PredictionType = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move x_t one gradient step toward a colour. Returns (x_guided, x0 at the unguided x_t).

    x, model_output: [B, C, H, W] in model space ([-1, 1] images); model_output is eps or v per
    `prediction_type` and is held constant. target: [C] or [B, C] colours in [0, 1]. The result
    equals `x - scale * grad` with grad the autograd of `guidance.color_loss(x0 / 2 + 0.5, target)`.
    """
    step = color_guidance_step_triton if launch.should_use_triton(x, model_output) else color_guidance_step_reference
    return step(x, model_output, alpha_bar, target, scale, prediction_type=prediction_type)
