"""Latent text-to-image models: a diffusers Stable Diffusion folder, and one torch module per component.

    text_encoder     input_ids -> last_hidden_state                          CLIPTextModel
    unet             sample, timestep, encoder_hidden_states -> noise_pred    UNet2DConditionModel
                     (+ timestep_cond, the guidance-scale embedding, for an LCM-distilled UNet)
    controlnet       ... + controlnet_cond, conditioning_scale -> down_block_res_i, mid_block_res
    unet_controlnet  ControlNet(s) + UNet in one graph (one launch per step) -> noise_pred

Several ControlNets run as diffusers' MultiControlNetModel: each gets its own conditioning image
and scale, and their residuals are summed in order. The graph takes the K images stacked on the
channel axis (controlnet_cond [batch, 3K, H, W]) and K rows of scales, one per residual
(conditioning_scale [K, R]: diffusers' guess mode scales the residuals by depth), so K = 1 is the
single-ControlNet signature.
    vae_decoder      latent -> image in model space [-1, 1]                   AutoencoderKL.decode
    vae_encoder      image in [-1, 1] -> latent_parameters (posterior mean,    AutoencoderKL.encode
                     log-variance), exported on request, for image-to-image

The same wrapper modules run on the torch backend and are traced by the ONNX exporter, so what
the parity checks verify is exactly what the pipeline runs. The signatures are declared in
`diffrt.components`; `component_specs` fills in a model's sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from diffrt.components import (CONTROL_CHANNELS, ComponentSpec, Range, controlnet_spec, latent_unet_spec, text_encoder_spec,
                               unet_controlnet_spec, vae_decoder_spec,
                               vae_encoder_spec)
from diffrt.errors import DiffrtError
from diffrt.models import load_frozen, one_value_side, read_config, require_model_dir, serialized
from diffrt.runtime.ddim import DDIMConfig

SOURCE_PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")  # what a text-to-image folder must hold


# --- the component modules ---------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """CLIPTextModel as diffusers' encode_prompt runs it: the final layer norm of the hidden state `clip_skip` layers
    before the last (0: last_hidden_state, which is that norm of the last layer's output), one clip_skip per row
    (diffusers applies it to the prompt, never to the negative prompt, and both go in one batch). The index is an
    input, so one graph or engine takes every clip_skip; every layer runs (an index, not a cut)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor) -> torch.Tensor:
        # diffusers' encode_prompt: no attention mask unless the config asks for one (CLIP does not).
        hidden = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True).hidden_states
        stacked = torch.stack(hidden)  # [layers + 1, batch, sequence, hidden]: the embeddings, then each layer's output
        index = (len(hidden) - 1 - clip_skip).reshape(1, -1, 1, 1).expand(1, *stacked.shape[1:])
        chosen = stacked.gather(0, index).squeeze(0)  # row b: hidden state number (layers - clip_skip[b])
        model = self.text_encoder
        return getattr(model, "text_model", model).final_layer_norm(chosen)  # transformers 5 put the text model's parts on CLIPTextModel itself


class LatentUNet(nn.Module):
    """The UNet; `timestep_cond` (the guidance-scale embedding, lcm.guidance_scale_embedding) is fed to a
    guidance-distilled UNet (time_cond_proj_dim) only, as its spec's fourth input."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


def control_residuals(controlnet, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
    """The ControlNet residuals of one step, as diffusers' ControlNet pipelines sum them over a MultiControlNetModel:
    ControlNet k takes its RGB image (channels 3k to 3k + 2 of controlnet_cond) and its row of conditioning_scale
    [K, R], one scale per residual (down residuals, then mid). diffusers' ControlNetModel multiplies every residual
    by its conditioning scale, or in guess mode by that scale times logspace(-1, 0, R); the row holds the product,
    so the graph runs either mode and the pipeline chooses (TextToImagePipeline._scale_feed). A [K] scale, one per
    ControlNet, is taken too: what the pipeline feeds an older artifact's graph, and so its PyTorch fallback."""
    down_sum = mid_sum = None
    for net, image, scales in zip(controlnet_list(controlnet), controlnet_cond.split(CONTROL_CHANNELS, dim=1), conditioning_scale):
        down, mid = net(sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=image,
                        conditioning_scale=1.0, return_dict=False)
        if scales.dim() == 0:  # [K]: the feed of an artifact exported before the residual axis, to its PyTorch fallback
            scales = scales.expand(len(down) + 1)
        down, mid = [r * s for r, s in zip(down, scales)], mid * scales[-1]
        down_sum, mid_sum = ((down, mid) if down_sum is None
                             else ([a + b for a, b in zip(down_sum, down)], mid_sum + mid))
    return down_sum, mid_sum


class ControlNet(nn.Module):
    """The ControlNet(s) alone: the residuals, each ControlNet's multiplied by its scales, summed."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = control_residuals(self.controlnet, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)
        return (*down, mid)


class UNetControlNet(nn.Module):
    """ControlNet(s) + UNet fused, as StableDiffusionControlNetPipeline computes one step."""

    def __init__(self, unet, controlnet):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet  # a ControlNetModel, or a MultiControlNetModel (combine_controlnets)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, timestep_cond=None):
        # timestep_cond goes to the UNet alone: StableDiffusionControlNetPipeline gives the ControlNets none.
        down, mid = control_residuals(self.controlnet, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """AutoencoderKL.decode. The caller divides by the VAE's scaling_factor first, as diffusers does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """AutoencoderKL.encode up to its posterior's parameters (the encoder, then quant_conv where the VAE has one):
    the moments DiagonalGaussianDistribution splits into mean and log-variance. Sampling stays with the
    pipeline (`sample_posterior`), so the draw comes from the call's generators, as in diffusers' img2img."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        quant_conv = getattr(self.vae, "quant_conv", None)  # None for VAEs built with use_quant_conv=False
        return moments if quant_conv is None else quant_conv(moments)


# --- the model folder ----------------------------------------------------------------------------------


@dataclass
class TextToImageModel:
    """A loaded Stable Diffusion folder (+ optional ControlNets), fp32, eval mode, no gradients."""

    folder: Path
    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: nn.Module  # CLIPTextModel
    unet: nn.Module  # UNet2DConditionModel
    vae: nn.Module  # AutoencoderKL
    scheduler: DDIMConfig
    controlnet: nn.Module | None = None  # ControlNetModel, or MultiControlNetModel for several (combine_controlnets)

    @property
    def num_controlnets(self) -> int:
        return len(controlnet_list(self.controlnet))

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
    def one_value_side(self) -> int:
        """models.one_value_side of the UNet and ControlNets: 0, except for tiny test models."""
        return one_value_side([net.config for net in (self.unet, *controlnet_list(self.controlnet))], self.image_multiple)

    @property
    def default_size(self) -> int:
        """Image side the UNet was made for, in pixels (diffusers' default height and width; a [height, width]
        sample_size gives its first, as diffusers' pipelines take it)."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_factor

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
        if name == "vae_encoder":
            return VaeEncoder(self.vae)
        if self.controlnet is None:
            raise DiffrtError(f"component {name} needs a ControlNet; pass --controlnet DIR (repeatable)")
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
    """The CLIP tokenizer of a pipeline's tokenizer/ folder, its files checked first: without them transformers
    made a tokenizer of its two special tokens alone, and every prompt came out as end-of-text tokens, silently."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        have = f"it holds {', '.join(sorted(names))}" if names else "it is empty" if folder.is_dir() else "it is missing"
        raise DiffrtError(f"{folder} is no CLIP tokenizer ({have}): it needs vocab.json with merges.txt, or tokenizer.json; "
                          "restore them from the model")
    if "tokenizer_config.json" in names:
        read_config(folder / "tokenizer_config.json")  # a JSON object, or one line naming the file
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def check_tokenizer(tokenizer, folder: Path) -> None:
    """A pipeline's tokenizer against the text encoder it feeds, by the encoder's config (before its weights load):
    every id an embedding row, every position one the encoder has (an unset model_max_length is transformers' 1e30:
    the first prompt failed)."""
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise DiffrtError(f"{folder / 'tokenizer'} holds no vocabulary beyond its special tokens; restore vocab.json and merges.txt")
    config_file = folder / "text_encoder" / "config.json"
    if not config_file.is_file():
        return  # the text encoder's own load names what is missing
    config = text_encoder_config(read_config(config_file))
    vocab_size, positions = config.get("vocab_size", 49408), config.get("max_position_embeddings", 77)  # CLIPTextConfig's defaults
    if len(tokenizer) > vocab_size:
        raise DiffrtError(f"{folder / 'tokenizer'} has {len(tokenizer)} tokens but {config_file} embeds {vocab_size} "
                          "(vocab_size): the two are of different models")
    if tokenizer.model_max_length > positions:
        length = "no model_max_length" if tokenizer.model_max_length > 1e12 else f"model_max_length {tokenizer.model_max_length}"
        raise DiffrtError(f"{folder / 'tokenizer' / 'tokenizer_config.json'} gives {length}, but the text encoder takes "
                          f"{positions} tokens (max_position_embeddings); set model_max_length to {positions}")


def load_controlnet(folder: str | Path, weights: bool = True):
    from diffusers import ControlNetModel

    return load_frozen(ControlNetModel, require_controlnet_dir(folder), weights)


def require_controlnet_dir(folder: str | Path) -> Path:
    """A ControlNetModel folder, checked by its config before any weight is read."""
    folder = Path(folder)
    if not folder.exists():
        raise DiffrtError(f"ControlNet folder not found: {folder}; pass --controlnet DIR, a ControlNetModel folder")
    if not folder.is_dir():
        raise DiffrtError(f"--controlnet {folder} is a file; pass the ControlNetModel's folder (config.json and its weights)")
    if not (folder / "config.json").is_file():
        inside = sorted(str(c.parent) for c in folder.glob("*/config.json") if _class_name(c) == "ControlNetModel")
        hint = f"; its {' and '.join(inside)} is one" if inside else ""
        raise DiffrtError(f"{folder} is not a ControlNet folder: it has no config.json{hint}")
    kind = read_config(folder / "config.json").get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise DiffrtError(f"--controlnet {folder} is a {kind}, not a ControlNetModel; pass a ControlNet folder")
    return folder


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def text_encoder_config(config: dict) -> dict:
    """A text encoder's own settings: a whole CLIPConfig (model_type "clip", as some conversions save it) holds
    them in text_config, which CLIPTextModel.from_pretrained reads."""
    return config.get("text_config") or {} if config.get("model_type") == "clip" else config


def check_parts(folder: Path, controlnets: Sequence[Path] = ()) -> None:
    """A pipeline folder's parts (and the ControlNets given) checked against each other by their configs, before any
    weight is read: a UNet2DModel in unet/, a text encoder of another width than the UNet's cross-attention, a VAE of
    other latents, or a ControlNet made for another UNet failed deep inside torch at the first call, and an export of
    such a folder made an artifact that could never run."""
    unet = read_config(folder / "unet" / "config.json")
    vae = read_config(folder / "vae" / "config.json")
    check_unet_config(unet, str(folder / "unet"))  # first: an inpainting UNet's 9 channels are its own, not the VAE's
    for part, config, cls in (("unet", unet, "UNet2DConditionModel"), ("vae", vae, "AutoencoderKL")):
        kind = config.get("_class_name", cls)
        if kind != cls:
            raise DiffrtError(f"{folder / part} holds a {kind}, where a Stable Diffusion pipeline folder has its {cls}; pass "
                              "a pipeline folder whose parts were saved together (pipe.save_pretrained)")

    def refuse(where: Path, key: str, value, other: Path, other_key: str, other_value) -> None:
        raise DiffrtError(f"{where} has {key} {value} but {other} has {other_key} {other_value}: they are parts of "
                          "different models; use parts made together")

    unet_file, vae_file = folder / "unet" / "config.json", folder / "vae" / "config.json"
    cross = unet.get("cross_attention_dim", 1280)  # UNet2DConditionModel's defaults, where a config leaves a key out
    text_file = folder / "text_encoder" / "config.json"
    if text_file.is_file():
        hidden = text_encoder_config(read_config(text_file)).get("hidden_size", 512)
        if isinstance(cross, int) and cross != hidden:
            refuse(unet_file, "cross_attention_dim", cross, text_file, "hidden_size", hidden)
    latents = vae.get("latent_channels", 4)
    if unet.get("in_channels", 4) != latents:
        refuse(unet_file, "in_channels", unet.get("in_channels", 4), vae_file, "latent_channels", latents)
    for controlnet in controlnets:
        config = read_config(controlnet / "config.json")
        for key, default in (("cross_attention_dim", 1280), ("in_channels", 4), ("block_out_channels", (320, 640, 1280, 1280))):
            mine, theirs = config.get(key, default), unet.get(key, default)
            if _as_tuple(mine) != _as_tuple(theirs):  # JSON's lists and the defaults' tuples alike
                refuse(controlnet / "config.json", key, mine, unet_file, key, theirs)


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def multi_controlnet_class():
    from diffusers import MultiControlNetModel

    return MultiControlNetModel


def combine_controlnets(controlnets: Sequence[nn.Module]) -> nn.Module | None:
    """None, the one ControlNetModel as it is, or diffusers' MultiControlNetModel over several (in order)."""
    if len(controlnets) <= 1:
        return controlnets[0] if controlnets else None
    return multi_controlnet_class()(list(controlnets)).eval().requires_grad_(False)


def controlnet_list(controlnet: nn.Module | None) -> list[nn.Module]:
    """combine_controlnets' inverse: the ControlNetModels in order."""
    if controlnet is None:
        return []
    return list(controlnet.nets) if isinstance(controlnet, multi_controlnet_class()) else [controlnet]


def global_pool_conditions(controlnet: nn.Module | None) -> list[bool]:
    """Each ControlNet's config global_pool_conditions (shuffle ControlNets): diffusers' ControlNet pipelines run
    guess mode when the first one has it."""
    return [bool(getattr(net.config, "global_pool_conditions", False)) for net in controlnet_list(controlnet)]


def controlnet_paths(controlnet: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """A ControlNet argument as diffusers' pipelines take it (one, a list, or none) -> folders in order."""
    if controlnet is None:
        return []
    if isinstance(controlnet, (str, Path)):
        return [Path(controlnet)]
    return [Path(c) for c in controlnet]


def load_controlnets(folders: str | Path | Sequence[str | Path] | None, weights: bool = True) -> nn.Module | None:
    """Load ControlNet folders (one, a list, or none) combined as combine_controlnets does."""
    return combine_controlnets([load_controlnet(f, weights) for f in controlnet_paths(folders)])


def load_unet(folder: Path, weights: bool = True):
    from diffusers import UNet2DConditionModel

    return load_frozen(UNet2DConditionModel, folder / "unet", weights)


def load_vae(folder: Path, weights: bool = True):
    from diffusers import AutoencoderKL

    return load_frozen(AutoencoderKL, folder / "vae", weights)


def load_text_encoder(folder: Path, weights: bool = True):
    from transformers import CLIPTextModel

    return load_frozen(CLIPTextModel, folder / "text_encoder", weights)


def index_scheduler_class(folder: Path) -> str | None:
    """The scheduler class a pipeline folder's model_index.json names: the one diffusers' from_pretrained builds
    (PNDMScheduler for SD-1.5). None where the file, or the entry, is missing or not what diffusers writes."""
    try:
        listed = (json.loads((folder / "model_index.json").read_text()).get("scheduler") or [None, None])[-1]
    except (OSError, ValueError, AttributeError, IndexError, TypeError):
        return None
    return str(listed) if listed else None


def load_scheduler(folder: Path) -> DDIMConfig:
    return DDIMConfig.from_scheduler_config(read_config(folder / "scheduler" / "scheduler_config.json"))


@serialized
def load_text_to_image(folder: str | Path, controlnet: str | Path | Sequence[str | Path] | None = None, *,
                       weights: bool = True) -> TextToImageModel:
    """Load a diffusers Stable Diffusion folder (safetensors only) and the ControlNet folders given (one or a list).

    weights=False builds every module from its config on the meta device: the sizes and specs at
    no cost, for an export to find its cache key before it reads gigabytes of weights."""
    folder = require_text_to_image_folder(folder)
    controlnets = [require_controlnet_dir(c) for c in controlnet_paths(controlnet)]  # before gigabytes load
    check_parts(folder, controlnets)
    tokenizer, scheduler = load_tokenizer(folder / "tokenizer"), load_scheduler(folder)
    check_tokenizer(tokenizer, folder)
    model = TextToImageModel(
        folder=folder, tokenizer=tokenizer, text_encoder=load_text_encoder(folder, weights), unet=load_unet(folder, weights),
        vae=load_vae(folder, weights), scheduler=scheduler, controlnet=load_controlnets(controlnets, weights),
    )
    if len(controlnets) > 1:
        controlnet_residuals(model.controlnet)  # residuals that could not be summed are refused here, not mid-trace
    return model


# --- specs -----------------------------------------------------------------------------------------------


def controlnet_residuals(controlnet) -> list[tuple[int, int]]:
    """(channels, downscale) of each ControlNet residual, down blocks then mid, from its structure:
    conv_in, then per down block `layers_per_block` resnets and a downsampler on all but the last.
    Several ControlNets are summed, so theirs must agree."""
    nets = controlnet_list(controlnet)
    shapes = [_residuals_of(net) for net in nets]
    for i, other in enumerate(shapes[1:], 1):
        if other != shapes[0]:
            raise DiffrtError(f"ControlNet {i} has residuals (channels, downscale) {other}, ControlNet 0 has {shapes[0]}; "
                              "ControlNets used together must be made for the same UNet")
    return shapes[0]


def _residuals_of(controlnet) -> list[tuple[int, int]]:
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


def component_specs(model: TextToImageModel, names: list[str], *, batch: Range, height: Range, width: Range,
                    multiple: int | None = None) -> dict[str, ComponentSpec]:
    """Specs for the named components; `height`/`width` in image pixels.

    `multiple`: what latent sizes must divide by; by default the UNet's `unet_multiple`, which an
    exported graph needs (its skip connections are traced at sizes that halve exactly). Eager
    PyTorch takes 1, any latent size, as diffusers does: its UNet upsamples to each skip's size."""
    h, w = latent_range(height, model, "height"), latent_range(width, model, "width")
    hidden, length = model.text_encoder.config.hidden_size, model.max_length
    unet = model.unet.config
    common = dict(batch=batch, height=h, width=w, max_length=length,
                  multiple=model.unet_multiple if multiple is None else multiple)
    control = dict(vae_factor=model.vae_factor, num_controlnets=model.num_controlnets)
    residuals = controlnet_residuals(model.controlnet) if model.controlnet is not None else []
    guided = dict(guidance_embed_dim=getattr(unet, "time_cond_proj_dim", None))  # LCM-distilled: timestep_cond
    # `batch` is the UNet's: CFG doubles the images there. The VAE takes one row per image, so its range starts at
    # half the smallest (a UNet built for batch 2 only, one image with CFG, decodes that image); the text encoder one
    # row per prompt (twice with CFG), copied per image after, so its starts at 1 (one prompt, several images).
    images, prompts = ((batch[0] + 1) // 2, *batch[1:]), (1, *batch[1:])
    make = {
        "text_encoder": lambda: text_encoder_spec(model.text_encoder.config.vocab_size, hidden, length, prompts,
                                                  num_layers=model.text_encoder.config.num_hidden_layers),
        "unet": lambda: latent_unet_spec(unet.in_channels, unet.out_channels, unet.cross_attention_dim, **guided, **common),
        "unet_controlnet": lambda: unet_controlnet_spec(unet.in_channels, unet.out_channels, unet.cross_attention_dim,
                                                        num_residuals=len(residuals), **control, **guided, **common),
        "controlnet": lambda: controlnet_spec(unet.in_channels, unet.cross_attention_dim, residuals,
                                              pooled=all(global_pool_conditions(model.controlnet)), **control, **common),
        "vae_decoder": lambda: vae_decoder_spec(model.vae.config.latent_channels, batch=images, height=h, width=w,
                                                vae_factor=model.vae_factor, out_channels=model.vae.config.out_channels),
        "vae_encoder": lambda: vae_encoder_spec(model.vae.config.latent_channels, batch=images, height=h, width=w,
                                                vae_factor=model.vae_factor, multiple=common["multiple"],
                                                in_channels=model.vae.config.in_channels),
    }
    return {name: make[name]() for name in names}


def check_unet_config(config: Mapping, where: str = "unet") -> None:
    """Refuse, in one line naming the setting, a UNet that needs an input the pipeline does not feed
    (it runs sample, timestep, encoder_hidden_states, ControlNet residuals and, for a guidance-distilled
    UNet with `time_cond_proj_dim`, the guidance-scale embedding timestep_cond): diffusers' UNet fails
    inside on the others."""
    if config.get("addition_embed_type") is not None:
        raise DiffrtError(f"{where} has addition_embed_type={config['addition_embed_type']!r} (SDXL's 'text_time' needs "
                          "pooled text embeddings and time ids in added_cond_kwargs), which diffrt does not feed; "
                          "use a Stable Diffusion 1.x/2.x UNet")
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise DiffrtError(f"{where} has {key}={config[key]!r}: it needs class_labels (e.g. the x4 upscaler's noise level), "
                              "which diffrt's text-to-image pipeline does not feed; use a UNet without a class embedding")
    if config.get("encoder_hid_dim_type") in ("image_proj", "ip_image_proj", "text_image_proj"):
        raise DiffrtError(f"{where} has encoder_hid_dim_type={config['encoder_hid_dim_type']!r}: it needs image_embeds in "
                          "added_cond_kwargs, which diffrt does not feed; use a UNet without it")
    if config.get("in_channels", 4) != config.get("out_channels", 4):
        raise DiffrtError(f"{where} takes {config['in_channels']} input channels but predicts {config['out_channels']} "
                          "(an inpainting or depth-to-image UNet, whose extra inputs diffrt does not feed); "
                          "use a text-to-image UNet")
