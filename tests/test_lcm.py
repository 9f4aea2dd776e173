"""LCM sampling (runtime/lcm.py) against diffusers' LCMScheduler, the oracle.

Pure functions: the timesteps of set_timesteps (step counts, original_inference_steps, strength,
custom schedules), the boundary-condition scalings, and the loop with the noise injected between
steps, against LCMScheduler.set_timesteps/step driven by hand. Whole images: a Stable Diffusion
folder whose scheduler is LCMScheduler equals StableDiffusionPipeline (and its img2img and
ControlNet pipelines); `scheduler="lcm"` on a DDIM folder equals diffusers after
`pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)` (with an LCM-LoRA fused, the
case LCM-LoRA is for); an exported artifact carries LCM in its manifest and runs it on ONNX
Runtime; pixel models run it as DDPMPipeline does; bad settings are one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from conftest import (CPU, DIFFUSERS_TOL, ORT_TOL, PROMPT, assert_a_ddim_artifact_equals_torch, assert_a_pixel_artifact_carries_the_scheduler,
                      assert_an_artifact_on_onnxruntime_equals_torch, assert_batched_together_each_as_alone,
                      assert_cli_generate_is_the_pipelines, assert_color_guidance_lowers_the_colour_loss,
                      assert_controlnet_equals_controlnet_pipeline, assert_ddim_back_is_ddim_from_config,
                      assert_equals_stable_diffusion_pipeline, assert_img2img_equals_img2img_pipeline,
                      assert_never_takes_the_fused_ddim_kernel, assert_pipeline_calls_are_refused_in_one_line,
                      assert_pixel_pipeline_equals_ddpm_pipeline, class_cfg_by_hand, diffusers_pipe, export_t2i_artifact, generators,
                      max_abs, one_line, sd_folder_with_scheduler, serve_worker)
from diffrt.errors import DiffrtError
from diffrt.runtime import ddim, lcm
from diffrt.runtime.sampling import SamplerOptions, choose_scheduler, sample
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def sd_lcm(t2i_folder, tmp_path_factory):
    """A copy of t2i_folder with its scheduler replaced by LCMScheduler, as `pipe.scheduler =
    LCMScheduler.from_config(pipe.scheduler.config); pipe.save_pretrained(dst)` writes it."""
    return sd_folder_with_scheduler(t2i_folder, tmp_path_factory.mktemp("sd_lcm") / "sd", LCMScheduler)


@pytest.fixture(scope="module")
def lcm_pipe(sd_lcm):
    return open_text_to_image_pipeline(sd_lcm, "torch", CPU)


@pytest.fixture(scope="module")
def ddim_pipe(t2i_folder):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU)


# --- the schedule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("original", [50, 4, 30, 100, 1000])
@pytest.mark.parametrize("strength", [1.0, 0.6, 0.33])
def test_timesteps_equal_lcm_scheduler_for_every_step_count(original, strength):
    """Every N the distillation schedule admits; original_inference_steps from the config and as an argument."""
    by_config = LCMScheduler(original_inference_steps=original)
    by_argument = LCMScheduler()
    ours = lcm.LCMConfig(original_inference_steps=original)
    for n in range(1, int(original * strength) + 1):
        by_config.set_timesteps(n, strength=strength)
        by_argument.set_timesteps(n, original_inference_steps=original, strength=strength)
        assert torch.equal(lcm.make_lcm_timesteps(ours, n, strength=strength), by_config.timesteps), n
        got = lcm.make_lcm_timesteps(lcm.LCMConfig(), n, original_inference_steps=original, strength=strength)
        assert torch.equal(got, by_argument.timesteps), n


@pytest.mark.parametrize("timesteps,strength", [([999, 759, 499, 259], 1.0), ([999, 759, 499, 259], 0.5),
                                                ([899, 500, 19], 1.0), ([999, 879, 759, 639, 499, 259, 19], 0.7)])
def test_custom_timesteps_equal_lcm_scheduler(timesteps, strength):
    ref = LCMScheduler()
    ref.set_timesteps(timesteps=timesteps, strength=strength)
    assert torch.equal(lcm.make_lcm_timesteps(lcm.LCMConfig(), timesteps=timesteps, strength=strength), ref.timesteps)


@pytest.mark.parametrize("scaling", [10.0, 1.0, 2.5])
def test_boundary_scalings_equal_lcm_scheduler(scaling):
    ref = LCMScheduler(timestep_scaling=scaling)
    steps = torch.tensor([999, 759, 499, 259, 39, 19, 3, 1, 0])
    c_skip, c_out = lcm.boundary_scalings(steps, scaling)
    want = [ref.get_scalings_for_boundary_condition_discrete(t) for t in steps]  # t as the pipelines pass it: a tensor
    assert torch.equal(c_skip, torch.stack([s for s, _ in want])) and torch.equal(c_out, torch.stack([o for _, o in want]))
    assert (c_skip[-1], c_out[-1]) == (1.0, 0.0)  # f is the identity at t = 0


# Scheduler configs that exercise every branch of the step: prediction types, clipping, dynamic
# thresholding, the beta schedules, zero terminal SNR, another distillation schedule and scaling.
LOOP_CONFIGS = {
    "lcm-lora-sd15": dict(set_alpha_to_one=False, steps_offset=1),
    "v-zero-snr": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "sample-clip": dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.7),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    "linear-original20-scaling5": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, original_inference_steps=20,
                                       timestep_scaling=5.0),
    "cosine-v": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=True),
}


def fake_model(x, t):
    """A deterministic stand-in for a UNet: any function of (x, t) exercises the update."""
    return torch.sin(x * 3 + float(t) / 100)


@pytest.mark.parametrize("name", LOOP_CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_loop_equals_lcm_scheduler_step(name, steps):
    """x0 and f(x_t) at every step (lcm_step) and the whole loop (sampling.sample), with the noise
    drawn between steps from the same generator, equal LCMScheduler.step driven by hand."""
    ref = LCMScheduler(**LOOP_CONFIGS[name])
    ref.set_timesteps(steps)
    config = lcm.LCMConfig.from_scheduler_config(dict(ref.config))
    schedule = lcm.make_lcm_schedule(config, steps)
    assert torch.equal(schedule.timesteps, ref.timesteps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x_ref, x_ours = x_T.clone(), x_T.clone()
    for i, t in enumerate(ref.timesteps):
        out = ref.step(fake_model(x_ref, t), t, x_ref, generator=g_ref)
        noise = torch.randn(x_ours.shape, generator=g_ours) if i < steps - 1 else None
        x_ours, denoised = lcm.lcm_step(x_ours, fake_model(x_ours, t), schedule.alpha_bar[i], schedule.alpha_bar_next[i],
                                        schedule.c_skip[i], schedule.c_out[i], prediction_type=schedule.prediction_type,
                                        clip_sample_range=schedule.clip_sample_range, threshold=schedule.threshold, noise=noise)
        torch.testing.assert_close(denoised, out.denoised, rtol=1e-5, atol=1e-6)
        x_ref = out.prev_sample
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-6)
    looped = sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule,
                    SamplerOptions(generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(looped, x_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loop_near_t0_where_c_skip_counts_equals_lcm_scheduler(prediction_type):
    """At the usual timesteps c_skip is ~1e-8 and f(x_t) is x0; a custom schedule down to t = 0 (where f is
    the identity) checks the boundary condition's c_skip x_t term too."""
    steps = [999, 259, 9, 2, 1, 0]
    ref = LCMScheduler(prediction_type=prediction_type)
    ref.set_timesteps(timesteps=steps)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x, g = x_T.clone(), torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        x = ref.step(fake_model(x, t), t, x, generator=g).prev_sample
    schedule = lcm.make_lcm_schedule(lcm.LCMConfig(prediction_type=prediction_type), timesteps=steps)
    got = sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule, SamplerOptions(generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


def test_loop_with_cfg_and_a_generator_per_image_equals_lcm_scheduler():
    """CFG combined before the step, and diffusers' list of generators: row i's noise from generator i."""
    ref = LCMScheduler(set_alpha_to_one=False)
    ref.set_timesteps(4)
    scale, x_T = 1.7, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def branches(x, t):
        return torch.cos(x + float(t) / 300), torch.sin(x * 2 - float(t) / 500)

    x, gens = x_T.clone(), generators(5, 6)
    for t in ref.timesteps:
        eps_u, eps_c = branches(x, t)
        x = ref.step(eps_u + scale * (eps_c - eps_u), t, x, generator=gens).prev_sample
    schedule = lcm.make_lcm_schedule(lcm.LCMConfig.from_scheduler_config(dict(ref.config)), 4)
    got = sample(branches, x_T.clone(), schedule, SamplerOptions(guidance_scale=scale, generator=generators(5, 6)))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


def test_lcm_never_takes_the_fused_ddim_kernel(monkeypatch):
    """use_fused_kernel (on by default) fuses CFG with the DDIM step; an LCM step with CFG must not reach it."""
    assert_never_takes_the_fused_ddim_kernel(monkeypatch, "LCM", lcm.make_lcm_schedule(lcm.LCMConfig(), 2))


# --- configs and the choice of sampler -------------------------------------------------------------------


def test_an_lcm_scheduler_config_reads_as_lcm_scheduler_and_round_trips():
    for given in ({"_class_name": "LCMScheduler"},  # LCMScheduler's defaults, not DDIM's
                  {"_class_name": "LCMScheduler", "original_inference_steps": 20, "timestep_scaling": 4.0, "thresholding": True,
                   "beta_schedule": "linear", "prediction_type": "v_prediction", "set_alpha_to_one": False}):
        ours = ddim.DDIMConfig.from_scheduler_config(given)
        assert type(ours) is lcm.LCMConfig
        ref = LCMScheduler.from_config(given).config
        for f in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "original_inference_steps", "clip_sample",
                  "set_alpha_to_one", "prediction_type", "thresholding", "timestep_scaling", "rescale_betas_zero_snr"):
            assert getattr(ours, f) == ref[f], f
        written = json.loads(json.dumps(ours.to_scheduler_config()))  # what a manifest holds
        assert written["_class_name"] == "LCMScheduler" and ddim.DDIMConfig.from_scheduler_config(written) == ours


def test_choosing_a_sampler_is_diffusers_from_config():
    """"lcm" on a DDIM/PNDM folder's config is LCMScheduler.from_config(pipe.scheduler.config); "ddim" on an
    LCM config is DDIMScheduler.from_config(that config); None keeps the model's own."""
    pndm = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
    own = ddim.DDIMConfig.from_scheduler_config(pndm)
    chosen = choose_scheduler(own, "lcm")
    import diffusers

    want = LCMScheduler.from_config(diffusers.PNDMScheduler.from_config(pndm).config)
    assert type(chosen) is lcm.LCMConfig
    for steps in (1, 4, 8):
        want.set_timesteps(steps)
        schedule = lcm.make_lcm_schedule(chosen, steps)
        assert torch.equal(schedule.timesteps, want.timesteps) and torch.equal(schedule.alphas_cumprod, want.alphas_cumprod)
    assert choose_scheduler(own, None) is own and choose_scheduler(own, "ddim") is own
    back = assert_ddim_back_is_ddim_from_config(chosen, LCMScheduler)
    assert back == own  # DDIM -> LCM -> DDIM keeps every DDIM setting
    with pytest.raises(DiffrtError, match=r"dynamic thresholding is not supported by diffrt's DDIM"):
        choose_scheduler(lcm.LCMConfig(thresholding=True), "ddim")


# --- bad settings: one line, as diffusers refuses them or better ----------------------------------------


@pytest.mark.parametrize("kwargs,message,diffusers_raises", [
    (dict(num_inference_steps=51), r"num_inference_steps 51 is too many; use at most 50 steps", True),
    (dict(num_inference_steps=6, strength=0.1), r"original_inference_steps 50 x strength 0.1 = 5\).*at most 5 steps.*higher strength",
     True),
    (dict(num_inference_steps=4, original_inference_steps=1001), r"original_inference_steps must be in \[1, 1000\]", True),
    (dict(num_inference_steps=4, original_inference_steps=0), r"original_inference_steps must be in \[1, 1000\]", True),
    (dict(num_inference_steps=0), r"num_inference_steps must be >= 1", True),
    (dict(num_inference_steps=4, strength=0.0), r"strength must be in \(0, 1\]", True),
    (dict(num_inference_steps=4, strength=1.5), r"strength must be in \(0, 1\]", False),  # diffusers indexes past the end
    (dict(timesteps=[259, 499]), r"timesteps must be strictly descending", True),
    (dict(timesteps=[1000, 499]), r"timesteps must lie in \[0, 999\]", True),
    (dict(timesteps=[999, -1]), r"timesteps must lie in \[0, 999\]", False),  # diffusers wraps to alphas_cumprod[-1]
    (dict(timesteps=[999, 499], strength=0.4), r"strength 0.4 x 2 timesteps leaves no step", False),  # diffusers: 0 steps
    (dict(num_inference_steps=4, timesteps=[999]), r"give either num_inference_steps or timesteps", True),
    (dict(), r"give either num_inference_steps or timesteps", True),
], ids=lambda v: str(v)[:40] if not isinstance(v, bool) else "")
def test_bad_schedules_are_one_line(kwargs, message, diffusers_raises):
    with pytest.raises(DiffrtError, match=message) as info:
        lcm.make_lcm_timesteps(lcm.LCMConfig(), **kwargs)
    one_line(info)
    ref = LCMScheduler()
    kw = dict(kwargs)
    steps = kw.pop("num_inference_steps", None)
    if diffusers_raises:
        with pytest.raises((ValueError, ZeroDivisionError)):
            ref.set_timesteps(steps, **kw)


def test_bad_pipeline_arguments_are_one_line(lcm_pipe, ddim_pipe):
    assert_pipeline_calls_are_refused_in_one_line([
        (lcm_pipe, dict(num_inference_steps=60), r"num_inference_steps 60 is too many; use at most 50 steps"),
        (lcm_pipe, dict(eta=0.5), r"eta 0.5 is DDIM's; LCM draws fresh noise between its steps"),
        (ddim_pipe, dict(scheduler="lcm", eta=0.3), r"eta 0.3 is DDIM's"),
        (ddim_pipe, dict(timesteps=[999, 499]), r"custom timesteps need scheduler='lcm'"),
        (ddim_pipe, dict(scheduler="heun"), r"scheduler must be 'ddim', 'lcm', 'dpm', 'euler' or 'euler_a' .* got 'heun'"),
        (lcm_pipe, dict(image=torch.rand(1, 3, 32, 32), strength=0.2), r"strength 0.2 x 4 steps leaves no denoising step"),
    ], STEPS)


@pytest.mark.parametrize("dim", [256, 255, 32])
def test_the_guidance_scale_embedding_equals_diffusers(dim):
    """timestep_cond of an LCM-distilled UNet: diffusers' get_guidance_scale_embedding of w = scale - 1."""
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 7.0, 0.5, -1.0])
    want = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    got = lcm.guidance_scale_embedding(w, dim)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (4, dim)
    assert torch.equal(got, want)
    with pytest.raises(DiffrtError, match=r"one per image, shape \[batch\]"):
        lcm.guidance_scale_embedding(w[None], dim)


# --- LCM-distilled UNets: time_cond_proj_dim, the guidance scale as the timestep_cond embedding ----------------

DISTILLED_DIM = 32  # LCM_Dreamshaper_v7 has 256; the tiny UNet's time embedding is 32 wide


def distilled_folder(src, dst, dim: int = DISTILLED_DIM, seed: int = 0):
    """A copy of SD folder `src` whose UNet has time_cond_proj_dim: its weights, plus a random cond_proj
    (the Linear that adds the embedded guidance scale to the timestep embedding), as a distilled UNet has."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(src, dst)
    base = UNet2DConditionModel.from_pretrained(src / "unet")
    unet = UNet2DConditionModel.from_config({**base.config, "time_cond_proj_dim": dim})
    missing, unexpected = unet.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    unet.save_pretrained(dst / "unet")
    return dst


@pytest.fixture(scope="module")
def sd_distilled(sd_lcm, tmp_path_factory):
    """sd_lcm (LCMScheduler) with an LCM-distilled UNet, and the ControlNet of t2i_folder in controlnet/."""
    return distilled_folder(sd_lcm, tmp_path_factory.mktemp("sd_distilled") / "sd")


@pytest.fixture(scope="module")
def distilled_pipe(sd_distilled):
    return open_text_to_image_pipeline(sd_distilled, "torch", CPU)


def test_a_distilled_lcm_unet_takes_timestep_cond_and_an_ordinary_one_keeps_its_spec(t2i_folder, sd_distilled, distilled_pipe):
    """Only a UNet with time_cond_proj_dim gets the timestep_cond input (last); every other spec, and so
    every existing artifact's key, is as it was."""
    from diffrt.text_to_image_models import check_unet_config, component_specs, load_text_to_image

    check_unet_config({"time_cond_proj_dim": 256})  # no longer refused
    ranges = dict(batch=(1, 2, 4), height=(32, 32, 64), width=(32, 32, 64))
    names = ["unet", "unet_controlnet", "controlnet"]
    plain = component_specs(load_text_to_image(t2i_folder, t2i_folder / "controlnet", weights=False), names, **ranges)
    assert plain["unet"].input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert plain["unet_controlnet"].input_names == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond",
                                                    "conditioning_scale"]
    distilled = component_specs(load_text_to_image(sd_distilled, sd_distilled / "controlnet", weights=False), names, **ranges)
    for name in ("unet", "unet_controlnet"):
        assert distilled[name].input_names == [*plain[name].input_names, "timestep_cond"]
        assert distilled[name].inputs[-1].dims == ("batch", DISTILLED_DIM)
        assert distilled[name].outputs == plain[name].outputs and distilled[name].ranges == plain[name].ranges
    assert distilled["controlnet"] == plain["controlnet"]  # diffusers gives the ControlNets no timestep_cond
    assert distilled_pipe.guidance_embed_dim == DISTILLED_DIM and distilled_pipe.unet.spec.input_names[-1] == "timestep_cond"
    assert not distilled_pipe.uses_cfg(8.0)


@pytest.mark.parametrize("guidance_scale", [1.0, 8.0])
def test_a_distilled_lcm_unet_equals_stable_diffusion_pipeline(sd_distilled, distilled_pipe, guidance_scale, caplog):
    """StableDiffusionPipeline with a time_cond_proj_dim UNet: no CFG at any scale (the negative prompt
    unused), timestep_cond = the embedding of guidance_scale - 1 for every image, every step."""
    from diffusers import StableDiffusionPipeline

    kwargs = dict(num_inference_steps=STEPS, guidance_scale=guidance_scale, negative_prompt="blurry", num_images_per_prompt=2,
                  output_type="pt")
    ref = diffusers_pipe(StableDiffusionPipeline, sd_distilled)
    assert isinstance(ref.scheduler, LCMScheduler) and ref.unet.config.time_cond_proj_dim == DISTILLED_DIM
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), **kwargs).images
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        result = distilled_pipe(PROMPT, seed=3, **kwargs)
    assert "the negative prompt is unused" in caplog.text
    assert result.images.shape == want.shape == (2, 3, 32, 32)
    assert max_abs(result.images, want) <= DIFFUSERS_TOL
    assert result.metadata["negative_prompt"] is None and result.metadata["scheduler"] == "lcm"


def test_the_guidance_scale_embedding_steers_a_distilled_unet(distilled_pipe):
    """Without timestep_cond (or with another w) the images differ by far more than the tolerances above,
    so the tests that compare with diffusers fail if the embedding is dropped."""
    kwargs = dict(num_inference_steps=STEPS, output_type="pt", seed=3)
    images = {scale: distilled_pipe(PROMPT, guidance_scale=scale, **kwargs).images for scale in (1.0, 8.0)}
    assert max_abs(images[1.0], images[8.0]) > 1e-2


def test_a_distilled_lcm_unet_img2img_equals_img2img_pipeline(sd_distilled, distilled_pipe):
    kwargs = dict(strength=0.6, num_inference_steps=STEPS, guidance_scale=8.0, num_images_per_prompt=2)
    assert_img2img_equals_img2img_pipeline(sd_distilled, distilled_pipe, kwargs)


def test_a_distilled_lcm_unet_with_controlnet_equals_controlnet_pipeline(sd_distilled):
    """StableDiffusionControlNetPipeline feeds timestep_cond to the UNet only: so does the fused graph."""
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=8.0, num_images_per_prompt=2)
    pipe = assert_controlnet_equals_controlnet_pipeline(sd_distilled, "lcm", kwargs)
    assert pipe.unet.spec.input_names[-1] == "timestep_cond"


@pytest.mark.parametrize("controlnet", [False, True], ids=["unet", "unet_controlnet"])
def test_a_distilled_lcm_artifact_on_onnxruntime_equals_torch(sd_distilled, tmp_path, controlnet):
    """The exported UNet graph takes timestep_cond (its parity check fed it), and the ONNX Runtime pipeline feeds it."""
    from diffrt.export import manifest as mf

    controlnets = [sd_distilled / "controlnet"] if controlnet else []
    out = export_t2i_artifact(sd_distilled, tmp_path / "artifact", controlnets)
    name = "unet_controlnet" if controlnet else "unet"
    entry = mf.read_manifest(out)["components"][name]
    assert entry["spec"]["inputs"][-1] == {"name": "timestep_cond", "dims": ["batch", DISTILLED_DIM], "dtype": "float32", "high": 10}
    assert entry["parity"]["onnxruntime"]
    ort = open_text_to_image_pipeline(out, "onnxruntime", CPU)
    torch_pipe = open_text_to_image_pipeline(sd_distilled, "torch", CPU, controlnet=controlnets or None)
    control = dict(control_image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))) if controlnet else {}
    for scale in (1.0, 8.0):
        kwargs = dict(num_inference_steps=STEPS, guidance_scale=scale, num_images_per_prompt=2, output_type="pt", seed=5, **control)
        result, expected = ort(PROMPT, **kwargs), torch_pipe(PROMPT, **kwargs)
        assert result.backend == "onnxruntime"
        assert max_abs(result.images, expected.images) <= ORT_TOL


# --- whole images: the torch backend equals diffusers ----------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=1.0, num_images_per_prompt=2),
    dict(guidance_scale=1.5, negative_prompt="blurry, dark", num_images_per_prompt=2),
    dict(prompt=["a red house", PROMPT], negative_prompt=["ugly", "blurry"], guidance_scale=2.0, guidance_rescale=0.5,
         generator=(1, 2, 3, 4), num_images_per_prompt=2),
    dict(guidance_scale=1.0, timesteps=[999, 499, 259]),
    dict(guidance_scale=1.5, num_inference_steps=1),
], ids=["no-cfg-x2", "cfg-negative-x2", "two-prompts-generators-rescale", "custom-timesteps", "one-step"])
def test_an_lcm_folder_equals_stable_diffusion_pipeline(sd_lcm, lcm_pipe, kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    result, ref = assert_equals_stable_diffusion_pipeline(sd_lcm, lcm_pipe, "lcm", kwargs)
    assert isinstance(ref.scheduler, LCMScheduler)
    if "timesteps" in kwargs:
        assert result.metadata["timesteps"] == kwargs["timesteps"]


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_equals_img2img_pipeline_with_lcm(sd_lcm, lcm_pipe, strength):
    """The last int(N * strength) LCM steps (diffusers' get_timesteps), the image noised to the first."""
    kwargs = dict(strength=strength, num_inference_steps=STEPS, guidance_scale=1.5, negative_prompt="blurry", num_images_per_prompt=2)
    assert_img2img_equals_img2img_pipeline(sd_lcm, lcm_pipe, kwargs)


def test_scheduler_lcm_on_a_ddim_folder_equals_diffusers_with_lcm_scheduler(t2i_folder, ddim_pipe):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=1.5, negative_prompt="blurry", num_images_per_prompt=2, output_type="pt")
    result, _ = assert_equals_stable_diffusion_pipeline(t2i_folder, ddim_pipe, "lcm", kwargs, scheduler_cls=LCMScheduler, seed=4)
    assert max_abs(result.images, ddim_pipe(PROMPT, seed=4, **kwargs).images) > 1e-2  # DDIM gives other images
    assert_img2img_equals_img2img_pipeline(t2i_folder, ddim_pipe, dict(kwargs, strength=0.6), scheduler_cls=LCMScheduler, kind="lcm",
                                           image_seed=8, seed=5)


def test_scheduler_ddim_on_an_lcm_folder_equals_diffusers_with_ddim_scheduler(sd_lcm, lcm_pipe):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=5.0, eta=0.5, output_type="pt")
    assert_equals_stable_diffusion_pipeline(sd_lcm, lcm_pipe, "ddim", kwargs, scheduler_cls=DDIMScheduler, seed=6)


def test_lcm_lora_on_a_plain_sd_folder_equals_diffusers(t2i_folder, tmp_path):
    """The case LCM-LoRA is for: a LoRA fused into a plain SD UNet, sampled with LCM in a few steps."""
    from diffusers import StableDiffusionPipeline

    from diffrt.tiny import tiny_lora_files

    lora = tiny_lora_files(t2i_folder, tmp_path / "lora", seed=5)["peft"]
    ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder, LCMScheduler)
    ref.load_lora_weights(lora, adapter_name="lcm")
    ref.fuse_lora(lora_scale=1.0)
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    want = ref(PROMPT, generator=torch.Generator().manual_seed(9), **kwargs).images
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 1.0)])
    assert max_abs(pipe(PROMPT, seed=9, scheduler="lcm", **kwargs).images, want) <= DIFFUSERS_TOL


def test_controlnet_with_lcm_equals_controlnet_pipeline(t2i_folder):
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=1.5)
    assert_controlnet_equals_controlnet_pipeline(t2i_folder, "lcm", kwargs, scheduler_cls=LCMScheduler)


def test_a_clip_sample_lcm_config_samples_unclipped_as_stable_diffusion_pipeline(sd_lcm, tmp_path):
    """StableDiffusionPipeline.__init__ turns clip_sample off in the scheduler config it is given."""
    from diffusers import StableDiffusionPipeline

    folder = shutil.copytree(sd_lcm, tmp_path / "clipped")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": True, "clip_sample_range": 0.1}))
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    want = diffusers_pipe(StableDiffusionPipeline, folder)(PROMPT, generator=torch.Generator().manual_seed(2), **kwargs).images
    pipe = open_text_to_image_pipeline(folder, "torch", CPU)
    assert max_abs(pipe(PROMPT, seed=2, **kwargs).images, want) <= DIFFUSERS_TOL
    clipped = pipe(PROMPT, seed=2, scheduler=lcm.LCMConfig.from_scheduler_config(json.loads(path.read_text())), **kwargs)
    assert max_abs(clipped.images, want) > 1e-3  # a config passed in is taken as it is (diffusers: swapped in after __init__)


def test_a_folder_whose_model_index_disagrees_is_named(sd_lcm, tmp_path, caplog):
    folder = shutil.copytree(sd_lcm, tmp_path / "mixed")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    with caplog.at_level(logging.WARNING, logger="diffrt.runtime.text_to_image_loading"):
        pipe = open_text_to_image_pipeline(folder, "torch", CPU)
    assert "names PNDMScheduler but" in caplog.text and "diffrt samples with LCM" in caplog.text
    assert isinstance(pipe.scheduler, lcm.LCMConfig)


# --- gradient guidance --------------------------------------------------------------------------------


def test_a_guided_lcm_step_moves_x_t_down_the_gradient_of_the_loss_on_f():
    """Mode x0 with LCM, by hand: eps held constant, the loss on the decoded f(x_t) = c_skip x_t + c_out x0(x_t)
    (what LCM's step returns), x_t <- x_t - scale * d loss / d x_t, then the LCM step from there."""
    from diffrt.runtime.guidance import Guidance

    schedule = lcm.make_lcm_schedule(lcm.LCMConfig(), 2)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def loss(images):
        return ((images - 0.3) ** 2).sum()

    x, g = x_T.clone(), torch.Generator().manual_seed(1)
    for i, t in enumerate(schedule.timesteps):
        eps = fake_model(x, t)
        x_req = x.clone().requires_grad_(True)
        x0, _ = ddim.predict_x0(x_req, eps, schedule.alpha_bar[i], "epsilon")
        f = schedule.c_skip[i] * x_req + schedule.c_out[i] * x0
        (grad,) = torch.autograd.grad(0.01 * loss(f / 2 + 0.5), x_req)
        noise = torch.randn(x.shape, generator=g) if i == 0 else None
        x, _ = lcm.lcm_step((x - grad).detach(), eps, schedule.alpha_bar[i], schedule.alpha_bar_next[i], schedule.c_skip[i],
                            schedule.c_out[i], noise=noise)
    options = SamplerOptions(generator=torch.Generator().manual_seed(1), guidance=(Guidance(loss, 0.01),),
                             decode=lambda x0: x0 / 2 + 0.5)
    torch.testing.assert_close(sample(lambda x, t: (None, fake_model(x, t)), x_T.clone(), schedule, options), x)


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_color_guidance_lowers_the_colour_loss_with_lcm(lcm_pipe, mode):
    """On the tiny model, through the PyTorch VAE decoder, in both modes. (Its random VAE pins each
    image's mean colour, and a scale that overshoots, as 3000 does with DDIM for some seeds, is no
    test; 100 lowers the loss for every seed tried.)"""
    for seed in (11, 13):
        assert_color_guidance_lowers_the_colour_loss(lcm_pipe, mode, "lcm", num_inference_steps=STEPS, guidance_scale=1.5, seed=seed)


# --- exported artifacts: the manifest carries LCM, ONNX Runtime runs it -----------------------------------


@pytest.fixture(scope="module")
def lcm_artifact(sd_lcm, tmp_path_factory):
    return export_t2i_artifact(sd_lcm, tmp_path_factory.mktemp("lcm_artifact") / "artifact")


@pytest.mark.parametrize("kwargs", [dict(guidance_scale=1.5, negative_prompt="blurry", num_images_per_prompt=2),
                                    dict(guidance_scale=1.0, image=0.6)], ids=["cfg-negative-x2", "img2img"])
def test_an_lcm_artifact_on_onnxruntime_equals_torch(lcm_artifact, lcm_pipe, kwargs):
    from diffrt.export import manifest as mf

    assert mf.read_manifest(lcm_artifact)["pipeline"]["scheduler"]["_class_name"] == "LCMScheduler"
    ort = assert_an_artifact_on_onnxruntime_equals_torch(lcm_artifact, lcm_pipe, "lcm", kwargs, STEPS)
    assert isinstance(ort.scheduler, lcm.LCMConfig)


def test_scheduler_lcm_on_a_ddim_artifact_equals_torch(t2i_artifact, ddim_pipe):
    assert_a_ddim_artifact_equals_torch(t2i_artifact, ddim_pipe, "lcm", num_inference_steps=STEPS, guidance_scale=1.5, scheduler="lcm")


def test_generate_and_serve_an_lcm_artifact(lcm_artifact, tmp_path):
    """`diffrt generate` samples the artifact with LCM (guidance 1.0 by default, LCM-LoRA's); the service
    keeps each request's generator for LCM's per-step noise, so requests batched together get the
    images each gets alone, and refuses steps LCM cannot take with a 422 naming the field."""
    pytest.importorskip("fastapi")
    from diffrt.generate import GenerateRequest, generate
    from diffrt.serve.schema import GenerateBody, RequestError
    from diffrt.serve.worker import request_schedule

    result = generate(GenerateRequest(model=str(lcm_artifact), backend="onnxruntime", device=CPU, prompt=PROMPT,
                                      num_inference_steps=STEPS))
    assert result.metadata["guidance_scale"] == 1.0 and result.metadata["scheduler"] == "lcm"
    worker = serve_worker(lcm_artifact)
    bodies = [GenerateBody(prompt=PROMPT, seed=7, num_images=2, num_inference_steps=STEPS, guidance_scale=1.0),
              GenerateBody(prompt="another prompt", seed=8, num_inference_steps=STEPS, guidance_scale=1.0)]
    assert_batched_together_each_as_alone(worker, lcm_artifact, bodies, "lcm", draws_noise=True)  # a batch of 3 images
    for fields, name in ((dict(num_inference_steps=60), "num_inference_steps"), (dict(eta=0.5), "eta")):
        with pytest.raises(RequestError) as info:
            worker.plan(GenerateBody(prompt=PROMPT, **fields))
        assert info.value.field == name and "LCM" in info.value.message
    # A request's `scheduler` picks the sampler it is checked and batched by: DDIM takes those, in batches of its own.
    ddim_plan = worker.plan(GenerateBody(prompt=PROMPT, num_inference_steps=60, eta=0.5, scheduler="ddim", guidance_scale=1.0))
    lcm_plan = worker.plan(GenerateBody(prompt=PROMPT, num_inference_steps=30, scheduler="lcm", guidance_scale=1.0))
    assert ddim_plan.settings["scheduler"] == "ddim" and lcm_plan.settings["scheduler"] == "lcm"
    assert worker.batch_key(lcm_plan) == worker.batch_key(worker.plan(GenerateBody(prompt="x", num_inference_steps=30, guidance_scale=1.0)))
    as_ddim = dataclasses.replace(lcm_plan, settings={**lcm_plan.settings, "scheduler": "ddim"})
    assert worker.batch_key(lcm_plan) != worker.batch_key(as_ddim)
    thresholded = copy.copy(worker.pipe)  # an LCM config DDIM cannot sample: the field named is scheduler
    thresholded.scheduler = thresholded.controlnet_scheduler = lcm.LCMConfig(thresholding=True)
    with pytest.raises(RequestError, match=r"^scheduler: dynamic thresholding is not supported by diffrt's DDIM") as info:
        request_schedule(thresholded, GenerateBody(prompt=PROMPT, scheduler="ddim"))
    assert info.value.field == "scheduler"


# --- pixel-space models: the same loop ----------------------------------------------------------------


def test_pixel_lcm_equals_ddpm_pipeline_with_lcm_scheduler(uncond_model_dir, tmp_path):
    """DDPMPipeline drives any scheduler's set_timesteps/step: with LCMScheduler it is the LCM loop.
    The test model's config clips x0 (clip_sample), which LCM keeps in a pixel model."""
    scheduler = LCMScheduler.from_config(DDIMScheduler.from_pretrained(uncond_model_dir / "scheduler").config)
    assert scheduler.config.clip_sample
    assert_pixel_pipeline_equals_ddpm_pipeline(uncond_model_dir, scheduler, "lcm", STEPS, scheduler="lcm")

    folder = shutil.copytree(uncond_model_dir, tmp_path / "lcm")  # a folder whose scheduler config names LCMScheduler
    scheduler.save_pretrained(folder / "scheduler")
    assert_pixel_pipeline_equals_ddpm_pipeline(folder, scheduler, "lcm", STEPS)


def test_a_pixel_lcm_artifact_carries_lcm_to_onnxruntime(uncond_model_dir, tmp_path):
    assert_a_pixel_artifact_carries_the_scheduler(uncond_model_dir, tmp_path, LCMScheduler, "lcm", STEPS)


def test_class_conditioned_pixel_lcm_with_cfg_equals_lcm_scheduler_by_hand(classemb_model_dir):
    from diffrt.models import load_pixel_model
    from diffrt.runtime.loading import torch_pixel_pipeline

    model = load_pixel_model(classemb_model_dir)
    labels, scale = torch.tensor([1, 3]), 3.0
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    scheduler = LCMScheduler.from_config(model.scheduler.to_scheduler_config())
    scheduler.set_timesteps(STEPS)
    want = class_cfg_by_hand(model, scheduler, x_T.clone(), labels, scale, torch.Generator().manual_seed(6))
    got = torch_pixel_pipeline(model)(labels, latents=x_T, num_inference_steps=STEPS, guidance_scale=scale,
                                      generator=torch.Generator().manual_seed(6), output_type="pt", scheduler="lcm").images
    # One batched 2B UNet call against two B calls (by hand): convolution kernels that differ with the batch round
    # apart, by 2.3e-5 after the LCM steps on an AMD EPYC (1e-5 held on the CPUs before it): the images' usual tolerance.
    assert max_abs(got, want) <= DIFFUSERS_TOL


def test_cli_generate_scheduler_lcm_is_the_pipelines_lcm(t2i_folder, ddim_pipe, tmp_path):
    """`diffrt generate --scheduler lcm` (LCM-LoRA's command line) samples a DDIM folder with LCM, at
    guidance scale 1 by default: the images of the pipeline called with scheduler="lcm"."""
    assert_cli_generate_is_the_pipelines(t2i_folder, ddim_pipe, tmp_path, "lcm", 2, 1.0)  # unlike DDIM, the folder's own


def test_a_distilled_unet_defaults_to_guidance_it_can_feel(sd_distilled, sd_lcm):
    """Left out, the guidance scale is 1.0 for LCM on a plain UNet (LCM-LoRA) but 7.5 for a distilled
    UNet, whose guidance is the embedding of scale - 1: at 1.0 it would be off."""
    from diffrt.generate import GenerateRequest, generate

    def default_scale(folder):
        req = GenerateRequest(model=str(folder), backend="torch", device=CPU, prompt=PROMPT, num_inference_steps=2)
        return generate(req).metadata["guidance_scale"]

    assert default_scale(sd_distilled) == 7.5
    assert default_scale(sd_lcm) == 1.0
