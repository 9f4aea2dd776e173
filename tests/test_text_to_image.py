"""The text-to-image pipeline: equal to diffusers' own pipelines on the torch backend, equal to the
torch backend on onnxruntime, guidance that moves images, and one clear error per bad input.

diffusers is the oracle (same tiny models, scheduler and seed): StableDiffusionPipeline,
StableDiffusionControlNetPipeline (with one ControlNet and with two, a MultiControlNetModel),
StableDiffusionImg2ImgPipeline and StableDiffusionControlNetImg2ImgPipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import T2I_RANGES
from diffrt.errors import DiffrtError, NonFiniteOutputError, ShapeOutOfRangeError
from diffrt.runtime import ddim
from diffrt.runtime.guidance import Guidance, color_guidance
from diffrt.runtime.text_to_image_loading import artifact_text_to_image_pipeline, open_text_to_image_pipeline
from diffrt.text_to_image_models import load_text_to_image

CPU = "cpu"  # diffusers runs on the CPU here; pin the pipelines there too, GPU or not
STEPS = 3
DIFFUSERS_TOL = 1e-4  # torch backend vs diffusers, max abs on images in [0, 1]
ORT_TOL = 1e-3  # onnxruntime vs torch backend (fp32 on CPU), max abs on images in [0, 1]


@pytest.fixture(scope="module")
def control_image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def torch_pipe(t2i_folder):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU)


@pytest.fixture(scope="module")
def torch_cn_pipe(t2i_folder):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=t2i_folder / "controlnet")


@pytest.fixture(scope="module")
def ort_pipe(t2i_artifact):
    return open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)


def diffusers_pipe(cls, folder, **components):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt="a photo of the cat", **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 5.0)
    return pipe(prompt, output_type="pt", **kwargs)


def run_diffusers(pipe, prompt="a photo of the cat", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("guidance_scale", 5.0)
    return pipe(prompt, output_type="pt", generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- the torch backend equals diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(negative_prompt="blurry, dark"),
    dict(prompt=["a red house", "a photo of the cat"], negative_prompt=["ugly", "blurry"], num_images_per_prompt=2, eta=0.5),
    dict(guidance_scale=1.0),  # no CFG: one branch
    dict(guidance_scale=9.0, guidance_rescale=0.7, negative_prompt="blurry"),  # Lin et al.'s rescale
], ids=["cfg-negative", "two-prompts-x2-eta", "no-cfg", "guidance-rescale"])
def test_torch_equals_stable_diffusion_pipeline(t2i_folder, torch_pipe, kwargs):
    from diffusers import StableDiffusionPipeline

    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a photo of the cat")
    expected = run_diffusers(diffusers_pipe(StableDiffusionPipeline, t2i_folder), prompt, seed=3, **kwargs)
    result = run(torch_pipe, prompt, seed=3, **kwargs)
    n = len(prompt) if isinstance(prompt, list) else 1
    assert result.images.shape == expected.shape == (n * kwargs.get("num_images_per_prompt", 1), 3, 32, 32)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    assert result.backend == "torch" and result.metadata["components"]["unet"] == "torch"
    assert result.metadata["seed"] == 3  # what reproduces the images


def test_an_outdated_scheduler_config_samples_as_stable_diffusion_pipeline(t2i_folder, tmp_path, caplog):
    """StableDiffusionPipeline corrects a scheduler config written before its defaults were fixed
    (steps_offset 0, clip_sample on: x0 clipped to [-1, 1], meant for pixels, not latents); diffrt
    samples such a folder as it does, and says so."""
    import json
    import shutil

    from diffusers import StableDiffusionPipeline

    folder = shutil.copytree(t2i_folder, tmp_path / "old", ignore=shutil.ignore_patterns("controlnet*"))
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "steps_offset": 0, "clip_sample": True, "clip_sample_range": 0.5}))
    expected = run_diffusers(diffusers_pipe(StableDiffusionPipeline, folder), seed=3)
    with caplog.at_level("WARNING", logger="diffrt.runtime.text_to_image"):
        result = run(open_text_to_image_pipeline(folder, "torch", CPU), seed=3)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    assert "steps_offset 0, clip_sample True" in caplog.text


def test_an_outdated_steps_offset_samples_as_the_controlnet_pipelines_with_a_control_image(t2i_folder, tmp_path, caplog,
                                                                                           control_image):
    """StableDiffusionControlNetPipeline and its img2img correct nothing in the scheduler config they are
    given: with a control image (either pipeline) diffrt keeps steps_offset 0, as they do; without one,
    the same pipeline is StableDiffusionPipeline's, corrected. clip_sample stays off in every call (a
    deliberate difference, text_to_image._latent_scheduler): no latent model means it."""
    import json
    import shutil

    from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionPipeline)

    folder = shutil.copytree(t2i_folder, tmp_path / "old")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "steps_offset": 0}))
    with caplog.at_level("WARNING", logger="diffrt.runtime.text_to_image"):
        pipe = open_text_to_image_pipeline(folder, "torch", CPU, controlnet=folder / "controlnet")
    assert "calls with a control image keep steps_offset 0, as diffusers' ControlNet pipelines do" in caplog.text
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet")
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    for cls, kwargs, ours in ((StableDiffusionControlNetPipeline, dict(image=control_image), dict(control_image=control_image)),
                              (StableDiffusionControlNetImg2ImgPipeline, dict(image=image, control_image=control_image, strength=0.7),
                               dict(image=image, control_image=control_image, strength=0.7)),
                              (StableDiffusionPipeline, {}, {})):
        ref = diffusers_pipe(cls, folder, **({"controlnet": controlnet} if "control_image" in ours else {}))
        result = run(pipe, seed=3, num_inference_steps=4, **ours)
        assert max_abs(result.images, run_diffusers(ref, seed=3, num_inference_steps=4, **kwargs)) <= DIFFUSERS_TOL, cls.__name__
        assert result.metadata["timesteps"] == ref.scheduler.timesteps.tolist()[-len(result.metadata["timesteps"]):]

    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": True, "clip_sample_range": 0.5}))
    ref = diffusers_pipe(StableDiffusionControlNetPipeline, folder, controlnet=controlnet)
    ref.scheduler.register_to_config(clip_sample=False)  # what diffrt samples: x0 unclipped, steps_offset 0
    expected = run_diffusers(ref, seed=3, num_inference_steps=4, image=control_image)
    result = run(open_text_to_image_pipeline(folder, "torch", CPU, controlnet=folder / "controlnet"), seed=3, num_inference_steps=4,
                 control_image=control_image)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL


def test_prompt_embeds_equal_stable_diffusion_pipeline(t2i_folder, torch_pipe, t2i_artifact):
    """Weighted prompts come in as embeddings (compel's way): diffusers' prompt_embeds and
    negative_prompt_embeds, alone or beside a negative prompt given as text, on torch and ONNX Runtime."""
    from diffusers import StableDiffusionPipeline

    ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder)
    with torch.no_grad():
        pos, neg = ref.encode_prompt(["a red house", "a photo of the cat"], "cpu", 1, True, ["ugly", "blurry"])
    pos, neg = pos * torch.linspace(0.8, 1.2, pos.shape[1]).view(1, -1, 1), neg * 0.9  # a weighting no text gives
    for kwargs in (dict(prompt_embeds=pos, negative_prompt_embeds=neg), dict(prompt_embeds=pos, negative_prompt=["ugly", "dark"])):
        expected = ref(output_type="pt", generator=torch.Generator("cpu").manual_seed(2), num_inference_steps=STEPS,
                       guidance_scale=5.0, num_images_per_prompt=2, **kwargs).images
        result = torch_pipe(output_type="pt", seed=2, num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2, **kwargs)
        assert result.images.shape == (4, 3, 32, 32) and max_abs(result.images, expected) <= DIFFUSERS_TOL
    onnx = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    on_onnx = onnx(output_type="pt", seed=2, num_inference_steps=STEPS, guidance_scale=5.0, prompt_embeds=pos, negative_prompt_embeds=neg)
    on_torch = torch_pipe(output_type="pt", seed=2, num_inference_steps=STEPS, guidance_scale=5.0, prompt_embeds=pos,
                          negative_prompt_embeds=neg)
    assert max_abs(on_onnx.images, on_torch.images) <= 1e-3
    with pytest.raises(ShapeOutOfRangeError, match="prompt_embeds of 78 tokens"):  # the exported graph's sequence range
        onnx(num_inference_steps=1, prompt_embeds=torch.cat([pos, pos[:, :1]], dim=1))
    longer = torch.cat([pos, pos[:, 1:]], dim=1)  # compel's chunked long prompts: eager PyTorch attends to any length
    assert torch_pipe(num_inference_steps=1, prompt_embeds=longer, negative_prompt_embeds=torch.cat([neg, neg[:, 1:]], 1),
                      output_type="pt").images.shape == (2, 3, 32, 32)

    for kwargs, message in [(dict(prompt="a cat", prompt_embeds=pos), "prompt or prompt_embeds, not both"),
                            (dict(prompt_embeds=pos, negative_prompt_embeds=neg[:1]), "give them one shape"),
                            (dict(prompt_embeds=pos[0]), r"\[batch, tokens, hidden\]"),
                            (dict(prompt_embeds=pos[..., :7]), "hidden size 7 but the UNet attends to 32"),
                            (dict(negative_prompt_embeds=neg), r"negative_prompt_embeds has shape \(2, 77, 32\) but the 1 prompt")]:
        with pytest.raises(DiffrtError, match=message):
            torch_pipe(num_inference_steps=1, **kwargs)


def test_latent_output_equals_stable_diffusion_pipeline(t2i_folder, torch_pipe):
    from diffusers import StableDiffusionPipeline

    expected = diffusers_pipe(StableDiffusionPipeline, t2i_folder)(
        "a photo of the cat", output_type="latent", generator=torch.Generator("cpu").manual_seed(4), num_inference_steps=STEPS).images
    latents = torch_pipe("a photo of the cat", output_type="latent", seed=4, num_inference_steps=STEPS).images
    assert latents.shape == expected.shape == (1, 4, 4, 4) and max_abs(latents, expected) <= DIFFUSERS_TOL
    with pytest.raises(DiffrtError, match="output_type must be 'pil', 'np', 'pt' or 'latent', got 'png'"):
        torch_pipe("a cat", output_type="png", num_inference_steps=1)


def test_torch_equals_controlnet_pipeline(t2i_folder, torch_cn_pipe, control_image):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    ref = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder,
                         controlnet=ControlNetModel.from_pretrained(t2i_folder / "controlnet"))
    outputs = []
    for scale in (0.5, 1.5):
        expected = run_diffusers(ref, image=control_image, controlnet_conditioning_scale=scale, seed=1)
        result = run(torch_cn_pipe, control_image=control_image, controlnet_conditioning_scale=scale, seed=1)
        assert max_abs(result.images, expected) <= DIFFUSERS_TOL
        outputs.append(result.images)
    assert max_abs(*outputs) > 1e-2  # the ControlNet's output weights are non-zero: the scale matters


@pytest.fixture(scope="module")
def control_images():
    """One 32 x 32 control image per ControlNet, for pipelines with two."""
    g = torch.Generator().manual_seed(8)
    return [torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)]


@pytest.fixture(scope="module")
def torch_multi_pipe(t2i_folder, t2i_controlnet_b):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=[t2i_folder / "controlnet", t2i_controlnet_b])


def test_torch_equals_multi_controlnet_pipeline(t2i_folder, t2i_controlnet_b, torch_multi_pipe, control_images):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    nets = [ControlNetModel.from_pretrained(t2i_folder / "controlnet"), ControlNetModel.from_pretrained(t2i_controlnet_b)]
    ref = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder, controlnet=nets)  # a MultiControlNetModel
    outputs = []
    for scale in ([0.5, 1.5], [1.5, 0.5], 0.8):  # one per ControlNet, swapped, then one float for both
        kwargs = dict(num_images_per_prompt=2, negative_prompt="dark") if scale == 0.8 else {}
        expected = run_diffusers(ref, image=control_images, controlnet_conditioning_scale=scale, seed=1, **kwargs)
        result = run(torch_multi_pipe, control_image=control_images, controlnet_conditioning_scale=scale, seed=1, **kwargs)
        assert max_abs(result.images, expected) <= DIFFUSERS_TOL
        assert result.metadata["controlnet_conditioning_scale"] == (scale if isinstance(scale, list) else [scale] * 2)
        outputs.append(result.images)
    assert max_abs(outputs[0], outputs[1]) > 1e-2  # each ControlNet has its own scale, and both are live


def test_a_list_of_lists_of_control_images_is_per_prompt_as_diffusers_reads_it(t2i_folder, t2i_controlnet_b, torch_multi_pipe):
    """[[canny_1, pose_1], [canny_2, pose_2]]: one inner list per prompt, one image per ControlNet, as diffusers' pipeline
    reads it (it turns the list around). diffrt read the outer list per ControlNet: with two prompts and two ControlNets
    the shapes fit, and ControlNet 0 got canny_1 and pose_1 without a word (0.044 from diffusers' images)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    g = torch.Generator().manual_seed(9)
    images = [[torch.rand(3, 32, 32, generator=g) for _ in range(2)] for _ in range(2)]  # per prompt, per ControlNet
    nets = [ControlNetModel.from_pretrained(t2i_folder / "controlnet"), ControlNetModel.from_pretrained(t2i_controlnet_b)]
    ref = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder, controlnet=nets)
    prompts = ["a photo of the cat", "a cat on a mat"]
    expected = run_diffusers(ref, prompts, image=images, seed=1)
    result = run(torch_multi_pipe, prompts, control_image=images, seed=1)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    per_controlnet = [torch.stack([images[0][k], images[1][k]]) for k in range(2)]  # the same images, the other form
    assert max_abs(run(torch_multi_pipe, prompts, control_image=per_controlnet, seed=1).images, expected) <= DIFFUSERS_TOL
    with pytest.raises(DiffrtError, match=r"each inner list holds one prompt's images, one per ControlNet \(2\); got inner lists of 1 and 2"):
        run(torch_multi_pipe, prompts, control_image=[[images[0][0]], images[1]], seed=1)


def test_control_guidance_start_and_end_equal_the_controlnet_pipelines(t2i_folder, t2i_controlnet_b, torch_cn_pipe, torch_multi_pipe,
                                                                       control_image, control_images, t2i_artifact, caplog):
    """control_guidance_start/end run each ControlNet on its fraction of the steps, as diffusers' ControlNet
    pipelines (text-to-image and img2img, one ControlNet and a MultiControlNetModel, the windows given as one
    number or one per ControlNet); over an artifact the fused graph takes the same per-step scales."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    net_a, net_b = ControlNetModel.from_pretrained(t2i_folder / "controlnet"), ControlNetModel.from_pretrained(t2i_controlnet_b)
    one = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder, controlnet=net_a)
    steps = dict(num_inference_steps=5)
    full = run(torch_cn_pipe, control_image=control_image, seed=1, **steps).images
    windowed = []
    for window in (dict(control_guidance_start=0.4), dict(control_guidance_end=0.6), dict(control_guidance_start=0.2, control_guidance_end=0.8)):
        expected = run_diffusers(one, image=control_image, seed=1, **steps, **window)
        result = run(torch_cn_pipe, control_image=control_image, seed=1, **steps, **window)
        assert max_abs(result.images, expected) <= DIFFUSERS_TOL, window
        windowed.append(result.images)
    assert min(max_abs(full, w) for w in windowed) > 1e-3  # the windows switch the ControlNet off for some steps
    assert result.metadata["control_guidance"] == [[0.2, 0.8]]
    # From the CLI review: a window that holds none of the steps (each of 2 steps ends past 0.3) ran without a word.
    with caplog.at_level("WARNING", logger="diffrt.runtime.text_to_image"):
        idle = run(torch_cn_pipe, control_image=control_image, seed=1, num_inference_steps=2, control_guidance_end=0.3).images
    assert "ControlNet 0: its window [0, 0.3] of the steps holds none of these 2, so it never acts" in caplog.text
    assert torch.equal(idle, run(torch_cn_pipe, control_image=control_image, seed=1, num_inference_steps=2,
                                 controlnet_conditioning_scale=0.0).images)

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    i2i = diffusers_pipe(StableDiffusionControlNetImg2ImgPipeline, t2i_folder, controlnet=net_a)
    window = dict(control_guidance_start=0.3, control_guidance_end=0.9, strength=0.8)
    expected = run_diffusers(i2i, image=image, control_image=control_image, seed=2, **steps, **window)
    assert max_abs(run(torch_cn_pipe, image=image, control_image=control_image, seed=2, **steps, **window).images, expected) <= DIFFUSERS_TOL

    multi = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder, controlnet=[net_a, net_b])
    for window in (dict(control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0]), dict(control_guidance_end=0.4)):
        expected = run_diffusers(multi, image=control_images, controlnet_conditioning_scale=[0.7, 1.2], seed=1, **steps, **window)
        result = run(torch_multi_pipe, control_image=control_images, controlnet_conditioning_scale=[0.7, 1.2], seed=1, **steps, **window)
        assert max_abs(result.images, expected) <= DIFFUSERS_TOL, window

    from diffrt.runtime.text_to_image_loading import artifact_text_to_image_pipeline

    window = dict(control_guidance_start=0.2, control_guidance_end=0.8)
    ort = artifact_text_to_image_pipeline(t2i_artifact, "onnxruntime")
    eager = run(torch_cn_pipe, control_image=control_image, seed=1, **steps, **window).images
    assert max_abs(run(ort, control_image=control_image, seed=1, **steps, **window).images, eager) <= 1e-3


@pytest.fixture(scope="module")
def pooled_folder(t2i_folder, tmp_path_factory):
    """t2i_folder with its ControlNet's config asking for global_pool_conditions, as shuffle ControlNets do."""
    import json
    import shutil

    folder = shutil.copytree(t2i_folder, tmp_path_factory.mktemp("pooled") / "sd")
    config = folder / "controlnet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "global_pool_conditions": True}))
    return folder


def test_a_pooling_controlnet_runs_guess_mode_as_the_controlnet_pipeline(pooled_folder, control_image, tmp_path):
    """The bug: a ControlNet with global_pool_conditions (shuffle) makes diffusers run guess mode, where under CFG
    only the conditional half gets the ControlNet's residuals; diffrt gave them to both halves, silently (0.28
    apart at guidance 7.5). An artifact records the flag and its fused graph runs the same."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffrt.export.options import ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    ref = diffusers_pipe(StableDiffusionControlNetPipeline, pooled_folder,
                         controlnet=ControlNetModel.from_pretrained(pooled_folder / "controlnet"))
    pipe = open_text_to_image_pipeline(pooled_folder, "torch", CPU, controlnet=pooled_folder / "controlnet")
    for kwargs in (dict(guidance_scale=7.5), dict(guidance_scale=7.5, guess_mode=True), dict(guidance_scale=1.0)):
        expected = run_diffusers(ref, image=control_image, seed=1, **kwargs)
        result = run(pipe, control_image=control_image, seed=1, **kwargs)
        assert max_abs(result.images, expected) <= DIFFUSERS_TOL, kwargs
        assert result.metadata["guess_mode"] is True  # set by the ControlNet's pooling, with CFG or without

    options = ExportOptions(**T2I_RANGES, verify=False)
    artifact = export_text_to_image(pooled_folder, tmp_path / "artifact", options, [pooled_folder / "controlnet"]).folder
    onnx = open_text_to_image_pipeline(artifact, "onnxruntime", CPU)
    assert onnx.controlnet_global_pool == [True]
    eager = run(pipe, control_image=control_image, seed=1).images
    assert max_abs(run(onnx, control_image=control_image, seed=1).images, eager) <= 1e-3


def test_guess_mode_equals_the_controlnet_pipeline(t2i_folder, t2i_controlnet_b, torch_cn_pipe, torch_multi_pipe, torch_pipe,
                                                    control_image, control_images, t2i_artifact):
    """guess_mode=True for ControlNets that do not pool their conditions: diffusers' ControlNetModel weights their
    residuals by depth (logspace(-1, 0), 0.1 at the first to 1 at the mid block) and, under CFG, gives the
    unconditional half none. One ControlNet and two, eager and over the exported fused graph (which takes a scale
    per residual), equal diffusers' pipeline; the mode changes the image."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    net_a, net_b = ControlNetModel.from_pretrained(t2i_folder / "controlnet"), ControlNetModel.from_pretrained(t2i_controlnet_b)
    one = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder, controlnet=net_a)
    expected = run_diffusers(one, image=control_image, controlnet_conditioning_scale=0.7, guess_mode=True, seed=1)
    result = run(torch_cn_pipe, control_image=control_image, controlnet_conditioning_scale=0.7, guess_mode=True, seed=1)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    assert result.metadata["guess_mode"] is True
    plain = run(torch_cn_pipe, control_image=control_image, controlnet_conditioning_scale=0.7, seed=1).images
    assert max_abs(plain, expected) > 1e-2  # the depth weights and the unconditional half matter
    # Without CFG the depth weights apply still (they were dropped with the unconditional half's zeros).
    expected = run_diffusers(one, image=control_image, guidance_scale=1.0, guess_mode=True, seed=1)
    result = run(torch_cn_pipe, control_image=control_image, guidance_scale=1.0, guess_mode=True, seed=1)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL and result.metadata["guess_mode"] is True
    assert max_abs(run(torch_cn_pipe, control_image=control_image, guidance_scale=1.0, seed=1).images, expected) > 1e-3

    multi = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder, controlnet=[net_a, net_b])
    window = dict(control_guidance_end=[1.0, 0.5], num_inference_steps=4)
    expected = run_diffusers(multi, image=control_images, controlnet_conditioning_scale=[0.5, 1.5], guess_mode=True, seed=1, **window)
    result = run(torch_multi_pipe, control_image=control_images, controlnet_conditioning_scale=[0.5, 1.5], guess_mode=True, seed=1,
                 **window)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL

    from diffrt.runtime.text_to_image_loading import artifact_text_to_image_pipeline

    ort = artifact_text_to_image_pipeline(t2i_artifact, "onnxruntime")
    eager = run(torch_cn_pipe, control_image=control_image, guess_mode=True, seed=1).images
    assert max_abs(run(ort, control_image=control_image, guess_mode=True, seed=1).images, eager) <= 1e-3
    with pytest.raises(DiffrtError, match="guess_mode needs a ControlNet"):
        run(torch_pipe, guess_mode=True, num_inference_steps=1)


def test_a_fused_graph_exported_before_depth_scales_runs_and_refuses_only_guess_mode(t2i_folder, t2i_artifact, control_image, tmp_path):
    """An artifact from an earlier diffrt has a fused graph taking one scale per ControlNet ([K]): it runs as before,
    and guess mode for a ControlNet that does not pool, which needs a scale per residual, is refused by name."""
    import dataclasses

    from diffrt.components import TensorSpec
    from diffrt.export.onnx import export_onnx
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from diffrt.text_to_image_models import load_controlnets, load_unet

    class Before(torch.nn.Module):  # the fused component as diffrt exported it until the scales had a residual axis
        def __init__(self, unet, controlnet):
            super().__init__()
            self.unet, self.controlnet = unet, controlnet

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                        conditioning_scale=conditioning_scale[0], return_dict=False)
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, return_dict=False)[0]

    pipe = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    new = pipe.unet.spec
    spec = dataclasses.replace(new, inputs=tuple(TensorSpec(t.name, (1,)) if t.name == "conditioning_scale" else t for t in new.inputs))
    model = Before(load_unet(t2i_folder), load_controlnets([t2i_folder / "controlnet"]))
    path = export_onnx(model, spec, tmp_path / "unet_controlnet")
    kwargs = dict(control_image=control_image, controlnet_conditioning_scale=0.6, num_inference_steps=2, seed=1, output_type="pt")
    expected = pipe("a cat", **kwargs).images
    pipe.unet = OnnxRuntimeBackend(path, spec, threads=1)
    assert max_abs(pipe("a cat", **kwargs).images, expected) <= 1e-4
    # Guidance through the UNet runs the PyTorch fallback on the same [K] feed (it crashed on it: a 0-d row).
    from diffrt.runtime.guidance import color_guidance

    guided = pipe("a cat", guidance=[color_guidance("#ff0000", 50.0, mode="through_unet")], **kwargs).images
    assert torch.isfinite(guided).all() and max_abs(guided, expected) > 1e-4
    with pytest.raises(DiffrtError, match="takes one scale per ControlNet; export it again, or leave guess_mode off") as info:
        pipe("a cat", guess_mode=True, **kwargs)
    assert "\n" not in str(info.value)


def test_control_guidance_goes_by_step_where_a_karras_schedule_repeats_timesteps(t2i_folder, tmp_path, control_image):
    """The bug: the per-step scales were looked up by timestep value, and DPM-Solver++ with Karras sigmas on a cosine
    schedule repeats t = 998 seven times in 16 steps, so control_guidance_end=0.3 left the ControlNet off at every
    step (the last step with that value won). Each UNet call must get diffusers' controlnet_keep for its step."""
    from diffusers import DPMSolverMultistepScheduler

    from conftest import sd_folder_with_scheduler

    folder = sd_folder_with_scheduler(t2i_folder, tmp_path / "cos", DPMSolverMultistepScheduler,
                                      beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    pipe = open_text_to_image_pipeline(folder, "torch", CPU, controlnet=folder / "controlnet")
    seen, run_unet = [], pipe.unet.run
    pipe.unet.run = lambda inputs: seen.append(inputs["conditioning_scale"][0, -1].item()) or run_unet(inputs)
    for start, end in ((0.0, 0.3), (0.25, 1.0)):
        seen.clear()
        result = pipe("a cat", num_inference_steps=16, control_image=control_image, control_guidance_start=start,
                      control_guidance_end=end, seed=0, output_type="pt")
        timesteps = result.metadata["timesteps"]
        assert len(set(timesteps)) < len(timesteps)  # the control: the schedule repeats a timestep
        assert seen == [1.0 - float(i / 16 < start or (i + 1) / 16 > end) for i in range(16)]


def test_control_guidance_bad_arguments_are_one_line(torch_pipe, torch_cn_pipe, torch_multi_pipe, control_image, control_images):
    cases = [
        (torch_cn_pipe, dict(control_image=control_image, control_guidance_start=0.5, control_guidance_end=0.5),
         r"must start before it ends, within \[0, 1\].*start 0.5, end 0.5"),
        (torch_cn_pipe, dict(control_image=control_image, control_guidance_end=1.5), r"start 0.0, end 1.5"),
        (torch_cn_pipe, dict(control_image=control_image, control_guidance_start="half"), r"control_guidance_start must be a number"),
        (torch_multi_pipe, dict(control_image=control_images, control_guidance_start=[0.1, 0.2, 0.3]), r"have 3 values for 2 ControlNets"),
        (torch_multi_pipe, dict(control_image=control_images, control_guidance_start=[0.1, 0.2], control_guidance_end=[0.9]),
         r"control_guidance_start has 2 values but control_guidance_end 1"),
        (torch_pipe, dict(control_guidance_end=0.5), r"control_guidance_start/end need a ControlNet"),
    ]
    for pipe, kwargs, message in cases:
        with pytest.raises(DiffrtError, match=message) as info:
            run(pipe, num_inference_steps=1, **kwargs)
        assert "\n" not in str(info.value)


def test_multi_controlnet_bad_arguments_are_one_line(torch_multi_pipe, control_images):
    bad = [
        (dict(control_image=control_images[0]), r"the pipeline has 2 ControlNets, so pass a list of 2 images .*got one Tensor"),
        (dict(control_image=control_images * 3), r"pass a list of 2 images .*got a list of 6"),
        (dict(control_image=control_images, controlnet_conditioning_scale=[1.0, 0.5, 0.2]), r"has 3 values for 2 ControlNets"),
        (dict(control_image=[control_images[0], torch.rand(1, 3, 64, 64)]), r"control images differ in size \(32x32, 64x64"),
        (dict(control_image=[control_images[0], torch.rand(3, 3, 32, 32)]), r"got 3 control images for ControlNet 1 for 1 prompts"),
    ]
    for kwargs, message in bad:
        with pytest.raises(DiffrtError, match=message) as info:
            run(torch_multi_pipe, num_inference_steps=1, **kwargs)
        assert "\n" not in str(info.value)
    # height and width resize every control image, as for one ControlNet.
    images = run(torch_multi_pipe, num_inference_steps=1, height=32, width=32,
                 control_image=[control_images[0], torch.rand(1, 3, 64, 64)]).images
    assert images.shape == (1, 3, 32, 32)


def test_torch_equals_img2img_pipeline(t2i_folder, torch_pipe, control_image):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = diffusers_pipe(StableDiffusionImg2ImgPipeline, t2i_folder)
    for strength in (0.5, 0.8, 1.0):  # 1.0: the image noised to the first timestep, every step run
        kwargs = dict(image=control_image, strength=strength, num_inference_steps=4, num_images_per_prompt=2, eta=0.3)
        expected = run_diffusers(ref, seed=2, **kwargs)
        result = run(torch_pipe, seed=2, **kwargs)
        assert result.images.shape == (2, 3, 32, 32)
        assert max_abs(result.images, expected) <= DIFFUSERS_TOL
        assert result.num_inference_steps == int(4 * strength)


def test_torch_equals_controlnet_img2img_pipeline(t2i_folder, torch_cn_pipe, control_image):
    """image-to-image and a ControlNet in one request: diffusers' StableDiffusionControlNetImg2ImgPipeline."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    ref = diffusers_pipe(StableDiffusionControlNetImg2ImgPipeline, t2i_folder,
                         controlnet=ControlNetModel.from_pretrained(t2i_folder / "controlnet"))
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    kwargs = dict(strength=0.7, num_inference_steps=5, num_images_per_prompt=2, eta=0.4, controlnet_conditioning_scale=1.3)
    expected = run_diffusers(ref, seed=4, image=init, control_image=control_image, **kwargs)
    result = run(torch_cn_pipe, seed=4, image=init, control_image=control_image, **kwargs)
    assert result.images.shape == (2, 3, 32, 32)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    without = run(torch_cn_pipe, seed=4, image=init, control_image=control_image, **{**kwargs, "controlnet_conditioning_scale": 0.0})
    assert max_abs(result.images, without.images) > 1e-2  # the ControlNet took part


def test_controlnet_img2img_default_scale_is_diffusers(t2i_folder, torch_cn_pipe, control_image):
    """Left out, controlnet_conditioning_scale is diffusers' default for the pipeline the call is:
    0.8 in StableDiffusionControlNetImg2ImgPipeline (1.0 without `image`, as tested above)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    ref = diffusers_pipe(StableDiffusionControlNetImg2ImgPipeline, t2i_folder,
                         controlnet=ControlNetModel.from_pretrained(t2i_folder / "controlnet"))
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    kwargs = dict(image=init, control_image=control_image, strength=0.7, num_inference_steps=4)
    result = run(torch_cn_pipe, seed=4, **kwargs)
    assert max_abs(result.images, run_diffusers(ref, seed=4, **kwargs)) <= DIFFUSERS_TOL
    assert result.metadata["controlnet_conditioning_scale"] == 0.8


def test_tensor_images_resize_as_diffusers(t2i_folder, torch_cn_pipe):
    """A tensor or array resized to height x width goes through F.interpolate's default (nearest),
    as diffusers' VaeImageProcessor.resize does, so the images stay diffusers' images."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    ref = diffusers_pipe(StableDiffusionControlNetPipeline, t2i_folder,
                         controlnet=ControlNetModel.from_pretrained(t2i_folder / "controlnet"))
    large = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    expected = run_diffusers(ref, seed=1, image=large, height=32, width=48)
    result = run(torch_cn_pipe, seed=1, control_image=large, height=32, width=48).images
    assert result.shape == expected.shape == (1, 3, 32, 48)
    assert max_abs(result, expected) <= DIFFUSERS_TOL


def test_image_size_rounds_down_to_a_multiple_of_8_as_diffusers(t2i_folder, torch_pipe, control_image):
    """Without height and width the size comes from the image, rounded down to a multiple of the
    VAE's factor (diffusers' get_default_height_width): a 40 x 36 image gives 40 x 32 pixels."""
    from PIL import Image

    from diffusers import StableDiffusionImg2ImgPipeline

    array = torch.rand(36, 40, 3, generator=torch.Generator().manual_seed(13)).numpy()
    pil = Image.fromarray((array * 255).round().astype(np.uint8))
    ref = diffusers_pipe(StableDiffusionImg2ImgPipeline, t2i_folder)
    for image in (pil, array):
        expected = run_diffusers(ref, seed=2, image=image, strength=0.6, num_inference_steps=4)
        result = run(torch_pipe, seed=2, image=image, strength=0.6, num_inference_steps=4).images
        assert result.shape == expected.shape == (1, 3, 32, 40)
        assert max_abs(result, expected) <= DIFFUSERS_TOL


def test_img2img_on_a_zero_snr_schedule_checks_only_the_steps_it_runs(t2i_folder, torch_pipe, control_image):
    """From the samplers review: an epsilon model on a zero-terminal-SNR schedule cannot run timestep 999 (alpha_bar 0),
    but image-to-image at strength < 1 starts below it, as diffusers runs it; the whole schedule was refused."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    overrides = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="epsilon")
    config = ddim.DDIMConfig.from_scheduler_config({**DDIMScheduler.load_config(t2i_folder / "scheduler"), **overrides})
    kwargs = dict(image=control_image, strength=0.6, num_inference_steps=4)
    result = run(torch_pipe, seed=2, scheduler=config, **kwargs).images
    ref = diffusers_pipe(StableDiffusionImg2ImgPipeline, t2i_folder)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config, **overrides)
    expected = run_diffusers(ref, seed=2, **kwargs)
    assert torch.isfinite(result).all() and max_abs(result, expected) <= DIFFUSERS_TOL
    with pytest.raises(DiffrtError, match="alpha_bar is 0 at timestep 999"):  # strength 1 starts there
        run(torch_pipe, seed=2, scheduler=config, **{**kwargs, "strength": 1.0})


def test_list_of_tensor_images_is_a_batch(torch_pipe):
    """A list of [C, H, W] tensors or [H, W, C] arrays is one batch, as diffusers stacks it."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    kwargs = dict(prompt=["a red house", "a cat"], strength=0.6, num_inference_steps=4, seed=2)
    expected = run(torch_pipe, image=images, **kwargs).images
    assert torch.equal(run(torch_pipe, image=list(images), **kwargs).images, expected)
    assert torch.equal(run(torch_pipe, image=[im.permute(1, 2, 0).numpy() for im in images], **kwargs).images, expected)
    with pytest.raises(DiffrtError, match=r"images in the list differ in size \(3x32x32, 3x64x64") as info:
        run(torch_pipe, image=[images[0], torch.rand(3, 64, 64)], **kwargs)
    assert "\n" not in str(info.value)
    # From the t2i review: a PIL-led mixed list was an AttributeError (.convert on a tensor), a tensor-led one "got list".
    from PIL import Image

    photo = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    for mixed, kinds in (([photo, images[1]], "PIL images and arrays/tensors"), ([images[1], photo], "arrays/tensors and PIL images")):
        with pytest.raises(DiffrtError, match=rf"^the images in the list mix {kinds}; give one kind"):
            run(torch_pipe, image=mixed, **kwargs)


def test_init_and_control_images_of_other_sizes_are_one_line(torch_cn_pipe, control_image):
    with pytest.raises(DiffrtError, match=r"image is 64x64 pixels but control_image 32x32; .*pass height and width") as info:
        run(torch_cn_pipe, image=torch.rand(1, 3, 64, 64), control_image=control_image, num_inference_steps=2)
    assert "\n" not in str(info.value)
    images = run(torch_cn_pipe, image=torch.rand(1, 3, 64, 64), control_image=control_image, num_inference_steps=2,
                 height=32, width=32).images  # height and width resize both, as diffusers does
    assert images.shape == (1, 3, 32, 32)
    # From the CLI review: a 3x3 control image said "height 3 is outside the range", naming neither the image nor the fix.
    for given, source in ((dict(control_image=torch.rand(1, 3, 3, 3)), "control_image"), (dict(image=torch.rand(1, 3, 3, 40)), "image")):
        with pytest.raises(ShapeOutOfRangeError, match=rf"^height 3 is outside .* \(the height of {source}, as height was not "
                                                      r"given: pass height to resize it\)$"):
            run(torch_cn_pipe, **given, num_inference_steps=2)
        assert run(torch_cn_pipe, **given, num_inference_steps=2, height=32, width=32).images.shape == (1, 3, 32, 32)
    # A side given is the caller's own, even beside one taken from the image (a review's); latents are not resized.
    with pytest.raises(ShapeOutOfRangeError, match=r"^height 8 is outside [^(]*$"):
        run(torch_cn_pipe, control_image=control_image, num_inference_steps=2, height=8)
    with pytest.raises(ShapeOutOfRangeError, match=r"^width 8 is outside .* \(the width of latents x 8, as width was not given: "
                                                  r"give latents of a size the UNet runs\)$"):
        run(torch_cn_pipe, latents=torch.randn(1, 4, 4, 1), num_inference_steps=2)


def generators(*seeds) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def test_list_of_generators_equals_stable_diffusion_pipeline(t2i_folder, torch_pipe):
    """diffusers' list of generators, one per image: each image's x_T and eta noise from its own."""
    from diffusers import StableDiffusionPipeline

    kwargs = dict(num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2, eta=0.5, output_type="pt")
    prompts = ["a red house", "a photo of the cat"]
    ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder)
    expected = ref(prompts, generator=generators(1, 2, 3, 4), **kwargs).images
    result = torch_pipe(prompts, generator=generators(1, 2, 3, 4), **kwargs)
    assert result.images.shape == expected.shape == (4, 3, 32, 32)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    alone = torch_pipe(prompts[1], seed=3, **{**kwargs, "num_images_per_prompt": 1}).images  # image 2 is seed 3's own
    assert max_abs(result.images[2], alone[0]) <= DIFFUSERS_TOL
    with pytest.raises(DiffrtError, match=r"got a list of 3 generators for a batch of 4 images") as info:
        torch_pipe(prompts, generator=generators(1, 2, 3), **kwargs)
    assert "\n" not in str(info.value)


def test_list_of_generators_equals_img2img_pipeline(t2i_folder, torch_pipe, control_image):
    """img2img with one generator per image: each samples its own VAE posterior row, then its own noise."""
    from diffusers import StableDiffusionImg2ImgPipeline

    kwargs = dict(image=control_image, strength=0.8, num_inference_steps=4, num_images_per_prompt=3, eta=0.3,
                  guidance_scale=5.0, output_type="pt")
    expected = diffusers_pipe(StableDiffusionImg2ImgPipeline, t2i_folder)("a photo of the cat", generator=generators(5, 6, 7),
                                                                            **kwargs).images
    result = torch_pipe("a photo of the cat", generator=generators(5, 6, 7), **kwargs).images
    assert result.shape == expected.shape == (3, 3, 32, 32)
    assert max_abs(result, expected) <= DIFFUSERS_TOL
    assert max_abs(result[0], result[1]) > 1e-2  # each image sampled its own posterior and noise


def test_torch_lora_at_generation_equals_diffusers_fuse_lora(t2i_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffrt.tiny import tiny_lora_files

    lora = tiny_lora_files(t2i_folder, tmp_path / "lora", seed=5)["peft"]
    ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder)
    ref.load_lora_weights(lora, adapter_name="a")
    ref.fuse_lora(lora_scale=0.7)
    expected = run_diffusers(ref, seed=4)
    result = run(open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 0.7)]), seed=4)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL


def test_output_types_and_seed(torch_pipe):
    pt = run(torch_pipe, seed=9).images
    assert torch.equal(pt, run(torch_pipe, seed=9).images)
    assert not torch.equal(pt, run(torch_pipe, seed=10).images)
    arr = torch_pipe("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, seed=9, output_type="np").images
    assert arr.dtype == np.float32 and arr.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    (pil,) = torch_pipe("a photo of the cat", num_inference_steps=STEPS, guidance_scale=5.0, seed=9, output_type="pil").images
    assert pil.size == (32, 32)


# --- onnxruntime equals torch ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(negative_prompt="blurry"), dict(num_images_per_prompt=2, eta=0.5),
                                    dict(control_scale=0.8), dict(img2img=0.6)], ids=["cfg", "x2-eta", "controlnet", "img2img"])
def test_onnxruntime_equals_torch(ort_pipe, torch_cn_pipe, control_image, kwargs):
    kwargs = dict(kwargs)
    if "control_scale" in kwargs:
        kwargs.update(control_image=control_image, controlnet_conditioning_scale=kwargs.pop("control_scale"))
    if "img2img" in kwargs:
        kwargs.update(image=control_image, strength=kwargs.pop("img2img"))
    expected = run(torch_cn_pipe, seed=5, **kwargs)
    result = run(ort_pipe, seed=5, **kwargs)
    assert result.backend == "onnxruntime"
    assert set(result.metadata["components"].values()) == {"onnxruntime"}
    assert max_abs(result.images, expected.images) <= ORT_TOL


@pytest.mark.parametrize("scale", [[0.7, 1.2], 0.9], ids=["per-controlnet", "one-for-all"])
def test_onnxruntime_two_controlnets_equal_torch(t2i_multi_artifact, torch_multi_pipe, torch_pipe, control_images, scale):
    pipe = open_text_to_image_pipeline(t2i_multi_artifact, "onnxruntime", CPU)
    assert pipe.num_controlnets == 2 and pipe.unet.spec.name == "unet_controlnet"
    kwargs = dict(control_image=control_images, controlnet_conditioning_scale=scale, seed=5)
    result = run(pipe, **kwargs)
    assert result.backend == "onnxruntime" and set(result.metadata["components"].values()) == {"onnxruntime"}
    assert max_abs(result.images, run(torch_multi_pipe, **kwargs).images) <= ORT_TOL
    # Without control images the two-ControlNet graph runs at scale 0: the plain UNet.
    assert max_abs(run(pipe, seed=6).images, run(torch_pipe, seed=6).images) <= ORT_TOL


def test_fused_controlnet_without_control_image_is_the_plain_unet(ort_pipe, torch_pipe):
    # The artifact has only the fused graph: no control image runs it at scale 0, which adds nothing.
    assert max_abs(run(ort_pipe, seed=6).images, run(torch_pipe, seed=6).images) <= ORT_TOL


# --- gradient guidance --------------------------------------------------------------------------


def mean_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(0, 2, 3))


# The tiny VAE is random: the GroupNorms of its decoder pin each image's mean colour, so no latent
# decodes to red. Optimising the latent directly (Adam, 200 steps) brings the mean colour only about
# 0.06 closer to red (L1 over RGB); the margins below are a fair share of that, and the direction
# of every channel must be right.
COLOR_SCALE = 3000.0


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_color_guidance_moves_mean_colour(backend, mode, torch_cn_pipe, ort_pipe):
    pipe = torch_cn_pipe if backend == "torch" else ort_pipe
    target = torch.tensor([1.0, 0.0, 0.0])
    base = mean_rgb(run(pipe, seed=11).images)
    guided = run(pipe, seed=11, guidance=[color_guidance("#ff0000", COLOR_SCALE, mode=mode)])
    moved = mean_rgb(guided.images)
    assert moved[0] - base[0] > 0.004 and (base[1:] - moved[1:]).min() > 0.001  # red up, green and blue down
    assert (base - target).abs().sum() - (moved - target).abs().sum() > 0.008
    assert guided.metadata["guidance"] == ["color"]
    # What ran in PyTorch whatever the backend (RELIABILITY #15): the VAE decoder on guided steps, the UNet in through_unet.
    assert guided.metadata["guidance_pytorch"] == (["unet", "vae_decoder"] if mode == "through_unet" else ["vae_decoder"])


def test_custom_callable_guidance(torch_pipe):
    bluer = Guidance(lambda images: -images[:, 2].mean(dim=(1, 2)).sum(), scale=COLOR_SCALE, name="bluer")
    result = run(torch_pipe, seed=12, guidance=[bluer])
    assert mean_rgb(result.images)[2] > mean_rgb(run(torch_pipe, seed=12).images)[2] + 0.008
    assert result.metadata["guidance"] == ["bluer"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor saved locally (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffrt.tiny import BOS_TOKEN, EOS_TOKEN, tiny_tokenizer, tokenizer_vocab

    folder = tmp_path_factory.mktemp("clip")
    vocab = tokenizer_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
                pad_token_id=vocab[EOS_TOKEN])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_clip_guidance_lowers_clip_loss(clip_dir, torch_pipe, mode):
    from diffrt.runtime.clip_guidance import clip_guidance

    guidance = clip_guidance(clip_dir, "a red square", scale=300.0, mode=mode)
    base = run(torch_pipe, seed=13).images
    guided = run(torch_pipe, seed=13, guidance=[guidance]).images
    loss = guidance.loss.per_image
    assert loss(guided).item() < loss(base).item() - 0.02


def test_clip_guidance_needs_a_local_folder(tmp_path):
    from diffrt.runtime.clip_guidance import clip_guidance

    with pytest.raises(DiffrtError, match="not a CLIP model folder"):
        clip_guidance(tmp_path, "a cat", 1.0)


def test_through_unet_refuses_a_fallback_that_disagrees_with_the_engine(t2i_artifact, t2i_folder):
    # RELIABILITY #16: a PyTorch UNet with other weights than the engine (another LoRA, another
    # scale) must not steer the guidance.
    from diffrt.text_to_image_models import UNetControlNet, load_controlnet, load_unet

    pipe = artifact_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    other = UNetControlNet(load_unet(t2i_folder), load_controlnet(t2i_folder / "controlnet"))
    with torch.no_grad():
        other.unet.conv_out.weight.mul_(1.5)
    pipe._torch["unet"] = other
    with pytest.raises(DiffrtError, match="differs from the onnxruntime UNet"):
        run(pipe, seed=1, guidance=[color_guidance("#00ff00", 10.0, mode="through_unet")])


# --- bad input: one clear error each ------------------------------------------------------------------


def test_long_prompt_is_truncated_with_warning_and_metadata(t2i_folder, torch_pipe, caplog):
    from diffusers import StableDiffusionPipeline

    prompt = " ".join(f"word{i}" for i in range(60))  # well over 77 tokens
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        result = run(torch_pipe, prompt, seed=14)
    assert any("truncated" in r.getMessage() for r in caplog.records)
    dropped = result.metadata["truncated"][0]
    ids = torch_pipe.tokenizer(prompt).input_ids
    assert len(ids) > 77 and dropped == torch_pipe.tokenizer.decode(ids[76:-1])  # what diffusers reports
    assert dropped.replace(" ", "").endswith("word59")
    assert result.metadata["truncated"] == [dropped] and run(torch_pipe, seed=14).metadata["truncated"] == [None]
    # diffusers truncates the same way, so the images still agree.
    expected = run_diffusers(diffusers_pipe(StableDiffusionPipeline, t2i_folder), prompt, seed=14)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL


def test_a_truncated_negative_prompt_is_reported_under_its_own_key(torch_pipe, caplog):
    """From a review: a negative prompt cut at the text encoder's length was reported in metadata['truncated_negative']
    while the warning pointed at metadata['truncated'], and no test looked at truncated_negative (emptying it passed)."""
    long_negative = " ".join(f"blur{i}" for i in range(60))
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        result = run(torch_pipe, ["a cat", "a dog"], negative_prompt=["", long_negative], seed=3)
    cut = result.metadata["truncated_negative"]
    assert cut[0] is None and cut[1].replace(" ", "").endswith("blur59") and result.metadata["truncated"] == [None, None]
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warning.startswith("a negative prompt longer") and "metadata['truncated_negative']" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        swapped = run(torch_pipe, ["a cat", long_negative], negative_prompt=["", "a dog"], seed=3)
    assert swapped.metadata["truncated"][1] == cut[1] and swapped.metadata["truncated_negative"] == [None, None]
    (warning,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warning.startswith("a prompt longer") and "metadata['truncated']" in warning


@pytest.mark.parametrize("height, match", [(36, r"multiple of 8 \(the VAE's downsampling factor\)"), (8, "outside")])
def test_bad_height(torch_pipe, height, match):
    with pytest.raises(ShapeOutOfRangeError, match=match):
        run(torch_pipe, height=height, width=32)


def test_eager_takes_any_multiple_of_8_as_diffusers_does(t2i_folder, torch_pipe, ort_pipe):
    # 40 x 48 pixels are 5 x 6 latents, which the UNet cannot halve exactly: diffusers' UNet
    # upsamples to each skip's size, so eager PyTorch runs them; an exported graph cannot.
    from diffusers import StableDiffusionPipeline

    expected = run_diffusers(diffusers_pipe(StableDiffusionPipeline, t2i_folder), seed=5, height=40, width=48)
    result = run(torch_pipe, seed=5, height=40, width=48)
    assert result.images.shape == expected.shape == (1, 3, 40, 48)
    assert max_abs(result.images, expected) <= DIFFUSERS_TOL
    with pytest.raises(ShapeOutOfRangeError, match=r"height 40 must be a multiple of 16 \(the VAE's 8 x the unet_controlnet graph's 2\); try 32"):
        run(ort_pipe, height=40, width=48)
    # Outside the range, the range is named (it suggested 16, outside the range too, for 24).
    with pytest.raises(ShapeOutOfRangeError, match=r"height 24 is outside the unet_controlnet's built range \[32, 64\]"):
        run(ort_pipe, height=24, width=48)


def test_engine_ranges_are_named(ort_pipe):
    with pytest.raises(ShapeOutOfRangeError, match=r"height 80 is outside the unet_controlnet's built range \[32, 64\]"):
        run(ort_pipe, height=80)
    with pytest.raises(ShapeOutOfRangeError, match=r"width 96 .*\[32, 64\]"):
        run(ort_pipe, width=96)
    with pytest.raises(ShapeOutOfRangeError, match=r"batch 6 \(3 images x 2 for classifier-free guidance\).*\[1, 4\]"):
        run(ort_pipe, num_images_per_prompt=3)


def test_other_bad_arguments(torch_pipe, control_image):
    with pytest.raises(DiffrtError, match="ControlNet"):
        run(torch_pipe, control_image=control_image)
    with pytest.raises(DiffrtError, match="strength"):
        run(torch_pipe, image=control_image, strength=1.5)
    with pytest.raises(DiffrtError, match="no denoising step"):
        run(torch_pipe, image=control_image, strength=0.1)
    with pytest.raises(DiffrtError, match="negative_prompt has 2 entries"):
        run(torch_pipe, negative_prompt=["a", "b"])
    with pytest.raises(DiffrtError, match=r"\[0, 1\]"):
        run(torch_pipe, image=control_image * 2 - 1)


class NaNBackend:
    """Wraps a backend and poisons its first output with a NaN."""

    def __init__(self, inner):
        self.inner, self.name, self.spec, self.device = inner, inner.name, inner.spec, inner.device

    def run(self, feed):
        out = self.inner.run(feed)
        name = self.spec.output_names[0]
        poisoned = out[name].clone()
        poisoned.view(-1)[0] = float("nan")
        return {**out, name: poisoned}


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_nan_is_reported_with_the_component_name(t2i_folder, component):
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU)
    setattr(pipe, component, NaNBackend(getattr(pipe, component)))
    with pytest.raises(NonFiniteOutputError, match=f"^{component} produced 1 non-finite"):
        run(pipe, seed=0)


def test_nan_from_the_img2img_encoder_is_named(t2i_folder, control_image):
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU)
    with torch.no_grad():
        pipe.torch_module("vae", "test").encoder.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteOutputError, match="^vae_encoder produced"):
        run(pipe, image=control_image, strength=0.7, seed=0)


def test_metadata_names_what_ran_each_component(ort_pipe, torch_pipe):
    meta = run(ort_pipe, seed=2, num_inference_steps=1).metadata
    names = ["text_encoder", "unet_controlnet", "vae_decoder"]  # the artifact's VAE encoder too, but text-to-image runs none
    assert meta["components"] == dict.fromkeys(names, "onnxruntime")
    assert meta["providers"] == dict.fromkeys(names, ["CPUExecutionProvider"]) and meta["cuda_graph"] is False
    meta = run(torch_pipe, seed=2, num_inference_steps=1).metadata
    assert meta["providers"] == {} and set(meta["components"].values()) == {"torch"}


def test_strict_refuses_torch_weights_for_an_artifact(t2i_artifact):
    from diffrt.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="strict mode refuses"):
        open_text_to_image_pipeline(t2i_artifact, "torch", CPU, strict=True)


# --- `diffrt generate` ------------------------------------------------------------------------------


def test_generate_request(t2i_folder, tmp_path, control_image):
    from diffrt.generate import GenerateRequest, generate, generate_to_file
    from diffrt.images import to_pil

    req = GenerateRequest(model=str(t2i_folder), prompt="a cat", negative_prompt="dark", num_inference_steps=2, seed=3,
                          num_images=2, guidance_scale=4.0, color="#0000ff", color_scale=100.0,
                          out=str(tmp_path / "out.npy"))
    result, path = generate_to_file(req)
    images = np.load(path)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32 and result.backend == "torch"
    (pil,) = to_pil(control_image)
    pil.save(tmp_path / "control.png")
    req = GenerateRequest(model=str(t2i_folder), prompt="a cat", num_inference_steps=2, controlnet=str(t2i_folder / "controlnet"),
                          control_image=str(tmp_path / "control.png"), control_scale=0.5)
    assert generate(req).images.shape == (1, 3, 32, 32)
    with pytest.raises(DiffrtError, match="needs --control-image"):
        generate(GenerateRequest(model=str(t2i_folder), prompt="a cat", controlnet=str(t2i_folder / "controlnet")))
    with pytest.raises(DiffrtError, match="control_image needs a ControlNet"):
        generate(GenerateRequest(model=str(t2i_folder), prompt="a cat", control_image=str(tmp_path / "control.png")))


def test_generate_clip_flags_on_a_pixel_model(clip_dir, uncond_model_dir, tmp_path, capsys):
    from diffrt.cli import main

    common = ["generate", "--model", str(uncond_model_dir), "--steps", "2", "--device", CPU]
    assert main([*common, "--out", str(tmp_path / "plain.npy")]) == 0
    assert main([*common, "--clip-prompt", "a red square", "--clip-model", str(clip_dir), "--clip-scale", "300",
                 "--out", str(tmp_path / "clip.npy")]) == 0
    assert np.abs(np.load(tmp_path / "clip.npy") - np.load(tmp_path / "plain.npy")).max() > 1e-3
    assert main([*common, "--clip-prompt", "a red square", "--out", str(tmp_path / "x.npy")]) == 2
    assert "--clip-prompt needs --clip-model" in capsys.readouterr().err


def test_generate_cli_runs_image_to_image(t2i_folder, control_image, tmp_path):
    """`diffrt generate --image FILE --strength F` is the pipeline's img2img (diffusers' `image`, `strength`)."""
    from diffrt.generate import GenerateRequest, generate
    from diffrt.images import load_image, png_bytes

    path = tmp_path / "init.png"
    path.write_bytes(png_bytes(control_image[0]))
    request = GenerateRequest(model=str(t2i_folder), backend="torch", device=CPU, prompt="a photo of the cat", seed=2,
                              num_inference_steps=4, image=str(path), strength=0.5)
    images = generate(request).images
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU)
    expected = pipe("a photo of the cat", image=load_image(path), strength=0.5, num_inference_steps=4, seed=2,
                    guidance_scale=7.5, output_type="pt").images
    assert torch.equal(images, expected)
    assert not torch.equal(images, generate(replace(request, strength=0.9)).images)


def test_damaged_configs_are_one_line_not_a_traceback(t2i_folder, tmp_path):
    """A truncated unet/config.json is refused by name; a truncated model_index.json (read only to warn
    when it and the scheduler config disagree about LCM) does not stop the folder from opening."""
    import shutil

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet*"))
    (folder / "model_index.json").write_text((folder / "model_index.json").read_text()[:20])
    assert open_text_to_image_pipeline(folder, "torch", CPU) is not None
    (folder / "unet" / "config.json").write_text('{"in_channels": 4,')
    with pytest.raises(DiffrtError, match=r"unet/config.json is not valid JSON .*restore the model's config"):
        open_text_to_image_pipeline(folder, "torch", CPU)


def _edit_json(path, **changes):
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_tensor(path, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors[next(key for key in tensors if key.endswith(name))]  # transformers' prefixes differ between versions
    save_file(tensors, path)


DAMAGED_FOLDERS = {  # from the loading review: each was a traceback deep in diffusers/torch, or loaded wrongly and ran
    "scheduler-not-json": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler",'),
                           r"scheduler_config.json is not valid JSON"),
    "scheduler-a-list": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text("[1, 2]"), r"scheduler_config.json holds no JSON object"),
    "scheduler-string-count": (lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", num_train_timesteps="1000"),
                               r"num_train_timesteps is '1000'; expected an integer"),
    "tokenizer-config-only": (lambda f: [p.unlink() for p in (f / "tokenizer").iterdir() if p.name != "tokenizer_config.json"],
                              r"tokenizer is no CLIP tokenizer \(it holds tokenizer_config.json\): it needs vocab.json with merges.txt"),
    "tokenizer-no-max-length": (lambda f: _edit_json(f / "tokenizer" / "tokenizer_config.json", model_max_length=100),
                                r"gives model_max_length 100, but the text encoder takes 77 tokens"),
    "text-encoder-embeds-fewer-tokens": (lambda f: _edit_json(f / "text_encoder" / "config.json", vocab_size=100),
                                         r"tokenizer has 521 tokens but .*text_encoder/config.json embeds 100 \(vocab_size\)"),
    "unet-is-a-unet2d": (lambda f: _edit_json(f / "unet" / "config.json", _class_name="UNet2DModel"),
                         r"unet holds a UNet2DModel, where a Stable Diffusion pipeline folder has its UNet2DConditionModel"),
    "text-encoder-wider": (lambda f: _edit_json(f / "text_encoder" / "config.json", hidden_size=64),
                           r"unet/config.json has cross_attention_dim 32 but .*text_encoder/config.json has hidden_size 64"),
    "vae-other-latents": (lambda f: _edit_json(f / "vae" / "config.json", latent_channels=8),
                          r"unet/config.json has in_channels 4 but .*vae/config.json has latent_channels 8"),
    "unet-lacks-a-tensor": (lambda f: _drop_tensor(f / "unet" / "diffusion_pytorch_model.safetensors", "conv_out.weight"),
                            r"unet: its weights lack 1 of the tensors its config.json makes \(e.g. conv_out.weight\)"),
    "text-encoder-lacks-a-tensor": (lambda f: _drop_tensor(f / "text_encoder" / "model.safetensors", "layers.1.mlp.fc1.weight"),
                                    r"text_encoder: its weights lack 1 of the tensors"),  # it ran with a random layer, rc 0
}


@pytest.mark.parametrize("damage", DAMAGED_FOLDERS)
def test_a_damaged_or_mismatched_folder_is_one_line_naming_its_file(t2i_folder, tmp_path, damage):
    import shutil

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet*"))
    edit, message = DAMAGED_FOLDERS[damage]
    edit(folder)
    with pytest.raises(DiffrtError, match=message) as info:
        open_text_to_image_pipeline(folder, "torch", CPU)
    assert "\n" not in str(info.value)


def test_an_inpainting_unet_is_named_as_one_by_export_too(t2i_folder, tmp_path):
    """The parts check (an export's first look, configs only) named an inpainting UNet's 9 input channels a VAE of
    another model's; what it is, and what to use, is the line."""
    import shutil

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet*"))
    _edit_json(folder / "unet" / "config.json", in_channels=9)
    for opening in (lambda: load_text_to_image(folder, weights=False), lambda: open_text_to_image_pipeline(folder, "torch", CPU)):
        with pytest.raises(DiffrtError, match=r"takes 9 input channels but predicts 4 \(an inpainting or depth-to-image UNet"):
            opening()


def test_a_setting_left_to_its_default_matches_the_same_value_written_out(t2i_folder, tmp_path):
    """The parts check compares a config's JSON list with a default tuple (a key one config leaves out) as values: an
    SD-sized UNet config without block_out_channels and a ControlNet that writes diffusers' default out agree."""
    import shutil

    from diffrt.text_to_image_models import check_parts

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet*"))
    controlnet = shutil.copytree(t2i_folder / "controlnet", tmp_path / "cn")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    unet.pop("block_out_channels")
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    _edit_json(controlnet / "config.json", block_out_channels=[320, 640, 1280, 1280])
    check_parts(folder, [controlnet])  # no refusal
    _edit_json(controlnet / "config.json", block_out_channels=[320, 640, 1280])
    with pytest.raises(DiffrtError, match=r"has block_out_channels \[320, 640, 1280\] but .* has block_out_channels \(320, 640, 1280, 1280\)"):
        check_parts(folder, [controlnet])


def test_a_text_encoder_saved_with_a_whole_clip_config_opens(t2i_folder, tmp_path):
    """Some conversions save the text encoder's config as a whole CLIPConfig (model_type "clip", its settings in
    text_config), which CLIPTextModel reads: the parts check read its top level and refused the folder."""
    import shutil

    from transformers import CLIPConfig

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet*"))
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    whole = CLIPConfig(text_config={k: v for k, v in text.items() if not k.startswith("_") and k != "architectures"}).to_dict()
    (folder / "text_encoder" / "config.json").write_text(json.dumps(whole))
    pipe = open_text_to_image_pipeline(folder, "torch", CPU)
    assert torch.equal(run(pipe, seed=1, num_inference_steps=2).images,
                       run(open_text_to_image_pipeline(t2i_folder, "torch", CPU), seed=1, num_inference_steps=2).images)


def test_a_controlnet_of_another_unet_is_refused_by_its_config(t2i_folder, tmp_path):
    import shutil

    controlnet = shutil.copytree(t2i_folder / "controlnet", tmp_path / "cn")
    _edit_json(controlnet / "config.json", cross_attention_dim=64)
    with pytest.raises(DiffrtError, match=r"cn/config.json has cross_attention_dim 64 but .*unet/config.json has cross_attention_dim 32"):
        open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=controlnet)
    with pytest.raises(DiffrtError, match=r"is not a ControlNet folder: it has no config.json; its .*controlnet is one"):
        open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=t2i_folder)  # the pipeline folder, not its ControlNet
    with pytest.raises(DiffrtError, match=r"ControlNet folder not found: .*nope"):
        open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=tmp_path / "nope")


def test_a_sample_size_pair_gives_the_default_size_as_diffusers(t2i_folder, tmp_path):
    """diffusers' UNet2DConditionModel takes sample_size as [height, width]; its pipelines take the first."""
    import shutil

    folder = shutil.copytree(t2i_folder, tmp_path / "sd", ignore=shutil.ignore_patterns("controlnet*"))
    size = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
    _edit_json(folder / "unet" / "config.json", sample_size=[size, size])
    model = load_text_to_image(folder, weights=False)
    assert model.default_size == size * model.vae_factor


def test_calls_from_several_threads_take_the_tokenizer_in_turn(torch_pipe, monkeypatch):
    """From a review: a Hugging Face tokenizer sets its padding and truncation on itself for each call, and calls in
    several threads at once (one of them cut_off's untruncated count) fed the text encoder unpadded ids, a different
    image, or raised. The pipeline's calls may run beside each other, so its tokenizer calls take turns."""
    import threading
    import time

    tokenizer, inside, most = torch_pipe.tokenizer, [0], [0]

    class Watched:
        """The pipeline's tokenizer, counting the calls inside it at once (each lasting long enough to overlap)."""

        def __call__(self, *args, **kwargs):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            try:
                time.sleep(0.002)
                return tokenizer(*args, **kwargs)
            finally:
                inside[0] -= 1

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    monkeypatch.setattr(torch_pipe, "tokenizer", Watched())
    prompts = ["a photo of a cat", "a red car " * 40]
    alone = {p: torch_pipe._tokenize([p])[0] for p in prompts}

    other = []

    def work(prompt):
        for _ in range(20):
            if not torch.equal(torch_pipe._tokenize([prompt])[0], alone[prompt]):
                other.append(prompt)

    threads = [threading.Thread(target=work, args=(prompts[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1 and other == []


def test_arguments_whose_inputs_are_missing_are_refused_not_ignored(torch_pipe):
    """From a review: `strength` without `image` and `controlnet_conditioning_scale` without a ControlNet ran text-to-image
    with the value unread (control_guidance_start/end were refused); a NaN image was blamed on the VAE encoder; latents
    of the wrong batch were told to leave out height and width, which were left out."""
    run = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(DiffrtError, match=r"^strength 0.3 sets how much of `image` is redrawn"):
        torch_pipe("a cat", strength=0.3, **run)
    with pytest.raises(DiffrtError, match="^controlnet_conditioning_scale needs a ControlNet"):
        torch_pipe("a cat", controlnet_conditioning_scale=0.3, **run)
    with pytest.raises(DiffrtError, match=r"^image has 3072 NaN or infinite values"):
        torch_pipe("a cat", image=torch.full((1, 3, 32, 32), float("nan")), **run)
    with pytest.raises(DiffrtError) as err:
        torch_pipe("a cat", latents=torch.randn(2, 4, 4, 4), **run)
    assert "(batch: 1 images," in str(err.value) and "leave out height and width" not in str(err.value)
    with pytest.raises(DiffrtError, match=r"^latents must be floating point \(standard normal noise\), got torch.int64$"):
        torch_pipe("a cat", latents=torch.zeros(1, 4, 4, 4, dtype=torch.int64), **run)  # as the pixel pipeline's
    assert torch_pipe("a cat", image=torch.rand(1, 3, 32, 32), seed=1, **{**run, "num_inference_steps": 2}).metadata["strength"] == 0.8


def test_clip_skip_with_prompt_embeds_is_refused_and_metadata_says_what_ran(torch_pipe):
    """From the t2i review: clip_skip beside prompt_embeds changed nothing (only prompts are encoded at clip_skip, the
    negative ones at 0 as in diffusers) yet the metadata said clip_skip 1; guidance_rescale without classifier-free
    guidance rescales nothing, and the metadata said 0.7."""
    embeds = torch.randn(1, torch_pipe.max_length, 32, generator=torch.Generator().manual_seed(0))  # the tiny CLIP's width
    run = dict(num_inference_steps=2, seed=1, output_type="latent")
    with pytest.raises(DiffrtError, match=r"^clip_skip 1 sets the text-encoder layer that encodes the prompts, and prompt_embeds "
                                          r"come encoded; encode them at that layer, or leave clip_skip out$"):
        torch_pipe(prompt_embeds=embeds, clip_skip=1, **run)
    assert torch_pipe(prompt_embeds=embeds, **run).metadata["clip_skip"] == 0
    plain = torch_pipe("a cat", guidance_scale=1.0, **run)
    rescaled = torch_pipe("a cat", guidance_scale=1.0, guidance_rescale=0.7, **run)
    assert torch.equal(plain.images, rescaled.images) and rescaled.metadata["guidance_rescale"] == 0.0
    with_cfg = torch_pipe("a cat", guidance_scale=5.0, guidance_rescale=0.7, **run)
    assert with_cfg.metadata["guidance_rescale"] == 0.7
    assert not torch.equal(with_cfg.images, torch_pipe("a cat", guidance_scale=5.0, **run).images)


@pytest.mark.parametrize("argument, value", [("controlnet_conditioning_scale", 0.3), ("control_guidance_start", 0.5),
                                             ("control_guidance_end", [0.5]), ("guess_mode", True)])
def test_controlnet_arguments_without_a_control_image_are_refused_not_ignored(torch_cn_pipe, argument, value):
    """A ControlNet pipeline runs plain text-to-image without a control image, and read none of these: diffusers'
    ControlNet pipeline refuses the call, diffrt's rule refuses an argument it would not read (a review's)."""
    with pytest.raises(DiffrtError, match=rf"^{argument} needs control_image: without one the ControlNet is left out"):
        torch_cn_pipe("a cat", num_inference_steps=1, output_type="latent", **{argument: value})
    torch_cn_pipe("a cat", num_inference_steps=1, output_type="latent", control_guidance_start=0.0, guess_mode=False)  # defaults


def test_prompt_embeds_of_another_length_take_negative_prompts_of_that_length(t2i_folder, torch_pipe):
    """From a review: prompt_embeds shorter than 77 tokens under classifier-free guidance met negative prompts encoded
    to 77 and the concatenation raised torch's size error; diffusers encodes the negative prompts to the embeddings'
    length. Longer ones (compel's 154) cannot be matched by the text encoder: one line, not torch's error."""
    from diffusers import StableDiffusionPipeline

    ref = diffusers_pipe(StableDiffusionPipeline, t2i_folder)
    embeds = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    for negative in (None, "blurry, dark"):
        expected = run_diffusers(ref, prompt=None, prompt_embeds=embeds, negative_prompt=negative, seed=2, num_inference_steps=3)
        got = run(torch_pipe, prompt=None, prompt_embeds=embeds, negative_prompt=negative, seed=2, num_inference_steps=3).images
        assert max_abs(got, expected) <= DIFFUSERS_TOL
    long = torch.randn(1, 154, 32)
    with pytest.raises(DiffrtError, match=r"^prompt_embeds of 154 tokens with classifier-free guidance: .* pass negative_prompt_embeds"):
        torch_pipe(prompt_embeds=long, num_inference_steps=1, output_type="latent")
    torch_pipe(prompt_embeds=long, guidance_scale=1.0, num_inference_steps=1, output_type="latent")  # no CFG: compel's way


def test_models_loaded_from_several_threads_at_once_are_whole(t2i_folder, classchan_model_dir):
    """From a test audit: diffusers builds a model under accelerate's init_empty_weights, which patches nn.Module for the
    whole process, and loads in several threads at once made each other's modules on the meta device (a class
    embedding, a UNet). diffrt's loads take turns (models.LOADING); each comes out with every weight."""
    import threading

    from diffrt.models import load_pixel_model

    meta, errors, arrived = [], [], threading.Barrier(6)

    def load(i: int) -> None:
        try:
            arrived.wait()
            for _ in range(2):
                if i % 3 == 0:
                    modules = [load_pixel_model(classchan_model_dir).unet]
                elif i % 3 == 1:
                    model = load_text_to_image(t2i_folder)
                    modules = [model.unet, model.text_encoder, model.vae]
                else:  # an export's key: configs only, on the meta device of its own thread
                    load_text_to_image(t2i_folder, weights=False)
                    modules = []
                meta.extend(name for module in modules for name, p in module.named_parameters() if p.is_meta)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and meta == [], (errors[:2], meta[:5])
