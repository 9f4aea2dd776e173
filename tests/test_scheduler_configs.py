"""The scheduler and UNet configs users' model folders really contain, against diffusers.

diffusers is the oracle: DDIMScheduler for the schedule and the step, DDIMPipeline and
StableDiffusionPipeline (with `DDIMScheduler.from_config(pipe.scheduler.config)`) for whole images.
Settings diffrt cannot honour are refused in one line that names them; nothing differs silently.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from diffrt.errors import DiffrtError
from diffrt.runtime import ddim
from diffrt.runtime.sampling import SamplerOptions, sample

CPU = "cpu"
TOL = 1e-4  # max abs on images in [0, 1], as the pipelines promise


def with_config(src, dst, part: str, **changes):
    """A copy of model folder `src` whose `part`/…config.json has `changes` applied (None removes a key)."""
    shutil.copytree(src, dst)
    path = next((dst / part).glob("*config.json"))
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return dst


# --- the schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_train_timesteps", [1000, 1001])
def test_timesteps_match_diffusers_for_every_step_count(spacing, num_train_timesteps):
    """Trailing and linspace steps land on k + 0.5 give or take the last bit: with 48 trailing
    steps of 1000 diffusers visits 936 where torch's own arange gave 937. (Trailing runs diffusers' first n: at some
    counts its arange gives a step more, at timestep -1; test_ddim.py.)"""
    ref = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=1)
    config = ddim.DDIMConfig.from_scheduler_config(dict(ref.config))
    for n in range(1, num_train_timesteps):  # n = T with steps_offset 1 is refused, tested below
        ref.set_timesteps(n)
        ours = ddim.make_timesteps(config, n)
        assert len(ours) == n and torch.equal(ours, ref.timesteps[:n]), f"{n} {spacing} steps"


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_snr_alphas_cumprod_are_diffusers_to_the_bit(beta_schedule):
    """Near zero SNR x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) magnifies the last bit of alpha_bar."""
    ref = DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    assert torch.equal(ddim.make_alphas_cumprod(ddim.DDIMConfig.from_scheduler_config(dict(ref.config))), ref.alphas_cumprod)


LOOP_CASES = {
    "zero-snr-trailing48-v": (dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"), 48),
    "zero-snr-leading-eps": (dict(rescale_betas_zero_snr=True, clip_sample=False), 10),
    "linspace27": (dict(timestep_spacing="linspace", beta_schedule="scaled_linear", clip_sample=False), 27),
    "sample-clip0.7": (dict(prediction_type="sample", clip_sample_range=0.7), 10),
    "T500-trailing499": (dict(num_train_timesteps=500, timestep_spacing="trailing"), 499),
    "T50-all-steps": (dict(num_train_timesteps=50, set_alpha_to_one=False), 50),
    "cosine-offset3": (dict(beta_schedule="squaredcos_cap_v2", steps_offset=3, set_alpha_to_one=False), 7),
}


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("case", LOOP_CASES, ids=list(LOOP_CASES))
def test_guided_loop_matches_diffusers(case, eta):
    """sample (CFG, eta noise from one generator) against DDIMScheduler.step with the same draws."""
    config, steps = LOOP_CASES[case]
    ref = DDIMScheduler(**config)
    ref.set_timesteps(steps)

    def model(x, t):  # any deterministic function of (x, t) exercises the update
        return torch.sin(x * 3 + float(t) / 100), torch.cos(x * 2 - float(t) / 300)

    x_ref = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ours = x_ref.clone()
    g = torch.Generator().manual_seed(5)
    for t in ref.timesteps[:steps]:  # diffusers' trailing arange adds a step at -1 to T500-trailing499 (test_ddim.py)
        uncond, cond = model(x_ref, t)
        x_ref = ref.step(uncond + 3.0 * (cond - uncond), t, x_ref, eta=eta, generator=g).prev_sample
    schedule = ddim.make_schedule(ddim.DDIMConfig.from_scheduler_config(dict(ref.config)), steps)
    options = SamplerOptions(guidance_scale=3.0, eta=eta, generator=torch.Generator().manual_seed(5))
    x_ours = sample(model, x_ours, schedule, options)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


def test_epsilon_at_zero_terminal_snr_is_refused_not_nan():
    """alpha_bar is exactly 0 at the last training step: an epsilon model's x0 divides by zero there.
    diffusers returns NaN; diffrt refuses before the first step, naming the setting."""
    ref = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    ref.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(ref.step(torch.zeros_like(x), ref.timesteps[0], x).prev_sample).all()
    schedule = ddim.make_schedule(ddim.DDIMConfig.from_scheduler_config(dict(ref.config)), 4)
    calls = []
    with pytest.raises(DiffrtError, match=r"alpha_bar is 0 at timestep 999 .*rescale_betas_zero_snr.*v_prediction") as info:
        sample(lambda x_t, t: calls.append(t) or (None, torch.zeros_like(x_t)), x, schedule, SamplerOptions())
    assert "\n" not in str(info.value) and not calls
    # v_prediction (what zero-SNR models are trained with) and leading steps run.
    zero = lambda x_t, t: (None, torch.zeros_like(x_t))  # noqa: E731
    v_model = ddim.DDIMConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    assert torch.isfinite(sample(zero, x, ddim.make_schedule(v_model, 4), SamplerOptions())).all()
    leading = ddim.DDIMConfig(rescale_betas_zero_snr=True)
    assert torch.isfinite(sample(zero, x, ddim.make_schedule(leading, 4), SamplerOptions())).all()


def test_schedules_past_the_training_steps_are_one_line():
    """diffusers' step() fails with an IndexError on these; diffrt names the setting before any work."""
    with pytest.raises(DiffrtError, match=r"steps_offset 1 with 1000 leading steps starts at timestep 1000") as info:
        ddim.make_schedule(ddim.DDIMConfig(steps_offset=1), 1000)
    assert "\n" not in str(info.value)
    with pytest.raises(DiffrtError, match=r"trained_betas has 10 values but num_train_timesteps is 1000"):
        ddim.make_schedule(ddim.DDIMConfig(trained_betas=(0.01,) * 10), 5)
    ddim.make_schedule(ddim.DDIMConfig(steps_offset=1), 999)


def test_trained_betas_past_the_training_steps_are_not_trained_on():
    """From a review: a trained_betas list longer than num_train_timesteps was kept whole, and training drew timesteps
    below its length (diffusers' scripts: below num_train_timesteps), ones sampling never visits."""
    betas = tuple(0.001 * (i + 1) for i in range(12))
    alphas = ddim.make_alphas_cumprod(ddim.DDIMConfig(num_train_timesteps=10, trained_betas=betas))
    assert alphas.numel() == 10
    torch.testing.assert_close(alphas, torch.cumprod(1 - torch.tensor(betas[:10]), 0))


# Scheduler configs as model folders ship them; diffrt reads the raw file, a user compares against
# `DDIMScheduler.from_config(pipe.scheduler.config)` with the folder's own class loaded first.
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
FOLDER_SCHEDULERS = {
    "sd15-pndm": dict(_class_name="PNDMScheduler", **SD, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      clip_sample=False),
    "sd14-pndm-no-clip-key": dict(_class_name="PNDMScheduler", **SD, skip_prk_steps=True),
    "euler-no-spacing": dict(_class_name="EulerDiscreteScheduler", **SD, steps_offset=1),  # Euler's default: linspace
    "dpm-karras": dict(_class_name="DPMSolverMultistepScheduler", **SD, algorithm_type="dpmsolver++", use_karras_sigmas=True,
                       timestep_spacing="linspace", solver_order=2, thresholding=False, steps_offset=1),
    "lcm": dict(_class_name="LCMScheduler", **SD, original_inference_steps=50, timestep_scaling=10.0, timestep_spacing="leading",
                set_alpha_to_one=True, steps_offset=1, clip_sample=False),
    "euler-a-zero-snr": dict(_class_name="EulerAncestralDiscreteScheduler", **SD, prediction_type="v_prediction",
                             rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "ddpm-cifar": dict(_class_name="DDPMScheduler", beta_schedule="linear", clip_sample=True, variance_type="fixed_small"),
}


@pytest.mark.parametrize("name", FOLDER_SCHEDULERS)
def test_other_scheduler_classes_mean_what_ddim_from_config_makes_of_them(name, caplog):
    import diffusers

    config = FOLDER_SCHEDULERS[name]
    ref = DDIMScheduler.from_config(getattr(diffusers, config["_class_name"]).from_config(config).config)
    with caplog.at_level(logging.INFO, logger="diffrt.runtime.ddim"):
        ours = ddim.DDIMConfig.from_scheduler_config(json.loads(json.dumps(config)))
    if config["_class_name"] in ddim.OWN_SAMPLERS:
        # Sampled with its own sampler, LCM / DPM-Solver++ / Euler / Euler Ancestral (test_lcm.py, test_dpm.py,
        # test_euler.py); asked for DDIM, it is DDIM.from_config's.
        from diffrt.runtime.sampling import choose_scheduler

        assert type(ours).SCHEDULER_CLASS == config["_class_name"]
        ours = choose_scheduler(ours, "ddim")
    else:
        assert f"the scheduler config names {config['_class_name']}: diffrt samples with DDIM" in caplog.text
    for steps in (4, 25, 48, 50):
        ref.set_timesteps(steps)
        schedule = ddim.make_schedule(ours, steps)
        assert torch.equal(schedule.timesteps, ref.timesteps)
        prev = [ref.alphas_cumprod[p] if p >= 0 else ref.final_alpha_cumprod for p in ref.timesteps - 1000 // steps]
        assert torch.equal(schedule.alpha_bar, ref.alphas_cumprod[ref.timesteps])
        assert torch.equal(schedule.alpha_bar_prev, torch.stack(prev))
    assert (ours.prediction_type, ours.clip_sample, ours.clip_sample_range) == (
        ref.config.prediction_type, ref.config.clip_sample, ref.config.clip_sample_range)


@pytest.mark.parametrize("config", [
    # Playground v2.5's scheduler, and SD3's / FLUX's: read as a beta schedule, DDIM on default linear betas.
    dict(_class_name="EDMDPMSolverMultistepScheduler", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="exponential",
         prediction_type="epsilon", solver_order=2, num_train_timesteps=1000),
    dict(_class_name="EDMEulerScheduler", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5),
    dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0),
    dict(_class_name="CMStochasticIterativeScheduler", sigma_min=0.002, sigma_max=80.0),
    # From a second review: Stable Audio's (a stand-in without torchsde), and one known only by its signature (no betas).
    dict(_class_name="CosineDPMSolverMultistepScheduler", sigma_min=0.3, sigma_max=500, sigma_data=1.0),
    dict(_class_name="LTXEulerAncestralRFScheduler", num_train_timesteps=1000),
], ids=lambda c: c["_class_name"])
def test_schedulers_of_another_noise_process_are_refused_by_name(config):
    """A review found an EDM folder sampled as DDIM on linear betas (only an INFO line said anything): what such a
    model was trained on is no beta schedule, so every sampler diffrt has would give noise. Refused, in one line."""
    with pytest.raises(DiffrtError, match=rf"^the scheduler config names {config['_class_name']}, whose model was trained on "
                                          "another noise process than a DDPM beta schedule") as info:
        ddim.DDIMConfig.from_scheduler_config(config)
    assert "\n" not in str(info.value)


def test_every_beta_schedule_scheduler_of_diffusers_still_reads_as_a_beta_schedule():
    """The refusal asks diffusers' own classes whether they take a beta_schedule: every one that does (PNDM, UniPC,
    Heun, ...) reads as before, and one diffusers only stands in for (DPMSolverSDEScheduler without torchsde) too."""
    import inspect

    import diffusers

    beta = [name for name in dir(diffusers) if name.endswith("Scheduler") and isinstance(getattr(diffusers, name), type)
            and "beta_schedule" in inspect.signature(getattr(diffusers, name).__init__).parameters]
    assert {"PNDMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler", "DDPMScheduler"} <= set(beta)
    for name in [*beta, "DPMSolverSDEScheduler", "SomeFutureScheduler"]:
        assert not ddim.other_noise_process(name), name


# --- whole images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing,steps,eta", [("trailing", 48, 0.0), ("linspace", 27, 0.5)])
def test_pixel_pipeline_equals_ddim_pipeline_with_fractional_spacing(uncond_model_dir, tmp_path, spacing, steps, eta):
    from diffusers import DDIMPipeline

    from diffrt.runtime.loading import open_pixel_pipeline

    folder = with_config(uncond_model_dir, tmp_path / "model", "scheduler", timestep_spacing=spacing, clip_sample=False)
    kwargs = dict(num_inference_steps=steps, eta=eta, output_type="np")
    want = DDIMPipeline.from_pretrained(folder)(batch_size=2, generator=torch.Generator("cpu").manual_seed(1), **kwargs).images
    got = open_pixel_pipeline(folder, "torch", CPU)(num_images=2, seed=1, **kwargs).images
    assert abs(got - want).max() <= TOL


@pytest.fixture(scope="module")
def sd2_folder(t2i_folder, tmp_path_factory):
    """SD-2-style: a UNet with linear projections, upcast attention and per-block head dims, and a
    v-prediction zero-terminal-SNR scheduler with trailing steps (Lin et al. 2023)."""
    from diffusers import UNet2DConditionModel

    folder = with_config(t2i_folder, tmp_path_factory.mktemp("sd2") / "sd2", "scheduler", prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    config = dict(UNet2DConditionModel.load_config(t2i_folder / "unet"))
    config.update(use_linear_projection=True, upcast_attention=True, attention_head_dim=[2, 4])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


def test_sd2_style_zero_snr_v_prediction_equals_stable_diffusion_pipeline(sd2_folder):
    from diffusers import StableDiffusionPipeline

    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    ref = StableDiffusionPipeline.from_pretrained(sd2_folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=48, guidance_scale=7.0, guidance_rescale=0.7, output_type="pt")
    want = ref("a photo of the cat", generator=torch.Generator("cpu").manual_seed(3), **kwargs).images
    got = open_text_to_image_pipeline(sd2_folder, "torch", CPU)("a photo of the cat", seed=3, **kwargs).images
    assert (got - want).abs().max().item() <= TOL


UNET_REFUSALS = {
    "sdxl": (dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
             r"addition_embed_type='text_time'"),
    "upscaler": (dict(class_embed_type="timestep"), r"class_embed_type='timestep': it needs class_labels"),
    "class-embeds": (dict(num_class_embeds=10), r"num_class_embeds=10: it needs class_labels"),
    "image-proj": (dict(encoder_hid_dim_type="image_proj", encoder_hid_dim=16), r"encoder_hid_dim_type='image_proj'"),
    "inpainting": (dict(in_channels=9), r"takes 9 input channels but predicts 4"),
}


def test_an_lcm_distilled_unet_config_gets_timestep_cond(t2i_folder, tmp_path):
    """A time_cond_proj_dim UNet (LCM-distilled, e.g. LCM_Dreamshaper_v7) opens: its UNet specs take the
    guidance-scale embedding timestep_cond [batch, time_cond_proj_dim], which the pipeline feeds."""
    from diffrt.text_to_image_models import check_unet_config, component_specs, load_text_to_image

    folder = with_config(t2i_folder, tmp_path / "sd", "unet", time_cond_proj_dim=256)
    check_unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    model = load_text_to_image(folder, folder / "controlnet", weights=False)
    specs = component_specs(model, ["unet", "unet_controlnet"], batch=(1, 2, 4), height=(32, 32, 64), width=(32, 32, 64))
    for spec in specs.values():
        assert spec.inputs[-1].name == "timestep_cond" and spec.inputs[-1].dims == ("batch", 256)


@pytest.mark.parametrize("name", UNET_REFUSALS)
def test_unets_needing_inputs_diffrt_does_not_feed_are_refused_by_name(t2i_folder, tmp_path, name):
    """They would fail inside the UNet. One line each, before any weight is read or any export runs;
    torch_text_to_image_pipeline checks a loaded model too. (A time_cond_proj_dim UNet, LCM-distilled,
    is no longer refused: test_an_lcm_distilled_unet_config_gets_timestep_cond.)"""
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline, torch_text_to_image_pipeline
    from diffrt.text_to_image_models import load_text_to_image

    changes, message = UNET_REFUSALS[name]
    folder = with_config(t2i_folder, tmp_path / "sd", "unet", **changes)
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(DiffrtError, match=message) as info:
            open_text_to_image_pipeline(folder, backend, CPU)
        assert "\n" not in str(info.value)
    with pytest.raises(DiffrtError, match=message):
        torch_text_to_image_pipeline(load_text_to_image(folder, weights=False))
    from diffrt.export.artifact import export_model
    from diffrt.export.options import ExportOptions

    with pytest.raises(DiffrtError, match=message):  # `diffrt export` too, before the cache or any trace
        export_model(folder, tmp_path / "artifact", ExportOptions())
    assert not (tmp_path / "artifact").exists()


def test_a_folder_whose_two_scheduler_files_disagree_is_sampled_as_its_config_says_with_a_warning(t2i_folder, tmp_path, caplog):
    """model_index.json names the class diffusers' from_pretrained builds (text_to_image_models.index_scheduler_class,
    which DreamBooth's class images follow too); diffrt samples what scheduler_config.json names, and says so."""
    import shutil

    from diffrt.runtime.text_to_image_loading import check_scheduler_class
    from diffrt.text_to_image_models import index_scheduler_class

    folder = shutil.copytree(t2i_folder, tmp_path / "sd")
    assert index_scheduler_class(folder) == "DDIMScheduler"
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    assert index_scheduler_class(folder) == "EulerDiscreteScheduler"
    with caplog.at_level(logging.WARNING, logger="diffrt.runtime.text_to_image_loading"):
        check_scheduler_class(folder)
    assert "names EulerDiscreteScheduler but" in caplog.text and "diffrt samples with DDIM, as the scheduler config says" in caplog.text
    (folder / "model_index.json").write_text("[]")  # not what diffusers writes: nothing to tell by
    assert index_scheduler_class(folder) is None
