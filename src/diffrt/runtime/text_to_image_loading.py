"""Open a text-to-image pipeline: a diffusers Stable Diffusion folder or an artifact from `diffrt export`,
on the backend asked for. The text-to-image counterpart of loading.py: the one place that knows
which backend runs each component.

LoRA: on the torch backend LoRA files are fused into the PyTorch UNet and text encoder when the
pipeline opens; an exported artifact has its LoRA baked in at export (ONNX) or refit into its
engines (TensorRT), so asking for other LoRAs there is an error (re-export, or `diffrt refit`).
`set_lora_scale` changes the strength of the LoRA that runs where the weights allow it
(lora_scale.py): PyTorch re-fuses, refit engines refit again, ONNX graphs keep theirs. The PyTorch fallbacks of an
artifact (VAE for guidance and img2img, UNet for "through_unet") are loaded from the source folder
on first use, after checking its hashes, with the same LoRA files at the same scales (RELIABILITY #16).

ControlNets: `controlnet` is one folder or a list (diffusers' MultiControlNetModel, in order). An
artifact carries the ControlNets it was exported with; naming any other set or order is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from diffrt import atomic
from diffrt.errors import ArtifactError
from diffrt.export import manifest as mf
from diffrt.hub import resolve_model
from diffrt.models import read_config
from diffrt.runtime.backends import TORCH_BACKENDS, require_backend, resolve_device
from diffrt.runtime.ddim import DDIMConfig
from diffrt.runtime.loading import (OPEN_BATCH, artifact_lora, check_artifact_loras, check_source, component_precision, is_artifact,
                                    manifest_loras, open_component, read_artifact, refuse_source_fallback)
from diffrt.runtime.lora_scale import Loras, TorchLora, scaled
from diffrt.runtime.text_to_image import TextToImagePipeline
from diffrt.text_to_image_models import (SOURCE_PARTS, TextToImageModel, check_unet_config, component_specs, controlnet_paths,
                                         global_pool_conditions, index_scheduler_class, load_controlnets, load_text_to_image, load_tokenizer, load_unet,
                                         load_vae, require_text_to_image_folder)

log = logging.getLogger(__name__)

OPEN_SIZE = 1 << 14  # and any image side up to this, in pixels
ControlNets = str | Path | Sequence[str | Path] | None  # one folder, or several in order (MultiControlNetModel)


def check_scheduler_class(folder: Path) -> None:
    """diffrt samples a folder with the sampler its scheduler/scheduler_config.json names (LCM for
    LCMScheduler, DPM-Solver++ for DPMSolverMultistepScheduler, Euler for EulerDiscreteScheduler, Euler
    Ancestral for EulerAncestralDiscreteScheduler, else DDIM) on every backend, since that
    file is what an export carries; diffusers' from_pretrained builds the class model_index.json names.
    A folder whose two files disagree about the sampler (a hand-edited config) is sampled as its config
    says, with a warning naming both."""
    index, config = folder / "model_index.json", folder / "scheduler" / "scheduler_config.json"
    if not (index.is_file() and config.is_file()):
        return
    listed = index_scheduler_class(folder)
    try:
        named = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError):  # not a JSON object: nothing to compare (the loaders name a bad config)
        return
    if listed and named and _sampler_of(listed) != _sampler_of(named):
        log.warning("%s names %s but %s names %s; diffrt samples with %s, as the scheduler config says "
                    "(diffusers' from_pretrained would build %s); pass scheduler='ddim', 'lcm', 'dpm', 'euler' or 'euler_a' to choose",
                    index, listed, config, named, _sampler_of(named), listed)


def _sampler_of(scheduler_class: str) -> str:
    """The sampler diffrt runs for a diffusers scheduler class named in a folder."""
    return {"LCMScheduler": "LCM", "DPMSolverMultistepScheduler": "DPM-Solver++", "EulerDiscreteScheduler": "Euler",
            "EulerAncestralDiscreteScheduler": "Euler Ancestral"}.get(scheduler_class, "DDIM")


def check_unet_folder(folder: Path) -> None:
    """check_unet_config on a folder's unet/config.json, before any weight is read."""
    path = folder / "unet" / "config.json"
    if path.is_file():
        check_unet_config(read_config(path), str(path))


def torch_text_to_image_pipeline(model: TextToImageModel, device: str | torch.device = "cpu", compile: bool = False,
                                 loras: Loras = ()) -> TextToImagePipeline:
    """Every component in eager PyTorch (or torch.compile), LoRA files fused into the UNet and text
    encoder (at a strength `set_lora_scale` changes)."""
    from diffrt.runtime.backends.torch_eager import TorchBackend

    check_unet_config(model.unet.config)
    m = model.image_multiple
    names = ["text_encoder", "unet_controlnet" if model.controlnet is not None else "unet", "vae_decoder"]
    size = (m, max(m, model.default_size // m * m), OPEN_SIZE // m * m)
    # Any multiple of the VAE's factor, as diffusers' pipelines allow: eager PyTorch needs no more.
    specs = component_specs(model, [*names, "vae_encoder"], batch=OPEN_BATCH, height=size, width=size, multiple=1)
    specs = {name: dataclasses.replace(spec, eager=True) for name, spec in specs.items()}
    text_encoder, unet, vae_decoder = (TorchBackend(model.module(n), specs[n], device=device, compile=compile) for n in names)
    # img2img's encoder runs once per call: eager even under torch.compile (a compile per image size would cost more).
    vae_encoder = TorchBackend(model.module("vae_encoder"), specs["vae_encoder"], device=device)
    # After the backends moved the modules to their device: the LoRA keeps the base of the weights that run.
    lora = TorchLora({"unet": model.unet, "text_encoder": model.text_encoder}, loras) if loras else None
    return TextToImagePipeline(text_encoder, unet, vae_decoder, model.tokenizer, model.scheduler,
                               vae_scaling_factor=float(model.vae.config.scaling_factor), vae_factor=model.vae_factor,
                               default_size=model.default_size, torch_vae=model.vae, torch_unet=unet.module, lora=lora,
                               vae_encoder=vae_encoder, controlnet_global_pool=global_pool_conditions(model.controlnet),
                               one_value_side=model.one_value_side)


def _global_pool(manifest: dict) -> list[bool]:
    """The artifact's ControlNets' global_pool_conditions; from their configs, where they still are, for an
    artifact exported before diffrt recorded them."""
    flags = manifest["pipeline"].get("controlnet_global_pool")
    if flags is not None:
        return [bool(f) for f in flags]
    configs = [folder / "config.json" for folder in _controlnet_folders(manifest)]
    return [config.is_file() and bool(json.loads(config.read_text()).get("global_pool_conditions", False)) for config in configs]


def _controlnet_folders(manifest: dict) -> list[Path]:
    """The artifact's ControlNet folders at export, in order."""
    from diffrt.export.text_to_image import exported_controlnets

    return [path for path, _ in exported_controlnets(manifest)]


def _controlnet_parts(manifest: dict) -> list[str]:
    from diffrt.export.text_to_image import controlnet_parts

    n = len(_controlnet_folders(manifest))
    return controlnet_parts(n) if n else []


def _check_requests(folder: Path, manifest: dict, loras: Loras, controlnet: ControlNets) -> None:
    """An artifact runs with the LoRA and ControlNets it was exported with: anything else is an error."""
    from diffrt.export.text_to_image import exported_controlnets

    check_artifact_loras(folder, manifest, loras)
    asked = controlnet_paths(controlnet)
    if asked:
        exported = exported_controlnets(manifest)
        flags = " ".join(f"--controlnet {c}" for c in asked)
        if not exported:
            raise ArtifactError(f"{folder} was exported without a ControlNet; re-export with {flags}")
        if [atomic.sha256_folder(c) for c in asked] != [digest for _, digest in exported]:
            have = ", ".join(str(p) for p, _ in exported)
            raise ArtifactError(f"{folder} was exported with {_count(len(exported))} ({have}, in this order), not "
                                f"{_count(len(asked))} ({', '.join(map(str, asked))}); re-export with {flags}, "
                                "or open it without naming ControlNets")


def _count(n: int) -> str:
    return f"{n} ControlNet{'s' if n != 1 else ''}"


def artifact_text_to_image_pipeline(folder: str | Path, backend: str, device: str | torch.device | None = None,
                                    loras: Loras = (), controlnet: ControlNets = None, *, strict: bool = False,
                                    cuda_graph: bool = True) -> TextToImagePipeline:
    """A pipeline over an exported artifact; its files are checked against the manifest first.
    `device` None: auto (resolve_device); `strict` and `cuda_graph` as for loading.open_component."""
    device = resolve_device(device, backend)
    folder = Path(folder)
    with mf.artifact_lock(folder, shared=True):  # no export or refit rewrites it while it is read
        manifest = read_artifact(folder, "text-to-image")
        pipe = manifest["pipeline"]  # read_artifact checked every file the manifest lists, the tokenizer's too (verify_files)
        _check_requests(folder, manifest, loras, controlnet)
        unet_name = pipe["unet"]
        names = ["text_encoder", unet_name, "vae_decoder", *(["vae_encoder"] if "vae_encoder" in manifest["components"] else [])]
        opened = {n: open_component(folder, manifest, n, backend, device, strict=strict, cuda_graph=cuda_graph) for n in names}
        lora = artifact_lora(folder, manifest, backend, {"text_encoder": opened["text_encoder"], unet_name: opened[unet_name]})
        tokenizer = load_tokenizer(folder / pipe["tokenizer"]["folder"])
    text_encoder, unet, vae_decoder = opened["text_encoder"], opened[unet_name], opened["vae_decoder"]
    vae_encoder = opened.get("vae_encoder")  # exported with --vae-encoder

    # The PyTorch fallbacks, loaded on first use; the pipeline moves them to its device.
    def torch_vae():
        return load_vae(check_source(manifest, ["vae"]))

    def torch_unet():
        from diffrt.text_to_image_models import LatentUNet, UNetControlNet

        fused = unet_name == "unet_controlnet"
        base = load_unet(check_source(manifest, ["unet", *_controlnet_parts(manifest)] if fused else ["unet"]))
        loras = scaled(manifest_loras(manifest), lora.scale if lora is not None else 1.0)
        if loras:  # the UNet part: the text encoder's is in the exported text encoder
            from diffrt.export.lora_fuse import fuse_lora_files

            fuse_lora_files({"unet": base}, loras, layers_of=("unet",))
        return UNetControlNet(base, load_controlnets(_controlnet_folders(manifest))) if fused else LatentUNet(base)

    return TextToImagePipeline(text_encoder, unet, vae_decoder, tokenizer,
                               DDIMConfig.from_scheduler_config(pipe["scheduler"]), vae_scaling_factor=pipe["vae_scaling_factor"],
                               vae_factor=pipe["vae_factor"], default_size=pipe["default_size"], max_length=pipe["max_length"],
                               torch_vae=torch_vae, torch_unet=torch_unet, unet_precision=component_precision(manifest, unet_name),
                               lora=lora, vae_encoder=vae_encoder, strict=strict, controlnet_global_pool=_global_pool(manifest))


def open_text_to_image_pipeline(model: str | Path, backend: str = "torch", device: str | torch.device | None = None,
                                loras: Loras = (), controlnet: ControlNets = None,
                                export_options=None, *, strict: bool = False, cuda_graph: bool = True) -> TextToImagePipeline:
    """The pipeline for `diffrt generate` and library users: a diffusers folder or an artifact, any backend.
    `controlnet`: one ControlNet folder or a list of them (their images and scales go in the same order).

    An exported backend over a diffusers folder exports it (with the LoRA baked in, and the VAE encoder)
    into the user cache first, and reuses that export on the next run. `device` None: CUDA when available
    (resolve_device); `strict`: any fallback is an error; `cuda_graph`: TensorRT only. `backend` is run as given:
    "torch" over an artifact runs its source's PyTorch weights (logged); `diffrt.open_pipeline` runs an artifact
    on the backend it was exported for."""
    require_backend(backend)
    device = resolve_device(device, backend)
    folder = resolve_model(model)  # a Hub id: its snapshot in the Hugging Face cache
    if controlnet is not None:
        controlnet = [resolve_model(c) for c in controlnet_paths(controlnet)]
    torch_backend = backend in TORCH_BACKENDS
    if is_artifact(folder):
        if not torch_backend:
            return artifact_text_to_image_pipeline(folder, backend, device, loras, controlnet, strict=strict, cuda_graph=cuda_graph)
        refuse_source_fallback(folder, backend, strict)
        manifest = read_artifact(folder, "text-to-image", verify=False)
        _check_requests(folder, manifest, loras, controlnet)
        source = check_source(manifest, [*SOURCE_PARTS, *_controlnet_parts(manifest)])
        loaded = load_text_to_image(source, _controlnet_folders(manifest))
        return torch_text_to_image_pipeline(loaded, device, backend == "torch-compile", loras or manifest_loras(manifest))
    require_text_to_image_folder(folder)
    check_unet_folder(folder)
    check_scheduler_class(folder)
    if torch_backend:
        return torch_text_to_image_pipeline(load_text_to_image(folder, controlnet), device, backend == "torch-compile", loras)
    from diffrt.export.options import default_artifact_dir, ExportOptions
    from diffrt.export.text_to_image import export_text_to_image

    # With the VAE encoder: an image-to-image call then runs on the backend too (a small graph beside the UNet).
    default = ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx", vae_encoder=True)
    options = dataclasses.replace(export_options or default, loras=[(str(p), float(s)) for p, s in loras])
    out = default_artifact_dir(folder, options)
    controlnets = controlnet_paths(controlnet)
    if controlnets:  # one cached export per set and order of ControlNets
        out = out.with_name(f"{out.name}-controlnet-{'-'.join(atomic.sha256_folder(c)[:12] for c in controlnets)}")
    result = export_text_to_image(folder, out, options, controlnets)
    log.info("%s export %s", "reused" if result.cache_hit else "made", out)
    return artifact_text_to_image_pipeline(out, backend, device, strict=strict, cuda_graph=cuda_graph)
