"""Watching a process tree from outside: peak memory and bytes written (tests and benchmarks)."""

from __future__ import annotations

import threading
import time

import psutil


class TreeMonitor:
    """Watches a child process and all its descendants: the peak of their summed RSS (polled), and
    the bytes they caused to be written to storage.

    ``write_bytes`` is read from this process's own /proc/self/io after the child was waited for:
    Linux adds a reaped child's I/O counters to its parent's, so once the whole tree has exited it
    is all counted here, once (summing the live processes instead counts the workers twice, since
    their parent absorbs their counters when they exit).
    """

    def __init__(self, pid: int, interval: float = 0.05):
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.write_bytes = 0
        self._start = psutil.Process().io_counters().write_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
            time.sleep(self.interval)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        """Call after the child was waited for (``communicate``/``wait``)."""
        self._stop.set()
        self._thread.join()
        self.write_bytes = psutil.Process().io_counters().write_bytes - self._start
