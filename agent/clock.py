"""Kernel monotonic time to wall-clock time, in one place.

BPF timestamps come from ``bpf_ktime_get_ns()`` (CLOCK_MONOTONIC). Records and
spans carry Unix-epoch nanoseconds. The offset between the two clocks is
measured at start and re-measured periodically (NTP slews the wall clock);
every conversion in the agent goes through :class:`Clock`.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """Converts CLOCK_MONOTONIC ns to Unix ns. Thread-safe."""

    def __init__(self, resync_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._resync_ns = int(resync_s * 1e9)
        self._offset = 0
        self._measured_at = 0
        self.resync()

    def resync(self) -> None:
        # Bracket the wall-clock read with two monotonic reads and keep the
        # tightest of a few tries, so the offset error stays well under 1 µs.
        best = None
        for _ in range(5):
            m0 = time.monotonic_ns()
            w = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, w - (m0 + m1) // 2, m1)
        assert best is not None
        with self._lock:
            self._offset = best[1]
            self._measured_at = best[2]

    def to_unix_ns(self, mono_ns: int) -> int:
        return mono_ns + self._offset

    def maybe_resync(self) -> None:
        """Re-measure the offset when it is older than ``resync_s`` (the
        pipeline calls this once a second, off the per-record path)."""
        if time.monotonic_ns() - self._measured_at > self._resync_ns:
            self.resync()

    @staticmethod
    def now_mono_ns() -> int:
        return time.monotonic_ns()
