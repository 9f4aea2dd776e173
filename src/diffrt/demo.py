"""`diffrt demo`: the shipped digits model, exported and sampled, with no argument and no download.

1. export the embedded class-conditioned digits model to ONNX (cached in the user cache);
2. sample one row per digit with classifier-free guidance, each column pulled toward a target
   colour by colour guidance, on the fastest exported backend present;
3. run the same request on eager PyTorch and report ms per step and per image, and the speed-up;
4. write the grid to demo.png.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffrt import atomic
from diffrt.errors import DiffrtError
from diffrt.images import save_grid
from diffrt.runtime.guidance import color_guidance, parse_hex_color

log = logging.getLogger(__name__)

DEMO_COLOURS = ("#ff3b30", "#ff9500", "#ffd60a", "#34c759", "#00c7be", "#007aff", "#af52de", "#ff2d92")


@dataclass
class DemoSettings:
    num_inference_steps: int = 25
    # Chosen on the shipped model with benchmarks/bench_quality.py: stronger CFG or colour
    # guidance over-saturates 16x16 digits and the classifier's accuracy drops below 90 %.
    guidance_scale: float = 2.0
    color_scale: float = 2.0
    colours: tuple[str, ...] = DEMO_COLOURS
    seed: int = 0
    repeats: int = 2  # timed runs per backend after one warm-up; the median is reported


@dataclass
class DemoTiming:
    backend: str
    ms_per_step: float
    ms_per_image: float


def demo_request(settings: DemoSettings, num_classes: int = 10):
    """Labels (one row per class) and per-image target colours (one column per colour)."""
    cols = len(settings.colours)
    labels = torch.arange(num_classes).repeat_interleave(cols)
    targets = torch.tensor([parse_hex_color(c) for c in settings.colours]).repeat(num_classes, 1)
    return labels, targets


def run_demo(out: str | Path = "demo.png", backend: str | None = None, settings: DemoSettings | None = None,
             device: str = "cpu") -> tuple[Path, list[DemoTiming], float]:
    from diffrt.runtime.backends import best_exported_backend, require_backend, resolve_device
    from diffrt.runtime.loading import open_pixel_pipeline

    settings = settings or DemoSettings()
    out = Path(out)
    if out.suffix.lower() != ".png" or out.is_dir():  # the grid is a PNG; found wanting only after minutes of sampling
        raise DiffrtError(f"--out {out} must be a .png file (the demo writes a grid image)"
                          + ("; it is a folder" if out.is_dir() else ""))
    atomic.check_writable(out)
    backend = backend or best_exported_backend()
    require_backend(backend)  # one line naming the backends here
    if backend == "tensorrt":
        device = str(resolve_device(None, backend))  # CUDA, or one line saying there is none

    # 1. Eager reference and the exported pipeline (export is cached; a second run reuses it).
    #    The engine's batch profile is tuned for this request: CFG doubles the image count.
    from diffrt.export.options import ExportOptions

    t0 = time.perf_counter()
    eager = open_pixel_pipeline(None, "torch", device)
    labels, targets = demo_request(settings, eager.info.num_classes)
    batch = 2 * len(labels)
    options = ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx", batch=(1, batch, max(256, batch)))
    fast = open_pixel_pipeline(None, backend, device, export_options=options)
    log.info("model ready on %s in %.1f s", backend, time.perf_counter() - t0)

    guidance = [color_guidance(targets, settings.color_scale)]
    kwargs = dict(num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                  seed=settings.seed, guidance=guidance, output_type="pt")

    # 2. Same request on both backends; the first run warms up, the median of the rest is timed.
    timings, images = [], {}
    total_steps = 2 * (settings.repeats + 1) * settings.num_inference_steps  # two backends, warm-up + timed runs
    with tqdm(total=total_steps, desc="demo", unit="step") as bar:
        for pipe in (fast, eager):
            seconds = []
            for i in range(settings.repeats + 1):
                result = pipe(labels, progress=lambda _: bar.update(1), **kwargs)
                if i:
                    seconds.append(result.seconds)
            images[pipe.backend] = result.images
            s = statistics.median(seconds)
            timings.append(DemoTiming(result.backend, 1000 * s / settings.num_inference_steps, 1000 * s / len(labels)))
    max_diff = (images[fast.backend] - images["torch"]).abs().max().item()

    # 3. The grid: one row per digit, one column per colour.
    path = save_grid(out, images[fast.backend], nrow=len(settings.colours), scale=4)
    return path, timings, max_diff


def format_table(timings: list[DemoTiming]) -> str:
    eager = next(t for t in timings if t.backend == "torch")
    lines = ["| backend | ms / step | ms / image | speed-up vs eager |", "|---|---:|---:|---:|"]
    for t in timings:
        lines.append(f"| {t.backend} | {t.ms_per_step:.1f} | {t.ms_per_image:.2f} | {eager.ms_per_step / t.ms_per_step:.2f}x |")
    return "\n".join(lines)
