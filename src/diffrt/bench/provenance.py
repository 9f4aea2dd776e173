"""Where a benchmark's numbers come from: the commit, diffrt's version, the CPU, threads and load.

Every results file (`diffrt bench` and each `benchmarks/*.py` script) carries this block, so a
number can be traced to the code that produced it and the load it was measured under:

    meta = run_metadata(threads)      # at the start: commit, dirty flag, versions, CPU, load
    ... measure ...
    meta = finish(meta)               # at the end: the load then

The commit is read with `git` from the checkout diffrt's source lies in (None outside one, or
where git is absent); "dirty" says whether tracked files differ from that commit, in which case
the commit alone does not name the code that ran. The committed results themselves
(`benchmarks/results/`) do not count: a rerun over an earlier run's files ran the commit's code.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[3]  # src/diffrt/bench/ -> the checkout, when run from one
RESULTS = "benchmarks/results"  # where the committed results lie: their changes are not the code's


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
    """{"commit": sha or None, "dirty": bool or None}: None where diffrt does not run from a git checkout."""
    if not (SOURCE_ROOT / ".git").exists():
        return {"commit": None, "dirty": None}
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS}") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def run_metadata(threads: int | None = None) -> dict:
    """The provenance block, taken at the start of a run. `threads`: the count the run measures with
    (default: torch's intra-op threads now)."""
    import torch

    import diffrt
    from diffrt.bench.timing import available_cpus, cpu_identity, cpu_model

    return {**git_state(), "diffrt": diffrt.__version__, "torch": torch.__version__, "cpu": cpu_model(), "cpu_identity": cpu_identity(),
            "cpus_available": available_cpus(), "threads": threads if threads is not None else torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average_1min_at_start": load_average(),
            "load_average_1min_at_end": None}


def finish(meta: dict) -> dict:
    """A copy of `meta` with the load and the time at the end of the run."""
    return {**meta, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average_1min_at_end": load_average()}
