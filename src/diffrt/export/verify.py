"""Parity: does an exported component compute what PyTorch computes?

Comparison is kept apart from loading and running (polygraphy's comparator idea): the caller
runs both backends on the same feeds, `compare` judges. Error is reported against the scale of
the reference output, so one tolerance means the same for a UNet's noise and a VAE's pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from diffrt.errors import ArtifactError

# Per-precision tolerances on max |a - b| / max |ref| (RELIABILITY #17: never pass on a warning).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}


@dataclass
class Parity:
    max_abs: float
    median_abs: float
    max_rel: float  # max_abs / max |reference|
    cosine: float
    shapes: dict

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: torch.Tensor, candidate: torch.Tensor, shapes: dict | None = None) -> Parity:
    ref, cand = reference.detach().double().cpu().flatten(), candidate.detach().double().cpu().flatten()
    if ref.shape != cand.shape:
        raise ArtifactError(f"output shapes differ: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}")
    diff = (ref - cand).abs()
    scale = ref.abs().max().clamp(min=1e-12)
    # Cosine is undefined for a zero vector. A ControlNet straight from training's zero-initialised
    # convolutions outputs zeros: equal outputs are similarity 1, not the 0 torch would report.
    norms = ref.norm() * cand.norm()
    cosine = (ref @ cand / norms).item() if norms > 0 else float(torch.equal(ref, cand))
    return Parity(diff.max().item(), diff.median().item(), (diff.max() / scale).item(), cosine, shapes or {})


def verify_backends(reference, candidate, feeds: list[dict[str, torch.Tensor]], precision: str = "fp32") -> dict:
    """Run both backends over the feeds; the worst case decides. Raises when outside tolerance."""
    worst: Parity | None = None
    for feed in feeds:
        ref = reference.run(feed)
        out = candidate.run(feed)
        shapes = {k: list(v.shape) for k, v in feed.items()}
        for name in ref:
            # NaN compares false with everything: without this, a NaN at one shape (fp16 overflow at
            # the largest, RELIABILITY #4) would never become the worst case, and the export would pass.
            if not torch.isfinite(out[name]).all() and torch.isfinite(ref[name]).all():
                raise ArtifactError(f"{candidate.spec.name}: {candidate.name} output {name} has NaN or inf values where PyTorch's "
                                    f"are finite, at {precision} at shapes {shapes}; export at fp32, or check the model at this size")
            p = compare(ref[name], out[name], shapes)
            if worst is None or not p.max_rel <= worst.max_rel:
                worst = p
    tol = TOLERANCE[precision]
    result = {**worst.to_dict(), "tolerance": tol, "precision": precision, "passed": worst.max_rel <= tol}
    if not result["passed"]:
        raise ArtifactError(f"{candidate.spec.name}: {candidate.name} output differs from PyTorch by {worst.max_rel:.2e} of its "
                            f"scale (tolerance {tol:.0e} at {precision}) at shapes {worst.shapes}")
    return result
