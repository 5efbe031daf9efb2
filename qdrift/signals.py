"""SIGTERM as an exception, so that a killed run still cleans up.

Slurm (scancel, a job's time limit) and most schedulers stop a job with SIGTERM, whose default
action ends the process at once: no `finally` runs, the W&B run stays "running" forever and temp
files stay behind. Inside `terminate_on_sigterm()` the signal raises `Terminated` in the main
thread instead; it derives from SystemExit, so `except Exception` handlers let it pass, every
`finally` runs, and the process exits with 143 (128 + SIGTERM), as if the signal had killed it.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger("qdrift")


class Terminated(SystemExit):
    """The process got SIGTERM (exit code 143)."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


@contextmanager
def terminate_on_sigterm():
    """Turn the first SIGTERM into `Terminated`; later ones are ignored while the cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread only: nothing to install here
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if fired:
            log.warning("SIGTERM again: still cleaning up")
            return
        fired = True
        log.warning("SIGTERM: stopping the run; finished artifacts stay cached and a rerun resumes")
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
