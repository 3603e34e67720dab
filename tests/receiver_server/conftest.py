"""Fixtures for the `beatlib serve` receiver: a running receiver on a temporary database,
and small helpers to post intake bodies and read the dashboard."""

from __future__ import annotations

import gzip
import json
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beatlib.receiver import Receiver

METADATA = {"service": {"name": "shop", "version": "1.0",
                        "agent": {"name": "beatlib", "version": "0.1"}}}


def ndjson(*lines: Any, metadata: dict[str, Any] | None = METADATA) -> bytes:
    """An intake body: the metadata line, then each (kind, event) or raw bytes line."""
    out = [json.dumps({"metadata": metadata}).encode()] if metadata is not None else []
    for line in lines:
        out.append(line if isinstance(line, bytes) else json.dumps({line[0]: line[1]}).encode())
    return b"\n".join(out) + b"\n"


def compress(body: bytes, encoding: str) -> bytes:
    return {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding, bytes)(body)


def post(url: str, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/intake/v2/events", timeout: float = 10.0) -> tuple[int, Any]:
    """(status, parsed JSON body or None)."""
    request = urllib.request.Request(url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/x-ndjson",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, json.loads(raw) if raw else None


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0
        ) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def transaction(n: int, duration: float = 10.0, name: str = "GET /orders", **extra: Any
                ) -> tuple[str, dict[str, Any]]:
    event = {"id": f"{n:016x}", "trace_id": f"{n:032x}", "type": "request", "name": name,
             "duration": duration, "timestamp": time.time_ns() // 1000, "outcome": "success",
             "result": "HTTP 2xx", "span_count": {"started": 0}, **extra}
    return "transaction", event


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Receiver]:
    receiver = Receiver(port=0, db_path=str(tmp_path / "apm.sqlite3")).start()
    try:
        yield receiver
    finally:
        receiver.stop()
