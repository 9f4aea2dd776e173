"""Euler and Euler Ancestral sampling (runtime/euler.py) against diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler, the oracles.

Pure functions: the timesteps, sigmas and init_noise_sigma of set_timesteps (every timestep_spacing, Karras
sigmas with and without sigma_min/sigma_max, both final sigmas, the beta schedules, zero terminal SNR, step
counts from 1 up, custom timesteps), and the loop on the UNet's input x_t = x_VE / sqrt(sigma^2 + 1), step by
step against scheduler.step driven by hand (scale_model_input, init_noise_sigma), with the generator consumed
draw for draw: one draw per Euler Ancestral step, none for Euler. Whole images: a Stable Diffusion folder naming
either class equals StableDiffusionPipeline, its img2img and ControlNet pipelines; `scheduler="euler"` /
`"euler_a"` on a DDIM folder equal diffusers after `pipe.scheduler = <cls>.from_config(pipe.scheduler.config)`;
guidance steers through x0; pixel models equal a hand loop; an artifact carries the sampler in its manifest
and runs it on ONNX Runtime; `diffrt generate --scheduler euler_a` and the service's field reach it; what
diffrt does not run is refused by name, in one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from conftest import (CPU, DIFFUSERS_TOL, PROMPT, assert_a_ddim_artifact_equals_torch, assert_a_pixel_artifact_carries_the_scheduler,
                      assert_an_artifact_on_onnxruntime_equals_torch, assert_cli_generate_is_the_pipelines,
                      assert_color_guidance_lowers_the_colour_loss, assert_controlnet_equals_controlnet_pipeline,
                      assert_ddim_back_is_ddim_from_config, assert_equals_stable_diffusion_pipeline,
                      assert_img2img_equals_img2img_pipeline, assert_never_takes_the_fused_ddim_kernel,
                      assert_pipeline_calls_are_refused_in_one_line, assert_the_service_batches_a_sampler_apart, class_cfg_by_hand,
                      cli_generate, diffusers_pipe, export_t2i_artifact, generators, lazy_scheduler_folders, max_abs, one_line)
from diffrt.errors import DiffrtError
from diffrt.runtime import ddim, euler
from diffrt.runtime.sampling import SamplerOptions, choose_scheduler, make_sampling_schedule, sample
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

STEPS = 5
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CLASSES = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler}


def fake_model(x, t):
    """A deterministic stand-in for a UNet: smooth and bounded like a noise prediction, so that the loop does
    not amplify float32 rounding from step to step as a chaotic map would."""
    return torch.tanh(x + float(t) / 1000)


def reference(name: str, steps: int, **config):
    ref = CLASSES[name](**config)
    ref.set_timesteps(steps)
    return ref


def ours(ref) -> ddim.DDIMConfig:
    """diffrt's reading of the reference's config, as a folder's scheduler_config.json carries it."""
    return ddim.DDIMConfig.from_scheduler_config(json.loads(json.dumps({"_class_name": type(ref).__name__, **dict(ref.config)})))


def assert_near(got, want, *trajectory, rel=1e-6):
    """Equal up to float32 rounding, relative to the largest VE sample on the way (`trajectory`, `want` itself if
    none): the loop's x is the VE sample scaled, and going there and back each step rounds differently from
    diffusers' x_VE (up to sigma_max ~ 15-160 times x_t) by ~1e-7 of it, which the later steps' cancellation
    leaves in their smaller values."""
    scale = max(float(torch.as_tensor(v).abs().max()) for v in (want, *trajectory))
    assert max_abs(got, want) <= rel * max(1.0, scale), (max_abs(got, want), scale)


# --- the schedule ---------------------------------------------------------------------------------------

SPACINGS = {"linspace": {}, "leading": dict(steps_offset=1), "trailing": {}}
BETAS = {"linear": {}, "sd": SD, "cosine": dict(beta_schedule="squaredcos_cap_v2")}
COUNTS = (1, 2, 3, 4, 5, 7, 10, 25, 50, 999)


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("karras", [False, True], ids=["plain", "karras"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_timesteps_sigmas_and_init_noise_sigma_equal_euler_scheduler(spacing, karras, final, betas):
    for steps in COUNTS:
        ref = reference("euler", steps, timestep_spacing=spacing, use_karras_sigmas=karras, final_sigmas_type=final,
                        **SPACINGS[spacing], **BETAS[betas])
        schedule = euler.make_euler_schedule(ours(ref), steps)
        assert torch.equal(schedule.timesteps, ref.timesteps), steps
        assert torch.equal(schedule.sigmas, ref.sigmas), steps
        assert torch.equal(schedule.init_noise_sigma, torch.as_tensor(ref.init_noise_sigma)), steps
        assert schedule.timesteps.dtype == torch.float32 and len(schedule) == steps and not schedule.ancestral


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral_schedule_equals_euler_ancestral_scheduler(spacing, betas):
    for steps in COUNTS:
        ref = reference("euler_a", steps, timestep_spacing=spacing, **SPACINGS[spacing], **BETAS[betas])
        schedule = euler.make_euler_schedule(ours(ref), steps)
        assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas), steps
        assert torch.equal(schedule.init_noise_sigma, torch.as_tensor(ref.init_noise_sigma)) and schedule.ancestral


@pytest.mark.parametrize("steps", [61, 103])
def test_karras_trailing_at_a_count_where_diffusers_arange_runs_over_equals_euler_scheduler(steps):
    """From the samplers review: at these counts diffusers' trailing arange gives N + 1 timesteps; its Karras sigmas are
    N all the same (num_inference_steps), and diffrt's were N + 1 (the length of the arange): another image."""
    ref = reference("euler", steps, timestep_spacing="trailing", use_karras_sigmas=True, **SD)
    schedule = euler.make_euler_schedule(ours(ref), steps)
    assert len(schedule) == steps
    assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas)


def test_linspace_timesteps_are_fractional_and_fed_as_they_are():
    """Euler's default spacing lands between training steps (999, 749.25, ...): kept as floats, as diffusers feeds the UNet."""
    schedule = euler.make_euler_schedule(euler.EulerConfig(), 5)
    assert schedule.timesteps.tolist() == [999.0, 749.25, 499.5, 249.75, 0.0]
    seen = []
    sample(lambda x, t: seen.append(t) or (None, torch.zeros_like(x)), torch.zeros(1, 1, 2, 2), schedule, SamplerOptions())
    assert [float(t) for t in seen] == schedule.timesteps.tolist()


@pytest.mark.parametrize("config", [
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(rescale_betas_zero_snr=True, use_karras_sigmas=True, **SD),
    dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, **SD),
    dict(use_karras_sigmas=True, sigma_max=20.0, timestep_spacing="leading", steps_offset=1, **SD),
    dict(sigma_min=0.1, sigma_max=10.0, **SD),  # without Karras sigmas diffusers does not use them either
], ids=["zero-snr", "zero-snr-karras", "karras-bounds", "karras-max-leading", "bounds-unused"])
def test_zero_snr_and_sigma_bounds_equal_euler_scheduler(config):
    for steps in (1, 4, 25):
        ref = reference("euler", steps, **config)
        schedule = euler.make_euler_schedule(ours(ref), steps)
        assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas), steps
        assert torch.isfinite(schedule.sigmas).all() and torch.equal(schedule.alphas_cumprod, ref.alphas_cumprod)
        if "rescale_betas_zero_snr" in config:
            ref_a = reference("euler_a", steps, **{k: v for k, v in config.items() if k != "use_karras_sigmas"})
            schedule_a = euler.make_euler_schedule(ours(ref_a), steps)
            assert torch.equal(schedule_a.sigmas, ref_a.sigmas) and torch.isfinite(schedule_a.sigmas).all()


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [901.5, 500, 3], [10]])
def test_custom_timesteps_equal_euler_scheduler(timesteps):
    ref = EulerDiscreteScheduler(**SD)
    ref.set_timesteps(timesteps=timesteps)
    schedule = euler.make_euler_schedule(ours(ref), timesteps=timesteps)
    assert torch.equal(schedule.timesteps, ref.timesteps) and torch.equal(schedule.sigmas, ref.sigmas)


# --- the loop -------------------------------------------------------------------------------------------

LOOP_CONFIGS = {
    "euler": ("euler", {}),
    "euler-v": ("euler", dict(prediction_type="v_prediction")),
    "euler-sample-sigma-min": ("euler", dict(prediction_type="sample", final_sigmas_type="sigma_min")),
    "euler-karras": ("euler", dict(use_karras_sigmas=True, **SD)),
    "euler-leading": ("euler", dict(timestep_spacing="leading", steps_offset=1, **SD)),
    "euler-v-zero-snr-trailing": ("euler", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    "euler_a": ("euler_a", {}),
    "euler_a-v": ("euler_a", dict(prediction_type="v_prediction", **SD)),
    "euler_a-leading": ("euler_a", dict(timestep_spacing="leading", steps_offset=1, **SD)),
    "euler_a-v-zero-snr-trailing": ("euler_a", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                    timestep_spacing="trailing")),
}


def reference_loop(ref, model, x_T: torch.Tensor, generator, begin: int | None = None, noised=None):
    """diffusers' denoising loop by hand, as StableDiffusionPipeline runs it; the VE sample after each step."""
    x = x_T * ref.init_noise_sigma if noised is None else noised
    out = []
    for t in ref.timesteps[begin or 0:]:
        x = ref.step(model(ref.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("name", LOOP_CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
def test_loop_equals_scheduler_step_and_draws_as_it_draws(name, steps):
    """euler_step at every step (the loop's x the UNet's input, so x_VE / sqrt(sigma^2 + 1)), and the whole loop,
    equal scheduler.step driven by hand; the generator ends where diffusers' ends: one draw a step for Euler
    Ancestral, the last step's too (its sigma_up is 0), none for Euler."""
    kind, config = LOOP_CONFIGS[name]
    ref = reference(kind, steps, **config)
    schedule = euler.make_euler_schedule(ours(ref), steps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g_ref = torch.Generator().manual_seed(1)
    want = reference_loop(ref, fake_model, x_T, g_ref)
    g_step = torch.Generator().manual_seed(1)
    x = schedule.initial_noise(x_T)
    for i, t in enumerate(schedule.timesteps):
        noise = torch.randn(x.shape, generator=g_step) if schedule.ancestral else None
        x = euler.euler_step(x, fake_model(x, t), schedule, i, noise)
        assert_near(x * schedule.input_scales[i + 1], want[i], x_T * ref.init_noise_sigma, *want[:i])
    assert_near(x, want[-1], x_T * ref.init_noise_sigma, *want)  # the final sample unscaled, as diffusers decodes it
    g_loop = torch.Generator().manual_seed(1)
    looped = sample(lambda x, t: (None, fake_model(x, t)), schedule.initial_noise(x_T), schedule, SamplerOptions(generator=g_loop))
    assert torch.equal(looped, x)
    assert torch.equal(g_loop.get_state(), g_ref.get_state())
    assert schedule.draws_step_noise(0.0) == (kind == "euler_a")
    if kind == "euler":
        assert torch.equal(g_loop.get_state(), torch.Generator().manual_seed(1).get_state())  # churn 0: diffusers draws none


@pytest.mark.parametrize("name", ["euler-karras", "euler-v", "euler_a-v"])
@pytest.mark.parametrize("start", [1, 3])
def test_the_tail_of_a_schedule_is_img2img_set_begin_index(name, start):
    """img2img: the steps from t_start on, the image noised to that step's sigma (x0 + sigma noise, VE) as the UNet's
    input there, as add_noise after set_begin_index, then the loop."""
    kind, config = LOOP_CONFIGS[name]
    steps = 6
    ref = reference(kind, steps, **config)
    schedule = euler.make_euler_schedule(ours(ref), steps).tail(start)
    x0, noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(2, 4, 8, 8)
    ref.set_begin_index(start)
    noised = ref.add_noise(x0, noise, ref.timesteps[start:start + 1].repeat(2))
    x = schedule.add_noise(x0, noise)
    assert_near(x * schedule.input_scales[0], noised, rel=2e-7)
    want = reference_loop(ref, fake_model, None, torch.Generator().manual_seed(4), begin=start, noised=noised)
    got = sample(lambda x, t: (None, fake_model(x, t)), x, schedule, SamplerOptions(generator=torch.Generator().manual_seed(4)))
    assert_near(got, want[-1], noised, *want)


@pytest.mark.parametrize("kind", CLASSES)
def test_loop_with_cfg_rescale_and_a_generator_per_image_equals_scheduler(kind):
    """CFG (and guidance_rescale) combined before the step; Euler Ancestral's noise drawn row by row from each
    image's generator, as diffusers' randn_tensor draws from a list."""
    from diffrt.runtime.sampling import combine_cfg

    ref = reference(kind, 6, **SD)
    scale, x_T = 3.0, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def branches(x, t):
        return torch.cos(x + float(t) / 300), torch.sin(x * 2 - float(t) / 500)

    want_gens = generators(5, 6)
    x = x_T * ref.init_noise_sigma
    for t in ref.timesteps:
        x = ref.step(combine_cfg(*branches(ref.scale_model_input(x, t), t), scale, 0.6), t, x, generator=want_gens).prev_sample
    gens = generators(5, 6)
    schedule = euler.make_euler_schedule(ours(ref), 6)
    got = sample(branches, schedule.initial_noise(x_T), schedule, SamplerOptions(guidance_scale=scale, guidance_rescale=0.6, generator=gens))
    # guidance_rescale's std, over values the VE scaling has made ~70, rounds apart by a few ulp: Euler Ancestral
    # measured 1.25e-6 of the scale on an AMD EPYC (AVX2 and AVX-512 kernels alike), 2.5e-6 with torch's scalar ones.
    assert_near(got, x, x_T * ref.init_noise_sigma, rel=4e-6)
    assert all(torch.equal(g.get_state(), w.get_state()) for g, w in zip(gens, want_gens))
    if kind == "euler_a":  # the noise depends on each image's own generator: another seed for image 1 changes image 1 only
        other = sample(branches, schedule.initial_noise(x_T), schedule, SamplerOptions(guidance_scale=scale, generator=generators(5, 7)))
        same = sample(branches, schedule.initial_noise(x_T), schedule, SamplerOptions(guidance_scale=scale, generator=generators(5, 6)))
        assert torch.equal(other[0], same[0]) and max_abs(other[1], same[1]) > 1e-3


def test_euler_never_takes_the_fused_ddim_kernel(monkeypatch):
    assert_never_takes_the_fused_ddim_kernel(monkeypatch, "Euler", euler.make_euler_schedule(euler.EulerConfig(), 3),
                                             euler.make_euler_schedule(euler.EulerAncestralConfig(), 3))


def test_a_guided_euler_step_moves_x_t_down_the_gradient_of_the_loss_on_x0():
    """Mode x0 with Euler Ancestral, by hand over diffusers' scheduler: eps held constant, the loss on the decoded
    x0 = x_VE - sigma eps of the UNet's input x_t (x_VE = x_t sqrt(sigma^2 + 1)), x_t <- x_t - scale * d loss / d x_t,
    then scheduler.step on the VE sample of the moved x_t."""
    from diffrt.runtime.guidance import Guidance

    ref = reference("euler_a", 4, **SD)
    schedule = euler.make_euler_schedule(ours(ref), 4)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss(images):
        return ((images - 0.3) ** 2).sum()

    g, x = torch.Generator().manual_seed(2), x_T * ref.init_noise_sigma
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        sigma = ref.sigmas[ref.step_index]
        eps = fake_model(x_in, t)
        x_req = x_in.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(0.01 * loss((x_req * (sigma**2 + 1) ** 0.5 - sigma * eps) / 2 + 0.5), x_req)
        x = ref.step(eps, t, (x_in - grad).detach() * (sigma**2 + 1) ** 0.5, generator=g).prev_sample
    options = SamplerOptions(guidance=(Guidance(loss, 0.01),), decode=lambda x0: x0 / 2 + 0.5, generator=torch.Generator().manual_seed(2))
    got = sample(lambda x, t: (None, fake_model(x, t)), schedule.initial_noise(x_T), schedule, options)
    assert_near(got, x, x_T * ref.init_noise_sigma)
    unguided = sample(lambda x, t: (None, fake_model(x, t)), schedule.initial_noise(x_T), schedule,
                      SamplerOptions(generator=torch.Generator().manual_seed(2)))
    assert max_abs(got, unguided) > 1e-3


# --- configs and the choice of sampler -------------------------------------------------------------------

EULER_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "interpolation_type",
                "use_karras_sigmas", "sigma_min", "sigma_max", "timestep_spacing", "timestep_type", "steps_offset",
                "rescale_betas_zero_snr", "final_sigmas_type")
ANCESTRAL_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing",
                    "steps_offset", "rescale_betas_zero_snr")


@pytest.mark.parametrize("kind,given", [
    ("euler", {}),
    ("euler", {**SD, "use_karras_sigmas": True, "sigma_min": 0.05, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing",
               "timestep_type": "continuous"}),  # continuous with epsilon: diffusers feeds the same timesteps as discrete
    ("euler_a", {}),
    ("euler_a", {**SD, "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
], ids=["euler-defaults", "euler-all", "euler_a-defaults", "euler_a-all"])
def test_an_euler_scheduler_config_reads_as_diffusers_and_round_trips(kind, given):
    """The folder's _class_name decides the sampler; the keys and defaults are that class's; the written config
    (a manifest's) reads back equal, in diffrt and in diffusers, without DDIM's keys."""
    cls = CLASSES[kind]
    given = {"_class_name": cls.__name__, **given}
    config = ddim.DDIMConfig.from_scheduler_config(given)
    assert type(config) is (euler.EulerConfig if kind == "euler" else euler.EulerAncestralConfig)
    ref = cls.from_config(given).config
    for f in EULER_FIELDS if kind == "euler" else ANCESTRAL_FIELDS:
        assert getattr(config, f) == ref[f], f
    written = json.loads(json.dumps(config.to_scheduler_config()))
    assert written["_class_name"] == cls.__name__ and ddim.DDIMConfig.from_scheduler_config(written) == config
    assert not {"clip_sample", "clip_sample_range", "set_alpha_to_one"} & set(written)
    back = cls.from_config(written).config
    assert {k: v for k, v in back.items() if not k.startswith("_")} == {k: v for k, v in ref.items() if not k.startswith("_")}


def test_choosing_euler_is_diffusers_from_config():
    """"euler" / "euler_a" on a PNDM folder's config are <cls>.from_config(pipe.scheduler.config): keys the file left out
    (SD-1.5's has no timestep_spacing) take the class's own defaults; "ddim" on an Euler config is DDIM's from_config;
    None keeps the model's own; each name gives its own class, never the other's."""
    import diffusers

    pndm = {"_class_name": "PNDMScheduler", **SD, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "clip_sample": False}
    own = ddim.DDIMConfig.from_scheduler_config(pndm)
    for kind, cls in CLASSES.items():
        chosen = choose_scheduler(own, kind)
        want = cls.from_config(diffusers.PNDMScheduler.from_config(pndm).config)
        assert type(chosen) is type(ddim.DDIMConfig.from_scheduler_config({"_class_name": cls.__name__}))
        assert (chosen.timestep_spacing, chosen.steps_offset) == ("linspace", 1)
        for steps in (1, 4, 25):
            want.set_timesteps(steps)
            schedule = euler.make_euler_schedule(chosen, steps)
            assert torch.equal(schedule.timesteps, want.timesteps) and torch.equal(schedule.sigmas, want.sigmas)
        assert choose_scheduler(chosen, kind) is chosen
        assert_ddim_back_is_ddim_from_config(chosen, cls)
    a = choose_scheduler(choose_scheduler(own, "euler"), "euler_a")
    assert type(a) is euler.EulerAncestralConfig and type(choose_scheduler(a, "euler")) is euler.EulerConfig
    karras = ddim.DDIMConfig.from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
    assert type(choose_scheduler(karras, "euler_a")) is euler.EulerAncestralConfig  # which has no Karras sigmas, as diffusers'


# What EulerDiscreteScheduler / EulerAncestralDiscreteScheduler accept and diffrt does not run: refused by name.
REFUSED = [
    ("euler", dict(use_exponential_sigmas=True), r"use_exponential_sigmas is not supported by diffrt's Euler.*set use_exponential_sigmas to false"),
    ("euler", dict(use_beta_sigmas=True), r"use_beta_sigmas is not supported"),
    ("euler", dict(interpolation_type="log_linear"), r"interpolation_type 'log_linear' is not supported.*set interpolation_type to 'linear'"),
    ("euler", dict(timestep_type="continuous", prediction_type="v_prediction"), r"timestep_type 'continuous' .* not supported"),
    ("euler", dict(prediction_type="flow_prediction"), r"prediction_type 'flow_prediction' is not supported by diffrt's Euler"),
    ("euler_a", dict(prediction_type="sample"), r"prediction_type 'sample' is not supported by Euler Ancestral"),
]


@pytest.mark.parametrize("kind,config,message", REFUSED, ids=lambda v: str(v)[:40])
def test_what_diffrt_does_not_run_is_refused_by_name(kind, config, message):
    CLASSES[kind](**config)  # diffusers takes it
    with pytest.raises(DiffrtError, match=message) as info:
        ddim.DDIMConfig.from_scheduler_config({"_class_name": CLASSES[kind].__name__, **config})
    one_line(info)


@pytest.mark.parametrize("config,kwargs,message", [
    (euler.EulerConfig(use_karras_sigmas=True), dict(timesteps=[999, 499]), r"custom timesteps and use_karras_sigmas exclude"),
    (euler.EulerAncestralConfig(), dict(timesteps=[999, 499]), r"custom timesteps need scheduler='lcm', 'dpm' or 'euler'"),
    (euler.EulerConfig(), dict(timesteps=[499, 999]), r"timesteps must be strictly descending"),
    (euler.EulerConfig(), dict(timesteps=[1000, 499]), r"timesteps must lie in \[0, 999\]"),
    (euler.EulerConfig(), dict(num_inference_steps=0), r"num_inference_steps must be in \[1, 1000\]"),
    (euler.EulerConfig(), dict(num_inference_steps=4, timesteps=[999]), r"give either num_inference_steps or timesteps"),
    (euler.EulerConfig(timestep_spacing="leading", steps_offset=1), dict(num_inference_steps=1000), r"steps_offset 1 puts timestep 1000"),
], ids=lambda v: str(v)[:40])
def test_bad_schedules_are_one_line(config, kwargs, message):
    with pytest.raises(DiffrtError, match=message) as info:
        euler.make_euler_schedule(config, **kwargs)
    one_line(info)


@pytest.mark.parametrize("config,message", [(euler.EulerConfig(), r"eta 0.5 is DDIM's; Euler is deterministic"),
                                            (euler.EulerAncestralConfig(), r"eta 0.5 is DDIM's; Euler Ancestral draws fresh noise")])
def test_eta_is_ddims_and_refused_for_both(config, message):
    with pytest.raises(DiffrtError, match=message) as info:
        make_sampling_schedule(config, 4, eta=0.5)
    one_line(info)
    with pytest.raises(DiffrtError, match=message):
        sample(lambda x, t: (None, x), torch.zeros(1, 3, 4, 4), euler.make_euler_schedule(config, 4), SamplerOptions(eta=0.5))


# --- whole images: the torch backend equals diffusers ----------------------------------------------------


FOLDERS = {
    "euler": ("euler", {}),
    "euler-karras": ("euler", dict(use_karras_sigmas=True)),
    "euler-v-sigma-min": ("euler", dict(prediction_type="v_prediction", final_sigmas_type="sigma_min")),
    "euler-leading": ("euler", dict(timestep_spacing="leading")),
    "euler_a": ("euler_a", {}),
    "euler_a-v-trailing": ("euler_a", dict(prediction_type="v_prediction", timestep_spacing="trailing")),
}


@pytest.fixture(scope="module")
def folders(t2i_folder, tmp_path_factory):
    """One SD folder (with t2i_folder's ControlNet) per FOLDERS config, made on first use, as `pipe.scheduler = cls.from_config(
    pipe.scheduler.config, **overrides); pipe.save_pretrained(dst)` writes it."""
    return lazy_scheduler_folders(t2i_folder, tmp_path_factory, "euler",
                                  {name: (CLASSES[kind], overrides) for name, (kind, overrides) in FOLDERS.items()})


@pytest.fixture(scope="module")
def ddim_pipe(t2i_folder):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU)


@pytest.mark.parametrize("name", FOLDERS)
def test_an_euler_folder_equals_stable_diffusion_pipeline(folders, name):
    """The folder's own scheduler class (its settings honoured), CFG with a negative prompt, two images from one generator."""
    kind = FOLDERS[name][0]
    pipe = open_text_to_image_pipeline(folders(name), "torch", CPU)
    assert type(pipe.scheduler) is (euler.EulerConfig if kind == "euler" else euler.EulerAncestralConfig)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, negative_prompt="blurry, dark", num_images_per_prompt=2,
                  output_type="pt")
    result, ref = assert_equals_stable_diffusion_pipeline(folders(name), pipe, kind, kwargs)
    assert type(ref.scheduler) is CLASSES[kind] and result.images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", ["euler-karras", "euler_a"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_one_to_three_steps_equal_stable_diffusion_pipeline(folders, name, steps):
    pipe = open_text_to_image_pipeline(folders(name), "torch", CPU)
    kwargs = dict(num_inference_steps=steps, guidance_scale=2.0, output_type="pt")
    result, _ = assert_equals_stable_diffusion_pipeline(folders(name), pipe, FOLDERS[name][0], kwargs, seed=4)
    assert len(result.metadata["timesteps"]) == steps


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=4.0, negative_prompt="blurry", num_images_per_prompt=2),
    dict(prompt=["a red house", PROMPT], negative_prompt=["ugly", "blurry"], guidance_scale=2.0, guidance_rescale=0.5,
         generator=(1, 2, 3, 4), num_images_per_prompt=2),
    dict(guidance_scale=7.5, num_inference_steps=20),
], ids=["cfg-negative-x2", "two-prompts-generators-rescale", "20-steps"])
def test_scheduler_euler_on_a_ddim_folder_equals_diffusers_from_config(t2i_folder, ddim_pipe, kind, kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    result, _ = assert_equals_stable_diffusion_pipeline(t2i_folder, ddim_pipe, kind, kwargs, scheduler_cls=CLASSES[kind])
    if not {"prompt", "generator"} & set(kwargs) and kwargs["num_inference_steps"] == STEPS:  # DDIM, the folder's own, differs (by
        # less with more steps: DDIM and Euler solve one ODE)
        assert max_abs(result.images, ddim_pipe(PROMPT, seed=3, **kwargs).images) > 10 * DIFFUSERS_TOL


def test_euler_custom_timesteps_and_given_latents_equal_stable_diffusion_pipeline(t2i_folder, ddim_pipe):
    """`timesteps=` (Euler's set_timesteps takes them); `latents=` are scaled by init_noise_sigma, as diffusers scales them."""
    from diffusers import StableDiffusionPipeline

    ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder, EulerDiscreteScheduler)
    kwargs = dict(guidance_scale=2.0, output_type="pt")
    want = ref(PROMPT, timesteps=[999, 749, 499, 249], generator=torch.Generator().manual_seed(2), **kwargs).images
    got = ddim_pipe(PROMPT, timesteps=[999, 749, 499, 249], scheduler="euler", seed=2, **kwargs)
    assert max_abs(got.images, want) <= DIFFUSERS_TOL and got.metadata["timesteps"] == [999.0, 749.0, 499.0, 249.0]
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    for kind in CLASSES:
        ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder, CLASSES[kind])
        want = ref(PROMPT, latents=latents.clone(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), **kwargs).images
        got = ddim_pipe(PROMPT, latents=latents.clone(), num_inference_steps=STEPS, scheduler=kind, seed=1, **kwargs).images
        assert max_abs(got, want) <= DIFFUSERS_TOL


@pytest.mark.parametrize("name,strength", [("euler", 0.6), ("euler-karras", 0.6), ("euler-v-sigma-min", 1.0),
                                           ("euler_a", 0.75), ("euler_a-v-trailing", 0.4)])
def test_img2img_equals_img2img_pipeline(folders, name, strength):
    """The last int(N * strength) steps (get_timesteps, set_begin_index), the image noised at that step's sigma."""
    kwargs = dict(strength=strength, num_inference_steps=STEPS, guidance_scale=2.5, negative_prompt="blurry", num_images_per_prompt=2)
    assert_img2img_equals_img2img_pipeline(folders(name), open_text_to_image_pipeline(folders(name), "torch", CPU), kwargs)


def test_img2img_with_a_generator_per_image_equals_img2img_pipeline(t2i_folder, ddim_pipe):
    kwargs = dict(strength=0.8, num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=2, generator=(5, 6))
    assert_img2img_equals_img2img_pipeline(t2i_folder, ddim_pipe, kwargs, scheduler_cls=EulerAncestralDiscreteScheduler, kind="euler_a",
                                           image_seed=8)


@pytest.mark.parametrize("name", ["euler", "euler-karras", "euler-v-sigma-min", "euler_a", "euler_a-v-trailing"])
def test_controlnet_equals_controlnet_pipeline(folders, name):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=3.0, num_images_per_prompt=2)
    assert_controlnet_equals_controlnet_pipeline(folders(name), FOLDERS[name][0], kwargs)


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_color_guidance_lowers_the_colour_loss_with_euler(ddim_pipe, mode):
    for kind in CLASSES:
        assert_color_guidance_lowers_the_colour_loss(ddim_pipe, mode, kind, num_inference_steps=STEPS, guidance_scale=2.0, seed=11,
                                                     scheduler=kind)


def test_bad_pipeline_arguments_are_one_line(folders, ddim_pipe):
    pipe = open_text_to_image_pipeline(folders("euler_a"), "torch", CPU)
    assert_pipeline_calls_are_refused_in_one_line([
        (pipe, dict(eta=0.5), r"eta 0.5 is DDIM's; Euler Ancestral draws fresh noise"),
        (ddim_pipe, dict(scheduler="euler", eta=0.3), r"eta 0.3 is DDIM's; Euler is deterministic"),
        (pipe, dict(timesteps=[999, 499]), r"custom timesteps need scheduler='lcm', 'dpm' or 'euler'"),
        (ddim_pipe, dict(scheduler="heun"), r"scheduler must be 'ddim', 'lcm', 'dpm', 'euler' or 'euler_a' .* got 'heun'"),
        (pipe, dict(image=torch.rand(1, 3, 32, 32), strength=0.1), r"strength 0.1 x 5 steps leaves no denoising step"),
    ], STEPS)


# --- pixel-space models: the same loop ----------------------------------------------------------------


@pytest.mark.parametrize("kind,overrides", [("euler", {}), ("euler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min")),
                                            ("euler_a", {}), ("euler_a", dict(timestep_spacing="leading", steps_offset=1))],
                         ids=["euler", "euler-karras-sigma-min", "euler_a", "euler_a-leading"])
def test_class_conditioned_pixel_euler_with_cfg_equals_scheduler_by_hand(classemb_model_dir, kind, overrides):
    """diffusers' DDPMPipeline neither scales x_T by init_noise_sigma nor calls scale_model_input, so it does not run
    Euler as Euler: the reference is the loop StableDiffusionPipeline runs, by hand, with one generator for x_T and
    the steps' noise."""
    from diffrt.models import load_pixel_model
    from diffrt.runtime.loading import torch_pixel_pipeline

    model = load_pixel_model(classemb_model_dir)
    labels, scale = torch.tensor([1, 3]), 3.0
    scheduler = CLASSES[kind].from_config(model.scheduler.to_scheduler_config(), **overrides)
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(5)
    want = class_cfg_by_hand(model, scheduler, torch.randn(2, 3, 16, 16, generator=g) * scheduler.init_noise_sigma, labels, scale, g)
    config = ddim.DDIMConfig.from_scheduler_config({"_class_name": type(scheduler).__name__, **scheduler.config})
    got = torch_pixel_pipeline(model)(labels, num_inference_steps=STEPS, guidance_scale=scale, output_type="pt", seed=5,
                                      scheduler=config)
    assert got.metadata["scheduler"] == kind and max_abs(got.images, want) <= DIFFUSERS_TOL


def test_pixel_scheduler_euler_a_on_a_ddim_folder_and_an_euler_folder(uncond_model_dir, tmp_path):
    from diffrt.runtime.loading import open_pixel_pipeline

    kwargs = dict(num_images=2, num_inference_steps=STEPS, seed=7, output_type="pt")
    pipe = open_pixel_pipeline(uncond_model_dir, "torch", CPU)
    chosen = pipe(scheduler="euler_a", **kwargs)
    assert chosen.metadata["scheduler"] == "euler_a" and max_abs(chosen.images, pipe(**kwargs).images) > 1e-3
    folder = shutil.copytree(uncond_model_dir, tmp_path / "euler_a")
    EulerAncestralDiscreteScheduler.from_config(DDIMScheduler.from_pretrained(folder / "scheduler").config).save_pretrained(folder / "scheduler")
    own = open_pixel_pipeline(folder, "torch", CPU)(**kwargs)
    assert own.metadata["scheduler"] == "euler_a" and torch.equal(own.images, chosen.images)


# --- exported artifacts, the CLI and the service -----------------------------------------------------------


@pytest.fixture(scope="module")
def euler_a_artifact(folders, tmp_path_factory):
    """The Euler Ancestral folder exported without its ControlNet (fp32 ONNX)."""
    return export_t2i_artifact(folders("euler_a"), tmp_path_factory.mktemp("euler_a_artifact") / "artifact")


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=3.0, negative_prompt="blurry", num_images_per_prompt=2),
                                    dict(guidance_scale=2.0, image=0.6)], ids=["cfg-negative-x2", "img2img"])
def test_an_euler_a_artifact_on_onnxruntime_equals_torch(euler_a_artifact, folders, kwargs):
    from diffrt.export import manifest as mf

    written = mf.read_manifest(euler_a_artifact)["pipeline"]["scheduler"]
    assert written["_class_name"] == "EulerAncestralDiscreteScheduler" and written["timestep_spacing"] == "leading"  # the folder's
    ort = assert_an_artifact_on_onnxruntime_equals_torch(euler_a_artifact, open_text_to_image_pipeline(folders("euler_a"), "torch", CPU),
                                                         "euler_a", kwargs, STEPS)
    assert type(ort.scheduler) is euler.EulerAncestralConfig


def test_scheduler_euler_karras_on_a_ddim_artifact_equals_torch(t2i_artifact, ddim_pipe):
    """Fractional timesteps (Karras sigmas) reach the ONNX UNet as the float32 timestep it takes."""
    config = ddim.DDIMConfig.from_scheduler_config({**ddim_pipe.scheduler.to_scheduler_config(), "_class_name": "EulerDiscreteScheduler",
                                                    "use_karras_sigmas": True})
    result = assert_a_ddim_artifact_equals_torch(t2i_artifact, ddim_pipe, "euler", num_inference_steps=STEPS, guidance_scale=3.0,
                                                 scheduler=config)
    assert any(t != int(t) for t in result.metadata["timesteps"])


def test_a_pixel_euler_artifact_carries_euler_to_onnxruntime(uncond_model_dir, tmp_path):
    assert_a_pixel_artifact_carries_the_scheduler(uncond_model_dir, tmp_path, EulerDiscreteScheduler, "euler", STEPS, use_karras_sigmas=True)


def test_cli_generate_scheduler_euler_a_is_the_pipelines_euler_a(t2i_folder, ddim_pipe, tmp_path):
    """`diffrt generate --scheduler euler_a` samples a DDIM folder with Euler Ancestral at guidance 7.5: the images
    of the pipeline called with scheduler="euler_a"; eta is refused (exit 2)."""
    # unlike scheduler="euler": the ancestral noise makes a difference
    assert_cli_generate_is_the_pipelines(t2i_folder, ddim_pipe, tmp_path, "euler_a", 4, 7.5, unlike="euler")
    assert cli_generate(t2i_folder, tmp_path / "x.npy", "--scheduler", "euler", "--eta", "0.5", "--steps", "4") == 2


def test_serve_euler_a_requests_batch_apart_from_other_samplers_each_as_alone(euler_a_artifact):
    """The service's `scheduler` field: "euler" and "euler_a" are accepted (also by Triton's input), an Euler Ancestral
    folder's requests are Euler Ancestral by default and keep their generator (one draw per step), they never share
    a batch with Euler or DDIM requests, a shared batch gives each request the images `diffrt generate` gives it
    alone, and eta is refused naming the field."""
    pytest.importorskip("fastapi")
    assert_the_service_batches_a_sampler_apart(euler_a_artifact, "euler_a", STEPS, draws_noise=True, others=["euler", "ddim"],
                                               eta_refused={None: "Euler Ancestral draws fresh noise", "euler": "Euler is deterministic"})


# --- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,config", [("euler", dict(use_karras_sigmas=True)), ("euler_a", {})], ids=["euler-karras", "euler_a"])
def test_shipped_model_samples_on_cuda_as_on_the_cpu(kind, config, no_tf32):
    """The schedule's scalars are CPU tensors and the noise is drawn on the CPU generator: on CUDA the shipped digits
    model's Euler images equal the CPU's (TF32 off, so fp32 means fp32)."""
    from diffrt.models import shipped_digits_model
    from diffrt.runtime.loading import torch_pixel_pipeline

    model = shipped_digits_model()
    scheduler = ddim.DDIMConfig.from_scheduler_config({**model.scheduler.to_scheduler_config(), "_class_name": CLASSES[kind].__name__,
                                                       **config})
    kwargs = dict(num_inference_steps=12, guidance_scale=2.0, seed=3, scheduler=scheduler, output_type="pt")
    cpu = torch_pixel_pipeline(model)(torch.arange(10), **kwargs).images
    cuda = torch_pixel_pipeline(model, device="cuda")(torch.arange(10), **kwargs).images
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=1e-3)
