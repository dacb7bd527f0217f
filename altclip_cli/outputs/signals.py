"""Critical sections that Ctrl-C and SIGTERM cannot split.

Blocking the signals with pthread_sigmask is not enough: the mask is per thread, the kernel
hands a process-directed signal to any thread that does not block it (an OpenMP worker, a
decode thread), and Python then runs its handler in the main thread, in the middle of the
section. A Python-level handler, in contrast, always runs in the main thread: inside the
section it only records the signal, and the signal is raised again once the section is over,
so the previous handler (KeyboardInterrupt, the run's SIGTERM handler, or the default action)
acts on it then.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends. In a thread
    other than the main one (where handlers cannot be installed) this is a no-op: signals are
    handled in the main thread, which is then not inside this block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum, frame):
        pending.append(signum)

    previous = {}
    try:
        for signum in DEFERRED:
            previous[signum] = signal.signal(signum, record)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])  # now handled as it would have been


class sigterm_as_interrupt:
    """For a run in the main thread: SIGTERM raises KeyboardInterrupt, so a stopped run keeps its
    partial output the same way as after Ctrl-C; `received` tells the two apart afterwards."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    def _handler(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
