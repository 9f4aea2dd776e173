"""Fused Triton kernels for the per-step work of the sampler, each with its PyTorch reference.

* `cfg_ddim_step`: classifier-free guidance combine + one DDIM step (Eq. 12 / 16) in one pass.
* `color_guidance_step`: the colour-guidance gradient step, in closed form (no autograd).

Both run the compiled kernel on CUDA tensors when Triton is installed, the interpreter when
DIFFRT_TRITON_INTERPRET=1 (or TRITON_INTERPRET=1) is set, and the PyTorch reference otherwise;
see `diffrt.kernels.launch`. Importing this package never needs Triton.
"""

from diffrt.kernels.cfg_ddim import cfg_ddim_step
from diffrt.kernels.color_guidance import color_guidance_step
from diffrt.kernels.launch import triton_available

__all__ = ["cfg_ddim_step", "color_guidance_step", "triton_available"]
