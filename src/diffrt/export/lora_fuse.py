"""Fuse LoRA files, as read by `diffrt.export.lora`, into base weights.

A LoRA adds a low-rank update to a Linear or Conv2d weight (Hu et al. 2021, eq. 3):

    W' = W + dW,   dW = scale * (alpha / rank) * up @ down       down: [rank, in(, kh, kw)], up: [out, rank(, 1, 1)]

For a kxk convolution `down` holds the kernel and `up` is 1x1, so `up @ down` is taken over the
flattened `in * kh * kw` axis: the same weight peft's conv LoRA merges. `alpha / rank` becomes
`alpha / sqrt(rank)` for rsLoRA adapters.

LyCORIS' other updates (kohya-named files, read as `kind` "loha" / "lokr"), also W' = W + scale * dW:

- LoHa (Hyeon-Woo et al. 2022, FedPara: the Hadamard product of two low-rank matrices):

      dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)       rank = hada_w1_b's rows

  as LyCORIS' LoHaModule, peft's LoHaLayer.get_delta_weight, A1111 and ComfyUI compute it.
- LoKr (Edalati et al. 2022, KronA; Yeh et al. 2024, LyCORIS: a Kronecker product):

      dW = gamma * kron(W1, W2)      W1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, W2 = lokr_w2 or lokr_w2_a @ lokr_w2_b

  gamma = alpha / rank, rank that of the factorised factor, but gamma = 1 where W1 and W2 are both
  full matrices: the rule of LyCORIS' LokrModule (`if use_w1 and use_w2: alpha = lora_dim`), which
  trained the file, and of A1111's network_lokr and ComfyUI's weight_adapter/lokr (no rank, so
  scale 1). peft's LoKrLayer differs there: it always multiplies by alpha / r (its `r`, a config
  value no file holds), so diffrt follows LyCORIS; both agree whenever a factor is factorised.

For a kxk convolution the `_b` factors hold the flattened `in * kh * kw` columns (lokr_w2 may be
[out2, in2, kh, kw]), and the product is reshaped to the conv weight's shape, as LyCORIS does. The
scale is applied once, as LyCORIS' forward (the training), A1111 and ComfyUI apply it (LyCORIS 3's
`get_diff_weight` multiplies `self.scale` into `get_weight`'s already scaled update a second time;
no loader does). A LyCORIS rsLoRA file stores alpha already multiplied by sqrt(rank), so alpha / rank
holds for it too.

DoRA (Liu et al. 2024, eq. 5) also learns a magnitude m, one per output channel (peft's
`lora_magnitude_vector`), and gives each output row of the updated weight that length:

    W' = m * (W + dW) / ||W + dW||        the norm over a row: a Linear's in-features, a conv's in * kh * kw

The scale sits inside dW, as in diffusers' `fuse_lora(lora_scale=s)` (peft multiplies `scaling`), so
a DoRA weight is not linear in the scale, and scale 0 gives m * W / ||W||, not W. Adapters are merged
one after another as peft (0.21) merges them: a DoRA adapter k multiplies the weight so far plus its
dW_k by m_k / ||W0 + dW_k||, the norm of the base weight W0 with its own update only
(`_unmerged_base_weight`), the norm peft's forward uses. A peft `lora_B.bias` (`lora_bias=True`) adds
scale * (alpha / rank) * bias to the module's bias, DoRA or not.

Where diffrt differs from diffusers on purpose: diffusers 0.42 with transformers 5 loads a text
encoder's LoRA through transformers, which leaves DoRA magnitudes at peft's initial ||W|| (it reports
the keys UNEXPECTED); diffrt fuses the file's magnitudes, as peft merges them in the UNet.

Module names are resolved against the model itself, never by rewriting strings alone: a kohya
name is looked up among the model's own module names with '.' replaced by '_'. Every entry of a
file must land on a module or the fuse fails naming what did not (RELIABILITY row 7), and fusing
always starts from the base weights given, so refits never accumulate (row 8).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from diffrt.errors import LoraError
from diffrt.export.lora import LoraFile, LoraFormat, LoraLayer

logger = logging.getLogger(__name__)

LDM_BLOCK_NAMES = ("input_blocks", "middle_block", "output_blocks")


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


def patchable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of `model`'s state dict a LoRA may patch: the weights and biases of its Linear and Conv2d modules, as
    fuse_loras patches them. An Embedding's table is 2-D too, and no LoRA diffusers loads patches one: given a whole
    state dict, the export's and refit's checks took a LoRA on CLIP's position embedding that fusing refuses."""
    weights, biases = _module_weights(model)
    return {**{f"{name}.weight": w.detach() for name, w in weights.items()},
            **{f"{name}.bias": b.detach() for name, b in biases.items()}}


def _state_weights(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same from a state dict (patchable_state's): every 2-D or 4-D `<module>.weight`, and the `<module>.bias`
    beside it."""
    weights = {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight") and v.ndim in (2, 4)}
    return weights, {name: state[f"{name}.bias"] for name in weights if f"{name}.bias" in state}


def _update_shape(layer: LoraLayer) -> tuple[int, ...]:
    """The shape of the layer's update before it is reshaped like the weight: [out, in(, kh, kw)] for
    a LoRA, [out, in * kh * kw] for LoHa and LoKr, whose conv kernels come flattened."""
    f = layer.factors
    if layer.kind == "loha":
        return f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]
    if layer.kind == "lokr":
        def rows_columns(w: str) -> tuple[int, int]:
            return (f[w].shape[0], math.prod(f[w].shape[1:])) if w in f else (f[f"{w}_a"].shape[0], f[f"{w}_b"].shape[1])

        (a, c), (b, d) = rows_columns("lokr_w1"), rows_columns("lokr_w2")
        return a * b, c * d
    return layer.up.shape[0], *layer.down.shape[1:]


def _check_fits(layer: LoraLayer, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes only: `layer` can patch the module `name` with this weight and bias."""
    if layer.kind == "lora" and layer.up.ndim == 4 and layer.up.shape[2:] != (1, 1):
        raise LoraError(f"LoRA key {layer.key}: its up weight has a {tuple(layer.up.shape[2:])} kernel; only 1x1 up convolutions are supported")
    shape = _update_shape(layer)
    kernel = layer.down if layer.kind == "lora" else layer.factors.get("lokr_w2")
    fits = (shape[0], math.prod(shape[1:])) == (weight.shape[0], math.prod(weight.shape[1:]))
    if layer.kind == "lora" and weight.ndim == 4 and weight.shape[2:] != (1, 1):  # a kxk convolution: a 4-D down of
        fits = fits and layer.down.ndim == 4 and layer.down.shape[2:] == weight.shape[2:]  # its kernel (diffusers' rule)
    if not fits or (weight.ndim == 2 and kernel is not None and kernel.ndim == 4 and kernel.shape[2:] != (1, 1)):
        raise LoraError(
            f"LoRA key {layer.key} gives an update of shape {shape} for a weight of shape "
            f"{tuple(weight.shape)}; the LoRA was made for another model"
        )
    if layer.bias is not None and bias is None:
        raise LoraError(f"LoRA key {layer.key}: its lora_B.bias adds to the bias of {name}, which has none; "
                        "peft cannot merge it either (lora_bias=True needs a layer with a bias)")


def _delta(layer: LoraLayer, shape: torch.Size, scaling: float) -> torch.Tensor:
    """scaling * the layer's update in fp32 (on the LoRA's device), shaped like the weight: up @ down
    (LoRA), (w1_a @ w1_b) * (w2_a @ w2_b) (LoHa) or kron(W1, W2) (LoKr)."""
    f = {name: factor.float() for name, factor in layer.factors.items()}

    def matrix(w: str) -> torch.Tensor:  # a LoHa/LoKr factor, full or factorised, as [rows, columns]
        return f[w].reshape(f[w].shape[0], -1) if w in f else f[f"{w}_a"] @ f[f"{w}_b"]

    if layer.kind == "loha":
        product = matrix("hada_w1") * matrix("hada_w2")
    elif layer.kind == "lokr":
        # kron of [a, c] and [b, d * kh * kw] is LyCORIS' kron of [a, c, 1, 1] and [b, d, kh, kw], flattened.
        product = torch.kron(matrix("lokr_w1"), matrix("lokr_w2"))
    else:
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
                plan: Plan) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {param: fused value}} for every parameter `plan` changes, in fp32: plain LoRA adds its deltas
    to the base; DoRA renormalises the sum (_dora_weight)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, modules in plan.items():
        params = out.setdefault(component, {})
        for module, updates in modules.items():
            base = weights[component][module]
            delta = _additive_delta(base, updates)
            if delta is None:
                params[f"{module}.weight"] = _dora_weight(base, updates)
            else:
                params[f"{module}.weight"] = base.detach().float() + delta.to(base.device)
            bias_delta = _bias_delta(updates)
            if bias_delta is not None:
                bias = biases[component][module]
                params[f"{module}.bias"] = bias.detach().float() + bias_delta.to(bias.device)
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


def fused_params(
    base_state: Mapping[str, Mapping[str, torch.Tensor]], loras: Sequence[tuple[LoraFile, float]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The fp32 values, computed from `base_state`, of every parameter `loras` change at their scales.

    `base_state` maps component names ("unet", "text_encoder") to state dicts, which are not modified. Always
    computed from the base given, never from a previous result: refit (refit.py) sets these on an engine,
    so refitting A, then B, then A again gives exactly A."""
    weights, biases, plan = _planned(base_state, loras)
    return _new_values(weights, biases, plan)


@torch.no_grad()
def fuse_loras(model_components: Mapping[str, nn.Module], loras: Sequence[tuple[LoraFile, float]]) -> FuseReport:
    """Fuse each LoRA, at its scale, into the weights of `model_components` in place.

    Matches diffusers' `load_lora_weights` + `set_adapters(names, weights)` + `fuse_lora()`, DoRA and
    lora_B.bias included (but for a text encoder's DoRA magnitudes, which diffusers leaves unloaded:
    see the module docstring). The modules must hold their base weights. All files are checked
    against the model before any weight changes, so an error leaves it as it was."""
    seen: dict[str, LoraFile] = {}
    for lora, _ in loras:  # fused twice, its updates add: as one at the sum of the scales, likely not what was meant
        if lora.sha256 in seen:
            logger.warning("LoRA %s is given twice (the same file as %s): both are fused, as one at the sum of their "
                           "scales; give it once, at the scale meant", lora.path, seen[lora.sha256].path)
        seen.setdefault(lora.sha256, lora)
    split = {component: _module_weights(model) for component, model in model_components.items()}
    weights = {component: w for component, (w, _) in split.items()}
    biases = {component: b for component, (_, b) in split.items()}
    plan, report = _plan(weights, biases, loras)
    new = _new_values(weights, biases, plan)  # every value first: DoRA reads the base weights
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


def fuse_lora_files(model_components: Mapping[str, nn.Module], loras: Sequence[tuple[str | Path, float]],
                    layers_of: Sequence[str] | None = None) -> FuseReport:
    """fuse_loras over (path, scale) pairs, as --lora and manifests give them. `layers_of`: fuse the layers of
    these components only (e.g. a UNet fallback beside an exported text encoder that has its part already)."""
    from diffrt.export.lora import read_lora

    files = [read_lora(path) for path, _ in loras]
    if layers_of is not None:
        files = [dataclasses.replace(f, layers=[x for x in f.layers if x.component in layers_of]) for f in files]
    return fuse_loras(model_components, [(f, float(scale)) for f, (_, scale) in zip(files, loras)])
