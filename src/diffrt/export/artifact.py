"""`diffrt export`: a model folder (+ LoRA) -> an artifact folder, cached by content (cache.py).

    artifact/
      manifest.json        written last (manifest.py)
      unet/model.onnx      one folder per component (+ model.onnx.data, engine.plan)

Here: exporting one component (trace, build, parity against PyTorch), the pixel-space model, and the
dispatch to the text-to-image export (text_to_image.py).

LoRA. ONNX-only exports bake LoRA into the graph. TensorRT engines keep base weights and take
LoRA by refit, always from the stored base (refit.py), so refits never accumulate. An export with
LoRA refits its engines before they are moved into place and the manifest is written, so a refit that
fails leaves the previous export, never a false cache hit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from diffrt import atomic
from diffrt.components import ComponentSpec, pixel_unet_spec, spec_to_dict
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.cache import COMPONENT_FOLDERS, REBUILD, begin_rebuild, cached_export, check_loras_unchanged, export_key, lora_hashes, raise_changed
from diffrt.export.onnx import export_onnx
from diffrt.export.options import TORCH_DTYPES, ExportOptions, ExportResult, Precision, check_options
from diffrt.models import PixelModel, SHIPPED_DIGITS, check_smallest_shape, load_pixel_model

log = logging.getLogger(__name__)


def check_out_apart(out: Path, hashed: list[Path]) -> None:
    """Refuse an --out the export may not write: one that overlaps a folder whose content is the export's cache key,
    or that holds a model's part (a diffusers config or weights) where a component goes. Inside the first, the
    export's own files would change the key: never a cache hit, and the source would read as changed since export
    to every PyTorch fallback. Holding it where the export writes (`--out` the text-to-image folder itself), the
    export would replace the model's unet/, tokenizer/... with its own."""
    where = out.resolve()
    for folder in hashed:
        folder = Path(folder).resolve()
        if where == folder or folder in where.parents:
            raise DiffrtError(f"--out {out} is {'' if where == folder else 'inside '}{folder}, whose files are hashed into the "
                              "export's cache key: the export would change its own key on every run; pass an --out folder outside it")
        if where in folder.parents and folder.relative_to(where).parts[0] in (*COMPONENT_FOLDERS, "tokenizer"):
            raise DiffrtError(f"--out {out} holds the model's {folder.relative_to(where)}/, which the export would replace "
                              "with its own; pass an --out folder apart from the model")
    # A model's part where a component goes (an --out given by mistake as another model's folder): the export
    # would replace its unet/ with its own, and a rerun after a stopped first export remove it as that export's.
    # Component folders hold graphs and engines only, never a diffusers config or weights.
    if out.is_dir() and not (out / mf.MANIFEST).is_file():
        theirs = sorted(name for name in COMPONENT_FOLDERS if (out / name / "config.json").is_file()
                        or any((out / name).glob("*.safetensors")))
        if theirs:
            raise DiffrtError(f"--out {out} holds {theirs[0]}/, a model's part that no diffrt export made, and the export would "
                              "replace it; pass a new or empty folder")
        if not (out / REBUILD).is_file():  # not an export's folder (a stopped one leaves its record): files it replaces
            foreign = foreign_files(out)
            if foreign:
                raise DiffrtError(f"--out {out} holds {foreign[0].relative_to(out)}, in a folder the export replaces "
                                  f"({foreign[0].relative_to(out).parts[0]}/); pass a new or empty folder")


# The tokenizer folder's files that a text-to-image export copies: every one the source hash covers (source_hashes), which
# is every file a CLIP tokenizer reads: vocab.json + merges.txt (slow), tokenizer.json (fast), tokenizer_config.json,
# special_tokens_map.json, and added_tokens.json (tokens added by textual inversion, in transformers 4 folders).
TOKENIZER_PATTERNS = ("*.json", "*.txt")
COMPONENT_FILES = ("model.onnx", "model.onnx.data", "engine.plan", "weight_map.json")  # what an export writes in a component's folder


def foreign_files(out: Path) -> list[Path]:
    """Files in `out`'s component and tokenizer folders that no export writes there, which an export into `out` would
    delete with the folder (a user's notes in a folder named unet/). A tokenizer folder is an export's only with
    the vocabulary it copies, and only JSON and text files beside it."""
    found = []
    for name in COMPONENT_FOLDERS:
        if (out / name).is_dir():  # an older diffrt's killed write left a temporary (.engine.plan.XXXXXXXX.tmp) here
            found += [p for p in (out / name).rglob("*") if p.is_file() and p.name not in COMPONENT_FILES
                      and not atomic.is_temporary(p.name)]
    tokenizer = out / "tokenizer"
    if tokenizer.is_dir():
        files = [p for p in tokenizer.rglob("*") if p.is_file()]
        copied = {"vocab.json", "tokenizer.json"} & {p.name for p in files} and all(p.parent == tokenizer for p in files)
        found += [p for p in files if not (copied and any(p.match(pattern) for pattern in TOKENIZER_PATTERNS))]
    return sorted(found)


def export_pixel_model(model_dir: str | Path | None, out: str | Path, options: ExportOptions) -> ExportResult:
    """Export a pixel-space model's UNet (unconditional or either class-conditioned variant)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_options(options, out)
    src = Path(model_dir) if model_dir is not None else SHIPPED_DIGITS
    if options.vae_encoder:
        raise DiffrtError(f"--vae-encoder: {src} is a pixel-space model, which has no VAE; leave it out")
    check_out_apart(out, [src])
    spec = pixel_spec(load_pixel_model(src, weights=False), options)  # configs only: enough for the key
    source_sha256 = atomic.sha256_folder(src)
    lora_parts = lora_hashes(options)
    key = pixel_export_key(source_sha256, spec, options)
    sources = {"path": str(src.resolve())}
    hit = cached_export(out, key, t0, lora_parts, verified=options.verify, sources=sources)
    if hit is not None:
        return hit
    atomic.check_writable(out, folder=True)  # a hit writes nothing: checked on a miss only
    model = load_pixel_model(src)  # a miss: now the weights
    if atomic.sha256_folder(src) != source_sha256:
        raise_changed(src)

    # LoRA files are checked against the model before the old export is touched (RELIABILITY #7).
    bake = bool(options.loras) and options.backend != "tensorrt"
    fused = []
    if bake:
        from diffrt.export.lora_fuse import fuse_lora_files

        fused = fuse_lora_files({"unet": model.unet.unet}, options.loras).loras
        check_loras_unchanged(fused, lora_parts)
    elif options.loras:
        _check_loras({"unet": model.unet.unet}, options.loras)
    with mf.artifact_lock(out):
        hit, rebuild = begin_rebuild(out, key, t0, lora_parts, options, sources, writes=("unet",))
        if hit is not None:
            return hit
        stage = rebuild.stage  # the previous export runs until the new one has finished
        components = {"unet": _export_component(model.unet, spec, stage, options)}
        if options.backend == "tensorrt":
            from diffrt.export.refit import add_weight_map

            add_weight_map(stage, "unet", {"unet": model.unet.unet}, components["unet"])
        baked = [{**part, "modules": f.num_modules} for part, f in zip(lora_parts, fused)]  # as text-to-image's and refit's
        manifest = {
            "key": key, "kind": "pixel", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {**sources, "sha256": source_sha256},
            "loras": baked, "onnx_loras": baked,
            "precision": options.precision, "opset": options.onnx_opset, "exporter": options.exporter,
            "versions": mf.library_versions(),
            "pipeline": {"scheduler": model.scheduler.to_scheduler_config(), "info": asdict(model.info),
                         "channels": model.unet.out_channels, "sample_size": model.unet.sample_size},
            "components": components,
        }
        refit_before_manifest(stage, manifest, options)
        written = rebuild.finish(manifest)
    return ExportResult(out, False, written, time.perf_counter() - t0)


def pixel_spec(model: PixelModel, options: ExportOptions) -> ComponentSpec:
    """The pixel UNet's spec: its sample size, or the --height range (pixel models are square)."""
    size = model.unet.sample_size
    if options.width and options.width != (options.height or (size, size, size)):
        raise DiffrtError("pixel models are exported square: give --width equal to --height")
    # A size the UNet cannot halve exactly fails inside the trace, so it is refused here by name.
    multiple = model.unet.size_multiple
    sizes = options.height or (size, size, size)
    bad = [s for s in sizes if s % multiple]
    if bad:
        raise DiffrtError(f"--height {':'.join(map(str, sizes))}: every value must be a multiple of {multiple} "
                          f"(the UNet halves the image {multiple.bit_length() - 1} times), got {bad[0]}")
    check_smallest_shape(model.unet.one_value_side, options.batch[0], sizes[0], sizes[0], "the unet")
    # The spec says the UNet's own multiple: a UNet that halves once runs any even side of its range (18 px in 16:20:24,
    # which a spec of 4 refused; such artifacts exported before are rebuilt once, their key being the spec's).
    return pixel_unet_spec(model.unet.out_channels, size, model.info.conditioning != "none",
                           num_labels=model.info.num_classes + 1, batch=options.batch, size=sizes, multiple=multiple)


def pixel_export_key(source_sha256: str, spec: ComponentSpec, options: ExportOptions) -> str:
    """`source_sha256`: atomic.sha256_folder of the model folder, hashed once per export. The spec is
    hashed at the export's precision: the fp32 timestep of a half export is in the key, an fp32
    export's key is what it was before the timestep was pinned (spec_to_dict)."""
    spec_part = spec_to_dict(spec, TORCH_DTYPES[options.precision])
    return export_key({"source": source_sha256, "precision": options.precision, "spec": spec_part}, options)


def refit_before_manifest(out: Path, manifest: dict, options: ExportOptions) -> None:
    """TensorRT exports: refit the engines to the export's LoRAs now, before the manifest names them:
    new engines hold base weights, so whenever the export has LoRA; and whenever an engine kept from
    the previous export (begin_rebuild) holds another export's LoRA, to the new LoRAs or back to base
    (refit always starts from the base weights, so refitting a kept engine gives what a new one would)."""
    if options.backend != "tensorrt":
        return
    from diffrt.export.refit import lora_engines, refit_components

    stale = [name for name in lora_engines(manifest) if manifest["components"][name]["engine"].get("loras")]
    if options.loras or stale:
        refit_components(out, manifest, options.loras)


def _check_loras(modules: dict, loras: list[tuple[str, float]]) -> None:
    """For an engine export, whose LoRA is set by refit after the build: every layer of every LoRA file
    lands on a weight of `modules` ({LoRA component: module}; else LoraError names those that do not; the targets are those
    fuse_loras and refit find), and none has bias terms, which refit cannot set; both before hours of
    engine builds, not after."""
    from diffrt.export.lora import read_lora
    from diffrt.export.lora_fuse import lora_targets, patchable_state
    from diffrt.export.refit import refuse_lora_biases

    files = [(read_lora(p), s) for p, s in loras]
    lora_targets({c: patchable_state(m) for c, m in modules.items()}, files)
    refuse_lora_biases(files)


def _export_component(module: torch.nn.Module, spec: ComponentSpec, out: Path, options: ExportOptions,
                      precision: Precision | None = None) -> dict:
    """ONNX (+ engine), parity against PyTorch, and the manifest entry for one component.

    `precision` overrides the export's for this component (a VAE kept in fp32, RELIABILITY #5)."""
    precision = precision or options.precision
    dtype = TORCH_DTYPES[precision]
    t0 = time.perf_counter()
    onnx_path = export_onnx(module, spec, out / spec.name, opset=options.onnx_opset, dtype=dtype,
                            external_data_threshold=options.external_data_threshold, exporter=options.exporter)
    entry = {"spec": spec_to_dict(spec), "precision": precision, "export_seconds": round(time.perf_counter() - t0, 3)}
    files = {str(p.relative_to(out)): atomic.sha256_file(p)
             for p in (onnx_path, onnx_path.with_suffix(".onnx.data")) if p.is_file()}
    feeds = [spec.example_feed(w, seed=i) for i, w in enumerate(("min", "opt", "max"))]
    parity = {}
    if options.verify and precision != "bf16":
        parity["onnxruntime"] = _onnxruntime_parity(module, spec, onnx_path, feeds, precision)
    elif options.verify:  # bf16 only with --backend tensorrt (check_options): checked on the engine below
        log.info("%s: ONNX Runtime has no bf16 Conv on the CPU; parity is measured on the TensorRT engine", spec.name)
    if options.backend == "tensorrt":
        from diffrt.export.refit import LORA_COMPONENTS
        from diffrt.export.tensorrt import build_engine

        engine_path = out / spec.name / "engine.plan"
        # Refittable only where LoRA can go (UNet, text encoder): the VAE and a standalone ControlNet never take it.
        entry["engine"] = build_engine(onnx_path, spec, engine_path, precision=precision, workspace_gb=options.workspace_gb,
                                       refit=spec.name in LORA_COMPONENTS)
        files[str(engine_path.relative_to(out))] = entry["engine"]["sha256"]  # hashed by build_engine: engines are large
        if options.verify:
            # Measured on the engine as built, with base weights: a LoRA is refit in afterwards
            # (refit_before_manifest), and refit sets weights only, never kernels or precision.
            parity["tensorrt"] = {**_engine_parity(module, spec, engine_path, feeds, precision), "weights": "base"}
    if options.verify:
        entry["parity"] = parity
    entry["files"] = files
    entry["bytes"] = sum((out / rel).stat().st_size for rel in files)
    return entry


def _onnxruntime_parity(module: torch.nn.Module, spec: ComponentSpec, onnx_path: Path, feeds: list[dict],
                        precision: Precision) -> dict:
    """The ONNX under ONNX Runtime (CPU) against PyTorch fp32; ONNX Runtime's own errors become one line."""
    from diffrt.export.verify import verify_backends
    from diffrt.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from diffrt.runtime.backends.torch_eager import TorchBackend

    try:
        candidate = OnnxRuntimeBackend(onnx_path, spec)
        return verify_backends(TorchBackend(module, spec, dtype=torch.float32), candidate, feeds, precision)
    except Exception as exc:
        # ONNX Runtime raises its own exception types (InvalidGraph, NotImplemented, Fail, ...), all
        # from its pybind module; anything else is not an ONNX Runtime refusal and passes unchanged.
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        why = " ".join(str(exc).split())
        raise ArtifactError(f"{spec.name}: ONNX Runtime could not run {onnx_path} at {precision} "
                            f"({type(exc).__name__}: {why})") from None


def _engine_parity(module: torch.nn.Module, spec: ComponentSpec, engine_path: Path, feeds: list[dict],
                   precision: Precision) -> dict:
    """The built engine itself against PyTorch (RELIABILITY #17): the ONNX check says nothing of
    TensorRT's kernels, fusions and precision choices. The reference runs in fp32 on the CPU, as for
    ONNX Runtime: on CUDA, PyTorch's convolutions may use TF32."""
    from diffrt.export.verify import verify_backends
    from diffrt.runtime.backends.tensorrt import TensorRTBackend
    from diffrt.runtime.backends.torch_eager import TorchBackend

    engine = TensorRTBackend(engine_path, spec, device="cuda")
    try:
        return verify_backends(TorchBackend(module, spec, dtype=torch.float32), engine, feeds, precision)
    finally:
        del engine
        torch.cuda.empty_cache()


def is_text_to_image_dir(folder: Path) -> bool:
    return (folder / "text_encoder").is_dir() and (folder / "unet").is_dir()


def export_model(model_dir: str | Path | None, out: str | Path, options: ExportOptions,
                 controlnets: list[str] | None = None) -> ExportResult:
    """Export whatever the folder holds: a text-to-image pipeline or a pixel-space model."""
    from diffrt.models import require_model_dir

    try:  # torch.onnx's exporter and TensorRT take UTF-8 paths: a name of other bytes failed inside torch's export,
        str(out).encode("utf-8")  # with its weights in the message and a rebuild marker left behind
    except UnicodeEncodeError:
        raise DiffrtError(f"--out {str(out)!r} is not valid UTF-8 (torch.onnx and TensorRT write to UTF-8 paths only); "
                          "choose a name in UTF-8") from None
    if model_dir is not None:
        require_model_dir(model_dir)
        if is_text_to_image_dir(Path(model_dir)):
            from diffrt.export.text_to_image import export_text_to_image

            return export_text_to_image(Path(model_dir), Path(out), options, controlnets or [])
    if controlnets:
        raise DiffrtError("--controlnet needs a text-to-image model folder (with text_encoder/ and unet/)")
    return export_pixel_model(model_dir, out, options)
