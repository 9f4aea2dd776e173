"""Training throughput of each trainer at the small configs the tests use, on the CPU.

    python benchmarks/bench_train.py [--steps 40] [--threads 1] [--out benchmarks/results/train_cpu.json]

Each trainer runs through its library entry point (the same code as `diffrt train ...`): first
a short warm-up run, which absorbs imports, allocator and oneDNN first-call costs, then a timed
run of `--steps` optimizer steps, each step's time recorded. Throughput is the median step time
after the first `--skip` steps (allocation, first-call costs), with the p90 beside it: a mean
over all steps, as the loop's own `samples_per_second` is, carries the first step's allocations.
A step's time is the loop's own (TrainResult.step_seconds: forward, backward, clip, AdamW, EMA;
not its logging, checkpoints and sample grids). A DreamBooth step
with prior preservation trains on `batch_size` instance images plus as many class images; its
samples/s counts the instance images only, as diffusers' `--train_batch_size` does, and images/s
counts both (the figure to compare with a run without prior preservation).

The first and last step losses are single draws of random timesteps and noise. For DreamBooth,
where a 40-step run on 4 images moves the loss by less than one draw's spread, the rows
also hold a fixed evaluation loss (fixed timesteps and noise, objective.evaluation_loss) of the
instance images under the instance prompt, before and after training.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from diffrt import atomic
from diffrt.bench.provenance import finish, run_metadata
from diffrt.bench.timing import cpu_model, summarize_ms
from diffrt.models import build_pixel_model, save_pixel_model, small_unet_config
from diffrt.train.classcond import ClassCondConfig, train_class_conditioned
from diffrt.train.dreambooth import LORA_WEIGHT_NAME, DreamBoothConfig, instance_evaluation_loss, train_dreambooth_lora
from diffrt.train.finetune import FinetuneConfig, finetune
from diffrt.train.config import TrainConfig

RESULTS = Path(__file__).parent / "results" / "train_cpu.json"


def _train_config(out: Path, steps: int, batch_size: int, lr: float) -> TrainConfig:
    return TrainConfig(out=str(out), max_steps=steps, batch_size=batch_size, learning_rate=lr, lr_warmup_steps=0,
                       lr_schedule="constant", checkpoint_every=steps, seed=0)


def _dreambooth_evaluation(sd: Path, prompt: str):
    """evaluate(out) -> the fixed evaluation loss of the base pipeline and of it with out's LoRA."""
    from diffusers import StableDiffusionPipeline

    from diffrt.data import load_source

    images = load_source("chelsea", 32, labelled=False).images

    def evaluate(out: Path) -> dict:
        pipe = StableDiffusionPipeline.from_pretrained(sd)
        before = instance_evaluation_loss(pipe, images, prompt)
        pipe.load_lora_weights(out / LORA_WEIGHT_NAME)
        after = instance_evaluation_loss(pipe, images, prompt)
        return {"eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4)}

    return evaluate


def _trainers(root: Path) -> dict[str, tuple[str, int, int, callable, callable | None]]:
    """name -> (config in words, batch size, images per step, run(out, steps) -> TrainResult, evaluate(out) -> dict or None)."""
    from diffrt.tiny import tiny_text_to_image

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pixel = save_pixel_model(build_pixel_model(small_unet_config(8, 3, (16, 32))), root / "pixel")
    sd = tiny_text_to_image(root / "sd", seed=0)

    def class_cond(conditioning):
        return lambda out, steps: train_class_conditioned(ClassCondConfig(
            data="digits", conditioning=conditioning, sample_size=8, widths=(16, 32), sample_steps=1,
            train=_train_config(out, steps, 16, 2e-3)))

    def dreambooth(prior: bool, batch_size: int):
        return lambda out, steps: train_dreambooth_lora(DreamBoothConfig(
            model=str(sd), instance_data="chelsea", instance_prompt="a photo of sks cat", class_prompt="a photo of a cat" if prior else None,
            with_prior_preservation=prior, class_data=str(root / "class_images"), num_class_images=4,
            train_text_encoder=prior, rank=4, resolution=32, num_validation_images=1, inference_steps=1, class_inference_steps=1,
            train=_train_config(out, steps, batch_size, 1e-3)))

    small = "UNet2DModel 8x8, widths (16, 32)"
    lora = "tiny SD (diffrt.tiny) 32 px / 4x4 latents, LoRA rank 4 on to_q/k/v/out"
    evaluate = _dreambooth_evaluation(sd, "a photo of sks cat")
    return {
        "class-cond (class_embedding)": (f"{small}, digits", 16, 16, class_cond("class_embedding"), None),
        "class-cond (class_channels)": (f"{small}, digits", 16, 16, class_cond("class_channels"), None),
        "finetune": (f"{small}, chelsea crops", 16, 16, lambda out, steps: finetune(FinetuneConfig(
            model=str(pixel), data="chelsea", random_flip=True, num_samples=1, sample_steps=1,
            train=_train_config(out, steps, 16, 1e-3))), None),
        "dreambooth-lora": (lora, 4, 4, dreambooth(prior=False, batch_size=4), evaluate),
        "dreambooth-lora (prior + text encoder)": (f"{lora}, + text encoder LoRA, 2 instance + 2 class", 2, 4,
                                                   dreambooth(prior=True, batch_size=2), evaluate),
    }


def step_stats(times: list[float], batch_size: int, skip: int, images_per_step: int | None = None) -> dict:
    """Median and p90 ms per step, and samples/s (the batch size's) and images/s (every image a step trains on: prior
    preservation's class images too) at the median, over the steps after the first `skip`."""
    kept = times[skip:] if len(times) > skip else times
    stats = summarize_ms(kept)
    return {"ms_per_step": round(stats["median_ms"], 2), "ms_per_step_p90": round(stats["p90_ms"], 2),
            "samples_per_second": round(1000 * batch_size / stats["median_ms"], 2),
            "images_per_second": round(1000 * (images_per_step or batch_size) / stats["median_ms"], 2), "steps_timed": len(kept),
            "steps_skipped": len(times) - len(kept), "first_step_ms": round(1000 * times[0], 2) if times else None}


def run(steps: int, warmup: int, skip: int = 3) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffrt-bench-train-") as tmp:
        root = Path(tmp)
        for i, (name, (config, batch_size, images_per_step, fn, evaluate)) in enumerate(_trainers(root).items()):
            fn(root / f"warmup-{i}", warmup)
            t0 = time.perf_counter()
            result = fn(root / f"run-{i}", steps)
            times = result.step_seconds
            rows.append({
                "trainer": name, "config": config, "batch_size": batch_size, "steps": steps,
                **step_stats(times, batch_size, skip, images_per_step),
                # The loop's own figure: a mean over every step, the first (allocations) included.
                "samples_per_second_mean_all_steps": round(result.samples_per_second, 2),
                "step_ms": [round(1000 * t, 2) for t in times],
                "wall_s": round(time.perf_counter() - t0, 2),
                "first_loss": round(result.losses[0], 4), "last_loss": round(result.losses[-1], 4),
                **(evaluate(root / f"run-{i}") if evaluate else {}),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'trainer':<40} {'batch':>5} {'samples/s':>10} {'images/s':>9} {'ms/step':>9} {'p90':>9}  config",
             f"{'-' * 40} {'-' * 5} {'-' * 10} {'-' * 9} {'-' * 9} {'-' * 9}  {'-' * 6}"]
    for r in rows:
        lines.append(f"{r['trainer']:<40} {r['batch_size']:>5} {r['samples_per_second']:>10.1f} "
                     f"{r.get('images_per_second', r['samples_per_second']):>9.1f} {r['ms_per_step']:>9.1f} "
                     f"{r['ms_per_step_p90']:>9.1f}  {r['config']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=3, help="steps of the untimed warm-up run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: these tiny models are bound by per-op overhead, "
                             "and one thread cannot oversubscribe a busy 2-core machine)")
    parser.add_argument("--skip", type=int, default=3, help="first steps of the timed run left out of the median and p90")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    meta = run_metadata(torch.get_num_threads())
    load = meta["load_average_1min_at_start"]
    rows = run(args.steps, args.warmup, args.skip)
    report = {
        "device": "cpu", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "load_average_1min_at_start": load, "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "skipped_first_steps": args.skip,
        "throughput": "median ms per step after the skipped steps (p90 beside it); samples/s (instance images) and "
                      "images/s (class images too) at that median",
        "provenance": finish(meta), "results": rows,
    }
    atomic.write_json(args.out, report)
    print(format_table(rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}; wrote {args.out}")


if __name__ == "__main__":
    main()
