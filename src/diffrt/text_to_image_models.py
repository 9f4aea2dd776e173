"""Latent text-to-image models: a diffusers Stable Diffusion folder, and one torch module per component.

    text_encoder     input_ids -> last_hidden_state                          CLIPTextModel
    unet             sample, timestep, encoder_hidden_states -> noise_pred    UNet2DConditionModel
    controlnet       ... + controlnet_cond, conditioning_scale -> down_block_res_i, mid_block_res
    unet_controlnet  ControlNet + UNet in one graph (one launch per step) -> noise_pred
    vae_decoder      latent -> image in model space [-1, 1]                   AutoencoderKL.decode

The same wrapper modules run on the torch backend and are traced by the ONNX exporter, so what
the parity checks verify is exactly what the pipeline runs. The signatures are declared in
`diffrt.components`; `component_specs` fills in a model's sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffrt.components import (ComponentSpec, Range, controlnet_spec, latent_unet_spec, text_encoder_spec,
                               unet_controlnet_spec, vae_decoder_spec)
from diffrt.errors import DiffrtError
from diffrt.models import require_model_dir, require_safetensors
from diffrt.runtime.ddim import DDIMConfig

SOURCE_PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")  # what a text-to-image folder must hold


# --- the component modules ---------------------------------------------------------------------------


class TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # diffusers' encode_prompt: no attention mask unless the config asks for one (CLIP does not).
        return self.text_encoder(input_ids, return_dict=False)[0]


class LatentUNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class ControlNet(nn.Module):
    """The ControlNet alone: its residuals, multiplied by the conditioning scale (a [1] tensor)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return (*down, mid)


class UNetControlNet(nn.Module):
    """ControlNet + UNet fused, as StableDiffusionControlNetPipeline computes one step (guess_mode off)."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """AutoencoderKL.decode. The caller divides by the VAE's scaling_factor first, as diffusers does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


# --- the model folder ----------------------------------------------------------------------------------


@dataclass
class TextToImageModel:
    """A loaded Stable Diffusion folder (+ an optional ControlNet), fp32, eval mode, no gradients."""

    folder: Path
    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: nn.Module  # CLIPTextModel
    unet: nn.Module  # UNet2DConditionModel
    vae: nn.Module  # AutoencoderKL
    scheduler: DDIMConfig
    controlnet: nn.Module | None = None  # ControlNetModel
    controlnet_folder: Path | None = None

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel: 2 per VAE downsampling (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def unet_multiple(self) -> int:
        """Latent sizes must divide by this: the UNet halves them once per down block but the last."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def image_multiple(self) -> int:
        return self.vae_factor * self.unet_multiple

    @property
    def default_size(self) -> int:
        """Image side the UNet was made for, in pixels (diffusers' default height and width)."""
        return self.unet.config.sample_size * self.vae_factor

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    def module(self, name: str) -> nn.Module:
        """The torch module behind a component name."""
        if name == "text_encoder":
            return TextEncoder(self.text_encoder)
        if name == "unet":
            return LatentUNet(self.unet)
        if name == "vae_decoder":
            return VaeDecoder(self.vae)
        if self.controlnet is None:
            raise DiffrtError(f"component {name} needs a ControlNet; pass --controlnet DIR")
        if name == "controlnet":
            return ControlNet(self.controlnet)
        if name == "unet_controlnet":
            return UNetControlNet(self.unet, self.controlnet)
        raise DiffrtError(f"unknown text-to-image component {name!r}")


def require_text_to_image_folder(folder: str | Path) -> Path:
    folder = require_model_dir(folder)
    missing = [part for part in SOURCE_PARTS if not (folder / part).is_dir()]
    if missing:
        raise DiffrtError(f"{folder} is not a text-to-image pipeline folder: it lacks {', '.join(missing)}/ "
                          f"(expected {', '.join(SOURCE_PARTS)})")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_controlnet(folder: str | Path):
    from diffusers import ControlNetModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DiffrtError(f"{folder} is not a ControlNet folder: it has no config.json")
    require_safetensors(folder)
    return ControlNetModel.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)


def load_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    require_safetensors(folder / "unet")
    return UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).eval().requires_grad_(False)


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    require_safetensors(folder / "vae")
    return AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).eval().requires_grad_(False)


def load_text_encoder(folder: Path):
    from transformers import CLIPTextModel

    require_safetensors(folder / "text_encoder")
    return CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True).eval().requires_grad_(False)


def load_scheduler(folder: Path) -> DDIMConfig:
    return DDIMConfig.from_scheduler_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))


def load_text_to_image(folder: str | Path, controlnet: str | Path | None = None) -> TextToImageModel:
    """Load a diffusers Stable Diffusion folder (safetensors only) and, if given, a ControlNet folder."""
    folder = require_text_to_image_folder(folder)
    return TextToImageModel(
        folder=folder, tokenizer=load_tokenizer(folder / "tokenizer"), text_encoder=load_text_encoder(folder),
        unet=load_unet(folder), vae=load_vae(folder), scheduler=load_scheduler(folder),
        controlnet=load_controlnet(controlnet) if controlnet is not None else None,
        controlnet_folder=Path(controlnet) if controlnet is not None else None,
    )


# --- specs -----------------------------------------------------------------------------------------------


def controlnet_residuals(controlnet) -> list[tuple[int, int]]:
    """(channels, downscale) of each ControlNet residual, down blocks then mid, from its structure:
    conv_in, then per down block `layers_per_block` resnets and a downsampler on all but the last."""
    n = len(controlnet.config.down_block_types)
    scales = [1]
    for i in range(n):
        scales += [2**i] * controlnet.config.layers_per_block + ([2 ** (i + 1)] if i < n - 1 else [])
    convs = list(controlnet.controlnet_down_blocks)
    if len(convs) != len(scales):
        raise DiffrtError(f"ControlNet has {len(convs)} down residuals, its config implies {len(scales)}; unsupported architecture")
    return [(conv.out_channels, s) for conv, s in zip(convs, scales)] + [(controlnet.controlnet_mid_block.out_channels, 2 ** (n - 1))]


def latent_range(pixels: Range, model: TextToImageModel, what: str) -> Range:
    """A (min, opt, max) range in image pixels -> latent pixels, each a multiple of the model's step."""
    step = model.image_multiple
    bad = [p for p in pixels if p % step]
    if bad:
        raise DiffrtError(f"--{what} {':'.join(map(str, pixels))}: every value must be a multiple of {step} "
                          f"(the VAE's {model.vae_factor} x the UNet's {model.unet_multiple}), got {bad[0]}")
    return tuple(p // model.vae_factor for p in pixels)


def component_specs(model: TextToImageModel, names: list[str], *, batch: Range, height: Range, width: Range) -> dict[str, ComponentSpec]:
    """Specs for the named components; `height`/`width` in image pixels."""
    h, w = latent_range(height, model, "height"), latent_range(width, model, "width")
    hidden, length = model.text_encoder.config.hidden_size, model.max_length
    unet = model.unet.config
    common = dict(batch=batch, height=h, width=w, max_length=length, multiple=model.unet_multiple)
    make = {
        "text_encoder": lambda: text_encoder_spec(model.text_encoder.config.vocab_size, hidden, length, batch),
        "unet": lambda: latent_unet_spec(unet.in_channels, unet.out_channels, unet.cross_attention_dim, **common),
        "unet_controlnet": lambda: unet_controlnet_spec(unet.in_channels, unet.out_channels, unet.cross_attention_dim,
                                                        vae_factor=model.vae_factor, **common),
        "controlnet": lambda: controlnet_spec(unet.in_channels, unet.cross_attention_dim, controlnet_residuals(model.controlnet),
                                              vae_factor=model.vae_factor, **common),
        "vae_decoder": lambda: vae_decoder_spec(model.vae.config.latent_channels, batch=batch, height=h, width=w,
                                                vae_factor=model.vae_factor, out_channels=model.vae.config.out_channels),
    }
    return {name: make[name]() for name in names}
