"""Measure the cells of the benchmark (one configuration on one backend), interleaved.

    1. open each cell's pipeline (export or compile as the backend needs; cached artifacts are
       reused) and warm it up with one short run at the request's shapes (lazy initialisation,
       allocator growth, oneDNN primitives, torch.compile's graph capture and codegen), its peak
       memory sampled meanwhile;
    2. time rounds of end-to-end runs: every open cell once per round (eager, exported, eager,
       exported, ...; the order reversed every other round), synchronising after each run, so a
       change in the machine's load lands on every cell alike and a speed-up can be taken per
       round; every component call inside them is timed in place (`TimedBackend`);
    3. summarise: median / p90 / min per image and per component call, images/s, peak memory.

Speed-ups (the median of the per-round ratios) and output matching need the eager cell of the
same rounds; `run_bench` computes them. torch.compile cells can run in a child process with a
time limit (`measure_cell_isolated`): on a small CPU, inductor compiles C++ for minutes, and a
compile cannot be interrupted in-process.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from dataclasses import dataclass, field

import torch

from diffrt.bench.configs import BenchConfig, NotApplicable, Workload
from diffrt.bench.timing import MemoryMonitor, cpu_threads, release_memory, summarize_ms, synchronize
from diffrt.runtime.backends.timed import time_components

log = logging.getLogger(__name__)

WARMUP_STEPS = 2  # same shapes as the request, so every kernel, allocation and compiled graph is warm


@dataclass
class CellOptions:
    repeats: int = 5  # timed rounds (one run of every cell each), unless a cell is short of min_time_s
    budget_s: float = 20.0  # stop after min_runs rounds once every cell's runs took this long
    min_runs: int = 3
    # Short configurations: more rounds, up to max_runs, until every cell has run this long in all,
    # so a 0.2 s run is not judged on five samples.
    min_time_s: float = 3.0
    max_runs: int = 30
    repeats_asked: bool = False  # `repeats` was asked for (--repeats): every one is run, past budget_s and max_runs


@dataclass
class Cell:
    """One configuration on one backend, opened and warm; its runs are appended round by round."""

    config: BenchConfig
    backend: str
    work: Workload
    timed: dict  # component name -> TimedBackend (shared with the cell whose pipeline this one runs on)
    open_s: float
    setup_s: float
    memory: dict
    shares_pipeline_with: str | None = None
    export_made: bool = False  # its open exported the model (a cold cache): setup time and peak memory include that
    runs: list[float] = field(default_factory=list)
    component_s: dict[str, list[float]] = field(default_factory=dict)
    images: torch.Tensor | None = None
    error: dict | None = None


def _base(config: BenchConfig, backend: str) -> dict:
    return {"config": config.name, "backend": backend}


def skipped(config: BenchConfig, backend: str, status: str, reason: str) -> dict:
    return {**_base(config, backend), "status": status, "reason": reason}


def _failure(config: BenchConfig, backend: str, exc: Exception) -> dict:
    if isinstance(exc, NotApplicable):
        return skipped(config, backend, "not applicable", str(exc))
    log.warning("%s on %s failed: %s", config.name, backend, exc)
    log.debug("%s", traceback.format_exc())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return skipped(config, backend, "error", f"{type(exc).__name__}: {first}"[:400])


def _export_manifests() -> dict[str, int]:
    """The automatic exports' manifests in the cache and their times: a cell whose open adds or rewrites one made
    its export (diffrt writes the manifest last), and its setup time and peak memory count that work too."""
    from diffrt.atomic import cache_dir
    from diffrt.export.manifest import MANIFEST

    root = cache_dir() / "artifacts"
    return {str(p): p.stat().st_mtime_ns for p in root.glob(f"*/{MANIFEST}")} if root.is_dir() else {}


def open_cell(config: BenchConfig, backend: str, device: torch.device, share: Cell | None = None) -> Cell | dict:
    """Open and warm up `backend` for `config`; a result dict (not applicable, error) where it cannot.
    `share`: an open cell of another configuration over the same model and backend whose pipeline
    this one runs its own request on (the colour-guided configuration and its unguided twin)."""
    try:
        monitor = MemoryMonitor(device)
        monitor.baseline()
        manifests = _export_manifests()
        t0 = time.perf_counter()
        if share is not None:
            work, timed = config.workload_on(share.work.pipeline), share.timed
        else:
            work = config.open(backend, device)
            timed = time_components(work.pipeline, work.component_attrs)
        open_s = time.perf_counter() - t0
        export_made = _export_manifests() != manifests
        # The first warm-up compiles (torch.compile: hundreds of MB of the tracer's and inductor's, gone after), loads
        # kernels and fills caches; the second, at the request's shapes, is measured: its peak is the cell's.
        work.run(WARMUP_STEPS)
        synchronize(device)
        release_memory()
        with monitor:
            work.run(WARMUP_STEPS)
            synchronize(device)
        return Cell(config, backend, work, timed, open_s, time.perf_counter() - t0, monitor.result(),
                    share.config.name if share is not None else None, export_made)
    except Exception as exc:  # one broken backend must not lose the others' numbers
        return _failure(config, backend, exc)


def _run_once(cell: Cell, device: torch.device) -> None:
    before = {name: len(p.samples_s()) for name, p in cell.timed.items()}
    start = time.perf_counter()
    images = cell.work.run(cell.config.num_inference_steps)
    synchronize(device)
    cell.runs.append(time.perf_counter() - start)
    cell.images = images
    for name, proxy in cell.timed.items():  # this run's calls only: a shared pipeline's proxies see two cells
        cell.component_s.setdefault(name, []).extend(proxy.samples_s()[before[name]:])


def time_rounds(cells: list[Cell], device: torch.device, options: CellOptions) -> None:
    """Rounds of one run per cell, alternating, until `options` say the runs suffice. A cell whose
    run fails gets its `error` and leaves the rounds; the others go on."""
    for cell in cells:
        for proxy in cell.timed.values():
            proxy.recording = True
    live = list(cells)
    rounds = 0
    while live:
        for cell in live if rounds % 2 == 0 else live[::-1]:  # ABBA: a steady drift costs both sides alike
            try:
                _run_once(cell, device)
            except Exception as exc:
                cell.error = _failure(cell.config, cell.backend, exc)
        live = [c for c in live if c.error is None]
        rounds += 1
        if not live or rounds >= max(options.max_runs, options.repeats if options.repeats_asked else 0):
            break
        if rounds < (options.repeats if options.repeats_asked else min(options.min_runs, options.repeats)):
            continue
        shortest = min(sum(c.runs) for c in live)
        if shortest < options.min_time_s:
            continue
        if rounds >= options.repeats or shortest >= options.budget_s:
            break


def summarize_cell(cell: Cell, device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """The cell's result dict (status "ok", or its error) and its last run's images on the CPU."""
    if cell.error is not None:
        return cell.error, None
    config, runs = cell.config, cell.runs
    median_run = summarize_ms(runs)["median_ms"] / 1000.0
    components = {}
    for name, samples in cell.component_s.items():
        if samples:
            components[name] = {**summarize_ms(samples), "calls_per_run": len(samples) / len(runs), "backend": cell.timed[name].name}
    e2e = summarize_ms(runs, per=config.num_images)
    in_models = sum(c["median_ms"] * c["calls_per_run"] for c in components.values()) / config.num_images if components else None
    result = {
        **_base(config, cell.backend), "status": "ok", "device": str(device), "open_s": round(cell.open_s, 3),
        "setup_s": round(cell.setup_s, 3), "runs": len(runs), "run_s": [round(s, 4) for s in runs],
        "end_to_end_per_image": e2e,
        # The rest of a run's time: the loop, guidance, pre/post-processing (medians, so approximate).
        "outside_models_ms_per_image": e2e["median_ms"] - in_models if in_models is not None else None,
        "ms_per_step": 1000.0 * median_run / config.num_inference_steps,
        "images_per_s": config.num_images / median_run, "components": components, "memory": cell.memory,
        "details": cell.work.details,
    }
    if cell.shares_pipeline_with:
        result["shares_pipeline_with"] = cell.shares_pipeline_with  # its peak memory is its own runs' only
    if cell.export_made:
        result["export_made"] = True  # a cold cache: setup_s and the peak include the export
    return result, cell.images.detach().float().cpu()


def measure_cell(config: BenchConfig, backend: str, device: torch.device, options: CellOptions) -> tuple[dict, torch.Tensor | None]:
    """One cell alone (open, warm up, time, summarise): the isolated torch.compile cells."""
    cell = open_cell(config, backend, device)
    if isinstance(cell, dict):
        return cell, None
    time_rounds([cell], device, options)
    return summarize_cell(cell, device)


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
