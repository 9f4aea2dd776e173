"""The onnxruntime backend: CPU, CUDA or TensorRT execution providers, torch tensors in and out.

IO binding hands ONNX Runtime the torch tensors' memory directly, inputs and pre-allocated
outputs alike, so a step does not copy through NumPy (nor leave the GPU on CUDA). Every feed is
checked against the component's exported ranges first, as on TensorRT (RELIABILITY #3).

Providers (RELIABILITY #15). ONNX Runtime silently drops an execution provider it cannot start
(no CUDA libraries, no TensorRT) and runs on the next one, down to the CPU. After opening the
session the providers it really uses (`session.get_providers()`) are compared with those asked
for: a missing one is a warning, or with `strict=True` an error, naming the providers the build
has when it lacks the one asked for (which is then not passed to it). `backend.providers` is
reported with every result. A CUDA backend whose session fell back to the CPU binds host memory
(ONNX Runtime cannot copy CUDA memory without a GPU provider: "no data transfer registered") and
returns its outputs on its device, so the fallback that the warning names really runs.

On CUDA the default is TensorRT's provider where TensorRT is installed (with the component's ranges
as its profile and versioned engine caches), then CUDA's; onnxruntime-gpu lists TensorRT's
provider even without TensorRT, so that list alone is not asked (`default_providers`). Sessions bind memory on the GPU the session really runs on, read from
`session.get_provider_options()`: ONNX Runtime's own fallback from a TensorRT provider that failed
to start re-creates the session without the options it was given, `device_id` included.
"""

from __future__ import annotations

import re

import ctypes
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from diffrt.components import ComponentSpec, tensor_shape
from diffrt.errors import BackendUnavailableError

log = logging.getLogger(__name__)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # those that take CUDA memory
# bind_input/bind_output element types as ONNX TensorProto numbers, taken since ONNX Runtime 1.20
# (microsoft/onnxruntime#22306): a numpy dtype name cannot say bfloat16 ("Numpy_type 256 can't be
# converted to MLDataType").
_ELEMENT_TYPES = {torch.float32: 1, torch.int32: 6, torch.int64: 7, torch.float16: 10, torch.float64: 11,
                  torch.bfloat16: 16}


def default_providers(device: torch.device, spec: ComponentSpec | None = None, onnx_path: str | Path | None = None,
                      weights_id: str | None = None) -> list:
    """On a CUDA device: TensorRT's provider when TensorRT is really installed (see
    `tensorrt_installed`), then CUDA's, then the CPU's; elsewhere the CPU's. `weights_id`: see tensorrt_provider."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        raise BackendUnavailableError(f"onnxruntime has no CUDA provider here (providers: {', '.join(have)}); pip install onnxruntime-gpu (not both onnxruntime and onnxruntime-gpu)")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device}: torch sees no CUDA GPU here, and onnxruntime's inputs and outputs are torch tensors; pass device cpu (--device cpu)")
    cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0})
    if "TensorrtExecutionProvider" in have and spec is not None and tensorrt_installed():
        return [tensorrt_provider(device, spec, onnx_path, weights_id), cuda, "CPUExecutionProvider"]
    return [cuda, "CPUExecutionProvider"]


@functools.lru_cache(maxsize=1)
def tensorrt_installed() -> bool:
    """Whether ONNX Runtime's TensorRT provider can run, which onnxruntime-gpu's provider list does not say: it
    names TensorRT's provider whether or not TensorRT is installed (microsoft/onnxruntime#24841), and asking for
    it without is a provider fallback on every session. TensorRT must load, and the provider's library must load
    beside it: built against one TensorRT major (libnvinfer.so.10), it cannot use another (TensorRT 11)."""
    try:
        import onnxruntime
        import tensorrt  # loads libnvinfer, by which the provider's library then resolves it
    except Exception:  # noqa: BLE001 - missing or broken, it cannot run
        return False
    capi = Path(onnxruntime.__file__).parent / "capi"
    provider = next(capi.glob("*onnxruntime_providers_tensorrt.*"), None)
    if provider is None:  # a build laid out otherwise: the provider list is all there is to go by
        return True
    try:
        # As ONNX Runtime loads it: the shared provider bridge first, global, which the provider's library links to.
        shared = next(capi.glob("*onnxruntime_providers_shared.*"), None)
        if shared is not None:
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(provider))
    except OSError as exc:
        log.warning("ONNX Runtime's TensorRT provider does not load beside TensorRT %s (%s); ONNX Runtime sessions run on "
                    "CUDA's provider", getattr(tensorrt, "__version__", "?"), " ".join(str(exc).split()))
        return False
    return True


def tensorrt_provider(device: torch.device, spec: ComponentSpec, onnx_path: str | Path | None = None,
                      weights_id: str | None = None) -> tuple[str, dict]:
    """ONNX Runtime's TensorRT provider set up as a deployment wants it: the component's ranges as
    the one optimisation profile (else it rebuilds for every shape beyond those seen), and engine and
    timing caches in a folder per ONNX Runtime, TensorRT, GPU model and precision, since the provider
    does not check those itself (RELIABILITY #1, #2).

    Engines go one folder further down, per weights (`weights_id`: a digest of the graph's files, as an
    artifact's manifest lists them; else they are hashed here): the provider names a cached engine by the
    graph's file name, its input, initializer and node names and the library versions, never by the weights,
    so the same model exported with another LoRA, scale or fine-tune would have run the first one's engine
    (RELIABILITY #11). The timing cache, which times layers by their shapes, is shared.

    An fp16 (bf16) graph turns on the provider's fp16 (bf16) mode on TensorRT before 11: its networks
    are weakly typed, and without the flag TensorRT may run every layer in fp32, half the speed the
    export was made for. TensorRT 11 builds only strongly typed networks, which take the graph's types."""
    import onnxruntime as ort
    import tensorrt
    from diffrt.atomic import cache_dir
    from diffrt.export.manifest import gpu_identity
    from diffrt.export.tensorrt import PROFILE_POINTS, engine_profile, onnx_float_type

    # The GPU's model by name too: an A10 and an RTX 3090 share compute capability 8.6, and engines are only valid on
    # the model they were built on (a shared DIFFRT_CACHE_DIR served one's engines to the other).
    gpu = gpu_identity(device) or {}
    name = re.sub(r"[^a-z0-9]+", "-", gpu.get("name", "none").lower()).strip("-") or "unnamed"
    cc = gpu.get("compute_capability", "none").replace(".", "")
    precision = (onnx_float_type(onnx_path) if onnx_path is not None else None) or "fp32"
    cache = cache_dir() / f"ort-tensorrt-{ort.__version__}-trt{tensorrt.__version__}-{name}-sm{cc}-{precision}"
    if weights_id is None and onnx_path is not None:
        weights_id = graph_files_id(Path(onnx_path))
    engines = cache / weights_id if weights_id else cache
    engines.mkdir(parents=True, exist_ok=True)
    options = {"device_id": device.index or 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    if precision != "fp32" and int(tensorrt.__version__.split(".")[0]) < 11:
        options[f"trt_{precision}_enable"] = True
    profile = engine_profile(spec)
    for point in PROFILE_POINTS if profile else ():
        options[f"trt_profile_{point}_shapes"] = ",".join(f"{name}:{'x'.join(map(str, shapes[point]))}"
                                                          for name, shapes in profile.items())
    return "TensorrtExecutionProvider", options


def files_id(digests: dict[str, str]) -> str:
    """A short name for a graph's weights from its files' sha256 digests, by file name (model.onnx and its
    external data, as an artifact's manifest lists them)."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def graph_files_id(onnx_path: Path) -> str:
    """files_id of an ONNX file and the external data it names, hashed from the disk."""
    from diffrt.atomic import sha256_file
    from diffrt.export.onnx import external_data_files

    names = [onnx_path.name, *external_data_files(onnx_path)]
    return files_id({name: sha256_file(onnx_path.parent / name) for name in names})


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:<torch's current device>`: torch puts tensors there, and ONNX Runtime must
    be told the same index (as device_id and in every binding), not 0."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, spec: ComponentSpec, device: str | torch.device = "cpu",
                 providers: list | None = None, threads: int | None = None, strict: bool = False,
                 weights_id: str | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.device = _indexed(torch.device(device))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # PyTorch's thread count when the session is made (OMP_NUM_THREADS, torch.set_num_threads before opening: one
        # setting sizes both pools, as the bench's cpu_threads does; a later change does not resize it), within the CPUs
        # this process may use (a container's or taskset's share; macOS has no sched_getaffinity).
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        options.intra_op_num_threads = threads or max(1, min(torch.get_num_threads(), cpus))
        if self.device.type == "cpu":
            # Its workers wait without spinning between runs: the sampler's torch work runs between two UNet calls,
            # and a worker spinning on a core slowed the loop by up to 40 % on two cores (a review's measure).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        requested = providers or default_providers(self.device, spec, onnx_path, weights_id)
        self.requested_providers = [p if isinstance(p, str) else p[0] for p in requested]
        # A provider this build lacks is left out of the session (asked for it, ONNX Runtime prints a
        # multi-line "EP Error" and retries on the CPU) and named, with those the build has, below.
        available = ort.get_available_providers()
        runnable = [p for p, name in zip(requested, self.requested_providers) if name in available] or ["CPUExecutionProvider"]
        if strict:  # refused before a session is built for nothing
            check_providers(spec.name, self.requested_providers, [p if isinstance(p, str) else p[0] for p in runnable],
                            strict, available)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=runnable)
        self.providers = self.session.get_providers()  # what really runs: reported with every result
        self.missing_providers = check_providers(spec.name, self.requested_providers, self.providers, strict, available)
        self._io_device = session_device(self.session) if self.device.type == "cuda" else self.device
        if self._io_device.type == "cuda" and self._io_device != self.device:
            log.warning("%s: ONNX Runtime runs on %s, not %s (its provider fallback drops device_id); every step "
                        "copies between the two", spec.name, self._io_device, self.device)
        self._input_dtypes = {i.name: _onnx_dtype(i.type) for i in self.session.get_inputs()}
        self._output_dtypes = {o.name: _onnx_dtype(o.type) for o in self.session.get_outputs()}

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # RELIABILITY #3, as the TensorRT backend does: the graph's axes are dynamic, so ONNX Runtime
        # would run a size outside the exported (and verified) range, or fail on it with its own error.
        self.spec.check(feed)
        binding = self.session.io_binding()
        sizes: dict[str, int] = {}
        keep = []  # the bound tensors must outlive the run
        io = self._io_device
        for spec in self.spec.inputs:
            t = feed[spec.name].to(io, self._input_dtypes[spec.name]).contiguous()
            keep.append(t)
            sizes.update({d: s for d, s in zip(spec.dims, t.shape) if isinstance(d, str)})
            binding.bind_input(spec.name, io.type, io.index or 0, _ELEMENT_TYPES[t.dtype], list(t.shape), t.data_ptr())
        outputs = {}
        for spec in self.spec.outputs:
            out = torch.empty(tensor_shape(spec, sizes), dtype=self._output_dtypes[spec.name], device=io)
            binding.bind_output(spec.name, io.type, io.index or 0, _ELEMENT_TYPES[out.dtype], list(out.shape), out.data_ptr())
            outputs[spec.name] = out
        if io.type == "cuda":
            # ORT runs on its own stream: make it see inputs written on torch's current stream.
            torch.cuda.current_stream(io).synchronize()
        # Run returns after synchronising ORT's stream (run option disable_synchronize_execution_providers
        # is "0" by default), so torch may read the outputs, and free the inputs, on any stream.
        self.session.run_with_iobinding(binding)
        return outputs if io == self.device else {name: t.to(self.device) for name, t in outputs.items()}


def session_device(session) -> torch.device:
    """Where a session reads and writes bound memory: the GPU of the first GPU provider it runs, or
    the CPU when it fell back there (ONNX Runtime without a GPU provider cannot read CUDA memory:
    "no data transfer registered"). The device id comes from the session, not from what was asked:
    ONNX Runtime's retry after a provider failed to start drops the provider options."""
    options = session.get_provider_options()
    for provider in GPU_PROVIDERS:
        if provider in session.get_providers():
            return torch.device("cuda", int(options.get(provider, {}).get("device_id", 0)))
    return torch.device("cpu")


def check_providers(component: str, requested: list[str], used: list[str], strict: bool,
                    available: list[str] | None = None) -> list[str]:
    """Every requested provider must be in the session: a fallback is a warning, or an error when
    strict. Returns the requested providers the session runs without. `available`: the providers
    this ONNX Runtime build has, named when a missing one is not among them."""
    missing = [p for p in requested if p not in used]
    if not missing:
        return missing
    absent = [p for p in missing if available is not None and p not in available]
    if absent:
        why = f"this ONNX Runtime build has no {', '.join(absent)} (it has {', '.join(available)})"
        if set(absent) & set(GPU_PROVIDERS):
            why += "; pip install onnxruntime-gpu for them (not both onnxruntime and onnxruntime-gpu)"
    else:
        why = "see ONNX Runtime's log for why"
    message = (f"{component}: ONNX Runtime did not start {', '.join(missing)} (asked for {', '.join(requested)}) and runs "
               f"on {', '.join(used)}; {why}")
    if strict:
        raise BackendUnavailableError(f"{message}; strict mode refuses a fallback")
    log.warning("%s; strict mode (--strict) makes this an error", message)
    return missing


def _onnx_dtype(type_str: str) -> torch.dtype:
    # ORT reports "tensor(float)", "tensor(float16)", "tensor(int64)", ...
    name = type_str[len("tensor("):-1]
    return {"float": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
            "bfloat16": torch.bfloat16, "double": torch.float64}[name]
