"""Memory while the APM server is away: RSS growth over N transactions (3 spans each) sent to
a port nobody listens on, against the configured buffer bound.

    python benchmarks/memory_outage.py [--transactions 100000] [--max-buffer-size 32mb]

Target (issue 6): growth <= max_buffer_size + 10 MB.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time

import beatlib


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--max-buffer-size", default="32mb")
    args = parser.parse_args()
    client = beatlib.Client(service_name="memory-bench", flush_interval="1s",
                            server_url=f"http://127.0.0.1:{closed_port()}",
                            max_buffer_size=args.max_buffer_size)
    bound = client.config.max_buffer_size
    # Warm up (imports, caches, the worker thread) before the baseline.
    for _ in range(200):
        client.begin_transaction("request")
        client.end_transaction("warm")
    time.sleep(1.5)
    gc.collect()
    before = rss_bytes()
    peak = before
    started = time.perf_counter()
    for i in range(args.transactions):
        client.begin_transaction("request")
        beatlib.label(order=i)
        for name in ("SELECT FROM orders", "GET api.internal", "orders.html"):
            with beatlib.capture_span(name, "db"):
                pass
        client.end_transaction(f"GET /orders/{i % 20}", "HTTP 2xx")
        if i % 5000 == 0:
            peak = max(peak, rss_bytes())
    elapsed = time.perf_counter() - started
    time.sleep(2.5)  # the worker encodes what is still queued into (bounded) batches
    gc.collect()
    after = rss_bytes()
    peak = max(peak, after)
    stats = client.transport.stats()
    mb = 1024 * 1024
    print(f"transactions: {args.transactions} in {elapsed:.1f}s; max_buffer_size {bound / mb:.1f} MB")
    print(f"RSS before {before / mb:.1f} MB, after {after / mb:.1f} MB, peak {peak / mb:.1f} MB")
    print(f"growth {(after - before) / mb:.1f} MB (peak {(peak - before) / mb:.1f} MB); "
          f"target <= {bound / mb + 10:.1f} MB")
    print(f"buffered {stats['buffered_bytes'] / mb:.1f} MB; dropped_buffer_full "
          f"{stats['dropped_buffer_full']}, dropped_queue_full {stats['dropped_queue_full']}, "
          f"backpressure_waits {stats['backpressure_waits']}")
    client.close(0.5)


if __name__ == "__main__":
    main()
