"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, then ends with a resumable state.

Cluster schedulers send SIGTERM some time before they kill a job (pre-emption, time limit). The training loop
checks :attr:`StopRequest.signal` after every step and raises :class:`TrainingInterrupted`; the stage scripts
exit with :data:`INTERRUPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later"), distinct from success (0),
failures (1) and a kill by the signal itself (128 + signal number). A second SIGINT stops at once (Ctrl-C twice).
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

INTERRUPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """A stop signal ended the run between two steps; its message says how to resume."""


class StopRequest:
    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record SIGTERM/SIGINT in the yielded request instead of dying (main thread only; elsewhere a no-op)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        request.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
