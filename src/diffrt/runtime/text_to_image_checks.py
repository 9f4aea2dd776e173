"""What a text-to-image call checks before any model runs, and what it resolves its arguments into: step 1 of
TextToImagePipeline.__call__ (`_check_call` -> `Call`), with the size, batch, embedding and clip_skip checks that
`diffrt serve` also runs before a request queues. A mixin over the pipeline's attributes (its backends' specs, the
VAE's factor, the ControlNets' pooling), kept apart so the pipeline's file reads as its steps.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from diffrt.components import scaled_residuals
from diffrt.errors import DiffrtError, ShapeOutOfRangeError
from diffrt.models import check_one_value_groups
from diffrt.runtime.pipeline import check_count, check_latent_values, check_number, check_output_type, make_generator
from diffrt.runtime.sampling import Generators, check_generators
from diffrt.runtime.text_to_image_inputs import (DEFAULT_STRENGTH, check_embeds, control_batches, control_scales,
                                                 control_windows, image_batch, latent_batch, prompt_lists)

log = logging.getLogger("diffrt.runtime.text_to_image")  # the pipeline's logger: its warnings read as the pipeline's


@dataclasses.dataclass(frozen=True)
class Call:
    """One call's arguments once checked and resolved (the pipeline's step 1): what its later steps read."""

    prompts: list[str]
    negatives: list[str]  # "" for each prompt without one
    per_prompt: int  # num_images_per_prompt
    batch: int  # images: prompts x per_prompt
    do_cfg: bool  # both branches, 2B rows
    height: int
    width: int
    init: torch.Tensor | None  # img2img's images [B, 3, H, W] in [0, 1], or latents [B, C, h, w] (init_is_latents)
    init_is_latents: bool
    control: list[torch.Tensor] | None  # one image batch per ControlNet
    scales: list[float]  # one conditioning scale per ControlNet ([] without)
    control_windows: list[tuple[float, float]]  # (start, end) fraction of the steps, per ControlNet
    guess: bool  # diffusers' guess mode: residuals weighted by depth, and under CFG the ControlNets see the conditional half only
    generator: Generators
    schedule: Any  # the sampler's schedule (sampling.Schedule), img2img's tail of it
    clip_skip: int  # text encoder layers skipped before the final layer norm (0: its last hidden state)
    encodes_image: bool  # the VAE encoder runs (img2img from pixels, no latents given)
    strength: float | None = None  # img2img's, the default resolved (DEFAULT_STRENGTH); None without an image


class TextToImageChecks:
    """TextToImagePipeline's checks (see the module docstring)."""

    def _check_call(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps,
                    guidance_scale, num_images_per_prompt, eta, guidance_rescale, generator, seed, image, strength,
                    control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, guess_mode,
                    output_type, latents, scheduler, timesteps, clip_skip) -> "Call":
        """Step 1: every argument checked (one DiffrtError line for the first bad one, before any model runs) and
        resolved: the prompts, the size, the images as batches, the generators and the schedule."""
        check_output_type(output_type, ("pil", "np", "pt", "latent"))
        # prompt_embeds and negative_prompt_embeds: diffusers' way in for weighted prompts (compel) and cached
        # encodings; negative_prompt_embeds also beside prompts given as text, as diffusers takes them.
        check_embeds(prompt_embeds, negative_prompt_embeds, prompt, negative_prompt)
        if prompt_embeds is not None:
            self._check_embeds_fit(prompt_embeds)
            prompt = [""] * prompt_embeds.shape[0]  # one per row: the count, and the metadata's prompts
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        if negative_prompt_embeds is not None and prompt_embeds is None:
            self._check_embeds_fit(negative_prompt_embeds, "negative_prompt_embeds")
            want = (len(prompts), self.max_length)
            if tuple(negative_prompt_embeds.shape[:2]) != want:
                raise DiffrtError(f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but the {len(prompts)} "
                                  f"prompt(s) encode to {(*want, negative_prompt_embeds.shape[-1])}; give one row of "
                                  f"{self.max_length} tokens per prompt, or pass prompt_embeds of the same shape")
        check_count("num_images_per_prompt", num_images_per_prompt)
        clip_skip = self.check_clip_skip(clip_skip)
        if clip_skip and prompt_embeds is not None:  # only the prompts are encoded at clip_skip, and these come encoded
            raise DiffrtError(f"clip_skip {clip_skip} sets the text-encoder layer that encodes the prompts, and prompt_embeds "
                              "come encoded; encode them at that layer, or leave clip_skip out")
        check_number("guidance_scale", guidance_scale, hint=" (diffusers' default 7.5; <= 1 turns classifier-free guidance off)")
        for name, side in (("height", height), ("width", width)):
            if side is not None:  # 0 is refused, not read as the default (diffusers' `height or default`)
                check_count(name, side)
        check_number("eta", eta, 0.0, 1.0)
        check_number("guidance_rescale", guidance_rescale, 0.0, 1.0, " (diffusers' default 0.0; 0.7 is the paper's)")
        if strength is not None and image is None:  # text-to-image would run, the value unread
            raise DiffrtError(f"strength {strength} sets how much of `image` is redrawn (image-to-image); pass image, or "
                              "leave strength out")
        if image is not None and latents is not None:  # diffusers' img2img takes no latents: one would be ignored
            raise DiffrtError("pass image (image-to-image: its latents are noised to the first step) or latents (the noise to "
                              "start from), not both")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise DiffrtError(f"latents must be a torch tensor [batch, channels, height/8, width/8], got {type(latents).__name__}")
        check_latent_values(latents)
        if control_image is not None and not self.has_controlnet:
            raise DiffrtError("control_image needs a ControlNet; open the pipeline with controlnet=DIR (--controlnet)")
        if controlnet_conditioning_scale is not None and not self.has_controlnet:  # unread, as control_guidance_* would be
            raise DiffrtError("controlnet_conditioning_scale needs a ControlNet; open the pipeline with controlnet=DIR "
                              "(--controlnet)")
        if self.has_controlnet and control_image is None:  # the ControlNet is left out: plain text-to-image runs
            given = [name for name, unset in (("controlnet_conditioning_scale", controlnet_conditioning_scale is None),
                                              ("control_guidance_start", control_guidance_start in (0.0, [])),
                                              ("control_guidance_end", control_guidance_end in (1.0, [])),
                                              ("guess_mode", guess_mode is False)) if not unset]
            if given:  # diffusers' ControlNet pipelines refuse the call; diffrt runs it, but reads none of these
                raise DiffrtError(f"{given[0]} needs control_image: without one the ControlNet is left out and the call runs "
                                  f"as plain text-to-image; pass control_image (--control-image), or leave {given[0]} out")
        if controlnet_conditioning_scale is None:  # diffusers' default: 0.8 in its ControlNet img2img pipeline, else 1.0
            controlnet_conditioning_scale = 0.8 if image is not None else 1.0
        scales = control_scales(controlnet_conditioning_scale, self.num_controlnets) if self.has_controlnet else []
        if self.has_controlnet:  # the fraction of the steps each ControlNet runs, as diffusers' ControlNet pipelines
            windows = control_windows(control_guidance_start, control_guidance_end, self.num_controlnets)
        elif (control_guidance_start, control_guidance_end) != (0.0, 1.0):
            raise DiffrtError("control_guidance_start/end need a ControlNet; open the pipeline with controlnet=DIR (--controlnet)")
        else:
            windows = []
        control = (control_batches(control_image, self.num_controlnets, height, width, self.vae_factor)
                   if control_image is not None else None)
        # img2img's `image`: pixels, or latents as diffusers' img2img takes them (a tensor with the VAE's latent
        # channels, e.g. an output_type="latent" result: used as they are, not encoded).
        init_is_latents = image is not None and self._is_latent_image(image)
        if init_is_latents:
            init = latent_batch(image, height, width, self.vae_factor)
        else:
            init = image_batch(image, height, width, self.vae_factor) if image is not None else None
        init_size = tuple(self.vae_factor * d for d in init.shape[-2:]) if init_is_latents else init.shape[-2:] if init is not None else None
        if control is not None and init is not None and init_size != control[0].shape[-2:]:
            (ih, iw), (ch, cw) = init_size, control[0].shape[-2:]
            raise DiffrtError(f"image is {ih}x{iw} pixels but control_image {ch}x{cw}; give images of one size "
                              "or pass height and width to resize both")
        sized = control[0].shape[-2:] if control is not None else init_size
        if sized is None and isinstance(latents, torch.Tensor) and latents.dim() == 4:  # diffusers samples latents at their size
            sized = (latents.shape[-2] * self.vae_factor, latents.shape[-1] * self.vae_factor)
        taken = {"height": height is None and sized is not None, "width": width is None and sized is not None}
        if height is None:
            height = sized[-2] if sized is not None else self.default_size
        if width is None:
            width = sized[-1] if sized is not None else self.default_size
        for name, size in (("height", height), ("width", width)):
            try:
                self.check_side(name, size)
            except ShapeOutOfRangeError as exc:
                if not taken[name]:  # the caller's own size (or the default): the message says all
                    raise
                # The side is an image's own: name it, and the way out (pixels resize; latents do not).
                if control is not None or (init is not None and not init_is_latents):
                    source = "control_image" if control is not None else "image"
                    why = f"the {name} of {source}, as {name} was not given: pass {name} to resize it"
                else:
                    source = "image (latents)" if init_is_latents else "latents"
                    why = f"the {name} of {source} x {self.vae_factor}, as {name} was not given: give {source} of a size the UNet runs"
                raise ShapeOutOfRangeError(f"{exc} ({why})") from None
        batch, do_cfg = len(prompts) * num_images_per_prompt, self.uses_cfg(guidance_scale)
        if do_cfg and prompt_embeds is not None and negative_prompt_embeds is None and prompt_embeds.shape[1] > self.max_length:
            raise DiffrtError(f"prompt_embeds of {prompt_embeds.shape[1]} tokens with classifier-free guidance: the negative "
                              f"prompt is encoded to their length, past the text encoder's {self.max_length}; pass "
                              "negative_prompt_embeds of the same shape (compel makes both)")
        if init is not None and batch % init.shape[0]:
            raise DiffrtError(f"got {init.shape[0]} images to start from for {batch} images ({len(prompts)} prompts x "
                              f"{num_images_per_prompt} per prompt); pass 1 image, or one per prompt")
        self.check_batch(len(prompts), batch, do_cfg)
        guess = self.guess_mode_for(guess_mode, control is not None)
        if guess and do_cfg:  # the UNet runs each CFG half on its own
            self.unet.spec.check_size("batch", batch, what=f"batch {batch} ({batch} images, each CFG half apart in guess mode)")
        self.check_deepest(height, width, batch if guess or not do_cfg else 2 * batch)
        if self.guidance_embed_dim is not None and (negative_prompt is not None or negative_prompt_embeds is not None):
            log.warning("the UNet is guidance-distilled (time_cond_proj_dim): it takes the guidance scale as timestep_cond "
                        "and runs no classifier-free guidance, so the negative prompt is unused, as in diffusers")
        generator = make_generator(generator, seed)
        check_generators(generator, batch)
        if init is not None:  # the last int(N * strength) steps run, as diffusers' img2img `get_timesteps` keeps them
            strength = DEFAULT_STRENGTH if strength is None else strength
        schedule = self.sampling_schedule(num_inference_steps, scheduler=scheduler, eta=eta, timesteps=timesteps,
                                          strength=strength if init is not None else None, control=control is not None)
        return Call(prompts, negatives, num_images_per_prompt, batch, do_cfg, height, width, init, init_is_latents,
                     control, scales, windows, guess, generator, schedule, clip_skip,
                     encodes_image=init is not None and not init_is_latents and latents is None,
                     strength=strength if init is not None else None)

    def guess_mode_for(self, asked, control: bool) -> bool:
        """Whether a call runs diffusers' guess mode: asked for, or set by the first ControlNet's global_pool_conditions
        (a shuffle ControlNet), as StableDiffusionControlNetPipeline sets it. A graph exported before diffrt took
        guess mode's depth weights (one scale per ControlNet) runs it for ControlNets that pool their conditions only."""
        if not isinstance(asked, bool):
            raise DiffrtError(f"guess_mode must be True or False, got {asked!r}")
        if asked and not self.has_controlnet:
            raise DiffrtError("guess_mode needs a ControlNet; open the pipeline with controlnet=DIR (--controlnet)")
        pooled = self.controlnet_global_pool
        guess = control and (asked or pooled[:1] == [True])
        if guess and not all(pooled) and not scaled_residuals(self.unet.spec):
            which = ", ".join(str(i) for i, p in enumerate(pooled) if not p)
            way_out = "leave guess_mode off" if asked else "put the pooling ControlNet(s) after the others"
            raise DiffrtError(f"guess mode scales the residuals of ControlNet {which} by depth, and this artifact's fused "
                              "UNet+ControlNet graph, exported by an earlier diffrt, takes one scale per ControlNet; "
                              f"export it again, or {way_out}")
        return guess

    def _check_embeds_fit(self, embeds: torch.Tensor, name: str = "prompt_embeds") -> None:
        """prompt_embeds' hidden size must be the UNet's cross-attention width, and their length within
        the UNet's sequence range (an exported graph's; eager PyTorch takes a compel-style longer one)."""
        spec = self.unet.spec
        (dims,) = [t.dims for t in spec.inputs if t.name == "encoder_hidden_states"]
        if isinstance(dims[-1], int) and embeds.shape[-1] != dims[-1]:
            raise DiffrtError(f"{name} have hidden size {embeds.shape[-1]} but the UNet attends to {dims[-1]}; "
                              "encode the prompts with this model's text encoder")
        if not spec.eager and "sequence" in spec.ranges:
            spec.check_size("sequence", embeds.shape[1], what=f"{name} of {embeds.shape[1]} tokens")

    def check_clip_skip(self, clip_skip) -> int:
        """clip_skip as diffusers takes it (None: 0, the last hidden state), within the text encoder's layers."""
        if clip_skip is None:
            return 0
        check_count("clip_skip", clip_skip, 0)
        skip = next((t for t in self.text_encoder.spec.inputs if t.name == "clip_skip"), None)
        if skip is None and clip_skip:
            raise DiffrtError(f"clip_skip {clip_skip}: this {self.text_encoder.name} text encoder was exported before diffrt took "
                              "clip_skip; re-export the artifact (its text encoder alone is rebuilt)")
        if skip is not None and clip_skip >= skip.high:
            raise DiffrtError(f"clip_skip must be below the text encoder's {skip.high} layers, got {clip_skip}")
        return clip_skip

    def check_size(self, height: int, width: int) -> None:
        """ShapeOutOfRangeError unless the UNet runs this image size (a multiple, inside its range); public
        with check_batch for callers that refuse a request before queueing it (`diffrt serve`)."""
        for name, size in (("height", height), ("width", width)):
            self.check_side(name, size)

    def check_side(self, name: str, size: int) -> None:
        """check_size for one side ("height" or "width")."""
        spec, f = self.unet.spec, self.vae_factor
        step = f * spec.multiple_of.get("height", 1)
        lo, _, hi = spec.ranges[name]
        if not lo * f <= size <= hi * f:  # first: a multiple suggested for a size outside the range may be outside too
            if spec.eager:
                raise ShapeOutOfRangeError(f"{name} {size} is outside the range eager PyTorch runs the {spec.name} at "
                                           f"[{lo * f}, {hi * f}] pixels; ask for a size inside it")
            raise ShapeOutOfRangeError(f"{name} {size} is outside the {spec.name}'s built range [{lo * f}, {hi * f}] "
                                       f"pixels; re-export with a wider --{name} range or ask for a size inside it")
        if size % step:
            why = f"the VAE's {f} x the {spec.name} graph's {step // f}" if step > f else "the VAE's downsampling factor"
            down = size // step * step
            near = down if down >= max(step, lo * f) else down + step  # the nearest multiple inside the range
            raise ShapeOutOfRangeError(f"{name} {size} must be a multiple of {step} ({why}); try {near}")

    def check_deepest(self, height: int, width: int, unet_batch: int) -> None:
        """ShapeOutOfRangeError if a UNet call of `unet_batch` images would normalise single values (a tiny test model:
        models.check_one_value_groups); public for `diffrt serve`, as check_size."""
        check_one_value_groups(self.one_value_side, height, width, unet_batch)

    def check_batch(self, num_prompts: int, batch: int, do_cfg: bool) -> None:
        k = 2 if do_cfg else 1
        why = " x 2 for classifier-free guidance" if do_cfg else ""
        self.text_encoder.spec.check_size("batch", num_prompts * k, what=f"batch {num_prompts * k} ({num_prompts} prompts{why})")
        images = f"{batch} image{'s' if batch != 1 else ''}"
        self.unet.spec.check_size("batch", batch * k, what=f"batch {batch * k} ({images}{why})")
        self.vae_decoder.spec.check_size("batch", batch, what=f"batch {batch} ({images})")

    def _is_latent_image(self, image) -> bool:
        """Whether img2img's `image` is latents, as diffusers' VaeImageProcessor.preprocess tells them: a tensor
        (or list of tensors) whose channels are the VAE's latent channels (4; never 1 or 3, an image's)."""
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        return (isinstance(first, torch.Tensor) and first.dim() in (3, 4) and self.latent_channels not in (1, 3)
                and first.shape[-3] == self.latent_channels)
