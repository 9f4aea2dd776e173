"""The training objective's options against diffusers' training scripts: Min-SNR-gamma weighting (the weights
diffusers' train_text_to_image.py computes with its compute_snr) and offset noise."""

from __future__ import annotations

import pytest
import torch

from diffrt.train.objective import diffusion_loss

TIMESTEPS = torch.tensor([0, 10, 250, 500, 750, 999])


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def predict_half(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x_t  # any fixed prediction: the loss of each sample differs with its timestep


def per_sample_losses(x0, alphas_cumprod, prediction_type) -> torch.Tensor:
    """Each sample's own unweighted MSE, with the draws of seed 0 (a one-hot `weights` picks one sample out)."""
    n = x0.shape[0]
    return torch.stack([
        diffusion_loss(predict_half, x0, alphas_cumprod, torch.Generator().manual_seed(0), prediction_type,
                       weights=torch.eye(n)[i], timesteps=TIMESTEPS)
        for i in range(n)])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_as_diffusers_scripts_do(scheduler, prediction_type):
    from diffusers.training_utils import compute_snr

    gamma = 5.0
    x0 = torch.randn(len(TIMESTEPS), 3, 4, 4, generator=torch.Generator().manual_seed(1))
    mse = per_sample_losses(x0, scheduler.alphas_cumprod, prediction_type)
    if prediction_type == "epsilon":  # the plain loss is the mean of the same per-sample losses
        plain = diffusion_loss(predict_half, x0, scheduler.alphas_cumprod, torch.Generator().manual_seed(0), prediction_type,
                               timesteps=TIMESTEPS)
        torch.testing.assert_close(plain, mse.mean())
    # diffusers' train_text_to_image.py: min(SNR, gamma), divided by SNR for epsilon and by SNR + 1 for v.
    snr = compute_snr(scheduler, TIMESTEPS)
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / (snr if prediction_type == "epsilon" else snr + 1)
    got = diffusion_loss(predict_half, x0, scheduler.alphas_cumprod, torch.Generator().manual_seed(0), prediction_type,
                         timesteps=TIMESTEPS, snr_gamma=gamma)
    torch.testing.assert_close(got, (weights * mse).mean())
    assert weights[0] < 0.01 < 0.25 < weights[2]  # the nearly clean sample was weighed down, far more than one at t = 250


def test_min_snr_on_an_x0_prediction_caps_its_snr_weight(scheduler):
    """An x0 loss is weighed by the SNR (the epsilon loss of the same prediction); Min-SNR caps that weight at gamma."""
    from diffusers.training_utils import compute_snr

    x0 = torch.randn(len(TIMESTEPS), 3, 4, 4, generator=torch.Generator().manual_seed(1))
    mse = per_sample_losses(x0, scheduler.alphas_cumprod, "sample")  # each already times its SNR
    snr = compute_snr(scheduler, TIMESTEPS)
    got = diffusion_loss(predict_half, x0, scheduler.alphas_cumprod, torch.Generator().manual_seed(0), "sample",
                         timesteps=TIMESTEPS, snr_gamma=2.0)
    torch.testing.assert_close(got, (mse / snr * snr.clamp(max=2.0)).mean(), rtol=1e-5, atol=1e-6)


def test_min_snr_at_a_zero_terminal_snr_step_is_finite():
    """A zero-terminal-SNR schedule's last step has SNR 0: min(SNR, gamma) / SNR is 0 / 0 there. Its limit, 1, is the
    weight (diffusers' scripts patch the NaN to 1 the same way); a NaN would have poisoned every step drawing it."""
    alphas_cumprod = torch.linspace(0.99, 0.0, 1000)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    last = torch.tensor([999, 999])
    plain = diffusion_loss(predict_half, x0, alphas_cumprod, torch.Generator().manual_seed(0), timesteps=last)
    weighted = diffusion_loss(predict_half, x0, alphas_cumprod, torch.Generator().manual_seed(0), timesteps=last, snr_gamma=5.0)
    assert torch.isfinite(weighted)
    torch.testing.assert_close(weighted, plain)


def test_noise_offset_shifts_each_sample_and_channel_by_one_draw():
    """x0 = 0 and epsilon: the model sees x_t = sqrt(1 - alpha_bar) * noise, so the noise can be read back from x_t."""
    alphas_cumprod = torch.full((1000,), 0.5)
    x0 = torch.zeros(64, 4, 3, 3)
    seen = {}

    def noise_seen(offset: float) -> torch.Tensor:
        def model_fn(x_t, t):
            seen[offset] = x_t / 0.5**0.5
            return torch.zeros_like(x_t)

        diffusion_loss(model_fn, x0, alphas_cumprod, torch.Generator().manual_seed(0), noise_offset=offset)
        return seen[offset]

    shift = (noise_seen(0.1) - noise_seen(0.0)) / 0.1  # the same first draw: only the offset differs
    per_channel = shift[:, :, :1, :1]
    torch.testing.assert_close(shift, per_channel.expand_as(shift))  # constant over each image's pixels
    assert per_channel.std().item() == pytest.approx(1.0, abs=0.15)  # a standard normal draw per sample and channel
    assert len(set(per_channel.flatten().tolist())) == per_channel.numel()  # one draw each, not one shared
