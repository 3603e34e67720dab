"""A strict OTLP/HTTP JSON receiver for tests: a real HTTP server on loopback that takes
/v1/traces, /v1/logs and /v1/metrics, decodes every body with opentelemetry-proto's
json_format into the official Export*ServiceRequest messages (unknown fields refused) and
records what it got. It answers 200 {} unless told otherwise (`respond_with`).

OTLP/JSON writes trace and span ids as hex where the standard proto3 JSON mapping (which
json_format implements) has base64: ids are checked as hex of the right length and turned
into base64 before parsing, the one deviation the OTLP spec makes.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

MESSAGES = {"/v1/traces": ExportTraceServiceRequest, "/v1/logs": ExportLogsServiceRequest,
            "/v1/metrics": ExportMetricsServiceRequest}


_ID_LENGTHS = {"traceId": 32, "spanId": 16, "parentSpanId": 16}
_HEX = re.compile(r"[0-9a-fA-F]*")


def hex_ids_as_base64(node: Any) -> Any:
    """The JSON tree with every trace/span id (hex, checked) in proto3 JSON's base64."""
    if isinstance(node, list):
        return [hex_ids_as_base64(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _ID_LENGTHS:
            assert isinstance(value, str) and _HEX.fullmatch(value), (key, value)
            assert len(value) == _ID_LENGTHS[key] or (key == "parentSpanId" and not value)
            assert value.strip("0") or not value, f"{key} all zero"
            out[key] = base64.b64encode(bytes.fromhex(value)).decode()
        else:
            out[key] = hex_ids_as_base64(value)
    return out


class Collector:
    """See the module docstring; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []  # path, headers, json, message
        self.problems: list[str] = []  # bodies that did not decode
        self._answers: list[tuple[str, int, bytes, dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def respond_with(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
                     times: int = 1, path: str = "/v1/traces") -> None:
        """The next `times` requests to `path` get this answer (then 200 {} again)."""
        data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        for _ in range(times):
            self._answers.append((path, status, data, headers or {}))

    def _answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            for answer in self._answers:
                if answer[0] == path:
                    self._answers.remove(answer)
                    return answer[1:]
        return 200, b"{}", {}

    def messages(self, path: str) -> list[Any]:
        """The decoded messages of every accepted request to `path`."""
        with self._lock:
            return [r["message"] for r in self.requests
                    if r["path"] == path and r["accepted"] and "message" in r]

    def spans(self) -> list[Any]:
        return [sp for m in self.messages("/v1/traces") for rs in m.resource_spans
                for ss in rs.scope_spans for sp in ss.spans]

    def log_records(self) -> list[Any]:
        return [lr for m in self.messages("/v1/logs") for rl in m.resource_logs
                for sl in rl.scope_logs for lr in sl.log_records]

    def metrics(self) -> list[Any]:
        return [mt for m in self.messages("/v1/metrics") for rm in m.resource_metrics
                for sm in rm.scope_metrics for mt in sm.metrics]

    def wait_for(self, what: str, n: int, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(getattr(self, what)()) >= n:
                return True
            time.sleep(0.02)
        return False

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                collector._take(self.path, dict(self.headers.items()), body)
                status, data, headers = collector._answer(self.path)
                with collector._lock:
                    collector.requests[-1]["accepted"] = status == 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _take(self, path: str, headers: dict[str, str], body: bytes) -> None:
        record: dict[str, Any] = {"path": path, "headers": headers, "accepted": False}
        try:
            assert headers.get("Content-Type") == "application/json", headers
            assert headers.get("Content-Encoding") == "gzip", headers
            raw = gzip.decompress(body)
            record["json"] = json.loads(raw)
            record["message"] = json_format.ParseDict(hex_ids_as_base64(record["json"]),
                                                      MESSAGES[path]())
        except Exception as exc:
            with self._lock:
                self.problems.append(f"{path}: {exc!r}")
        with self._lock:
            self.requests.append(record)
