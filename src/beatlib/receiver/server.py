"""The HTTP server: intake v2, server info and the dashboard on one port, and the
`beatlib serve` command line (`main`).

    receiver = Receiver(port=0, db_path="apm.sqlite3").start()   # port 0: any free port
    ... Client(server_url=receiver.url) ...
    receiver.flush(); receiver.stop()
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from beatlib.receiver import group_state, intake, otlp, ui
from beatlib.receiver.notify import FORMATS, Notifier, NotifyConfig, split_list
from beatlib.receiver.retention import Retention, parse_duration
from beatlib.receiver.store import Store, connect

logger = logging.getLogger("beatlib.receiver")

DEFAULT_PORT = 8200
DEFAULT_DB = "beatlib.sqlite3"
MAX_COMPRESSED_BODY = 32 * 1024 * 1024  # bytes read from the socket for one request
BODIES_AT_ONCE = 2  # request bodies read and decoded at the same time (memory: 64 MiB each)
BODY_WAIT = 10.0  # seconds a request waits for its turn before a 503
READ_TIMEOUT = 30.0  # seconds a connection may sit idle mid-request, as apm-server's


class Receiver:
    """Intake, writer and dashboard. `start()` returns self; `url` is the base URL to give a
    client (`server_url`); `dashboard_url` the page to open; `flush()` waits until every
    accepted event is in the database."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        db_path: str = DEFAULT_DB,
        secret_token: str | None = None,
        max_queue_events: int = 20_000,
        notify: NotifyConfig | None = None,
        retention: float | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.db_path = str(db_path)
        self.secret_token = secret_token or None
        # New and regressed error groups, told after the writer commits (None: not told).
        self.notifier = Notifier(notify, self.db_path, lambda: self.url) \
            if notify is not None and notify.enabled else None
        self.store = Store(self.db_path, max_queue_events=max_queue_events,
                           on_group_change=self.notifier.offer if self.notifier else None)
        # Deletes what is older than `retention` s in the background (None: keeps all).
        self.retention = Retention(self.db_path, retention) if retention else None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return self.url + ui.ROOT

    def start(self) -> Receiver:
        """Binds (OSError if the port is taken), starts the writer, serves on a thread."""
        server = _Server((self.host, self.port), _Handler, self)
        try:
            self.store.start()
        except BaseException:
            server.server_close()
            raise
        self.port = server.server_address[1]
        if self.notifier is not None:
            self.notifier.start()
        if self.retention is not None:
            self.retention.start()
        self._stopped.clear()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"beatlib-receiver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout: float | None = 10.0) -> bool:
        """True once everything accepted so far is stored (False after `timeout` s)."""
        return self.store.flush(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops listening, then stores what is queued (up to `timeout` s)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self.retention is not None:
            self.retention.stop(timeout)
        self.store.stop(timeout)
        if self.notifier is not None:
            self.notifier.stop(timeout)
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until `stop()` was called (True) or `timeout` passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> Receiver:
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, receiver: Receiver) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.receiver = receiver
        self.bodies = threading.BoundedSemaphore(BODIES_AT_ONCE)
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client going away is no news
            logger.exception("error serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as agents' connection pools expect
    server_version = "beatlib-receiver"
    timeout = READ_TIMEOUT
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    # --- routes -------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        receiver = self.server.receiver
        if url.path == "/":
            allowed = intake.authorized(self.headers.get("Authorization"), receiver.secret_token)
            self._answer(intake.server_info(allowed, receiver.store.health()))
        elif url.path == intake.INTAKE_PATH:
            self._answer(_error(400, "only POST is allowed on the intake endpoint"))
        elif url.path == ui.ROOT.rstrip("/") or url.path.startswith(ui.ROOT):
            query = dict(parse_qsl(url.query, keep_blank_values=False))
            page = ui.render(receiver.store, url.path, query)
            self._send(page.status, page.body, page.content_type, page.headers)
        else:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8")

    def _post(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/":
            self._answer(_error(405, "this is the server information endpoint; did you mean "
                                     "to send data to another endpoint instead?"))
            return
        if url.path.startswith(group_state.ACTION_PREFIX):
            self._group_action(url.path)
            return
        if url.path not in (intake.RELEASES_PATH, intake.INTAKE_PATH, *otlp.PATHS):
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8", close=True)
            return
        receiver = self.server.receiver
        if not intake.authorized(self.headers.get("Authorization"), receiver.secret_token):
            self._answer(intake.UNAUTHORIZED)  # before reading a byte of the body
            return
        # A bounded number of bodies in memory at once, whatever the number of clients.
        if not self.server.bodies.acquire(timeout=BODY_WAIT):
            self._answer(_error(503, "too many requests at once; retry later"))
            return
        try:
            body = self._read_body()
            if body is None:
                return
            if url.path in otlp.PATHS:
                reply = otlp.handle(url.path, body, self.headers, receiver.store.offer)
                self._send(reply.status, reply.body, reply.content_type, reply.headers,
                           close=reply.status >= 400)
                return
            if url.path == intake.RELEASES_PATH:
                self._answer(intake.handle_release(body, self.headers, receiver.secret_token,
                                                   receiver.store.offer))
                return
            verbose = "verbose" in dict(parse_qsl(url.query, keep_blank_values=True))
            self._answer(intake.handle_events(body, self.headers, receiver.secret_token,
                                              receiver.store.offer, verbose))
        finally:
            self.server.bodies.release()

    def _group_action(self, path: str) -> None:
        """POST /ui/errors/<service>/<key>/resolve|ignore|reopen from the dashboard's forms:
        refused cross-site (a page elsewhere must not change groups), then back to the group."""
        action = group_state.parse_action(path)
        if action is None:
            self._send(404, b"404 page not found\n", "text/plain; charset=utf-8", close=True)
            return
        if not group_state.same_origin(self.headers, self.headers.get("Host")):
            self._send(403, b"cross-site request refused\n", "text/plain; charset=utf-8",
                       close=True)
            return
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > group_state.MAX_FORM:
            self._send(400, b"form too large\n", "text/plain; charset=utf-8", close=True)
            return
        service, key, verb = action
        conn = connect(self.server.receiver.db_path, timeout=5.0)
        try:
            found = group_state.set_status(conn, service, key, verb,
                                      group_state.form_version(self.rfile.read(int(length))))
        finally:
            conn.close()
        if not found:
            self._send(404, b"no such error group\n", "text/plain; charset=utf-8")
            return
        self._send(303, b"", None, {"Location": group_state.group_page(service, key)})

    # --- plumbing -----------------------------------------------------------------------

    def _guarded(self, handle: Callable[[], None]) -> None:
        """A bug here answers 500; it never takes the server down."""
        try:
            handle()
        except (OSError, TimeoutError):
            self.close_connection = True
        except Exception:
            logger.exception("receiver error on %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._answer(_error(500, "internal error"))
            except OSError:
                pass

    def _read_body(self) -> bytes | None:
        """The request body (chunked or by Content-Length), None after answering 400."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, size = [], 0
            while True:
                try:
                    size_field = self.rfile.readline(64).split(b";")[0].strip()
                    if not size_field or not size_field.isalnum():  # no sign, no spaces
                        raise ValueError(size_field)
                    length = int(size_field, 16)
                except ValueError:
                    self._answer(_error(400, "invalid chunked encoding"))
                    return None
                size += length
                if size > MAX_COMPRESSED_BODY:
                    self._answer(_error(400, "request body too large"))
                    return None
                chunks.append(self.rfile.read(length))
                self.rfile.readline(64)
                if length == 0:
                    return b"".join(chunks)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._answer(_error(400, "invalid Content-Length"))
            return None
        if length > MAX_COMPRESSED_BODY:
            self._answer(_error(400, "request body too large"))
            return None
        return self.rfile.read(length)

    def _answer(self, answer: intake.Answer) -> None:
        if answer.body is None:
            self._send(answer.status, b"", None, answer.headers)
            return
        body = json.dumps(answer.body, indent=2).encode() + b"\n"
        # Errors close the connection, as apm-server does.
        self._send(answer.status, body, "application/json", answer.headers,
                   close=answer.status >= 400)

    def _send(self, status: int, body: bytes, content_type: str | None,
              headers: dict[str, str] | None = None, close: bool = False) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _error(status: int, message: str) -> intake.Answer:
    return intake.Answer(status, {"accepted": 0, "errors": [{"message": message}]})


def run(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    db_path: str = DEFAULT_DB,
    secret_token: str | None = None,
    ready: Callable[[Receiver], Any] | threading.Event | None = None,
    max_queue_events: int = 20_000,
    notify: NotifyConfig | None = None,
    retention: float | None = None,
) -> None:
    """Serves until Ctrl-C or SIGTERM (or `stop()` on the receiver given to `ready`, a
    callable; a threading.Event is set instead). Raises OSError if it cannot listen."""
    receiver = Receiver(host, port, db_path, secret_token, max_queue_events, notify,
                        retention).start()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
            target=receiver.stop, name="beatlib-receiver-sigterm").start())
    try:
        if isinstance(ready, threading.Event):
            ready.set()
        elif ready is not None:
            ready(receiver)
        while not receiver.wait(0.5):  # short waits: Ctrl-C is seen promptly
            pass
    except KeyboardInterrupt:
        pass
    finally:
        receiver.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """`beatlib serve` / `python -m beatlib.receiver`: exit code 0 after Ctrl-C or SIGTERM,
    1 when it cannot listen or open the database, 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="beatlib serve",
        description="A local APM server: Elastic APM intake v2 into SQLite, with a dashboard.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on "
                        "(default 127.0.0.1; the dashboard has no login)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}, as APM Server; 0: any free port)")
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help=f"SQLite database file (default {DEFAULT_DB})")
    parser.add_argument("--secret-token", default=None, metavar="TOKEN",
                        help="require 'Authorization: Bearer TOKEN' on intake")
    parser.add_argument("--max-queue-events", type=int, default=20_000, metavar="N",
                        help="events waiting for the database before intake answers 503")
    parser.add_argument("--retention", default=None, metavar="DURATION",
                        help="delete data older than this, in the background: a number and "
                        "s, m, h or d, e.g. 7d (default: BEATLIB_SERVE_RETENTION, else keep "
                        "everything)")
    _notify_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not 0 <= args.port <= 65535 or args.max_queue_events < 1:
        parser.print_usage(sys.stderr)
        print("beatlib serve: --port must be 0-65535 and --max-queue-events at least 1",
              file=sys.stderr)
        return 2
    retention_text = args.retention or os.environ.get("BEATLIB_SERVE_RETENTION") or None
    try:
        retention = parse_duration(retention_text) if retention_text else None
    except ValueError:
        parser.print_usage(sys.stderr)
        print(f"beatlib serve: --retention takes a number and a unit (s, m, h or d), such as "
              f"7d, not {retention_text!r}", file=sys.stderr)
        return 2
    notify, problem = _notify_config(args)
    if problem:
        parser.print_usage(sys.stderr)
        print(f"beatlib serve: {problem}", file=sys.stderr)
        return 2
    if not ui.available():
        print(f"beatlib serve: the dashboard needs Jinja2, which is not installed: "
              f"{ui.INSTALL_HINT}", file=sys.stderr)
        return 1
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def announce(receiver: Receiver) -> None:
        print(f"beatlib receiver on {receiver.url}\n"
              f"  intake:    {receiver.url}{intake.INTAKE_PATH}"
              f"{' (secret token required)' if receiver.secret_token else ''}\n"
              f"  dashboard: {receiver.dashboard_url}\n"
              f"  database:  {receiver.db_path}"
              f"{' (keeping ' + retention_text.strip() + ')' if retention_text else ''}\n"
              + (f"  notifying: {len(notify.webhooks)} webhook(s)"
                 f"{', e-mail via ' + notify.smtp if notify.smtp else ''}\n" if notify else "") +
              "Ctrl-C to stop.", flush=True)

    try:
        run(args.host, args.port, args.db, args.secret_token, announce, args.max_queue_events,
            notify, retention)
    except OSError as exc:
        print(f"beatlib serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"beatlib serve: cannot use the database {args.db}: {exc}", file=sys.stderr)
        return 1
    return 0


def _notify_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("notifications", "told once per new error group and "
                                      "once per regression (see docs/receiver.md)")
    group.add_argument("--notify-webhook", action="append", default=None, metavar="URL",
                       help="POST a notification to URL (repeatable; default: the URLs in "
                       "BEATLIB_SERVE_NOTIFY_WEBHOOK, separated by spaces or commas)")
    group.add_argument("--notify-format", choices=FORMATS, default="json",
                       help="webhook payload: json (generic, default) or slack (an incoming "
                       "webhook's text and blocks)")
    group.add_argument("--notify-smtp", default=None, metavar="HOST:PORT",
                       help="also send e-mail through this SMTP relay (plain SMTP, no login)")
    group.add_argument("--notify-email-to", action="append", default=None, metavar="ADDRESS",
                       help="recipient of the e-mails (repeatable; needed with --notify-smtp)")
    group.add_argument("--notify-email-from", default="beatlib@localhost", metavar="ADDRESS",
                       help="sender of the e-mails (default beatlib@localhost)")
    group.add_argument("--public-url", default=None, metavar="URL",
                       help="base URL the links in notifications use, when the dashboard is "
                       "reached under another address than the one it listens on")


def _notify_config(args: argparse.Namespace) -> tuple[NotifyConfig | None, str | None]:
    """The notification settings from the command line (and the environment), or a problem."""
    webhooks = args.notify_webhook or split_list(os.environ.get("BEATLIB_SERVE_NOTIFY_WEBHOOK"))
    for url in webhooks + ([args.public_url] if args.public_url else []):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return None, f"not an http(s) URL: {url!r}"
    email_to = [a for arg in args.notify_email_to or () for a in split_list(arg)]
    if args.notify_smtp:
        host, _, port = args.notify_smtp.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return None, f"--notify-smtp takes HOST:PORT, not {args.notify_smtp!r}"
        if not email_to:
            return None, "--notify-smtp needs --notify-email-to"
    elif email_to:
        return None, "--notify-email-to needs --notify-smtp"
    config = NotifyConfig(webhooks=webhooks, format=args.notify_format, smtp=args.notify_smtp,
                          email_to=email_to, email_from=args.notify_email_from,
                          public_url=args.public_url)
    return (config if config.enabled else None), None
