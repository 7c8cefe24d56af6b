"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (what torchrun and batch
schedulers send): the step in progress finishes, a checkpoint is written, and
:class:`TrainingInterrupted` is raised. A second signal interrupts at once, as usual.

A signal arriving inside ``optimizer.step()`` must not leave half-updated weights behind a
checkpoint that claims the step is done; so the handler only sets a flag, and the loop looks
at it between steps.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after ``step`` steps; ``checkpoint`` is the folder saved
    then (resume from it), or None when nothing could be saved."""

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"training interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Context manager: while active, the first SIGINT/SIGTERM sets ``requested``; the
    second restores the previous handlers and raises KeyboardInterrupt. Outside the main
    thread (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
