"""Ctrl-C in a command: exit code 130, always (the CLI's main() runs every command inside `Interrupts`).

Python's own handling falls short in three ways, each seen in real runs: a KeyboardInterrupt that is lost (Python
drops one raised inside a __del__ or a weakref callback; a library may catch it) lets the command run on (an audit
saw `probe --grid` train on for minutes); one that arrives while the interpreter tears down, after its signal
handling is gone, kills the process by the signal (a shell shows 130, a parent process sees -2); one that stops an
import midway leaves a half-initialised module that fails the next import, so nothing is imported after a Ctrl-C
(the CLI's error printer imports nothing). Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

INTERRUPTED = "interrupted; finished shards and stored results are kept (re-run to continue)"
GRACE_S = 10.0  # after Ctrl-C, seconds a command has to stop cleanly before it is ended (the store is kill-safe)


class Interrupts:
    """Ctrl-C always ends a command with exit code 130. The first Ctrl-C raises KeyboardInterrupt (the command
    stops, keeping finished shards and results). Should it be lost, the command still exits 130, and ends after
    GRACE_S or at once on a second Ctrl-C: the store survives kill -9 at any instant, so ending hard is safe. Once
    the command has finished (on leaving the `with`), Ctrl-C is ignored: while the interpreter tears down (with torch
    loaded, a moment) Python would otherwise die by the signal, and the exit code must be the command's."""

    def __init__(self):
        self.received = False
        self.watchdog: threading.Timer | None = None

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.interrupt)
        return self

    def interrupt(self, signum, frame) -> None:
        if self.received:
            self.end()
        self.received = True
        self.watchdog = threading.Timer(GRACE_S, self.end)
        self.watchdog.daemon = True
        self.watchdog.start()
        raise KeyboardInterrupt

    @staticmethod
    def end() -> None:
        with contextlib.suppress(Exception):
            print(f"error: {INTERRUPTED}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        os._exit(130)

    def __exit__(self, *_) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
