"""The progress line of training: tqdm's bar on a terminal, plain lines in a log."""
from __future__ import annotations

import sys
import time


class Progress:
    """tqdm's bar on a terminal; elsewhere (a log file, CI) a plain line every few seconds, so
    that logs hold no carriage returns."""

    def __init__(self, total, desc, enabled, initial=0, interval=5.0):
        self.total, self.desc, self.n, self.interval = total, desc, initial, interval
        self.enabled, self.last = enabled, time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)

    def update(self, **stats):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update()
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            print(f"{self.desc}: step {self.n}/{self.total}, " + ", ".join(f"{k} {v}" for k, v in stats.items()),
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
