"""Read LoRA files and fuse them into base weights.

A LoRA adds a low-rank update to a Linear or Conv2d weight (Hu et al. 2021, eq. 3):

    W' = W + dW,   dW = scale * (alpha / rank) * up @ down       down: [rank, in(, kh, kw)], up: [out, rank(, 1, 1)]

For a kxk convolution `down` holds the kernel and `up` is 1x1, so `up @ down` is taken over the
flattened `in * kh * kw` axis: the same weight peft's conv LoRA merges. `alpha / rank` becomes
`alpha / sqrt(rank)` for rsLoRA adapters.

DoRA (Liu et al. 2024, eq. 5) also learns a magnitude m, one per output channel (peft's
`lora_magnitude_vector`), and gives each output row of the updated weight that length:

    W' = m * (W + dW) / ||W + dW||        the norm over a row: a Linear's in-features, a conv's in * kh * kw

The scale sits inside dW, as in diffusers' `fuse_lora(lora_scale=s)` (peft multiplies `scaling`), so
a DoRA weight is not linear in the scale, and scale 0 gives m * W / ||W||, not W. Adapters are merged
one after another as peft (0.21) merges them: a DoRA adapter k multiplies the weight so far plus its
dW_k by m_k / ||W0 + dW_k||, the norm of the base weight W0 with its own update only
(`_unmerged_base_weight`), the norm peft's forward uses. A peft `lora_B.bias` (`lora_bias=True`) adds
scale * (alpha / rank) * bias to the module's bias, DoRA or not.

Two file layouts are read, safetensors only (pickles can run code when loaded):
- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (what `save_lora_weights`
  writes), with `.lora_magnitude_vector` (DoRA) and `.lora_B.bias` where the adapter has them, and
  diffusers' older `.lora.down` / `.lora_linear_layer.down` / `.to_q_lora.down` names. The adapter's
  LoraConfig may sit in the file's metadata (`lora_adapter_metadata`, keyed `unet.r`, ..., or
  unprefixed like the keys of one model's `save_lora_adapter`); its `lora_alpha`, `rank_pattern`,
  `alpha_pattern` and `use_rslora` then set each module's scaling, as diffusers does, and its
  `use_dora` must agree with the magnitudes the file holds. Without it alpha = rank (scaling 1).
- kohya/A1111: `lora_unet_<module path, '.' written as '_'>.lora_down.weight`, `.lora_up.weight`,
  `.alpha` (`lora_te_` / `lora_te1_` / `lora_te2_` for text encoders). A missing alpha means rank.

Refused by name: kohya/LyCORIS DoRA (`dora_scale`), which diffusers' Stable Diffusion loader drops
with a warning and fuses as a plain LoRA, so neither fusing it nor dropping it would match both
diffusers and what was trained; LyCORIS LoHa, LoKr and Tucker cores, full weight differences,
embedding LoRA, and a DoRA module with a lora_B.bias (peft refuses that LoraConfig).
Where diffrt differs from diffusers on purpose: diffusers 0.42 with transformers 5 loads a text
encoder's LoRA through transformers, which leaves DoRA magnitudes at peft's initial ||W|| (it reports
the keys UNEXPECTED); diffrt fuses the file's magnitudes, as peft merges them in the UNet.

Module names are resolved against the model itself, never by rewriting strings alone: a kohya
name is looked up among the model's own module names with '.' replaced by '_'. Every entry of a
file must land on a module or the fuse fails naming what did not (RELIABILITY row 7), a file that
would change nothing (alpha 0, only zero updates) is refused, and fusing always starts from the
base weights given, so refits never accumulate (row 8).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import torch
from torch import nn

from diffrt.atomic import sha256_file
from diffrt.errors import LoraError

logger = logging.getLogger(__name__)

LoraFormat = Literal["peft", "diffusers", "kohya"]
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfig
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "controlnet", "transformer")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Dotted suffixes, longest first. "_lora.down" is diffusers' attention-processor format
# (`attn1.processor.to_q_lora.down.weight`), whose module is `to_q` or `q_proj` depending on the model.
DOTTED_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    ("_lora.down.weight", "down", "diffusers-processor"),
    ("_lora.up.weight", "up", "diffusers-processor"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".lora_B.bias", "bias", "peft"),
    # peft's get_peft_model_state_dict drops the magnitude's ".weight"; older files keep it.
    (".lora_magnitude_vector.weight", "magnitude", "peft"),
    (".lora_magnitude_vector", "magnitude", "peft"),
    (".alpha", "alpha", "peft"),
)
UNSUPPORTED_HINTS = {
    "dora_scale": "kohya/LyCORIS DoRA, whose dora_scale diffusers drops with a warning, fusing a plain LoRA: "
                  "re-save it as a peft DoRA (lora_magnitude_vector) or without DoRA",
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS LoCon with a Tucker core (lora_mid)",
    ".diff": "full weight differences",
    "lora_embedding_": "embedding LoRA",
}
LDM_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update, as named in the file."""

    component: str  # "unet", "text_encoder", ...
    module: str  # dotted module path, or the underscored kohya name when `underscored`
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None  # None: alpha = rank
    key: str  # the file key of `down`, for messages
    underscored: bool = False
    aliases: tuple[str, ...] = ()  # other dotted names the same module may have (old diffusers format)
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: peft's lora_magnitude_vector, one length per output channel, [out]
    bias: torch.Tensor | None = None  # peft's lora_B.bias (lora_bias=True), [out]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class LoraFile:
    path: Path
    sha256: str
    format: LoraFormat
    layers: list[LoraLayer]

    @property
    def components(self) -> list[str]:
        return sorted({layer.component for layer in self.layers})


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA named on the command line as `FILE[:SCALE]`."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        head, sep, tail = text.rpartition(":")
        # A colon followed by a path separator belongs to the path (C:\loras\a.safetensors).
        if not sep or "/" in tail or "\\" in tail:
            return cls(Path(text))
        try:
            scale = float(tail)
        except ValueError:
            raise LoraError(
                f"bad LoRA scale {tail!r} in {text!r}: write FILE or FILE:SCALE with a number, e.g. style.safetensors:0.8"
            ) from None
        if not math.isfinite(scale):
            raise LoraError(f"LoRA scale in {text!r} must be a finite number, got {tail!r}")
        if not head:
            raise LoraError(f"no LoRA file in {text!r}: write FILE or FILE:SCALE")
        return cls(Path(head), scale)

    def read(self) -> tuple[LoraFile, float]:
        return read_lora(self.path), self.scale


def read_loras(specs: Iterable[LoraSpec | str]) -> list[tuple[LoraFile, float]]:
    """Read `FILE[:SCALE]` specs (strings or LoraSpec) into (file, scale) pairs for `fuse_loras`."""
    return [(spec if isinstance(spec, LoraSpec) else LoraSpec.parse(spec)).read() for spec in specs]


# --- reading -------------------------------------------------------------------------------------


def _locate(path: Path) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        # Refused by name, before the file is opened: unpickling can execute arbitrary code.
        raise LoraError(
            f"{path} is a pickle ({path.suffix}) file; diffrt reads LoRA weights only from .safetensors, "
            "because loading a pickle can run code: convert it to safetensors with a tool you trust"
        )
    if path.is_dir():
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return path / DEFAULT_WEIGHT_NAME
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraError(f"folder {path} holds {len(found)} .safetensors files, expected one: name the LoRA file itself")
        return found[0]
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    return path


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise LoraError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); LoRA files must be safetensors"
        ) from None
    if not tensors:
        raise LoraError(f"{path} holds no tensors; expected LoRA weights")
    return tensors, metadata


def _split_kohya(key: str) -> tuple[str, str, str] | None:
    name, _, suffix = key.partition(".")
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix) and suffix in KOHYA_SUFFIXES:
            return component, name[len(prefix) :], KOHYA_SUFFIXES[suffix]
    return None


def _split_dotted(key: str) -> tuple[str, str, str, str] | None:
    for suffix, role, style in DOTTED_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        return None
    first, _, rest = module.partition(".")
    # Un-prefixed keys are the oldest diffusers format, which held only the UNet.
    component, module = (first, rest) if first in COMPONENTS and rest else ("unet", module)
    module = module.replace(".processor.", ".")
    return component, module, role, style


def _processor_aliases(module: str) -> tuple[str, tuple[str, ...]]:
    """`attn1.to_q` (old attention-processor naming) is `to_q` in a UNet and `q_proj` in CLIP;
    `to_out` is `to_out.0` or `out_proj`. Return the first guess and the alternatives; the model
    decides which exists."""
    parent, _, leaf = module.rpartition(".")
    join = (lambda name: f"{parent}.{name}") if parent else (lambda name: name)
    if leaf == "to_out":
        return join("to_out.0"), (join("out_proj"),)
    if leaf in ("to_q", "to_k", "to_v"):
        return module, (join(f"{leaf[-1]}_proj"),)
    return module, ()


def _component_configs(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"{path}: the {METADATA_KEY} metadata is not valid JSON ({e}); re-save the LoRA") from None
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component not in COMPONENTS or not name:
            # One model's `save_lora_adapter` writes its LoraConfig unprefixed, like its keys, which
            # are the UNet's (_split_dotted): dropping it would fuse at alpha = rank, not lora_alpha.
            component, name = "unet", key
        configs[component][name] = value
    return dict(configs)


def _pattern_value(patterns: Mapping[str, float] | None, module: str, default):
    """peft's rank_pattern / alpha_pattern rule: the first pattern that matches the end of the
    module name at a '.' boundary wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _raise_unrecognised(path: Path, keys: list[str]) -> None:
    kinds = sorted({kind for key in keys for marker, kind in UNSUPPORTED_HINTS.items() if marker in key})
    what = f" ({'; '.join(kinds)}: not supported)" if kinds else ""
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    raise LoraError(f"{path}: {len(keys)} keys are not LoRA weights diffrt can read{what}: {shown}")


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA safetensors file (or a folder holding `pytorch_lora_weights.safetensors`)."""
    path = _locate(Path(path))
    tensors, metadata = _load_safetensors(path)
    configs = _component_configs(metadata, path)

    # 1. Group keys into (component, module) entries holding down, up and alpha.
    entries: dict[tuple[str, str], dict] = {}
    unrecognised: list[str] = []
    styles: set[str] = set()
    for key in sorted(tensors):
        parsed = _split_kohya(key)
        if parsed is not None:
            component, module, role = parsed
            style = "kohya"
        elif key.startswith(tuple(KOHYA_PREFIXES)) or (parsed := _split_dotted(key)) is None:
            unrecognised.append(key)
            continue
        else:
            component, module, role, style = parsed
        styles.add("kohya" if style == "kohya" else "dotted")
        entry = entries.setdefault((component, module), {"style": style, "keys": {}})
        if role in entry["keys"]:  # two namings of one module (`to_q.lora_A` and `to_q.lora.down`): one would be dropped
            raise LoraError(
                f"{path}: keys {entry['keys'][role]} and {key} are both the {role} weight of {component}.{module}; keep one of them"
            )
        entry[role] = tensors[key]
        entry["keys"][role] = key
        if style != "peft":
            entry["style"] = style
    if unrecognised:
        _raise_unrecognised(path, unrecognised)
    if styles == {"kohya", "dotted"}:
        raise LoraError(f"{path} mixes kohya (lora_unet_...) and diffusers (unet....lora_A) keys; save it in one format")

    # 2. Check pairs and work out each module's scaling.
    layers = []
    for (component, module), entry in entries.items():
        if "down" not in entry or "up" not in entry:
            missing = "down/lora_A" if "down" not in entry else "up/lora_B"
            raise LoraError(f"{path}: module {component}.{module} has no {missing} weight; the file is incomplete")
        down, up = entry["down"], entry["up"]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{path}: {entry['keys']['down']} has shape {tuple(down.shape)} and its up weight {tuple(up.shape)}; "
                "expected down [rank, in, ...] and up [out, rank, ...]"
            )
        magnitude, bias = _extras(path, component, module, entry, up.shape[0])
        alpha = float(entry["alpha"]) if "alpha" in entry else None
        use_rslora = False
        config = configs.get(component)
        if config is not None and entry["style"] != "kohya" and bool(config.get("use_dora")) != (magnitude is not None):
            # diffusers builds the adapter from the metadata: a DoRA config without magnitudes keeps peft's initial
            # ||W||, and magnitudes without one are dropped with a warning. Neither is the adapter that was saved.
            found = "no lora_magnitude_vector" if magnitude is None else f"magnitude {entry['keys']['magnitude']}"
            raise LoraError(f"{path}: its {METADATA_KEY} gives {component} use_dora={bool(config.get('use_dora'))} but "
                            f"{component}.{module} has {found}; re-save the LoRA with the LoraConfig it was trained with")
        if config is not None and alpha is None and entry["style"] != "kohya":
            rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", down.shape[0]))
            if rank != down.shape[0]:
                raise LoraError(f"{path}: metadata gives {component}.{module} rank {rank} but its weights have rank {down.shape[0]}")
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank)))
            use_rslora = bool(config.get("use_rslora", False))
        if alpha == 0:
            # diffusers (and A1111) fuse alpha 0 as a zero update, kohya's sd-scripts reads it as alpha = rank.
            source = entry["keys"].get("alpha", f"the {METADATA_KEY} of {component}.{module}")
            raise LoraError(
                f"{path}: {source} gives alpha 0, which diffusers fuses as no change and sd-scripts reads as "
                "alpha = rank; re-save the LoRA with the alpha it was trained with"
            )
        aliases: tuple[str, ...] = ()
        if entry["style"] == "diffusers-processor":
            module, aliases = _processor_aliases(module)
        layers.append(
            LoraLayer(
                component=component,
                module=module,
                down=down,
                up=up,
                alpha=alpha,
                key=entry["keys"]["down"],
                underscored=entry["style"] == "kohya",
                aliases=aliases,
                use_rslora=use_rslora,
                magnitude=magnitude,
                bias=bias,
            )
        )

    if not any(_changes_weights(layer) for layer in layers):
        # peft initialises lora_B to zero: an adapter saved before training fuses as no change at all.
        raise LoraError(f"{path}: every LoRA update in it is zero (all-zero up or down weights), so it would change nothing; "
                        "was it saved before training?")

    styles_seen = {entry["style"] for entry in entries.values()}
    fmt: LoraFormat = "kohya" if styles_seen == {"kohya"} else "peft" if styles_seen == {"peft"} else "diffusers"
    return LoraFile(path=path, sha256=sha256_file(path), format=fmt, layers=layers)


def _extras(path: Path, component: str, module: str, entry: dict, out: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A module's DoRA magnitude and lora_B.bias, flattened to [out] (peft stores a conv's magnitude as [1, out, 1, 1])."""
    found = {}
    for role in ("magnitude", "bias"):
        if role in entry:
            value = entry[role]
            if value.numel() != out:
                raise LoraError(f"{path}: {entry['keys'][role]} has shape {tuple(value.shape)} but its module has {out} output "
                                "channels; expected one value per output channel")
            found[role] = value.reshape(out)
    if len(found) == 2:
        raise LoraError(f"{path}: {component}.{module} has both a DoRA magnitude and a lora_B.bias, which peft refuses "
                        "(LoraConfig(use_dora=True, lora_bias=True)), so diffusers cannot load it; re-save it without one")
    return found.get("magnitude"), found.get("bias")


def _changes_weights(layer: LoraLayer) -> bool:
    """False only where the layer is sure to change nothing. A DoRA layer always may: its magnitude
    rescales the weight even where up @ down is zero."""
    has_update = bool(layer.up.any() and layer.down.any())
    return has_update or layer.magnitude is not None or (layer.bias is not None and bool(layer.bias.any()))


# --- resolving module names ----------------------------------------------------------------------


class _ModuleIndex:
    """The LoRA-able weights of one component, findable by dotted or underscored name.

    transformers 5 dropped CLIPTextModel's `text_model.` level while LoRA files still carry it
    (diffusers strips it too), so names are also registered with that level added or removed
    when the model lacks it."""

    def __init__(self, component: str, weights: Mapping[str, torch.Tensor]):
        self.dotted: dict[str, str] = {name: name for name in weights}
        if component.startswith("text_encoder"):
            for name in weights:
                alias = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
                self.dotted.setdefault(alias, name)
        self.underscored: dict[str, set[str]] = defaultdict(set)
        for alias, name in self.dotted.items():
            self.underscored[alias.replace(".", "_")].add(name)

    def find(self, layer: LoraLayer) -> str | None:
        if layer.underscored:
            names = self.underscored.get(layer.module, set())
            if len(names) > 1:
                raise LoraError(
                    f"LoRA key {layer.key} matches several modules ({', '.join(sorted(names))}); rename it with dots"
                )
            return next(iter(names), None)
        for candidate in (layer.module, *layer.aliases):
            if candidate in self.dotted:
                return self.dotted[candidate]
        return None


def _module_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights and biases of the modules a LoRA can patch, by module name."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return ({name: m.weight for name, m in modules.items()},
            {name: m.bias for name, m in modules.items() if m.bias is not None})


def _state_weights(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same from a state dict: every 2-D or 4-D `<module>.weight`, and the `<module>.bias` beside it."""
    weights = {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight") and v.ndim in (2, 4)}
    return weights, {name: state[f"{name}.bias"] for name in weights if f"{name}.bias" in state}


def _check_fits(layer: LoraLayer, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes only: `layer` can patch the module `name` with this weight and bias."""
    down, up = layer.down, layer.up
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise LoraError(f"LoRA key {layer.key}: its up weight has a {tuple(up.shape[2:])} kernel; only 1x1 up convolutions are supported")
    fits = (up.shape[0], math.prod(down.shape[1:])) == (weight.shape[0], math.prod(weight.shape[1:]))
    if not fits or (weight.ndim == 2 and down.ndim == 4 and down.shape[2:] != (1, 1)):
        raise LoraError(
            f"LoRA key {layer.key} gives an update of shape {(up.shape[0], *down.shape[1:])} for a weight of shape "
            f"{tuple(weight.shape)}; the LoRA was made for another model"
        )
    if layer.bias is not None and bias is None:
        raise LoraError(f"LoRA key {layer.key}: its lora_B.bias adds to the bias of {name}, which has none; "
                        "peft cannot merge it either (lora_bias=True needs a layer with a bias)")


def _delta(layer: LoraLayer, shape: torch.Size, scaling: float) -> torch.Tensor:
    """scaling * up @ down in fp32 (on the LoRA's device), shaped like the weight."""
    rank = layer.rank
    product = layer.up.float().reshape(-1, rank) @ layer.down.float().reshape(rank, -1)
    return product.reshape(shape) * scaling


Updates = list[tuple[LoraLayer, float]]  # the layers patching one module, in LoRA order, each with its LoRA's scale
Plan = dict[str, dict[str, Updates]]  # component -> module name -> its updates


def _additive_delta(base: torch.Tensor, updates: Updates) -> torch.Tensor | None:
    """fused - base (fp32) where every layer is plain LoRA: the sum of their deltas, whatever the base
    holds (only its shape is read). None where a DoRA layer makes the result depend on the base."""
    if any(layer.magnitude is not None for layer, _ in updates):
        return None
    deltas = [_delta(layer, base.shape, layer.scaling * scale) for layer, scale in updates]
    return sum(deltas[1:], deltas[0])


def _dora_weight(base: torch.Tensor, updates: Updates) -> torch.Tensor:
    """The fused weight (fp32, on the base's device) where some layer is DoRA, merged as peft merges
    adapters in turn: W_k = W_{k-1} + dW_k, then times m_k / ||W0 + dW_k|| per output row for DoRA."""
    base32 = base.detach().float()
    weight = base32
    for layer, scale in updates:
        delta = _delta(layer, base.shape, layer.scaling * scale).to(base.device)
        weight = weight + delta
        if layer.magnitude is not None:
            # The norm is of the base with this adapter's update only (peft takes the earlier adapters out
            # before it measures), the norm DoRA's forward divides by; detached there, a constant here.
            norm = torch.linalg.vector_norm((base32 + delta).reshape(base.shape[0], -1), dim=1)
            factor = layer.magnitude.float().to(base.device) / norm
            weight = weight * factor.reshape(-1, *[1] * (base.ndim - 1))
    return weight


def _bias_delta(updates: Updates) -> torch.Tensor | None:
    """What the layers' lora_B.bias add to the module's bias (fp32): scale * scaling * bias each, as
    peft's merge adds it (outside the DoRA rescaling)."""
    parts = [layer.bias.float() * (layer.scaling * scale) for layer, scale in updates if layer.bias is not None]
    return sum(parts[1:], parts[0]) if parts else None


# --- fusing --------------------------------------------------------------------------------------


@dataclass
class FusedLora:
    """What one LoRA changed."""

    path: str
    sha256: str
    format: LoraFormat
    scale: float
    modules: dict[str, list[str]] = field(default_factory=dict)  # component -> patched module names

    @property
    def num_modules(self) -> int:
        return sum(len(names) for names in self.modules.values())


@dataclass
class FuseReport:
    loras: list[FusedLora]

    def to_dict(self) -> dict:
        return {
            "loras": [
                {
                    "path": fused.path,
                    "sha256": fused.sha256,
                    "format": fused.format,
                    "scale": fused.scale,
                    "modules": fused.modules,
                    "num_modules": fused.num_modules,
                }
                for fused in self.loras
            ]
        }


def _plan(
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    biases: Mapping[str, Mapping[str, torch.Tensor]],
    loras: Sequence[tuple[LoraFile, float]],
) -> tuple[Plan, FuseReport]:
    """Resolve every layer of every LoRA to its module and check that it fits (names and shapes
    only). Raises before anything is changed if any layer does not fit."""
    indexes = {component: _ModuleIndex(component, w) for component, w in weights.items()}
    plan: Plan = defaultdict(dict)
    report = FuseReport([])
    for lora, scale in loras:
        unmatched: list[str] = []
        resolved: list[tuple[LoraLayer, str, str]] = []
        for layer in lora.layers:
            index = indexes.get(layer.component)
            name = index.find(layer) if index is not None else None
            if name is None:
                unmatched.append(layer.key)
            else:
                resolved.append((layer, layer.component, name))
        if unmatched:
            _raise_unmatched(lora, unmatched, sorted(weights))
        fused = FusedLora(str(lora.path), lora.sha256, lora.format, scale)
        seen: dict[tuple[str, str], str] = {}
        for layer, component, name in resolved:
            if (component, name) in seen:
                raise LoraError(f"{lora.path}: keys {seen[component, name]} and {layer.key} both patch {component}.{name}")
            seen[component, name] = layer.key
            _check_fits(layer, f"{component}.{name}", weights[component][name], biases.get(component, {}).get(name))
            plan[component].setdefault(name, []).append((layer, scale))
            fused.modules.setdefault(component, []).append(name)
        for names in fused.modules.values():
            names.sort()
        report.loras.append(fused)
    return dict(plan), report


def _raise_unmatched(lora: LoraFile, unmatched: list[str], components: list[str]) -> None:
    shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
    total = len(lora.layers)
    if len(unmatched) == total:
        what = f"none of its {total} LoRA modules matches a Linear/Conv2d module of the model"
    else:
        what = f"{len(unmatched)} of its {total} LoRA modules match no Linear/Conv2d module of the model"
    hint = "is it made for another model?"
    if any(block in key for key in unmatched for block in LDM_BLOCK_NAMES):
        hint = "these use the original LDM block names (input_blocks, ...): convert the LoRA to diffusers names first"
    missing = sorted({layer.component for layer in lora.layers} - set(components))
    if missing:
        hint = f"it has {', '.join(missing)} weights but only {', '.join(components)} were given to fuse into"
    raise LoraError(f"{lora.path}: {what} ({shown}); {hint}")


def _new_values(weights: Mapping[str, Mapping[str, torch.Tensor]], biases: Mapping[str, Mapping[str, torch.Tensor]],
                plan: Plan, *, as_deltas: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {param: value}} for every parameter `plan` changes, in fp32: the fused value, or
    fused - base when `as_deltas`. Plain-LoRA weights are base + the summed deltas, so their delta is exact."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, modules in plan.items():
        params = out.setdefault(component, {})
        for module, updates in modules.items():
            base = weights[component][module]
            delta = _additive_delta(base, updates)
            if delta is None:
                fused = _dora_weight(base, updates)
                params[f"{module}.weight"] = fused - base.detach().float() if as_deltas else fused
            else:
                params[f"{module}.weight"] = delta if as_deltas else base.detach().float() + delta.to(base.device)
            bias_delta = _bias_delta(updates)
            if bias_delta is not None:
                bias = biases[component][module]
                params[f"{module}.bias"] = bias_delta if as_deltas else bias.detach().float() + bias_delta.to(bias.device)
    return out


def _planned(base_state: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]]):
    """The weights and biases of `base_state` by module name, and the plan of `loras` over them."""
    split = {component: _state_weights(state) for component, state in base_state.items()}
    weights = {component: w for component, (w, _) in split.items()}
    biases = {component: b for component, (_, b) in split.items()}
    plan, _ = _plan(weights, biases, loras)
    return weights, biases, plan


def lora_targets(
    base_state: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]]
) -> dict[str, list[str]]:
    """The parameters `loras` change, {component: [param names]}: each patched module's weight, and
    its bias where a layer has a lora_B.bias. Reads names and shapes only; raises LoraError if any
    layer does not fit."""
    _, _, plan = _planned(base_state, loras)
    targets = {}
    for component, modules in plan.items():
        biased = [f"{module}.bias" for module, updates in modules.items() if any(x.bias is not None for x, _ in updates)]
        targets[component] = sorted([f"{module}.weight" for module in modules] + biased)
    return targets


def lora_deltas(
    base_state: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]]
) -> dict[str, dict[str, torch.Tensor]]:
    """fused - base in fp32 for every parameter `loras` change at their scales: {component: {param: delta}}.

    `base_state` maps component names ("unet", "text_encoder") to state dicts. A plain LoRA's delta
    is scale * scaling * up @ down whatever the base holds; a DoRA layer's depends on the base values,
    so it is not linear in the scale and holds only for this base: fuse with `fused_params` instead."""
    weights, biases, plan = _planned(base_state, loras)
    return _new_values(weights, biases, plan, as_deltas=True)


def fused_params(
    base_state: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The fp32 values, computed from `base_state`, of every parameter `loras` change at their scales."""
    weights, biases, plan = _planned(base_state, loras)
    return _new_values(weights, biases, plan, as_deltas=False)


def fused_state_dict(
    base_state: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]]
) -> dict[str, dict[str, torch.Tensor]]:
    """New state dicts: the LoRAs fused into the base in fp32 and cast back to each tensor's dtype.

    Always computed from the base given, never from a previous result, so refitting an engine
    with A, then B, then A again gives exactly A. Unpatched tensors are shared with `base_state`,
    which is not modified."""
    fused = fused_params(base_state, loras)
    out = {}
    for component, state in base_state.items():
        out[component] = dict(state)
        for param, value in fused.get(component, {}).items():
            out[component][param] = value.to(state[param].dtype)
    return out


@torch.no_grad()
def fuse_loras(model_components: Mapping[str, nn.Module], loras: Sequence[tuple[LoraFile, float]]) -> FuseReport:
    """Fuse each LoRA, at its scale, into the weights of `model_components` in place.

    Matches diffusers' `load_lora_weights` + `set_adapters(names, weights)` + `fuse_lora()`, DoRA and
    lora_B.bias included (but for a text encoder's DoRA magnitudes, which diffusers leaves unloaded:
    see the module docstring). The modules must hold their base weights. All files are checked
    against the model before any weight changes, so an error leaves it as it was."""
    split = {component: _module_weights(model) for component, model in model_components.items()}
    weights = {component: w for component, (w, _) in split.items()}
    biases = {component: b for component, (_, b) in split.items()}
    plan, report = _plan(weights, biases, loras)
    new = _new_values(weights, biases, plan, as_deltas=False)  # every value first: DoRA reads the base weights
    for component, params in new.items():
        for param, value in params.items():
            module, _, kind = param.rpartition(".")
            target = (weights if kind == "weight" else biases)[component][module]
            target.copy_(value.to(target.dtype))
    for fused in report.loras:
        logger.info(
            "fused LoRA %s (%s, sha256 %s) at scale %g into %d modules",
            fused.path, fused.format, fused.sha256[:12], fused.scale, fused.num_modules,
        )
    return report
