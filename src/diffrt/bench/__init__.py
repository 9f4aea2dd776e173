"""`diffrt bench`: latency per component and end to end, for every backend present, against eager PyTorch.

    run_bench()  ->  benchmarks/results/bench_<machine>.json, .md (table), .png (chart)

1. pick the configurations for this machine (CPU: digits, digits-unguided, tiny-t2i-controlnet;
   CUDA: the SD-1.5-sized ones; see `configs.py`) and build their models once;
2. per configuration, the loop's own cost over zero-returning backends first (it also pays the
   process's one-time imports, which would otherwise swell the first cell's peak memory), then
   eager torch and every other backend present opened together and timed in alternating rounds
   (`cells.py`); a colour-guided configuration and its unguided twin share those rounds, each
   backend's pipeline running both requests; the files are written after each configuration,
   marked partial, so a run killed midway keeps what it measured;
3. torch.compile cells last, each in a child process capped by the time left, since a compile
   cannot be interrupted and takes minutes on a small CPU;
4. speed-ups (the median of the per-round ratios, with their spread) and output matching against
   the eager cell of the same rounds; the fused-kernel
   micro-benchmark (`benchmarks/bench_kernels.py`) where it is found; where each target stands.

Thread count: `threads`, else DIFFRT_BENCH_THREADS, else every CPU the process may use, never more
than those CPUs (ONNX Runtime's pool is that size at most); it is recorded with the machine. On a
shared CPU, fewer threads than cores avoids OpenMP barrier stalls when another process holds a core.
The time budget: `budget_s`, else DIFFRT_BENCH_BUDGET_S, else 270 s on a CPU and 3000 s on CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import torch

from diffrt.bench import report as rp
from diffrt.bench.cells import (WARMUP_STEPS, Cell, CellOptions, measure_cell_isolated, measure_loop, open_cell, skipped, summarize_cell,
                                time_rounds)
from diffrt.bench.configs import BACKENDS, CONFIGS, CPU_DEFAULT, EAGER, GPU_DEFAULT, BenchConfig, get_config
from diffrt.bench.provenance import finish, load_average, run_metadata
from diffrt.bench.timing import available_cpus, bench_threads, contention, cpu_threads, default_threads, machine_info, machine_tag, spread
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import REGISTRY, require_backend

log = logging.getLogger(__name__)

__all__ = ["run_bench", "CONFIGS"]

ISOLATED = ("torch-compile",)  # measured last, in a child process with a time limit
SHAREABLE = ("torch", "onnxruntime", "tensorrt")  # diffrt's pipelines: a twin configuration can run its request on them
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
        r.update(_speedup(base, r))
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


def _speedup(eager: dict, row: dict) -> dict:
    """Eager's time over the row's: the median of the per-round ratios where the two alternated in
    one set of rounds (a change in the machine's load between rounds cancels), else the ratio of
    the medians of runs timed apart (the isolated torch.compile cells), which the load can move."""
    if row is eager:
        return {"speedup_vs_eager": 1.0, "speedup_method": "the baseline", "speedup_spread": None}
    if row.get("round_group") is not None and row.get("round_group") == eager.get("round_group"):
        ratios = [e / b for e, b in zip(eager["run_s"], row["run_s"])]
        s = spread(ratios)
        return {"speedup_vs_eager": s["median"], "speedup_method": "median of per-round ratios (interleaved runs)",
                "speedup_spread": {k: s[k] for k in ("p25", "p75", "min", "max", "n")}}
    return {"speedup_vs_eager": eager["end_to_end_per_image"]["median_ms"] / row["end_to_end_per_image"]["median_ms"],
            "speedup_method": "ratio of medians (runs timed apart, not interleaved)", "speedup_spread": None}


def _installed(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _command(out_dir, backends, repeats, configs) -> str:
    parts = ["diffrt bench", f"--out {out_dir}", *([f"--repeats {repeats}"] if repeats is not None else [])]
    parts += [f"--backend {b}" for b in backends or []] + [f"--config {c}" for c in configs or []]
    env = " ".join(f"{k}={os.environ[k]}" for k in ("DIFFRT_BENCH_THREADS", "DIFFRT_BENCH_BUDGET_S") if os.environ.get(k))
    return (f"{env} " if env else "") + " ".join(parts)


def report_stem(machine_tag: str, configs: list[str] | None, backends: list[str] | None, default: tuple[str, ...]) -> str:
    """The results' file name: bench_<machine> for the default run; a run of chosen --config or --backend names adds
    them (bench_<machine>_digits_onnxruntime), so that it never replaces the default run's files."""
    chosen = [*(configs if configs and tuple(configs) != tuple(default) else []), *(backends or [])]
    return "_".join([f"bench_{machine_tag}", *chosen])


def _groups(chosen: list[BenchConfig]) -> list[list[BenchConfig]]:
    """Configurations timed in one set of rounds: each alone, except a colour-guided one and its
    unguided twin, which alternate on one pipeline per backend (the guidance-overhead target)."""
    names = {c.name for c in chosen}
    groups, placed = [], set()
    for config in chosen:
        if config.name in placed:
            continue
        group = [c for c in chosen if c is config or (c.name not in placed and (
            c.name == config.unguided or config.name == c.unguided) and c.name in names)]
        placed.update(c.name for c in group)
        groups.append(group)
    return groups


def _env_budget() -> float | None:
    env = os.environ.get("DIFFRT_BENCH_BUDGET_S", "").strip()
    if not env:
        return None
    try:
        value = float(env)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # 0 read as unset, a negative one as no time at all: both said nothing
        raise DiffrtError(f"DIFFRT_BENCH_BUDGET_S={env!r} must be a number of seconds > 0 (or unset: 270 on a CPU, 3000 on CUDA)")
    return value


def check_out_dir(out_dir: str | Path) -> None:
    """The results folder, made (or found) and writable before anything is measured: a file there, or a folder that
    cannot be written, failed only when the first results were written, after the models were opened and timed."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DiffrtError(f"--out {out} is a file; give the folder for the JSON, markdown table and PNG chart")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffrtError(f"--out {out}: cannot make the folder ({exc.strerror}); give a folder you can write") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DiffrtError(f"--out {out} is not writable; give a folder you can write")


DEFAULT_REPEATS = 5


def run_bench(out_dir: str | Path = "benchmarks/results", backends: list[str] | None = None, repeats: int | None = None,
              configs: list[str] | None = None, *, threads: int | None = None, budget_s: float | None = None,
              cell_budget_s: float | None = None, compile_cap_s: float | None = None, min_time_s: float | None = None,
              kernels: bool = True) -> list[Path]:
    """Measure, then write bench_<machine>.json, .md and .png under `out_dir` (report_stem: a run of chosen configs or
    backends adds their names); returns their paths.
    The files are written after every configuration as well, marked partial, so a run that is
    killed keeps what it measured.

    repeats: timed rounds per cell, every one of them run; None: 5, fewer (3) for cells slower than cell_budget_s.
    budget_s: the whole run's time target (else DIFFRT_BENCH_BUDGET_S, else CPU 270 s, CUDA 3000 s);
    a configuration is not started past it, and the isolated torch.compile cells are cut to fit it.
    cell_budget_s: timed rounds stop after this once three are done (CPU 20 s, CUDA 60 s).
    min_time_s: short configurations run more rounds (up to 30) until every cell ran this long (3 s).
    compile_cap_s: most a torch.compile cell may take."""
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    chosen = [get_config(n) for n in (configs or (GPU_DEFAULT if gpu else CPU_DEFAULT))]
    unknown = [b for b in backends or [] if b not in BACKENDS]
    if unknown:
        raise DiffrtError(f"unknown backend {unknown[0]!r} for the benchmark; known: {', '.join(BACKENDS)}")
    if repeats is not None and repeats < 1:
        raise DiffrtError(f"--repeats must be >= 1, got {repeats}")
    for name in backends or []:  # asked for by name: one line now, not a "skipped" row after minutes of the others
        if name in REGISTRY:
            require_backend(name)
    check_out_dir(out_dir)
    asked, threads = threads or default_threads(), bench_threads(threads)
    if threads != asked:
        log.warning("%d threads asked for, %d CPUs available: measuring with %d (ONNX Runtime's pool cannot be larger, "
                    "and eager PyTorch must run with the same count)", asked, available_cpus(), threads)
    env_budget = _env_budget()
    budget_s = budget_s if budget_s is not None else env_budget if env_budget is not None else 3000.0 if gpu else 270.0
    options = CellOptions(repeats=repeats or DEFAULT_REPEATS, budget_s=cell_budget_s or (60.0 if gpu else 20.0),
                          min_time_s=3.0 if min_time_s is None else min_time_s, repeats_asked=repeats is not None)
    compile_cap_s = compile_cap_s or (900.0 if gpu else 150.0)

    results: dict[tuple[str, str], dict] = {}
    images: dict[tuple[str, str], torch.Tensor] = {}
    loops, deferred = [], []
    machine = machine_info(device, threads)  # before pinning, so it names every CPU the machine offers
    machine["contention"] = contention(machine)
    if machine["contention"]:
        log.warning("%s", machine["contention"])
    provenance = run_metadata(threads)
    run = dict(start=start, out_dir=out_dir, backends=backends, repeats=repeats, configs=configs, chosen=chosen,
               machine=machine, provenance=provenance, options=options, budget_s=budget_s, compile_cap_s=compile_cap_s, gpu=gpu)
    groups, later = _groups(chosen), ["the kernel micro-benchmark"] if kernels else []
    with cpu_threads(threads):
        log.info("benchmarking %s on %s with %d threads", ", ".join(c.name for c in chosen), device, threads)
        # 1-2. Every group of configurations: the loop's own cost (which also pays the process's one-time
        # imports and allocations before any cell's memory baseline), then its cells, open together and
        # timed in alternating rounds. The files are rewritten after each, so a killed run keeps them.
        for i, group in enumerate(groups):
            if time.perf_counter() - start > budget_s:
                why = f"no time left in the benchmark's budget ({budget_s:.0f} s; budget_s or DIFFRT_BENCH_BUDGET_S)"
                for config in group:
                    for b in _backends_for(config, backends):
                        results[(config.name, b)] = skipped(config, b, "skipped", why)
                continue
            _measure_group(group, backends, device, options, gpu, results, images, loops, deferred)
            pending = [c.name for g in groups[i + 1:] for c in g] + [f"{c.name}/{b}" for c, b in deferred] + later
            _write(run, results, images, loops, None, pending)
        # 3. torch.compile, capped by what is left of the budget.
        for j, (config, backend) in enumerate(deferred):
            left = min(compile_cap_s, budget_s - (time.perf_counter() - start))
            log.info("%s on %s (isolated, at most %.0f s) ...", config.name, backend, left)
            results[(config.name, backend)], images[(config.name, backend)] = measure_cell_isolated(
                config, backend, device, options, threads=threads, timeout_s=left)
            _write(run, results, images, loops, None, [f"{c.name}/{b}" for c, b in deferred[j + 1:]] + later)
        kernel_results = _kernels(device) if kernels else {"status": "not run", "reason": "kernels=False"}

    # 4. Against eager, targets, files; the load now says whether the machine stayed quiet.
    machine["load_average_1min_at_end"] = load_average()
    machine["contention_at_end"] = contention(machine, machine["load_average_1min_at_end"], at_end=True)
    if machine["contention_at_end"]:
        log.warning("at the end: %s", machine["contention_at_end"])
    run["provenance"] = finish(provenance)
    paths, report = _write(run, results, images, loops, kernel_results, [])
    log.info("\n%s", rp.markdown(report))
    return paths


def _measure_group(group: list[BenchConfig], backends, device, options, gpu, results, images, loops, deferred) -> None:
    """Prepare the group's models, measure their loop overhead, open all their cells and time them in rounds."""
    ready = []
    for config in group:
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
        ready.append((config, wanted))
    opened: dict[str, Cell] = {}  # backend -> the group's first open cell on it, whose pipeline a twin shares
    cells = []
    for config, wanted in ready:
        for backend in wanted:
            why = _unavailable(backend)
            if why:
                results[(config.name, backend)] = skipped(config, backend, "skipped", why)
                continue
            if backend in ISOLATED:
                results[(config.name, backend)] = None  # keeps the table's order; measured in step 3
                deferred.append((config, backend))
                continue
            log.info("%s on %s: opening ...", config.name, backend)
            share = opened.get(backend) if backend in SHAREABLE else None
            cell = open_cell(config, backend, device, share=share)
            if isinstance(cell, dict):
                results[(config.name, backend)] = cell
                continue
            opened.setdefault(backend, cell)
            results[(config.name, backend)] = None  # filled below, in this order
            cells.append(cell)
    if not cells:
        return
    log.info("%s: timing %s in alternating rounds ...", "+".join(c.name for c, _ in ready),
             ", ".join(f"{c.config.name}/{c.backend}" for c in cells))
    time_rounds(cells, device, options)
    round_group = "+".join(c.name for c, _ in ready)
    for cell in cells:
        key = (cell.config.name, cell.backend)
        results[key], images[key] = summarize_cell(cell, device)
        if results[key]["status"] == "ok" and len(cells) > 1:
            results[key]["round_group"] = round_group  # its run_s[i] and its group's run_s[i] ran in one round


def _write(run: dict, results, images, loops, kernel_results, pending: list[str]) -> tuple[list[Path], dict]:
    """Assemble the report from what is measured so far and write its files."""
    rows = [r for r in results.values() if r is not None]
    _compare_with_eager(rows, images, CONFIGS)
    eager = {r["config"]: r for r in rows if r["backend"] == EAGER and r["status"] == "ok"}
    for o in loops:
        if o["status"] == "ok" and o["config"] in eager:
            o["eager_ms_per_step"] = eager[o["config"]]["ms_per_step"]
            o["share_of_eager_step"] = o["ms_per_step"] / o["eager_ms_per_step"]
    from diffrt.export.manifest import library_versions

    chosen, options = run["chosen"], run["options"]
    kernel_results = kernel_results or {"status": "not run", "reason": "the run has not reached the kernels"}
    pairs = {c.name: c.unguided for c in chosen if c.unguided}
    report = {
        "schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": _command(run["out_dir"], run["backends"], run["repeats"], run["configs"]),
        "partial": f"written during the run; still to measure: {', '.join(pending)}" if pending else None,
        "provenance": run["provenance"], "machine_tag": machine_tag(run["machine"]), "machine": run["machine"],
        "stem": report_stem(machine_tag(run["machine"]), run["configs"], run["backends"], GPU_DEFAULT if run["gpu"] else CPU_DEFAULT),
        "versions": {**library_versions(), "optimum": _installed("optimum"), "triton": _installed("triton")},
        "settings": {"repeats": options.repeats, "repeats_asked": options.repeats_asked, "warmup_steps": WARMUP_STEPS, "cell_budget_s": options.budget_s,
                     "min_runs": options.min_runs, "min_time_s": options.min_time_s, "max_runs": options.max_runs,
                     "budget_s": run["budget_s"], "compile_cap_s": run["compile_cap_s"],
                     "configs": {c.name: c.settings() for c in chosen}},
        "results": rows, "loop_overhead": loops, "kernels": kernel_results,
        "targets": [rp.cpu_exported_target(rows), rp.h100_tensorrt_target(rows, run["machine"]), rp.guidance_target(rows, pairs),
                    rp.kernel_target(kernel_results)],
    }
    report["wall_s"] = round(time.perf_counter() - run["start"], 1)
    return rp.write(report, run["out_dir"]), report
