"""`diffrt bench`: latency per component and end to end, for every backend present, against eager PyTorch.

    run_bench()  ->  benchmarks/results/bench_<machine>.json, .md (table), .png (chart)

1. pick the configurations for this machine (CPU: digits, digits-unguided, tiny-t2i-controlnet;
   CUDA: the SD-1.5-sized ones; see `configs.py`) and build their models once;
2. per configuration, the loop's own cost over zero-returning backends first (it also pays the
   process's one-time imports, which would otherwise swell the first cell's peak memory), then
   eager torch, then every other backend present (`cells.py`);
3. torch.compile cells last, each in a child process capped by the time left, since a compile
   cannot be interrupted and takes minutes on a small CPU;
4. speed-ups and output matching against the eager cell of this same run; the fused-kernel
   micro-benchmark (`benchmarks/bench_kernels.py`) where it is found; where each target stands.

Thread count: `threads`, else DIFFRT_BENCH_THREADS, else every CPU the process may use, never more
than those CPUs (ONNX Runtime's pool is that size at most); it is recorded with the machine. On a
shared CPU, fewer threads than cores avoids OpenMP barrier stalls when another process holds a core.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import torch

from diffrt.bench import report as rp
from diffrt.bench.cells import WARMUP_STEPS, CellOptions, measure_cell, measure_cell_isolated, measure_loop, skipped
from diffrt.bench.configs import BACKENDS, CONFIGS, CPU_DEFAULT, EAGER, GPU_DEFAULT, BenchConfig, get_config
from diffrt.bench.timing import available_cpus, bench_threads, contention, cpu_threads, default_threads, machine_info, machine_tag
from diffrt.errors import DiffrtError

log = logging.getLogger(__name__)

__all__ = ["run_bench", "CONFIGS"]

ISOLATED = ("torch-compile",)  # measured last, in a child process with a time limit
TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2}  # max |image - eager image|, images in [0, 1]


def _backends_for(config: BenchConfig, asked: list[str] | None) -> list[str]:
    wanted = asked or list(config.backends)
    if EAGER not in wanted and config.eager_baseline:
        wanted = [EAGER, *wanted]  # speed-ups are against eager measured in the same run
    return [b for b in BACKENDS if b in wanted]


def _unavailable(backend: str) -> str | None:
    if backend == "optimum-onnxruntime":
        return None  # decided when it opens (NotApplicable with the reason)
    from diffrt.runtime.backends import require_backend

    try:
        require_backend(backend)
    except DiffrtError as exc:
        return str(exc)
    return None


def _kernels(device: torch.device) -> dict:
    """`benchmarks/bench_kernels.py`'s `run(device)`, found beside the source tree (not installed with the package)."""
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_kernels.py"
    if not path.is_file():
        return {"status": "not run", "reason": f"{path} not found (run from a source checkout)"}
    try:
        spec = importlib.util.spec_from_file_location("diffrt_bench_kernels", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return {"status": "ok", "script": "benchmarks/bench_kernels.py", **module.run(device)}
    except Exception as exc:
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}


def _compare_with_eager(results: list[dict], images: dict, configs: dict[str, BenchConfig]) -> None:
    """Speed-up and max |image difference| of every cell against the eager cell of its configuration."""
    eager = {r["config"]: r for r in results if r["backend"] == EAGER and r["status"] == "ok"}
    for r in results:
        base = eager.get(r["config"])
        if r["status"] != "ok" or base is None:
            continue
        r["eager_median_ms_per_image"] = base["end_to_end_per_image"]["median_ms"]
        r["speedup_vs_eager"] = r["eager_median_ms_per_image"] / r["end_to_end_per_image"]["median_ms"]
        a, b = images.get((r["config"], r["backend"])), images.get((r["config"], EAGER))
        if a is None or b is None:
            continue
        config = configs[r["config"]]
        tol = config.match_tolerance  # 0.0 is a tolerance too: bit for bit
        tol = TOLERANCE.get(getattr(config, "precision", "fp32"), 1e-2) if tol is None else tol
        r["match_tolerance"] = tol
        if a.shape != b.shape:  # other images than eager's: not a match, and the table must say so
            r["matches_eager"] = False
            r["match_note"] = f"images {tuple(a.shape)}, eager's {tuple(b.shape)}"
            continue
        r["max_abs_diff_vs_eager"] = float((a - b).abs().max())
        r["mean_abs_diff_vs_eager"] = float((a - b).abs().mean())
        r["matches_eager"] = r["max_abs_diff_vs_eager"] <= tol


def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _command(out_dir, backends, repeats, configs) -> str:
    parts = ["diffrt bench", f"--out {out_dir}", f"--repeats {repeats}"]
    parts += [f"--backend {b}" for b in backends or []] + [f"--config {c}" for c in configs or []]
    env = os.environ.get("DIFFRT_BENCH_THREADS")
    return (f"DIFFRT_BENCH_THREADS={env} " if env else "") + " ".join(parts)


def run_bench(out_dir: str | Path = "benchmarks/results", backends: list[str] | None = None, repeats: int = 5,
              configs: list[str] | None = None, *, threads: int | None = None, budget_s: float | None = None,
              cell_budget_s: float | None = None, compile_cap_s: float | None = None, kernels: bool = True) -> list[Path]:
    """Measure, then write bench_<machine>.json, .md and .png under `out_dir`; returns their paths.

    budget_s: the whole run's time target (CPU 270 s, CUDA 3000 s); only the isolated
    torch.compile cells are cut to fit it. cell_budget_s: timed runs of one cell stop after this
    once three are done (CPU 20 s, CUDA 60 s). compile_cap_s: most a torch.compile cell may take."""
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    chosen = [get_config(n) for n in (configs or (GPU_DEFAULT if gpu else CPU_DEFAULT))]
    unknown = [b for b in backends or [] if b not in BACKENDS]
    if unknown:
        raise DiffrtError(f"unknown backend {unknown[0]!r} for the benchmark; known: {', '.join(BACKENDS)}")
    if repeats < 1:
        raise DiffrtError(f"--repeats must be >= 1, got {repeats}")
    asked, threads = threads or default_threads(), bench_threads(threads)
    if threads != asked:
        log.warning("%d threads asked for, %d CPUs available: measuring with %d (ONNX Runtime's pool cannot be larger, "
                    "and eager PyTorch must run with the same count)", asked, available_cpus(), threads)
    budget_s = budget_s or (3000.0 if gpu else 270.0)
    options = CellOptions(repeats=repeats, budget_s=cell_budget_s or (60.0 if gpu else 20.0))
    compile_cap_s = compile_cap_s or (900.0 if gpu else 150.0)

    results: dict[tuple[str, str], dict] = {}
    images: dict[tuple[str, str], torch.Tensor] = {}
    loops, deferred = [], []
    machine = machine_info(device, threads)  # before pinning, so it names every CPU the machine offers
    machine["contention"] = contention(machine)
    if machine["contention"]:
        log.warning("%s", machine["contention"])
    with cpu_threads(threads):
        log.info("benchmarking %s on %s with %d threads", ", ".join(c.name for c in chosen), device, threads)
        # 1-2. Every configuration: the loop's own cost (which also pays the process's one-time imports and
        # allocations before any cell's memory baseline), then eager, then the other backends.
        for config in chosen:
            wanted = _backends_for(config, backends)
            if config.gpu_only and not gpu:
                for b in wanted:
                    results[(config.name, b)] = skipped(config, b, "skipped", "a GPU configuration; this machine has no CUDA")
                continue
            try:
                config.prepare(device)
            except Exception as exc:  # e.g. the shipped model missing: say so in its rows, measure the rest
                log.warning("%s: cannot prepare the model: %s", config.name, exc)
                for b in wanted:
                    results[(config.name, b)] = skipped(config, b, "error", f"model not ready: {type(exc).__name__}: {exc}"[:400])
                continue
            log.info("%s: loop overhead ...", config.name)
            loops.append(measure_loop(config, device, options))
            for backend in wanted:
                why = _unavailable(backend)
                if why:
                    results[(config.name, backend)] = skipped(config, backend, "skipped", why)
                    continue
                if backend in ISOLATED:
                    results[(config.name, backend)] = None  # keeps the table's order; measured in step 3
                    deferred.append((config, backend))
                    continue
                log.info("%s on %s ...", config.name, backend)
                results[(config.name, backend)], images[(config.name, backend)] = measure_cell(config, backend, device, options)
        # 3. torch.compile, capped by what is left of the budget.
        for config, backend in deferred:
            left = min(compile_cap_s, budget_s - (time.perf_counter() - start))
            log.info("%s on %s (isolated, at most %.0f s) ...", config.name, backend, left)
            results[(config.name, backend)], images[(config.name, backend)] = measure_cell_isolated(
                config, backend, device, options, threads=threads, timeout_s=left)
        kernel_results = _kernels(device) if kernels else {"status": "not run", "reason": "kernels=False"}

    # 4. Against eager, targets, files.
    rows = list(results.values())
    _compare_with_eager(rows, images, CONFIGS)
    eager = {r["config"]: r for r in rows if r["backend"] == EAGER and r["status"] == "ok"}
    for o in loops:
        if o["status"] == "ok" and o["config"] in eager:
            o["eager_ms_per_step"] = eager[o["config"]]["ms_per_step"]
            o["share_of_eager_step"] = o["ms_per_step"] / o["eager_ms_per_step"]
    from diffrt.export.manifest import library_versions

    pairs = {c.name: c.unguided for c in chosen if c.unguided}
    report = {
        "schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": _command(out_dir, backends, repeats, configs),
        "machine_tag": machine_tag(machine), "machine": machine,
        "versions": {**library_versions(), "optimum": _installed("optimum"), "triton": _installed("triton")},
        "settings": {"repeats": repeats, "warmup_steps": WARMUP_STEPS, "cell_budget_s": options.budget_s,
                     "min_runs": options.min_runs, "budget_s": budget_s, "compile_cap_s": compile_cap_s,
                     "configs": {c.name: c.settings() for c in chosen}},
        "results": rows, "loop_overhead": loops, "kernels": kernel_results,
        "targets": [rp.cpu_exported_target(rows), rp.h100_tensorrt_target(rows, machine), rp.guidance_target(rows, pairs),
                    rp.kernel_target(kernel_results)],
    }
    report["wall_s"] = round(time.perf_counter() - start, 1)
    paths = rp.write(report, out_dir)
    log.info("\n%s", rp.markdown(report))
    return paths
