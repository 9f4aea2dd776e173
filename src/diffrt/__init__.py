"""diffrt: train diffusion models in PyTorch, export them to ONNX and TensorRT, and run a
guided DDIM loop over whichever backend is fastest, measured against eager PyTorch.

`import diffrt` needs only the core dependencies; onnxruntime, TensorRT, Triton and the
serving stack are imported where they are used.
"""

__version__ = "0.1.0"

from diffrt.errors import DiffrtError

__all__ = ["DiffrtError", "__version__"]
