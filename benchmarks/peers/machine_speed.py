#!/usr/bin/env python3
"""How fast this machine runs the same pure-Python work from one moment to the next.

    python machine_speed.py [SECONDS]        # default 60

Times a fixed loop (20,000 additions, about a millisecond) back to back for SECONDS and
prints the median time of each half-second, then the fastest and slowest half-second and
the share of half-seconds nearer the slow one. No agent, no app: what it shows is the
machine's own noise, which every figure of run_all.sh carries (results/noise_20261202.md).
"""

from __future__ import annotations

import statistics
import sys
import time


def work() -> int:
    total = 0
    for i in range(20000):
        total += i
    return total


def main(seconds: float) -> None:
    clock = time.perf_counter_ns
    series = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = clock()
        work()
        series.append((time.monotonic(), (clock() - start) / 1e3))
    first = series[0][0]
    buckets: dict[int, list[float]] = {}
    for at, us in series:
        buckets.setdefault(int((at - first) * 2), []).append(us)
    medians = [statistics.median(v) for _, v in sorted(buckets.items())]
    fast, slow = min(medians), max(medians)
    slow_share = sum(m > (fast + slow) / 2 for m in medians) / len(medians)
    print("half-second medians (us):", " ".join("%.0f" % m for m in medians))
    print("fastest %.0f us, slowest %.0f us (%.2fx), %.0f%% of half-seconds nearer the slowest"
          % (fast, slow, slow / fast, 100 * slow_share))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
