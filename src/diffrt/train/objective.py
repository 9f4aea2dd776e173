"""The DDPM training objective (Ho et al. 2020, Algorithm 1): noise a clean sample to a random
timestep with q(x_t | x_0) and regress the model's prediction on the noise (or on v, or on x0).

An x0 ("sample") prediction's error is weighted by the timestep's SNR, alpha_bar / (1 - alpha_bar),
as diffusers' train_unconditional.py weighs it: that makes it the epsilon loss of the same
prediction (x0 - x0_hat = sqrt(1 - alpha_bar) / sqrt(alpha_bar) * (eps_hat - eps)), where a plain
MSE on x0 would let the low-noise timesteps, where x0 is nearly given, count for almost nothing."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from diffrt.runtime.ddim import PredictionType, add_noise

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> prediction


def diffusion_loss(model_fn: ModelFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
                   prediction_type: PredictionType = "epsilon", weights: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the model output and its target at uniformly drawn timesteps (or at `timesteps` [B]).

    With `weights` [B] the result is sum_i weights_i * MSE_i over the samples instead of the mean:
    DreamBooth's prior preservation weighs the instance and class halves of one batch this way.
    """
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (b,), generator=generator) if timesteps is None else timesteps
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    alpha_bar = alphas_cumprod[t].to(x0.device)
    x_t = add_noise(x0, noise, alpha_bar)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        ab = alpha_bar.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    else:
        target = x0
    pred = model_fn(x_t, t.to(x0.device))
    if weights is None and prediction_type != "sample":
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if prediction_type == "sample":
        snr = alpha_bar.float() / (1 - alpha_bar.float())
        per_sample = snr.to(per_sample) * per_sample
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample) * per_sample).sum()


@torch.no_grad()
def evaluation_loss(model_fn: ModelFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                    prediction_type: PredictionType = "epsilon", num_timesteps: int = 10, seed: int = 0) -> float:
    """The loss of every sample at `num_timesteps` evenly spaced timesteps, with noise from `seed`.

    The draws are the same on every call, so this compares one model before and after training.
    The training loss cannot: each step draws its own timesteps and noise, and on a few images the
    spread of those draws can hide a gain of a few % (benchmarks/results/train_cpu.json: DreamBooth's
    last training loss above its first while this loss falls).
    """
    g = torch.Generator().manual_seed(seed)
    n = alphas_cumprod.numel()
    losses = [diffusion_loss(model_fn, x0, alphas_cumprod, g, prediction_type, timesteps=torch.full((x0.shape[0],), t))
              for t in ((torch.arange(num_timesteps) + 0.5) * n / num_timesteps).long().tolist()]
    return torch.stack(losses).mean().item()
