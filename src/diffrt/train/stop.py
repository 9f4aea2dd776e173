"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a job scheduler's preemption, `docker stop`,
a Kubernetes eviction, torchrun passing either on).

Killed mid-step, a run loses every step since its last checkpoint: with --checkpoint-every 500 that is up to
500 steps of GPU time, on every preemption. Instead the first signal is noted, the step under way finishes, its
checkpoint is saved and the run ends with TrainingInterrupted; under exact resume (loop.py) `--resume` then
goes on as if nothing had happened. The signal's own action is put back at once, so a second one acts as it
always did (Ctrl-C twice: stop now; what a killed save leaves, the next run removes). The processes of a
data-parallel run stop after the same step, whichever of them got the signal: a process stopping alone would
leave the others waiting in their next collective.

Handlers are only set from the main thread (Python's rule): a run started from another thread (a service)
keeps the process's own handling.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A context in which SIGINT and SIGTERM ask the loop to stop after the current step (see the module docstring)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                # None: set outside Python, and could not be put back; SIG_IGN: the process was started to ignore it
                # (a background job of a shell script ignores SIGINT), which a run must not undo
                if previous is not None and previous != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if self.signum:
            return
        self.signum = signum
        signal.signal(signum, self._previous.pop(signum))  # a second one acts at once
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        log.warning("%s: stopping after this step, once its checkpoint is saved (%s stops at once)",
                    signal.Signals(signum).name, again)

    def agreed(self, accelerator) -> int:
        """The signal that this step ends the run for, any process's (0: none). Every process calls this
        after every step of a data-parallel run."""
        if accelerator.num_processes == 1:
            return self.signum
        signums = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        return int(signums.max().item())
