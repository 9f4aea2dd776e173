"""The PyTorch UNet that gradient guidance runs "through_unet" must be the model the engine runs.

Engines have no autograd, so guidance mode "through_unet" runs the UNet in PyTorch for its
guided steps (RELIABILITY #16). An artifact's fallback is loaded from its source folder, so a
fallback with other weights (another LoRA, another scale, a source edited since export) would
steer with the wrong model. On its first call the fallback's eps is compared with the backend's
on the same input, and every eps it returns is checked to be finite. Both pipelines (pixel and
text-to-image) wrap their PyTorch denoiser with `guard_autograd_denoiser`.

The limit is relative to max |eps| and depends on the precision the engine was built at: an fp32
engine within 5e-3 (on CUDA, PyTorch's convolutions run in TF32 by default, with a 10-bit
mantissa, while fp32 engines are built without TF32; the weights of another LoRA or scale differ
by far more), fp16/bf16 engines as loosely as export verification allows them (export/verify.py's
TOLERANCE).
"""

from __future__ import annotations

import logging

import torch

from diffrt.errors import DiffrtError
from diffrt.runtime.backends import TORCH_BACKENDS
from diffrt.runtime.sampling import Denoise, check_finite

log = logging.getLogger(__name__)

EPS_AGREEMENT = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 5e-2}  # max |eps_torch - eps_engine| / max |eps_engine|
FALLBACK_COMPONENT = "unet (the PyTorch UNet for through_unet guidance)"


def agreement_tolerance(precision: str) -> float:
    if precision not in EPS_AGREEMENT:
        raise DiffrtError(f"unknown precision {precision!r}; expected one of {', '.join(EPS_AGREEMENT)}")
    return EPS_AGREEMENT[precision]


def check_eps_agreement(eps_torch: torch.Tensor, eps_engine: torch.Tensor, backend: str, precision: str) -> float:
    """Relative max error of the PyTorch eps against the backend's; raises above the precision's limit."""
    limit = agreement_tolerance(precision)
    eps_torch, eps_engine = eps_torch.detach().float(), eps_engine.detach().float().to(eps_torch.device)
    err = ((eps_torch - eps_engine).abs().max() / eps_engine.abs().max().clamp(min=1e-12)).item()
    if not err <= limit:  # NaN fails too
        raise DiffrtError(f"the PyTorch UNet used for 'through_unet' guidance differs from the {backend} UNet by {err:.2e} "
                          f"of |eps| (limit {limit:.0e} for a {precision} engine); they must hold the same weights and LoRA")
    log.debug("through_unet: PyTorch and %s eps agree to %.2e (limit %.0e)", backend, err, limit)
    return err


def guard_autograd_denoiser(torch_denoise: Denoise, engine_denoise: Denoise, backend: str, precision: str,
                            check_outputs: bool = True) -> Denoise:
    """`torch_denoise`, with its eps checked finite on every call and against `engine_denoise` on the first."""
    checked = backend in TORCH_BACKENDS

    def denoise(x_t: torch.Tensor, t: torch.Tensor):
        nonlocal checked
        eps_u, eps_c = torch_denoise(x_t, t)
        if check_outputs:
            for eps in (eps_u, eps_c):
                if eps is not None:
                    check_finite(eps.detach(), FALLBACK_COMPONENT)
        if not checked:
            checked = True
            check_eps_agreement(_both((eps_u, eps_c)), _both(engine_denoise(x_t.detach(), t)), backend, precision)
        return eps_u, eps_c

    return denoise


def _both(eps: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
    """(eps_uncond, eps_cond) as one batch, as the UNet computed them."""
    return eps[1] if eps[0] is None else torch.cat(eps)
