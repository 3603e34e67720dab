"""The fixed log-spaced duration buckets of the transaction rollup (`transaction_minutes`),
and percentiles read from bucket counts. Bucket k >= 1 holds durations in
[SMALLEST * 2**((k-1)/8), SMALLEST * 2**(k/8)) ms; bucket 0 what is shorter (0, negative).
A percentile is the geometric middle of the bucket its rank falls in, so it is within
2**(1/16) - 1 (4.4%) of the exact nearest-rank duration (at or above SMALLEST).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

PER_DOUBLING = 8
SMALLEST = 0.001  # ms (1 µs)
LARGEST_BUCKET = PER_DOUBLING * 48  # 2**48 µs is 9 years: longer durations share the last
ERROR_BOUND = 2 ** (1 / (2 * PER_DOUBLING)) - 1  # 0.0443


def bucket(duration: float | None) -> int:
    """The bucket of a duration (ms)."""
    if duration is None or not duration >= SMALLEST:  # also NaN
        return 0
    if math.isinf(duration):
        return LARGEST_BUCKET
    return min(1 + math.floor(PER_DOUBLING * math.log2(duration / SMALLEST)), LARGEST_BUCKET)


def value(index: int) -> float:
    """What a duration in bucket `index` is taken to be: the geometric middle of its bounds."""
    if index <= 0:
        return 0.0
    return SMALLEST * 2 ** ((index - 0.5) / PER_DOUBLING)


def percentiles(counts: dict[int, int],
                ps: Iterable[int] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99 ({"p50": ms, ...}) of the durations counted by bucket."""
    total = sum(counts.values())
    wanted = sorted(ps)
    out: dict[str, float | None] = {f"p{p}": None for p in wanted}
    if not total:
        return out
    ordered = sorted(counts.items())
    seen, i = 0, 0
    for p in wanted:
        rank = (total * p + 99) // 100
        while seen + ordered[i][1] < rank:
            seen += ordered[i][1]
            i += 1
        out[f"p{p}"] = value(ordered[i][0])
    return out
