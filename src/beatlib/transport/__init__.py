"""Shipping events to the APM server in the background (intake v2, gzip NDJSON over HTTP).

`Transport` is the only public name; `worker.py` holds the queue and batching, `http.py` the
sending and retry rules.
"""

from beatlib.transport.worker import STAT_KEYS, Transport

__all__ = ["STAT_KEYS", "Transport"]
