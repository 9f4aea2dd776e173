"""`diffrt export` for a Stable Diffusion folder: text encoder, UNet (fused with the ControlNets when
any are given, plus the ControlNets alone) and VAE decoder, with LoRA baked into ONNX-only exports
and refit into TensorRT engines built from the base weights (artifact.py says why).

    artifact/
      manifest.json              kind "text-to-image", written last
      text_encoder/model.onnx
      unet/model.onnx            or unet_controlnet/ (one graph, conditioning scales an input) + controlnet/
      vae_decoder/model.onnx
      vae_encoder/model.onnx     with --vae-encoder: image-to-image encodes on the backend too
      tokenizer/                 copied, so the artifact tokenizes prompts without the source folder

Several ControlNets (`--controlnet DIR` repeated) are exported as diffusers' MultiControlNetModel:
still one `unet_controlnet` graph and one `controlnet` graph (their residuals summed), taking the K
conditioning images stacked on the channel axis ([batch, 3K, H, W]) and K scales, in the order
given. The manifest lists the ControlNet folders in that order (source.controlnets) and hashes
each (source.parts: "controlnet" for one, "controlnet_0".. for several), so the cache key and the
check at load time cover the set and its order.

Each component goes through `artifact._export_component` (ONNX, parity against PyTorch, engine,
manifest entry), the same as pixel models. Shape ranges are given in image pixels and stored in
latent pixels (/8). The VAE decoder (and encoder) stays fp32 when its config says `force_upcast` (RELIABILITY #5:
fp16 VAEs overflow into black images). The encoder graph stops at the posterior's mean and log-variance: the
pipeline draws the sample from the call's generators, so a seed means what it means in diffusers' img2img. Exporting again with unchanged inputs is a cache hit. A rebuild
exports only the components whose inputs changed (`component_keys`: a LoRA baked into an ONNX export
rebuilds the UNet and text encoder, not the VAE) and keeps the others as they are, logging "reusing NAME".
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from diffrt import atomic
from diffrt.components import spec_to_dict
from diffrt.errors import DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.artifact import TOKENIZER_PATTERNS, _check_loras, _export_component, check_out_apart, refit_before_manifest
from diffrt.export.cache import begin_rebuild, cached_export, check_loras_unchanged, component_key, export_key, lora_hashes, raise_changed
from diffrt.export.options import check_options, ExportOptions, ExportResult, Precision, TORCH_DTYPES
from diffrt.export.refit import LORA_COMPONENTS
from diffrt.models import check_smallest_shape
from diffrt.text_to_image_models import (SOURCE_PARTS, TextToImageModel, check_unet_config, component_specs,
                                         global_pool_conditions, load_text_to_image, require_text_to_image_folder)

log = logging.getLogger(__name__)


def component_names(controlnet: bool, vae_encoder: bool = False) -> list[str]:
    """What an artifact holds: the UNet alone, or fused with the ControlNets (plus the ControlNets alone), and
    the VAE encoder when asked for (image-to-image on the backend; without it, img2img encodes in PyTorch)."""
    unet = ["unet_controlnet", "controlnet"] if controlnet else ["unet"]
    return ["text_encoder", *unet, "vae_decoder", *(["vae_encoder"] if vae_encoder else [])]


def build_precision(name: str, precision: Precision, force_upcast: bool) -> Precision:
    """The VAE keeps fp32 where the model asks for it (`force_upcast`), whatever the export's precision: its
    decoder, and its encoder, which diffusers' img2img upcasts alike."""
    return "fp32" if name in ("vae_decoder", "vae_encoder") and force_upcast else precision


def controlnet_parts(n: int) -> list[str]:
    """Source-part names of n ControlNets: "controlnet" for one (the name single-ControlNet artifacts
    have always used, so their keys are unchanged), "controlnet_0".."controlnet_{n-1}" for several."""
    return ["controlnet"] if n == 1 else [f"controlnet_{i}" for i in range(n)]


def source_hashes(model_dir: Path, controlnets: Sequence[str | Path] = ()) -> dict[str, str]:
    """sha256 of each source part: the cache key, and the check before a PyTorch fallback is loaded."""
    parts = {part: atomic.sha256_folder(model_dir / part, ("*.safetensors", *TOKENIZER_PATTERNS)) for part in SOURCE_PARTS}
    for part, folder in zip(controlnet_parts(len(controlnets)), controlnets):
        parts[part] = atomic.sha256_folder(folder)
    return parts


def exported_controlnets(manifest: dict) -> list[tuple[Path, str]]:
    """An artifact's ControlNets in order: (folder at export, sha256). Artifacts from before several
    ControlNets were supported name their one folder in source.controlnet."""
    source = manifest["source"]
    paths = source.get("controlnets")
    if paths is None:
        paths = [source["controlnet"]] if source.get("controlnet") else []
    return [(Path(p), source["parts"][part]) for p, part in zip(paths, controlnet_parts(len(paths)))]


def export_text_to_image(model_dir: Path, out: Path, options: ExportOptions, controlnets: Sequence[str | Path]) -> ExportResult:
    """Export a text-to-image folder (+ any ControlNets, in order, + LoRA files) into an artifact folder."""
    t0 = time.perf_counter()
    check_options(options, Path(out))
    model_dir, out = require_text_to_image_folder(model_dir), Path(out)
    controlnets = [Path(c) for c in controlnets]
    check_out_apart(out, [model_dir / part for part in SOURCE_PARTS] + controlnets)
    model = load_text_to_image(model_dir, controlnets, weights=False)  # configs only: enough for the key
    check_unet_config(model.unet.config, str(model_dir / "unet"))  # a UNet needing inputs the pipeline never feeds
    size = (model.default_size,) * 3
    specs = component_specs(model, component_names(bool(controlnets), options.vae_encoder), batch=options.batch,
                            height=options.height or size, width=options.width or options.height or size)
    for name in ("unet", "unet_controlnet", "controlnet"):
        if name in specs:
            ranges, f = specs[name].ranges, model.vae_factor
            check_smallest_shape(model.one_value_side, ranges["batch"][0], ranges["height"][0] * f, ranges["width"][0] * f,
                                 f"the {name}")
    force_upcast = bool(getattr(model.vae.config, "force_upcast", False))
    precisions = {name: build_precision(name, options.precision, force_upcast) for name in specs}
    hashes = source_hashes(model_dir, controlnets)
    lora_parts = lora_hashes(options)
    # The tokenizer files the artifact holds are in the key: one made when fewer were copied (added_tokens.json was
    # left behind) is no hit, and its rebuild keeps every component, copying the tokenizer again.
    key = export_key({"kind": "text-to-image", "source": hashes, "precision": precisions,
                      "specs": {n: spec_to_dict(s, TORCH_DTYPES[precisions[n]]) for n, s in specs.items()},
                      "tokenizer_files": tokenizer_files(model_dir / "tokenizer")}, options)
    sources = {"path": str(model_dir.resolve()), "controlnets": [str(c.resolve()) for c in controlnets]}
    hit = cached_export(out, key, t0, lora_parts, verified=options.verify, sources=sources)
    if hit is not None:
        return hit
    atomic.check_writable(out, folder=True)  # a hit writes nothing: checked on a miss only
    model = load_text_to_image(model_dir, controlnets)  # a miss: now the weights
    if source_hashes(model_dir, controlnets) != hashes:
        raise_changed(model_dir)

    # LoRA files are checked against the model before the old export is touched (RELIABILITY #7).
    bake = bool(options.loras) and options.backend != "tensorrt"
    fused = _fuse_loras(model, options.loras) if bake else []
    check_loras_unchanged(fused, lora_parts)
    if options.loras and not bake:
        _check_loras({"unet": model.unet, "text_encoder": model.text_encoder}, options.loras)
    keys = component_keys(specs, precisions, hashes, fused, options)
    with mf.artifact_lock(out):
        # The new export is built in a staging folder while the previous one stays in place and runs; the old
        # components whose inputs this export leaves unchanged are kept (their files and manifest entries), the rest exported.
        hit, rebuild = begin_rebuild(out, key, t0, lora_parts, options, sources, keys)
        if hit is not None:
            return hit
        stage, kept = rebuild.stage, rebuild.kept
        components = {}
        # Minutes per component at SD-1.5 size (ONNX, parity run, TensorRT build): show which one is under way.
        with tqdm(specs.items(), desc="export", unit="component", leave=False, disable=None) as bar:  # None: on a terminal only
            for name, spec in bar:
                bar.set_postfix_str(name)
                if name in kept:
                    log.info("reusing %s (unchanged)", name)
                    components[name] = kept[name]  # as it was, weight map and refit LoRAs included
                    continue
                entry = _export_component(model.module(name), spec, stage, options, precisions[name])
                if options.backend == "tensorrt" and name in LORA_COMPONENTS:
                    _add_weight_map(stage, name, model, entry)
                components[name] = {**entry, "component_key": keys[name]}
                # A stopped rebuild resumes from here: what it kept (reached or not) and what it has finished.
                rebuild.record(components)
        baked = [{**part, "modules": f.get("num_modules")} for part, f in zip(lora_parts, fused)]
        manifest = {
            "key": key, "kind": "text-to-image", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {**sources, "sha256": mf.cache_key(hashes), "parts": hashes},
            "loras": baked, "onnx_loras": baked,
            "precision": options.precision, "opset": options.onnx_opset, "exporter": options.exporter,
            "versions": mf.library_versions(),
            "pipeline": {
                "scheduler": model.scheduler.to_scheduler_config(),
                "tokenizer": _copy_tokenizer(model_dir / "tokenizer", stage / "tokenizer"),
                "vae_scaling_factor": float(model.vae.config.scaling_factor),
                "vae_force_upcast": force_upcast,
                "vae_factor": model.vae_factor,
                "default_size": model.default_size,
                "max_length": model.max_length,
                "unet": "unet_controlnet" if controlnets else "unet",
                "controlnet_global_pool": global_pool_conditions(model.controlnet),
            },
            "components": components,
        }
        refit_before_manifest(stage, manifest, options)
        written = rebuild.finish(manifest)
    log.info("exported %s to %s in %.1f s", model_dir, out, time.perf_counter() - t0)
    return ExportResult(out, False, written, time.perf_counter() - t0)


def component_sources(name: str, hashes: dict[str, str]) -> dict[str, str]:
    """The source parts traced into component `name`, with their sha256: the text encoder's graph is the
    text encoder's alone (the tokenizer only sets the sequence length, which is in its spec), the UNet's
    the UNet's, the VAE's the VAE's; the fused graph holds the UNet and the ControlNets, the standalone
    ControlNet graph the ControlNets only (part names controlnet, or controlnet_0.. in order)."""
    controlnets = [part for part in hashes if part == "controlnet" or part.startswith("controlnet_")]
    parts = {"text_encoder": ["text_encoder"], "unet": ["unet"], "unet_controlnet": ["unet", *controlnets],
             "controlnet": controlnets, "vae_decoder": ["vae"], "vae_encoder": ["vae"]}[name]
    return {part: hashes[part] for part in parts}


def component_keys(specs: dict, precisions: dict[str, Precision], hashes: dict[str, str], fused: list[dict],
                   options: ExportOptions) -> dict[str, str]:
    """Each component's key (cache.component_key). `fused`: the LoRAs baked into the modules (ONNX-only
    exports; [] for TensorRT, which refits), each with the modules it patched by LoRA component, so that a
    LoRA enters the key of the components whose weights it changed (UNet and fused UNet+ControlNet: "unet";
    text encoder: "text_encoder") and of no other."""
    def baked(name: str) -> list[dict]:
        return [f for f in fused if any(f.get("modules", {}).get(c) for c in LORA_COMPONENTS.get(name, ()))]

    return {name: component_key(spec, precisions[name], component_sources(name, hashes), baked(name), options)
            for name, spec in specs.items()}


def _fuse_loras(model: TextToImageModel, loras: list[tuple[str, float]]) -> list[dict]:
    """Bake the LoRA files into the UNet and text encoder (a file matching nothing is an error, RELIABILITY #7)."""
    if not loras:
        return []
    from diffrt.export.lora_fuse import fuse_lora_files

    return fuse_lora_files({"unet": model.unet, "text_encoder": model.text_encoder}, loras).to_dict()["loras"]


def tokenizer_files(src: Path) -> list[str]:
    """The names of the tokenizer files an export copies."""
    return sorted(p.name for p in src.iterdir() if p.is_file() and any(p.match(pattern) for pattern in TOKENIZER_PATTERNS))


def _copy_tokenizer(src: Path, dst: Path) -> dict:
    """Copy the tokenizer files into the artifact; return their sha256 for the manifest."""
    names = tokenizer_files(src)
    if "vocab.json" not in names and "tokenizer.json" not in names:
        raise DiffrtError(f"{src} has neither vocab.json nor tokenizer.json; expected a CLIPTokenizer folder")
    # A file an earlier export copied and this source lacks would stay beside the new ones, unlisted in
    # the manifest, and the tokenizer would read it (tokenizer.json is preferred to vocab.json + merges.txt).
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        with atomic.atomic_path(dst / name) as tmp:
            shutil.copyfile(src / name, tmp)
    return {"folder": dst.name, "files": mf.hash_files(dst, names)}


def _add_weight_map(out: Path, name: str, model: TextToImageModel, entry: dict) -> None:
    """Record which ONNX initializer holds which base weight, so `diffrt refit` can swap LoRAs into the engine.

    The fused graph gets the ControlNets' weights too: a ControlNet made from the UNet starts with
    equal copies of its weights, and only the name prefix tells them apart (several ControlNets are
    one MultiControlNetModel, whose parameters are named nets.0..., nets.1...)."""
    from diffrt.export.refit import add_weight_map

    if name == "text_encoder":
        modules = {"text_encoder": model.text_encoder}
    else:
        modules = {"unet": model.unet, **({"controlnet": model.controlnet} if name == "unet_controlnet" else {})}
    add_weight_map(out, name, modules, entry)
