"""Ctrl-C and SIGTERM during training: the first asks to stop (and save), a second one kills."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def stop_requests():
    """Turns the first SIGINT or SIGTERM into a request to stop (a list that gets the signal
    number; the training loop saves and exits between steps). A second one kills the process at
    once: the handlers go back to the default action."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
