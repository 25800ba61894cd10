"""Shared by the benchmarks: the peak resident memory of this process while code runs."""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """Sample this process's resident memory every ``interval`` s while in the block.

    Attributes (after the block): ``before`` and ``peak``, bytes.

    >>> with PeakRSS() as memory:
    ...     data = bytearray(50 * 2**20)
    >>> memory.peak >= memory.before
    True
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process, self.interval = psutil.Process(), interval
        self.before = self.peak = 0
        self._running, self._thread = False, None

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = self._process.memory_info().rss
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
