"""Shared fixtures: small real diffusers models built in code (no download)."""

from __future__ import annotations


import pytest
import torch

# The test models are tiny, so per-op overhead dominates: one intra-op thread is as fast as two,
# and on a 2-core machine shared with other work a second thread makes each call up to 10x slower.
torch.set_num_threads(1)


def pytest_configure(config):
    """diffrt's cache for this run alone: the suite's automatic exports of tmp models (one per run and path) and
    its hash memo filled the user's ~/.cache/diffrt by gigabytes, run after run. Set DIFFRT_CACHE_DIR to keep one."""
    import os
    import tempfile

    if not os.environ.get("DIFFRT_CACHE_DIR"):
        config._diffrt_cache = tempfile.mkdtemp(prefix="diffrt-test-cache-")
        os.environ["DIFFRT_CACHE_DIR"] = config._diffrt_cache


def pytest_unconfigure(config):
    import shutil

    cache = getattr(config, "_diffrt_cache", None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _save_pixel(tmp_path_factory, name: str, conditioning: str):
    from diffrt.models import build_pixel_model, save_pixel_model, small_unet_config
    from diffrt.runtime.ddim import DDIMConfig

    torch.manual_seed(0)
    model = build_pixel_model(small_unet_config(16, 3, (16, 32)), conditioning=conditioning,
                              num_classes=0 if conditioning == "none" else 4, class_embedding_dim=3,
                              scheduler=DDIMConfig(clip_sample=True))
    return save_pixel_model(model, tmp_path_factory.mktemp(name) / "model")


@pytest.fixture
def no_tf32():
    """TF32 off for the test, so that fp32 means fp32 on CUDA; the switches given back after. (pytest's monkeypatch
    cannot restore cuBLAS's switch: its undo deletes an attribute that cuBLASModule serves only through __getattr__.)"""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def uncond_model_dir(tmp_path_factory):
    """A randomly initialised unconditional UNet2DModel pipeline folder (16x16 RGB)."""
    return _save_pixel(tmp_path_factory, "uncond", "none")


@pytest.fixture(scope="session")
def classemb_model_dir(tmp_path_factory):
    """Class-conditioned through diffusers' num_class_embeds (4 classes + the null label)."""
    return _save_pixel(tmp_path_factory, "classemb", "class_embedding")


@pytest.fixture(scope="session")
def classchan_model_dir(tmp_path_factory):
    """Class-conditioned through label-embedding input channels."""
    return _save_pixel(tmp_path_factory, "classchan", "class_channels")


@pytest.fixture(scope="session")
def shipped_model_dir():
    from diffrt.models import SHIPPED_DIGITS

    if not (SHIPPED_DIGITS / "unet" / "config.json").is_file():
        pytest.fail(f"the shipped digits model is missing from {SHIPPED_DIGITS}")
    return SHIPPED_DIGITS


# --- text-to-image: one tiny Stable Diffusion folder and one exported artifact per session --------

# --- helpers the sampler tests share (imported: `from conftest import ...`) ----------------------


def generators(*seeds) -> list[torch.Generator]:
    """diffusers' list of generators, one per image."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def max_abs(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def one_line(info) -> str:
    """The text of a pytest.raises ExceptionInfo, asserted to be one line (user errors are)."""
    text = str(info.value)
    assert "\n" not in text
    return text


def diffusers_pipe(cls, folder, scheduler=None, **components):
    """diffusers' pipeline `cls` from a folder (the reference), optionally with another scheduler class
    made from the folder's config, as `pipe.scheduler = cls.from_config(pipe.scheduler.config)`."""
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **components)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


T2I_RANGES = dict(batch=(1, 2, 4), height=(32, 32, 64), width=(32, 32, 64))  # pixels; the tiny UNet needs >= 32
T2I_ARTIFACT_OPTIONS = dict(**T2I_RANGES, vae_encoder=True)  # t2i_artifact's export options


@pytest.fixture(scope="session")
def t2i_folder(tmp_path_factory):
    """A tiny random Stable Diffusion folder (32 px images) with a ControlNet in controlnet/."""
    from diffrt.tiny import tiny_text_to_image

    return tiny_text_to_image(tmp_path_factory.mktemp("t2i") / "sd", seed=0, controlnet=True)


@pytest.fixture(scope="session")
def t2i_artifact(t2i_folder, tmp_path_factory):
    """t2i_folder exported with its ControlNet and the VAE encoder: text_encoder, unet_controlnet, controlnet,
    vae_decoder, vae_encoder (fp32 ONNX)."""
    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    out = tmp_path_factory.mktemp("t2i_artifact") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_ARTIFACT_OPTIONS), [str(t2i_folder / "controlnet")])
    return out


@pytest.fixture(scope="session")
def t2i_controlnet_b(t2i_folder, tmp_path_factory):
    """A second ControlNet for t2i_folder's UNet: another seed, non-zero output convs."""
    from diffrt.tiny import tiny_controlnet

    return tiny_controlnet(t2i_folder, tmp_path_factory.mktemp("t2i_controlnet_b") / "controlnet", seed=11)


@pytest.fixture(scope="session")
def t2i_multi_artifact(t2i_folder, t2i_controlnet_b, tmp_path_factory):
    """t2i_folder exported with two ControlNets, controlnet/ then t2i_controlnet_b (MultiControlNetModel)."""
    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    out = tmp_path_factory.mktemp("t2i_multi_artifact") / "artifact"
    export_text_to_image(t2i_folder, out, ExportOptions(**T2I_RANGES), [t2i_folder / "controlnet", t2i_controlnet_b])
    return out


# --- what the sampler tests (test_dpm, test_euler, test_lcm) check alike, one sampler at a time -----------
# Each takes what differs between samplers (the scheduler class, diffrt's name for the sampler, the folder,
# the step count, the call's settings) and asserts; the test that calls it says why its case matters.

CPU = "cpu"
PROMPT = "a photo of the cat"
DIFFUSERS_TOL = 1e-4  # torch backend vs diffusers, max abs on images in [0, 1]
ORT_TOL = 1e-3  # onnxruntime vs torch backend (fp32 on CPU)


def sd_folder_with_scheduler(src, dst, cls, **overrides):
    """A copy of SD folder `src` with its scheduler replaced by `cls`, as `pipe.scheduler = cls.from_config(
    pipe.scheduler.config, **overrides); pipe.save_pretrained(dst)` writes it."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cls.from_config(cls.load_config(src / "scheduler"), **overrides).save_pretrained(dst / "scheduler")
    index = json.loads((dst / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cls.__name__]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def lazy_scheduler_folders(src, tmp_path_factory, prefix, configs):
    """name -> a copy of SD folder `src` (with its ControlNet) whose scheduler is configs[name] = (cls, overrides),
    made on first use."""
    made = {}

    def folder(name):
        if name not in made:
            cls, overrides = configs[name]
            made[name] = sd_folder_with_scheduler(src, tmp_path_factory.mktemp(f"{prefix}_{name}") / "sd", cls, **overrides)
        return made[name]

    return folder


def export_t2i_artifact(folder, out, controlnets=()):
    """`folder` exported to `out` over T2I_RANGES with `controlnets` (fp32 ONNX)."""
    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    export_text_to_image(folder, out, ExportOptions(**T2I_RANGES), list(controlnets))
    return out


def _generator_args(seeds, seed):
    """diffusers' generator= and diffrt's generator=/seed= for `seeds` (a list: one generator per image) or else `seed`."""
    if seeds:
        return generators(*seeds), {"generator": generators(*seeds)}
    return torch.Generator().manual_seed(seed), {"seed": seed}


def assert_equals_stable_diffusion_pipeline(folder, pipe, kind, kwargs, *, scheduler_cls=None, seed=3):
    """diffrt's `pipe` equals StableDiffusionPipeline from `folder`: with its own scheduler, or `scheduler_cls` made from
    its config while diffrt is called with scheduler=`kind`. kwargs' `prompt` (else PROMPT) and `generator` (seeds, one
    generator per image; else one seeded `seed`) go to both. The metadata name `kind` and diffusers' timesteps.
    Returns (diffrt's result, diffusers' pipeline)."""
    from diffusers import StableDiffusionPipeline

    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", PROMPT)
    theirs, ours = _generator_args(kwargs.pop("generator", None), seed)
    ref = diffusers_pipe(StableDiffusionPipeline, folder, scheduler_cls)
    want = ref(prompt, generator=theirs, **kwargs).images
    result = pipe(prompt, **ours, **({"scheduler": kind} if scheduler_cls else {}), **kwargs)
    assert result.images.shape == want.shape
    assert max_abs(result.images, want) <= DIFFUSERS_TOL
    assert result.metadata["scheduler"] == kind and result.metadata["timesteps"] == ref.scheduler.timesteps.tolist()
    return result, ref


def assert_img2img_equals_img2img_pipeline(folder, pipe, kwargs, *, scheduler_cls=None, kind=None, image_seed=7, seed=2):
    """diffrt's `pipe` on a random image (seeded `image_seed`) equals StableDiffusionImg2ImgPipeline from `folder` (its own
    scheduler, or `scheduler_cls` made from its config while diffrt is called with scheduler=`kind`), kwargs' `generator`
    (seeds, one generator per image; else one seeded `seed`) to both, and takes the last int(N * strength) steps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    kwargs = dict(kwargs, image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(image_seed)), output_type="pt")
    theirs, ours = _generator_args(kwargs.pop("generator", None), seed)
    want = diffusers_pipe(StableDiffusionImg2ImgPipeline, folder, scheduler_cls)(PROMPT, generator=theirs, **kwargs).images
    result = pipe(PROMPT, **ours, **({"scheduler": kind} if scheduler_cls else {}), **kwargs)
    assert max_abs(result.images, want) <= DIFFUSERS_TOL
    assert result.num_inference_steps == int(kwargs["num_inference_steps"] * kwargs["strength"])


def assert_controlnet_equals_controlnet_pipeline(folder, kind, kwargs, *, scheduler_cls=None):
    """diffrt with `folder`'s controlnet/ equals StableDiffusionControlNetPipeline (the folder's own scheduler, or
    `scheduler_cls` made from its config while diffrt is called with scheduler=`kind`) on a random control image,
    at conditioning scale 0.8. Returns diffrt's pipeline."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    ref = diffusers_pipe(StableDiffusionControlNetPipeline, folder, scheduler_cls,
                         controlnet=ControlNetModel.from_pretrained(folder / "controlnet"))
    kwargs = dict(kwargs, controlnet_conditioning_scale=0.8, output_type="pt")
    want = ref(PROMPT, image=control, generator=torch.Generator().manual_seed(1), **kwargs).images
    pipe = open_text_to_image_pipeline(folder, "torch", CPU, controlnet=folder / "controlnet")
    result = pipe(PROMPT, control_image=control, seed=1, **({"scheduler": kind} if scheduler_cls else {}), **kwargs)
    assert max_abs(result.images, want) <= DIFFUSERS_TOL and result.metadata["scheduler"] == kind
    return pipe


def assert_color_guidance_lowers_the_colour_loss(pipe, mode, kind, **kwargs):
    """Colour guidance towards red (scale 100, `mode`) lowers the colour loss of `pipe(PROMPT, **kwargs)`'s images."""
    from diffrt.runtime.guidance import color_guidance, color_loss

    target = torch.tensor([1.0, 0.0, 0.0])
    base = pipe(PROMPT, output_type="pt", **kwargs)
    guided = pipe(PROMPT, guidance=[color_guidance("#ff0000", 100.0, mode=mode)], output_type="pt", **kwargs)
    assert color_loss(base.images, target) - color_loss(guided.images, target) > 1e-4
    assert guided.metadata["guidance"] == ["color"] and guided.metadata["scheduler"] == kind


def assert_pipeline_calls_are_refused_in_one_line(cases, steps):
    """Each (pipe, kwargs, message): `pipe(PROMPT, **kwargs)` (steps `steps` unless kwargs say) raises a one-line
    DiffrtError matching `message`."""
    from diffrt.errors import DiffrtError

    for pipe, kwargs, message in cases:
        with pytest.raises(DiffrtError, match=message) as info:
            pipe(PROMPT, guidance_scale=1.0, output_type="pt", **{"num_inference_steps": steps, **kwargs})
        one_line(info)


def assert_never_takes_the_fused_ddim_kernel(monkeypatch, name, *schedules):
    """use_fused_kernel (on by default) fuses CFG with the DDIM step: a step of `schedules` (sampler `name`) with CFG
    must not reach it, while DDIM with CFG does (the patch is live)."""
    import diffrt.kernels
    from diffrt.runtime import ddim
    from diffrt.runtime.sampling import SamplerOptions, sample

    def fused(*args, **kwargs):
        raise AssertionError(f"the fused DDIM kernel ran a step of {name}")

    def branches(x, t):
        return torch.cos(x), torch.sin(x)

    monkeypatch.setattr(diffrt.kernels, "cfg_ddim_step", fused)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    options = SamplerOptions(guidance_scale=2.0, use_fused_kernel=True, generator=torch.Generator().manual_seed(1))
    for schedule in schedules:
        assert torch.isfinite(sample(branches, x.clone(), schedule, options)).all()
    with pytest.raises(AssertionError, match="fused DDIM kernel"):
        sample(branches, x.clone(), ddim.make_schedule(ddim.DDIMConfig(), 2), options)


def assert_ddim_back_is_ddim_from_config(chosen, cls):
    """"ddim" on `chosen` (a `cls` config) is DDIMScheduler.from_config(that config): the same timesteps. Returns it."""
    from diffusers import DDIMScheduler

    from diffrt.runtime import ddim
    from diffrt.runtime.sampling import choose_scheduler

    back = choose_scheduler(chosen, "ddim")
    assert type(back) is ddim.DDIMConfig
    ref = DDIMScheduler.from_config(cls.from_config(chosen.to_scheduler_config()).config)
    ref.set_timesteps(10)
    assert torch.equal(ddim.make_schedule(back, 10).timesteps, ref.timesteps)
    return back


# --- pixel models -------------------------------------------------------------------------------------


def assert_pixel_pipeline_equals_ddpm_pipeline(folder, ref_scheduler, kind, steps, **call):
    """diffrt's pixel pipeline on `folder` (called with `call`, e.g. scheduler=`kind`) equals DDPMPipeline driving
    `ref_scheduler`'s set_timesteps/step over the folder's UNet: two images, seed 7. Returns (diffrt's pipeline, the images)."""
    from diffusers import DDPMPipeline, UNet2DModel

    from diffrt.runtime.loading import open_pixel_pipeline

    ref = DDPMPipeline(UNet2DModel.from_pretrained(folder / "unet"), ref_scheduler)
    ref.set_progress_bar_config(disable=True)
    want = ref(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=steps, output_type="np").images
    pipe = open_pixel_pipeline(folder, "torch", CPU)
    got = pipe(num_images=2, num_inference_steps=steps, seed=7, output_type="np", **call)
    assert got.images.shape == want.shape and abs(got.images - want).max() <= 1e-4 and got.metadata["scheduler"] == kind
    return pipe, want


def class_cfg_by_hand(model, scheduler, x, labels, scale, generator=None):
    """diffusers' loop over a class-conditioned pixel model with CFG, by hand as StableDiffusionPipeline runs it
    (DDPMPipeline has no CFG): scale_model_input, the null-label and label branches combined, scheduler.step drawing
    from `generator`. Returns the images in [0, 1]."""
    null = torch.full_like(labels, model.info.null_class_label)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in, ts = scheduler.scale_model_input(x, t), torch.full((len(labels),), float(t))
            eps_null, eps_c = model.unet(x_in, ts, null), model.unet(x_in, ts, labels)
            x = scheduler.step(eps_null + scale * (eps_c - eps_null), t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def assert_a_pixel_artifact_carries_the_scheduler(model_dir, tmp_path, cls, kind, steps, **overrides):
    """A copy of pixel folder `model_dir` whose scheduler is `cls` (from its DDIM config, with `overrides`) exports to an
    artifact whose manifest carries that scheduler, and ONNX Runtime samples it as `kind`, as the torch backend does."""
    import shutil

    from diffusers import DDIMScheduler

    from diffrt.export import manifest as mf
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import ExportOptions
    from diffrt.runtime.loading import open_pixel_pipeline

    folder = shutil.copytree(model_dir, tmp_path / kind)
    cls.from_config(DDIMScheduler.from_pretrained(folder / "scheduler").config, **overrides).save_pretrained(folder / "scheduler")
    export_pixel_model(folder, tmp_path / "artifact", ExportOptions(batch=(1, 2, 4)))
    written = mf.read_manifest(tmp_path / "artifact")["pipeline"]["scheduler"]
    assert written["_class_name"] == cls.__name__
    for key, value in overrides.items():
        assert written[key] == value and type(written[key]) is type(value), key
    kwargs = dict(num_images=2, num_inference_steps=steps, seed=3, output_type="pt")
    got = open_pixel_pipeline(tmp_path / "artifact", "onnxruntime", CPU)(**kwargs)
    assert got.metadata["scheduler"] == kind and got.backend == "onnxruntime"
    assert max_abs(got.images, open_pixel_pipeline(folder, "torch", CPU)(**kwargs).images) <= ORT_TOL


# --- exported artifacts, the CLI and the service -------------------------------------------------------


def assert_an_artifact_on_onnxruntime_equals_torch(artifact, torch_pipe, kind, kwargs, steps):
    """ONNX Runtime on `artifact` equals `torch_pipe` (seed 5); kwargs' `image` is img2img's strength, on a random image.
    Returns the ONNX Runtime pipeline."""
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    ort = open_text_to_image_pipeline(artifact, "onnxruntime", CPU)
    kwargs = dict(kwargs, num_inference_steps=steps, output_type="pt", seed=5)
    if "image" in kwargs:
        kwargs.update(image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)), strength=kwargs["image"])
    result, expected = ort(PROMPT, **kwargs), torch_pipe(PROMPT, **kwargs)
    assert result.backend == "onnxruntime" and result.metadata["scheduler"] == kind
    assert max_abs(result.images, expected.images) <= ORT_TOL
    return ort


def assert_a_ddim_artifact_equals_torch(artifact, ddim_pipe, kind, **kwargs):
    """ONNX Runtime on the DDIM `artifact` called with kwargs (a `scheduler` choosing sampler `kind`; two images, seed 3)
    equals the torch backend's `ddim_pipe`. Returns the ONNX Runtime result."""
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    kwargs = dict(num_images_per_prompt=2, output_type="pt", seed=3, **kwargs)
    result = open_text_to_image_pipeline(artifact, "onnxruntime", CPU)(PROMPT, **kwargs)
    assert result.metadata["scheduler"] == kind
    assert max_abs(result.images, ddim_pipe(PROMPT, **kwargs).images) <= ORT_TOL
    return result


def cli_generate(folder, out, *flags) -> int:
    """`diffrt generate` on `folder` with the torch backend on the CPU, PROMPT and `flags`, to `out`: the exit status."""
    from diffrt.cli import main

    return main(["generate", "--model", str(folder), "--backend", "torch", "--device", CPU, "--prompt", PROMPT, *flags,
                 "--out", str(out)])


def assert_cli_generate_is_the_pipelines(folder, pipe, tmp_path, scheduler, steps, guidance_scale, unlike=None):
    """`diffrt generate --scheduler <scheduler>` on `folder` writes the images of `pipe(..., scheduler=scheduler)` at
    `guidance_scale` (the CLI's default), which differ from those of sampler `unlike` (None: the folder's own)."""
    import numpy as np

    out = tmp_path / f"{scheduler}.npy"
    assert cli_generate(folder, out, "--scheduler", scheduler, "--steps", str(steps), "--seed", "4") == 0
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance_scale, seed=4, output_type="np")
    want = pipe(PROMPT, scheduler=scheduler, **kwargs).images
    assert max_abs(np.load(out), want) <= 1e-6
    other = pipe(PROMPT, **({"scheduler": unlike} if unlike else {}), **kwargs).images
    assert max_abs(want, other) > 1e-2  # the flag changed the sampler


def serve_worker(artifact):
    """The service's worker on `artifact` (ONNX Runtime on the CPU), loaded."""
    from diffrt.serve.runtime import RuntimeConfig, make_worker

    worker = make_worker(RuntimeConfig(model=str(artifact), backend="onnxruntime", device=CPU, warmup_steps=2))
    worker.load()
    return worker


def assert_batched_together_each_as_alone(worker, artifact, bodies, kind, *, draws_noise):
    """`worker` plans every request of `bodies` as sampler `kind` (keeping its generator if and only if `draws_noise`:
    per-step noise to draw), puts them in one batch, and the batch gives each request the images `diffrt generate`
    gives it alone. Returns the plans."""
    import io
    import time

    import numpy as np
    from PIL import Image

    from diffrt.generate import GenerateRequest, generate
    from diffrt.images import to_uint8
    from diffrt.serve.batcher import Job

    plans = [worker.plan(body) for body in bodies]
    assert all(plan.settings["scheduler"] == kind and (plan.generator is not None) == draws_noise for plan in plans)
    assert all(worker.batch_key(plan) == worker.batch_key(plans[0]) for plan in plans) and worker.batch_key(plans[0]) is not None
    jobs = [Job(worker.batch_key(plan), plan.num_images, plan, deadline=time.monotonic() + 60) for plan in plans]
    answers = worker.run_batch(jobs)
    for job, body in zip(jobs, bodies):
        assert answers[job.id].batch_size == sum(b.num_images for b in bodies)
        got = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in answers[job.id].images])
        alone = generate(GenerateRequest(model=str(artifact), backend="onnxruntime", device=CPU, prompt=body.prompt, seed=body.seed,
                                         num_inference_steps=body.num_inference_steps, num_images=body.num_images,
                                         guidance_scale=body.guidance_scale))
        assert alone.metadata["scheduler"] == kind
        np.testing.assert_array_equal(got, to_uint8(alone.images))
    return plans


def assert_the_service_batches_a_sampler_apart(artifact, kind, steps, *, draws_noise, others, eta_refused):
    """The service's `scheduler` field on `artifact`, whose own sampler is `kind`: `kind` and `others` are accepted
    (also by Triton's input); requests leaving it out and requests naming `kind` share a batch, each getting its
    images alone; requests naming one of `others` (none of which draws per-step noise) never join it; eta is refused
    naming the field (eta_refused: scheduler -> words of the message), and DDIM takes it."""
    import numpy as np

    from diffrt.serve.schema import GenerateBody, RequestError

    names = [kind, *others]
    assert [GenerateBody(prompt=PROMPT, scheduler=s).scheduler for s in names] == names
    try:
        from diffrt.serve.triton import bodies_from_inputs
    except ImportError:  # Triton's client is optional
        pass
    else:
        got = bodies_from_inputs({"scheduler": np.array([[s.encode()] for s in names], dtype=object)})
        assert [b.scheduler for b in got] == names
    worker = serve_worker(artifact)
    bodies = [GenerateBody(prompt=PROMPT, seed=7, num_inference_steps=steps, guidance_scale=3.0),
              GenerateBody(prompt="another prompt", seed=8, num_inference_steps=steps, guidance_scale=3.0, scheduler=kind)]
    plans = assert_batched_together_each_as_alone(worker, artifact, bodies, kind, draws_noise=draws_noise)
    for other in others:
        plan = worker.plan(GenerateBody(prompt=PROMPT, seed=9, num_inference_steps=steps, guidance_scale=3.0, scheduler=other))
        assert plan.settings["scheduler"] == other and worker.batch_key(plan) != worker.batch_key(plans[0])
        assert plan.generator is None
    for scheduler, words in eta_refused.items():
        with pytest.raises(RequestError) as info:
            worker.plan(GenerateBody(prompt=PROMPT, eta=0.5, scheduler=scheduler))
        assert info.value.field == "eta" and words in info.value.message
    worker.plan(GenerateBody(prompt=PROMPT, eta=0.5, scheduler="ddim"))  # DDIM takes it
