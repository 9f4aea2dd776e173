"""`diffrt export`: a model folder (+ LoRA) -> an artifact folder, cached by content.

    artifact/
      manifest.json        written last (manifest.py)
      unet/model.onnx      one folder per component (+ model.onnx.data, engine.plan)

Exporting again with unchanged inputs is a cache hit that does no work and says so (an export
that asks for the parity check is no hit on one made with --no-verify). A rebuild takes the
folder's lock, looks again (another builder may have finished the same export while it waited),
then removes the old manifest, so an interrupted rebuild is never mistaken for a finished one,
the old component folders (one the new export lacks would stay otherwise) and the temporaries a
killed export left. A text-to-image rebuild keeps each old component whose own inputs are unchanged
(its `component_key`) and whose files still hash as recorded, folder and manifest entry, and
exports only the others: adding --vae-encoder builds one engine, not four (`begin_rebuild`).

LoRA. ONNX-only exports bake LoRA into the graph. TensorRT engines keep base weights and take
LoRA by refit, always from the stored base (refit.py), so refits never accumulate. The
manifest's "key" is therefore the key of the base export, without LoRA, and "loras" is the
LoRA state the artifact runs with (baked in, or refit into the engines); an export is a cache
hit only when both match. An export with LoRA refits its engines before the manifest is
written, so a refit that fails leaves no manifest, never a false cache hit.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from diffrt import atomic
from diffrt.components import ComponentSpec, pixel_unet_spec, spec_to_dict
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.export import manifest as mf
from diffrt.export.lora import locate_lora
from diffrt.export.onnx import DEFAULT_OPSET, DYNAMO_MIN_OPSET, EXPORTERS, TWO_GB, export_onnx, max_opset
from diffrt.models import PixelModel, SHIPPED_DIGITS, load_pixel_model
from diffrt.runtime.backends import require_backend

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Opset 17 is the first with LayerNormalization as one op (TensorRT fuses it); diffrt's parity
# tolerances are measured on graphs exported at 17 and newer.
MIN_OPSET = 17


@dataclass
class ExportOptions:
    backend: Literal["onnx", "tensorrt"] = "onnx"
    precision: Precision = "fp32"
    batch: tuple[int, int, int] = (1, 8, 64)
    height: tuple[int, int, int] | None = None  # pixels; None: the model's sample size only
    width: tuple[int, int, int] | None = None
    opset: int | None = None  # None: the exporter's default (DEFAULT_OPSET)
    exporter: Literal["torchscript", "dynamo"] = "torchscript"  # torch.onnx's tracer, or its torch.export-based exporter
    loras: list[tuple[str, float]] = field(default_factory=list)
    verify: bool = True
    vae_encoder: bool = False  # text-to-image: also export the VAE encoder, for image-to-image on the backend
    # Graphs whose weights exceed this many bytes keep them in model.onnx.data, in the component's
    # own folder (RELIABILITY #6; protobuf cannot hold over 2 GB). A layout choice, not in the key.
    external_data_threshold: int = TWO_GB

    @property
    def onnx_opset(self) -> int:
        """The opset the graphs are written in: the one asked for, else the exporter's default."""
        return DEFAULT_OPSET.get(self.exporter, DEFAULT_OPSET["torchscript"]) if self.opset is None else self.opset


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


def check_range(value: tuple[int, int, int] | None, name: str) -> None:
    """`parse_range`'s rule for ranges given to ExportOptions directly (the Python API skips the CLI's
    parsing): a reversed or zero range would be traced and recorded in the manifest as it stands,
    and fail later, or never, with no word of which option was wrong."""
    if value is None:
        return
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value)
    if not ok or not 1 <= value[0] <= value[1] <= value[2]:
        raise DiffrtError(f"{name} range {tuple(value) if isinstance(value, (tuple, list)) else value!r} must be "
                          f"(MIN, OPT, MAX) integers with 1 <= MIN <= OPT <= MAX, e.g. (1, 2, 4)")


def check_options(options: ExportOptions, out: Path | None = None) -> None:
    """Refuse, in one line, an export that cannot succeed, before any model is loaded or traced."""
    if out is not None and out.exists() and not out.is_dir():
        raise DiffrtError(f"--out {out} is a file; an export writes a folder there: pass a new or existing folder")
    for path, _ in options.loras:
        locate_lora(Path(path))  # a file, or a folder holding one (train dreambooth-lora's output)
    for name in ("batch", "height", "width"):
        check_range(getattr(options, name), name)
    if options.exporter not in EXPORTERS:
        raise DiffrtError(f"--exporter {options.exporter!r} is not one of {', '.join(EXPORTERS)}")
    if options.onnx_opset < MIN_OPSET:
        raise DiffrtError(f"--opset {options.onnx_opset} is below {MIN_OPSET}, the oldest opset diffrt exports "
                          f"(LayerNormalization is one op from {MIN_OPSET} on); use --opset {MIN_OPSET} or newer")
    if options.onnx_opset > max_opset():
        raise DiffrtError(f"--opset {options.onnx_opset} is above {max_opset()}, the newest opset torch {torch.__version__} "
                          f"exports; use --opset {MIN_OPSET} to {max_opset()}, or leave --opset out")
    if options.exporter == "dynamo" and options.onnx_opset < DYNAMO_MIN_OPSET:
        raise DiffrtError(f"--exporter dynamo writes opset {DYNAMO_MIN_OPSET} or newer, not {options.onnx_opset}; "
                          f"pass --opset {DYNAMO_MIN_OPSET} or leave --opset out")
    if options.backend == "tensorrt":
        require_backend("tensorrt")  # one line naming the backends this machine has
    elif options.precision == "bf16":
        # Verifying in fp32 instead would check another graph than the one shipped; say so instead.
        raise DiffrtError("--precision bf16 needs --backend tensorrt: ONNX Runtime has no bf16 Conv kernel on the CPU, so a "
                          "bf16 ONNX can neither be checked against PyTorch nor run here; use --precision fp16 or fp32 "
                          "for an ONNX export")


COMPONENT_FOLDERS = ("unet", "text_encoder", "unet_controlnet", "controlnet", "vae_decoder", "vae_encoder")  # what exports write


def check_out_apart(out: Path, hashed: list[Path]) -> None:
    """Refuse an artifact folder that overlaps a folder whose content is the export's cache key.
    Inside it, the export's own files would change the key: never a cache hit, and the source would
    read as changed since export to every PyTorch fallback. Holding it where the export writes (`--out`
    the text-to-image folder itself), the export would replace the model's unet/, tokenizer/... with its own."""
    where = out.resolve()
    for folder in hashed:
        folder = Path(folder).resolve()
        if where == folder or folder in where.parents:
            raise DiffrtError(f"--out {out} is {'' if where == folder else 'inside '}{folder}, whose files are hashed into the "
                              "export's cache key: the export would change its own key on every run; pass an --out folder outside it")
        if where in folder.parents and folder.relative_to(where).parts[0] in (*COMPONENT_FOLDERS, "tokenizer"):
            raise DiffrtError(f"--out {out} holds the model's {folder.relative_to(where)}/, which the export would replace "
                              "with its own; pass an --out folder apart from the model")


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
    model = load_pixel_model(src)  # a miss: now the weights

    # LoRA files are checked against the model before the old export is touched (RELIABILITY #7).
    bake = bool(options.loras) and options.backend != "tensorrt"
    if bake:
        from diffrt.export.lora_fuse import fuse_lora_files

        fuse_lora_files({"unet": model.unet.unet}, options.loras)
    elif options.loras:
        _check_loras({"unet": model.unet.unet.state_dict()}, options.loras)
    with mf.artifact_lock(out):
        hit = start_rebuild(out, key, t0, lora_parts, options, sources)
        if hit is not None:
            return hit
        components = {"unet": _export_component(model.unet, spec, out, options)}
        if options.backend == "tensorrt":
            from diffrt.export.refit import add_weight_map

            add_weight_map(out, "unet", {"unet": model.unet.unet.state_dict()}, components["unet"])
        baked = lora_parts if bake else []
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
        refit_before_manifest(out, manifest, options)
        mf.write_manifest(out, manifest)
        written = mf.read_manifest(out)  # under the lock: another builder may replace it once it is released
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
    return pixel_unet_spec(model.unet.out_channels, size, model.info.conditioning != "none",
                           num_labels=model.info.num_classes + 1, batch=options.batch, size=sizes,
                           multiple=max(multiple, 4))  # 4: the spec's default, so existing keys stay


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


def _check_loras(states: dict, loras: list[tuple[str, float]]) -> None:
    """For an engine export, whose LoRA is set by refit after the build: every layer of every LoRA file
    lands on a weight of `states` (else LoraError names those that do not; the targets are those
    fuse_loras and refit find), and none has bias terms, which refit cannot set; both before hours of
    engine builds, not after."""
    from diffrt.export.lora import read_lora
    from diffrt.export.lora_fuse import lora_targets
    from diffrt.export.refit import refuse_lora_biases

    files = [(read_lora(p), s) for p, s in loras]
    lora_targets(states, files)
    refuse_lora_biases(files)


def lora_hashes(options: ExportOptions) -> list[dict]:
    """Each LoRA of the export as its manifest entry records it: the file's absolute path (so that the
    artifact's PyTorch fallbacks and refits find it from any working directory), sha256 and scale."""
    files = [locate_lora(Path(p)).resolve() for p, _ in options.loras]
    return [{"path": str(f), "sha256": atomic.sha256_file(f), "scale": s} for f, (_, s) in zip(files, options.loras)]


def export_key(model_parts: dict, options: ExportOptions) -> str:
    """The content address of the base export: what the model is, plus what every export depends
    on (opset, backend, library versions, and the GPU for engines). LoRA is kept apart: see
    `cached_export`."""
    return mf.cache_key({
        **model_parts, "opset": options.onnx_opset, "backend": options.backend,
        # Only a non-default exporter enters the key, so artifacts (and hours of engine builds) made
        # before the choice existed stay cache hits.
        **({"exporter": options.exporter} if options.exporter != "torchscript" else {}),
        "versions": mf.library_versions(), "gpu": mf.gpu_identity() if options.backend == "tensorrt" else None,
    })


def lora_state(entries) -> list[tuple[str, float]]:
    """What identifies a LoRA setting: each file's sha256 and scale, in order."""
    return [(e["sha256"], float(e["scale"])) for e in entries]


def cached_export(out: Path, key: str, t0: float, loras: list[dict] = (), verified: bool = False,
                  quiet: bool = False, sources: dict | None = None, locked: bool = False) -> ExportResult | None:
    """The finished export at `out` if it has this base key, runs with these LoRAs ([{sha256, scale}]),
    was checked against PyTorch when `verified` asks for it, and its files are intact; else None.
    `quiet`: do not log why it is a miss (a second look, already explained).

    A hit whose inputs were given from other paths than it records (`sources`: the source folder's
    {"path"} and, for text-to-image, {"controlnets"}; the LoRAs' "path") records the new ones: the same
    content moved is no rebuild, but a manifest naming the old folder would send every PyTorch fallback
    (eager backend, guidance, img2img without an exported encoder) to a folder that is gone. `locked`:
    the caller holds the artifact's lock (that record is written under it)."""
    try:
        manifest = mf.read_manifest(out)
        if manifest.get("key") != key:
            return None
        if lora_state(manifest.get("loras", [])) != lora_state(loras):
            if not quiet:
                log.info("%s holds this export with other LoRAs (%d file(s)); rebuilding", out, len(manifest.get("loras", [])))
            return None
        if verified and any("parity" not in comp for comp in manifest["components"].values()):
            # An export made with --no-verify was never compared with PyTorch: asked to verify, it is no hit.
            if not quiet:
                log.info("%s holds this export unverified (--no-verify); rebuilding it with the parity check", out)
            return None
        mf.verify_files(out, manifest)
    except ArtifactError:
        return None
    if sources is not None and _moved(manifest, sources, loras):
        try:
            if not locked:
                with mf.artifact_lock(out):
                    return cached_export(out, key, t0, loras, verified, quiet, sources, locked=True)
            manifest = _record_paths(out, manifest, sources, loras)
        except OSError as exc:  # a read-only artifact still runs on its exported files
            log.warning("%s: its source or LoRA files moved since export, but the new paths cannot be recorded (%s); "
                        "PyTorch fallbacks will look for the old ones", out, exc)
    log.info("cache hit: %s already holds this export (key %s); nothing to do", out, key[:12])
    return ExportResult(out, True, manifest, time.perf_counter() - t0)


def _moved(manifest: dict, sources: dict, loras: list[dict]) -> bool:
    """Whether a hit's inputs (same content) now sit at other paths than its manifest records."""
    recorded = manifest["source"]
    return (any(recorded.get(name) != value for name, value in sources.items())
            or [e.get("path") for e in manifest["loras"]] != [e.get("path") for e in loras])


def _record_paths(out: Path, manifest: dict, sources: dict, loras: list[dict]) -> dict:
    """The manifest with the inputs' new paths, written (under the artifact's lock): the source's, and each
    LoRA's, in `loras` and in `onnx_loras` (the same files by sha256: a refit engine's LoRAs are not baked)."""
    where = {e["sha256"]: e["path"] for e in loras}
    entries = {field_: [{**e, "path": where.get(e["sha256"], e.get("path"))} for e in manifest[field_]]
               for field_ in ("loras", "onnx_loras") if field_ in manifest}
    moved = {**manifest, "source": {**manifest["source"], **sources}, **entries}
    mf.write_manifest(out, moved)
    log.info("%s: its source or LoRA files moved since export (same content); recorded their new paths", out)
    return mf.read_manifest(out)


def component_key(spec: ComponentSpec, precision: Precision, sources: dict[str, str], baked: list[dict],
                  options: ExportOptions) -> str:
    """The content address of one component's files, stored in its manifest entry, so that a rebuild keeps
    the components whose inputs it did not change (`begin_rebuild`). Exactly what determines the files:

      name, spec (at the component's dtype) and precision   the graph's inputs, outputs, ranges and types;
      sources       the sha256 of the source parts traced into it, and only those: a new VAE does not
                    touch the UNet, the tokenizer touches no graph (its max_length is in the spec);
      baked         the LoRAs fused into its weights, in order ({sha256, scale}): only ONNX-only exports
                    bake, and only into the components a file patches; TensorRT engines are built from the
                    base weights and take LoRA by refit (refit_before_manifest), so theirs is empty;
      backend, exporter, opset   which graph is traced and whether an engine is built from it;
      versions (+ the GPU for engines)   what export_key holds: torch and onnx write the graph, TensorRT
                    and the GPU the engine, diffrt the export code.

    Not in it: --no-verify (a rule, not a key: a verified entry stands in for an unverified request,
    never the reverse, as in `cached_export`), and external_data_threshold, a layout choice the artifact
    key leaves out as well (a component kept keeps its layout, as a cache hit keeps the whole artifact's)."""
    return mf.cache_key({
        "name": spec.name, "spec": spec_to_dict(spec, TORCH_DTYPES[precision]), "precision": precision,
        "sources": sources, "baked": [{"sha256": b["sha256"], "scale": float(b["scale"])} for b in baked],
        "backend": options.backend, "exporter": options.exporter, "opset": options.onnx_opset,
        "versions": mf.library_versions(), "gpu": mf.gpu_identity() if options.backend == "tensorrt" else None,
    })


# A rebuild's record of the component folders it keeps, has finished or may write, beside the manifest
# while the manifest is absent. Kill safety: the old manifest is removed when a rebuild starts, so a
# rebuild killed midway would otherwise leave nothing that names the folders it kept (a killed run
# after the UNet engine was kept, or built, would rebuild it: minutes) nor those it may have written
# (which a later rebuild without them must remove). This file, written atomically under the lock before
# the manifest goes and again after each finished component, keeps the entries; nothing but a rebuild
# reads it, and a rebuild trusts an entry only as it trusts a manifest's: its component key must be
# the one asked for and every file it lists must still hash as recorded (a folder a killed export was
# rewriting fails that check and is rebuilt). It is removed once the new manifest is written.
REBUILD = ".rebuild.json"


def _old_components(out: Path) -> tuple[dict, list[str]]:
    """The previous export's component entries and the component folders it owns: from its manifest,
    else from the record a killed rebuild left (REBUILD), else none."""
    try:
        components = mf.read_manifest(out)["components"]
        return components, [name for name in components if name in COMPONENT_FOLDERS]
    except ArtifactError:
        pass
    try:
        record = json.loads((out / REBUILD).read_text())
        components, folders = record["components"], record["folders"]
        if isinstance(components, dict) and isinstance(folders, list):
            return components, [name for name in folders if name in COMPONENT_FOLDERS]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {}, []


def _reusable(out: Path, name: str, entry, key: str, options: ExportOptions) -> bool:
    """Whether the old entry of component `name` may stand for the new one: same component key (entries
    from before component keys have none: rebuilt), checked against PyTorch if this export asks for it,
    every file intact."""
    if not isinstance(entry, dict) or entry.get("component_key") != key:
        return False
    if options.verify and "parity" not in entry:
        log.info("%s: %s was exported unverified (--no-verify); rebuilding it with the parity check", out, name)
        return False
    if not isinstance(entry.get("files"), dict):
        return False
    try:
        mf.verify_files(out, {"components": {name: entry}, "pipeline": {}}, [name])
    except ArtifactError as exc:
        log.info("%s: not reusing %s: %s", out, name, exc)
        return False
    return True


def write_rebuild_record(out: Path, components: dict, folders) -> None:
    """REBUILD: the entries a killed rebuild may reuse and the folders it owns (under the lock)."""
    atomic.write_json(out / REBUILD, {"components": components, "folders": sorted(folders)})


def begin_rebuild(out: Path, key: str, t0: float, loras: list[dict], options: ExportOptions, sources: dict,
                  component_keys: dict[str, str] | None = None) -> tuple[ExportResult | None, dict]:
    """Under the artifact's lock: (the export another builder finished while this one waited for the
    lock, {}) (a hit, no second build); else (None, the old entries kept), the folder made ready for a
    rebuild: its manifest removed, so that nothing trusts it until the new one is written, the old
    component folders not kept removed, and what killed writes left there removed.

    `component_keys` ({name: component_key} of the new export): the old components whose entry has that
    key and whose files verify are kept, folder and entry (`_reusable`); None (pixel exports) keeps none.
    `sources`: the paths of the export's inputs, recorded anew on a hit (cached_export)."""
    hit = cached_export(out, key, t0, loras, verified=options.verify, quiet=True, sources=sources, locked=True)
    if hit is not None:
        return hit, {}
    old, owned = _old_components(out)
    wanted = component_keys or {}
    kept = {name: old[name] for name in wanted if name in old and _reusable(out, name, old[name], wanted[name], options)}
    if component_keys is not None:
        # Before the manifest goes: from here on the record names what is kept and what may be written.
        write_rebuild_record(out, kept, {*owned, *wanted})
    else:
        (out / REBUILD).unlink(missing_ok=True)
    (out / mf.MANIFEST).unlink(missing_ok=True)
    # The old export's component folders but those kept: each is rebuilt anyway, and one the new export
    # lacks (a ControlNet dropped: controlnet/, unet_controlnet/) would otherwise stay, gigabytes no manifest names.
    for name in owned:
        if name not in kept:
            shutil.rmtree(out / name, ignore_errors=True)
            if (out / name).exists():  # a file held open elsewhere, a permission: say so, as no record will name it
                log.warning("%s: could not remove the old %s/ (in use, or not ours to delete); remove it by hand", out, name)
    removed = atomic.remove_leftovers(out)
    if removed:
        log.info("%s: removed %d temporary file(s) an interrupted export left: %s", out, len(removed), ", ".join(removed))
    return None, kept


def start_rebuild(out: Path, key: str, t0: float, loras: list[dict], options: ExportOptions, sources: dict) -> ExportResult | None:
    """`begin_rebuild` keeping no component (pixel exports: one component, rebuilt whole)."""
    return begin_rebuild(out, key, t0, loras, options, sources)[0]


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
        entry["engine"] = build_engine(onnx_path, spec, engine_path, precision=precision, refit=spec.name in LORA_COMPONENTS)
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


def options_text(options: ExportOptions) -> str:
    """The settings an automatic export's folder is named by: their repr, the default opset resolved (the
    default and 17 are one export). `vae_encoder`, a later field, is left out at its default, so that the
    folders made before it (the digits model's, for `diffrt demo`) are still found."""
    text = repr(replace(options, opset=options.onnx_opset))
    return text if options.vae_encoder else text.replace(", vae_encoder=False", "")


def default_artifact_dir(model_dir: Path, options: ExportOptions) -> Path:
    """Where `diffrt demo` / `generate` keep an automatic export: the user cache, by source and settings."""
    from platformdirs import user_cache_dir

    tag = mf.cache_key({"src": str(model_dir.resolve()), "sha": atomic.sha256_folder(model_dir), "opts": options_text(options)})[:16]
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
