"""Shared helpers of the benchmarks: alternate timing and peak resident memory."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from typing import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval`` s in a thread
    (torch releases the GIL in its kernels; large CPU buffers are unmapped when freed, so the
    sampled peak is the working set of the measured code)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.base)


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
              memory: bool = False, cpu_times: dict[str, list[float]] | None = None,
              ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Run every fn in turn, ``warmup + repeats`` rounds (the first ``warmup`` untimed), so
    machine load hits all of them alike. Returns wall times per name and, with ``memory``, the
    largest peak extra RSS per name (bytes); ``cpu_times`` (a dict) receives this process's CPU
    seconds per run (user + system, all threads: less sensitive to other processes' load)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, int] = {k: 0 for k in fns}
    if cpu_times is not None:
        cpu_times.update({k: [] for k in fns})
    for rnd in range(warmup + repeats):
        for name, fn in fns.items():
            meter = PeakRSS() if memory else None
            t0, c0 = time.perf_counter(), time.process_time()
            if meter:
                with meter:
                    fn()
            else:
                fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            print(f"  [{'warmup' if rnd < warmup else 'round'} {rnd}] {name}: {dt:.2f} s",
                  file=sys.stderr, flush=True)
            if rnd >= warmup:
                times[name].append(dt)
                if cpu_times is not None:
                    cpu_times[name].append(dc)
            if meter:
                peaks[name] = max(peaks[name], meter.peak)
    return times, peaks


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load() -> str:
    """The 1-minute load average and core count, to print beside timings."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
