"""Argument edge cases of the pipelines against diffusers: where diffusers samples, diffrt samples the same
images; where it refuses (or would fail deep inside torch, or silently drop an argument), diffrt refuses in
one line."""

from __future__ import annotations

import pytest
import torch

from conftest import diffusers_pipe, max_abs, one_line
from diffrt.errors import DiffrtError
from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

CPU = "cpu"
TOL = 1e-4


def g(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def torch_pipe(t2i_folder):
    return open_text_to_image_pipeline(t2i_folder, "torch", CPU)


@pytest.fixture(scope="module")
def sd_pipe(t2i_folder):
    from diffusers import StableDiffusionPipeline

    return diffusers_pipe(StableDiffusionPipeline, t2i_folder)


def test_negative_prompt_embeds_beside_text_prompts_equal_stable_diffusion_pipeline(sd_pipe, torch_pipe):
    """diffusers takes negative_prompt_embeds beside prompts given as text (it encodes the prompts and
    uses the negative embeddings as they are); diffrt refused them unless prompt_embeds came too."""
    with torch.no_grad():
        _, neg = sd_pipe.encode_prompt(["ugly", "blurry"], "cpu", 1, True, ["dark", "grey"])
    neg = neg * 0.9  # a weighting no text gives
    prompts = ["a red house", "a photo of the cat"]
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2, output_type="pt")
    expected = sd_pipe(prompts, negative_prompt_embeds=neg, generator=g(3), **kwargs).images
    result = torch_pipe(prompts, negative_prompt_embeds=neg, seed=3, **kwargs).images
    assert result.shape == expected.shape == (4, 3, 32, 32)
    assert max_abs(result, expected) <= TOL
    with pytest.raises(DiffrtError, match=r"negative_prompt_embeds has shape \(2, 77, 32\) but the 1 prompt\(s\) encode to"):
        torch_pipe("a cat", negative_prompt_embeds=neg, num_inference_steps=1)


def test_negative_prompt_beside_negative_prompt_embeds_is_refused_as_diffusers(sd_pipe, torch_pipe):
    """diffusers refuses both (check_inputs); diffrt ran with the embeddings and dropped the text silently."""
    with torch.no_grad():
        pos, neg = sd_pipe.encode_prompt(["a red house", "a cat"], "cpu", 1, True, ["ugly", "blurry"])
    with pytest.raises(ValueError, match="Cannot forward both `negative_prompt`"):
        sd_pipe(prompt_embeds=pos, negative_prompt=["a", "b"], negative_prompt_embeds=neg, num_inference_steps=1)
    with pytest.raises(DiffrtError, match="pass negative_prompt or negative_prompt_embeds, not both") as info:
        torch_pipe(prompt_embeds=pos, negative_prompt=["a", "b"], negative_prompt_embeds=neg, num_inference_steps=1)
    one_line(info)


def test_image_latents_as_img2img_image_equal_img2img_pipeline(t2i_folder, sd_pipe, torch_pipe):
    """StableDiffusionImg2ImgPipeline takes latents as `image` (a tensor with the VAE's 4 latent channels,
    e.g. an output_type="latent" result) and noises them as they are, unencoded; diffrt refused them."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = diffusers_pipe(StableDiffusionImg2ImgPipeline, t2i_folder)
    latents = torch_pipe("a cat", output_type="latent", seed=1, num_inference_steps=2).images
    wide = torch.randn(1, 4, 4, 6, generator=g(2))  # 32 x 48 pixels: the size comes from the latents
    for image, kwargs in ((latents, dict(num_images_per_prompt=2, eta=0.3)), (latents[0], {}), (wide, {})):
        kwargs = dict(kwargs, image=image, strength=0.75, num_inference_steps=4, output_type="pt")
        expected = ref("a photo of the cat", generator=g(3), **kwargs).images
        result = torch_pipe("a photo of the cat", seed=3, **kwargs).images
        assert result.shape == expected.shape
        assert max_abs(result, expected) <= TOL
    assert result.shape[-2:] == (32, 48)
    with pytest.raises(DiffrtError, match=r"image is latents of height 4 \(32 pixels\) but height is 64") as info:
        torch_pipe("a cat", image=latents, height=64, num_inference_steps=2)
    one_line(info)


def test_latents_without_height_and_width_sample_at_their_size_as_diffusers(sd_pipe, torch_pipe):
    """diffusers samples `latents=` at their own size; diffrt refused any size but its default one."""
    latents = torch.randn(2, 4, 8, 6, generator=g(5))
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    expected = sd_pipe(["a red house", "a cat"], latents=latents, generator=g(3), **kwargs).images
    result = torch_pipe(["a red house", "a cat"], latents=latents, seed=3, **kwargs).images
    assert result.shape == expected.shape == (2, 3, 64, 48)
    assert max_abs(result, expected) <= TOL
    with pytest.raises(DiffrtError, match=r"got \(2, 4, 8, 6\); leave out height and width") as info:
        torch_pipe(["a red house", "a cat"], latents=latents, height=32, num_inference_steps=1)
    one_line(info)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=None), r"prompt must be a string or a non-empty list of strings \(or pass prompt_embeds\), got None"),
    (dict(num_inference_steps=2.0), r"num_inference_steps must be an integer, got 2\.0"),
    (dict(num_images_per_prompt=2.0), r"num_images_per_prompt must be an integer, got 2\.0"),
    (dict(height=32.0, width=32), r"height must be an integer, got 32\.0"),
    (dict(width=0), r"width must be >= 1, got 0"),  # was the default size, as diffusers' `width or default`
    (dict(guidance_scale=None), r"guidance_scale must be a number"),
    (dict(image=torch.rand(2, 3, 32, 32), strength=0.5, num_images_per_prompt=3),
     r"got 2 images to start from for 3 images \(1 prompts x 3 per prompt\); pass 1 image, or one per prompt"),
    # From a second review: each was a TypeError, IndexError or AttributeError from inside torch or the sampler,
    # or (NaN) passed every comparison and turned classifier-free guidance off.
    (dict(guidance_scale=float("nan")), r"guidance_scale must be a number .*got nan"),
    (dict(eta=None), r"eta must be a number, got None"),
    (dict(guidance_rescale=None), r"guidance_rescale must be a number"),
    (dict(image=torch.rand(1, 3, 32, 32), strength="0.5"), r"strength must be a number, got '0\.5'"),
    (dict(strength=0.5), r"strength 0.5 sets how much of `image` is redrawn \(image-to-image\); pass image"),  # None: 0.8
    (dict(negative_prompt=5), r"negative_prompt must be a string or a list of strings \(one per prompt\), got 5"),
    (dict(image=torch.rand(32, 32).numpy()), r"image arrays must be \[H, W, C\] or \[B, H, W, C\]"),
    (dict(latents=torch.zeros(1, 4, 4, 4).numpy()), r"latents must be a torch tensor"),
    (dict(generator=42), r"generator must be a torch.Generator or a list of them \(one per image\), got int; for a seed, pass seed="),
    (dict(image=torch.rand(1, 3, 32, 32), latents=torch.zeros(1, 4, 4, 4)), r"pass image .* or latents .*, not both"),
    (dict(generator=[torch.Generator(), None], num_images_per_prompt=2), r"a list of them \(one per image\), got NoneType"),
], ids=["prompt-none", "steps-float", "per-prompt-float", "height-float", "width-zero", "guidance-none", "image-batch", "guidance-nan",
        "eta-none", "rescale-none", "strength-str", "strength-without-image", "negative-int", "image-2d-array", "latents-array",
        "generator-int", "image-and-latents", "generator-list-with-none"])
def test_bad_argument_types_are_one_line(torch_pipe, kwargs, message):
    """Each ended as a TypeError or IndexError from inside torch (or the sampler). image with latents: the
    image was silently dropped (pure noise denoised from the strength's first step); diffusers' img2img takes no
    latents."""
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(DiffrtError, match=message) as info:
        torch_pipe(kwargs.pop("prompt"), **kwargs)
    one_line(info)


@pytest.mark.parametrize("name, value, message", [
    ("ip_adapter_image", "photo.png", "IP-Adapter is not supported"),
    ("cross_attention_kwargs", {"scale": 0.5}, r"call pipe.set_lora_scale\(s\)"),
    ("callback_on_step_end", print, "pass progress=fn"),
    ("return_dict", False, "results are a GenerationResult"),
    ("sigmas", [14.6, 1.0], "pass timesteps="),
])
def test_diffusers_arguments_diffrt_does_not_take_say_what_to_do_instead(torch_pipe, uncond_model_dir, name, value, message):
    """Each was a TypeError naming the argument only; an unknown name still is one."""
    with pytest.raises(DiffrtError, match=message) as info:
        torch_pipe("a cat", num_inference_steps=1, **{name: value})
    one_line(info)
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance_scael'"):
        torch_pipe("a cat", num_inference_steps=1, guidance_scael=2.0)
    from diffrt.runtime.loading import open_pixel_pipeline

    with pytest.raises(DiffrtError, match="batch_size is DDIMPipeline's; pass num_images"):
        open_pixel_pipeline(uncond_model_dir, "torch", CPU)(batch_size=2, num_inference_steps=1)


def test_size_errors_name_a_fix_that_exists(torch_pipe, t2i_artifact, uncond_model_dir):
    """A size outside what eager PyTorch runs said "re-export with a wider --height range" (nothing was exported),
    and prompt_embeds longer than an artifact's 77 tokens named a --sequence flag that diffrt export has not."""
    from diffrt.errors import ShapeOutOfRangeError
    from diffrt.runtime.loading import open_pixel_pipeline

    with pytest.raises(ShapeOutOfRangeError, match=r"outside the range eager PyTorch runs this model at \[8, .*ask for a size inside it$"):
        open_pixel_pipeline(uncond_model_dir, "torch", CPU)(num_images=1, num_inference_steps=1, height=4, width=4)
    onnx = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    with pytest.raises(ShapeOutOfRangeError, match=r"78 tokens is outside the built range \[1, 77\]; ask for a size inside it$"):
        onnx(prompt_embeds=torch.randn(1, 78, 32), num_inference_steps=1)


def test_clip_skip_equals_stable_diffusion_pipeline_on_every_backend(sd_pipe, torch_pipe, t2i_artifact):
    """diffusers' clip_skip: the prompt encoded as the final layer norm of the hidden state that many layers before
    the last; the negative prompt as always (its last hidden state). The exported text encoder takes it per row, so
    one graph serves every value and both halves of a CFG batch in one call."""
    from types import SimpleNamespace

    encoder = sd_pipe.text_encoder
    if not hasattr(encoder, "text_model"):  # diffusers 0.42 reaches the norm through text_model, which transformers 5 removed
        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    onnx = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    images = []
    for skip in (None, 0, 1):
        expected = sd_pipe("a red house", negative_prompt="dark", clip_skip=skip, generator=g(3), **kwargs).images
        result = torch_pipe("a red house", negative_prompt="dark", clip_skip=skip, seed=3, **kwargs)
        assert max_abs(result.images, expected) <= TOL and result.metadata["clip_skip"] == (skip or 0)
        onnx_images = onnx("a red house", negative_prompt="dark", clip_skip=skip, seed=3, **kwargs).images
        assert max_abs(onnx_images, result.images) <= 1e-3
        images.append(result.images)
    assert max_abs(images[0], images[1]) == 0 and max_abs(images[1], images[2]) > 1e-3  # 1 changes the prompt's encoding
    with torch.no_grad():  # the negative prompt is encoded as without clip_skip (the review's finding: it was skipped too)
        prompt, negative = sd_pipe.encode_prompt("a red house", "cpu", 1, True, negative_prompt="dark", clip_skip=1)
        _, plain_negative = sd_pipe.encode_prompt("a red house", "cpu", 1, True, negative_prompt="dark")
    assert torch.equal(negative, plain_negative)
    mixed = torch_pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, seed=3, **kwargs).images
    assert max_abs(mixed, images[2]) <= TOL
    for bad, message in ((2, r"clip_skip must be below the text encoder's 2 layers, got 2"), (-1, "clip_skip must be >= 0"),
                         (1.0, "clip_skip must be an integer")):
        with pytest.raises(DiffrtError, match=message) as info:
            torch_pipe("a cat", clip_skip=bad, num_inference_steps=1)
        one_line(info)


def test_a_text_encoder_exported_before_clip_skip_runs_and_refuses_only_clip_skip(t2i_folder, t2i_artifact, tmp_path):
    """An artifact from an earlier diffrt has a text encoder graph taking input_ids alone: it runs as before, and a
    clip_skip it cannot take is refused by name instead of a missing-input error from ONNX Runtime."""
    import dataclasses

    from diffrt.export.onnx import export_onnx
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from diffrt.text_to_image_models import load_text_encoder

    class Before(torch.nn.Module):  # the text encoder component as diffrt exported it until clip_skip
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids):
            return self.encoder(input_ids, return_dict=False)[0]

    pipe = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", CPU)
    spec = dataclasses.replace(pipe.text_encoder.spec, inputs=pipe.text_encoder.spec.inputs[:1])
    path = export_onnx(Before(load_text_encoder(t2i_folder)), spec, tmp_path / "text_encoder")
    expected = pipe("a cat", num_inference_steps=2, seed=1, output_type="pt").images
    pipe.text_encoder = OnnxRuntimeBackend(path, spec, threads=1)
    assert max_abs(pipe("a cat", num_inference_steps=2, seed=1, output_type="pt").images, expected) <= 1e-5
    with pytest.raises(DiffrtError, match="exported before diffrt took clip_skip; re-export the artifact") as info:
        pipe("a cat", clip_skip=1, num_inference_steps=1)
    one_line(info)


def test_controlnet_conditioning_scale_that_is_not_a_number_is_one_line(t2i_folder):
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=t2i_folder / "controlnet")
    control = torch.rand(1, 3, 32, 32, generator=g(7))
    for scale in (torch.tensor(0.5), "0.5"):  # "iteration over a 0-d tensor"; float("0") then float(".")
        with pytest.raises(DiffrtError, match="controlnet_conditioning_scale must be a number, or a list") as info:
            pipe("a cat", control_image=control, controlnet_conditioning_scale=scale, num_inference_steps=1)
        one_line(info)


def test_non_finite_control_scales_and_latents_are_named_not_blamed_on_the_unet(t2i_folder, torch_pipe):
    """Each ran and failed as "unet_controlnet produced NaN values; try --precision fp32": the wrong cause."""
    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=t2i_folder / "controlnet")
    control = torch.rand(1, 3, 32, 32, generator=g(7))
    for scale in (float("nan"), [float("inf")]):
        with pytest.raises(DiffrtError, match="controlnet_conditioning_scale must be finite") as info:
            pipe("a cat", control_image=control, controlnet_conditioning_scale=scale, num_inference_steps=1)
        one_line(info)
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(DiffrtError, match="latents hold NaN or inf values"):
        torch_pipe("a cat", latents=latents, num_inference_steps=1)


def test_assigning_the_scheduler_samples_control_calls_with_it_too(t2i_folder):
    """The bug: `pipe.scheduler = DPMConfig...` (diffusers' habit) was ignored by any call with a control image,
    which kept sampling DDIM."""
    from diffrt.runtime.dpm import DPMConfig

    pipe = open_text_to_image_pipeline(t2i_folder, "torch", CPU, controlnet=t2i_folder / "controlnet")
    control = torch.rand(1, 3, 32, 32, generator=g(7))
    assert pipe("a cat", control_image=control, num_inference_steps=2, seed=0).metadata["scheduler"] == "ddim"
    dpm = DPMConfig.from_scheduler_config(pipe.scheduler.to_scheduler_config())
    pipe.scheduler = dpm
    assert pipe.scheduler is dpm and pipe.sampler_config(control=True) is dpm
    for kwargs in ({}, {"control_image": control}):
        assert pipe("a cat", num_inference_steps=2, seed=0, **kwargs).metadata["scheduler"] == "dpm"
    pipe.scheduler = "euler_a"  # a sampler's name, on the same schedule
    assert pipe("a cat", num_inference_steps=2, seed=0, control_image=control).metadata["scheduler"] == "euler_a"
    from diffusers import DDIMScheduler

    with pytest.raises(DiffrtError, match=r"got a DDIMScheduler; for a diffusers scheduler, pass DPMConfig.from_scheduler_config") as info:
        pipe.scheduler = DDIMScheduler()  # was stored, and failed deep in sampling
    one_line(info)


@pytest.mark.parametrize("seed, message", [(1.5, "seed must be an integer, got 1.5"), ("1", "seed must be an integer, got '1'"),
                                           (True, "seed must be an integer"), (2**70, r"seed must be in \[-2\^63, 2\^64\)")])
def test_a_seed_torch_cannot_take_is_one_line(uncond_model_dir, seed, message):
    """Each was a TypeError, ValueError or RuntimeError from torch's manual_seed."""
    from diffrt.runtime.loading import open_pixel_pipeline

    pipe = open_pixel_pipeline(uncond_model_dir, "torch", CPU)
    with pytest.raises(DiffrtError, match=message) as info:
        pipe(num_inference_steps=1, seed=seed)
    one_line(info)


def test_numpy_integers_are_seeds_and_numpy_floats_lora_scales(uncond_model_dir, t2i_folder, tmp_path):
    """np.int64(3) (a seed from numpy) was a TypeError; np.float32(0.5) was refused as a LoRA scale."""
    import numpy as np

    from diffrt.runtime.loading import open_pixel_pipeline
    from diffrt.tiny import tiny_lora_files

    pipe = open_pixel_pipeline(uncond_model_dir, "torch", CPU)
    assert torch.equal(pipe(num_inference_steps=1, seed=np.int64(3), output_type="pt").images,
                       pipe(num_inference_steps=1, seed=3, output_type="pt").images)
    for bad in ("0.5", None, True):  # on a pipeline without LoRA: "Unknown format code 'g'", a TypeError, or taken as 1.0
        with pytest.raises(DiffrtError, match="lora_scale must be a finite number, got"):
            pipe.set_lora_scale(bad)
    lora = tiny_lora_files(t2i_folder, tmp_path, seed=11)["peft"]
    with_lora = open_text_to_image_pipeline(t2i_folder, "torch", CPU, loras=[(lora, 1.0)])
    with_lora.set_lora_scale(np.float32(0.5))
    assert with_lora.lora_scale == 0.5


def test_loras_given_wrongly_or_at_a_non_finite_scale_are_refused_at_open(t2i_folder, tmp_path):
    """NaN opened fine and the first call blamed the text encoder; a plain file name or one bare pair were a
    ValueError and a TypeError."""
    import diffrt
    from diffrt.errors import LoraError
    from diffrt.tiny import tiny_lora_files

    lora = tiny_lora_files(t2i_folder, tmp_path, seed=11)["peft"]
    for loras, message in (([(lora, float("nan"))], "must be a finite number, got nan"), (str(lora), "takes a list of"),
                           ((lora, 1.0), "takes a list of"), ([lora], r"takes \(file, scale\) pairs")):
        with pytest.raises(LoraError, match=message) as info:
            diffrt.open_pipeline(t2i_folder, "torch", CPU, loras=loras)
        one_line(info)


# --- the pixel pipeline -------------------------------------------------------------------------------


def test_num_images_below_one_is_refused(uncond_model_dir, classemb_model_dir):
    """num_images=0 made one image on an unconditional model; a negative count was blamed on the engine's batch range."""
    from diffrt.runtime.loading import open_pixel_pipeline

    for folder, labels in ((uncond_model_dir, None), (classemb_model_dir, 1)):
        pipe = open_pixel_pipeline(folder, "torch", CPU)
        for n in (0, -2):
            with pytest.raises(DiffrtError, match=f"num_images must be >= 1, got {n}") as info:
                pipe(labels, num_images=n, num_inference_steps=2)
            one_line(info)


@pytest.mark.parametrize("labels, kwargs, message", [
    (1.5, {}, r"class label 1\.5 is not a whole number"),  # was label 1
    ([0, 2.5], {}, r"class label 2\.5 is not a whole number"),
    ("cat", {}, r"class labels must be integers in \[0, 3\]"),  # was "new(): invalid data type 'str'"
    ([1, 2], dict(num_images=3), r"got 2 class labels but num_images 3"),  # was 2 images
    ([], {}, r"class labels are empty"),
    ([[1, 2], [3, 0]], {}, r"class labels must be one label or a 1-D list of them, got shape \(2, 2\)"),  # was 4 images
], ids=["float", "float-in-list", "str", "count-mismatch", "empty", "2-d"])
def test_class_labels_that_would_run_wrongly_are_refused(classemb_model_dir, labels, kwargs, message):
    from diffrt.runtime.loading import open_pixel_pipeline

    pipe = open_pixel_pipeline(classemb_model_dir, "torch", CPU)
    with pytest.raises(DiffrtError, match=message) as info:
        pipe(labels, num_inference_steps=2, **kwargs)
    one_line(info)
    # Whole numbers of any type are labels; one label is repeated to num_images.
    images = pipe(torch.tensor([1.0, 3.0]), num_inference_steps=2, seed=4, output_type="pt").images
    assert torch.equal(images, pipe([1, 3], num_inference_steps=2, seed=4, output_type="pt").images)
    assert pipe(2, num_images=3, num_inference_steps=1).metadata["class_labels"] == [2, 2, 2]
    # The seed is in the metadata, a plain int (a numpy one would not go into JSON); None without one.
    import numpy as np

    assert pipe(2, num_inference_steps=1, seed=np.int64(5)).metadata["seed"] == 5
    assert pipe(2, num_inference_steps=1).metadata["seed"] is None
    # Integer latents are no noise: they ran, cast (an ORT review's); floating ones of any precision are taken.
    with pytest.raises(DiffrtError, match=r"latents must be floating point \(standard normal noise\), got torch.int64") as info:
        pipe(1, num_inference_steps=1, latents=torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    one_line(info)
    assert pipe(1, num_inference_steps=1, latents=torch.zeros(1, 3, 16, 16, dtype=torch.float16)).images


def test_generate_num_images_without_a_class_label_is_refused(classemb_model_dir):
    """`diffrt generate --num-images N` on a class-conditioned model without --class-label made one image
    per class and dropped N."""
    from diffrt.generate import GenerateRequest, generate

    with pytest.raises(DiffrtError, match="--num-images 2 on a class-conditioned model needs --class-label") as info:
        generate(GenerateRequest(model=str(classemb_model_dir), num_images=2, num_inference_steps=2, device=CPU))
    one_line(info)
