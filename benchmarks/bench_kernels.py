"""Micro-benchmark: diffrt's fused Triton kernels vs the unfused PyTorch sequence they replace.

    python benchmarks/bench_kernels.py [--device cuda|cpu] [--iters 200] [--calls 20]

Sizes are those of one sampler step at batch 1:

* `cfg_ddim_step` at SD-1.5 latent size: sample, eps_uncond and eps_cond of [1, 4, 64, 64]
  (fp16 on CUDA, fp32 on CPU), eta = 0, epsilon prediction, no clipping, guidance 7.5;
* `color_guidance_step` on a 64x64 RGB pixel-space image [1, 3, 64, 64].

After a warm-up that also absorbs Triton's JIT compile, the two are timed in alternating rounds
(reference then Triton, Triton then reference, ...), each round `--calls` back-to-back calls between
two synchronisations: a call's time is what a sampler step pays for it in a loop that does not wait
on the GPU, launches included; a synchronisation per call would add its fixed cost to both sides
and pull the ratio toward 1. The speed-up is the median of the per-round ratios, so load that drifts
during the run hits both alike. Without CUDA only the PyTorch reference is timed; the Triton
interpreter runs on CPU for tests, and its timings say nothing about the kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from diffrt.bench.timing import summarize_ms
from diffrt.kernels import cfg_ddim, color_guidance, launch

LATENT_SHAPE = (1, 4, 64, 64)
IMAGE_SHAPE = (1, 3, 64, 64)
ALPHA_BAR, ALPHA_BAR_PREV = 0.3023, 0.3308  # SD-1.5 schedule, step 25 of 50 (t = 481 -> 461)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, rounds: int,
                calls: int) -> tuple[dict[str, dict], list[float] | None]:
    """Each function's ms per call (median / p90 / min over the rounds, as the suite's cells summarise them) and,
    for two functions, the first's time over the second's in each round. A round times `calls` back-to-back calls
    of each function between synchronisations (without one we would time the launches, not the work), in an
    order that alternates from round to round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _synchronize(device)
    names, per_call = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            _synchronize(device)
            per_call[name].append((time.perf_counter() - start) / calls)
    ratios = [a / b for a, b in zip(*per_call.values())] if len(fns) == 2 else None
    return {name: summarize_ms(samples) for name, samples in per_call.items()}, ratios


def _cases(device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """For each kernel: its input shape and the (reference, triton) calls on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    sample, eps_uncond, eps_cond = (torch.randn(LATENT_SHAPE, generator=gen).to(device, dtype) for _ in range(3))
    image, eps = (torch.randn(IMAGE_SHAPE, generator=gen).to(device, dtype) for _ in range(2))
    target = torch.tensor([1.0, 0.5, 0.0], device=device)
    cfg_args = (sample, eps_uncond, eps_cond, 7.5, ALPHA_BAR, ALPHA_BAR_PREV)
    color_args = (image, eps, ALPHA_BAR, target, 100.0)
    return {
        "cfg_ddim_step": {
            "shape": LATENT_SHAPE,
            "reference": lambda: cfg_ddim.cfg_ddim_step_reference(*cfg_args),
            "triton": lambda: cfg_ddim.cfg_ddim_step_triton(*cfg_args),
        },
        "color_guidance_step": {
            "shape": IMAGE_SHAPE,
            "reference": lambda: color_guidance.color_guidance_step_reference(*color_args),
            "triton": lambda: color_guidance.color_guidance_step_triton(*color_args),
        },
    }


def run(device: str | torch.device = "cuda", *, warmup: int = 20, iters: int = 200, calls: int = 20) -> dict:
    """Time every kernel against its reference on `device`, `iters` calls of each in rounds of `calls`; returns plain
    data, prints nothing."""
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with_triton = device.type == "cuda" and launch.triton_available()
    if with_triton:
        note = "fused Triton kernel vs unfused PyTorch"
    elif device.type == "cuda":
        note = "Triton is not installed: PyTorch reference only"
    else:
        note = "Triton kernels need CUDA (interpreter timings are meaningless): PyTorch reference only"
    results = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "note": note, "cases": {}}
    for name, case in _cases(device, dtype).items():
        fns = {"reference": case["reference"], **({"triton": case["triton"]} if with_triton else {})}
        times, ratios = time_rounds(fns, device, warmup=warmup, rounds=max(1, iters // calls), calls=calls)
        speedup = statistics.median(ratios) if ratios else None
        results["cases"][name] = {"shape": list(case["shape"]), "reference": times["reference"], "triton": times.get("triton"),
                                  "speedup": speedup, "speedup_range": [min(ratios), max(ratios)] if ratios else None}
    return results


def format_table(results: dict) -> str:
    lines = [
        f"device {results['device']}, {results['dtype']}: {results['note']}",
        f"{'op':<21}{'shape':<12}{'impl':<11}{'median ms':>10}{'p90 ms':>9}{'min ms':>9}{'speed-up':>10}",
    ]
    for name, case in results["cases"].items():
        shape = "x".join(map(str, case["shape"]))
        for impl in ("reference", "triton"):
            t = case[impl]
            if t is None:
                continue
            speedup = f"{case['speedup']:.2f}x" if impl == "triton" else ""
            lines.append(f"{name:<21}{shape:<12}{impl:<11}{t['median_ms']:>10.4f}{t['p90_ms']:>9.4f}{t['min_ms']:>9.4f}{speedup:>10}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=200, help="timed calls of each implementation")
    parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per round")
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    if args.calls < 1 or args.iters < args.calls or args.warmup < 0:
        parser.error(f"--calls must be at least 1 and at most --iters ({args.iters}), and --warmup at least 0: --iters "
                     "timed calls go in rounds of --calls")
    print(format_table(run(args.device, warmup=args.warmup, iters=args.iters, calls=args.calls)))


if __name__ == "__main__":
    main()
