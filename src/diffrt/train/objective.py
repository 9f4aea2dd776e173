"""The DDPM training objective (Ho et al. 2020, Algorithm 1): noise a clean sample to a random
timestep with q(x_t | x_0) and regress the model's prediction on the noise (or on v, or on x0).

An x0 ("sample") prediction's error is weighted by the timestep's SNR, alpha_bar / (1 - alpha_bar),
as diffusers' train_unconditional.py weighs it: that makes it the epsilon loss of the same
prediction (x0 - x0_hat = sqrt(1 - alpha_bar) / sqrt(alpha_bar) * (eps_hat - eps)), where a plain
MSE on x0 would let the low-noise timesteps, where x0 is nearly given, count for almost nothing.

Min-SNR weighting (`snr_gamma`, Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy") caps that SNR weight of the x0 error at gamma: the nearly clean timesteps, whose easy
targets otherwise dominate the gradient, stop crowding out the rest. Written as the weight on each
prediction's own loss: min(SNR, gamma) / SNR for epsilon (1 where SNR = 0, a zero-terminal-SNR
schedule's last step, which is the limit), min(SNR, gamma) / (SNR + 1) for v (its error is the
epsilon error times (SNR + 1) / SNR; 0 at that last step, as in diffusers: Min-SNR does not train the one step a
zero-terminal-SNR schedule adds), min(SNR, gamma) for x0 (in place of SNR), as diffusers'
train_text_to_image.py weighs them. (Its DreamBooth scripts weigh v by min(SNR, gamma) / SNR + 1
and leave the prior-preservation half unweighted; here both halves of a DreamBooth batch take the
same weights, so that --prior-loss-weight keeps its meaning.)

Offset noise (`noise_offset`, Guttenberg 2023) adds to the noise one normal draw per sample and
channel, times the offset: the model also learns to move a whole image's mean, which plain noise,
independent per pixel, almost never asks of it, so very dark and very bright images become
reachable. diffusers' scripts add it the same way."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from diffrt.runtime.ddim import PredictionType, add_noise

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> prediction


def diffusion_loss(model_fn: ModelFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, generator: torch.Generator,
                   prediction_type: PredictionType = "epsilon", weights: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None, snr_gamma: float | None = None,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """MSE between the model output and its target at uniformly drawn timesteps (or at `timesteps` [B]).

    With `weights` [B] the result is sum_i weights_i * MSE_i over the samples instead of the mean:
    DreamBooth's prior preservation weighs the instance and class halves of one batch this way.
    `snr_gamma` and `noise_offset`: see the module docstring (None and 0: off, and no extra draw).
    """
    b = x0.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (b,), generator=generator) if timesteps is None else timesteps
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, x0.shape[1], *([1] * (x0.dim() - 2))), generator=generator)
    noise = noise.to(x0.device, x0.dtype)
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
    if weights is None and prediction_type != "sample" and snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    snr = (alpha_bar.float() / (1 - alpha_bar.float())).to(per_sample)
    if snr_gamma is not None:
        per_sample = min_snr_weight(snr, snr_gamma, prediction_type) * per_sample
    elif prediction_type == "sample":
        per_sample = snr * per_sample
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample) * per_sample).sum()


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """The Min-SNR-gamma weight of each sample's loss for its prediction type (see the module docstring)."""
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR; gamma / 0 = inf -> 1 at SNR 0
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma)


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
