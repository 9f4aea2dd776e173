"""What a text-to-image call's arguments become before any model runs: prompt lists, prompt embeddings
checked, ControlNet scales, images and latents as float32 batches, img2img's strength and its VAE
posterior draw. Each follows the diffusers pipeline that takes the same argument
(StableDiffusionPipeline.check_inputs, VaeImageProcessor, StableDiffusionImg2ImgPipeline) and refuses
what diffusers refuses in one line (DiffrtError); text_to_image.py's pipeline calls them in its step 1.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import check_number, check_strength  # noqa: F401  (check_strength: imported from here too)
from diffrt.runtime.sampling import Generators, randn


def sample_posterior(moments: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw from the VAE's diagonal Gaussian posterior, given its parameters [B, 2C, h, w] (mean, then
    log-variance, as AutoencoderKL's DiagonalGaussianDistribution reads them: log-variance clamped to
    [-30, 20]): mean + std * noise, the noise from the call's generators, as diffusers' img2img draws it."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * randn(mean.shape, generator, mean.device, mean.dtype)


def prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        got = ("None" if prompt is None else f"an empty {type(prompt).__name__}" if prompts == []
               else type(prompt).__name__ if prompts is None else "a list with non-strings")
        raise DiffrtError(f"prompt must be a string or a non-empty list of strings (or pass prompt_embeds), got {got}")
    if negative_prompt is None:
        return prompts, [""] * len(prompts)
    if not (isinstance(negative_prompt, str) or isinstance(negative_prompt, (list, tuple))
            and all(isinstance(p, str) for p in negative_prompt)):
        raise DiffrtError(f"negative_prompt must be a string or a list of strings (one per prompt), got {negative_prompt!r}")
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if isinstance(negative_prompt, str) and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise DiffrtError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; give one per prompt")
    return prompts, negatives


def check_embeds(prompt_embeds, negative_prompt_embeds, prompt, negative_prompt) -> None:
    """prompt_embeds [B, tokens, hidden] (what the text encoder returns), and negative_prompt_embeds of
    the same shape when both are given; each replaces its text, which is then left out, as diffusers asks
    (its check_inputs refuses a prompt beside prompt_embeds, a negative_prompt beside negative_prompt_embeds)."""
    if prompt_embeds is not None and prompt not in ("", None, []):
        raise DiffrtError("pass prompt or prompt_embeds, not both")
    if negative_prompt_embeds is not None and negative_prompt is not None:
        raise DiffrtError("pass negative_prompt or negative_prompt_embeds, not both")
    for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 3 or not value.is_floating_point()):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise DiffrtError(f"{name} must be a float tensor [batch, tokens, hidden] as the text encoder returns; got {got}")
    if prompt_embeds is not None and negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
        raise DiffrtError(f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds "
                          f"{tuple(prompt_embeds.shape)}; give them one shape")


def control_scales(scale, k: int) -> list[float]:
    """controlnet_conditioning_scale as diffusers takes it: one number for every ControlNet, or one per ControlNet."""
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = [scale] * k
    if not isinstance(scale, (list, tuple)) or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in scale):
        got = f"a {type(scale).__name__}" if not isinstance(scale, (list, tuple)) else "a list with non-numbers"
        raise DiffrtError(f"controlnet_conditioning_scale must be a number, or a list with one number per ControlNet, got {got}")
    scales = [float(s) for s in scale]
    if not all(math.isfinite(s) for s in scales):
        raise DiffrtError(f"controlnet_conditioning_scale must be finite, got {scale!r}")
    if len(scales) != k:
        raise DiffrtError(f"controlnet_conditioning_scale has {len(scales)} values for {k} ControlNet{'s' if k != 1 else ''}; "
                          "give one number, or one per ControlNet")
    return scales


def control_windows(start, end, k: int) -> list[tuple[float, float]]:
    """control_guidance_start / control_guidance_end as diffusers' ControlNet pipelines take them: each a
    fraction of the steps, one number for every ControlNet or one per ControlNet -> (start, end) per ControlNet,
    each with 0 <= start < end <= 1."""
    def listed(value, name: str) -> list[float] | None:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return None
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        raise DiffrtError(f"{name} must be a number (a fraction of the steps), or a list with one per ControlNet, got {value!r}")

    starts, ends = listed(start, "control_guidance_start"), listed(end, "control_guidance_end")
    # One number beside a list is repeated to its length; two numbers to every ControlNet (diffusers' rule).
    n = len(starts) if starts is not None else len(ends) if ends is not None else k
    starts, ends = starts or [float(start)] * n, ends or [float(end)] * n
    if len(starts) != len(ends):
        raise DiffrtError(f"control_guidance_start has {len(starts)} values but control_guidance_end {len(ends)}; give as many of each")
    if len(starts) != k:
        raise DiffrtError(f"control_guidance_start/end have {len(starts)} values for {k} ControlNet{'s' if k != 1 else ''}; "
                          "give one number, or one per ControlNet")
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise DiffrtError(f"control guidance must start before it ends, within [0, 1] (fractions of the steps); "
                              f"got start {s}, end {e}")
    return list(zip(starts, ends))


def control_keep(windows: list[tuple[float, float]], num_steps: int) -> list[list[float]] | None:
    """Per step, per ControlNet, 1.0 where its window holds the step, else 0.0, as diffusers' `controlnet_keep`
    (step i of N is held when i/N >= start and (i+1)/N <= end); None when every ControlNet runs every step."""
    keep = [[1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in windows] for i in range(num_steps)]
    return None if all(all(row) for row in keep) else keep


def image_side(given: int | None, size: int, multiple: int) -> int:
    """A side of the images a request makes: the one given, else the image's own rounded down to a
    multiple of the VAE's factor, as diffusers' VaeImageProcessor.get_default_height_width (an image
    smaller than `multiple` keeps its size, which check_size then names)."""
    return given or size - size % multiple or size


def image_batch(image, height: int | None, width: int | None, multiple: int = 1) -> torch.Tensor:
    """A PIL image (or list), or an array/tensor [C, H, W] / [B, C, H, W] (NumPy: [.., H, W, C]) in [0, 1]
    (or a list of them: one batch, as diffusers stacks them) -> float32 [B, 3, H, W] in [0, 1], resized
    as diffusers' VaeImageProcessor resizes: to (height, width) when given, else to the image's size
    rounded down to a multiple of `multiple` (the VAE's factor; get_default_height_width), PIL images
    with Lanczos and tensors with F.interpolate's default (nearest), so the images stay diffusers'."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image:
        kinds = dict.fromkeys("PIL images" if isinstance(im, Image.Image) else "arrays/tensors"
                              if isinstance(im, (np.ndarray, torch.Tensor)) else type(im).__name__ for im in image)
        if len(kinds) > 1:  # a PIL-led list called .convert on a tensor; a tensor-led one was "got list"
            raise DiffrtError(f"the images in the list mix {' and '.join(kinds)}; give one kind: PIL images, or NumPy "
                              "arrays / torch tensors in [0, 1]")
    if isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image):
        size = (image_side(width, image[0].width, multiple), image_side(height, image[0].height, multiple))
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.LANCZOS) if im.size != size else im.convert("RGB"),
                             dtype=np.float32) / 255.0 for im in image]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if isinstance(image, (list, tuple)) and image and all(isinstance(im, (np.ndarray, torch.Tensor)) for im in image):
        image = [torch.from_numpy(im).movedim(-1, -3) if isinstance(im, np.ndarray) else im for im in image]
        shapes = [tuple(im.shape[-3:]) for im in image]
        if len(set(shapes)) > 1:
            shown = ", ".join(dict.fromkeys("x".join(map(str, s)) for s in shapes))
            raise DiffrtError(f"the images in the list differ in size ({shown}, channels x height x width); give images of one size")
        image = torch.cat([im.unsqueeze(0) if im.dim() == 3 else im for im in image])
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4):
            raise DiffrtError(f"image arrays must be [H, W, C] or [B, H, W, C] with 1 or 3 channels, got shape {image.shape}")
        image = torch.from_numpy(image).movedim(-1, -3)
    if not isinstance(image, torch.Tensor):
        raise DiffrtError(f"images must be PIL images, NumPy arrays or torch tensors in [0, 1], got {type(image).__name__}")
    image = image.float()
    image = image.unsqueeze(0) if image.dim() == 3 else image
    if image.dim() != 4 or image.shape[1] not in (1, 3):
        raise DiffrtError(f"image tensor must be [C, H, W] or [B, C, H, W] with 1 or 3 channels, got {tuple(image.shape)}")
    if not torch.isfinite(image).all():  # NaN passes every comparison below, and the VAE encoder was blamed for it
        raise DiffrtError(f"image has {int((~torch.isfinite(image)).sum())} NaN or infinite values; pass values in [0, 1]")
    if image.min() < 0 or image.max() > 1:
        raise DiffrtError(f"image values must be in [0, 1], got [{image.min():.3g}, {image.max():.3g}]")
    image = image.expand(-1, 3, -1, -1)
    size = (image_side(height, image.shape[-2], multiple), image_side(width, image.shape[-1], multiple))
    if tuple(image.shape[-2:]) != size:
        image = torch.nn.functional.interpolate(image, size=size)
    return image


def control_batches(control_image, k: int, height: int | None, width: int | None, multiple: int) -> list[torch.Tensor]:
    """One [B, 3, H, W] batch per ControlNet, in their order. With several, `control_image` is what
    diffusers' ControlNet pipeline takes for a MultiControlNetModel: a list with one entry per ControlNet
    (each anything image_batch takes: an image, a batch tensor), or a list of lists, one inner list per
    prompt with one image per ControlNet ([[canny_1, pose_1], [canny_2, pose_2]]), which is turned around."""
    if k == 1:
        if isinstance(control_image, (list, tuple)) and len(control_image) == 1:
            control_image = control_image[0]  # the one-entry-per-ControlNet form (for PIL, also a batch of one)
        return [image_batch(control_image, height, width, multiple)]
    if isinstance(control_image, (list, tuple)) and any(isinstance(entry, (list, tuple)) for entry in control_image):
        lengths = sorted({len(entry) if isinstance(entry, (list, tuple)) else 1 for entry in control_image})
        if lengths != [k]:
            raise DiffrtError(f"control_image: as a list of lists, each inner list holds one prompt's images, one per "
                              f"ControlNet ({k}); got inner lists of {' and '.join(map(str, lengths))}")
        control_image = [list(images) for images in zip(*control_image)]  # per prompt -> per ControlNet
    if not isinstance(control_image, (list, tuple)) or len(control_image) != k:
        got = f"a list of {len(control_image)}" if isinstance(control_image, (list, tuple)) else f"one {type(control_image).__name__}"
        raise DiffrtError(f"control_image: the pipeline has {k} ControlNets, so pass a list of {k} images (one per ControlNet, "
                          f"in their order); got {got}")
    images = [image_batch(im, height, width, multiple) for im in control_image]
    sizes = [tuple(im.shape[-2:]) for im in images]
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise DiffrtError(f"control images differ in size ({shown} pixels, one per ControlNet); give images of one size "
                          "or pass height and width to resize them all")
    return images


def latent_batch(image, height: int | None, width: int | None, factor: int) -> torch.Tensor:
    """img2img latents given as `image` ([C, H, W], [B, C, H, W] or a list of them; diffusers stacks a list as
    it stacks images) -> float32 [B, C, H, W], as they are: latents are not resized, so a height or width
    given must be theirs times the VAE's factor."""
    if isinstance(image, (list, tuple)):
        if not all(isinstance(im, torch.Tensor) and im.shape[-3:] == image[0].shape[-3:] for im in image):
            raise DiffrtError("the latents in the image list differ in shape or type; give tensors of one shape")
        image = torch.cat([im if im.dim() == 4 else im.unsqueeze(0) for im in image])
    latents = (image.unsqueeze(0) if image.dim() == 3 else image).float()
    for name, given, size in (("height", height, latents.shape[-2]), ("width", width, latents.shape[-1])):
        if given is not None and given != size * factor:
            raise DiffrtError(f"image is latents of {name} {size} ({size * factor} pixels) but {name} is {given}; latents are "
                              f"not resized: leave out {name}, or pass an image in [0, 1] to resize")
    return latents


DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
