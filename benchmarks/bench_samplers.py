"""How many steps does each sampler need? Distance from a converged image, per sampler and step count.

With eta = 0, DDIM, Euler and DPM-Solver++ are discretisations of the same probability-flow ODE
(DDIM is DPM-Solver++ of order 1: Lu et al. 2022, section 4; Euler steps it in sigma, Karras et
al. 2022), so from the same x_T all converge
to the same image as the step count grows. How close each gets in N steps (N UNet calls, two CFG
branches batched in each) is what a deployment buys with its latency budget. The reference is a
1000-step DDIM run of the shipped digits model from the same noise (all unclipped, from t = 999); the figure is the root mean
square of the image difference (images in [0, 1]), with the classifier accuracy of bench_quality
beside it (does the digit survive few steps?). DDIM and Euler land on each other: DDIM (eta 0) is
Euler's method on the same ODE written for x / alpha in sigma (Karras et al. 2022, section 4), a
check on both implementations.

Beside it, each sampler's own cost per step: the same request with the UNet replaced by one that
returns zeros at once (bench.configs.NullBackend), so what remains is the step, the CFG combine and
the pipeline around them, on the digits batch (60 rows with CFG), median of repeated runs.

    python benchmarks/bench_samplers.py     # ~5 min on 2 CPUs -> results/samplers_cpu.{json,png}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from diffrt import atomic
from diffrt.bench.provenance import finish, run_metadata
from diffrt.bench.configs import NullBackend
from diffrt.models import shipped_digits_model
from diffrt.quality import digit_classifier, score_digits
from diffrt.runtime.ddim import DDIMConfig
from diffrt.runtime.dpm import DPMConfig
from diffrt.runtime.euler import EulerAncestralConfig, EulerConfig
from diffrt.runtime.lcm import LCMConfig
from diffrt.runtime.loading import torch_pixel_pipeline

STEPS = (3, 4, 5, 6, 8, 10, 15, 20, 25, 50)
REFERENCE_STEPS = 1000
GUIDANCE_SCALE = 2.0  # the demo's
LOOP_STEPS = 20


def samplers(pipe) -> dict[str, object]:
    """The samplers compared, each on the model's own training schedule (its scheduler config)."""
    # Two settings of the digits model's config would make the samplers integrate different ODEs:
    # clip_sample clips DDIM's x0 to [-1, 1] (Euler and DPM-Solver++ never clip), and "leading" spacing starts
    # each step count at its own timestep (980 for 50 DDIM steps, 950 for DPM-Solver++, which spaces
    # N + 1 points), so x_T would be read as noise at different times. Unclipped, "trailing" (from
    # t = 999, Lin et al. 2023) for all, the runs differ only in the solver.
    own = pipe.scheduler.to_scheduler_config()
    return {
        "DDIM": DDIMConfig.from_scheduler_config(own, clip_sample=False, timestep_spacing="trailing"),
        "Euler": EulerConfig.from_scheduler_config(own, timestep_spacing="trailing"),
        "DPM-Solver++(2M)": DPMConfig.from_scheduler_config(own, timestep_spacing="trailing"),
        "DPM-Solver++(2M) Karras": DPMConfig.from_scheduler_config(own, timestep_spacing="trailing", use_karras_sigmas=True),
        "DPM-Solver++(3M)": DPMConfig.from_scheduler_config(own, timestep_spacing="trailing", solver_order=3),
    }


def loop_samplers(pipe) -> dict[str, object]:
    """Every sampler, for the loop-cost table (LCM and Euler Ancestral too: their images are not on the
    ODE's path, so they stay out of the distance table)."""
    own = pipe.scheduler.to_scheduler_config()
    return {**samplers(pipe), "Euler a": EulerAncestralConfig.from_scheduler_config(own, timestep_spacing="trailing"),
            "LCM": LCMConfig.from_scheduler_config(own, timestep_spacing="trailing")}


def loop_ms_per_step(pipe, labels: torch.Tensor, latents: torch.Tensor, scheduler, steps: int = LOOP_STEPS,
                     repeats: int = 7) -> float:
    """Median ms per step of the request over a UNet that returns zeros at once."""
    null = copy.copy(pipe)
    null.unet = NullBackend(pipe.unet.spec, pipe.device)
    generator = torch.Generator().manual_seed(0)  # Euler a and LCM draw step noise
    run(null, labels, latents, 2, scheduler, generator=generator)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(null, labels, latents, steps, scheduler, generator=generator)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / steps


def run(pipe, labels: torch.Tensor, latents: torch.Tensor, steps: int, scheduler, generator=None) -> torch.Tensor:
    return pipe(labels, num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, latents=latents,
                scheduler=scheduler, output_type="pt", generator=generator).images


def main(out_dir: str = "benchmarks/results") -> None:
    meta = run_metadata()
    torch.manual_seed(0)
    pipe = torch_pixel_pipeline(shipped_digits_model())
    labels = torch.arange(10).repeat(3)  # every digit, three noises each
    size = pipe.sample_size
    latents = torch.randn((len(labels), pipe.channels, size, size), generator=torch.Generator().manual_seed(0))
    classifier = digit_classifier()

    t0 = time.perf_counter()
    reference = run(pipe, labels, latents, REFERENCE_STEPS, samplers(pipe)["DDIM"])
    print(f"reference: {REFERENCE_STEPS} DDIM steps in {time.perf_counter() - t0:.0f} s, "
          f"accuracy {score_digits(classifier, reference, labels).accuracy:.0%}")

    results: dict[str, list[dict]] = {}
    for name, scheduler in samplers(pipe).items():
        rows = results.setdefault(name, [])
        for steps in STEPS:
            images = run(pipe, labels, latents, steps, scheduler)
            rms = float((images - reference).pow(2).mean().sqrt())
            accuracy = score_digits(classifier, images, labels).accuracy
            rows.append({"steps": steps, "rms_to_reference": rms, "accuracy": accuracy})
        print(f"{name:>26}: " + "  ".join(f"{r['steps']}:{r['rms_to_reference']:.4f}" for r in rows))

    loop = {name: loop_ms_per_step(pipe, labels, latents, scheduler) for name, scheduler in loop_samplers(pipe).items()}
    print(f"loop cost per step ({LOOP_STEPS} steps, UNet returning zeros): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in loop.items()))

    report = {"model": "shipped digits (class-conditioned, 16x16)", "guidance_scale": GUIDANCE_SCALE,
              "images": len(labels), "reference": f"DDIM, {REFERENCE_STEPS} steps, same x_T", "results": results,
              "loop_ms_per_step": {"steps": LOOP_STEPS, "torch_threads": torch.get_num_threads(), "median": loop},
              "provenance": finish(meta)}
    out = Path(out_dir)
    atomic.write_json(out / "samplers_cpu.json", report)
    chart(results, out / "samplers_cpu.png")
    print(f"wrote {out / 'samplers_cpu.json'} and {out / 'samplers_cpu.png'}")


def chart(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, rows in results.items():
        ax.plot([r["steps"] for r in rows], [r["rms_to_reference"] for r in rows], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="steps (UNet calls)", ylabel=f"RMS to {REFERENCE_STEPS}-step DDIM",
           title="Shipped digits model: distance from the converged image")
    ax.set_xticks(STEPS, [str(s) for s in STEPS])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="benchmarks/results", help="where samplers_cpu.{json,png} go")
    main(parser.parse_args().out_dir)
