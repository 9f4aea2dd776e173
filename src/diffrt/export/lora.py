"""Read LoRA files: each module's update (LoRA, LoHa or LoKr factors), alpha, DoRA magnitude and lora_B.bias.

`diffrt.export.lora_fuse` fuses what is read here into base weights (the equations are there).

Two file layouts are read, safetensors only (pickles can run code when loaded):
- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (what `save_lora_weights`
  writes), with `.lora_magnitude_vector` (DoRA) and `.lora_B.bias` where the adapter has them, and
  diffusers' older `.lora.down` / `.lora_linear_layer.down` / `.to_q_lora.down` names. The adapter's
  LoraConfig may sit in the file's metadata (`lora_adapter_metadata`, keyed `unet.r`, ..., or
  unprefixed like the keys of one model's `save_lora_adapter`); its `lora_alpha`, `rank_pattern`,
  `alpha_pattern` and `use_rslora` then set each module's scaling, as diffusers does, and its
  `use_dora` must agree with the magnitudes the file holds. Without it alpha = rank (scaling 1).
- kohya/A1111/LyCORIS: `lora_unet_<module path, '.' written as '_'>.` then `lora_down.weight` +
  `lora_up.weight` (LoRA), `hada_w1_a` + `hada_w1_b` + `hada_w2_a` + `hada_w2_b` (LyCORIS LoHa), or
  `lokr_w1` (or `lokr_w1_a` + `lokr_w1_b`) + `lokr_w2` (or `lokr_w2_a` + `lokr_w2_b`) (LyCORIS LoKr),
  each with an optional `.alpha` (`lora_te_` / `lora_te1_` / `lora_te2_` for text encoders). A
  missing alpha means scaling 1. One file may mix the kinds, one kind per module. Each module is
  scaled by its own alpha, as sd-scripts, A1111 and ComfyUI do. diffusers 0.42 departs from that when a
  file's alphas differ: it gives attention modules (whose alpha_pattern keys keep the processors'
  `to_q_lora` names, matching nothing) and modules without an alpha the file's most common alpha.

Refused by name: kohya/LyCORIS DoRA (`dora_scale`), which diffusers' Stable Diffusion loader drops
with a warning and fuses as a plain LoRA, so neither fusing it nor dropping it would match both
diffusers and what was trained; LyCORIS Tucker cores (`lora_mid`, `hada_t1`/`hada_t2`,
`lokr_t1`/`lokr_t2`), full weight differences, embedding LoRA, and a DoRA module with a lora_B.bias
(peft refuses that LoraConfig).
A file that would change nothing (alpha 0, only zero updates) is refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping

try:  # the parser `re.compile` uses, to look at a pattern's structure before running it
    from re import _parser as _sre_parse  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse

import torch

from diffrt.atomic import sha256_file
from diffrt.errors import LoraError

log = logging.getLogger(__name__)

LoraFormat = Literal["peft", "diffusers", "kohya"]
LayerKind = Literal["lora", "loha", "lokr"]
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights stores the LoraConfig
MAX_PATTERN = 256  # characters in a rank_pattern / alpha_pattern key (the longest module names are about 80)
MAX_MODULE_NAME = 1000  # characters in a module name matched against those patterns
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "controlnet", "transformer")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# LyCORIS names: LoHa (`hada_`) and LoKr (`lokr_`) factors, each kept under its own name as its role.
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"} | {
    name: name for name in LOHA_FACTORS + LOKR_FACTORS}
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
    "hada_t": "LyCORIS LoHa with Tucker cores (hada_t1/hada_t2)",
    "lokr_t": "LyCORIS LoKr with a Tucker core (lokr_t1/lokr_t2)",
    "hada_": "LyCORIS LoHa outside kohya naming (diffrt reads it under lora_unet_ / lora_te_ prefixes)",
    "lokr_": "LyCORIS LoKr outside kohya naming (diffrt reads it under lora_unet_ / lora_te_ prefixes)",
    "lora_mid": "LyCORIS LoCon with a Tucker core (lora_mid)",
    ".diff": "full weight differences",
    "lora_embedding_": "embedding LoRA",
}


@dataclass(frozen=True)
class LoraLayer:
    """One module's update, as named in the file: a LoRA (`down`, `up`), or a LyCORIS LoHa or LoKr
    (`factors`, by their LyCORIS names: `hada_w1_a`, ... or `lokr_w1` / `lokr_w1_a`, ...)."""

    component: str  # "unet", "text_encoder", ...
    module: str  # dotted module path, or the underscored kohya name when `underscored`
    down: torch.Tensor | None  # LoRA: [rank, in] or [rank, in, kh, kw]; None for LoHa/LoKr
    up: torch.Tensor | None  # LoRA: [out, rank] or [out, rank, 1, 1]; None for LoHa/LoKr
    alpha: float | None  # None: scaling 1
    key: str  # the file key of `down` (or of the first factor), for messages
    underscored: bool = False
    aliases: tuple[str, ...] = ()  # other dotted names the same module may have (old diffusers format)
    use_rslora: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: peft's lora_magnitude_vector, one length per output channel, [out]
    bias: torch.Tensor | None = None  # peft's lora_B.bias (lora_bias=True), [out]
    kind: LayerKind = "lora"
    factors: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)  # LoHa/LoKr, 2-D but lokr_w2

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by. LoHa: hada_w1_b's rows. LoKr: the rank of its factorised
        factor (lokr_w2_b's rows, else lokr_w1_b's); None when w1 and w2 are both full matrices."""
        if self.kind == "loha":
            return self.factors["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            factorised = [self.factors[b] for b in ("lokr_w2_b", "lokr_w1_b") if b in self.factors]
            return factorised[0].shape[0] if factorised else None
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        # LoKr with two full matrices: scaling 1 whatever alpha says (LyCORIS, A1111, ComfyUI; see lora_fuse).
        if self.alpha is None or self.rank is None:
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


def locate_lora(path: Path) -> Path:
    """The safetensors file a LoRA argument names: the file itself, or the one in a folder (`pytorch_lora_weights.safetensors`,
    as `train dreambooth-lora` and diffusers' save_lora_weights write it, or the folder's only .safetensors)."""
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
        raise LoraError(f"LoRA file not found: {path}; pass a .safetensors file (FILE[:SCALE]) or a folder holding one")
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
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is an int past 4300 digits
        raise LoraError(f"{path}: the {METADATA_KEY} metadata is not JSON diffrt can read ({e}); re-save the LoRA") from None
    if not isinstance(flat, dict):
        raise LoraError(f"{path}: the {METADATA_KEY} metadata is a JSON {type(flat).__name__}, not a LoraConfig object; re-save the LoRA")
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component not in COMPONENTS or not name:
            # One model's `save_lora_adapter` writes its LoraConfig unprefixed, like its keys, which
            # are the UNet's (_split_dotted): dropping it would fuse at alpha = rank, not lora_alpha.
            component, name = "unet", key
        configs[component][name] = value
    for component, config in configs.items():
        _check_config(path, component, config)
    return dict(configs)


def _is_number(value, kind: type | tuple[type, ...]) -> bool:
    # JSON's true/false read as Python bools, which are ints: a rank of `true` is a bad file, not rank 1.
    # An int of 400 digits overflows math.isfinite: no rank or alpha is past 2^31.
    return isinstance(value, kind) and not isinstance(value, bool) and abs(value) < 2**31 and math.isfinite(value)


def _check_config(path: Path, component: str, config: dict) -> None:
    """The LoraConfig fields read here, checked for type: the metadata is the file's, as untrusted as its tensors."""
    def refuse(name: str, expected: str) -> None:
        raise LoraError(f"{path}: the {METADATA_KEY} gives {component}.{name} = {json.dumps(config[name])[:80]}, "
                        f"expected {expected}; re-save the LoRA with the LoraConfig it was trained with")

    if "r" in config and not (_is_number(config["r"], int) and config["r"] > 0):
        refuse("r", "a positive whole number")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"], (int, float)):
        refuse("lora_alpha", "a number")
    for name in ("use_rslora", "use_dora"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            refuse(name, "true or false")
    for name, kind, expected in (("rank_pattern", int, "positive whole numbers"), ("alpha_pattern", (int, float), "numbers")):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            refuse(name, f"an object of module-name patterns to {expected}")
        for pattern, value in patterns.items():
            if not _is_number(value, kind) or (kind is int and value <= 0):
                raise LoraError(f"{path}: the {METADATA_KEY} gives {component}.{name}[{pattern[:80]!r}] = "
                                f"{json.dumps(value)[:80]}, expected {expected}; re-save the LoRA")
            _check_pattern(path, f"{component}.{name}", pattern)


def _check_pattern(path: Path, field: str, pattern: str) -> None:
    """A rank_pattern / alpha_pattern key is a regular expression (peft matches it with `re`). Real files
    carry module names ("down_blocks.0.attentions.0.proj_in", "to_k"); refused is what could make `re`
    backtrack for minutes (ReDoS): over MAX_PATTERN characters, back-references, more than one quantifier
    or more than one alternation, or a quantifier over an alternation."""
    def refused(why: str) -> LoraError:
        return LoraError(f"{path}: the {METADATA_KEY} {field} key {pattern[:80]!r} {why}; "
                         "write patterns as module names (e.g. 'down_blocks.0.attentions.0.proj_in')")

    if len(pattern) > MAX_PATTERN:
        raise refused(f"is {len(pattern)} characters long, over the {MAX_PATTERN} diffrt matches")
    try:
        parsed = _sre_parse.parse(pattern)
    except re.error as e:
        raise refused(f"is not a regular expression ({e})") from None
    counts = {"repeat": 0, "branch": 0}

    def walk(items, in_repeat: bool) -> None:
        for op, arg in items:
            name = str(op)
            if name.startswith("GROUPREF"):
                raise refused("uses a back-reference, which can make matching take exponential time")
            kind = "repeat" if name.endswith("REPEAT") else "branch" if name == "BRANCH" else None
            if kind is not None:
                counts[kind] += 1
                if counts[kind] > 1 or (in_repeat and kind == "branch"):
                    raise refused("combines quantifiers or alternations, which can make matching take exponential time")
            for child in arg if isinstance(arg, (list, tuple)) else [arg]:
                if isinstance(child, _sre_parse.SubPattern):
                    walk(child, in_repeat or kind == "repeat")
                elif isinstance(child, list):  # a branch's alternatives
                    for alternative in child:
                        if isinstance(alternative, _sre_parse.SubPattern):
                            walk(alternative, in_repeat)

    walk(parsed, False)


def _pattern_values(patterns: Mapping[str, float] | None, module: str) -> list:
    """The values of the rank_pattern / alpha_pattern keys that match the end of the module name at a '.' boundary,
    in the file's order; peft's rule (its get_pattern_key) takes the first. The patterns were checked by _check_pattern."""
    return [value for pattern, value in (patterns or {}).items() if re.match(rf"(.*\.)?({pattern})$", module)]


def _pattern_value(patterns: Mapping[str, float] | None, module: str, default):
    return next(iter(_pattern_values(patterns, module)), default)


def _raise_unrecognised(path: Path, keys: list[str]) -> None:
    # The first hint that fits each key (the more specific come first: hada_t before hada_).
    kinds = sorted({next(kind for marker, kind in UNSUPPORTED_HINTS.items() if marker in key)
                    for key in keys if any(marker in key for marker in UNSUPPORTED_HINTS)})
    what = f" ({'; '.join(kinds)}: not supported)" if kinds else ""
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    raise LoraError(f"{path}: {len(keys)} keys are not LoRA weights diffrt can read{what}: {shown}")


def _alpha(path: Path, entry: dict) -> float:
    """A module's alpha, one number (kohya and LyCORIS store it as a 0-d tensor)."""
    alpha = entry["alpha"]
    if alpha.numel() != 1:
        raise LoraError(f"{path}: {entry['keys']['alpha']} has shape {tuple(alpha.shape)}; an alpha is one number: the file is damaged")
    return float(alpha)


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA safetensors file (or a folder holding `pytorch_lora_weights.safetensors`)."""
    path = locate_lora(Path(path))
    tensors, metadata = _load_safetensors(path)
    for key, tensor in tensors.items():  # fused, a NaN or an fp16 save's inf made every image NaN, blamed on the precision
        # fp8 (one byte) has no isfinite of its own: checked in float32.
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor).all()):
            raise LoraError(f"{path}: {key} holds NaN or infinite values; the file is damaged (an fp16 save that overflowed?): "
                            "re-save the LoRA from its source")
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
    overlapping: list[str] = []  # modules that several alpha_pattern keys give different alphas
    for (component, module), entry in entries.items():
        kind = _layer_kind(path, component, module, entry)
        if kind != "lora":
            layers.append(_lycoris_layer(path, component, module, entry, kind))
            continue
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
        alpha = _alpha(path, entry) if "alpha" in entry else None
        use_rslora = False
        config = configs.get(component)
        if config is not None and entry["style"] != "kohya" and bool(config.get("use_dora")) != (magnitude is not None):
            # diffusers builds the adapter from the metadata: a DoRA config without magnitudes keeps peft's initial
            # ||W||, and magnitudes without one are dropped with a warning. Neither is the adapter that was saved.
            found = "no lora_magnitude_vector" if magnitude is None else f"magnitude {entry['keys']['magnitude']}"
            raise LoraError(f"{path}: its {METADATA_KEY} gives {component} use_dora={bool(config.get('use_dora'))} but "
                            f"{component}.{module} has {found}; re-save the LoRA with the LoraConfig it was trained with")
        if config is not None and alpha is None and entry["style"] != "kohya":
            if len(module) > MAX_MODULE_NAME:  # a name's length multiplies a pattern's matching time too
                raise LoraError(f"{path}: module {component}.{module[:80]}... has a {len(module)}-character name; "
                                "no model has such a module")
            rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", down.shape[0]))
            if rank != down.shape[0]:
                raise LoraError(f"{path}: metadata gives {component}.{module} rank {rank} but its weights have rank {down.shape[0]}")
            alphas = _pattern_values(config.get("alpha_pattern"), module)
            alpha = float(alphas[0] if alphas else config.get("lora_alpha", rank))
            if len(set(alphas)) > 1:
                overlapping.append(f"{component}.{module}")
            use_rslora = bool(config.get("use_rslora", False))
        if alpha == 0:
            _refuse_alpha_0(path, entry["keys"].get("alpha", f"the {METADATA_KEY} of {component}.{module}"))
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
        # peft initialises lora_B to zero (LyCORIS hada_w2_a, lokr_w2 or lokr_w2_b): an adapter saved
        # before training fuses as no change at all.
        raise LoraError(f"{path}: every LoRA update in it is zero (an all-zero up, down or LyCORIS factor in each module), "
                        "so it would change nothing; was it saved before training?")

    if overlapping:
        # peft took the first key in the LoraConfig's order; diffusers saves the metadata with its keys sorted, so
        # the file's order (which diffusers and diffrt both follow) may not be the one the adapter trained with.
        log.warning("%s: several alpha_pattern keys match %d modules (e.g. %s) with different alphas; the first in the "
                    "file's order is taken, as diffusers takes it, and the file may not keep the order the adapter "
                    "was trained with (diffusers saves the keys sorted): write non-overlapping patterns",
                    path, len(overlapping), overlapping[0])
    styles_seen = {entry["style"] for entry in entries.values()}
    fmt: LoraFormat = "kohya" if styles_seen == {"kohya"} else "peft" if styles_seen == {"peft"} else "diffusers"
    return LoraFile(path=path, sha256=sha256_file(path), format=fmt, layers=layers)


def _refuse_alpha_0(path: Path, source: str) -> None:
    # diffusers, A1111 and ComfyUI fuse alpha 0 as a zero update; kohya's sd-scripts and LyCORIS read it as alpha = rank.
    raise LoraError(f"{path}: {source} gives alpha 0, which diffusers fuses as no change and sd-scripts reads as "
                    "alpha = rank; re-save the LoRA with the alpha it was trained with")


def _layer_kind(path: Path, component: str, module: str, entry: dict) -> LayerKind:
    """"lora", "loha" or "lokr", from the roles of a module's keys; one kind per module."""
    kinds = {"loha" if role.startswith("hada_") else "lokr" if role.startswith("lokr_") else "lora"
             for role in entry["keys"] if role != "alpha"}
    if len(kinds) > 1:
        keys = ", ".join(sorted(key for role, key in entry["keys"].items() if role != "alpha"))
        raise LoraError(f"{path}: module {component}.{module} mixes {' and '.join(sorted(kinds))} keys ({keys}); "
                        "a module holds one kind of update")
    return next(iter(kinds), "lora")


def _lycoris_layer(path: Path, component: str, module: str, entry: dict, kind: LayerKind) -> LoraLayer:
    """A LoHa or LoKr module: its factors checked for completeness and shape (LyCORIS' own layouts:
    every factor a matrix, a conv's kernel flattened into the `_b` columns, but lokr_w2 may be 4-D)."""
    keys = entry["keys"]
    needed: list[str] = []
    for w in ("hada_w1", "hada_w2") if kind == "loha" else ("lokr_w1", "lokr_w2"):
        if w in entry and (f"{w}_a" in entry or f"{w}_b" in entry):
            raise LoraError(f"{path}: {component}.{module} has both {keys[w]} and a factorised {w}_a/{w}_b; keep one")
        needed += [w] if w in entry else [f"{w}_a", f"{w}_b"]
    missing = [name for name in needed if name not in entry]
    if missing:
        found = ", ".join(sorted(key for role, key in keys.items() if role != "alpha"))
        raise LoraError(f"{path}: {kind} module {component}.{module} has no {', '.join(missing)} (only {found}); "
                        "the file is incomplete")
    factors = {name: entry[name] for name in needed}
    for name, value in factors.items():
        if value.ndim != 2 and not (name == "lokr_w2" and value.ndim == 4):
            raise LoraError(f"{path}: {keys[name]} has shape {tuple(value.shape)}; expected a matrix")
    ranks = []
    for a, b in [(n, n[:-1] + "b") for n in needed if n.endswith("_a")]:
        if factors[a].shape[1] != factors[b].shape[0]:
            raise LoraError(f"{path}: {keys[a]} has shape {tuple(factors[a].shape)} and {keys[b]} {tuple(factors[b].shape)}; "
                            "expected [rows, rank] and [rank, columns]")
        ranks.append(factors[b].shape[0])
    if kind == "loha":
        shapes = sorted({(factors[f"{w}_a"].shape[0], factors[f"{w}_b"].shape[1]) for w in ("hada_w1", "hada_w2")})
        if len(shapes) > 1:
            raise LoraError(f"{path}: the LoHa factors of {component}.{module} multiply to shapes {shapes[0]} and {shapes[1]}; "
                            "hada_w1_a @ hada_w1_b and hada_w2_a @ hada_w2_b must have one shape")
    elif len(set(ranks)) > 1:
        # LyCORIS divides alpha by lokr_w1_a's rank, A1111 and ComfyUI by lokr_w2_b's: they agree only when equal.
        raise LoraError(f"{path}: {component}.{module} factorises lokr_w1 at rank {ranks[0]} and lokr_w2 at rank {ranks[1]}, "
                        "which LyCORIS and A1111/ComfyUI scale differently; re-save it with one rank")
    alpha = _alpha(path, entry) if "alpha" in entry else None
    if alpha == 0:
        _refuse_alpha_0(path, keys["alpha"])
    return LoraLayer(component=component, module=module, down=None, up=None, alpha=alpha, key=keys[needed[0]],
                     underscored=True, kind=kind, factors=factors)


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
    if layer.kind != "lora":
        return all(bool(factor.any()) for factor in layer.factors.values())
    has_update = bool(layer.up.any() and layer.down.any())
    return has_update or layer.magnitude is not None or (layer.bias is not None and bool(layer.bias.any()))
