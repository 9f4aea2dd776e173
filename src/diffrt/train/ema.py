"""An exponential moving average of the weights a run trains (--ema-decay), kept in fp32; the model a run
saves and its sample grids are the averaged one."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Exponential moving average of the trainable parameters (kept in fp32).

    The decay warms up as (1 + n) / (10 + n) after n updates: a fixed 0.999 from the start would
    keep 0.999^n of the random initialisation (37 % after 1000 steps) in the averaged weights.
    With `power` > 0 it warms up as diffusers' EMAModel(use_ema_warmup=True) does, step for step:
    0 at the first update (a copy), then 1 - (1 + (n - 1) / inv_gamma) ^ -power at the n-th
    (power 3/4 reaches 0.999 after ~10k updates and 0.9999 after ~215k; 2/3 after ~31.6k and ~1M: the scale for long
    runs).
    """

    def __init__(self, named_params: dict[str, nn.Parameter], decay: float, power: float = 0.0, inv_gamma: float = 1.0):
        self.decay, self.power, self.inv_gamma = decay, power, inv_gamma
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def decay_at(self, updates: int) -> float:
        if self.power > 0:
            step = updates - 1
            return 0.0 if step <= 0 else min(self.decay, 1 - (1 + step / self.inv_gamma) ** -self.power)
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self, named_params: dict[str, nn.Parameter], updates: int) -> None:
        """Fold in the weights after `updates` optimizer steps (the step count makes resume exact)."""
        decay = self.decay_at(updates)
        for k, p in named_params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - decay)

    def load(self, shadow: dict[str, torch.Tensor], named_params: dict[str, nn.Parameter]) -> None:
        """Take saved averages (CPU tensors from a checkpoint) onto each parameter's device, in fp32."""
        self.shadow = {k: shadow[k].to(device=p.device, dtype=torch.float32) for k, p in named_params.items()}

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, nn.Parameter]) -> None:
        for k, p in named_params.items():
            p.copy_(self.shadow[k].to(p.dtype))
