"""User-facing errors.

Every `DiffrtError` message is one line that says what was expected, what was found and,
where there is one, the fix. The CLI prints it without a traceback and exits with status 2.
"""


class DiffrtError(Exception):
    """A problem with the user's input or environment, not a bug in diffrt."""


class BackendUnavailableError(DiffrtError):
    """The requested backend is unknown or its library is not installed."""


class ShapeOutOfRangeError(DiffrtError):
    """A request shape lies outside what a component (or its engine profile) accepts."""


class NonFiniteOutputError(DiffrtError):
    """A component produced NaN or inf."""


class ArtifactError(DiffrtError):
    """An artifact folder or file is missing, corrupt, stale or built for another machine."""


class LoraError(DiffrtError):
    """A LoRA file cannot be read or does not match the model."""


class DataError(DiffrtError):
    """A dataset folder or file is missing, empty or unreadable."""


class TrainingInterrupted(BaseException):
    """A training run stopped by SIGINT or SIGTERM after a step, with that step's checkpoint saved; `--resume`
    continues it. Not a DiffrtError (nothing was wrong), and, like KeyboardInterrupt, not an Exception: a sweep
    that skips failed runs with `except Exception` stops when asked to. The CLI prints its line and ends by the
    signal (a shell sees status 130 or 143). `quiet`: raised in a data-parallel run's other processes, whose line
    would repeat the main one's (the CLI prints none for them)."""

    def __init__(self, message: str, signum: int, step: int, quiet: bool = False):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.quiet = quiet
