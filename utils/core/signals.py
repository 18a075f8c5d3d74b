"""Graceful stop on SIGTERM / SIGINT: the work in progress ends resumable, and the process exits with code 75.

Cluster schedulers send SIGTERM some time before they kill a job (pre-emption, time limit). The stage scripts
and ``run_pipeline.py`` call :func:`record_stop_signals` first thing, before their imports (seconds), so a signal
at any moment of their life is caught: during the start-up nothing has been done yet and the process ends at once;
afterwards the signal is recorded in the process's :class:`StopRequest`, which the training loop, the extraction
and the KD-target writing check between steps and batches before raising :class:`TrainingInterrupted`. The
scripts then exit with :data:`INTERRUPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later"), distinct from
success (0), failures (1, 2) and a kill by the signal itself (128 + signal number). A second SIGINT stops at once
(Ctrl-C twice).
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

INTERRUPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """A stop signal ended a stage's work (training, extraction, KD targets) resumably; the message says how to
    continue."""


class StopRequest:
    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def raise_if_set(self, what: str) -> None:
        """Raise :class:`TrainingInterrupted` when a stop signal arrived: ``what`` stopped, nothing marked complete."""
        if self.signal is not None:
            raise TrainingInterrupted(f"{self.name}: {what} stopped before it completed; nothing of it is marked "
                                      f"complete; {continue_hint()}")


class _ProcessStop(StopRequest):
    def __init__(self, command: str) -> None:
        self.starting = True  # until startup_done(): nothing has been done, so a signal ends the process at once
        self.command = command  # this process's command line with resume=True

    def record(self, signum: int, frame: object) -> None:
        if self.starting:
            os.write(2, f"interrupted: {signal.Signals(signum).name} during start-up; nothing was done\n".encode())
            os._exit(INTERRUPTED_EXIT_CODE)
        self.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


_PROCESS: _ProcessStop | None = None


def record_stop_signals() -> None:
    """From now on SIGTERM/SIGINT are recorded for the whole process, not deadly (call it from a script's
    ``__main__`` before its heavy imports). Until :func:`startup_done` a signal ends the process with exit 75."""
    global _PROCESS
    _PROCESS = _ProcessStop(resume_command(sys.argv))
    for sig in STOP_SIGNALS:
        signal.signal(sig, _PROCESS.record)


def startup_done() -> None:
    """The process starts work that a signal must let finish resumably (no-op without :func:`record_stop_signals`)."""
    if _PROCESS is not None:
        _PROCESS.starting = False


def raise_if_stopped(what: str) -> None:
    """Raise :class:`TrainingInterrupted` when the process recorded a stop signal (no-op without the recorder)."""
    if _PROCESS is not None:
        _PROCESS.raise_if_set(what)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """The process's stop request when :func:`record_stop_signals` runs; otherwise SIGTERM/SIGINT are recorded in
    the yielded request instead of killing, for the duration (main thread only; elsewhere a no-op)."""
    if _PROCESS is not None:
        yield _PROCESS
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: object) -> None:
        request.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_command(argv: list[str]) -> str:
    """The command that continues the run of a script started as ``argv``: the same with ``resume=True``, under
    torchrun with this process's number of ranks per node when torchrun started it."""
    script, *args = argv
    args = [arg for arg in args if not arg.startswith("resume=")] + ["resume=True"]
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" in os.environ or world > 1:
        nodes = f" --nnodes={world // local} (with the same rendezvous options)" if world > local else ""
        return f"torchrun{nodes} --nproc-per-node={local} " + shlex.join([script, *args])
    return shlex.join(["python", script, *args])


def continue_hint() -> str:
    """How to continue: the exact command in a script that called :func:`record_stop_signals`."""
    if _PROCESS is None:
        return "run the same command with resume=True to continue"
    return f"to continue, run: {_PROCESS.command}"
