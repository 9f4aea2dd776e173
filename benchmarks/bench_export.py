"""Export time and artifact size per component: the shipped digits model and a tiny
text-to-image model with a ControlNet (CLIP text encoder, fused UNet+ControlNet, standalone
ControlNet, VAE decoder and, --vae-encoder, encoder), each exported to fp32 ONNX with its parity check.

    python benchmarks/bench_export.py         # prints the table, writes results/export_cpu.json
    python benchmarks/bench_export.py --sd15  # SD-1.5-sized components instead (random weights, sd15.py):
                                              # ~4 min and ~12 GB of disk on CPU; results/export_cpu_sd15.json
    ... --dynamo                              # either, with the torch.export-based exporter (results/*_dynamo.json)

The SD-1.5-sized run is the one that crosses ONNX's 2 GB protobuf limit (the fused UNet+ControlNet
is 4.8 GB in fp32), so its weights go to external data beside the graph (RELIABILITY #6). Its
ControlNet's zero convolutions are noised (sd15.py, the `sd15-random-v2` folder), so that its parity says
something (diffusers' initialisation outputs zeros, whose parity of exactly 0 said nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffrt import atomic
from diffrt.bench.provenance import finish, run_metadata
from diffrt.bench.timing import cpu_model
from diffrt.export import manifest as mf
from diffrt.export.artifact import export_model
from diffrt.export.options import ExportOptions
from diffrt.models import SHIPPED_DIGITS


def small_jobs(workdir: Path) -> list[tuple]:
    from diffrt.tiny import tiny_text_to_image

    sd = tiny_text_to_image(workdir / "tiny-sd", seed=0, controlnet=True)
    return [
        ("digits (pixel, class-conditioned)", SHIPPED_DIGITS, ExportOptions(batch=(1, 8, 256)), []),
        ("tiny text-to-image + ControlNet", sd, ExportOptions(batch=(1, 2, 4), height=(32, 32, 64), width=(32, 32, 64),
                                                              vae_encoder=True), [str(sd / "controlnet")]),
    ]


def sd15_jobs(workdir: Path, exporter: str = "torchscript") -> list[tuple]:
    from diffrt.bench.configs import cache_root
    from diffrt.bench.sd15 import build_sd15_folder

    sd = build_sd15_folder(cache_root() / "sd15-random-v2-seed0")  # the GPU benchmark's folder, built once
    # A small profile keeps the parity runs short on a CPU; the graph and its size are the same at any profile.
    return [("SD-1.5-sized text-to-image + ControlNet (random weights)", sd,
             ExportOptions(batch=(1, 2, 2), height=(64, 64, 128), width=(64, 64, 128), exporter=exporter, vae_encoder=True),
             [str(sd / "controlnet")])]


def measure(workdir: Path, jobs: list[tuple]) -> list[dict]:
    rows = []
    for name, folder, options, controlnets in jobs:
        t0 = time.perf_counter()
        result = export_model(folder, workdir / name.split()[0], options, controlnets=controlnets)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = export_model(folder, workdir / name.split()[0], options, controlnets=controlnets)
        cached = time.perf_counter() - t1
        assert again.cache_hit
        for comp, entry in result.manifest["components"].items():
            parity = entry.get("parity", {}).get("onnxruntime", {})
            rows.append({"model": name, "component": comp, "export_seconds": entry["export_seconds"],
                         "megabytes": entry["bytes"] / 1e6, "max_rel_err": parity.get("max_rel"),
                         "model_total_seconds": round(total, 2), "cache_hit_seconds": round(cached, 3)})
    return rows


def main(argv: list[str]) -> None:
    # A parser, so that --help (or a mistyped flag) is answered, not taken for a run that overwrites the results.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[3:]))
    parser.add_argument("--sd15", action="store_true", help="SD-1.5-sized components (random weights): ~4 min, ~12 GB of disk")
    parser.add_argument("--dynamo", action="store_true", help="the torch.export-based exporter instead of TorchScript")
    parser.add_argument("out", nargs="?", help="the JSON to write (default: benchmarks/results/export_cpu[_sd15][_dynamo].json)")
    args = parser.parse_args(argv)
    sd15, dynamo = args.sd15, args.dynamo
    name = ("export_cpu_sd15" if sd15 else "export_cpu") + ("_dynamo" if dynamo else "")
    out = args.out or f"benchmarks/results/{name}.json"
    exporter = "dynamo" if dynamo else "torchscript"
    meta = run_metadata()
    with tempfile.TemporaryDirectory() as tmp:
        jobs = sd15_jobs(Path(tmp), exporter) if sd15 else [(n, f, replace(o, exporter=exporter), c) for n, f, o, c in small_jobs(Path(tmp))]
        rows = measure(Path(tmp), jobs)
    print("| model | component | ONNX export s | size MB | parity (max rel err) | whole export s | re-export (cache hit) s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['component']} | {r['export_seconds']:.2f} | {r['megabytes']:.2f} | "
              f"{r['max_rel_err']:.1e} | {r['model_total_seconds']:.1f} | {r['cache_hit_seconds']:.3f} |")
    atomic.write_json(out, {"machine": cpu_model(), "threads": torch.get_num_threads(), "provenance": finish(meta),
                            "versions": mf.library_versions(), "rows": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
