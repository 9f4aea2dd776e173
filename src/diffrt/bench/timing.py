"""Timing, memory and machine facts for the benchmark: warm up, synchronise, report medians.

Everything here measures; nothing decides what to measure (that is `cells.py`). Times are
wall-clock seconds from `time.perf_counter`, taken after a device synchronisation, so a CUDA
number is the work, not the launch. Per-call component latencies come from
`diffrt.runtime.backends.timed.TimedBackend` (CUDA events on a GPU, no synchronisation in the loop).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import resource
import statistics
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

MB = 1 << 20


# --- statistics ---------------------------------------------------------------------------------------


def summarize_ms(samples_s: list[float], per: float = 1.0) -> dict | None:
    """median / p90 / min of samples in seconds, as milliseconds divided by `per` (images per run)."""
    if not samples_s:
        return None
    ms = sorted(1000.0 * s / per for s in samples_s)
    p90 = ms[max(0, math.ceil(0.9 * len(ms)) - 1)]  # nearest rank: with few runs it is the slowest
    return {"median_ms": statistics.median(ms), "p90_ms": p90, "min_ms": ms[0], "n": len(ms)}


def spread(values: list[float]) -> dict | None:
    """Median, quartiles and range of paired ratios (nearest rank, as `summarize_ms`). Up to 4 values the quartiles
    are the extremes: so few pairs are judged on their whole range (nearest rank made 4 values' p75 the third, and one
    outlying round of four slipped past a verdict)."""
    if not values:
        return None
    v = sorted(values)

    def rank(q: float) -> float:
        return v[max(0, math.ceil(q * len(v)) - 1)]

    p25, p75 = (v[0], v[-1]) if len(v) <= 4 else (rank(0.25), rank(0.75))
    return {"median": statistics.median(v), "p25": p25, "p75": p75, "min": v[0], "max": v[-1], "n": len(v)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory ---------------------------------------------------------------------------------------------


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so an RSS baseline taken next is
    not inflated by what the previous measurement freed but glibc kept."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is only less tight
        pass


def _rss_bytes() -> int | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None


class MemoryMonitor:
    """Peak memory while a block runs, above a baseline taken with `baseline()`.

    CPU: process RSS sampled every `interval` s in a thread (tracemalloc cannot see torch's or
    ONNX Runtime's allocators). Where RSS cannot be read, the process's max RSS from getrusage,
    whose delta only shows growth beyond the earlier high-water mark. CUDA: the device's used
    memory (cudaMemGetInfo, which counts ONNX Runtime's and TensorRT's allocations too) and
    torch's own `max_memory_allocated`."""

    def __init__(self, device: torch.device, interval: float = 0.01):
        self.device, self.interval = device, interval
        self.method = ("cuda device memory in use (cudaMemGetInfo, sampled) and torch.cuda.max_memory_allocated, each "
                       "minus its value before the pipeline opened" if device.type == "cuda" else
                       "process RSS sampled every 10 ms over a second warm-up run at the request's shapes (the first "
                       "compiles), peak minus RSS before the pipeline opened")
        self._base = self._peak = self._torch_base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        rss = _rss_bytes()
        return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def baseline(self) -> None:
        release_memory()
        self._base = self._peak = self._now()
        # torch's allocator too, so that its figure is this cell's as peak_mb is (the co-open cells' weights are not)
        self._torch_base = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._now())

    def __enter__(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._now())

    def result(self) -> dict:
        out = {"peak_mb": round((self._peak - self._base) / MB, 1), "method": self.method}
        if self.device.type == "cuda":
            out["torch_max_allocated_mb"] = round((torch.cuda.max_memory_allocated(self.device) - self._torch_base) / MB, 1)
        return out


# --- threads and machine --------------------------------------------------------------------------------


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """DIFFRT_BENCH_THREADS, else every CPU this process may run on."""
    env = os.environ.get("DIFFRT_BENCH_THREADS", "").strip()
    if not env:
        return available_cpus()
    if not env.isdigit():
        from diffrt.errors import DiffrtError

        raise DiffrtError(f"DIFFRT_BENCH_THREADS={env!r} must be a whole number of threads (or unset: every CPU)")
    return int(env)


def bench_threads(threads: int | None = None) -> int:
    """`threads`, else `default_threads()`, capped at the CPUs this process may run on.

    ONNX Runtime's pool is PyTorch's thread count capped at those CPUs (its sessions made under
    `cpu_threads`), so more threads than CPUs would give eager PyTorch an oversubscribed pool and
    ONNX Runtime the CPU count: the speed-up would compare two thread counts."""
    return max(1, min(threads or default_threads(), available_cpus()))


@contextmanager
def cpu_threads(threads: int):
    """Run the block with `threads` CPU threads for PyTorch and ONNX Runtime alike.

    torch takes `set_num_threads`; ONNX Runtime sessions made in the block take that count (capped at
    the CPUs the process may use), and fewer threads than CPUs also pins the calling thread to the first
    `threads` CPUs, which the threads it starts inherit (Linux's affinity is per thread: a pool made before
    the block keeps its CPUs, so the sessions timed are made inside it). Both are restored afterwards."""
    old_threads = torch.get_num_threads()
    old_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(threads)
    if old_affinity is not None and threads < len(old_affinity):
        os.sched_setaffinity(0, sorted(old_affinity)[:threads])
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that change how fast PyTorch's and ONNX Runtime's CPU kernels run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_identity() -> dict | None:
    """What tells two CPUs of one model name apart (two EPYC generations both read "AMD EPYC" on some clouds): family,
    model and stepping, and the instruction sets the kernels use. None where /proc/cpuinfo is not there."""
    fields = {}
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if not key:  # the end of the first processor's block: the others repeat it
                break
            fields.setdefault(key, value)
    except OSError:
        return None
    flags = set(fields.get("flags", "").split())
    return {"family": fields.get("cpu family"), "model": fields.get("model"), "stepping": fields.get("stepping"),
            "isa": [f for f in ISA_FLAGS if f in flags]}


def machine_info(device: torch.device, threads: int) -> dict:
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_gb": round(props.total_memory / (1 << 30), 1),
               "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {"cpu": cpu_model(), "cpu_identity": cpu_identity(), "cpu_count": os.cpu_count(), "cpus_available": available_cpus(), "threads": threads,
            "gpu": gpu, "device": str(device), "platform": platform.platform(),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def contention(info: dict, load: float | None = None, *, at_end: bool = False) -> str | None:
    """A warning when other processes keep the CPUs the benchmark's threads need busy; `load`: the
    1-min load average to judge (default: the one recorded at the start). `at_end`: a load taken at the
    run's end, which holds the benchmark's own busy threads too: those are not competition (a run as
    wide as the machine, on an idle one, always warned).

    OpenMP threads wait for each other at every parallel region's barrier; when another process
    holds one of their cores, eager PyTorch's many small ops slow down several-fold (measured
    here: 3-4x at load 3 on 2 cores), which would flatter every other backend. One thread has no
    barrier, but with more runnable processes than CPUs it waits for a core too: its times stretch
    and move with the load."""
    load = info["load_average_1min"] if load is None else load
    cpus, threads = info["cpus_available"], info["threads"]
    if info["gpu"] or load is None:
        return None
    if threads == 1:
        if (load - 1 if at_end else load) <= cpus:
            return None
        return (f"1-min load average {load} on {cpus} CPUs: more runnable processes than CPUs, so the benchmark's one "
                f"thread waits for a core and its times stretch with the load; compare only figures measured in the same run")
    others = load - threads if at_end else load
    if others <= cpus - threads + 0.5:
        return None
    own = f" at the end, {others:g} of it beyond the run's own {threads} threads," if at_end else ""
    return (f"1-min load average {load}{own} on {cpus} CPUs with {threads} threads: other processes compete for "
            f"these cores, which slows multi-threaded eager PyTorch far more than the other backends; "
            f"DIFFRT_BENCH_THREADS=1 gives comparable numbers on a shared machine")


def machine_tag(info: dict) -> str:
    """A file-name-safe name for the machine: the GPU's name, else cpu-<model>-<n>c."""
    name = info["gpu"]["name"] if info["gpu"] else f"cpu {info['cpu']} {info['cpus_available']}c"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in slug.split("-") if part)
