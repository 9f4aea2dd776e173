"""The strength of a pipeline's LoRA, changed while it runs: diffusers' `lora_scale`.

A pipeline opened with LoRA files [(file, scale_i)] runs them at `lora_scale * scale_i`; 1.0 is
what it was opened with. Each backend changes it its own way, and always from the base weights,
so that changing it back and forth never accumulates (RELIABILITY #8):

- PyTorch (`TorchLora`): the base values of the parameters the LoRA changes (weights, and biases
  for lora_B.bias) are kept; setting a scale copies them back and fuses the LoRA files at the new
  scales, the same arithmetic as fusing them at open, so scale s gives bit for bit the weights of
  opening with `--lora FILE:s*scale_i`.
- TensorRT (`EngineLora`): engines exported with base weights take the LoRA by refit (the LoRAs
  fused at the new scales into the artifact's ONNX initialisers), in memory, without a rebuild.
- ONNX Runtime, or engines built from an ONNX with the LoRA baked in (`BakedLora`): the weights
  are constants of the graph; only the scale they were made with (1.0) is accepted, and any
  other is refused in one line naming what would allow it.

For a DoRA LoRA the scale multiplies its update inside the DoRA normalisation, as diffusers'
`lora_scale` does, so 0 is not the base model: it leaves the base weights rescaled to the learnt
magnitudes. Every backend recomputes the weights from the base, so this needs no special case.

Changing the scale is not free (a re-fuse in PyTorch, a refit of every LoRA engine), so the
service groups requests by `lora_scale` and changes it between batches, never inside one.
"""

from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence, TypeVar

import torch
from torch import nn

from diffrt.errors import DiffrtError, LoraError

log = logging.getLogger(__name__)

Loras = Sequence[tuple[str | Path, float]]  # (file, scale) as opened
T = TypeVar("T")


class RuntimeLora(Protocol):
    scale: float  # the multiplier now in effect; 1.0: the scales the pipeline was opened with
    scalable: bool  # whether any scale but 1.0 can be set

    def prepare(self) -> None:
        """Do now (a server: while loading) any slow reading a first change of scale would need."""

    def check(self, scale: float) -> None:
        """Raise DiffrtError (one line) if this pipeline cannot run its LoRA at `scale`."""

    def set_scale(self, scale: float) -> None: ...


def scaled(loras: Sequence[tuple[T, float]], scale: float) -> list[tuple[T, float]]:
    """The LoRAs (paths, or files read by read_lora) at `scale` times their opened scales."""
    return [(lora, scale * float(s)) for lora, s in loras]


def check_scale_value(scale: float) -> None:
    """A runtime LoRA strength: a finite real number (numpy's floats too; not a bool). Negative ones as at open
    (check_lora_pairs) and in diffusers' fuse_lora / set_adapters: a "slider" LoRA runs backwards."""
    if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise DiffrtError(f"lora_scale must be a finite number, got {scale!r}")


def check_lora_pairs(loras) -> list[tuple[str | Path, float]]:
    """`loras` as open_pipeline takes them, [(file, scale), ...]: one line for a plain file name, one pair given
    without its list, or a scale that is not a finite number (NaN fused into every weight, and the first call
    named the text encoder's output as the fault)."""
    bare = loras if isinstance(loras, (str, Path)) else None  # a file given alone, or one pair without its list:
    if isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], numbers.Real):
        bare = loras[0]
    if bare is not None:
        raise LoraError(f"loras takes a list of (file, scale) pairs, e.g. [({str(bare)!r}, 1.0)]; got {loras!r}")
    pairs = []
    for item in loras:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path))):
            raise LoraError(f"loras takes (file, scale) pairs, got {item!r}")
        scale = item[1]
        if not (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale)):
            raise LoraError(f"the LoRA scale of {item[0]} must be a finite number, got {scale!r}")
        pairs.append((item[0], float(scale)))
    return pairs


class TorchLora:
    """LoRA fused into PyTorch modules, re-fusable at another strength from the saved base weights.

    `modules` maps LoRA component names ("unet", "text_encoder") to the modules that run; only the
    parameters the LoRA changes are saved (for Stable Diffusion, the attention projections)."""

    scalable = True

    def __init__(self, modules: Mapping[str, nn.Module], loras: Loras):
        from diffrt.export.lora import read_lora
        from diffrt.export.lora_fuse import lora_targets, patchable_state

        self.modules = dict(modules)
        self.files = [(read_lora(path), s) for path, s in check_lora_pairs(loras)]
        # Checks every file against the model (an unmatched key raises) before any weight changes.
        states = {c: patchable_state(m) for c, m in self.modules.items()}
        targets = lora_targets(states, self.files)
        with torch.no_grad():
            self._base = [(states[c][p], states[c][p].detach().clone()) for c, params in targets.items() for p in params]
        self.scale = 0.0  # the weights are the base weights until the first fuse
        self.set_scale(1.0)

    def prepare(self) -> None:
        pass  # the base weights were saved at open

    def check(self, scale: float) -> None:
        check_scale_value(scale)

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        from diffrt.export.lora_fuse import fuse_loras

        self.check(scale)
        if scale == self.scale:
            return
        self.scale = float("nan")  # half re-fused if fuse_loras fails: the next set_scale starts from the base again
        for weight, base in self._base:
            weight.copy_(base)
        fuse_loras(self.modules, scaled(self.files, scale))
        self.scale = float(scale)


class BakedLora:
    """LoRA that is part of the compiled weights (an ONNX graph's constants): fixed at scale 1.0."""

    scalable = False

    def __init__(self, why: str):
        self.why = why
        self.scale = 1.0

    def prepare(self) -> None:
        pass

    def check(self, scale: float) -> None:
        check_scale_value(scale)
        if scale != 1.0:
            raise DiffrtError(f"lora_scale {scale:g}: {self.why}")

    def set_scale(self, scale: float) -> None:
        self.check(scale)


class EngineLora:
    """LoRA refit into running TensorRT engines at a new strength, from the artifact's base weights.

    `engines` maps artifact component names (those of refit.LORA_COMPONENTS) to their running
    TensorRTBackend; `loras()` gives the artifact's LoRA files at the scales its manifest records.
    `prepare` reads (once) the LoRA files, each engine's weight map and its ONNX base weights, which
    are then kept in host memory so that a change of scale reads nothing from disk; a server calls
    it while loading, anyone else gets it on the first scale other than 1.0. If the LoRA files are
    gone or changed, the engines still run as refit, and other scales are refused saying why.
    `manifest`: the one the engines were opened with; the files `prepare` reads are checked against it, under the
    artifact's lock, so that an export rebuilding the folder since (which diffrt allows beside a running pipeline)
    cannot hand the old engines the new export's weights."""

    scalable = True

    def __init__(self, folder: Path, engines: Mapping[str, object], loras: Callable[[], Loras], manifest: dict | None = None):
        self.folder = folder
        self.engines = dict(engines)
        self._loras = loras
        self._manifest = manifest
        self._prepared: tuple[list, dict, dict] | None = None
        self._unavailable: str | None = None
        self.scale = 1.0  # the engines hold the manifest's LoRA

    def prepare(self) -> None:
        if self._prepared is not None or self._unavailable is not None:
            return
        from diffrt.errors import ArtifactError
        from diffrt.export import manifest as mf
        from diffrt.export.lora import read_lora
        from diffrt.export.refit import onnx_initializers, read_weight_map

        try:
            files = [(read_lora(path), float(s)) for path, s in self._loras()]
            onnx = {name: self.folder / name / "model.onnx" for name in self.engines}
            with mf.artifact_lock(self.folder, shared=True):  # not rewritten while read
                if self._manifest is not None:
                    try:
                        mf.verify_files(self.folder, self._base_files(), components=list(self.engines))
                    except ArtifactError as exc:
                        raise DiffrtError(f"{self.folder} changed since it was opened ({exc}); reopen it to change its "
                                          "LoRA's strength") from None
                maps = {name: read_weight_map(path) for name, path in onnx.items()}
                missing = [name for name, m in maps.items() if m is None]
                if missing:  # `diffrt refit` writes them when it sets an artifact's LoRA
                    raise DiffrtError(f"{self.folder} has no weight map for {', '.join(missing)}; run `diffrt refit {self.folder} "
                                      "--lora FILE:SCALE` once to change its LoRA's strength")
                base = {name: onnx_initializers(path) for name, path in onnx.items()}
        except DiffrtError as exc:
            self._unavailable, self.scalable = str(exc), False
            log.warning("the LoRA's strength cannot change: %s", exc)
            return
        self._prepared = files, maps, base

    def _base_files(self) -> dict:
        """The opened manifest cut to what `prepare` reads of each engine's component: its ONNX (and external data) and
        weight map, not its engine plan, which a `diffrt refit` on disk rewrites over the same base weights."""
        components = {}
        for name in self.engines:
            comp = {k: v for k, v in self._manifest["components"][name].items() if k != "engine"}
            comp["files"] = {rel: digest for rel, digest in comp["files"].items() if not rel.endswith("/engine.plan")}
            components[name] = comp
        return {**self._manifest, "components": components}

    def check(self, scale: float) -> None:
        check_scale_value(scale)
        if scale != self.scale:
            self.prepare()
            if self._unavailable is not None:
                raise DiffrtError(f"lora_scale {scale:g}: {self._unavailable}")

    def set_scale(self, scale: float) -> None:
        from diffrt.export.refit import refit_weights

        self.check(scale)
        if scale == self.scale:
            return
        files, maps, base = self._prepared
        files = scaled(files, scale)
        # Every engine's weights first (CPU; raises before any engine changes), then the refits.
        plans = {name: refit_weights(self.folder / name / "model.onnx", maps[name], files, initializers=base[name])
                 for name in self.engines}
        try:
            for name, engine in self.engines.items():
                engine.refit(plans[name])
        except BaseException:
            self.scale = float("nan")  # engines at mixed strengths: the next set_scale refits them all
            raise
        log.info("refit %s at lora_scale %g", ", ".join(self.engines), scale)
        self.scale = float(scale)
