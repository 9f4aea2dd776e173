"""Fused Triton kernels for per-step sampler work, each with its PyTorch reference.

* `cfg_ddim_step`: classifier-free guidance combine + one DDIM step (Eq. 12 / 16) in one pass; the
  DDIM schedule's step runs it whenever the CFG branches arrive apart.
* `color_guidance_step`: the colour-guidance gradient step of a pixel model in closed form (no
  autograd). The sampler does not call it: its guidance takes gradients with autograd, which serves
  any loss and, for latent models, the VAE decode between x0 and the loss. This kernel is what that
  gradient costs fused, measured by benchmarks/bench_kernels.py and checked against autograd in tests.

Both run the compiled kernel on CUDA tensors when Triton is installed, the interpreter when
DIFFRT_TRITON_INTERPRET=1 (or TRITON_INTERPRET=1) is set, and the PyTorch reference otherwise;
see `diffrt.kernels.launch`. Importing this package never needs Triton.
"""

from diffrt.kernels.cfg_ddim import cfg_ddim_step
from diffrt.kernels.color_guidance import color_guidance_step
from diffrt.kernels.launch import triton_available

__all__ = ["cfg_ddim_step", "color_guidance_step", "triton_available"]
