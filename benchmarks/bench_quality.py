"""Does the shipped digits model draw the requested digit? Accuracy of an independent classifier
on samples generated at the demo's settings (CFG 2, 25 DDIM steps, colour guidance toward the
demo's eight colours), per class, over several seeds.

    python benchmarks/bench_quality.py            # prints the table, writes results/quality_cpu.json
"""

from __future__ import annotations

import argparse

import torch

from diffrt import atomic
from diffrt.bench.provenance import finish, run_metadata
from diffrt.demo import DemoSettings, demo_request
from diffrt.models import shipped_digits_model
from diffrt.quality import DigitsQuality, digit_classifier, score_digits
from diffrt.runtime.guidance import color_guidance
from diffrt.runtime.loading import torch_pixel_pipeline


def measure(seeds=(0, 1, 2), settings: DemoSettings | None = None, guided: bool = True) -> DigitsQuality:
    settings = settings or DemoSettings()
    pipe = torch_pixel_pipeline(shipped_digits_model())
    classifier = digit_classifier()
    labels, targets = demo_request(settings)
    guidance = [color_guidance(targets, settings.color_scale)] if guided else []
    images = [pipe(labels, num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                   seed=seed, guidance=guidance, output_type="pt").images for seed in seeds]
    return score_digits(classifier, torch.cat(images), labels.repeat(len(seeds)))


def main(out: str = "benchmarks/results/quality_cpu.json") -> None:
    meta = run_metadata()
    results = {}
    for name, guided in (("demo settings (CFG + colour guidance)", True), ("same CFG, no colour guidance", False)):
        q = measure(guided=guided)
        results[name] = {"accuracy": q.accuracy, "per_class": q.per_class, "num_samples": q.num_samples}
        print(f"\n{name}: {q.accuracy:.1%} of {q.num_samples} samples recognised as the requested digit")
        print(q.table())
    atomic.write_json(out, {"settings": DemoSettings().__dict__, "provenance": finish(meta), "results": results})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="benchmarks/results/quality_cpu.json", help="the JSON to write")
    main(parser.parse_args().out)
