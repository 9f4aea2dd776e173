"""Measure one cell of the benchmark: one configuration on one backend.

    1. open the pipeline (export or compile as the backend needs; cached artifacts are reused);
    2. warm up with one short run at the request's shapes (lazy initialisation, allocator growth,
       oneDNN primitives, torch.compile's graph capture and codegen);
    3. time up to `repeats` end-to-end runs of the request, synchronising after each; every
       component call inside them is timed in place (`TimedBackend`);
    4. summarise: median / p90 / min per image and per component call, images/s, peak memory.

Speed-ups and output matching need the eager cell of the same run; `run_bench` computes them.
torch.compile cells can run in a child process with a time limit (`measure_cell_isolated`): on
a small CPU, inductor compiles C++ for minutes, and a compile cannot be interrupted in-process.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from dataclasses import dataclass

import torch

from diffrt.bench.configs import BenchConfig, NotApplicable
from diffrt.bench.timing import MemoryMonitor, cpu_threads, summarize_ms, synchronize
from diffrt.runtime.backends.timed import time_components

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # same shapes as the request, so every kernel, allocation and compiled graph is warm


@dataclass
class CellOptions:
    repeats: int = 5  # timed end-to-end runs, at most
    budget_s: float = 20.0  # stop timing once the runs took this long and min_runs are done
    min_runs: int = 3


def _base(config: BenchConfig, backend: str) -> dict:
    return {"config": config.name, "backend": backend}


def skipped(config: BenchConfig, backend: str, status: str, reason: str) -> dict:
    return {**_base(config, backend), "status": status, "reason": reason}


def measure_cell(config: BenchConfig, backend: str, device: torch.device, options: CellOptions) -> tuple[dict, torch.Tensor | None]:
    """Result dict (status "ok", "not applicable" or "error") and the last run's images on the CPU."""
    try:
        return _measure(config, backend, device, options)
    except NotApplicable as exc:
        return skipped(config, backend, "not applicable", str(exc)), None
    except Exception as exc:  # one broken backend must not lose the others' numbers
        log.warning("%s on %s failed: %s", config.name, backend, exc)
        log.debug("%s", traceback.format_exc())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return skipped(config, backend, "error", f"{type(exc).__name__}: {first}"[:400]), None


def _measure(config: BenchConfig, backend: str, device: torch.device, options: CellOptions):
    monitor = MemoryMonitor(device)
    monitor.baseline()

    # 1-2. Open and warm up.
    t0 = time.perf_counter()
    work = config.open(backend, device)
    open_s = time.perf_counter() - t0
    timed = time_components(work.pipeline, work.component_attrs)
    work.run(WARMUP_STEPS)
    synchronize(device)
    setup_s = time.perf_counter() - t0

    # 3. Timed end-to-end runs; the components record their calls meanwhile.
    for proxy in timed.values():
        proxy.recording = True
    runs: list[float] = []
    with monitor:
        while len(runs) < options.repeats:
            start = time.perf_counter()
            images = work.run(config.num_inference_steps)
            synchronize(device)
            runs.append(time.perf_counter() - start)
            if len(runs) >= min(options.min_runs, options.repeats) and sum(runs) >= options.budget_s:
                break

    # 4. Summarise.
    median_run = summarize_ms(runs)["median_ms"] / 1000.0
    components = {}
    for proxy in timed.values():
        samples = proxy.samples_s()
        components[proxy.spec.name] = {**summarize_ms(samples), "calls_per_run": len(samples) / len(runs), "backend": proxy.name}
    e2e = summarize_ms(runs, per=config.num_images)
    in_models = sum(c["median_ms"] * c["calls_per_run"] for c in components.values()) / config.num_images if components else None
    result = {
        **_base(config, backend), "status": "ok", "device": str(device), "open_s": round(open_s, 3),
        "setup_s": round(setup_s, 3), "runs": len(runs), "run_s": [round(s, 4) for s in runs],
        "end_to_end_per_image": e2e,
        # The rest of a run's time: the loop, guidance, pre/post-processing (medians, so approximate).
        "outside_models_ms_per_image": e2e["median_ms"] - in_models if in_models is not None else None,
        "ms_per_step": 1000.0 * median_run / config.num_inference_steps,
        "images_per_s": config.num_images / median_run, "components": components, "memory": monitor.result(),
        "details": work.details,
    }
    return result, images.detach().float().cpu()


def prime(config: BenchConfig, device: torch.device) -> None:
    """Pay a process's one-time costs before any cell's memory baseline: the request run once over
    `NullBackend`s imports diffusers, transformers and the runtime and makes the loop's first
    allocations. Otherwise the first cell measured in a process is charged them (~300 MB of RSS on
    tiny-t2i-controlnet; the same cell measured next: ~10 MB). `measure_loop` primes as well."""
    try:
        config.open_null(device).run(1)
        synchronize(device)
    except Exception as exc:  # the cell itself will say what is wrong
        log.debug("priming %s failed: %s", config.name, exc)


def measure_loop(config: BenchConfig, device: torch.device, options: CellOptions) -> dict:
    """The pipeline's own cost per step outside the model calls (scheduler, CFG combine, guidance,
    pre/post-processing): the request run over `NullBackend`s, which return zeros at once."""
    try:
        work = config.open_null(device)
        work.run(WARMUP_STEPS)
        synchronize(device)
        runs: list[float] = []
        while len(runs) < max(3, options.repeats):
            start = time.perf_counter()
            work.run(config.num_inference_steps)
            synchronize(device)
            runs.append(time.perf_counter() - start)
            if len(runs) >= 3 and sum(runs) >= options.budget_s:
                break
        stats = summarize_ms(runs)
        return {"config": config.name, "status": "ok", "runs": len(runs), "run_ms": stats,
                "ms_per_step": stats["median_ms"] / config.num_inference_steps}
    except Exception as exc:
        log.warning("loop overhead of %s failed: %s", config.name, exc)
        return {"config": config.name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:400]}


# --- isolation in a child process ------------------------------------------------------------------------


def _child(conn, config, backend, device, options, threads):
    logging.basicConfig(level=logging.WARNING)
    with cpu_threads(threads):
        prime(config, torch.device(device))  # a fresh process: the parent's cells were measured primed
        result, images = measure_cell(config, backend, torch.device(device), options)
    # NumPy pickles by value; a torch tensor would travel as a shared-memory handle that dies with this process.
    conn.send((result, images.numpy() if images is not None else None))
    conn.close()


def measure_cell_isolated(config: BenchConfig, backend: str, device: torch.device, options: CellOptions, *,
                          threads: int, timeout_s: float) -> tuple[dict, torch.Tensor | None]:
    """`measure_cell` in a fresh process that is killed after `timeout_s` (setup included)."""
    if timeout_s <= 0:
        return skipped(config, backend, "skipped", "no time left in the benchmark's budget"), None
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or thread pools
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, config, backend, str(device), options, threads), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            result, images = parent.recv()
            proc.join(30)
            result["isolated_wall_s"] = round(time.perf_counter() - start, 1)
            return result, torch.from_numpy(images) if images is not None else None
        reason = (f"did not finish warm-up and {options.min_runs} timed runs within {timeout_s:.0f} s on this machine "
                  f"({backend}: compiling is the slow part; inductor caches what it compiled for the next run)")
        return skipped(config, backend, "skipped", reason), None
    except (EOFError, OSError):
        proc.join(10)
        return skipped(config, backend, "error", f"the measuring process died (exit code {proc.exitcode})"), None
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
