"""What capturing an error costs the thread that captures it: `capture_exception()` of an
exception raised 20 app frames deep, each frame with a few locals (numbers, text, a dict, a
list, an object with a repr). Nothing is sent (enabled=False): this is the calling thread's
share only; the worker's encoding is measured by the peer benchmark.

    python benchmarks/error_capture.py                 # this checkout
    PYTHONPATH=/path/to/other/src python benchmarks/error_capture.py   # another version

Prints one JSON line: microseconds per capture (best and median of 7 rounds of 300), with
the same raise and unwind without a capture subtracted.
"""

from __future__ import annotations

import json
import statistics
import time

import beatlib


class Order:
    def __init__(self, n: int) -> None:
        self.n = n
        self.lines = [{"sku": f"SKU-{i}", "qty": i} for i in range(5)]

    def __repr__(self) -> str:
        return f"<Order {self.n} with {len(self.lines)} lines>"


def descend(depth: int) -> None:
    order = Order(depth)  # noqa: F841
    note = f"step {depth} of the checkout"  # noqa: F841
    totals = {"net": depth * 10, "tax": depth * 2, "currency": "EUR"}  # noqa: F841
    seen = list(range(depth))  # noqa: F841
    if depth == 0:
        raise ValueError("card declined")
    descend(depth - 1)


def main() -> None:
    client = beatlib.Client(service_name="bench", enabled=False, service_version="1",
                            environ={})
    def run(capture: bool) -> float:
        start = time.perf_counter()
        for _ in range(300):
            try:
                descend(19)
            except ValueError:
                if capture:
                    client.capture_exception()
        return (time.perf_counter() - start) / 300 * 1e6

    plain, captured = [], []
    for _ in range(7):  # interleaved, so a slower moment of the machine hits both
        plain.append(run(False))
        captured.append(run(True))
    base = min(plain)
    print(json.dumps({"beatlib": beatlib.__file__, "raise_us": round(base, 1),
                      "capture_best_us": round(min(captured) - base, 1),
                      "capture_median_us": round(statistics.median(captured) - base, 1)}))


if __name__ == "__main__":
    main()
