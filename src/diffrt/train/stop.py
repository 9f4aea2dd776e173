"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a job scheduler's preemption, `docker stop`,
a Kubernetes eviction, torchrun passing either on).

Killed mid-step, a run loses every step since its last checkpoint: with --checkpoint-every 500 that is up to
500 steps of GPU time, on every preemption. Instead the first signal is noted, the step under way finishes, its
checkpoint is saved and the run ends with TrainingInterrupted; under exact resume (loop.py) `--resume` then
goes on as if nothing had happened. A signal during the last step or the saving of the result lets the run
finish and save it, and ends it with TrainingInterrupted all the same (a script that was Ctrl-C'd stops). The
processes of a data-parallel run stop after the same step, whichever of them got the signal (one stopping alone
would leave the others waiting in their next collective), and leave together once the main one has saved.

After the first signal, a SIGINT acts as it always did (Ctrl-C twice: stop now; what a killed save leaves, the
next run removes), and further SIGTERMs are ignored: launchers pass a signal on to processes that already got
it (torchrun forwards what it receives; a scheduler may signal the whole process group), and a second SIGTERM
killing the process mid-save would lose the checkpoint the first one asked for. A scheduler's SIGKILL, at the
end of its grace period, still ends the run.

Handlers are only set from the main thread (Python's rule), and never over a signal the process ignores (a
background job of a shell script starts with SIGINT ignored): a run started from another thread keeps the
process's own handling.
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
                if previous is not None and previous != signal.SIG_IGN:  # None: set outside Python, not restorable
                    self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if self.signum:
            log.info("%s ignored: the run is already stopping", signal.Signals(signum).name)
            return
        self.signum = signum
        if signal.SIGINT in self._previous:  # a Ctrl-C from now on stops at once
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
        log.warning("%s: the run stops after the step under way, once its checkpoint (at the last step: the result) "
                    "is saved; Ctrl-C stops it at once", signal.Signals(signum).name)

    def agreed(self, accelerator) -> int:
        """The signal that this step ends the run for, any process's (0: none). Every process calls this
        after every step of a data-parallel run."""
        if accelerator.num_processes == 1:
            return self.signum
        signums = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        return int(signums.max().item())
