"""DPM-Solver++ multistep sampling (runtime/dpm.py) against diffusers' DPMSolverMultistepScheduler, the oracle.

Pure functions: the timesteps and sigmas of set_timesteps (every timestep_spacing, Karras sigmas, both
final sigmas, the beta schedules, step counts from 1 up, custom timesteps), and the loop (orders 1-3,
midpoint and heun, the prediction types, thresholding, lower_order_final and euler_at_final, zero
terminal SNR), step by step against DPMSolverMultistepScheduler.step driven by hand, including which
order it takes at each step. Whole images: a Stable Diffusion folder whose scheduler is
DPMSolverMultistepScheduler equals StableDiffusionPipeline, its img2img and ControlNet pipelines;
`scheduler="dpm"` on a DDIM folder equals diffusers after `pipe.scheduler =
DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`; gradient guidance steers through the
data prediction x0; pixel models equal a hand loop over scheduler.step; an exported artifact carries
the sampler in its manifest and runs it on ONNX Runtime; `diffrt generate --scheduler dpm` and the
service's `scheduler` field reach it; what diffrt does not run is refused by name, in one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from conftest import (CPU, DIFFUSERS_TOL, PROMPT, assert_a_ddim_artifact_equals_torch, assert_a_pixel_artifact_carries_the_scheduler,
                      assert_an_artifact_on_onnxruntime_equals_torch, assert_cli_generate_is_the_pipelines,
                      assert_color_guidance_lowers_the_colour_loss, assert_controlnet_equals_controlnet_pipeline,
                      assert_ddim_back_is_ddim_from_config, assert_equals_stable_diffusion_pipeline,
                      assert_img2img_equals_img2img_pipeline, assert_never_takes_the_fused_ddim_kernel,
                      assert_pipeline_calls_are_refused_in_one_line, assert_pixel_pipeline_equals_ddpm_pipeline,
                      assert_the_service_batches_a_sampler_apart, class_cfg_by_hand, cli_generate, diffusers_pipe, export_t2i_artifact,
                      generators, lazy_scheduler_folders, max_abs, one_line)
from diffrt.errors import DiffrtError
from diffrt.runtime import ddim, dpm, lcm
from diffrt.runtime.sampling import SamplerOptions, choose_scheduler, make_sampling_schedule, sample
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

STEPS = 5
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def fake_model(x, t):
    """A deterministic stand-in for a UNet: any function of (x, t) exercises the update."""
    return torch.sin(x * 3 + float(t) / 100)


def reference(steps: int, **config) -> DPMSolverMultistepScheduler:
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(steps)
    return ref


def ours(ref: DPMSolverMultistepScheduler) -> dpm.DPMConfig:
    """diffrt's reading of the reference's config, as a folder's scheduler_config.json carries it."""
    return ddim.DDIMConfig.from_scheduler_config(json.loads(json.dumps({"_class_name": "DPMSolverMultistepScheduler",
                                                                        **dict(ref.config)})))


# --- the schedule ---------------------------------------------------------------------------------------

SPACINGS = {"linspace": {}, "leading": dict(steps_offset=1), "trailing": {}}
BETAS = {"linear": {}, "sd": SD, "cosine": dict(beta_schedule="squaredcos_cap_v2")}


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_sigmas_equal_dpm_scheduler(spacing, karras, final, betas):
    """For step counts from 1 to 999: the timesteps, and the sigmas (the last one 0 or sigma_min)."""
    for steps in (1, 2, 3, 4, 5, 7, 10, 14, 15, 16, 20, 25, 50, 100, 999):
        ref = reference(steps, timestep_spacing=spacing, use_karras_sigmas=karras, final_sigmas_type=final,
                        **SPACINGS[spacing], **BETAS[betas])
        if int(ref.timesteps.max()) >= 1000:  # diffusers runs the UNet at t = 1000, past its training steps
            with pytest.raises(DiffrtError, match=r"steps_offset 1 puts timestep 1000 past the model's last training step 999"):
                dpm.make_dpm_schedule(ours(ref), steps)
            assert (spacing, steps) == ("leading", 999)
            continue
        schedule = dpm.make_dpm_schedule(ours(ref), steps)
        assert torch.equal(schedule.timesteps, ref.timesteps), steps
        assert torch.equal(schedule.sigmas, ref.sigmas), steps
        assert len(schedule) == len(ref.timesteps) and schedule.sigmas[-1] == (0.0 if final == "zero" else ref.sigmas[-1])


def test_zero_snr_and_lambda_clipping_equal_dpm_scheduler():
    """Zero terminal SNR keeps a finite last sigma (alpha_bar 2^-24); lambda_min_clipped stops the cosine schedule early."""
    for config in (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
                   dict(rescale_betas_zero_snr=True, use_karras_sigmas=True, **SD),
                   dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
                   dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing")):
        for steps in (1, 4, 25):
            ref = reference(steps, **config)
            schedule = dpm.make_dpm_schedule(ours(ref), steps)
            assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas), (config, steps)
            assert torch.isfinite(schedule.sigmas).all()
            assert torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)


def test_karras_sigma_bounds_a_config_carries_equal_dpm_scheduler():
    """sigma_min / sigma_max are no arguments of DPMSolverMultistepScheduler, but a config that carries them (a
    DPM folder saved from a converted Euler scheduler; `scheduler="dpm"` on an Euler folder) keeps them as hidden
    keys, and its Karras sigmas run between them: a review found diffrt's ran between the training schedule's ends."""
    from diffusers import EulerDiscreteScheduler

    bounds = dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, **SD)
    dpm_file = {"_class_name": "DPMSolverMultistepScheduler", **bounds}
    euler_file = {"_class_name": "EulerDiscreteScheduler", **bounds}
    for steps in (1, 5, 20):
        ref = DPMSolverMultistepScheduler.from_config(dpm_file)
        ref.set_timesteps(steps)
        assert ref.sigmas[0] == pytest.approx(10.0)  # the bounds are used by the oracle itself
        schedule = dpm.make_dpm_schedule(ddim.DDIMConfig.from_scheduler_config(dpm_file), steps)
        assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas), steps
        ref = DPMSolverMultistepScheduler.from_config(EulerDiscreteScheduler.from_config(euler_file).config)
        ref.set_timesteps(steps)
        schedule = make_sampling_schedule(choose_scheduler(ddim.DDIMConfig.from_scheduler_config(euler_file), "dpm"), steps)
        assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas), steps


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [901, 500, 3], [10]])
def test_custom_timesteps_equal_dpm_scheduler(timesteps):
    ref = DPMSolverMultistepScheduler(**SD)
    ref.set_timesteps(timesteps=timesteps)
    schedule = dpm.make_dpm_schedule(ours(ref), timesteps=timesteps)
    assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas)


def test_solver_orders_follow_lower_order_final():
    """The highest order per step: lower orders for the last two of fewer than 15 steps; the step to sigma 0 first order."""
    def orders(steps, **config):
        return dpm.solver_orders(dpm.DPMConfig(**config), steps).tolist()

    assert orders(5, solver_order=3) == [3, 3, 3, 2, 1]
    assert orders(15, solver_order=3) == [3] * 14 + [1]  # final sigma 0: the last step is first order anyway
    assert orders(15, solver_order=3, final_sigmas_type="sigma_min") == [3] * 15
    assert orders(5, solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False) == [3] * 5
    assert orders(20, solver_order=2, final_sigmas_type="sigma_min", euler_at_final=True) == [2] * 19 + [1]
    assert orders(1, solver_order=3) == [1] and orders(2, solver_order=3) == [2, 1]


# Scheduler configs that exercise every branch of the step: orders, solver types, prediction types,
# thresholding, the final-step rules, Karras sigmas and zero terminal SNR.
LOOP_CONFIGS = {
    "2m": {},
    "1": dict(solver_order=1),
    "3": dict(solver_order=3),
    "2m-heun": dict(solver_type="heun"),
    "3-heun-karras": dict(solver_order=3, solver_type="heun", use_karras_sigmas=True, **SD),
    "v-karras": dict(prediction_type="v_prediction", use_karras_sigmas=True, **SD),
    "sample-thresholding": dict(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    "3-sigma-min-no-lower-final": dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
    "2m-euler-at-final": dict(final_sigmas_type="sigma_min", euler_at_final=True, lower_order_final=False),
    "v-zero-snr-trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", **SD),
    "3-leading": dict(solver_order=3, timestep_spacing="leading", steps_offset=1, **SD),
}


def reference_orders(ref: DPMSolverMultistepScheduler, monkeypatch) -> list[int]:
    """Which update diffusers' step() takes, recorded per step."""
    taken = []
    for order, name in ((1, "dpm_solver_first_order_update"), (2, "multistep_dpm_solver_second_order_update"),
                        (3, "multistep_dpm_solver_third_order_update")):
        update = getattr(ref, name)
        monkeypatch.setattr(ref, name, lambda *a, _u=update, _o=order, **k: taken.append(_o) or _u(*a, **k))
    return taken


@pytest.mark.parametrize("name", LOOP_CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 15, 16])
def test_loop_equals_dpm_scheduler_step(name, steps, monkeypatch):
    """dpm_solver_step at every step, with the order diffusers takes there, and the whole loop (sampling.sample)
    equal DPMSolverMultistepScheduler.step driven by hand."""
    ref = reference(steps, **LOOP_CONFIGS[name])
    schedule = dpm.make_dpm_schedule(ours(ref), steps)
    taken = reference_orders(ref, monkeypatch)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    x_ref, x_ours, x0s = x_T.clone(), x_T.clone(), []
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref).prev_sample
        x0s.append(dpm.thresholded_data_prediction(x_ours, fake_model(x_ours, t), schedule, i))
        order = min(int(schedule.orders[i]), len(x0s))
        assert order == taken[i], (i, order, taken)
        x_ours = dpm.dpm_solver_step(x_ours, x0s[-order:], schedule, i)
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-6)
    looped = sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule, SamplerOptions())
    torch.testing.assert_close(looped, x_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule, SamplerOptions()), looped)


@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("start", [1, 3])
def test_the_tail_of_a_schedule_is_img2img_set_begin_index(start, karras):
    """img2img: the steps from t_start on, the warm-up again from there, the image noised at that step's
    sigma (with Karras sigmas not alpha_bar of the rounded timestep), as add_noise after set_begin_index."""

    steps = 7
    ref = reference(steps, solver_order=3, use_karras_sigmas=karras, **SD)
    schedule = dpm.make_dpm_schedule(ours(ref), steps).tail(start)
    x0, noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 4, 8, 8)
    ref.set_begin_index(start)
    x_ref = ref.add_noise(x0, noise, ref.timesteps[start:start + 1].repeat(2))
    x = schedule.add_noise(x0, noise)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=0)
    if karras:  # the Karras sigma is not the rounded timestep's: the DDIM noising would be off
        assert max_abs(ddim.add_noise(x0, noise, schedule.alphas_cumprod[schedule.timesteps[0]]), x_ref) > 1e-5
    for t in ref.timesteps[start:]:
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref).prev_sample
    got = sample(lambda x, t: (None, fake_model(x, t)), x, schedule, SamplerOptions())
    torch.testing.assert_close(got, x_ref, rtol=1e-5, atol=1e-6)


def test_loop_with_cfg_rescale_and_generators_equals_dpm_scheduler():
    """CFG (and guidance_rescale) combined before the step; generators given but never drawn from (no eta, no noise)."""
    from diffrt.runtime.sampling import combine_cfg

    ref = reference(6, **SD)
    scale, x_T = 3.0, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def branches(x, t):
        return torch.cos(x + float(t) / 300), torch.sin(x * 2 - float(t) / 500)

    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(combine_cfg(*branches(x, t), scale, 0.6), t, x).prev_sample
    gens = generators(5, 6)
    state = [g.get_state() for g in gens]
    got = sample(branches, x_T.clone(), dpm.make_dpm_schedule(ours(ref), 6),
                 SamplerOptions(guidance_scale=scale, guidance_rescale=0.6, generator=gens))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, state))


def test_dpm_never_takes_the_fused_ddim_kernel(monkeypatch):
    assert_never_takes_the_fused_ddim_kernel(monkeypatch, "DPM-Solver++", dpm.make_dpm_schedule(dpm.DPMConfig(), 3))


# --- configs and the choice of sampler -------------------------------------------------------------------


def test_a_dpm_scheduler_config_reads_as_dpm_scheduler_and_round_trips():
    fields = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "solver_order", "algorithm_type", "solver_type",
              "lower_order_final", "euler_at_final", "use_karras_sigmas", "final_sigmas_type", "lambda_min_clipped",
              "timestep_spacing", "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
              "sample_max_value", "rescale_betas_zero_snr", "variance_type")
    for given in ({"_class_name": "DPMSolverMultistepScheduler"},  # DPMSolverMultistepScheduler's defaults, not DDIM's
                  {"_class_name": "DPMSolverMultistepScheduler", **SD, "solver_order": 3, "use_karras_sigmas": True,
                   "solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False, "timestep_spacing": "trailing",
                   "prediction_type": "v_prediction", "thresholding": True, "lambda_min_clipped": -4.0}):
        config = ddim.DDIMConfig.from_scheduler_config(given)
        assert type(config) is dpm.DPMConfig
        ref = DPMSolverMultistepScheduler.from_config(given).config
        for f in fields:
            assert getattr(config, f) == ref[f], f
        written = json.loads(json.dumps(config.to_scheduler_config()))  # what a manifest holds
        assert written["_class_name"] == "DPMSolverMultistepScheduler" and ddim.DDIMConfig.from_scheduler_config(written) == config
        assert not {"clip_sample", "set_alpha_to_one"} & set(written)  # DDIM's, which DPMSolverMultistepScheduler has not
        back = DPMSolverMultistepScheduler.from_config(written).config
        assert {k: v for k, v in back.items() if not k.startswith("_")} == {k: v for k, v in ref.items() if not k.startswith("_")}


def test_choosing_dpm_is_diffusers_from_config():
    """"dpm" on a PNDM/DDIM folder's config is DPMSolverMultistepScheduler.from_config(pipe.scheduler.config); "ddim"
    and "lcm" on a DPM config are those classes' from_config; None keeps the model's own. The DEIS and UniPC
    solver names diffusers reads as DPM-Solver++ read so here too."""
    import diffusers

    pndm = {"_class_name": "PNDMScheduler", **SD, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "clip_sample": False}
    own = ddim.DDIMConfig.from_scheduler_config(pndm)
    chosen = choose_scheduler(own, "dpm")
    want = DPMSolverMultistepScheduler.from_config(diffusers.PNDMScheduler.from_config(pndm).config)
    # SD-1.5's file has no timestep_spacing: PNDM's "leading" is a default, DPMSolverMultistepScheduler's "linspace" replaces it.
    assert type(chosen) is dpm.DPMConfig and (chosen.timestep_spacing, chosen.steps_offset) == ("linspace", 1)
    explicit = choose_scheduler(ddim.DDIMConfig.from_scheduler_config({**pndm, "timestep_spacing": "leading"}), "dpm")
    assert explicit.timestep_spacing == "leading"  # written in the file, it is kept, as diffusers keeps it
    for steps in (1, 4, 25):
        want.set_timesteps(steps)
        schedule = dpm.make_dpm_schedule(chosen, steps)
        assert torch.equal(schedule.timesteps, want.timesteps) and torch.equal(schedule.sigmas, want.sigmas)
    assert choose_scheduler(own, None) is own and choose_scheduler(chosen, "dpm") is chosen
    assert_ddim_back_is_ddim_from_config(chosen, DPMSolverMultistepScheduler)
    assert type(choose_scheduler(chosen, "lcm")) is lcm.LCMConfig
    for other in ({"_class_name": "DEISMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_type": "logrho"},
                  {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2"}):
        read = dpm.DPMConfig.from_scheduler_config(other)
        ref = DPMSolverMultistepScheduler.from_config(other).config
        assert (read.algorithm_type, read.solver_type) == (ref.algorithm_type, ref.solver_type) == ("dpmsolver++", "midpoint")
    with pytest.raises(ValueError):  # diffusers: final_sigmas_type "zero" is not supported for algorithm_type deis
        DPMSolverMultistepScheduler.from_config({"algorithm_type": "deis"})
    with pytest.raises(DiffrtError, match=r"algorithm_type 'deis' is not supported") as info:
        dpm.DPMConfig.from_scheduler_config({"_class_name": "DEISMultistepScheduler", "algorithm_type": "deis"})
    one_line(info)


def test_keys_a_sampler_does_not_take_travel_to_the_one_chosen_as_diffusers_keeps_them():
    """diffusers keeps a config's keys its class does not take ("hidden", for compatible classes): "dpm" on a
    UniPC folder (read as DDIM here) takes its solver_order and Karras sigmas, and "ddim" on a DPM config
    made from SD's PNDM takes the PNDM file's clip_sample (false), not DDIM's default (true)."""
    import diffusers

    unipc = {"_class_name": "UniPCMultistepScheduler", **SD, "solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "zero"}
    chosen = choose_scheduler(ddim.DDIMConfig.from_scheduler_config(unipc), "dpm")
    want = DPMSolverMultistepScheduler.from_config(diffusers.UniPCMultistepScheduler.from_config(unipc).config)
    assert (chosen.solver_order, chosen.use_karras_sigmas) == (want.config.solver_order, want.config.use_karras_sigmas) == (3, True)
    want.set_timesteps(12)
    assert torch.equal(dpm.make_dpm_schedule(chosen, 12).timesteps, want.timesteps)

    pndm = {"_class_name": "PNDMScheduler", **SD, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "clip_sample": False}
    as_dpm = choose_scheduler(ddim.DDIMConfig.from_scheduler_config(pndm), "dpm")
    back = choose_scheduler(as_dpm, "ddim")
    ref = DDIMScheduler.from_config(DPMSolverMultistepScheduler.from_config(diffusers.PNDMScheduler.from_config(pndm).config).config)
    assert (back.clip_sample, back.set_alpha_to_one) == (ref.config.clip_sample, ref.config.set_alpha_to_one) == (False, False)
    written = json.loads(json.dumps(as_dpm.to_scheduler_config()))  # a manifest keeps them too
    assert (written["clip_sample"], written["skip_prk_steps"]) == (False, True)


def test_a_value_given_wins_over_the_files_left_out_keys():
    """from_config(config, key=value) and dataclasses.replace set a key the file left out: it is the caller's
    value from then on, written as such (not listed in _use_default_values, which would drop it on reading)."""
    import dataclasses

    import diffusers

    pndm = {"_class_name": "PNDMScheduler", **SD, "skip_prk_steps": True, "steps_offset": 1}  # no timestep_spacing, as SD-1.5
    base = diffusers.PNDMScheduler.from_config(pndm).config
    given = dpm.DPMConfig.from_scheduler_config(dict(base), timestep_spacing="trailing")
    assert given.timestep_spacing == DPMSolverMultistepScheduler.from_config(base, timestep_spacing="trailing").config.timestep_spacing
    assert given.timestep_spacing == "trailing"
    assert dpm.DPMConfig.from_scheduler_config(dict(base)).timestep_spacing == "linspace"  # the file's gap: DPM's default
    replaced = dataclasses.replace(choose_scheduler(ddim.DDIMConfig.from_scheduler_config(pndm), "dpm"), timestep_spacing="trailing")
    again = ddim.DDIMConfig.from_scheduler_config(json.loads(json.dumps(replaced.to_scheduler_config())))
    assert again == replaced and again.timestep_spacing == "trailing"


def test_a_step_of_zero_length_is_the_identity_where_diffusers_gives_nan():
    """Karras sigmas ending at sigma_min with final_sigmas_type "sigma_min" make the last step go nowhere (h = 0);
    second and third order divide by h (diffusers: NaN images). It is taken at first order: x unchanged."""
    for config in (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_type="heun", **SD),
                   dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3, lower_order_final=False, **SD)):
        ref = reference(16, **config)
        x_ref = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in ref.timesteps:
            x_ref = ref.step(fake_model(x_ref, t), t, x_ref).prev_sample
        assert torch.isnan(x_ref).all()  # diffusers' result, which the test documents
        schedule = dpm.make_dpm_schedule(ours(ref), 16)
        assert schedule.lambdas[-1] == schedule.lambdas[-2] and schedule.orders[-1] == 1
        seen = []
        x = sample(lambda x, t: seen.append(x.clone()) or (None, fake_model(x, t)),
                   torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)), schedule, SamplerOptions())
        assert torch.isfinite(x).all() and torch.equal(x, seen[-1])


@pytest.mark.parametrize("config", [dict(solver_order=2), dict(solver_order=3, lower_order_final=False)], ids=["2M", "3M"])
def test_a_step_after_a_zero_length_one_does_not_reach_back_across_it(config, monkeypatch):
    """From the samplers review: 1000 linspace steps of 1000 training steps put two steps on one timestep (h = 0).
    The flat step was first order already, but the next reached back across it (r0 = lambda gap / h = 0) and gave NaN
    (diffusers too). Now: equal to diffusers up to the flat step, the flat step the identity, the steps after it at
    orders that do not span it, and finite to the end."""
    ref = reference(1000, **config)
    ours_schedule = dpm.make_dpm_schedule(ours(ref), 1000)
    flat = int((ours_schedule.timesteps[1:] == ours_schedule.timesteps[:-1]).nonzero()[0])
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x_T.clone()
    trajectory = []
    for t in ref.timesteps:
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref).prev_sample
        trajectory.append(x_ref)
    # diffusers' result, which the test documents: NaN from the flat step or the one after it on.
    assert torch.isfinite(trajectory[flat - 1]).all() and torch.isnan(trajectory[flat + 1]).all() and torch.isnan(x_ref).all()
    assert ours_schedule.orders[flat:flat + 4].tolist() == [1, 1, 2, config["solver_order"]]
    seen = []
    x = sample(lambda x, t: seen.append(x.clone()) or (None, fake_model(x, t)), x_T.clone(), ours_schedule, SamplerOptions())
    assert torch.isfinite(x).all()
    torch.testing.assert_close(seen[flat], trajectory[flat - 1], rtol=1e-5, atol=1e-6)  # the same path up to the flat step
    assert torch.equal(seen[flat + 1], seen[flat])  # which goes nowhere


# What DPMSolverMultistepScheduler accepts and diffrt does not run: refused by name, never run as something else.
REFUSED = [
    (dict(algorithm_type="sde-dpmsolver++"), r"algorithm_type 'sde-dpmsolver\+\+' is not supported.*only 'dpmsolver\+\+'"),
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), r"algorithm_type 'dpmsolver' is not supported"),
    (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), r"algorithm_type 'sde-dpmsolver' is not supported"),
    (dict(use_exponential_sigmas=True), r"use_exponential_sigmas is not supported.*set use_exponential_sigmas to false"),
    (dict(use_beta_sigmas=True), r"use_beta_sigmas is not supported"),
    (dict(use_lu_lambdas=True), r"use_lu_lambdas is not supported"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), r"use_flow_sigmas is not supported"),
    (dict(prediction_type="flow_prediction"), r"prediction_type 'flow_prediction' is not supported by diffrt's DPM-Solver"),
    (dict(variance_type="learned_range"), r"variance_type 'learned_range' .* not supported"),
    (dict(use_dynamic_shifting=True), r"use_dynamic_shifting is not supported"),
]


@pytest.mark.parametrize("config,message", REFUSED, ids=lambda v: str(v)[:40])
def test_what_diffrt_does_not_run_is_refused_by_name(config, message):
    DPMSolverMultistepScheduler(**config)  # diffusers takes it
    with pytest.raises(DiffrtError, match=message) as info:
        ddim.DDIMConfig.from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **config})
    one_line(info)
    with pytest.raises(DiffrtError, match=message):
        dpm.DPMConfig(**config)


@pytest.mark.parametrize("kwargs,message", [
    (dict(config=dpm.DPMConfig(use_karras_sigmas=True), timesteps=[999, 499]), r"custom timesteps and use_karras_sigmas exclude"),
    (dict(timesteps=[499, 999]), r"timesteps must be strictly descending"),
    (dict(timesteps=[1000, 499]), r"timesteps must lie in \[0, 999\]"),
    (dict(num_inference_steps=0), r"num_inference_steps must be in \[1, 1000\]"),
    (dict(num_inference_steps=4, timesteps=[999]), r"give either num_inference_steps or timesteps"),
    (dict(config=dpm.DPMConfig(timestep_spacing="leading"), num_inference_steps=1000), r"'leading' spaces 1000 steps by .* = 0"),
    (dict(config=dpm.DPMConfig(timestep_spacing="leading", steps_offset=400), num_inference_steps=2), r"steps_offset 400 puts timestep 1066"),
], ids=lambda v: str(v)[:40])
def test_bad_schedules_are_one_line(kwargs, message):
    kwargs = dict(kwargs)
    config = kwargs.pop("config", dpm.DPMConfig())
    with pytest.raises(DiffrtError, match=message) as info:
        dpm.make_dpm_schedule(config, **kwargs)
    one_line(info)


def test_eta_is_ddims_and_refused_for_dpm():
    with pytest.raises(DiffrtError, match=r"eta 0.5 is DDIM's; DPM-Solver\+\+ is deterministic") as info:
        make_sampling_schedule(dpm.DPMConfig(), 4, eta=0.5)
    one_line(info)
    schedule = dpm.make_dpm_schedule(dpm.DPMConfig(), 4)
    with pytest.raises(DiffrtError, match=r"eta 0.3 is DDIM's"):
        sample(lambda x, t: (None, x), torch.zeros(1, 3, 4, 4), schedule, SamplerOptions(eta=0.3))


# --- whole images: the torch backend equals diffusers ----------------------------------------------------


FOLDERS = {
    "order1": dict(solver_order=1),
    "order2": {},
    "order3-karras": dict(solver_order=3, use_karras_sigmas=True),
    "order2-karras-v": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    "order3-v-heun": dict(solver_order=3, prediction_type="v_prediction", solver_type="heun"),
    "order3-sigma-min": dict(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False),
}


@pytest.fixture(scope="module")
def folders(t2i_folder, tmp_path_factory):
    """One SD folder (with t2i_folder's ControlNet) per FOLDERS config, made on first use, as `pipe.scheduler =
    DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, **overrides); pipe.save_pretrained(dst)` writes it."""
    return lazy_scheduler_folders(t2i_folder, tmp_path_factory, "dpm",
                                  {name: (DPMSolverMultistepScheduler, overrides) for name, overrides in FOLDERS.items()})


@pytest.fixture(scope="module")
def ddim_pipe(t2i_folder):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU)


@pytest.mark.parametrize("name", FOLDERS)
def test_a_dpm_folder_equals_stable_diffusion_pipeline(folders, name):
    """The folder's own DPMSolverMultistepScheduler (its order, Karras and final settings honoured), CFG with a negative prompt."""
    pipe = open_text_to_image_pipeline(folders(name), "torch", CPU)
    assert type(pipe.scheduler) is dpm.DPMConfig
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, negative_prompt="blurry, dark", num_images_per_prompt=2,
                  output_type="pt")
    result, ref = assert_equals_stable_diffusion_pipeline(folders(name), pipe, "dpm", kwargs)
    assert type(ref.scheduler) is DPMSolverMultistepScheduler and result.images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_one_to_three_steps_equal_stable_diffusion_pipeline(folders, steps):
    pipe = open_text_to_image_pipeline(folders("order3-karras"), "torch", CPU)
    kwargs = dict(num_inference_steps=steps, guidance_scale=2.0, output_type="pt")
    result, _ = assert_equals_stable_diffusion_pipeline(folders("order3-karras"), pipe, "dpm", kwargs, seed=4)
    assert len(result.metadata["timesteps"]) == steps


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=4.0, negative_prompt="blurry", num_images_per_prompt=2),
    dict(prompt=["a red house", PROMPT], negative_prompt=["ugly", "blurry"], guidance_scale=2.0, guidance_rescale=0.5,
         generator=(1, 2, 3, 4), num_images_per_prompt=2),
    dict(guidance_scale=1.0, timesteps=[999, 749, 499, 249]),
    dict(guidance_scale=7.5, num_inference_steps=20),
], ids=["cfg-negative-x2", "two-prompts-generators-rescale", "custom-timesteps", "20-steps"])
def test_scheduler_dpm_on_a_ddim_folder_equals_diffusers_from_config(t2i_folder, ddim_pipe, kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    if "timesteps" in kwargs:
        del kwargs["num_inference_steps"]
    result, _ = assert_equals_stable_diffusion_pipeline(t2i_folder, ddim_pipe, "dpm", kwargs, scheduler_cls=DPMSolverMultistepScheduler)
    if not {"prompt", "generator", "timesteps"} & set(kwargs):
        assert max_abs(result.images, ddim_pipe(PROMPT, seed=3, **kwargs).images) > 1e-2  # DDIM, the folder's own, differs


def test_scheduler_dpm_on_an_sd15_style_folder_takes_dpms_defaults_for_keys_the_file_leaves_out(t2i_folder, tmp_path):
    """SD-1.5 ships a PNDMScheduler config without timestep_spacing: `DPMSolverMultistepScheduler.from_config(
    pipe.scheduler.config)` then samples with its own default, "linspace", not PNDM's "leading"."""
    from diffusers import StableDiffusionPipeline

    folder = shutil.copytree(t2i_folder, tmp_path / "sd15")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", **SD, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False}))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, output_type="pt")
    ref = diffusers_pipe(StableDiffusionPipeline, folder, DPMSolverMultistepScheduler)
    assert ref.scheduler.config.timestep_spacing == "linspace"
    want = ref(PROMPT, generator=torch.Generator().manual_seed(6), **kwargs).images
    result = open_text_to_image_pipeline(folder, "torch", CPU)(PROMPT, seed=6, scheduler="dpm", **kwargs)
    assert result.metadata["timesteps"] == ref.scheduler.timesteps.tolist() == [999, 799, 599, 400, 200]
    assert max_abs(result.images, want) <= DIFFUSERS_TOL


@pytest.mark.parametrize("name,strength", [("order2", 0.6), ("order3-karras", 0.6), ("order2-karras-v", 1.0),
                                           ("order3-v-heun", 0.75), ("order3-sigma-min", 0.4)])
def test_img2img_equals_img2img_pipeline(folders, name, strength):
    """The last int(N * strength) steps (get_timesteps, set_begin_index), the image noised at that step's sigma."""
    kwargs = dict(strength=strength, num_inference_steps=STEPS, guidance_scale=2.5, negative_prompt="blurry", num_images_per_prompt=2)
    assert_img2img_equals_img2img_pipeline(folders(name), open_text_to_image_pipeline(folders(name), "torch", CPU), kwargs)


def test_img2img_with_a_generator_per_image_equals_img2img_pipeline(t2i_folder, ddim_pipe):
    kwargs = dict(strength=0.8, num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=2, generator=(5, 6))
    assert_img2img_equals_img2img_pipeline(t2i_folder, ddim_pipe, kwargs, scheduler_cls=DPMSolverMultistepScheduler, kind="dpm",
                                           image_seed=8)


@pytest.mark.parametrize("name", ["order2", "order3-karras", "order2-karras-v"])
def test_controlnet_equals_controlnet_pipeline(folders, name):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=2)
    assert_controlnet_equals_controlnet_pipeline(folders(name), "dpm", kwargs)


# --- gradient guidance ----------------------------------------------------------------------------------


def test_a_guided_dpm_step_moves_x_t_down_the_gradient_of_the_loss_on_the_data_prediction():
    """Mode x0 with DPM-Solver++, by hand over diffusers' scheduler: eps held constant, the loss on the decoded
    data prediction x0 = (x_t - sigma_t eps) / alpha_t, x_t <- x_t - scale * d loss / d x_t, then scheduler.step."""
    from diffrt.runtime.guidance import Guidance

    ref = reference(4, solver_order=3, use_karras_sigmas=True, **SD)
    schedule = dpm.make_dpm_schedule(ours(ref), 4)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss(images):
        return ((images - 0.3) ** 2).sum()

    x = x_T.clone()
    for i, t in enumerate(ref.timesteps):
        eps = fake_model(x, t)
        alpha_t = 1 / (ref.sigmas[i] ** 2 + 1) ** 0.5
        x_req = x.clone().requires_grad_(True)
        x0 = (x_req - ref.sigmas[i] * alpha_t * eps) / alpha_t
        (grad,) = torch.autograd.grad(0.01 * loss(x0 / 2 + 0.5), x_req)
        x = ref.step(eps, t, (x - grad).detach()).prev_sample
    options = SamplerOptions(guidance=(Guidance(loss, 0.01),), decode=lambda x0: x0 / 2 + 0.5)
    got = sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule, options)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    unguided = sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule, SamplerOptions())
    assert max_abs(got, unguided) > 1e-3


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_color_guidance_lowers_the_colour_loss_with_dpm(ddim_pipe, mode):
    for seed in (11, 13):
        assert_color_guidance_lowers_the_colour_loss(ddim_pipe, mode, "dpm", num_inference_steps=STEPS, guidance_scale=2.0, seed=seed,
                                                     scheduler="dpm")


def test_bad_pipeline_arguments_are_one_line(folders, ddim_pipe):
    pipe = open_text_to_image_pipeline(folders("order2"), "torch", CPU)
    assert_pipeline_calls_are_refused_in_one_line([
        (pipe, dict(eta=0.5), r"eta 0.5 is DDIM's; DPM-Solver\+\+ is deterministic"),
        (ddim_pipe, dict(scheduler="dpm", eta=0.3), r"eta 0.3 is DDIM's; DPM-Solver\+\+"),
        (ddim_pipe, dict(scheduler="heun"), r"scheduler must be 'ddim', 'lcm', 'dpm', 'euler' or 'euler_a' .* got 'heun'"),
        (ddim_pipe, dict(timesteps=[999, 499]), r"custom timesteps need scheduler='lcm', 'dpm' or 'euler'"),
        (pipe, dict(image=torch.rand(1, 3, 32, 32), strength=0.1), r"strength 0.1 x 5 steps leaves no denoising step"),
    ], STEPS)


# --- pixel-space models: the same loop ----------------------------------------------------------------


def test_pixel_dpm_equals_ddpm_pipeline_with_dpm_scheduler(uncond_model_dir, tmp_path):
    """DDPMPipeline drives any scheduler's set_timesteps/step: with DPMSolverMultistepScheduler it is the DPM loop.
    The test model's DDIM config clips x0 (clip_sample), which DPM-Solver++ has no notion of."""
    scheduler = DPMSolverMultistepScheduler.from_config(DDIMScheduler.from_pretrained(uncond_model_dir / "scheduler").config)
    pipe, want = assert_pixel_pipeline_equals_ddpm_pipeline(uncond_model_dir, scheduler, "dpm", STEPS, scheduler="dpm")
    assert abs(pipe(num_images=2, num_inference_steps=STEPS, seed=7, output_type="np").images - want).max() > 1e-3

    folder = shutil.copytree(uncond_model_dir, tmp_path / "dpm")  # a folder whose scheduler config names DPMSolverMultistepScheduler
    DPMSolverMultistepScheduler.from_config(scheduler.config, solver_order=3, use_karras_sigmas=True).save_pretrained(folder / "scheduler")
    assert_pixel_pipeline_equals_ddpm_pipeline(folder, DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"), "dpm", STEPS)


def test_class_conditioned_pixel_dpm_with_cfg_equals_dpm_scheduler_by_hand(classemb_model_dir):
    from diffrt.models import load_pixel_model
    from diffrt.runtime.loading import torch_pixel_pipeline

    model = load_pixel_model(classemb_model_dir)
    labels, scale = torch.tensor([1, 3]), 3.0
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler.to_scheduler_config(), solver_order=3)
    scheduler.set_timesteps(STEPS)
    want = class_cfg_by_hand(model, scheduler, x_T.clone(), labels, scale)
    config = dpm.DPMConfig.from_scheduler_config(dict(scheduler.config))
    got = torch_pixel_pipeline(model)(labels, latents=x_T, num_inference_steps=STEPS, guidance_scale=scale, output_type="pt",
                                      scheduler=config).images
    # The random UNet drives x far outside [-1, 1] (DPM-Solver++ does not clip), where one batched 2B call and two
    # calls differ by ~1e-7 relative: the images' usual tolerance.
    assert max_abs(got, want) <= DIFFUSERS_TOL


def test_a_pixel_dpm_artifact_carries_dpm_to_onnxruntime(uncond_model_dir, tmp_path):
    assert_a_pixel_artifact_carries_the_scheduler(uncond_model_dir, tmp_path, DPMSolverMultistepScheduler, "dpm", STEPS, solver_order=3)


# --- exported artifacts, the CLI and the service -----------------------------------------------------------


@pytest.fixture(scope="module")
def dpm_artifact(folders, tmp_path_factory):
    """The order-3 Karras folder exported without its ControlNet (fp32 ONNX)."""
    return export_t2i_artifact(folders("order3-karras"), tmp_path_factory.mktemp("dpm_artifact") / "artifact")


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=3.0, negative_prompt="blurry", num_images_per_prompt=2),
                                    dict(guidance_scale=2.0, image=0.6)], ids=["cfg-negative-x2", "img2img"])
def test_a_dpm_artifact_on_onnxruntime_equals_torch(dpm_artifact, folders, kwargs):
    from diffrt.export import manifest as mf

    written = mf.read_manifest(dpm_artifact)["pipeline"]["scheduler"]
    assert (written["_class_name"], written["solver_order"], written["use_karras_sigmas"]) == ("DPMSolverMultistepScheduler", 3, True)
    ort = assert_an_artifact_on_onnxruntime_equals_torch(dpm_artifact, open_text_to_image_pipeline(folders("order3-karras"), "torch", CPU),
                                                         "dpm", kwargs, STEPS)
    assert isinstance(ort.scheduler, dpm.DPMConfig) and ort.scheduler.use_karras_sigmas


def test_scheduler_dpm_on_a_ddim_artifact_equals_torch(t2i_artifact, ddim_pipe):
    assert_a_ddim_artifact_equals_torch(t2i_artifact, ddim_pipe, "dpm", num_inference_steps=STEPS, guidance_scale=3.0, scheduler="dpm")


def test_cli_generate_scheduler_dpm_is_the_pipelines_dpm(t2i_folder, ddim_pipe, tmp_path):
    """`diffrt generate --scheduler dpm` samples a DDIM folder with DPM-Solver++ at StableDiffusionPipeline's
    guidance 7.5: the images of the pipeline called with scheduler="dpm"."""
    assert_cli_generate_is_the_pipelines(t2i_folder, ddim_pipe, tmp_path, "dpm", 4, 7.5)  # unlike DDIM, the folder's own
    assert cli_generate(t2i_folder, tmp_path / "x.npy", "--scheduler", "dpm", "--eta", "0.5", "--steps", "4") == 2


def test_serve_dpm_requests_batch_apart_from_ddim_each_as_alone(dpm_artifact):
    """The service's `scheduler` field: "dpm" is accepted (also by Triton's input), a DPM folder's requests are
    DPM by default, DPM and DDIM requests never share a batch, a shared DPM batch gives each request the images
    `diffrt generate` gives it alone, and eta is refused naming the field."""
    pytest.importorskip("fastapi")
    assert_the_service_batches_a_sampler_apart(dpm_artifact, "dpm", STEPS, draws_noise=False, others=["ddim"],  # no per-step noise
                                               eta_refused={None: "DPM-Solver++"})


# --- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", [dict(), dict(solver_order=3, use_karras_sigmas=True)], ids=["2m", "3m-karras"])
def test_shipped_model_samples_on_cuda_as_on_the_cpu(config, no_tf32):
    """The solver's coefficients are CPU scalars and its history lives on the pipeline's device: on CUDA
    the shipped digits model's DPM-Solver++ images equal the CPU's (TF32 off, so fp32 means fp32)."""
    from diffrt.models import shipped_digits_model
    from diffrt.runtime.loading import torch_pixel_pipeline

    model = shipped_digits_model()
    scheduler = dpm.DPMConfig.from_scheduler_config({**model.scheduler.to_scheduler_config(),
                                                      "_class_name": "DPMSolverMultistepScheduler", **config})
    kwargs = dict(num_inference_steps=12, guidance_scale=2.0, seed=3, scheduler=scheduler, output_type="pt")
    cpu = torch_pixel_pipeline(model)(torch.arange(10), **kwargs).images
    cuda = torch_pixel_pipeline(model, device="cuda")(torch.arange(10), **kwargs).images
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-3)
