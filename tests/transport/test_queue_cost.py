"""queue() runs on the app's request thread: it must stay a few hundred nanoseconds."""

from __future__ import annotations

import time


def test_queue_is_cheap(make_transport, receiver):
    receiver.stop()  # measure queue() alone, not validating 100k events
    transport = make_transport(receiver, flush_interval="10s", max_queue_events=200_000)
    transport.queue(0)
    n = 100_000
    started = time.perf_counter()
    for i in range(1, n + 1):
        transport.queue(i)
    per_call = (time.perf_counter() - started) / n
    print(f"queue(): {per_call * 1e6:.2f} us per call")
    assert per_call < 5e-6  # measured ~0.4 us; generous for loaded CI machines
    transport.close(0.2)
    stats = transport.stats()
    assert stats["queued"] == n + 1 and stats["dropped_queue_full"] == 0
