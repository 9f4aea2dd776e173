"""The latent text-to-image pipeline: CLIP text encoder + UNet [+ ControlNets] + VAE decoder on any backend.

Arguments and results follow diffusers' StableDiffusionPipeline, StableDiffusionControlNetPipeline
and StableDiffusionImg2ImgPipeline, and so do the random draws: a seed is
`torch.Generator("cpu").manual_seed(seed)`, which draws, in diffusers' order, the VAE encoder's
sample (img2img), then the initial noise, then the eta noise of each step. A list with one
generator per image draws each image's rows from its own generator, as diffusers' `randn_tensor`
does (img2img then samples one VAE posterior row per image, as diffusers' img2img). With the torch
backend the images equal diffusers' to float tolerance (tests/test_text_to_image.py). Several
ControlNets follow StableDiffusionControlNetPipeline with a MultiControlNetModel: `control_image` is
a list with one entry per ControlNet (an image or a batch), or a list of lists, one inner list per prompt
with an image per ControlNet (turned around, as diffusers does), `controlnet_conditioning_scale` one float
or one per ControlNet;
left out, it is diffusers' default for the pipeline a call is: 0.8 with `image`
(StableDiffusionControlNetImg2ImgPipeline), 1.0 without (StableDiffusionControlNetPipeline).
`control_guidance_start`/`control_guidance_end` run each ControlNet on a fraction of the steps, as there: the
fused graph takes its scale times diffusers' `controlnet_keep` at each step (0: it adds exactly zero).
Images follow diffusers' VaeImageProcessor: without height and width the size is the image's,
rounded down to a multiple of the VAE's factor (8); tensors and arrays resize with F.interpolate's default (nearest),
PIL images with Lanczos. As diffusers' img2img, `image` may be latents (a tensor with the VAE's 4 latent
channels, e.g. an output_type="latent" result), noised as they are; `latents=` without height and width
sets the size, as diffusers samples them at theirs. One deliberate difference: `height` without `width` (or the reverse)
keeps the side given and takes the default for the other, where StableDiffusionPipeline drops
the side given and uses its default size for both.

The sampler is DDIM, or LCM (lcm.py), DPM-Solver++ (dpm.py), Euler or Euler Ancestral (euler.py) for a
folder whose scheduler config names LCMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler or
EulerAncestralDiscreteScheduler, as StableDiffusionPipeline.from_pretrained would sample it;
`scheduler="lcm"` runs LCM on a folder's training schedule (LCM-LoRA on a plain SD folder: diffusers'
`pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)`), `scheduler="dpm"`, `"euler"` and
`"euler_a"` those samplers (their class's from_config, likewise), `scheduler="ddim"` DDIM. LCM draws
fresh noise from the generator after every step but the last, after the initial latents, as
LCMScheduler.step; Euler Ancestral after every step; DPM-Solver++ and Euler draw none. x_T is the
noise times the sampler's init_noise_sigma (Euler's sigma_max), `latents=` too, as diffusers scales
them, and img2img noises the image to the first step kept as the sampler's scheduler does
(DPM-Solver++ and Euler: at that step's sigma, Karras or not).
An outdated scheduler config (steps_offset 0, clip_sample on) is sampled as StableDiffusionPipeline
corrects it. diffusers' ControlNet pipelines correct nothing: calls with a control image keep the
config's steps_offset as they do, but not its clip_sample (a deliberate difference, _latent_scheduler).

Every component is a `Backend`; the pipeline never asks which. Engines have no autograd, so
gradient guidance and the img2img encoder use PyTorch modules (loaded lazily for artifacts):
the VAE (its decoder for any guidance, which judges decoded images; its encoder for img2img) and
the UNet for "through_unet".
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Sequence

import torch

from diffrt.components import CONTROL_CHANNELS, num_controlnets, scaled_residuals, vae_encoder_spec
from diffrt.errors import BackendUnavailableError, DiffrtError
from diffrt.images import to_unit_range
from diffrt.runtime import ddim, lcm
from diffrt.runtime.agreement import guard_autograd_denoiser
from diffrt.runtime.backends import Backend
from diffrt.runtime.guidance import Guidance, acting
from diffrt.runtime.lora_scale import RuntimeLora
from diffrt.runtime.pipeline import (CallClock, DenoiserPipeline, GenerationResult, gated, TorchModule, OutputType, convert_output, guidance_in_pytorch,
                                     refuse_not_taken, to_unit_range_unclamped)
from diffrt.runtime.sampling import (Generators, SamplerOptions, Scheduler, assigned_scheduler, check_finite, choose_scheduler,
                                     randn, sample)
from diffrt.runtime.text_to_image_checks import Call, TextToImageChecks
from diffrt.runtime.text_to_image_inputs import control_keep, sample_posterior

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default; `diffrt generate` and `diffrt serve` use it
LCM_GUIDANCE_SCALE = 1.0  # `diffrt generate`'s with LCM: LCM-LoRA's recommendation (1 to 2; 7.5 burns the images)


def default_guidance_scale(pipe: "TextToImagePipeline", sampler) -> float:
    """The guidance scale a request that gives none runs at (`diffrt generate`, `diffrt serve`): 1.0 for
    LCM on a plain UNet (LCM-LoRA: CFG would burn the images), else StableDiffusionPipeline's 7.5, a
    guidance-distilled UNet's included, whose guidance is the embedding of scale - 1 (1.0 would turn
    it off). `sampler`: the call's scheduler config or schedule."""
    return LCM_GUIDANCE_SCALE if sampler.name == "lcm" and pipe.guidance_embed_dim is None else DEFAULT_GUIDANCE_SCALE


def cut_off(tokenizer, prompt: str, max_length: int) -> tuple[int, str] | None:
    """(count, text) of the tokens that truncation to `max_length` drops from `prompt`, None if it fits:
    those between the last one kept and the end-of-text token, which truncation keeps (diffusers
    reports the same text). Shared by generation and DreamBooth's training prompts."""
    full = tokenizer(prompt, truncation=False, verbose=False).input_ids  # verbose: no "longer than" warning of its own
    return (len(full) - max_length, tokenizer.decode(full[max_length - 1 : -1])) if len(full) > max_length else None


class _PerStep:
    """Model inputs that change from step to step, one dict per step: the loop names each step (SamplerOptions.at_step)
    before its model calls, so a step is found by its index, not by its timestep, which a Karras schedule may repeat."""

    def __init__(self, rows: list[dict]):
        self.rows, self.step = rows, 0

    def begin(self, step: int) -> None:
        self.step = step

    def inputs(self) -> dict:
        return self.rows[self.step]


class TextToImagePipeline(TextToImageChecks, DenoiserPipeline):
    """Guided DDIM, LCM, DPM-Solver++ or Euler sampling of a latent diffusion model: txt2img, img2img, ControlNet, CFG in one 2B batch."""

    def __init__(self, text_encoder: Backend, unet: Backend, vae_decoder: Backend, tokenizer, scheduler: ddim.DDIMConfig, *,
                 vae_scaling_factor: float, vae_factor: int = 8, default_size: int = 512, max_length: int | None = None,
                 torch_vae: TorchModule = None, torch_unet: TorchModule = None, check_outputs: bool = True,
                 unet_precision: str = "fp32", lora: RuntimeLora | None = None, vae_encoder: Backend | None = None,
                 strict: bool = False, controlnet_global_pool: Sequence[bool] = (), one_value_side: int = 0):
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        # img2img's encoder: a backend of its own (an artifact exported with --vae-encoder, or eager PyTorch), else
        # made on first use over the PyTorch VAE (`image_encoder`), and then reported as what ran (RELIABILITY #15).
        self.vae_encoder = vae_encoder
        self.strict = strict  # refuse that PyTorch fallback (the other fallbacks, guidance's, are asked for by name)
        self.tokenizer = tokenizer
        # A Hugging Face tokenizer sets its padding and truncation on itself for each call: calls from two threads at
        # once (cut_off's untruncated one among them) fed the text encoder unpadded ids, or raised.
        self._tokenizer_lock = threading.Lock()
        # Plain and img2img calls sample the config as StableDiffusionPipeline corrects it; calls with a
        # control image keep its steps_offset, as diffusers' ControlNet pipelines do (_latent_scheduler).
        self._scheduler = _latent_scheduler(scheduler, "controlnet_cond" in unet.spec.input_names)
        self.controlnet_scheduler = dataclasses.replace(self._scheduler, steps_offset=scheduler.steps_offset)
        self.vae_scaling_factor = vae_scaling_factor
        self.vae_factor = vae_factor
        self.default_size = default_size
        self.max_length = max_length or tokenizer.model_max_length
        self._torch = {"vae": torch_vae, "unet": torch_unet}
        self._torch_loading = threading.RLock()
        self._set_lora(lora, torch_unet)
        self.check_outputs = check_outputs
        self.unet_precision = unet_precision
        # Each ControlNet's global_pool_conditions (shuffle): with the first one's, diffusers runs guess mode.
        self.controlnet_global_pool = list(controlnet_global_pool) or [False] * self.num_controlnets
        # Eager PyTorch on a tiny test UNet: the sizes at which one image at a time fails (models.one_value_side). An
        # artifact's export ran its smallest shape, so its ranges hold none.
        self.one_value_side = one_value_side

    @property
    def scheduler(self) -> ddim.DDIMConfig:
        """The scheduler config calls sample with (a call with a control image: controlnet_scheduler)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, config: ddim.DDIMConfig | str) -> None:
        """diffusers' `pipe.scheduler = DPMSolverMultistepScheduler.from_config(...)`, here with a config (or a sampler's
        name, "dpm", on the current config's schedule): every call samples with it as given, those with a control
        image too (they kept the config opened with). Anything else (a diffusers scheduler object) is one line."""
        self._scheduler = self.controlnet_scheduler = assigned_scheduler(self._scheduler, config)

    def backends(self) -> dict[str, Backend]:
        parts = (self.text_encoder, self.unet, self.vae_decoder, *([self.vae_encoder] if self.vae_encoder is not None else []))
        return {c.spec.name: c for c in parts}

    @property
    def has_controlnet(self) -> bool:
        return "controlnet_cond" in self.unet.spec.input_names

    @property
    def num_controlnets(self) -> int:
        """How many ControlNets the UNet graph holds (their images and scales go in this order)."""
        return num_controlnets(self.unet.spec)

    @property
    def guidance_embed_dim(self) -> int | None:
        """A guidance-distilled UNet's (LCM's, config time_cond_proj_dim) timestep_cond width; None for any other."""
        cond = next((t for t in self.unet.spec.inputs if t.name == "timestep_cond"), None)
        return None if cond is None else int(cond.dims[-1])

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether a call runs classifier-free guidance (both branches, 2B rows), as diffusers'
        `do_classifier_free_guidance`: scale > 1, and never for a guidance-distilled UNet, which
        takes the scale as its timestep_cond embedding instead."""
        return guidance_scale > 1.0 and self.guidance_embed_dim is None

    @property
    def latent_channels(self) -> int:
        return self.unet.spec.inputs[0].dims[1]

    def sampler_config(self, scheduler: Scheduler = None, *, control: bool = False) -> ddim.DDIMConfig:
        """The config a call samples with (sampling.choose_scheduler). `control`: the call has a control
        image, and so is diffusers' ControlNet (img2img) pipeline, which keeps an outdated steps_offset."""
        return choose_scheduler(self.controlnet_scheduler if control else self.scheduler, scheduler)

    @gated
    def __call__(self, prompt: str | list[str] = "", *, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE, num_images_per_prompt: int = 1, eta: float = 0.0, guidance_rescale: float = 0.0,
                 generator: Generators = None, seed: int | None = None,
                 image: Any = None, strength: float | None = None,
                 control_image: Any = None, controlnet_conditioning_scale: float | list[float] | None = None,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 guess_mode: bool = False, guidance: tuple[Guidance, ...] | list = (), output_type: OutputType = "pil",
                 latents: torch.Tensor | None = None, use_fused_kernel: bool = True, progress=None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 scheduler: Scheduler = None, timesteps: list[int] | None = None, clip_skip: int | None = None,
                 **not_taken) -> GenerationResult:
        # 1. Check inputs before any work. `scheduler`: None is the model's own, "ddim", "lcm", "dpm", "euler" or "euler_a"
        #    that sampler on its training schedule, or a config (sampling.choose_scheduler); `timesteps`: a custom
        #    schedule (LCM, DPM-Solver++, Euler).
        refuse_not_taken(self, not_taken)
        call = self._check_call(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
                                num_inference_steps, guidance_scale, num_images_per_prompt, eta, guidance_rescale, generator, seed,
                                image, strength, control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end, guess_mode, output_type, latents, scheduler, timesteps, clip_skip)
        clock = CallClock(self.device)

        # 2. Encode the prompts given as text: negative and positive in one batch, then one copy per image.
        embeds, truncated, truncated_neg, encoded_text = self._encode_prompts(call, prompt_embeds, negative_prompt_embeds)

        # 3. Initial latents: noise x_T (txt2img; given or drawn, scaled by the sampler's init_noise_sigma as diffusers
        #    scales both) or the encoded image noised to the first timestep (img2img).
        x = self._initial_latents(call, latents)

        # 4. The denoiser: both CFG branches in one 2B batch, the ControlNets (if any) in the same graph.
        feed, at = self._conditioning(call, embeds, guidance_scale), self._step_inputs(call)
        denoise = self._denoiser(feed, call.do_cfg, at, call.guess)

        # 5. The guided DDIM, LCM, DPM-Solver++ or Euler loop.
        guidance = acting(guidance)  # one at scale 0 never acts: load nothing for it
        options = SamplerOptions(guidance_scale=guidance_scale, eta=eta, generator=call.generator, guidance=guidance,
                                 decode=self._guidance_decoder() if guidance else None,
                                 denoise_autograd=self._autograd_denoiser(feed, call.do_cfg, denoise, guidance, at, call.guess),
                                 use_fused_kernel=use_fused_kernel, guidance_rescale=guidance_rescale if call.do_cfg else 0.0,
                                 at_step=at.begin if at is not None else None)
        x = sample(denoise, x, call.schedule, options, progress=progress)

        # 6. Decode and post-process ("latent": the latents as diffusers returns them, scaled, undecoded).
        if output_type == "latent":
            images = x
        else:
            decoded = self.vae_decoder.run({"latent": (x / self.vae_scaling_factor).to(self.vae_decoder.device)})["image"].float()
            images = convert_output(to_unit_range(self._check("vae_decoder", decoded).to(self.device)), output_type)
        ran = self.backends()  # what this call ran (RELIABILITY #15): the encoder only if it encoded an image,
        if not call.encodes_image:  # the decoder only if it decoded, the text encoder only if it encoded text
            ran.pop("vae_encoder", None)
        if output_type == "latent":
            ran.pop("vae_decoder")
        if not encoded_text:
            ran.pop("text_encoder")
        do_cfg, control = call.do_cfg, call.control is not None
        meta = {"prompt": call.prompts, "seed": None if seed is None else int(seed),  # None: the generator(s) given
                "negative_prompt": call.negatives if do_cfg else None, "truncated": truncated,
                "max_length": self.max_length, "truncated_negative": truncated_neg if do_cfg else None,
                "height": call.height, "width": call.width, "guidance_scale": guidance_scale,
                "guidance_rescale": guidance_rescale if do_cfg else 0.0,  # what ran: it rescales the CFG combination
                "clip_skip": call.clip_skip,
                "eta": eta, "num_images_per_prompt": num_images_per_prompt,
                "scheduler": call.schedule.name, "timesteps": call.schedule.timesteps.tolist(),
                "strength": call.strength,
                "controlnet_conditioning_scale": (call.scales if len(call.scales) > 1 else call.scales[0]) if control else None,
                "control_guidance": [list(w) for w in call.control_windows] if control else None,
                "guess_mode": call.guess if control else None,
                "guidance": [g.name for g in guidance], "guidance_pytorch": guidance_in_pytorch(guidance, "vae_decoder"),
                **self.runtime_metadata(ran)}
        # A PyTorch fallback's first load (the VAE, for an encoder or for guidance) is not the call's speed.
        seconds, meta["load_seconds"] = clock.stop()
        return GenerationResult(images, self.backend, seconds, len(call.schedule), meta)

    # --- the steps --------------------------------------------------------------------------------

    def _encode_prompts(self, call: "Call", prompt_embeds, negative_prompt_embeds):
        """Step 2: (embeddings [2B or B, tokens, hidden], what truncation cut from each prompt and each negative prompt,
        whether the text encoder ran). Texts are encoded in one batch; given embeddings take their texts' place."""
        n = len(call.prompts)
        texts = (call.negatives if call.do_cfg and negative_prompt_embeds is None else []) + (call.prompts if prompt_embeds is None else [])
        truncated, truncated_neg, encoded = [None] * n, [None] * n, None
        if texts:
            # Beside prompt_embeds, the negative prompts take their length, as diffusers' encode_prompt tokenizes them.
            negative_rows = len(texts) - (0 if prompt_embeds is not None else n)  # texts: the negative prompts first
            ids, cut = self._tokenize(texts, prompt_embeds.shape[1] if prompt_embeds is not None else None, negative_rows)
            feed = {"input_ids": ids.to(self.text_encoder.device)}
            if "clip_skip" in self.text_encoder.spec.input_names:  # else a text encoder exported before it: 0 only (check_clip_skip)
                # The prompts' rows at clip_skip, the negative prompts' at 0: diffusers' encode_prompt skips for the prompt only.
                skips = [0] * negative_rows + [call.clip_skip] * (len(texts) - negative_rows)
                feed["clip_skip"] = torch.tensor(skips, dtype=torch.int64, device=self.text_encoder.device)
            encoded = self.text_encoder.run(feed)["last_hidden_state"].float()
            encoded = self._check("text_encoder", encoded).to(self.device)
        parts, row = [], 0
        if call.do_cfg:
            if negative_prompt_embeds is None:
                parts.append(encoded[:n])
                truncated_neg, row = cut[:n], n
            else:
                parts.append(negative_prompt_embeds)
        if prompt_embeds is None:
            parts.append(encoded[row : row + n])
            truncated = cut[row : row + n]
        else:
            parts.append(prompt_embeds)
        embeds = torch.cat([part.to(self.device, torch.float32) for part in parts])
        return embeds.repeat_interleave(call.per_prompt, dim=0), truncated, truncated_neg, bool(texts)  # [p0, p0, p1, p1] as diffusers

    def _initial_latents(self, call: "Call", latents: torch.Tensor | None) -> torch.Tensor:
        """Step 3: x at the first step: `latents` as given, the image's latents noised to the first timestep
        (img2img), or noise drawn from the call's generators; the sampler scales noise by its init_noise_sigma."""
        shape = (call.batch, self.latent_channels, call.height // self.vae_factor, call.width // self.vae_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                sized = latents.dim() == 4 and tuple(latents.shape[1:]) != shape[1:]  # the size differs, not the batch
                raise DiffrtError(f"latents must have shape {shape} (batch: {call.batch} images, channels, height/8, width/8), "
                                  f"got {tuple(latents.shape)}" + ("; leave out height and width to sample at the latents' size"
                                                                    if sized else ""))
            return call.schedule.initial_noise(latents.to(self.device, torch.float32))
        if call.init is not None:
            return self._noised_image_latents(call.init, call.batch, call.schedule, call.generator, encoded=call.init_is_latents)
        return call.schedule.initial_noise(randn(shape, call.generator, self.device, torch.float32))

    def _conditioning(self, call: "Call", embeds: torch.Tensor, guidance_scale: float) -> dict:
        """Step 4's inputs besides x and t: the prompt embeddings, the ControlNets' images and scales, and for a
        guidance-distilled UNet the embedding of w = guidance_scale - 1 per image, as StableDiffusionPipeline feeds
        it (float32 here: the latents' dtype there)."""
        feed = {"encoder_hidden_states": embeds}
        if self.guidance_embed_dim is not None:
            w = torch.full((call.batch,), guidance_scale - 1, dtype=torch.float32)
            feed["timestep_cond"] = lcm.guidance_scale_embedding(w, self.guidance_embed_dim).to(self.device)
        if self.has_controlnet:
            feed.update(self._control_feed(call.control, call.batch, call.per_prompt, call.height, call.width, call.do_cfg))
            feed["conditioning_scale"] = self._scale_feed(call.scales if call.control is not None else [0.0] * len(call.scales), call.guess)
        return feed

    def _step_inputs(self, call: "Call") -> "_PerStep | None":
        """Inputs that change from step to step: the ControlNets' conditioning scales where control_guidance_start/end
        switch some off for part of the steps (their scale times diffusers' controlnet_keep, so a ControlNet off adds
        exactly zero); None when no input changes."""
        keep = control_keep(call.control_windows, len(call.schedule)) if call.control is not None else None
        if keep is None:
            return None
        for k, (start, end) in enumerate(call.control_windows):
            if not any(row[k] for row in keep):  # as in diffusers, which runs it at scale 0 without a word
                log.warning("ControlNet %d: its window [%g, %g] of the steps holds none of these %d, so it never acts; widen "
                            "control_guidance_start/end or take more steps", k, start, end, len(keep))
        return _PerStep([{"conditioning_scale": self._scale_feed([c * k for c, k in zip(call.scales, row)], call.guess)} for row in keep])

    def _scale_feed(self, scales: list[float], guess: bool) -> torch.Tensor:
        """conditioning_scale as the graph takes it: [K, R], ControlNet k's scale for each of its R residuals (down
        residuals, then mid). In guess mode diffusers' ControlNetModel weights a ControlNet's residuals by depth,
        logspace(-1, 0, R) (0.1 at the first, 1 at the mid block), unless it pools its conditions (shuffle). A graph
        exported before this input had its R axis takes [K] (its checks refuse guess mode for a non-pooling ControlNet)."""
        scale, residuals = torch.tensor(scales, dtype=torch.float32), scaled_residuals(self.unet.spec)
        if not residuals:
            return scale.to(self.device)
        weights = torch.ones(len(scales), residuals)
        if guess:
            weights[[not pooled for pooled in self.controlnet_global_pool]] = torch.logspace(-1, 0, residuals)
        return (weights * scale[:, None]).to(self.device)

    def _denoiser(self, feed: dict, do_cfg: bool, at: "_PerStep | None" = None, guess: bool = False) -> Callable:
        """The loop's model: (x_t, t) -> (eps_uncond or None, eps_cond), both CFG branches in one 2B batch (two B
        batches in guess mode). `at`: the inputs that change with the step (_step_inputs)."""

        def run(inputs: dict) -> torch.Tensor:
            return self._check(self.unet.spec.name, self.unet.run(inputs)["noise_pred"].float())

        def denoise(x_t: torch.Tensor, t: torch.Tensor):
            return self._branches(run, {**feed, **at.inputs()} if at is not None else feed, x_t, t, do_cfg, guess)

        return denoise

    def _branches(self, run: Callable[[dict], torch.Tensor], inputs: dict, x_t: torch.Tensor, t: torch.Tensor, do_cfg: bool,
                  guess: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(eps_uncond or None, eps_cond) from `run` over the UNet's inputs: both CFG branches in one 2B batch. In
        guess mode (diffusers' ControlNet pipelines, for ControlNets that pool their conditions) the ControlNets see
        the conditional half only and the unconditional half gets no residuals: two B batches, the first with
        every conditioning scale 0, which adds exactly zero."""
        t = t.to(self.device, torch.float32)
        if not do_cfg:
            return None, run({**inputs, "sample": x_t, "timestep": t.expand(x_t.shape[0])})
        if not guess:
            eps = run({**inputs, "sample": torch.cat([x_t, x_t]), "timestep": t.expand(2 * x_t.shape[0])})
            return tuple(eps.chunk(2))
        halves = [{name: value.chunk(2)[i] if name in ("encoder_hidden_states", "controlnet_cond") else value
                   for name, value in inputs.items()} for i in (0, 1)]
        halves[0]["conditioning_scale"] = torch.zeros_like(inputs["conditioning_scale"])
        eps_u, eps_c = (run({**half, "sample": x_t, "timestep": t.expand(x_t.shape[0])}) for half in halves)
        return eps_u, eps_c

    # --- checks (the others: text_to_image_checks.TextToImageChecks) ------------------------------

    def _check(self, component: str, tensor: torch.Tensor) -> torch.Tensor:
        return check_finite(tensor, component, self.lora) if self.check_outputs else tensor

    # --- helpers of the steps ------------------------------------------------------------------------

    def _tokenize(self, prompts: list[str], length: int | None = None, negatives: int = 0) -> tuple[torch.Tensor, list[str | None]]:
        """Token ids padded to the text encoder's length (or `length`). Longer prompts are cut as diffusers cuts
        them, with a warning and the cut text returned (RELIABILITY #13, diffusers #5890). The first `negatives`
        prompts are negative prompts, whose cut text the result keeps under another key."""
        n = length or self.max_length
        with self._tokenizer_lock:
            ids = self.tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
            cuts = [cut_off(self.tokenizer, prompt, n) for prompt in prompts]
        truncated: list[str | None] = []
        for i, cut in enumerate(cuts):
            if cut is not None:  # the count only: a service's log is no place for its users' prompts (metadata has the text)
                what, key = ("a negative prompt", "truncated_negative") if i < negatives else ("a prompt", "truncated")
                log.warning("%s longer than the text encoder's %d tokens was truncated: %d tokens dropped "
                            "(the result's metadata[%r] holds them)", what, n, cut[0], key)
            truncated.append(cut[1] if cut is not None else None)
        return ids, truncated

    def _noised_image_latents(self, init: torch.Tensor, batch: int, schedule, generator: Generators,
                              encoded: bool = False) -> torch.Tensor:
        """img2img: sample the VAE posterior, scale, repeat to the batch, noise to the first timestep.
        With one generator per image (a list, or GeneratorBlocks) the init images are repeated to the
        batch first, so each image samples its own posterior row, as diffusers' img2img does.
        `encoded`: `init` is latents already (scaled, as output_type="latent" returns them), used as they are."""
        if encoded:  # step 1 checked that the init rows divide the batch
            latents = init.to(self.device, torch.float32)
        else:
            latents = self._encode_images(init, batch, generator)
        latents = torch.cat([latents] * (batch // latents.shape[0]))  # diffusers' order: [i0, i1, i0, i1]
        noise = randn(latents.shape, generator, self.device, torch.float32)
        return schedule.add_noise(latents, noise)

    def _encode_images(self, init: torch.Tensor, batch: int, generator: Generators) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents, one VAE posterior sample per row (per image with one generator per image)."""
        per_image = generator is not None and not isinstance(generator, torch.Generator)
        if per_image:
            init = torch.cat([init] * (batch // init.shape[0]))  # diffusers' order: [i0, i1, i0, i1]
        encoder = self.image_encoder()
        moments = encoder.run({"image": (init * 2 - 1).to(encoder.device)})["latent_parameters"]
        moments = self._check("vae_encoder", moments.float().to(self.device))
        return self.vae_scaling_factor * sample_posterior(moments, generator)

    def image_encoder(self) -> Backend:
        """The VAE encoder backend; for an artifact exported without one, eager PyTorch over the source's VAE,
        made once (and then listed among the pipeline's backends)."""
        with self._torch_loading:  # once, however many image-to-image calls reach it at once
            if self.vae_encoder is None:
                self.vae_encoder = self._torch_image_encoder()
            return self.vae_encoder

    def _torch_image_encoder(self) -> Backend:
        from diffrt.runtime.backends.torch_eager import TorchBackend
        from diffrt.text_to_image_models import VaeEncoder

        if self.strict:
            raise BackendUnavailableError(f"image-to-image needs the VAE encoder, which this {self.backend} artifact was exported "
                                          "without; it would encode with the source's PyTorch VAE, a fallback strict mode "
                                          "refuses: re-export with --vae-encoder")
        vae = self.torch_module("vae", "image-to-image (an artifact exported without --vae-encoder)")
        in_channels = int(vae.config.in_channels)
        open_side = (1, 64, 1 << 11)  # latent pixels: eager PyTorch takes any size
        spec = dataclasses.replace(vae_encoder_spec(self.latent_channels, batch=(1, 1, 1 << 16), height=open_side,
                                                    width=open_side, vae_factor=self.vae_factor, in_channels=in_channels), eager=True)
        return TorchBackend(VaeEncoder(vae), spec, device=next(vae.parameters()).device)

    def _control_feed(self, control: list[torch.Tensor] | None, batch: int, per_prompt: int, height: int, width: int,
                      do_cfg: bool) -> dict:
        """controlnet_cond: each ControlNet's images repeated to the batch as diffusers does, then stacked on the
        channel axis. With no control image the fused graph runs on zeros with every scale 0, which adds exactly
        zero: the plain UNet."""
        if control is None:
            cond = torch.zeros(batch, CONTROL_CHANNELS * self.num_controlnets, height, width)
        else:
            conds = []
            for i, images in enumerate(control):
                if images.shape[0] not in (1, batch // per_prompt):
                    which = f" for ControlNet {i}" if len(control) > 1 else ""
                    raise DiffrtError(f"got {images.shape[0]} control images{which} for {batch // per_prompt} prompts; "
                                      "pass 1 or one per prompt")
                conds.append(images.repeat_interleave(batch if images.shape[0] == 1 else per_prompt, dim=0))
            cond = torch.cat(conds, dim=1)
        cond = cond.to(self.device, torch.float32)
        return {"controlnet_cond": torch.cat([cond, cond]) if do_cfg else cond}

    def _guidance_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """x0 latents -> images in [0, 1], differentiable: the PyTorch VAE decoder (engines have no autograd)."""
        vae = self.torch_module("vae", "gradient guidance")
        param = next(vae.parameters())

        def decode(x0: torch.Tensor) -> torch.Tensor:
            image = vae.decode((x0 / self.vae_scaling_factor).to(param.device, param.dtype), return_dict=False)[0]
            return to_unit_range_unclamped(image.float()).to(x0.device)

        return decode

    def _autograd_denoiser(self, feed: dict, do_cfg: bool, engine_denoise, guidance, at=None, guess: bool = False) -> Callable | None:
        """The PyTorch UNet with autograd, for guidance mode "through_unet", checked finite and
        against the backend's eps on its first step, so an engine and a fallback that disagree
        (another LoRA, another scale) are caught instead of steering with the wrong model
        (agreement.py, RELIABILITY #16)."""
        if not any(g.mode == "through_unet" for g in guidance):
            return None
        unet = self.torch_module("unet", "guidance mode 'through_unet'")
        param = next(unet.parameters())
        inputs = self.unet.spec.inputs

        def run(full: dict) -> torch.Tensor:
            # Each input in the dtype its spec gives it at the UNet's precision: the timestep stays fp32 (a half
            # UNet's time embedding is computed from it in fp32, as diffusers does; components.TensorSpec.pinned).
            args = [full[s.name].to(param.device, s.torch_dtype(param.dtype)) for s in inputs]
            return unet(*args).to(self.device, torch.float32)

        def denoise(x_t: torch.Tensor, t: torch.Tensor):
            return self._branches(run, {**feed, **at.inputs()} if at is not None else feed, x_t, t, do_cfg, guess)

        return guard_autograd_denoiser(denoise, engine_denoise, self.unet.name, self.unet_precision, self.check_outputs)


# --- helpers -----------------------------------------------------------------------------------------


def _latent_scheduler(config: ddim.DDIMConfig, controlnet: bool = False) -> ddim.DDIMConfig:
    """The scheduler config as StableDiffusionPipeline (and its img2img) samples it: its __init__ sets
    steps_offset 1 and clip_sample off in configs written before diffusers fixed those defaults (clipping
    x0 to [-1, 1] is for pixels, and latents range wider). A sampler chosen later (`scheduler="lcm"`,
    LCMScheduler.from_config(pipe.scheduler.config)) is made from the config corrected here.

    StableDiffusionControlNetPipeline and its img2img correct nothing. Calls with a control image keep
    the config's steps_offset, as they do (`controlnet`: the warning says so), but not its clip_sample:
    a config that leaves clip_sample out (PNDM's, Euler's, as diffusers writes them today) reads as
    DDIM's default, on, which no latent model means, and neither a DDIMConfig nor an artifact's manifest
    can tell it from one that asks for it; diffusers' LCMScheduler.from_config turns it off there."""
    fixes = {key: value for key, value in (("steps_offset", 1), ("clip_sample", False)) if getattr(config, key) != value}
    if fixes:
        kept = (f"; calls with a control image keep steps_offset {config.steps_offset}, as diffusers' ControlNet pipelines do"
                if controlnet and "steps_offset" in fixes else "")
        log.warning("the scheduler config is outdated (%s); sampling with %s, as StableDiffusionPipeline does%s",
                    ", ".join(f"{k} {getattr(config, k)}" for k in fixes), ", ".join(f"{k} {v}" for k, v in fixes.items()), kept)
        config = dataclasses.replace(config, **fixes)
    return config
