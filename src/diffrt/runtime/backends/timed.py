"""A Backend proxy that times each call of the component it wraps, for the benchmark and the service.

On CUDA the times come from CUDA events recorded around each call, so timing adds no
synchronisation inside the loop; they are read (one synchronisation) when asked for.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch


class TimedBackend:
    """A Backend proxy that records how long each `run` takes while `recording` is on.

    It keeps the Backend contract (name, spec, device, run), so a pipeline runs it unchanged and
    the component is timed on exactly the calls and shapes the pipeline makes."""

    def __init__(self, inner):
        self.inner = inner
        self.recording = False
        self._cpu: list[float] = []
        self._events: list[tuple] = []

    def __getattr__(self, name):  # name, spec, device, providers, ... of the wrapped backend
        return getattr(self.inner, name)

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.recording:
            return self.inner.run(feed)
        if self.inner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self.inner.device)  # the backend's GPU, not whichever is current
            start.record(stream)
            out = self.inner.run(feed)
            end.record(stream)
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.inner.run(feed)
        self._cpu.append(time.perf_counter() - t0)
        return out

    def samples_s(self) -> list[float]:
        """Recorded latencies in seconds (synchronises first when they are CUDA events)."""
        if self._events:
            torch.cuda.synchronize()
        return self._cpu + [start.elapsed_time(end) / 1000.0 for start, end in self._events]

    def take_s(self) -> float:
        """Seconds spent in the calls recorded since the last take (synchronises on CUDA), then forgets them."""
        total = sum(self.samples_s())
        self._cpu, self._events = [], []
        return total


def time_components(pipeline, attrs: Iterable[str], *, recording: bool = False) -> dict[str, TimedBackend]:
    """Put a TimedBackend in place of each of `pipeline`'s components named by `attrs` (attributes
    holding a Backend), so it is timed on the calls the pipeline makes; the proxies by component name."""
    timed = {}
    for attr in attrs:
        proxy = TimedBackend(getattr(pipeline, attr))
        proxy.recording = recording
        setattr(pipeline, attr, proxy)
        timed[proxy.spec.name] = proxy
    return timed
