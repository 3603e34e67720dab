"""An in-memory sender: what would have gone to the APM server, kept as decoded events.

For tests and for trying beatlib without a server: `Client(sender=MemorySender())`, then
`sender.events("transaction")`. The same batching, gzip and processors run as with HTTP.
With exporter="otlp", `sender.otlp(signal)` gives the decoded OTLP requests.
"""

from __future__ import annotations

import gzip
import json
import threading
from typing import Any

from beatlib.transport.http import Verdict


class MemorySender:
    """Takes every batch (answers like a server that accepts all) and keeps its lines."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bodies: list[bytes] = []  # the raw request bodies (gzip), in order
        self.signals: list[int | None] = []  # OTLP: each body's signal; None for intake

    def send(self, body: bytes, timeout: float | None = None, signal: int | None = None
             ) -> tuple[Verdict, float | None]:
        with self._lock:
            self.bodies.append(body)
            self.signals.append(signal)
        return Verdict.SENT, None

    def otlp(self, signal: int) -> list[dict[str, Any]]:
        """The OTLP requests of `signal` (protocol.otlp.TRACES, LOGS, METRICS), decoded."""
        with self._lock:
            sent = list(zip(self.signals, self.bodies, strict=True))
        return [json.loads(gzip.decompress(body)) for s, body in sent if s == signal]

    def reset_pool(self) -> None:
        """Nothing to reset after a fork: there are no sockets."""

    def raw(self) -> bytes:
        """Every byte the server would have received, decompressed, requests joined."""
        with self._lock:
            bodies = list(self.bodies)
        return b"".join(gzip.decompress(body) for body in bodies)

    def events(self, kind: str | None = None) -> list[Any]:
        """The events received, in order: `(kind, event)` pairs, or only the events of `kind`."""
        out = []
        for line in self.raw().splitlines():
            ((k, event),) = json.loads(line).items()
            if kind is None:
                out.append((k, event))
            elif k == kind:
                out.append(event)
        return out

    def clear(self) -> None:
        with self._lock:
            self.bodies.clear()
            self.signals.clear()
