"""`diffrt demo`: the shipped digits model, exported and sampled, with no argument and no download.

1. export the embedded class-conditioned digits model to ONNX (cached in the user cache);
2. sample one row per digit with classifier-free guidance, each column pulled toward a target
   colour by colour guidance, on the fastest exported backend present;
3. run the same request on eager PyTorch, alternating with the exported backend run by run (so a
   change in the machine's load lands on both) with the same thread count, and report the median
   ms per step and per image, the speed-up and its spread over the pairs of runs;
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
    repeats: int = 3  # timed runs per backend after one warm-up, alternating; the median is reported


@dataclass
class DemoTiming:
    backend: str
    ms_per_step: float  # medians
    ms_per_image: float
    runs_s: tuple[float, ...] = ()  # every timed run, in order; run i of each backend alternated
    images_per_run: int = 0
    threads: int | None = None


def demo_request(settings: DemoSettings, num_classes: int = 10):
    """Labels (one row per class) and per-image target colours (one column per colour)."""
    cols = len(settings.colours)
    labels = torch.arange(num_classes).repeat_interleave(cols)
    targets = torch.tensor([parse_hex_color(c) for c in settings.colours]).repeat(num_classes, 1)
    return labels, targets


def run_demo(out: str | Path = "demo.png", backend: str | None = None, settings: DemoSettings | None = None,
             device: str = "cpu") -> tuple[Path, list[DemoTiming], float]:
    from diffrt.runtime.backends import TORCH_BACKENDS, require_backend, resolve_device
    from diffrt.runtime.loading import default_backend, open_pixel_pipeline

    settings = settings or DemoSettings()
    out = Path(out)
    if out.suffix.lower() != ".png" or out.is_dir():  # the grid is a PNG; found wanting only after minutes of sampling
        raise DiffrtError(f"--out {out} must be a .png file (the demo writes a grid image)"
                          + ("; it is a folder" if out.is_dir() else ""))
    atomic.check_writable(out)
    backend = backend or default_backend(None, exported=True)  # the shipped model, on the fastest exported backend here
    require_backend(backend)  # one line naming the backends here
    if backend in TORCH_BACKENDS:  # eager PyTorch is what the exported backend is measured against: both rows were
        # keyed "torch", their runs pooled into one "1.00x" row and a difference of 0
        raise DiffrtError(f"--backend {backend}: the demo times an exported backend against eager PyTorch; pass "
                          f"onnxruntime or tensorrt (or leave --backend out)")
    if backend == "tensorrt":
        device = str(resolve_device(None, backend))  # CUDA, or one line saying there is none

    # 1. Eager reference and the exported pipeline (export is cached; a second run reuses it).
    #    The engine's batch profile is tuned for this request: CFG doubles the image count.
    from diffrt.export.options import ExportOptions

    from diffrt.bench.timing import bench_threads, cpu_threads

    threads = bench_threads()
    t0 = time.perf_counter()
    with cpu_threads(threads):  # ONNX Runtime sizes its pool from PyTorch's threads when its sessions are made
        eager = open_pixel_pipeline(None, "torch", device)
        labels, targets = demo_request(settings, eager.info.num_classes)
        batch = 2 * len(labels)
        options = ExportOptions(backend="tensorrt" if backend == "tensorrt" else "onnx", batch=(1, batch, max(256, batch)))
        fast = open_pixel_pipeline(None, backend, device, export_options=options)
    log.info("model ready on %s in %.1f s", backend, time.perf_counter() - t0)

    guidance = [color_guidance(targets, settings.color_scale)]
    kwargs = dict(num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                  seed=settings.seed, guidance=guidance, output_type="pt")

    # 2. Same request on both backends, with the same threads: one warm-up run each, then timed runs
    #    alternating between them (the order swapped every other pair), so load on a shared machine
    #    lands on both sides; the median of each side's runs is reported.
    seconds: dict[str, list[float]] = {fast.backend: [], eager.backend: []}
    images = {}
    total_steps = 2 * (settings.repeats + 1) * settings.num_inference_steps  # two backends, warm-up + timed runs
    with tqdm(total=total_steps, desc="demo", unit="step") as bar, cpu_threads(threads):
        for i in range(settings.repeats + 1):
            for pipe in (fast, eager) if i % 2 == 0 else (eager, fast):
                result = pipe(labels, progress=lambda _: bar.update(1), **kwargs)
                if i:
                    seconds[pipe.backend].append(result.seconds)
                images[pipe.backend] = result.images
    timings = []
    for backend, runs in seconds.items():
        s = statistics.median(runs)
        timings.append(DemoTiming(backend, 1000 * s / settings.num_inference_steps, 1000 * s / len(labels), tuple(runs), len(labels), threads))
    max_diff = (images[fast.backend] - images["torch"]).abs().max().item()

    # 3. The grid: one row per digit, one column per colour.
    path = save_grid(out, images[fast.backend], nrow=len(settings.colours), scale=4)
    return path, timings, max_diff


def format_table(timings: list[DemoTiming]) -> str:
    """Medians, each side's range, and the speed-up with its range over the alternating pairs of runs."""
    eager = next(t for t in timings if t.backend == "torch")
    lines = ["| backend | ms / step | ms / image (min–max) | speed-up vs eager (pairs min–max) |", "|---|---:|---:|---:|"]
    for t in timings:
        per_image = [1000 * s / t.images_per_run for s in t.runs_s] if t.images_per_run else []
        span = f" ({min(per_image):.2f}–{max(per_image):.2f})" if per_image else ""
        pairs = [e / f for e, f in zip(eager.runs_s, t.runs_s)]
        spread = f" ({min(pairs):.2f}–{max(pairs):.2f}x)" if pairs and t is not eager else ""
        lines.append(f"| {t.backend} | {t.ms_per_step:.1f} | {t.ms_per_image:.2f}{span} | {eager.ms_per_step / t.ms_per_step:.2f}x{spread} |")
    runs = len(eager.runs_s)
    if runs:
        lines.append(f"\nMedians of {runs} timed run{'s' if runs > 1 else ''} per backend, alternating, after one warm-up each"
                     + (f"; {eager.threads} thread{'s' if eager.threads != 1 else ''} for both" if eager.threads else "") + ".")
    return "\n".join(lines)
