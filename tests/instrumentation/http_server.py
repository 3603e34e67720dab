"""A small real HTTP server on 127.0.0.1 for the HTTP client instrumentation tests.

Routes: /ok (200), /error (500), /redirect (302 to /ok), /stream (a slow chunked body),
/headers (the request headers as JSON, names lower-cased), /close (200 with `Connection:
close`). Anything else: 404.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STREAM_CHUNKS = [b"one;", b"two;", b"three;"]
STREAM_DELAY = 0.05  # seconds between chunks: the body arrives after the headers

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # a caller's


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/ok":
            self._answer(200, b"ok")
        elif path == "/error":
            self._answer(500, b"boom")
        elif path == "/redirect":
            self._answer(302, b"", {"Location": "/ok"})
        elif path == "/close":
            self.close_connection = True
            self._answer(200, b"bye", {"Connection": "close"})
        elif path == "/headers":
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._answer(200, json.dumps(headers).encode(), {"Content-Type": "application/json"})
        elif path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            for chunk in STREAM_CHUNKS:
                time.sleep(STREAM_DELAY)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._answer(404, b"not found")

    do_POST = do_GET

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HTTPServer:
    """The server, started on a free port; `url(path)` gives a full URL to a route."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self.host, self.port = "127.0.0.1", self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/ok") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


    def __enter__(self) -> HTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_span(span: dict, server: HTTPServer, url: str, status: int | None = 200,
               outcome: str = "success", method: str = "GET") -> None:
    """The fields every HTTP exit span to `server` has (the receiver validated the schema)."""
    assert span["name"] == f"{method} 127.0.0.1:{server.port}"
    assert (span["type"], span["subtype"], span["action"]) == ("external", "http", method)
    assert span["outcome"] == outcome
    http = span["context"]["http"]
    assert http["url"] == url and http["method"] == method
    assert http.get("response", {}).get("status_code") == status
    # Where the call went, and what names the callee in service maps: `host:port`, also
    # when the port is the scheme's default.
    assert span["context"]["destination"] == {
        "address": "127.0.0.1", "port": server.port,
        "service": {"resource": f"127.0.0.1:{server.port}"}}
    target = {"type": "http", "name": f"127.0.0.1:{server.port}"}
    assert span["context"]["service"]["target"] == target


def run_script(code: str, receiver_url: str, server: HTTPServer) -> None:
    """Run `code` in a fresh interpreter with RECEIVER_URL and TARGET_URL (the /ok route) set;
    it must exit 0. Used to show that instrumenting before the library's import works."""
    prelude = textwrap.dedent("""
        import os, sys
        import beatlib
        client = beatlib.Client(service_name="before-import", server_url=os.environ[
            "RECEIVER_URL"], flush_interval="100ms", environ={})
        beatlib.instrument(client.config)
    """)
    env = {**os.environ, "RECEIVER_URL": receiver_url, "TARGET_URL": server.url("/ok")}
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def free_port() -> int:
    """A port nothing listens on (for connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
