"""Tiny, real diffusers text-to-image components built in code, for tests and demos.

Nothing here downloads anything: the tokenizer's vocabulary, every config and every weight are
made on the spot from a seed, and each function runs in seconds on a CPU. The components are
the real diffusers/transformers classes (CLIPTokenizer, CLIPTextModel, UNet2DConditionModel,
AutoencoderKL, DDIMScheduler, ControlNetModel), only very small, so whatever loads a Stable
Diffusion folder loads these unchanged:

    folder/
      model_index.json    StableDiffusionPipeline (safety checker and feature extractor null)
      text_encoder/       CLIPTextModel: hidden 32, 2 layers, 4 heads
      tokenizer/          CLIPTokenizer: byte-level BPE, 256 bytes + a few merges, 77 tokens
      unet/               UNet2DConditionModel: channels (32, 64), cross-attention dim 32
      vae/                AutoencoderKL: 4 blocks, so latents are 1/8 of the image, like SD
      scheduler/          DDIMScheduler with Stable Diffusion's betas
      controlnet/         only with controlnet=True: a ControlNetModel made from the UNet

`tiny_controlnet` writes further ControlNets for the same UNet (other seeds), for tests that run
several at once.

The weights are random, so images are noise; what tests need is that they are deterministic,
that every code path runs, and that a LoRA or a ControlNet visibly changes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffrt import atomic
from diffrt.errors import DiffrtError

TOKENIZER_MAX_LENGTH = 77  # Stable Diffusion's context, so long-prompt truncation behaves the same
HIDDEN_SIZE = 32  # text encoder width = the UNet's cross-attention dim
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# A few merges of common English letter pairs, so prompts become fewer tokens than bytes and the
# BPE path of the tokenizer is exercised. Every merge result is added to the vocabulary.
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n</w>"), ("a", "t</w>")]

# Modules a LoRA fixture adapts: every attention projection, plus a 1x1 conv (proj_in, since
# use_linear_projection is off), a feed-forward Linear, and a 3x3 resnet conv.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte maps to a printable character. Printable Latin-1
    bytes map to themselves; the rest are shifted above 255 so no byte maps to whitespace or a
    control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(mapping.items()))


def tokenizer_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout in miniature: byte characters, their end-of-word forms, the merge
    results, then the two special tokens (so EOS has the highest id, as in CLIP)."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer(folder: str | Path):
    """Write vocab.json + merges.txt (and the tokenizers-library files) into `folder` and return
    the CLIPTokenizer loaded from it."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    atomic.write_text(folder / "vocab.json", json.dumps(tokenizer_vocab(), ensure_ascii=False))
    atomic.write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=HIDDEN_SIZE,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
    )
    return CLIPTextModel(config).eval()


def _unet(latent_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN_SIZE,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    ).eval()


def _vae(sample_size: int):
    from diffusers import AutoencoderKL

    # Four blocks give three downsamplings: latents are 1/8 of the image, as in Stable Diffusion.
    return AutoencoderKL(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.18215,
    ).eval()


def sd_scheduler():
    """DDIM with Stable Diffusion 1.x's training schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _controlnet(unet, generator: torch.Generator):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32))
    with torch.no_grad():
        # The conditioning embedding is eight convs deep; at PyTorch's default init the image
        # signal fades to nothing on the way through. He init keeps it, so the control image
        # visibly steers the output.
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5, generator=generator)
                conv.bias.zero_()
        # from_unet zero-initialises every output conv, so a fresh ControlNet adds exactly nothing.
        # Randomise them so tests can tell whether it is applied.
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05, generator=generator)
            conv.bias.normal_(0.0, 0.05, generator=generator)
    return controlnet.eval()


def tiny_text_to_image(folder: str | Path, *, seed: int = 0, controlnet: bool = False, sample_size: int = 32) -> Path:
    """Write a Stable Diffusion pipeline folder with tiny random components and return its path.

    `sample_size` is the image side in pixels (a multiple of 16; latents are sample_size // 8).
    With `controlnet=True` a ControlNetModel built from the UNet is written to `folder/controlnet`
    (load it with `ControlNetModel.from_pretrained(folder / "controlnet")`); model_index.json does
    not name it, so StableDiffusionPipeline loads the folder either way.
    """
    from diffusers import StableDiffusionPipeline

    if sample_size % 16:
        raise DiffrtError(
            f"sample_size must be a multiple of 16 (the VAE divides by 8, the UNet by 2), got {sample_size}"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    # Fork the RNG so that building fixtures never moves the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder()
        unet = _unet(sample_size // 8)
        vae = _vae(sample_size)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    if controlnet:
        generator = torch.Generator().manual_seed(seed + 1)
        _controlnet(unet, generator).save_pretrained(folder / "controlnet", safe_serialization=True)
    return folder


def tiny_controlnet(pipeline_folder: str | Path, out_folder: str | Path, *, seed: int) -> Path:
    """Write another ControlNetModel for the UNet of a `tiny_text_to_image` folder and return its folder.

    Made like `controlnet=True`'s, from the UNet, with this seed's conditioning embedding and
    non-zero output convs, so two seeds give two ControlNets whose sum differs from either alone."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(pipeline_folder) / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = _controlnet(unet, torch.Generator().manual_seed(seed))
    controlnet.save_pretrained(out_folder, safe_serialization=True)
    return Path(out_folder)


def _randomise_lora(model, generator: torch.Generator, std_b: float) -> None:
    """Fill every lora_A/lora_B with seeded noise. peft initialises lora_B to zero, which would
    make the adapter a no-op and hide any bug that drops it."""
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                param.normal_(0.0, 1.0 / param.shape[0], generator=generator)
            elif ".lora_B." in name:
                param.normal_(0.0, std_b, generator=generator)


def _kohya_state(unet, text_encoder, generator: torch.Generator, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A kohya/A1111 LoRA: `lora_unet_<module path with '_' for '.'>.lora_down.weight`, `.lora_up.weight`
    and `.alpha`, as sd-scripts writes them (conv LoRAs keep the kernel in lora_down, 1x1 in lora_up)."""
    state: dict[str, torch.Tensor] = {}
    parts = (("lora_unet", unet, UNET_LORA_TARGETS), ("lora_te", text_encoder, TEXT_ENCODER_LORA_TARGETS))
    for prefix, model, targets in parts:
        for name, module in model.named_modules():
            if not any(name == t or name.endswith("." + t) for t in targets):
                continue
            key = f"{prefix}_{name.replace('.', '_')}"
            if isinstance(module, torch.nn.Conv2d):
                down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator)
                up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
            else:
                down = torch.randn(rank, module.in_features, generator=generator)
                up = torch.randn(module.out_features, rank, generator=generator)
            state[f"{key}.lora_down.weight"] = down / module.weight[0].numel() ** 0.5
            state[f"{key}.lora_up.weight"] = up * 0.05
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state


def tiny_lora_files(pipeline_folder: str | Path, out_folder: str | Path, *, seed: int) -> dict[str, Path]:
    """Write LoRA fixtures for the UNet and text encoder of a `tiny_text_to_image` folder.

    Returns paths by format:
      "peft":     `pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights` writes it
                  (`unet.<module>.lora_A.weight` / `lora_B.weight`, text_encoder too), with the
                  LoraConfig in the file's metadata (rank 4, alpha 8: scaling 2);
      "diffusers": the same adapters in the `lora.down` / `lora_linear_layer.down` naming that
                  diffusers' training scripts write, with no metadata (so alpha = rank);
      "kohya":    `lora_unet_...` / `lora_te_...` keys with `.lora_down`, `.lora_up` and `.alpha`
                  (rank 4, alpha 2: scaling 0.5), covering attention, 1x1 conv, Linear and 3x3 conv.
    Each file is different for a different seed, and every lora_B / lora_up is non-zero.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    pipeline_folder, out_folder = Path(pipeline_folder), Path(out_folder)
    (out_folder / "diffusers").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_folder / "unet")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_folder / "text_encoder")

    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_LORA_TARGETS, init_lora_weights="gaussian")
    te_config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_ENCODER_LORA_TARGETS, init_lora_weights="gaussian")
    unet.add_adapter(unet_config)
    text_encoder.add_adapter(te_config)
    _randomise_lora(unet, generator, std_b=0.05)
    _randomise_lora(text_encoder, generator, std_b=0.05)
    unet_layers = get_peft_model_state_dict(unet)
    te_layers = get_peft_model_state_dict(text_encoder)

    StableDiffusionPipeline.save_lora_weights(
        out_folder,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
        safe_serialization=True,
    )
    StableDiffusionPipeline.save_lora_weights(
        out_folder / "diffusers",
        unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_layers),
        safe_serialization=True,
    )

    unet = UNet2DConditionModel.from_pretrained(pipeline_folder / "unet")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_folder / "text_encoder")
    kohya = _kohya_state(unet, text_encoder, generator, rank=4, alpha=2.0)
    kohya_metadata = {"ss_network_dim": "4", "ss_network_alpha": "2"}  # what sd-scripts records
    atomic.save_safetensors(out_folder / "kohya_lora.safetensors", kohya, metadata=kohya_metadata)
    return {
        "peft": out_folder / "pytorch_lora_weights.safetensors",
        "diffusers": out_folder / "diffusers" / "pytorch_lora_weights.safetensors",
        "kohya": out_folder / "kohya_lora.safetensors",
    }
