"""ONNX -> TensorRT engine for one component (TensorRT 10 Python API, imported lazily).

    build_engine(onnx_path, spec, engine_path, precision) -> manifest entry

The component's spec gives the one optimisation profile (min/opt/max of every dynamic axis).
The components a LoRA can patch (UNet, text encoder: refit.LORA_COMPONENTS) are built refittable,
so a LoRA can be swapped in later from the base weights (`diffrt.export.refit`) without a rebuild;
the VAE and a standalone ControlNet are not (refit costs a little speed).

Typing. TensorRT 10 builds either a strongly-typed network, where every tensor keeps the type
the ONNX gives it, or a weakly-typed one, where precision flags let the builder choose per
layer. An ONNX exported at the requested precision (artifact.py exports fp16 ONNX for fp16) is
built strongly typed, so the engine computes in the types that were checked against PyTorch;
an fp32 ONNX built for fp16/bf16 is built weakly typed with the FP16/BF16 flag. An fp32 engine
clears TF32, so "fp32" means fp32 and meets the fp32 parity tolerance. (TensorRT 11 builds
strongly typed networks only; there an fp16/bf16 engine needs an ONNX exported in that type.)

Reliability (RELIABILITY.md): external data must sit beside the ONNX (#6); the workspace is
capped below free memory and torch's cached blocks are released first, and a build that
returns nothing is reported as out of memory or unsupported layer, not as "could not find
any implementation" (#9); the engine and the shared timing cache are written atomically
under a lock (#10); the entry records the TensorRT version and GPU that the loader checks (#1, #2).
"""

from __future__ import annotations

import gc
import logging
import re
import time
from pathlib import Path
from typing import Any

from diffrt import atomic
from diffrt.components import ComponentSpec
from diffrt.errors import ArtifactError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
ONNX_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx.TensorProto elem types
WORKSPACE_SHARE = 0.75  # default workspace cap: this share of the free GPU memory
PROFILE_POINTS = ("min", "opt", "max")

_LOGGER = None  # TensorRT keeps a pointer to its logger: one for the whole process


# --- pure helpers (no TensorRT needed) -----------------------------------------------------------


def engine_profile(spec: ComponentSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """The optimisation profile of `spec`: {input: {"min"|"opt"|"max": shape}} for every input
    with a dynamic axis (fixed-shape inputs need none)."""
    dynamic = [t for t in spec.inputs if any(isinstance(d, str) for d in t.dims)]
    for t in dynamic:
        for d in t.dims:
            if isinstance(d, str) and d not in spec.ranges:
                raise ArtifactError(f"{spec.name}.{t.name}: dynamic axis '{d}' has no (min, opt, max) range in the component spec")
    for d, (lo, opt, hi) in spec.ranges.items():
        if not 1 <= lo <= opt <= hi:
            raise ArtifactError(f"{spec.name}: range of '{d}' must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")
        # The profile's corners are shapes the engine is built and tuned for: one the component
        # refuses to run (spec.check_size) would be tuned for nothing, or fail the build where the
        # graph's skip connections no longer line up.
        m = spec.multiple_of.get(d, 1)
        if any(v % m for v in (lo, opt, hi)):
            raise ArtifactError(f"{spec.name}: range of '{d}' {(lo, opt, hi)} must hold multiples of {m}, the only sizes it runs")
    shapes = {point: spec.input_shapes(point) for point in PROFILE_POINTS}
    return {t.name: {point: shapes[point][t.name] for point in PROFILE_POINTS} for t in dynamic}


def onnx_float_type(onnx_path: str | Path) -> str | None:
    """"fp32"/"fp16"/"bf16": the half type of the graph's floating inputs if any is half, else fp32
    (a half UNet's timestep is fp32, components.TensorSpec.pinned, whatever its place among the
    inputs); for a graph without float inputs, the type of most float initializers; None for a
    graph without floats. Reads the graph only, not external data."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    kinds = [kind for kind in (ONNX_FLOAT_TYPES.get(v.type.tensor_type.elem_type) for v in model.graph.input) if kind]
    if kinds:
        return next((kind for kind in kinds if kind != "fp32"), "fp32")
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        kind = ONNX_FLOAT_TYPES.get(init.data_type)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return max(counts, key=counts.get) if counts else None


def strongly_typed_build(precision: str, onnx_type: str | None, strongly_typed: bool | None = None) -> bool:
    """Whether to build a strongly-typed network (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ArtifactError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32" and onnx_type in ("fp16", "bf16"):
        raise ArtifactError(f"the ONNX holds {onnx_type} tensors but an fp32 engine was asked for; re-export the ONNX in fp32")
    if strongly_typed is not None:
        return strongly_typed
    return precision != "fp32" and onnx_type == precision


def explain_build_failure(component: str, errors: list[str], workspace_bytes: int, free_bytes: int | None) -> str:
    """One line naming the likely cause of a build that produced no engine (RELIABILITY #9).

    TensorRT says "could not find any implementation for node X" both when no kernel supports X
    and when every kernel that does needed more memory than it could get (TensorRT #2643), so
    with that message the memory figures come first."""
    text = " | ".join(" ".join(e.split()) for e in errors[-3:]) or "no error was logged"
    gib = 1024**3
    memory = f"workspace cap {workspace_bytes / gib:.2f} GiB" + (f", {free_bytes / gib:.2f} GiB free on the GPU" if free_bytes is not None else "")
    joined = "\n".join(errors)
    if re.search(r"out of memory|OutOfMemory|cudaErrorMemoryAllocation|failed to allocate|allocation failed|insufficient memory", joined, re.I):
        return (f"TensorRT ran out of GPU memory building {component} ({memory}); free GPU memory (other processes, "
                f"models still loaded), or lower the profile's max batch/size, and rebuild [{text}]")
    # Node names hold dots (/down_blocks.0/resnets.0/conv1/Conv); only a sentence's final one is dropped.
    impl = re.search(r"could not find any implementation for node (\S+?)\.?(?:\)|\s|$)", joined, re.I | re.M)
    if impl:
        return (f"TensorRT found no kernel for node {impl.group(1)} of {component} within its memory ({memory}): most often "
                f"this is out of GPU memory, so free memory or raise --workspace-gb and rebuild; if memory is ample the layer is "
                f"unsupported at this precision by this TensorRT [{text}]")
    if re.search(r"unsupported|not supported|no importer registered", joined, re.I):
        return f"TensorRT does not support a layer of {component} at this precision [{text}]; try another precision or opset"
    return f"TensorRT built no engine for {component} ({memory}) [{text}]"


def engine_entry(trt_version: str | None, gpu: dict | None, precision: str, spec: ComponentSpec, *, strongly_typed: bool,
                 workspace_bytes: int, timing_cache: Path, timing_cache_loaded: bool, build_seconds: float,
                 engine_path: Path, refittable: bool = True) -> dict[str, Any]:
    """The component's "engine" entry in the manifest; `manifest.check_engine_compatible` reads
    "tensorrt" and "gpu" from it."""
    return {
        "tensorrt": trt_version, "gpu": gpu, "precision": precision,
        "typing": "strong" if strongly_typed else "weak",
        "profiles": {name: {p: list(s) for p, s in shapes.items()} for name, shapes in engine_profile(spec).items()},
        "refittable": refittable, "loras": [],  # built from the base weights; refit.py records swaps
        "workspace_bytes": workspace_bytes, "timing_cache": str(timing_cache), "timing_cache_loaded": timing_cache_loaded,
        "build_seconds": round(build_seconds, 3), "sha256": atomic.sha256_file(engine_path), "bytes": engine_path.stat().st_size,
    }


def default_timing_cache(trt_version: str | None, gpu: dict | None) -> Path:
    """<diffrt's cache>/tensorrt-timing-<version>-sm<cc>.cache: shared by every build on this
    machine. Timings are only valid for one TensorRT version and GPU model, hence the name."""
    from diffrt.atomic import cache_dir

    cc = (gpu or {}).get("compute_capability", "none").replace(".", "")
    return cache_dir() / f"tensorrt-timing-{trt_version or 'unknown'}-sm{cc}.cache"


# --- TensorRT --------------------------------------------------------------------------------------


def import_tensorrt():
    """`import tensorrt`, or one BackendUnavailableError line naming the backends available here."""
    from diffrt.runtime.backends import require_backend

    require_backend("tensorrt")
    import tensorrt

    return tensorrt


def trt_logger():
    """A process-wide TensorRT logger that forwards to `logging` and remembers recent errors."""
    global _LOGGER
    if _LOGGER is None:
        trt = import_tensorrt()

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors = ErrorLog()
                self._serious = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
                self._quiet = (trt.ILogger.Severity.INFO, trt.ILogger.Severity.VERBOSE)

            def log(self, severity, msg):
                # A Python ILogger gets every message, VERBOSE too (only trt.Logger filters by severity): thousands
                # per build, each a call under the GIL. They are dropped here unless debug logging would show them.
                if severity in self._quiet:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("TensorRT: %s", msg)
                elif severity in self._serious:
                    self.errors.add(msg)  # in place: callers hold this log and read what a call added
                    log.error("TensorRT: %s", msg)
                else:
                    log.warning("TensorRT: %s", msg)

        _LOGGER = _Logger()
    return _LOGGER


def _parser_error_text(parser) -> str:
    parts = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = getattr(error, "node_name", lambda: "")() or f"node #{error.node()}"
        op = getattr(error, "node_operator", lambda: "")()
        parts.append(f"{node}{f' ({op})' if op else ''}: {' '.join(str(error.desc()).split())}")
    more = f" and {len(parts) - 5} more" if len(parts) > 5 else ""
    return "; ".join(parts[:5]) + more


class ErrorLog(list):
    """The logger's recent errors, oldest dropped past 1000; `dropped` counts those, so that a caller that noted
    `mark()` before a call reads exactly the errors logged since (`since`), however many were dropped meanwhile."""

    dropped = 0

    def add(self, message: str) -> None:
        self.append(message)
        if len(self) > 1000:
            del self[:500]
            self.dropped += 500

    def mark(self) -> int:
        return self.dropped + len(self)

    def since(self, mark: int) -> list[str]:
        return self[max(0, mark - self.dropped):]


def error_mark(errors: list[str]) -> int:
    """Where the errors stand before a TensorRT call: its failure reads the errors logged since (errors_since), not
    earlier ones of the process-wide log (another engine's failed build)."""
    return errors.mark() if isinstance(errors, ErrorLog) else len(errors)


def errors_since(errors: list[str], mark: int) -> list[str]:
    return errors.since(mark) if isinstance(errors, ErrorLog) else errors[mark:]


def serialize_network(builder, network, config, component: str, errors: list[str], workspace_bytes: int,
                      free_bytes: int | None):
    """builder.build_serialized_network, with a typed error naming the cause when it returns None."""
    start = error_mark(errors)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(explain_build_failure(component, errors_since(errors, start), workspace_bytes, free_bytes))
    return plan


def build_engine(onnx_path: str | Path, spec: ComponentSpec, engine_path: str | Path, precision: str = "fp32",
                 workspace_gb: float | None = None, timing_cache: str | Path | None = None,
                 strongly_typed: bool | None = None, refit: bool = True) -> dict[str, Any]:
    """Build an engine for `spec` from `onnx_path` into `engine_path`; return its manifest entry.
    `refit`: build it refittable (BuilderFlag.REFIT), for components that take LoRA by refit; the
    flag keeps weights out of some optimisations, so engines that never take LoRA go without it."""
    t0 = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    # 1. TensorRT and a GPU, or one line saying which backends there are.
    trt = import_tensorrt()
    import torch

    from diffrt.export.manifest import gpu_identity
    from diffrt.export.onnx import check_onnx_files

    version, gpu = trt.__version__, gpu_identity()  # the library loaded, which the deserializer compares against
    logger = trt_logger()

    # 2. The ONNX and its external data are there (RELIABILITY #6); typing follows its dtype.
    check_onnx_files(onnx_path)
    onnx_type = onnx_float_type(onnx_path)
    strong = strongly_typed_build(precision, onnx_type, strongly_typed)

    # 3. Parse. parse_from_file resolves external data relative to the .onnx file.
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ArtifactError(f"TensorRT {version} could not parse {onnx_path}: {_parser_error_text(parser)}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(spec.input_names):
        raise ArtifactError(f"{onnx_path} has inputs {sorted(inputs)}, the {spec.name} spec expects {sorted(spec.input_names)}; re-export")

    # 4. Configure: one profile, precision, refit, workspace, shared timing cache.
    config = builder.create_builder_config()
    shapes_by_input = engine_profile(spec)
    if shapes_by_input:  # a network without dynamic axes takes no profile
        profile = builder.create_optimization_profile()
        for name, shapes in shapes_by_input.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif not strong:
        flag = {"fp16": "FP16", "bf16": "BF16"}[precision]
        if not hasattr(trt.BuilderFlag, flag):  # TensorRT 11 builds strongly typed networks only
            raise ArtifactError(f"TensorRT {version} takes types from the ONNX only, and this ONNX is {onnx_type}: export it "
                                f"in {precision} (`diffrt export --precision {precision}`) for an {precision} engine")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)

    # Cached torch blocks count as used to the builder (RELIABILITY #9): hand them back first.
    gc.collect()
    torch.cuda.empty_cache()
    free_bytes, _ = torch.cuda.mem_get_info()
    workspace = int(workspace_gb * 1024**3) if workspace_gb else int(free_bytes * WORKSPACE_SHARE)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(version, gpu)
    cache_loaded = _load_timing_cache(config, cache_path)

    # 5. Build, and write the engine atomically (temp file, fsync, rename; RELIABILITY #10).
    log.info("building TensorRT %s engine for %s (%s, %s typing, workspace %.2f GiB)", version, spec.name, precision,
             "strong" if strong else "weak", workspace / 1024**3)
    with atomic.file_lock(engine_path.parent / f".{engine_path.name}.lock"):
        plan = serialize_network(builder, network, config, spec.name, logger.errors, workspace, free_bytes)
        atomic.write_bytes(engine_path, memoryview(plan))
    del plan
    _save_timing_cache(config, cache_path)
    seconds = time.perf_counter() - t0
    log.info("built %s (%.1f s, %.1f MiB)", engine_path, seconds, engine_path.stat().st_size / 2**20)
    return engine_entry(version, gpu, precision, spec, strongly_typed=strong, workspace_bytes=workspace,
                        timing_cache=cache_path, timing_cache_loaded=cache_loaded, build_seconds=seconds,
                        engine_path=engine_path, refittable=refit)


def _load_timing_cache(config, path: Path) -> bool:
    """Start from the shared timing cache if there is one; True when it was accepted."""
    data = b""
    with atomic.file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            data = path.read_bytes()
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # a truncated or foreign file: timings are an optimisation, start afresh
            cache = None
        if cache is not None and config.set_timing_cache(cache, False):
            log.info("timing cache %s reused (%d bytes)", path, len(data))
            return True
        log.warning("timing cache %s is unreadable or from another TensorRT/GPU; starting an empty one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _save_timing_cache(config, path: Path) -> None:
    """Merge what this build timed into the shared cache file; another builder may have added to
    it meanwhile, so its entries are combined in under the lock, never overwritten."""
    built = config.get_timing_cache()
    with atomic.file_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            try:
                other = config.create_timing_cache(path.read_bytes())
            except Exception:
                other = None
            if other is not None:
                built.combine(other, False)  # False: a foreign cache is skipped, not merged
        atomic.write_bytes(path, memoryview(built.serialize()))
