"""The torch backend: eager PyTorch (the reference), optionally under torch.compile."""

from __future__ import annotations

import torch
from torch import nn

from diffrt.components import ComponentSpec


class TorchBackend:
    """Runs a component module; positional arguments in the order the spec names them."""

    def __init__(self, module: nn.Module, spec: ComponentSpec, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, compile: bool = False):
        self.name = "torch-compile" if compile else "torch"
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.module = module.to(self.device, dtype).eval()
        self._fn = torch.compile(self.module, dynamic=False) if compile else self.module

    @torch.inference_mode()
    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Float inputs in the module's dtype, except pinned ones: a half UNet takes its timestep in fp32,
        # as diffusers runs it and as the exported graphs declare it (components.TensorSpec.pinned).
        args = [_cast(feed[t.name], self.device, t.torch_dtype(self.dtype)) for t in self.spec.inputs]
        out = self._fn(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self.spec.output_names, outs))


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)
