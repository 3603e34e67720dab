"""A validating intake v2 receiver for tests: a real HTTP server on loopback that decompresses,
splits NDJSON, checks every line against the shared JSON schemas and records what it got.

It can also misbehave on request (error answers, hanging, connection resets, being down).
Run `python tests/receiver.py --port 8200` to watch what a program sends.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

KINDS = ("metadata", "transaction", "span", "error", "metricset")
INTAKE_PATH = "/intake/v2/events"

_validators: dict[str, Draft7Validator] = {}


def specs_dir() -> Path:
    env = os.environ.get("BEATLIBTEST_SPECS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "specs" / "elastic-apm-intake-v2"


def validator(kind: str) -> Draft7Validator:
    if kind not in _validators:
        schema = json.loads((specs_dir() / f"{kind}.json").read_text())
        _validators[kind] = Draft7Validator(schema)
    return _validators[kind]


def decompress(body: bytes, encoding: str) -> bytes:
    """As apm-server does: by Content-Encoding, else by sniffing the first bytes."""
    if encoding == "gzip" or (not encoding and body[:2] == b"\x1f\x8b"):
        return gzip.decompress(body)
    if encoding == "deflate" or (not encoding and body and body[0] & 0x0F == 8):
        return zlib.decompress(body)
    return body


class Receiver:
    """See the module docstring. All public methods are thread-safe."""

    def __init__(self, port: int = 0, secret_token: str | None = None,
                 api_key: str | None = None, verbose: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.secret_token = secret_token
        self.api_key = api_key
        self.verbose = verbose
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._scripted: list[dict[str, Any]] = []  # respond_with() answers, in order
        self._hang: tuple[float, int | None] | None = None
        self._reset: int | None = 0  # connections still to reset; None = all
        self.clear()

    # --- state ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def clear(self) -> None:
        """Forgets everything received (not the failure modes)."""
        with self._cond:
            self._events: list[tuple[str, dict[str, Any]]] = []
            self.metadata: list[dict[str, Any]] = []
            self.requests: list[dict[str, Any]] = []
            self.invalid: list[tuple[str, str]] = []

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The inner objects of all accepted lines of `kind` (all kinds but metadata if None)."""
        with self._cond:
            return [event for k, event in self._events if kind is None or k == kind]

    def received(self) -> bytes:
        """Every request body received, decompressed, in order: what a leak would be in."""
        with self._cond:
            return b"".join(r.get("raw", b"") for r in self.requests)

    def wait_for(self, kind: str, n: int, timeout: float = 10.0) -> bool:
        """Waits until at least `n` events of `kind` arrived."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events(kind)) >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> bool:
        """Waits until at least `n` requests were answered (whatever the answer)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    # --- failure modes ----------------------------------------------------------------

    def respond_with(self, status: int, body: bytes | str | dict[str, Any] | None = None,
                     headers: dict[str, str] | None = None, times: int | None = None) -> None:
        """Answers the next `times` intake requests (all, if None) with `status`, recording
        nothing. Calls queue up: respond_with(503, times=2); respond_with(429, times=1)."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        with self._cond:
            self._scripted.append({"status": status, "body": body or b"",
                                   "headers": headers or {}, "times": times})

    def hang(self, seconds: float, times: int | None = None) -> None:
        """The next `times` requests (all if None) get no answer for `seconds`; then the
        connection is closed and nothing is recorded (a stuck server). hang(0) ends it."""
        with self._cond:
            self._hang = (seconds, times) if seconds > 0 else None

    def reset_connections(self, enabled: bool = True, times: int | None = None) -> None:
        """Resets (TCP RST) the next `times` requests' connections (all if None)."""
        with self._cond:
            self._reset = times if enabled else 0

    def behave(self) -> None:
        """Back to answering normally."""
        with self._cond:
            self._scripted.clear()
            self._hang = None
            self._reset = 0

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Receiver:
        """Starts serving; after stop(), on the same port again."""
        receiver = self

        class Handler(_Handler):
            pass

        Handler.receiver = receiver
        server = _Server((self.host, self.port), Handler)
        server.receiver = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"receiver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening and closes open connections: the server is gone."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> Receiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- called by the handler --------------------------------------------------------

    def _take(self, attr: str) -> Any:
        """The failure mode for this request, counting down its `times`."""
        with self._cond:
            if attr == "reset":
                if self._reset == 0:
                    return None
                if self._reset is not None:
                    self._reset -= 1
                return True
            if attr == "hang":
                if self._hang is None:
                    return None
                seconds, times = self._hang
                if times is not None:
                    self._hang = (seconds, times - 1) if times > 1 else None
                return seconds
            if not self._scripted:
                return None
            answer = self._scripted[0]
            if answer["times"] is not None:
                answer["times"] -= 1
                if answer["times"] <= 0:
                    self._scripted.pop(0)
            return answer

    def _record(self, request: dict[str, Any], lines: list[tuple[str, dict[str, Any]]],
                invalid: list[tuple[str, str]]) -> None:
        with self._cond:
            self.requests.append(request)
            for kind, event in lines:
                if kind == "metadata":
                    self.metadata.append(event)
                else:
                    self._events.append((kind, event))
            self.invalid.extend(invalid)
            self._cond.notify_all()
        if self.verbose:
            counts = Counter(kind for kind, _ in lines)
            summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "empty"
            print(f"{time.strftime('%H:%M:%S')} {request['status']} "
                  f"{request['compressed_size']}B gzip: {summary}", flush=True)
            for line, error in invalid:
                print(f"  INVALID {error}: {line[:200]}", flush=True)


def check_body(raw: bytes) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
    """Splits and validates an NDJSON body: (valid (kind, event) pairs, (line, error) pairs)."""
    valid: list[tuple[str, dict[str, Any]]] = []
    invalid: list[tuple[str, str]] = []
    lines = [line for line in raw.split(b"\n") if line.strip()]
    for i, line in enumerate(lines):
        text = line.decode("utf-8", "replace")
        try:
            obj = json.loads(line)
        except ValueError as exc:
            invalid.append((text, f"invalid JSON: {exc}"))
            continue
        if not isinstance(obj, dict) or len(obj) != 1:
            invalid.append((text, "a line must be an object with exactly one key"))
            continue
        ((kind, event),) = obj.items()
        if (i == 0) != (kind == "metadata"):
            message = ("the first line must be metadata" if i == 0
                       else "metadata is allowed only on the first line")
            invalid.append((text, message))
            continue
        if kind not in KINDS:
            invalid.append((text, f"did not recognize object type: {kind!r}"))
            continue
        errors = sorted(validator(kind).iter_errors(event), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path)
            invalid.append((text, f"{kind} {where}: {errors[0].message}"))
        else:
            valid.append((kind, event))
    return valid, invalid


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away or we reset it on purpose
            return
        # A bug in the receiver must fail the test, not scroll by on stderr.
        with self.receiver._cond:
            self.receiver.invalid.append(("<receiver>", traceback.format_exc()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the transport's pool expects
    receiver: Receiver

    def setup(self) -> None:
        super().setup()
        with self.receiver._cond:
            self.receiver._connections.add(self.connection)

    def finish(self) -> None:
        with self.receiver._cond:
            self.receiver._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        body = b"" if self.path != "/" else json.dumps({"version": "8.99.0"}).encode()
        self._answer(200 if self.path == "/" else 404, body, {"Content-Type": "application/json"})

    def do_POST(self) -> None:
        receiver = self.receiver
        if receiver._take("reset"):
            # SO_LINGER 0 makes close() send a RST instead of a FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        body = self._read_body()
        if self.path.split("?")[0] != INTAKE_PATH:
            self._answer(404, b"404 page not found\n")
            return
        seconds = receiver._take("hang")
        if seconds is not None:
            time.sleep(seconds)
            self.close_connection = True
            return
        request = {"headers": dict(self.headers), "compressed_size": len(body), "raw_size": 0,
                   "status": 0, "time": time.monotonic()}
        auth = self.headers.get("Authorization", "")
        expected = ([f"Bearer {receiver.secret_token}"] if receiver.secret_token else []) + (
            [f"ApiKey {receiver.api_key}"] if receiver.api_key else [])
        if expected and auth not in expected:
            request["status"] = 401
            receiver._record(request, [], [])
            self._error(401, {"error": "authentication failed: missing or invalid credentials"})
            return
        scripted = receiver._take("scripted")
        if scripted is not None:
            request["status"] = scripted["status"]
            receiver._record(request, [], [])
            self._answer(scripted["status"], scripted["body"], scripted["headers"], close=True)
            return
        try:
            raw = decompress(body, self.headers.get("Content-Encoding", ""))
        except (OSError, zlib.error, EOFError) as exc:
            request["status"] = 400
            receiver._record(request, [], [(repr(body[:100]), f"decompression failed: {exc}")])
            self._error(400, {"accepted": 0, "errors": [{"message": str(exc)}]})
            return
        request["raw_size"] = len(raw)
        request["raw"] = raw
        content_type = self.headers.get("Content-Type")
        if content_type is not None and "application/x-ndjson" not in content_type:
            request["status"] = 400
            error = f"invalid content type: {content_type!r}"
            receiver._record(request, [], [("", error)])
            self._error(400, {"accepted": 0, "errors": [{"message": error}]})
            return
        valid, invalid = check_body(raw)
        request["status"] = 400 if invalid else 202
        request["events"] = len(valid)
        receiver._record(request, valid, invalid)
        if invalid:
            accepted = sum(1 for kind, _ in valid if kind != "metadata")
            errors = [{"message": msg, "document": line} for line, msg in invalid[:5]]
            self._error(400, {"accepted": accepted, "errors": errors})
        else:
            self._answer(202, b"")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _error(self, status: int, body: dict[str, Any]) -> None:
        self._answer(status, json.dumps(body, indent=2).encode(),
                     {"Content-Type": "application/json"}, close=True)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                close: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        if close:  # as apm-server does on errors
            self.send_header("Connection", "Close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description="A validating APM intake v2 test receiver.")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--secret-token")
    args = parser.parse_args()
    receiver = Receiver(port=args.port, secret_token=args.secret_token, verbose=True).start()
    print(f"listening on {receiver.url}{INTAKE_PATH} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        counts = Counter(kind for kind, _ in receiver._events)
        print(f"\nreceived {len(receiver.requests)} requests: "
              + (", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no events")
              + f"; {len(receiver.invalid)} invalid lines")


if __name__ == "__main__":
    main()
