"""Open a model for generation: a diffusers folder, an artifact folder from `diffrt export`, or
(with no model given) the shipped digits model, on the backend asked for.

This is the one place that knows which backend runs a component; the pipeline only sees
`Backend`s. An exported backend over a diffusers folder exports into the user cache first
(reused on the next run).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from diffrt import atomic
from diffrt.components import pixel_unet_spec, spec_from_dict
from diffrt.errors import ArtifactError, BackendUnavailableError
from diffrt.export import manifest as mf
from diffrt.hub import resolve_model
from diffrt.models import SHIPPED_DIGITS, PixelModel, PixelModelInfo, load_pixel_model, require_model_dir
from diffrt.runtime.backends import TORCH_BACKENDS, require_backend, resolve_device
from diffrt.runtime.ddim import DDIMConfig
from diffrt.runtime.lora_scale import BakedLora, EngineLora, RuntimeLora, TorchLora, scaled
from diffrt.runtime.pipeline import PixelPipeline

log = logging.getLogger(__name__)

OPEN_BATCH = (1, 8, 1 << 16)  # eager PyTorch takes any batch


def is_artifact(folder: Path) -> bool:
    """Whether `folder` is an artifact of `diffrt export`. One an export is rebuilding (its record, no manifest yet) is
    waited for on the artifact's lock, as every reader waits; one a killed export left is named as such."""
    from diffrt.export.cache import REBUILD

    if (folder / mf.MANIFEST).is_file():
        return True
    if not (folder / REBUILD).is_file():
        return (folder / mf.MANIFEST).is_file()  # an export may have written it, then removed its record, meanwhile
    with mf.artifact_lock(folder, shared=True):  # held exclusively while an export writes the folder
        if (folder / mf.MANIFEST).is_file():
            return True
    raise ArtifactError(f"{folder} holds an export that did not finish (it was stopped, or failed); run the same `diffrt export` "
                        "again to finish it")


def artifact_backend(model: str | Path | None, *, strict: bool = False) -> str | None:
    """The backend an artifact runs on when none is named: its TensorRT engines where it has them
    and TensorRT runs here, else its ONNX files on ONNX Runtime. None when `model` is no artifact.
    Engines that cannot run here are a fallback, said in a warning with TensorRT's problem, and refused
    with `strict`: a GPU server whose TensorRT broke served ONNX Runtime without a word."""
    from diffrt.runtime.backends import backend_available, tensorrt_problem

    if model is None or not is_artifact(Path(model)):
        return None
    folder = Path(model)
    engines = any("engine" in comp for comp in mf.read_manifest(folder)["components"].values())
    if not engines or backend_available("tensorrt"):
        return "tensorrt" if engines else "onnxruntime"
    why = f"{folder} holds TensorRT engines, which cannot run here ({tensorrt_problem()})"
    if strict:
        raise BackendUnavailableError(f"{why}; strict mode refuses running its ONNX files on ONNX Runtime instead: make "
                                      "TensorRT run here, or name the backend (--backend onnxruntime)")
    log.warning("%s: running its ONNX files on ONNX Runtime instead", why)
    return "onnxruntime"


def default_backend(model: str | Path | None, *, exported: bool = False, strict: bool = False) -> str:
    """The backend for a call that names none, one rule for every entry point: an artifact runs its own files
    (artifact_backend); anything else runs in eager PyTorch, or with `exported` (the demos, which exist to show
    the exported runtime) on the fastest exported backend installed here, which exports it first (cached)."""
    from diffrt.runtime.backends import best_exported_backend

    return artifact_backend(model, strict=strict) or (best_exported_backend() if exported else "torch")


def torch_pixel_spec(model: PixelModel):
    """The UNet's spec in eager PyTorch: any batch, sides from 8 px that the UNet can halve down to its
    deepest level (a size it cannot: one line, not a traceback from inside the model)."""
    spec = pixel_unet_spec(model.unet.out_channels, model.unet.sample_size, model.info.conditioning != "none",
                           num_labels=model.info.num_classes + 1, batch=OPEN_BATCH, size=(8, model.unet.sample_size, 4096),
                           multiple=model.unet.size_multiple)
    return dataclasses.replace(spec, eager=True)


def torch_pixel_pipeline(model: PixelModel, device: str | torch.device = "cpu", compile: bool = False,
                         loras: Sequence[tuple[str | Path, float]] = ()) -> PixelPipeline:
    """The UNet in eager PyTorch (or torch.compile), LoRA files fused in (at a strength `set_lora_scale` changes)."""
    from diffrt.runtime.backends.torch_eager import TorchBackend

    backend = TorchBackend(model.unet, torch_pixel_spec(model), device=device, compile=compile)
    lora = TorchLora({"unet": model.unet.unet}, loras) if loras else None  # after the move to the device
    return PixelPipeline(backend, model.scheduler, model.info, channels=model.unet.out_channels,
                         sample_size=model.unet.sample_size, torch_unet=model.unet, lora=lora,
                         one_value_side=model.unet.one_value_side)


def read_artifact(folder: Path, kind: str, verify: bool = True) -> dict:
    """An artifact's manifest, after checking it holds `kind` and (`verify`) every file matches its hash.
    A PyTorch backend over an artifact runs its source, not its files: it need not hash them."""
    manifest = mf.read_manifest(folder)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {manifest.get('kind')} export, not a {kind} model")
    if verify:
        mf.verify_files(folder, manifest)
    return manifest


def refuse_source_fallback(folder: Path, backend: str, strict: bool) -> None:
    """An artifact opened on a PyTorch backend runs its source weights, not its exported files:
    a fallback that strict mode refuses (RELIABILITY #15), and that is logged otherwise."""
    if strict:
        raise BackendUnavailableError(f"{folder} is an exported artifact; backend {backend!r} would run its source model's "
                                      "PyTorch weights instead, a fallback strict mode refuses; use backend onnxruntime or tensorrt (--backend)")
    log.warning("%s is an exported artifact; backend %r runs its source model's PyTorch weights", folder, backend)


def check_source(manifest: dict, parts: Sequence[str] = ()) -> Path:
    """The artifact's source model folder, if it still hashes as at export (RELIABILITY #16): a pixel
    model's whole folder, or the named `parts` of a text-to-image model's (source.parts)."""
    source = manifest["source"]
    folder = Path(source["path"])
    if not folder.is_dir():
        raise ArtifactError(f"the artifact's source model {folder} is missing")
    if parts:
        from diffrt.export.text_to_image import exported_controlnets, source_hashes
        from diffrt.text_to_image_models import SOURCE_PARTS

        # The ControlNet folders are hashed only when a ControlNet part is asked for.
        controlnets = [path for path, _ in exported_controlnets(manifest)] if set(parts) - set(SOURCE_PARTS) else []
        now = source_hashes(folder, controlnets)
        changed = [p for p in parts if now.get(p) != source["parts"].get(p)]
        stale, which = bool(changed), f" ({', '.join(changed)})"
    else:
        stale, which = atomic.sha256_folder(folder) != source["sha256"], ""
    if stale:
        raise ArtifactError(f"the artifact's source model {folder} changed since export{which}; re-export it")
    return folder


def describe_loras(entries: list[dict]) -> str:
    """A manifest's LoRA entries for an error message: file:scale, or none."""
    return ", ".join(f"{Path(e['path']).name}:{e['scale']}" for e in entries) or "none"


def manifest_loras(manifest: dict) -> list[tuple[str, float]]:
    """The LoRA files (path, scale) the artifact runs with, checked to be the same files, so that a
    PyTorch fallback can apply exactly them (RELIABILITY #16)."""
    loras = []
    for entry in manifest["loras"]:
        path = Path(entry["path"])
        if not path.is_file() or atomic.sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"LoRA file {path}, which this artifact runs with, is missing or changed; "
                                "PyTorch cannot apply the same LoRA")
        loras.append((str(path), float(entry["scale"])))
    return loras


def check_artifact_loras(folder: Path, manifest: dict, loras: Sequence[tuple[str | Path, float]]) -> None:
    """An artifact runs with the LoRA it was exported (or refit) with: naming other files or scales is an error."""
    from diffrt.export.cache import lora_state
    from diffrt.export.lora import locate_lora

    # A LoRA given as a folder is the file in it, as export read it (train dreambooth-lora's output).
    if loras and [(atomic.sha256_file(locate_lora(Path(p))), float(s)) for p, s in loras] != lora_state(manifest["loras"]):
        baked = f"has LoRA baked in at export ({describe_loras(manifest['loras'])})" if manifest["loras"] else "was exported without LoRA"
        raise ArtifactError(f"{folder} {baked}; other LoRAs need a "
                            "re-export with --lora (or `diffrt refit` for TensorRT engines)")


def load_pixel_source(manifest: dict, lora_scale: float = 1.0) -> PixelModel:
    """The artifact's source model with the artifact's LoRA fused in (at `lora_scale` times its
    scales): the same weights in PyTorch."""
    model = load_pixel_model(check_source(manifest))
    loras = manifest_loras(manifest)
    if loras:
        from diffrt.export.lora_fuse import fuse_lora_files

        fuse_lora_files({"unet": model.unet.unet}, scaled(loras, lora_scale))
    return model


def artifact_lora(folder: Path, manifest: dict, backend: str, components: dict) -> RuntimeLora | None:
    """What can change the strength of an artifact's LoRA (lora_scale.py), given its running
    `components` by name: TensorRT engines refit from base weights, when the ONNX holds the base;
    otherwise the LoRA is part of the graph's constants. None when it has no LoRA."""
    if not manifest["loras"]:
        return None
    if backend == "tensorrt" and not manifest.get("onnx_loras", manifest["loras"]):
        from diffrt.export.refit import LORA_COMPONENTS

        engines = {name: c for name, c in components.items() if name in LORA_COMPONENTS}
        return EngineLora(folder, engines, lambda: manifest_loras(manifest), manifest=manifest)
    fix = ("export with --backend tensorrt and no --lora, then `diffrt refit --lora`, for engines that change it, "
           "or run the source with --backend torch")
    return BakedLora(f"this artifact's LoRA ({describe_loras(manifest['loras'])}) is baked into its {backend} graphs at "
                     f"export; {fix}")


def check_onnx_weights(folder: Path, manifest: dict) -> None:
    """Refuse to run the ONNX files of an artifact whose LoRA was refit into its TensorRT engines
    only: the ONNX holds other weights than the manifest says the artifact runs with."""
    from diffrt.export.cache import lora_state

    if lora_state(manifest["loras"]) != lora_state(manifest.get("onnx_loras", manifest["loras"])):
        raise ArtifactError(f"{folder}'s TensorRT engines were refit with LoRA ({describe_loras(manifest['loras'])}) but its "
                            "ONNX files hold other weights; run it with --backend tensorrt, or export with --backend onnx "
                            "--lora ... for ONNX Runtime")


def open_component(folder: Path, manifest: dict, name: str, backend: str, device: str | torch.device = "cpu", *,
                   strict: bool = False, cuda_graph: bool = True):
    """One exported component on an exported-model backend: its TensorRT engine (refused when built
    for another TensorRT or GPU; `cuda_graph` captures each shape's launch) or its ONNX file (with
    any external data) on ONNX Runtime (`strict`: a provider fallback is an error)."""
    comp = manifest["components"][name]
    spec = spec_from_dict(comp["spec"])
    if backend == "tensorrt":
        from diffrt.runtime.backends.tensorrt import TensorRTBackend

        if "engine" not in comp:
            raise ArtifactError(f"{folder} has no TensorRT engine for {name}; export it with `diffrt export --backend tensorrt`")
        mf.check_engine_compatible(comp["engine"], device)
        return TensorRTBackend(folder / name / "engine.plan", spec, device=device, cuda_graph=cuda_graph)
    from diffrt.export.onnx import check_onnx_files
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, files_id

    if component_precision(manifest, name) == "bf16":  # ONNX Runtime has no bf16 kernels for these graphs (export refuses to make one)
        raise BackendUnavailableError(f"{folder}: its {name} was built at bf16 for TensorRT, which ONNX Runtime cannot run; "
                                      "use --backend tensorrt on a machine with an NVIDIA GPU, or re-export at fp16 or fp32")
    check_onnx_weights(folder, manifest)
    check_onnx_files(folder / name / "model.onnx")
    graph = {Path(rel).name: digest for rel, digest in comp["files"].items() if Path(rel).suffix != ".plan"}  # the ONNX files'
    return OnnxRuntimeBackend(folder / name / "model.onnx", spec, device=device, strict=strict, weights_id=files_id(graph))


def component_precision(manifest: dict, name: str) -> str:
    return manifest["components"][name].get("precision", manifest.get("precision", "fp32"))


def artifact_pixel_pipeline(folder: Path, backend: str, device: str | torch.device | None = None,
                            loras: Sequence[tuple[str | Path, float]] = (), *, strict: bool = False,
                            cuda_graph: bool = True) -> PixelPipeline:
    """A pixel pipeline over an exported artifact; files are checked against the manifest first.
    `device` None: auto (resolve_device); `loras`, if given, must be those it was exported with."""
    device = resolve_device(device, backend)
    with mf.artifact_lock(folder, shared=True):  # no export or refit rewrites it while it is read
        manifest = read_artifact(folder, "pixel")
        check_artifact_loras(folder, manifest, loras)
        unet = open_component(folder, manifest, "unet", backend, device, strict=strict, cuda_graph=cuda_graph)
        lora = artifact_lora(folder, manifest, backend, {"unet": unet})
    pipe = manifest["pipeline"]
    info = PixelModelInfo(**pipe["info"])
    # The PyTorch fallback for guidance "through_unet", loaded (onto the pipeline's device) only if
    # such guidance runs, from a source that still hashes as at export, with the artifact's LoRA.
    torch_unet = lambda: load_pixel_source(manifest, lora.scale if lora is not None else 1.0).unet  # noqa: E731
    return PixelPipeline(unet, DDIMConfig.from_scheduler_config(pipe["scheduler"]), info, channels=pipe["channels"],
                         sample_size=pipe["sample_size"], torch_unet=torch_unet, unet_precision=component_precision(manifest, "unet"),
                         lora=lora)


def open_pixel_pipeline(model: str | Path | None, backend: str = "torch", device: str | torch.device | None = None,
                        export_options=None, *, loras: Sequence[tuple[str | Path, float]] = (), strict: bool = False,
                        cuda_graph: bool = True) -> PixelPipeline:
    """The pipeline for `diffrt generate/demo/serve` and library users. `device` None: CUDA when
    available (resolve_device); `loras` [(file, scale)]: fused at open (PyTorch) or baked in by the
    export (an artifact must have been exported with them); `strict`: any fallback is an error;
    `cuda_graph`: TensorRT only. `backend` is run as given: "torch" over an artifact runs its source's
    PyTorch weights (logged); `diffrt.open_pipeline` runs an artifact on the backend it was exported for."""
    require_backend(backend)
    device = resolve_device(device, backend)
    folder = resolve_model(model) or SHIPPED_DIGITS  # a Hub id: its snapshot in the Hugging Face cache
    torch_backend = backend in TORCH_BACKENDS
    if is_artifact(folder):
        if not torch_backend:
            return artifact_pixel_pipeline(folder, backend, device, loras, strict=strict, cuda_graph=cuda_graph)
        refuse_source_fallback(folder, backend, strict)
        manifest = read_artifact(folder, "pixel", verify=False)  # PyTorch runs the source, not the artifact's files
        check_artifact_loras(folder, manifest, loras)
        return torch_pixel_pipeline(load_pixel_model(check_source(manifest)), device, compile=backend == "torch-compile",
                                    loras=manifest_loras(manifest))
    require_model_dir(folder)
    if torch_backend:
        return torch_pixel_pipeline(load_pixel_model(folder), device, compile=backend == "torch-compile", loras=loras)
    from diffrt.export.artifact import export_pixel_model
    from diffrt.export.options import default_artifact_dir, ExportOptions

    options = dataclasses.replace(export_options or ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx"),
                                  loras=[(str(p), float(s)) for p, s in loras])
    out = default_artifact_dir(folder, options)
    result = export_pixel_model(folder, out, options)
    log.info("%s export %s", "reused" if result.cache_hit else "made", out)
    return artifact_pixel_pipeline(out, backend, device, strict=strict, cuda_graph=cuda_graph)
