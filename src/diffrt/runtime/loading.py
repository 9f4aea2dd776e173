"""Open a model for generation: a diffusers folder, an artifact folder from `diffrt export`, or
(with no model given) the shipped digits model, on the backend asked for.

This is the one place that knows which backend runs a component; the pipeline only sees
`Backend`s. An exported backend over a diffusers folder exports into the user cache first
(reused on the next run).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from diffrt.components import pixel_unet_spec, spec_from_dict
from diffrt.errors import ArtifactError
from diffrt.export import manifest as mf
from diffrt.models import SHIPPED_DIGITS, PixelModel, PixelModelInfo, load_pixel_model, require_model_dir
from diffrt.runtime.backends import require_backend
from diffrt.runtime.ddim import DDIMConfig
from diffrt.runtime.pipeline import PixelPipeline

log = logging.getLogger(__name__)

OPEN_BATCH = (1, 8, 1 << 16)  # eager PyTorch takes any batch


def is_artifact(folder: Path) -> bool:
    return (folder / mf.MANIFEST).is_file()


def torch_pixel_pipeline(model: PixelModel, device: str | torch.device = "cpu", compile: bool = False) -> PixelPipeline:
    from diffrt.runtime.backends.torch_eager import TorchBackend

    spec = pixel_unet_spec(model.unet.out_channels, model.unet.sample_size, model.info.conditioning != "none",
                           num_labels=model.info.num_classes + 1, batch=OPEN_BATCH, size=(8, model.unet.sample_size, 4096))
    backend = TorchBackend(model.unet, spec, device=device, compile=compile)
    return PixelPipeline(backend, model.scheduler, model.info, channels=model.unet.out_channels,
                         sample_size=model.unet.sample_size, torch_unet=model.unet)


def read_artifact(folder: Path, kind: str) -> dict:
    """An artifact's manifest, after checking it holds `kind` and every file matches its hash."""
    manifest = mf.read_manifest(folder)
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {manifest.get('kind')} export, not a {kind} model")
    mf.verify_files(folder, manifest)
    return manifest


def open_component(folder: Path, manifest: dict, name: str, backend: str, device: str | torch.device = "cpu"):
    """One exported component on an exported-model backend: its TensorRT engine (refused when built
    for another TensorRT or GPU) or its ONNX file (with any external data) on ONNX Runtime."""
    comp = manifest["components"][name]
    spec = spec_from_dict(comp["spec"])
    if backend == "tensorrt":
        from diffrt.runtime.backends.tensorrt import TensorRTBackend

        if "engine" not in comp:
            raise ArtifactError(f"{folder} has no TensorRT engine for {name}; export it with `diffrt export --backend tensorrt`")
        mf.check_engine_compatible(comp["engine"])
        return TensorRTBackend(folder / name / "engine.plan", spec, device=device)
    from diffrt.export.onnx import check_onnx_files
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    check_onnx_files(folder / name / "model.onnx")
    return OnnxRuntimeBackend(folder / name / "model.onnx", spec, device=device)


def artifact_pixel_pipeline(folder: Path, backend: str, device: str | torch.device = "cpu") -> PixelPipeline:
    """A pixel pipeline over an exported artifact; files are checked against the manifest first."""
    manifest = read_artifact(folder, "pixel")
    unet = open_component(folder, manifest, "unet", backend, device)
    pipe = manifest["pipeline"]
    info = PixelModelInfo(**pipe["info"])
    torch_unet = None
    source = Path(manifest["source"]["path"])
    if source.is_dir() and not manifest["loras"]:
        # The PyTorch fallback for guidance "through_unet", loaded only if such guidance runs.
        torch_unet = lambda: load_pixel_model(source).unet  # noqa: E731
    return PixelPipeline(unet, DDIMConfig.from_scheduler_config(pipe["scheduler"]), info, channels=pipe["channels"],
                         sample_size=pipe["sample_size"], torch_unet=torch_unet)


def open_pixel_pipeline(model: str | Path | None, backend: str = "torch", device: str | torch.device = "cpu",
                        export_options=None) -> PixelPipeline:
    """The pipeline for `diffrt generate/demo/serve` and library users."""
    require_backend(backend)
    folder = Path(model) if model is not None else SHIPPED_DIGITS
    if is_artifact(folder):
        if backend in ("torch", "torch-compile"):
            source = Path(mf.read_manifest(folder)["source"]["path"])
            return torch_pixel_pipeline(load_pixel_model(source), device, compile=backend == "torch-compile")
        return artifact_pixel_pipeline(folder, backend, device)
    require_model_dir(folder)
    if backend in ("torch", "torch-compile"):
        return torch_pixel_pipeline(load_pixel_model(folder), device, compile=backend == "torch-compile")
    from diffrt.export.artifact import ExportOptions, default_artifact_dir, export_pixel_model

    options = export_options or ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx")
    out = default_artifact_dir(folder, options)
    result = export_pixel_model(folder, out, options)
    log.info("%s export %s", "reused" if result.cache_hit else "made", out)
    return artifact_pixel_pipeline(out, backend, device)
