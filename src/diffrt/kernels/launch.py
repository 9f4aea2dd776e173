"""When diffrt runs its Triton kernels, and how it turns kernel bodies into Triton functions.

The rule, shared by every kernel in this package:

* tensors on CUDA and Triton importable -> the compiled kernel;
* `DIFFRT_TRITON_INTERPRET=1` (or Triton's own `TRITON_INTERPRET=1`) -> the kernel runs in
  Triton's interpreter, which also works on CPU tensors; this is how the CPU test suite checks
  the kernels' arithmetic without a GPU;
* otherwise -> the PyTorch reference beside each kernel.

Kernel bodies are plain functions at module level, made Triton functions here on first use rather
than at import, compiled or interpreted as each call needs: one process can hold both versions of
a kernel, and `import diffrt.kernels` works with no Triton installed.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import torch

INTERPRET_ENV_VARS = ("DIFFRT_TRITON_INTERPRET", "TRITON_INTERPRET")
BLOCK_SIZE = 1024  # elements per program; these kernels are elementwise and memory-bound
# Stated rather than left to Triton's default, which 3.9 warns is about to change; a fused
# multiply-add rounds once where a multiply then an add rounds twice.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


@functools.cache
def triton_available() -> bool:
    """True when `import triton` succeeds (it needs no GPU to import)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_requested() -> bool:
    """True when the environment asks for Triton's interpreter instead of compiled kernels."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in INTERPRET_ENV_VARS)


def should_use_triton(*tensors: torch.Tensor | None) -> bool:
    """The dispatch rule above, for the tensors one kernel call would read (None for an input not given).

    A tensor that needs its gradient takes the reference: the kernels have no backward, and their
    results would come back detached, to fail only at `backward()`.
    """
    tensors = tuple(t for t in tensors if t is not None)
    if not triton_available():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.is_cuda for t in tensors) or interpreter_requested()


def needs_interpreter(tensor: torch.Tensor) -> bool:
    """CPU tensors can only go through the interpreter; CUDA tensors do when it is asked for."""
    return not tensor.is_cuda or interpreter_requested()


@functools.cache
def jit_kernel(body: Callable[..., Any], *, interpret: bool) -> Any:
    """`triton.jit(body)`, compiled or interpreted as asked, cached per (body, mode).

    The two classes `triton.jit` chooses between are built directly: switching TRITON_INTERPRET
    around the decoration (process-wide) raced between threads, which could leave a kernel in the
    wrong mode and the variable set for every later launch.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(body)
    from triton.runtime.jit import JITFunction

    return JITFunction(body)


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the tensor's GPU the current one for a launch.

    A compiled Triton kernel runs on the current CUDA device and stream, not on its arguments'
    device: tensors on cuda:1 launched while cuda:0 is current would be read through pointers of the
    wrong device (an illegal memory access, or wrong results through peer access).
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def launch_grid(n_elements: int) -> tuple[int]:
    """One program per BLOCK_SIZE elements of the flattened tensors."""
    return ((n_elements + BLOCK_SIZE - 1) // BLOCK_SIZE,)


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Elementwise kernels read every input at the same flat offset, so shapes and devices must agree; and dtypes: the
    kernel computes in fp32 and stores in the reference's dtype where the PyTorch reference would promote, so mixed
    inputs would give the two paths different results (a review measured 5e-3)."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(reference.shape)} like {reference_name}")
        if tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device}; expected {reference.device} like {reference_name}")
        if tensor.dtype != reference.dtype:
            raise ValueError(f"{name} is {tensor.dtype}; expected {reference.dtype} like {reference_name} (cast it first)")
