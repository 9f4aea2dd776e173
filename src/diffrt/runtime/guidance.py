"""Gradient guidance: steer sampling with the gradient of a loss on the predicted clean image.

Engines have no autograd, so the gradient is taken in PyTorch. In mode "x0" (the default) the
backend's noise prediction is held constant and the gradient of loss(decode(x0(x_t))) flows
through the running sampler's clean-image prediction (`schedule.predict_clean`: DDIM Eq. (12)'s
x0 for DDIM and LCM, the data prediction for DPM-Solver++ and Euler) and, for latent models, the
VAE decoder: it works over every backend. In mode "through_unet" the UNet runs in PyTorch with
autograd for the guided steps, which is exact and slower.

The update follows the guidance of the Hugging Face diffusion course (unit 2): before the
sampler's step, x_t <- x_t - scale * d loss / d x_t.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from diffrt.errors import DiffrtError

GuidanceMode = Literal["x0", "through_unet"]
# images [B, C, H, W] -> scalar. The images are the prediction of x0 mapped to [0, 1] without a clamp (a clamp would
# zero the gradient at the edges): early steps reach well outside [0, 1], so a loss should be defined there too.
ImageLoss = Callable[[torch.Tensor], torch.Tensor]


def parse_hex_color(text: str) -> tuple[float, float, float]:
    """'#RRGGBB' or 'RRGGBB' -> (r, g, b) in [0, 1]."""
    s = text.strip().lstrip("#")
    if len(s) != 6 or any(c not in "0123456789abcdefABCDEF" for c in s):
        raise DiffrtError(f"colour {text!r} is not a hex colour; write it as #RRGGBB, e.g. #ff8800")
    return tuple(int(s[i : i + 2], 16) / 255.0 for i in (0, 2, 4))


def color_loss(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute distance of each image's pixels to its target colour, summed over the batch.

    images: [B, C, H, W] in [0, 1]; target: [C] or [B, C]. Summing over the batch keeps each
    image's gradient independent of how many images share the batch. Any other target shape is
    refused: broadcasting would silently pair colours with the wrong images or channels (an RGB
    target over 1-channel images would sum three losses), as the kernel refuses it too.
    """
    if images.dim() != 4:
        raise DiffrtError(f"colour loss needs images [B, C, H, W]; got shape {tuple(images.shape)}")
    batch, channels = images.shape[0], images.shape[1]
    if tuple(target.shape) not in ((channels,), (1, channels), (batch, channels)):
        if channels != 3 and target.shape[-1] == 3:  # `--color` on a greyscale model
            raise DiffrtError(f"colour guidance needs RGB images; this model makes {channels}-channel ones")
        raise DiffrtError(f"colour target has shape {tuple(target.shape)} for images of shape {tuple(images.shape)}; "
                          f"give [{channels}] (one colour for all) or [{batch}, {channels}] (one per image), in [0, 1]")
    target = target.to(images.dtype).reshape(-1, channels, 1, 1)
    return (images - target).abs().mean(dim=(1, 2, 3)).sum()


@dataclass
class Guidance:
    """One gradient-guidance term: `scale * loss(images)`, applied every `every` steps."""

    loss: ImageLoss
    scale: float
    every: int = 1
    mode: GuidanceMode = "x0"
    name: str = "custom"

    def __post_init__(self) -> None:
        # numbers.Real, as pipeline.check_number: a NumPy scalar (np.float32 from a config or a slider) is a number.
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real) or not math.isfinite(self.scale):
            raise DiffrtError(f"guidance {self.name!r}: scale must be a finite number, got {self.scale!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise DiffrtError(f"guidance {self.name!r}: 'every' must be a whole number of steps >= 1, got {self.every!r}")
        if not callable(self.loss):  # else a TypeError at the first guided step, after the models loaded
            raise DiffrtError(f"guidance {self.name!r}: loss must be a callable images -> scalar tensor, got "
                              f"{type(self.loss).__name__}")
        if self.mode not in ("x0", "through_unet"):
            raise DiffrtError(f"guidance mode must be 'x0' or 'through_unet', got {self.mode!r}")

    def active(self, step_index: int) -> bool:
        return self.scale != 0 and step_index % self.every == 0


def acting(guidance) -> tuple[Guidance, ...]:
    """A call's `guidance` (one Guidance, or a list or tuple of them) as the terms that act: one at scale 0 never
    does, so nothing is loaded for it."""
    terms = (guidance,) if isinstance(guidance, Guidance) else guidance
    if not isinstance(terms, (list, tuple)) or not all(isinstance(g, Guidance) for g in terms):
        raise DiffrtError(f"guidance must be a Guidance or a list of them (color_guidance(...), clip_guidance(...), "
                          f"Guidance(loss, scale)), got {type(guidance).__name__}")
    return tuple(g for g in terms if g.scale != 0)


def color_guidance(color: str | tuple[float, float, float] | Sequence | torch.Tensor, scale: float, every: int = 1,
                   mode: GuidanceMode = "x0") -> Guidance:
    """Pull images toward a colour: one hex string / RGB triple for all, or one per image (a list of hex strings or
    of triples, or a [B, 3] tensor)."""
    if isinstance(color, (list, tuple)) and any(isinstance(c, str) for c in color):
        color = [parse_hex_color(c) if isinstance(c, str) else c for c in color]
    try:
        target = torch.tensor(parse_hex_color(color)) if isinstance(color, str) else torch.as_tensor(color, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise DiffrtError(f"colour {color!r} is not a colour; give #RRGGBB, an RGB triple in [0, 1], or one per image "
                          "(a list of them, or a [B, 3] tensor)") from None
    if not ((target >= 0) & (target <= 1)).all():  # e.g. (255, 0, 0): the loss would pull every pixel to white
        raise DiffrtError(f"colour {target.tolist()} has values outside [0, 1]; give RGB in [0, 1], e.g. (1.0, 0.5, 0.0), "
                          "or a hex string such as #ff8000")
    return Guidance(lambda images: color_loss(images, target.to(images.device)), scale, every, mode, name="color")
