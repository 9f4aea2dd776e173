"""Backends: one small contract for every engine (polygraphy's runner idea, torch tensors in and out).

    backend.run({"sample": x, "timestep": t, ...}) -> {"noise_pred": eps}

Named torch tensors in, named torch tensors out, on the backend's device. A backend is asked for
by name (REGISTRY: the library it needs and how to install it); its module imports that library
lazily, so `import diffrt` needs none of them, and the loaders (runtime/loading.py) build it.
"""

from __future__ import annotations

import functools
import importlib
from typing import Protocol, runtime_checkable

import torch

from diffrt.components import ComponentSpec
from diffrt.errors import BackendUnavailableError

# name -> (the library it needs, what to install)
REGISTRY: dict[str, tuple[str | None, str]] = {
    "torch": (None, ""),
    "torch-compile": (None, ""),
    "onnxruntime": ("onnxruntime", "pip install 'diffrt[cpu]' (or diffrt[gpu] for CUDA)"),
    "tensorrt": ("tensorrt", "pip install tensorrt-cu12 (the CUDA major of torch.version.cuda) on a machine with an NVIDIA GPU"),
}
TORCH_BACKENDS = ("torch", "torch-compile")  # PyTorch modules, no exported files
EXPORTED = ("tensorrt", "onnxruntime")  # fastest first


@runtime_checkable
class Backend(Protocol):
    name: str
    spec: ComponentSpec
    device: torch.device

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken install (missing CUDA libs) is as unavailable as a missing one
        return False


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot build or run here, or None. Importing it is not enough: `pip install tensorrt` may bring
    a build for another CUDA major (10.x pulls CUDA 13's runtime, which needs a driver >= 580), whose module imports
    and whose Builder then fails with a bare "factory function returned nullptr"; one Builder is made to find out."""
    return "it needs a CUDA GPU" if not torch.cuda.is_available() else _tensorrt_library_problem()


@functools.lru_cache(maxsize=1)
def _tensorrt_library_problem() -> str | None:
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - missing, or its libraries do not load
        return "tensorrt is not installed" if isinstance(exc, ModuleNotFoundError) else f"tensorrt does not load ({exc})"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # noqa: BLE001 - TypeError: the C++ factory returned nullptr
        builder, why = None, f": {exc}"
    else:
        why = ""
    if builder is None:
        return (f"TensorRT {trt.__version__} cannot create a builder{why} (a build for another CUDA than this driver's? "
                f"torch has CUDA {torch.version.cuda})")
    return None


def backend_available(name: str) -> bool:
    if name not in REGISTRY:
        return False
    lib, _ = REGISTRY[name]
    if name == "tensorrt":
        return tensorrt_problem() is None
    return lib is None or _importable(lib)


def available_backends() -> list[str]:
    return [name for name in REGISTRY if backend_available(name)]


def require_backend(name: str) -> None:
    """Raise BackendUnavailableError in one line naming the backends that are available."""
    if name not in REGISTRY:
        raise BackendUnavailableError(f"unknown backend {name!r}; available here: {', '.join(available_backends())}")
    if not backend_available(name):
        lib, hint = REGISTRY[name]
        why = tensorrt_problem() if name == "tensorrt" else f"{lib} is not installed"
        raise BackendUnavailableError(f"backend {name!r} is not available ({why}; {hint}); available here: {', '.join(available_backends())}")


def default_device(backend: str | None = None) -> torch.device:
    """Where a backend runs when no device is given: CUDA when torch sees a GPU (for onnxruntime,
    also only when its build has the CUDA provider), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if backend == "onnxruntime" and not _onnxruntime_has_cuda():
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_device(device: str | torch.device | None, backend: str) -> torch.device:
    """The device `backend` runs on: `device`, or `default_device(backend)` when None.

    TensorRT runs on CUDA only, so asking it for another device, or for none on a machine without
    CUDA, is refused here in one line, before any export builds an engine."""
    try:
        resolved = torch.device(device) if device is not None else default_device(backend)
    except RuntimeError:
        raise BackendUnavailableError(f"device {device!r} (--device) is not a device torch knows; pass cpu or cuda (or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():  # the API's device= and the CLI's --device alike
        raise BackendUnavailableError(f"device {device} (--device): torch sees no CUDA GPU here; pass cpu, or leave the device out")
    if resolved.type not in ("cpu", "cuda") and backend != "tensorrt":  # mps, xpu, meta: a traceback at the first call
        usable = {"mps": lambda: torch.backends.mps.is_available(), "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
        if backend not in TORCH_BACKENDS or not usable.get(resolved.type, lambda: False)():
            where = "PyTorch here" if backend in TORCH_BACKENDS else f"backend {backend!r}"
            raise BackendUnavailableError(f"--device {device}: {where} runs on cpu or cuda, not {resolved.type}; pass cpu or "
                                          "cuda (or cuda:N)")
    if backend == "tensorrt":
        if device is None and resolved.type != "cuda":
            raise BackendUnavailableError("backend 'tensorrt' needs a CUDA GPU and torch sees none here; "
                                          f"available here: {', '.join(available_backends())}")
        if resolved.type != "cuda":
            raise BackendUnavailableError(f"backend 'tensorrt' runs on a CUDA device, not {resolved}; "
                                          "pass --device cuda (or leave --device out)")
    return resolved


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def best_exported_backend() -> str:
    """The fastest backend that runs exported artifacts on this machine."""
    for name in EXPORTED:
        if backend_available(name):
            return name
    raise BackendUnavailableError(f"no exported-model backend is installed; pip install 'diffrt[cpu]'; available here: {', '.join(available_backends())}")
