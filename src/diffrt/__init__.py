"""diffrt: train diffusion models in PyTorch, export them to ONNX and TensorRT, and run a
guided DDIM loop over whichever backend is fastest, measured against eager PyTorch.

`import diffrt` needs only the core dependencies; onnxruntime, TensorRT, Triton and the
serving stack are imported where they are used.
"""

__version__ = "0.1.0"

from diffrt.errors import DiffrtError

__all__ = ["DiffrtError", "__version__", "open_pipeline"]

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers and IDEs; at run time it is imported on first use, below
    from diffrt.runtime.opening import open_pipeline


def __getattr__(name: str):
    # `diffrt.open_pipeline` without importing torch and the runtime at `import diffrt`.
    if name == "open_pipeline":
        from diffrt.runtime.opening import open_pipeline

        return open_pipeline
    raise AttributeError(f"module 'diffrt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
