"""Swap LoRA weights into an artifact's TensorRT engines without rebuilding them.

    diffrt refit ARTIFACT --lora style.safetensors:0.8      # refit_artifact(folder, [(path, 0.8)])

Refits never accumulate (RELIABILITY #8): every weight the engine can refit is set on every
refit, to the new LoRAs fused into the base, and the base is always the artifact's ONNX
initializers, never the engine's current weights. So refitting A, then B, then A gives exactly
A, and refitting with no LoRA restores the base engine. The fused weights are computed from the
base values (`lora.fused_params`), never as base + scale * delta: a DoRA weight is not linear in
the scale. LoRA bias terms (lora_B.bias) are refused: refit sets the weights the weight map
locates, and it locates no biases.

The ONNX must therefore hold base weights. The manifest's "onnx_loras" records which LoRAs the
ONNX holds; refit refuses an ONNX with LoRAs baked in and says to re-export without them.
After a refit, "loras" lists the engines' LoRAs. The manifest's "key" stays the key of the base
export: an export is a cache hit only when its key and its LoRAs both match (cache.py).

Which engines. Only engines that hold a UNet or a text encoder take LoRA (`LORA_COMPONENTS`);
the VAE decoder and the standalone ControlNet keep their engines untouched by refit and by
restore-to-base, and a LoRA with weights for anything else is refused.

Names. The TorchScript ONNX exporter keeps parameter names for most initializers
(`net.unet.down_blocks.0.resnets.0.conv1.weight`), but a Linear applied to a 3-D input becomes
a MatMul whose weight is constant-folded, transposed and renamed (`onnx::MatMul_1147`). The
weight map matches initializers to the model's parameters by name suffix where it can, else by
value (also transposed), and is stored beside the ONNX as weight_map.json. It is made from the
PyTorch module at export (`write_weight_map`); for a pixel UNet exported without one (an older
diffrt), on the first refit from the source model the manifest names, after checking its hash (a
text-to-image artifact without one is refused: re-export it). TensorRT names refittable weights after the ONNX
initializers, so that is the only mapping needed. What cannot be mapped is reported; a LoRA that
patches an unmapped weight is refused, never silently skipped (RELIABILITY #7).
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diffrt import atomic
from diffrt.errors import ArtifactError
from diffrt.runtime.backends import require_backend

log = logging.getLogger(__name__)

WEIGHT_MAP = "weight_map.json"
# 2: the weights of Linear and Conv2d modules only (lora_fuse.patchable_state); a format-1 map listed every 2-D and 4-D
# weight, embedding tables too, which refit would have patched for a LoRA that fusing refuses: not trusted.
MAP_FORMAT = 2
# Artifact component -> the LoRA components its engine takes. diffusers loads LoRA into the UNet
# and text encoders only; the fused graph's ControlNet half and the VAE decoder take none.
LORA_COMPONENTS = {"unet": ("unet",), "text_encoder": ("text_encoder",), "unet_controlnet": ("unet",)}


# --- ONNX initializers ----------------------------------------------------------------------------


def onnx_initializers(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Every constant tensor of the graph by name: initializers and Constant-node values."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=True)
    tensors = {init.name: _to_torch(numpy_helper.to_array(init)) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors.setdefault(node.output[0], _to_torch(numpy_helper.to_array(attr.t)))
    return tensors


def _to_torch(array) -> torch.Tensor:
    import numpy as np

    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _digest(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


# --- weight map -------------------------------------------------------------------------------------


def _lora_weights(modules: Mapping[str, torch.nn.Module]) -> dict[tuple[str, str], torch.Tensor]:
    """The parameters a LoRA can patch, the weights of Linear and Conv2d modules, by (component, name)."""
    from diffrt.export.lora_fuse import patchable_state

    return {(c, p): t.cpu() for c, module in modules.items() for p, t in patchable_state(module).items()
            if p.endswith(".weight")}


def build_weight_map(onnx_path: str | Path, modules: Mapping[str, torch.nn.Module],
                     initializers: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Match the ONNX's initializers to the LoRA-patchable weights of `modules` ({lora component: module}).

    The ONNX must hold the same (base) weights as `modules`: matches are checked by value."""
    inits = dict(initializers) if initializers is not None else onnx_initializers(onnx_path)
    params = _lora_weights(modules)
    by_name: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for c, p in params:
        by_name[p].append((c, p))
    found: dict[str, dict] = {}
    ambiguous: dict[str, list[str]] = {}

    # 1. By name: the initializer's name ends with the parameter's, at a '.' boundary, same value.
    for name, value in inits.items():
        parts = name.split(".")
        for i in range(len(parts)):
            hits = [(c, p) for c, p in by_name.get(".".join(parts[i:]), ())
                    if params[c, p].shape == value.shape and torch.equal(params[c, p].to(value.dtype), value)]
            if len(hits) > 1:  # the same weights under two components: the name's prefix decides
                hits = [(c, p) for c, p in hits if c in parts[:i]] or hits
            if len(hits) == 1:
                found[name] = {"component": hits[0][0], "param": hits[0][1], "transpose": False}
                break
            if hits:
                ambiguous[name] = [f"{c}.{p}" for c, p in hits]
                break

    # 2. By value: constant-folded weights renamed by the exporter (MatMul weights are transposed).
    rest = {n: v for n, v in inits.items() if n not in found and n not in ambiguous and v.ndim in (2, 4)}
    index: dict[tuple, list[tuple[str, str, bool]]] = defaultdict(list)
    for dtype in {v.dtype for v in rest.values()}:
        for (c, p), t in params.items():
            t = t.to(dtype)
            index[dtype, tuple(t.shape), _digest(t)].append((c, p, False))
            if t.ndim == 2:
                index[dtype, tuple(t.shape[::-1]), _digest(t.T)].append((c, p, True))
    for name, value in rest.items():
        hits = index.get((value.dtype, tuple(value.shape), _digest(value)), [])
        if len(hits) == 1:
            c, p, transpose = hits[0]
            found[name] = {"component": c, "param": p, "transpose": transpose}
        elif hits:
            ambiguous[name] = [f"{c}.{p}" for c, p, _ in hits]

    # 3. One initializer for several equal weights: the TorchScript exporter merges identical constants, so a ControlNet
    # made from the UNet shares the UNet's initializers for the weights it has not changed, and its own copies are left
    # without one. Patching it for the UNet's LoRA patched the ControlNet too: it stands for both, ambiguous.
    located = {(e["component"], e["param"]) for e in found.values()}
    left = defaultdict(list)  # shape -> parameters with no initializer of their own
    for (c, p), t in params.items():
        if (c, p) not in located:
            left[tuple(t.shape)].append((c, p))
    for name, e in list(found.items()):
        value = inits[name].T if e["transpose"] else inits[name]
        shared = [f"{c}.{p}" for c, p in left.get(tuple(value.shape), ()) if torch.equal(params[c, p].to(value.dtype), value)]
        if shared:
            ambiguous[name] = [f"{e['component']}.{e['param']}", *shared]
            del found[name]

    located = {(e["component"], e["param"]) for e in found.values()}
    unlocated = sorted(f"{c}.{p}" for c, p in params if (c, p) not in located)
    if unlocated:
        log.info("%d LoRA-patchable weights have no initializer in %s (a LoRA on them will be refused): %s",
                 len(unlocated), onnx_path, ", ".join(unlocated[:5]))
    return {
        "format": MAP_FORMAT, "onnx_sha256": atomic.sha256_file(onnx_path), "weights": found,
        "params": {c: {p: list(params[c, p].shape) for cc, p in params if cc == c} for c in modules},
        "unlocated": unlocated, "ambiguous": ambiguous,
    }


def write_weight_map(onnx_path: str | Path, modules: Mapping[str, torch.nn.Module]) -> Path:
    """Build the weight map and store it beside the ONNX (call at export, while the module is loaded)."""
    onnx_path = Path(onnx_path)
    path = onnx_path.parent / WEIGHT_MAP
    atomic.write_json(path, build_weight_map(onnx_path, modules))
    return path


def add_weight_map(out: Path, name: str, modules: Mapping[str, torch.nn.Module], entry: dict) -> None:
    """Write component `name`'s weight map at export and list it among the entry's files."""
    path = write_weight_map(out / name / "model.onnx", modules)
    entry["files"][f"{name}/{WEIGHT_MAP}"] = atomic.sha256_file(path)


def read_weight_map(onnx_path: str | Path) -> dict | None:
    """The stored weight map of this ONNX, or None when missing or made for another ONNX."""
    path = Path(onnx_path).parent / WEIGHT_MAP
    if not path.is_file():
        return None
    try:
        wmap = json.loads(path.read_text())
    except ValueError:
        return None
    if wmap.get("format") != MAP_FORMAT or wmap.get("onnx_sha256") != atomic.sha256_file(onnx_path):
        return None
    return wmap


# --- weights for a refit (CPU) ----------------------------------------------------------------------


@dataclass
class RefitWeights:
    weights: dict[str, torch.Tensor]  # every constant of the ONNX: base, or the LoRAs fused into it where patched
    patched: list[str] = field(default_factory=list)  # initializer names that differ from base


def refuse_lora_biases(loras: Sequence[tuple[object, float]]) -> None:
    """One line naming the LoRA bias terms (lora_B.bias) of `loras`, which refit cannot set."""
    for lora, _ in loras:
        keys = [layer.key for layer in lora.layers if layer.bias is not None]
        if keys:
            raise ArtifactError(f"{lora.path} has LoRA bias terms (lora_B.bias, on {len(keys)} modules, e.g. {keys[0]}), "
                                "and `diffrt refit` sets weights, not biases; fuse it at open (--backend torch) or bake it "
                                "into an ONNX export (`diffrt export --backend onnx --lora FILE`)")


def refit_weights(onnx_path: str | Path, weight_map: dict, loras: Sequence[tuple[object, float]],
                  initializers: Mapping[str, torch.Tensor] | None = None) -> RefitWeights:
    """The LoRAs fused into the ONNX's base weights (in fp32, cast back). `loras` are (LoraFile,
    scale) pairs from `diffrt.export.lora.read_lora`. Pure: reads the base every time."""
    from diffrt.export.lora_fuse import fused_params

    refuse_lora_biases(loras)
    base = dict(initializers) if initializers is not None else onnx_initializers(onnx_path)
    targets: dict[tuple[str, str], list[tuple[str, bool]]] = defaultdict(list)
    for name, e in weight_map["weights"].items():
        targets[e["component"], e["param"]].append((name, e["transpose"]))
    # LoRA names are resolved against every patchable parameter, mapped or not, so that a LoRA
    # on an unmapped weight is named below instead of being reported as a foreign key.
    state: dict[str, dict[str, torch.Tensor]] = {}
    for c, shapes in weight_map["params"].items():
        state[c] = {}
        for p, shape in shapes.items():
            hit = targets.get((c, p))
            if hit:
                name, transpose = hit[0]
                state[c][p] = base[name].T if transpose else base[name]
            else:
                state[c][p] = torch.empty(shape, device="meta")
    # An engine holds some components (the text encoder's engine has no UNet): each takes the
    # LoRA layers of its own components; refit_components checks that every layer found an engine.
    loras = [(replace(f, layers=[x for x in f.layers if x.component in state]), scale) for f, scale in loras]
    loras = [(f, scale) for f, scale in loras if f.layers]
    # One plan and merge: an unmapped weight's base is a meta tensor, so its value is shape-only work,
    # and any such weight is refused below before a single value is used.
    fused = fused_params(state, loras)
    unmapped = [f"{c}.{p}" for c, params in fused.items() for p in params if (c, p) not in targets]
    if unmapped:
        raise ArtifactError(f"the LoRA patches {len(unmapped)} weights that {onnx_path} holds under no initializer diffrt "
                            f"could identify ({', '.join(sorted(unmapped)[:5])}); the engine cannot take this LoRA by refit: "
                            "export with --lora instead")
    out = dict(base)
    for c, params in fused.items():
        for p, value in params.items():
            for name, transpose in targets[c, p]:
                out[name] = (value.T if transpose else value).to(base[name].dtype)
    return RefitWeights(out, sorted(n for n in out if out[n] is not base[n]))


# --- engines (GPU) -----------------------------------------------------------------------------------


def refit_engine(engine_path: str | Path, weights: RefitWeights, device: str | torch.device = "cuda",
                 out: str | Path | None = None) -> dict:
    """Set every refittable weight of the engine from `weights`, then write the refit engine to `out` (default:
    rewrite `engine_path`), atomically."""
    from diffrt.export.tensorrt import trt_logger
    from diffrt.runtime.backends.tensorrt import load_engine

    engine_path = Path(engine_path)
    out = engine_path if out is None else Path(out)
    device = torch.device(device)
    trt, _runtime, engine = load_engine(engine_path, device)
    logger = trt_logger()
    with torch.cuda.device(device):
        counts = set_engine_weights(trt, open_refitter(trt, engine, engine_path, logger), weights, engine_path, logger.errors)
        plan = engine.serialize()
    atomic.write_bytes(out, memoryview(plan))
    return {**counts, "sha256": atomic.sha256_file(out)}


def open_refitter(trt, engine, engine_path: Path, logger):
    """A trt.Refitter on `engine`, or one line saying the engine was built without REFIT (TensorRT
    would only log that and hand back a refitter whose every call fails)."""
    if not engine.refittable:
        raise ArtifactError(f"{engine_path} was built without BuilderFlag.REFIT, so its weights cannot be swapped; rebuild it "
                            "with `diffrt export --backend tensorrt`")
    return trt.Refitter(engine, logger)


def set_engine_weights(trt, refitter, weights: RefitWeights, engine_path: Path, errors: list[str]) -> dict:
    """Drive one TensorRT Refitter: set *every* refittable weight the ONNX holds (patched or base), never
    only the patched ones, so no value of an earlier refit survives (RELIABILITY #8), then refit."""
    from diffrt.export.tensorrt import error_mark, errors_since
    from diffrt.runtime.backends.tensorrt import torch_dtype

    refittable = set(refitter.get_all_weights())
    absent = sorted(n for n in weights.patched if n not in refittable)
    if absent:
        raise ArtifactError(f"{engine_path}: TensorRT folded weights the LoRA patches into others, so they cannot be refit "
                            f"({', '.join(absent[:5])}); export with --lora instead")
    keep = []  # TensorRT reads the host weights during refit_cuda_engine: keep them alive until then
    for name in sorted(refittable & weights.weights.keys()):
        proto = refitter.get_weights_prototype(name)
        if proto.size == 0:
            continue
        t = weights.weights[name].to(torch_dtype(trt, proto.dtype)).contiguous().cpu()
        if t.numel() != proto.size:
            raise ArtifactError(f"{engine_path}: weight {name} has {proto.size} values in the engine, {t.numel()} in the "
                                "ONNX; rebuild the engine")
        keep.append(t)
        if not refitter.set_named_weights(name, trt.Weights(proto.dtype, t.data_ptr(), t.numel())):
            raise ArtifactError(f"{engine_path}: TensorRT refused new values for weight {name}")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise ArtifactError(f"{engine_path}: refit needs weights that are not in the ONNX: {', '.join(missing[:5])}; "
                            "rebuild the engine")
    start = error_mark(errors)
    if not refitter.refit_cuda_engine():
        why = " | ".join(errors_since(errors, start)[-2:]) or "no error logged"
        raise ArtifactError(f"{engine_path}: TensorRT could not refit the engine [{why}]")
    del keep
    return {"refittable": len(refittable), "set": len(refittable & weights.weights.keys()), "patched": len(weights.patched),
            "not_in_onnx": sorted(refittable - weights.weights.keys())}


# --- artifact ----------------------------------------------------------------------------------------


def _source_modules(folder: Path, manifest: dict, component: str) -> dict[str, torch.nn.Module]:
    """{lora component: module} of the source model, for a weight map made at refit time."""
    source = Path(manifest["source"]["path"])
    if manifest.get("kind") != "pixel" or component != "unet":
        raise ArtifactError(f"{folder / component} has no {WEIGHT_MAP}; re-export the artifact with this diffrt to refit it")
    if not source.is_dir() or atomic.sha256_folder(source) != manifest["source"]["sha256"]:
        raise ArtifactError(f"{folder / component} has no {WEIGHT_MAP} and its source model {source} is missing or changed "
                            "since export; re-export the artifact to refit it")
    from diffrt.models import load_pixel_model

    return {"unet": load_pixel_model(source).unet.unet}


def lora_engines(manifest: dict) -> list[str]:
    """The components whose engines take LoRA: those with an engine that hold a UNet or text encoder."""
    return [name for name, comp in manifest["components"].items() if "engine" in comp and name in LORA_COMPONENTS]


def refittable_engines(folder: Path, manifest: dict) -> list[str]:
    """The engines of `folder` that take a LoRA by refit; ArtifactError, saying what to do, where there are none."""
    baked = manifest.get("onnx_loras", manifest.get("loras", []))
    if baked:
        raise ArtifactError(f"{folder}: its ONNX has LoRA {', '.join(Path(x['path']).name for x in baked)} baked in, and a "
                            "refit must start from base weights; re-export without --lora, then `diffrt refit`")
    engines = lora_engines(manifest)
    if not engines:
        have = [name for name, comp in manifest["components"].items() if "engine" in comp]
        if have:
            raise ArtifactError(f"{folder} has engines only for {', '.join(have)}, which take no LoRA; refit patches "
                                f"{', '.join(LORA_COMPONENTS)} engines")
        raise ArtifactError(f"{folder} has no TensorRT engine to refit; export it with `diffrt export --backend tensorrt`")
    return engines


def refit_components(folder: Path, manifest: dict, loras: Sequence[tuple[str | Path, float]],
                     device: str | torch.device = "cuda") -> dict:
    """Refit the LoRA-taking engines of `folder` with `loras` [(file, scale)], from the base weights,
    and record the result in `manifest`, which the caller writes (last). No LoRA restores the base."""
    from diffrt.export import manifest as mf
    from diffrt.export.lora import read_lora
    from diffrt.runtime.lora_scale import check_lora_pairs

    loras = check_lora_pairs(loras)  # a NaN or inf scale was refit into every engine, and recorded
    engines = refittable_engines(folder, manifest)
    for name in engines:
        mf.check_engine_compatible(manifest["components"][name]["engine"], device)  # the GPU the refit loads them on
    files = [(read_lora(path), scale) for path, scale in loras]
    refuse_lora_biases(files)  # before any weight map is written
    parts = [{"path": str(Path(f.path).resolve()), "sha256": f.sha256, "scale": s, "modules": len(f.layers)} for f, s in files]

    # Weights for every engine first (CPU; raises before any engine changes), then refit.
    maps = {}
    for name in engines:
        onnx_path = folder / name / "model.onnx"
        maps[name] = read_weight_map(onnx_path)
        if maps[name] is None:
            write_weight_map(onnx_path, _source_modules(folder, manifest, name))
            maps[name] = read_weight_map(onnx_path)
    covered = {c for name in engines for c in LORA_COMPONENTS[name]}
    orphans = sorted({x.component for f, _ in files for x in f.layers} - covered)
    if orphans:
        raise ArtifactError(f"the LoRA has {', '.join(orphans)} weights but no engine of {folder} takes them (LoRA engines: "
                            f"{', '.join(engines)}); refit patches {', '.join(sorted(covered))} weights only")
    plans = {name: refit_weights(folder / name / "model.onnx", maps[name], files) for name in engines}
    report = {}
    # Each engine refit into a temporary beside its plan, all put in place only once every one has succeeded: a
    # failure on the second (TensorRT refused a weight, Ctrl-C, out of memory) left the first rewritten, its hash no
    # longer the manifest's, and the artifact refused by everything, `diffrt refit` itself included.
    with contextlib.ExitStack() as publish:
        for name in engines:
            plan = folder / name / "engine.plan"
            result = refit_engine(plan, plans[name], device, out=publish.enter_context(atomic.atomic_path(plan)))
            report[name] = result
            log.info("refit %s: %d of %d weights patched", plan, result["patched"], result["set"])
    for name in engines:
        comp = manifest["components"][name]
        comp["engine"].update(sha256=report[name]["sha256"], loras=parts)
        # The engine was hashed as refit_engine wrote it; the weight map may have been written just now.
        comp["files"].update({f"{name}/engine.plan": report[name]["sha256"],
                              f"{name}/{WEIGHT_MAP}": atomic.sha256_file(folder / name / WEIGHT_MAP)})
        comp["bytes"] = sum((folder / rel).stat().st_size for rel in comp["files"])
    manifest.update(loras=parts, onnx_loras=[])
    return report


def refit_artifact(folder: str | Path, loras: Sequence[tuple[str | Path, float]], device: str | torch.device = "cuda") -> dict:
    """Refit the engines of an artifact folder with `loras` [(file, scale)], from the base weights.

    No LoRA restores the base engines. Running backends keep the engine they loaded: reopen them."""
    from diffrt.export import manifest as mf

    t0 = time.perf_counter()
    folder = Path(folder)
    # What the folder is first (no artifact, an ONNX one), then whether TensorRT runs here: on a machine without it,
    # "TensorRT is not available" hid a mistyped folder until the user had found a GPU. is_artifact waits for an
    # export rebuilding the folder, as the lock below does; then a look only, unlocked.
    from diffrt.runtime.loading import is_artifact

    is_artifact(folder)
    refittable_engines(folder, mf.read_manifest(folder))
    require_backend("tensorrt")  # one line naming the backends here, before any work
    with mf.artifact_lock(folder):  # the lock `diffrt export` takes
        manifest = mf.read_manifest(folder)
        mf.verify_files(folder, manifest)
        report = refit_components(folder, manifest, loras, device)
        # The manifest last: until it is written the engines' hashes differ and the folder is refused.
        manifest["refit"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        mf.write_manifest(folder, manifest)
    return {"folder": str(folder), "loras": manifest["loras"], "components": report, "seconds": round(time.perf_counter() - t0, 3)}
