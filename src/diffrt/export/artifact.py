"""`diffrt export`: a model folder (+ LoRA) -> an artifact folder, cached by content.

    artifact/
      manifest.json        written last (manifest.py)
      unet/model.onnx      one folder per component (+ model.onnx.data, engine.plan)

Exporting again with unchanged inputs is a cache hit that does no work and says so. A
rebuild first removes the old manifest, so an interrupted rebuild is never mistaken for a
finished one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from diffrt import atomic
from diffrt.components import ComponentSpec, pixel_unet_spec, spec_to_dict
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.onnx import DEFAULT_OPSET, export_onnx
from diffrt.models import PixelModel, SHIPPED_DIGITS, load_pixel_model

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportOptions:
    backend: Literal["onnx", "tensorrt"] = "onnx"
    precision: Precision = "fp32"
    batch: tuple[int, int, int] = (1, 8, 64)
    height: tuple[int, int, int] | None = None  # pixels; None: the model's sample size only
    width: tuple[int, int, int] | None = None
    opset: int = DEFAULT_OPSET
    loras: list[tuple[str, float]] = field(default_factory=list)
    verify: bool = True


@dataclass
class ExportResult:
    folder: Path
    cache_hit: bool
    manifest: dict
    seconds: float


def parse_range(text: str, name: str) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or one number for a fixed size) -> (min, opt, max)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        raise DiffrtError(f"--{name} {text!r} is not MIN:OPT:MAX with integers, e.g. 1:2:4") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise DiffrtError(f"--{name} {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return tuple(parts)


def export_pixel_model(model_dir: str | Path | None, out: str | Path, options: ExportOptions) -> ExportResult:
    """Export a pixel-space model's UNet (unconditional or either class-conditioned variant)."""
    t0 = time.perf_counter()
    out = Path(out)
    src = Path(model_dir) if model_dir is not None else SHIPPED_DIGITS
    model = load_pixel_model(src)
    size = model.unet.sample_size
    spec = pixel_unet_spec(model.unet.out_channels, size, model.info.conditioning != "none",
                           num_labels=model.info.num_classes + 1, batch=options.batch,
                           size=options.height or (size, size, size))
    if options.width and options.width != (options.height or (size, size, size)):
        raise DiffrtError("pixel models are exported square: give --width equal to --height")
    lora_parts = lora_hashes(options)
    key = export_key({"source": atomic.sha256_folder(src), "precision": options.precision, "spec": spec_to_dict(spec)},
                     options, lora_parts)
    hit = cached_export(out, key, t0)
    if hit is not None:
        return hit

    with atomic.file_lock(out.parent / f".{out.name}.lock"):
        (out / mf.MANIFEST).unlink(missing_ok=True)
        # TensorRT engines keep base weights and take LoRA by refit (refits then never
        # accumulate); ONNX-only exports bake LoRA into the graph.
        bake = bool(options.loras) and options.backend != "tensorrt"
        if bake:
            _fuse_pixel_loras(model, options.loras)
        components = {"unet": _export_component(model.unet, spec, out, options)}
        manifest = {
            "key": key, "kind": "pixel", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {"path": str(src.resolve()), "sha256": atomic.sha256_folder(src)},
            "loras": [{"path": str(p), **part} for (p, _), part in zip(options.loras, lora_parts)] if bake else [],
            "onnx_loras": [{"path": str(p), **part} for (p, _), part in zip(options.loras, lora_parts)] if bake else [],
            "precision": options.precision, "opset": options.opset, "versions": mf.library_versions(),
            "pipeline": {"scheduler": model.scheduler.to_scheduler_config(), "info": asdict(model.info),
                         "channels": model.unet.out_channels, "sample_size": size},
            "components": components,
        }
        mf.write_manifest(out, manifest)
        if options.loras and not bake:
            from diffrt.export.refit import refit_artifact

            refit_artifact(out, options.loras)
    return ExportResult(out, False, mf.read_manifest(out), time.perf_counter() - t0)


def lora_hashes(options: ExportOptions) -> list[dict]:
    return [{"sha256": atomic.sha256_file(p), "scale": s} for p, s in options.loras]


def export_key(model_parts: dict, options: ExportOptions, lora_parts: list[dict]) -> str:
    """The content address of an export: what the model is, plus what every export depends on
    (LoRA files and scales, opset, backend, library versions, and the GPU for engines)."""
    return mf.cache_key({
        **model_parts, "loras": lora_parts, "opset": options.opset, "backend": options.backend,
        "versions": mf.library_versions(), "gpu": mf.gpu_identity() if options.backend == "tensorrt" else None,
    })


def cached_export(out: Path, key: str, t0: float) -> ExportResult | None:
    """The finished export at `out` if it has this key and its files are intact; else None."""
    try:
        manifest = mf.read_manifest(out)
        if manifest.get("key") != key:
            return None
        mf.verify_files(out, manifest)
    except ArtifactError:
        return None
    log.info("cache hit: %s already holds this export (key %s); nothing to do", out, key[:12])
    return ExportResult(out, True, manifest, time.perf_counter() - t0)


def _export_component(module: torch.nn.Module, spec: ComponentSpec, out: Path, options: ExportOptions,
                      precision: Precision | None = None) -> dict:
    """ONNX (+ engine), parity against PyTorch, and the manifest entry for one component.

    `precision` overrides the export's for this component (a VAE kept in fp32, RELIABILITY #5)."""
    from diffrt.export.verify import verify_backends
    from diffrt.runtime.backends.torch_eager import TorchBackend

    precision = precision or options.precision
    dtype = TORCH_DTYPES[precision]
    t0 = time.perf_counter()
    onnx_path = export_onnx(module, spec, out / spec.name, opset=options.opset, dtype=dtype)
    entry = {"spec": spec_to_dict(spec), "precision": precision, "export_seconds": round(time.perf_counter() - t0, 3)}
    files = [p for p in (onnx_path, onnx_path.with_suffix(".onnx.data")) if p.is_file()]
    if options.verify:
        from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

        ref = TorchBackend(module, spec, dtype=torch.float32)
        cand = OnnxRuntimeBackend(onnx_path, spec)
        feeds = [spec.example_feed(w, seed=i) for i, w in enumerate(("min", "opt", "max"))]
        entry["parity"] = {"onnxruntime": verify_backends(ref, cand, feeds, precision)}
    if options.backend == "tensorrt":
        from diffrt.export.tensorrt import build_engine

        engine = build_engine(onnx_path, spec, out / spec.name / "engine.plan", precision=precision)
        files.append(out / spec.name / "engine.plan")
        entry["engine"] = engine
    entry["files"] = {str(p.relative_to(out)): atomic.sha256_file(p) for p in files}
    entry["bytes"] = sum(p.stat().st_size for p in files)
    return entry


def _fuse_pixel_loras(model: PixelModel, loras: list[tuple[str, float]]) -> None:
    from diffrt.export.lora import fuse_loras, read_lora

    fuse_loras({"unet": model.unet.unet}, [(read_lora(p), s) for p, s in loras])


def default_artifact_dir(model_dir: Path, options: ExportOptions) -> Path:
    """Where `diffrt demo` / `generate` keep an automatic export: the user cache, by source and settings."""
    from platformdirs import user_cache_dir

    tag = mf.cache_key({"src": str(model_dir.resolve()), "sha": atomic.sha256_folder(model_dir), "opts": repr(options)})[:16]
    return Path(user_cache_dir("diffrt")) / "artifacts" / f"{model_dir.name}-{tag}"


def is_text_to_image_dir(folder: Path) -> bool:
    return (folder / "text_encoder").is_dir() and (folder / "unet").is_dir()


def export_model(model_dir: str | Path | None, out: str | Path, options: ExportOptions,
                 controlnets: list[str] | None = None) -> ExportResult:
    """Export whatever the folder holds: a text-to-image pipeline or a pixel-space model."""
    from diffrt.models import require_model_dir

    if model_dir is not None:
        require_model_dir(model_dir)
        if is_text_to_image_dir(Path(model_dir)):
            from diffrt.export.text_to_image import export_text_to_image

            return export_text_to_image(Path(model_dir), Path(out), options, controlnets or [])
    if controlnets:
        raise DiffrtError("--controlnet needs a text-to-image model folder (with text_encoder/ and unet/)")
    return export_pixel_model(model_dir, out, options)
