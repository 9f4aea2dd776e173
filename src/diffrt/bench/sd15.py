"""Stable Diffusion 1.5-sized components with random weights, for the GPU benchmark.

Latency does not depend on the weight values, so the GPU configurations build SD-1.5's
architecture from its published configs (written out below, nothing is downloaded) and fill it
with seeded random weights. The folder is a regular diffusers Stable Diffusion folder plus
`controlnet/`, so every backend loads it through the same code as a real model.

The tokenizer is diffrt.tiny's byte-level BPE (CLIP's real vocabulary would be a download). The
text encoder keeps SD-1.5's 49408-token embedding and 77-token context, so it costs what
SD-1.5's costs; prompts only ever produce ids the tiny vocabulary knows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# runwayml/stable-diffusion-v1-5, unet/config.json (values that differ from diffusers' defaults or matter for cost)
UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

# lllyasviel/sd-controlnet-canny, config.json: the UNet's encoder half + the conditioning embedding
CONTROLNET = {
    "in_channels": 4,
    "down_block_types": UNET["down_block_types"],
    "block_out_channels": UNET["block_out_channels"],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
}

# runwayml/stable-diffusion-v1-5, vae/config.json
VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

# openai/clip-vit-large-patch14's text tower, as SD-1.5's text_encoder/config.json has it
TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


def _noise_zero_convs(controlnet, generator: torch.Generator) -> None:
    """diffusers zero-initialises a ControlNet's output convolutions, so a fresh one adds exactly
    nothing to the UNet: an engine that dropped the ControlNet would match eager bit for bit. Seeded
    noise (as diffrt.tiny's ControlNet has) makes its residuals count, so the output comparison sees it."""
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05, generator=generator)
            conv.bias.normal_(0.0, 0.05, generator=generator)


def build_sd15_folder(folder: str | Path, *, seed: int = 0, device: str | torch.device = "cpu") -> Path:
    """Write an SD-1.5-sized pipeline folder with `controlnet/` beside it, once; an existing one is reused.

    Weights are initialised on `device` (fast on a GPU), seeded, and saved in fp32 (~5.7 GB), the
    dtype diffrt's loaders and exporter expect of a source folder: an fp16 folder loads as fp16
    modules, and an fp32 ONNX export of those mixes fp16 weights with fp32 inputs."""
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffrt.tiny import BOS_TOKEN, EOS_TOKEN, sd_scheduler, tiny_tokenizer, tokenizer_vocab

    folder = Path(folder)
    if (folder / "model_index.json").is_file() and (folder / "controlnet" / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = tokenizer_vocab()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN],
                                                    pad_token_id=vocab[EOS_TOKEN]))
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        controlnet = ControlNetModel(**CONTROLNET)
        _noise_zero_convs(controlnet, torch.Generator(device).manual_seed(seed + 1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(tmp / "tokenizer"), unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # the folder appears complete or not at all
    return folder
