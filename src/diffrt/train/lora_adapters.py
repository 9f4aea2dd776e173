"""LoRA adapters through peft on a diffusers model: attached to the named layers, and saved as the
`pytorch_lora_weights.safetensors` that diffusers' `load_lora_weights` reads unchanged."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from diffrt import atomic
from diffrt.errors import DiffrtError

log = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def check_targets(model: nn.Module, targets, what: str, flag: str) -> None:
    """Refuse target module names of which none matches a module of `model` (peft would say so only once it is
    called); where some match, name the others in a warning, as peft skips them: diffusers' own list for SDXL-style
    UNets (add_k_proj, add_v_proj) then trains SD-1.5's attention, as its script does."""
    names = [n for n, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown and len(unknown) == len(targets):
        raise DiffrtError(f"{flag}: {', '.join(unknown)} match no module of the {what}; "
                          f"use names of its Linear/Conv layers, e.g. {', '.join(UNET_TARGETS if what == 'UNet' else TEXT_ENCODER_TARGETS)}")
    if unknown:
        log.warning("%s: %s match no module of the %s and are left out; LoRA goes on %s", flag, ", ".join(unknown), what,
                    ", ".join(t for t in targets if t not in unknown))


def add_lora(model: nn.Module, rank: int, alpha: float | None, targets, seed: int, dropout: float = 0.0):
    """Attach a LoRA adapter through peft; the adapter trains in fp32 whatever the base dtype."""
    from peft import LoraConfig

    lora_config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                             target_modules=list(targets), lora_dropout=dropout)
    from diffrt.train.loop import seeded_global_rng

    # peft draws the adapter's initial weights from the global generators (the CPU's: it makes the layers there and
    # moves them to the base layer's device after; the device's is seeded too, should a peft initialise in place).
    with seeded_global_rng(seed, next(model.parameters()).device):
        try:
            model.add_adapter(lora_config)
        except ValueError as exc:
            raise DiffrtError(f"cannot add LoRA to {', '.join(targets)}: {exc}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return lora_config


def adapter_metadata(config) -> dict:
    """A peft LoraConfig as the file's metadata records it, its sets (target_modules) sorted: in a set's own
    order, which follows the process's string hash seed, two runs of one seed wrote different bytes."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}


def save_lora(out: Path, unet: nn.Module, unet_config, text_encoder: nn.Module | None = None, te_config=None) -> Path:
    """Write out/pytorch_lora_weights.safetensors in diffusers' format, atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def diffusers_names(model: nn.Module) -> dict[str, torch.Tensor]:
        peft_layers = get_peft_model_state_dict(model)
        converted = convert_state_dict_to_diffusers(peft_layers)
        # diffusers renames only the attention projections (to_q -> to_q.lora.down, ...), and its
        # UNet loader picks the key conversion from the first key: a file that mixes both namings
        # would silently lose half its layers. Keep peft's names when some module has no other.
        return peft_layers if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted

    def text_encoder_names(model: nn.Module) -> dict[str, torch.Tensor]:
        # diffusers' text-encoder loader tells the format by a `lora_linear_layer` key, and its own renaming covers the
        # attention projections only: an adapter on the MLP alone (fc1, fc2) kept peft's names and could not be
        # loaded. Every layer named so, which diffusers maps back for any module (and diffrt reads).
        return {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                for k, v in get_peft_model_state_dict(model).items()}

    unet_layers = diffusers_names(unet)
    te_layers = text_encoder_names(text_encoder) if text_encoder is not None else None
    out.mkdir(parents=True, exist_ok=True)
    tmp = atomic.make_temp_dir(out, ".lora-")
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=adapter_metadata(unet_config),
            text_encoder_lora_adapter_metadata=adapter_metadata(te_config) if te_config is not None else None,
            safe_serialization=True,
        )
        # The file appears whole or not at all (a reader never sees a half-written LoRA), and as the same bytes
        # for the same weights (safetensors orders its metadata afresh in every file).
        atomic.copy_with_sorted_header(tmp / LORA_WEIGHT_NAME, out / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / LORA_WEIGHT_NAME
