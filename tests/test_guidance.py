"""Gradient guidance against autograd computed independently, and its one-line errors for bad losses and targets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffrt.errors import DiffrtError, NonFiniteOutputError
from diffrt.models import load_pixel_model
from diffrt.runtime import ddim
from diffrt.runtime.guidance import Guidance, color_guidance, color_loss
from diffrt.runtime.loading import torch_pixel_pipeline

TARGET = torch.tensor([0.9, 0.1, 0.2])


@pytest.fixture(scope="module")
def model(uncond_model_dir):
    return load_pixel_model(uncond_model_dir)


def run(pipe, guidance, steps=2):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return pipe(num_images=2, latents=x, num_inference_steps=steps, guidance=guidance, output_type="pt").images, x


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_guided_step_is_x_minus_autograd_of_the_loss(model, mode):
    """One v-prediction step: x_t - scale * d loss(x0(x_t, eps)) / d x_t (eps held constant in mode x0), then DDIM."""
    pipe = torch_pixel_pipeline(model)
    pipe.scheduler = dataclasses.replace(pipe.scheduler, prediction_type="v_prediction")
    scale = 50.0
    got, x = run(pipe, [Guidance(lambda im: color_loss(im, TARGET), scale, mode=mode)], steps=1)

    schedule = ddim.make_schedule(pipe.scheduler, 1)
    ab, ab_prev, t = schedule.alpha_bar[0], schedule.alpha_bar_prev[0], schedule.timesteps[0]
    x_leaf = x.clone().requires_grad_(True)
    out = model.unet(x_leaf, torch.full((2,), float(t)))
    held = out.detach() if mode == "x0" else out
    x0, _ = ddim.predict_x0(x_leaf, held, ab, "v_prediction")
    (grad,) = torch.autograd.grad(scale * color_loss(x0 / 2 + 0.5, TARGET), x_leaf)
    want, _ = ddim.ddim_step(x - grad, out.detach(), ab, ab_prev, prediction_type="v_prediction", clip_sample_range=1.0)
    torch.testing.assert_close(got, (want / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_a_guided_cfg_step_takes_the_loss_on_the_combined_prediction(classemb_model_dir, mode):
    """Guidance beside classifier-free guidance: the loss is on x0 of eps(null) + s * (eps(c) - eps(null)) (held constant
    in mode x0, through both UNet calls in mode through_unet), and the DDIM step takes that combined eps, all computed
    by hand here. A review found every CFG-guided test checked a direction only: dropping the CFG scale on guided
    steps (either mode) passed them all."""
    model = load_pixel_model(classemb_model_dir)
    pipe = torch_pixel_pipeline(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    labels, cfg, scale = torch.tensor([1, 3]), 3.0, 50.0
    guidance = [Guidance(lambda im: color_loss(im, TARGET), scale, mode=mode)]
    got = pipe(labels, latents=x, num_inference_steps=1, guidance_scale=cfg, guidance=guidance, output_type="pt").images

    schedule = ddim.make_schedule(pipe.scheduler, 1)
    ab, ab_prev, t = schedule.alpha_bar[0], schedule.alpha_bar_prev[0], schedule.timesteps[0]
    ts, null = torch.full((2,), float(t)), torch.full((2,), pipe.info.null_class_label)

    def by_hand(cfg_scale: float) -> torch.Tensor:
        x_leaf = x.clone().requires_grad_(True)
        uncond, cond = model.unet(x_leaf, ts, null), model.unet(x_leaf, ts, labels)
        eps = uncond + cfg_scale * (cond - uncond)
        x0, _ = ddim.predict_x0(x_leaf, eps.detach() if mode == "x0" else eps, ab, schedule.prediction_type)
        (grad,) = torch.autograd.grad(scale * color_loss(x0 / 2 + 0.5, TARGET), x_leaf)
        want, _ = ddim.ddim_step(x - grad, eps.detach(), ab, ab_prev, prediction_type=schedule.prediction_type,
                                 clip_sample_range=schedule.clip_sample_range)
        return (want / 2 + 0.5).clamp(0, 1)

    torch.testing.assert_close(got, by_hand(cfg), rtol=0, atol=1e-5)
    assert (got - by_hand(1.0)).abs().max() > 1e-3  # the check tells a guided step with CFG from one without


def test_x0_guidance_keeps_eps_constant_on_a_step_with_a_through_unet_guidance(model):
    # Each guidance keeps its own mode: a negligible through_unet guidance beside an x0 one must not
    # turn the x0 one's gradient into a gradient through the UNet.
    pipe = torch_pixel_pipeline(model)
    color = color_guidance("#ff0000", 30.0, mode="x0")
    alone, _ = run(pipe, [color])
    negligible = Guidance(lambda im: im.mean(), 1e-12, mode="through_unet")
    mixed, _ = run(pipe, [color, negligible])
    through, _ = run(pipe, [color_guidance("#ff0000", 30.0, mode="through_unet")])
    assert (alone - through).abs().max() > 1e-2  # the two modes are told apart
    torch.testing.assert_close(mixed, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss, error, message", [
    (lambda im: (im - 0.5).abs().mean(dim=(1, 2, 3)), DiffrtError, r"^guidance 'custom': the loss returned a tensor of shape \(2,\); return one scalar"),
    (lambda im: im.detach().mean(), DiffrtError, r"^guidance 'custom': the loss does not depend on the images"),
    (lambda im: torch.tensor(1.0), DiffrtError, r"^guidance 'custom': the loss does not depend on the images"),
    (lambda im: 1.0, DiffrtError, r"^guidance 'custom': the loss returned float; return a float torch scalar"),
    (lambda im: (im > 0.5).sum(), DiffrtError, r"^guidance 'custom': the loss returned a torch.int64 tensor"),
    (lambda im: im.mean() * float("nan"), NonFiniteOutputError, r"^guidance 'custom': the loss is nan at step 0"),
    # A NaN/inf loss whose gradient is finite was applied silently (the images are not clamped: log goes NaN).
    (lambda im: im.mean() + float("inf"), NonFiniteOutputError, r"^guidance 'custom': the loss is inf at step 0"),
    (lambda im: -torch.log(im).mean(), NonFiniteOutputError, r"^guidance 'custom': the loss is nan at step 0; .*clamp them before a log"),
], ids=["non-scalar", "detached", "constant", "python-float", "integer", "nan", "inf-finite-gradient", "log-of-negative"])
@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_a_bad_user_loss_gets_one_clear_error(model, loss, error, message, mode):
    with pytest.raises(error, match=message):
        run(torch_pixel_pipeline(model), [Guidance(loss, 1.0, mode=mode)], steps=1)


def test_guidance_arguments_are_checked_where_they_are_given(model):
    """A NaN scale was blamed on the loss, a string one failed inside torch, every=1.5 guided every third step, and
    one Guidance instead of a list was a TypeError; the label 1e20 was reported as -9223372036854775808."""
    for kwargs, message in ((dict(scale=float("nan")), r"scale must be a finite number, got nan"),
                            (dict(scale="2"), r"scale must be a finite number, got '2'"),
                            (dict(scale=1.0, every=1.5), r"'every' must be a whole number of steps >= 1, got 1.5")):
        with pytest.raises(DiffrtError, match=message):
            Guidance(lambda im: im.mean(), **kwargs)
    # From the guidance review: a loss that is no callable failed at the first guided step, after the models loaded.
    with pytest.raises(DiffrtError, match=r"^guidance 'custom': loss must be a callable images -> scalar tensor, got NoneType$"):
        Guidance(None, 1.0)
    # NumPy scalars (a config's, a UI slider's) are numbers, as for the pipelines' own arguments (check_number).
    import numpy as np

    numpy_scalars = Guidance(lambda im: im.mean(), np.float32(2.0), every=np.int64(2))
    assert numpy_scalars.active(2) and not numpy_scalars.active(1)
    pipe = torch_pixel_pipeline(model)
    one = color_guidance("#ff0000", 30.0)
    torch.testing.assert_close(run(pipe, one)[0], run(pipe, [one])[0], rtol=0, atol=0)
    with pytest.raises(DiffrtError, match="guidance must be a Guidance or a list of them"):
        run(pipe, "#ff0000")


def test_x0_guidance_refuses_sample_prediction(model):
    # x0 is the model output there: held constant it has no gradient in x_t (autograd said only
    # "element 0 of tensors does not require grad").
    pipe = torch_pixel_pipeline(model)
    pipe.scheduler = dataclasses.replace(pipe.scheduler, prediction_type="sample")
    with pytest.raises(DiffrtError, match="prediction_type 'sample'.*use guidance mode 'through_unet'"):
        run(pipe, [color_guidance("#ff0000", 10.0)], steps=1)
    run(pipe, [color_guidance("#ff0000", 10.0, mode="through_unet")], steps=1)  # runs


@pytest.mark.parametrize("shape, target", [((1, 1, 4, 4), (3,)), ((3, 1, 4, 4), (3,)), ((2, 3, 4, 4), (4, 3)), ((4, 3, 4, 4), (2, 3))],
                         ids=["rgb-on-gray", "rgb-on-gray-batch-3", "more-targets", "fewer-targets"])
def test_color_loss_refuses_a_target_that_does_not_fit_the_images(shape, target):
    # Broadcasting summed three losses for an RGB target over 1-channel images, or paired colours with the wrong images.
    message = (r"^colour guidance needs RGB images; this model makes 1-channel ones" if shape[1] == 1 else
               r"^colour target has shape .* give \[\d\] \(one colour for all\)")
    with pytest.raises(DiffrtError, match=message):
        color_loss(torch.rand(shape), torch.rand(target))


def test_color_guidance_refuses_colours_outside_unit_range():
    with pytest.raises(DiffrtError, match=r"outside \[0, 1\]"):
        color_guidance((255, 0, 0), 1.0)
    color_guidance(torch.rand(2, 3), 1.0)  # per-image colours in [0, 1] pass


def test_per_image_colours_may_be_hex_strings_and_a_non_colour_is_refused_in_one_line():
    """From the guidance review: a list of RGB triples gave one colour per image, a list of hex strings (the natural
    way) a bare torch ValueError; None a TypeError."""
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    as_hex = color_guidance(["#ff0000", "#0000ff"], 1.0).loss(images)
    assert torch.equal(as_hex, color_guidance([(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)], 1.0).loss(images))
    assert torch.equal(as_hex, color_guidance(["#ff0000", (0.0, 0.0, 1.0)], 1.0).loss(images))
    assert not torch.equal(as_hex, color_guidance(["#0000ff", "#ff0000"], 1.0).loss(images))  # per image, in order
    for bad in (None, "red", ["#ff0000", "blue"], [(1.0, 0.0), (0.0, 0.0, 1.0)]):
        with pytest.raises(DiffrtError, match=r"^colour .* (is not a colour; give #RRGGBB|is not a hex colour; write it as #RRGGBB)"):
            color_guidance(bad, 1.0)


@pytest.mark.parametrize("size, crop, image_shape, center_crop", [
    (32, 32, (1, 3, 40, 72), True), (32, 32, (1, 3, 77, 50), True), (32, 32, (2, 3, 16, 16), True),
    (48, 48, (1, 3, 24, 40), True), ((32, 32), 32, (1, 3, 32, 64), True),
    # From a review: without a centre crop the processor keeps its resize size; ClipLoss resized to the crop size.
    ((32, 32), 24, (1, 3, 40, 72), False), (24, 16, (1, 3, 40, 72), False)], ids=str)
def test_clip_pixel_values_match_clip_image_processor(size, crop, image_shape, center_crop):
    """ClipLoss redoes the processor's resize, centre crop and normalisation in torch: the result is what
    CLIPImageProcessor feeds the model for the same image (up to its uint8 rounding), for non-square
    images (the long side truncated, not rounded) and small ones (upsampled with PIL's bicubic). A processor
    sized {height, width} stretches the image to it (ClipLoss cropped it as for a shortest edge)."""
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffrt.runtime.clip_guidance import ClipLoss
    from diffrt.tiny import BOS_TOKEN, EOS_TOKEN, tokenizer_vocab, tiny_tokenizer

    vocab = tokenizer_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[EOS_TOKEN])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=crop, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    sizes = {"height": size[0], "width": size[1]} if isinstance(size, tuple) else {"shortest_edge": size}
    processor = CLIPImageProcessor(size=sizes, crop_size={"height": crop, "width": crop}, do_center_crop=center_crop)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        loss = ClipLoss(clip, CLIPProcessor(image_processor=processor, tokenizer=tiny_tokenizer(folder)), "a red square")

    pixels = (torch.rand(image_shape, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8)
    want = processor([Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).numpy()], return_tensors="pt").pixel_values
    got = loss.pixel_values(pixels.float() / 255)
    assert got.shape == want.shape
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    assert ((got - want) * std).abs().mean() < 4e-3  # in [0, 1] units; a one-pixel shift of the crop gives ~0.1


def test_guidance_at_scale_zero_loads_nothing_and_changes_nothing(t2i_artifact, monkeypatch):
    """A guidance at scale 0 never acts; the pipeline must not load the PyTorch VAE or UNet for it
    (an artifact deployed without its source weights would refuse a request that does nothing)."""
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    pipe = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", "cpu")

    def no_torch(name, why):
        raise AssertionError(f"loaded the PyTorch {name} for {why}")

    monkeypatch.setattr(pipe, "torch_module", no_torch)
    kwargs = dict(num_inference_steps=2, seed=3, output_type="pt")
    plain = pipe("a cat", **kwargs).images
    for mode in ("x0", "through_unet"):
        guided = pipe("a cat", guidance=[color_guidance("#ff0000", 0.0, mode=mode)], **kwargs).images
        assert torch.equal(guided, plain)


@pytest.mark.parametrize("mode", ["x0", "through_unet"])
def test_guidance_errors_name_their_cause_not_the_loss(model, mode):
    """From a review, each blamed the loss (or named tensor shapes nobody gave): a call under torch.inference_mode(),
    which turns autograd off; a scale whose first update overflowed the latents, the next step's loss then NaN; colour
    guidance on a greyscale model."""
    pipe = torch_pixel_pipeline(model)
    with torch.inference_mode(), pytest.raises(DiffrtError, match=r"^guidance 'color' needs autograd, which "
                                                                  r"torch\.inference_mode\(\) turns off"):
        run(pipe, [color_guidance(TARGET, 30.0, mode=mode)], steps=1)
    with torch.no_grad():  # fine: the guided step turns gradients on itself
        run(pipe, [color_guidance(TARGET, 30.0, mode=mode)], steps=1)
    grey = torch.rand(2, 1, 8, 8, requires_grad=True)
    with pytest.raises(DiffrtError, match=r"^colour guidance needs RGB images; this model makes 1-channel ones"):
        color_guidance(TARGET, 1.0).loss(grey)


def test_a_guidance_fallback_that_cannot_load_names_the_guidance(t2i_artifact, tmp_path):
    """From a review: an artifact whose source folder is gone answered `--color` with "the artifact's source model ...
    is missing", nothing saying that colour guidance needed it (the same call without it runs)."""
    import json
    import shutil

    from diffrt.export.manifest import MANIFEST, write_manifest
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    artifact = shutil.copytree(t2i_artifact, tmp_path / "deployed")
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["source"]["path"] = str(tmp_path / "not-shipped")
    write_manifest(artifact, manifest)
    pipe = open_text_to_image_pipeline(artifact, "onnxruntime", "cpu")
    kwargs = dict(num_inference_steps=2, seed=3, output_type="pt")
    with pytest.raises(DiffrtError, match=r"guidance needs the PyTorch vae, which could not load: .*not-shipped"):
        pipe("a cat", guidance=[color_guidance("#ff0000", 1.0)], **kwargs)
    assert pipe("a cat", **kwargs).images.shape[0] == 1


def test_a_scale_that_overflows_is_named_not_the_loss(t2i_artifact):
    """From a review: at --color-scale 1e30 the first guided update pushed the latents past what the VAE decodes, and
    the next step said "the loss is nan ... clamp them before a log", blaming a built-in loss."""
    from diffrt.runtime.text_to_image_loading import open_text_to_image_pipeline

    pipe = open_text_to_image_pipeline(t2i_artifact, "onnxruntime", "cpu")
    with pytest.raises(NonFiniteOutputError, match=r"^guidance 'color' at scale 1e\+30: the (latents are no longer finite|"
                                                   r"images the loss is given are not finite) at step 1\b.*lower the scale"):
        pipe("a cat", guidance=[color_guidance("#ff0000", 1e30)], num_inference_steps=3, seed=3, output_type="pt")
