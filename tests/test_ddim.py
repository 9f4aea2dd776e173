"""DDIM as pure functions must agree with diffusers' DDIMScheduler (the oracle) for every config."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffrt.errors import DiffrtError
from diffrt.runtime import ddim

# Every value of every axis is covered; the boolean axes rotate with the index so that the
# 18 (schedule, spacing, prediction) combinations each meet a different mix of them.
CONFIGS = [
    dict(beta_schedule=b, timestep_spacing=s, prediction_type=p, clip_sample=bool(i & 1),
         set_alpha_to_one=bool(i & 2), steps_offset=(i >> 2) & 1)
    for i, (b, s, p) in enumerate(itertools.product(
        ["linear", "scaled_linear", "squaredcos_cap_v2"], ["leading", "trailing", "linspace"], ["epsilon", "v_prediction"]))
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_loop_matches_diffusers(cfg, eta):
    steps = 10
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, **cfg)
    ref.set_timesteps(steps)
    ours_cfg = ddim.DDIMConfig.from_scheduler_config(dict(ref.config))
    schedule = ddim.make_schedule(ours_cfg, steps)
    assert torch.equal(schedule.timesteps, ref.timesteps)

    # A fake but deterministic "model": any function of (x, t) exercises the update.
    def model(x, t):
        return torch.sin(x * 3 + float(t) / 100)

    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ours = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        out = ref.step(model(x_ref, t), t, x_ref, eta=eta, generator=g_ref)
        x_ref = out.prev_sample
        noise = torch.randn(x_ours.shape, generator=g_ours) if eta > 0 else None
        x_ours, x0 = ddim.ddim_step(x_ours, model(x_ours, t), schedule.alpha_bar[i], schedule.alpha_bar_prev[i],
                                    prediction_type=schedule.prediction_type, clip_sample_range=schedule.clip_sample_range,
                                    eta=eta, noise=noise)
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(steps)
    ours = ddim.make_timesteps(ddim.DDIMConfig.from_scheduler_config(dict(ref.config)), steps)
    assert torch.equal(ours, ref.timesteps)


def test_trailing_spacing_runs_the_steps_asked_for_and_never_timestep_minus_1():
    """From the samplers review: diffusers' trailing arange gives N + 1 timesteps for 62 counts of 1000 (61, 103, 121, ...),
    the last one -1, which reads alphas_cumprod[-1] (the noisiest alpha_bar) for an all but clean image: DDIM's last x0
    is the image times ~15 (SD-1.5's schedule) to ~157 (the linear one). diffrt runs the N asked for, diffusers' first N, for DDIM, DPM-Solver++ and Euler alike."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from diffrt.runtime import dpm, euler

    makers = [(DDIMScheduler, lambda config, n: ddim.make_timesteps(config, n).numpy()),
              (DPMSolverMultistepScheduler, lambda config, n: dpm.make_dpm_timesteps(config, n, dpm.make_dpm_alphas_cumprod(config))),
              (EulerDiscreteScheduler, lambda config, n: euler.make_euler_timesteps(config, n))]
    wrapped = set()
    for cls, make in makers:
        ref = cls(timestep_spacing="trailing")
        config = ddim.DDIMConfig.from_scheduler_config({"_class_name": cls.__name__, **dict(ref.config)})
        for n in range(1, 1001):
            ref.set_timesteps(n)
            ours = make(config, n)
            assert len(ours) == n and ours.min() >= 0, (cls.__name__, n)
            assert np.array_equal(ours, ref.timesteps.numpy()[:n]), (cls.__name__, n)
            if len(ref.timesteps) > n:
                wrapped.add(n)
    assert {61, 103, 121} <= wrapped and len(wrapped) == 62  # the counts where diffusers steps at -1
    # The DDIM schedule at one of them ends at timestep 15 and its alpha_bar, not at alphas_cumprod[-1].
    schedule = ddim.make_schedule(ddim.DDIMConfig(timestep_spacing="trailing"), 61)
    alphas_cumprod = ddim.make_alphas_cumprod(ddim.DDIMConfig())
    assert int(schedule.timesteps[-1]) == 15 and float(schedule.alpha_bar[-1]) == float(alphas_cumprod[15])


def test_rescaled_zero_snr_matches_diffusers():
    ref = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ours = ddim.make_alphas_cumprod(ddim.DDIMConfig.from_scheduler_config(dict(ref.config)))
    torch.testing.assert_close(ours, ref.alphas_cumprod)
    assert ours[-1] < 1e-6  # zero terminal SNR


def test_use_clipped_model_output_matches_diffusers():
    ref = DDIMScheduler(clip_sample=True, clip_sample_range=0.5)
    ref.set_timesteps(5)
    schedule = ddim.make_schedule(ddim.DDIMConfig.from_scheduler_config(dict(ref.config)), 5)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2
    eps = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    t = ref.timesteps[2]
    want = ref.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    got, _ = ddim.ddim_step(x, eps, schedule.alpha_bar[2], schedule.alpha_bar_prev[2], clip_sample_range=0.5,
                            use_clipped_model_output=True)
    torch.testing.assert_close(got, want)


def test_bad_configs_are_refused():
    with pytest.raises(DiffrtError, match="num_inference_steps"):
        ddim.make_timesteps(ddim.DDIMConfig(), 0)
    with pytest.raises(DiffrtError, match="thresholding"):
        ddim.DDIMConfig.from_scheduler_config({"thresholding": True})
    with pytest.raises(DiffrtError, match="prediction_type"):
        ddim.DDIMConfig.from_scheduler_config({"prediction_type": "x"})
    with pytest.raises(ValueError, match="noise"):
        ddim.ddim_step(torch.zeros(1), torch.zeros(1), 0.5, 0.6, eta=0.5)
