"""WSGI: `BeatMiddleware` for any WSGI app, and the request handling every web integration
shares: a transaction per request (continuing an incoming `traceparent`), the request and
response context, the result, errors captured with the request, and the end of the
transaction when the response body is closed (so streaming responses are timed whole).
"""

from __future__ import annotations

import functools
import io
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote

from beatlib.client import Client, get_client
from beatlib.config import Config
from beatlib.context import get_active, set_active
from beatlib.guard import guard, report
from beatlib.instrumentation.registry import instrument
from beatlib.sanitize import REDACTED, wildcard_matcher
from beatlib.tracing import Transaction, parse_traceparent

BODY_LIMIT = 64 * 1024  # bytes of a request body kept; longer bodies are not read ahead
_FORM = "application/x-www-form-urlencoded"
_ignore_matchers: dict[tuple[str, ...], Callable[[str], bool] | None] = {}
# What request_context computes again and again for the same input (bounded): header names
# from environ keys (few: once full, new ones are not kept), parsed Cookie headers (emptied
# when full: they come and go with sessions).
_HEADER_NAMES: dict[str, str] = {}
_COOKIES: dict[str, dict[str, str] | None] = {}
_KEPT = 512
_COOKIE_KEPT = 4096  # characters of a Cookie header kept parsed, at most
_QUOTED = re.compile(r"[A-Za-z0-9_.~/%;:@&=+$,!*()-]*")  # what `_quote_path` leaves as it is


def ignored(path: str, config: Config) -> bool:
    """Whether `transaction_ignore_urls` matches `path`: wildcards as for field names (`*`
    only, case-insensitive unless the pattern starts with `(?-i)`), e.g. /health*."""
    globs = config.transaction_ignore_urls
    if not globs:
        return False
    if globs not in _ignore_matchers:
        _ignore_matchers[globs] = wildcard_matcher(globs)
    match = _ignore_matchers[globs]
    return match is not None and match(path)


def run_in(segment: Any, function: Callable[[], Any]) -> Any:
    """`function()` with `segment` (if any) active, then what was active before."""
    previous = set_active_for(segment)
    try:
        return function()
    finally:
        set_active(previous)


def set_active_for(segment: Any) -> Any:
    """Make `segment` (if any) the active one; returns what was active, to put back."""
    previous = get_active()
    if segment is not None:
        set_active(segment)
    return previous


def _path(environ: dict[str, Any]) -> str:
    # WSGI hands the path over as latin-1 decoded bytes; browsers send UTF-8.
    raw = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if raw.isascii():
        return raw
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def begin_request(
    client: Client, environ: dict[str, Any], name: str | None = None
) -> Transaction | None:
    """Begin the request's transaction (None when its path is ignored)."""
    if client.config.transaction_ignore_urls and ignored(_path(environ), client.config):
        return None
    parent = parse_traceparent(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_TRACESTATE"))
    tx = client.begin_transaction("request", parent, environ.get("HTTP_BAGGAGE"))
    tx.name = name or environ.get("REQUEST_METHOD", "GET")
    record_request(tx, environ, client.config)
    return tx


# What `request_context` reads of an environ besides the HTTP_* headers.
_REQUEST_KEYS = frozenset((
    "wsgi.url_scheme", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
    "REQUEST_METHOD", "REMOTE_ADDR", "SERVER_PROTOCOL", "CONTENT_TYPE", "CONTENT_LENGTH",
    "beatlib.body",
))


# The keys `request_context` reads of each environ layout (its keys in order) seen: a server
# makes the same few layouts again and again (once full, new ones are not kept).
_READ_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _read_keys(environ: dict[str, Any]) -> tuple[str, ...]:
    layout = tuple(environ)
    keys = _READ_KEYS.get(layout)
    if keys is None:
        keys = tuple(key for key in layout if key[:5] == "HTTP_" or key in _REQUEST_KEYS)
        if len(_READ_KEYS) < _KEPT:
            _READ_KEYS[layout] = keys
    return keys


def record_request(tx: Transaction, environ: dict[str, Any], config: Config) -> None:
    """Set `tx`'s request context from `environ` as it is now (again when it changed: a body
    that arrived later)."""
    if tx.sampled:
        # Built on the worker thread from a copy of the keys it reads. Not the whole environ:
        # its objects (the framework's request, the input stream, our own state, which holds
        # `tx`) would keep the request's object graph alive in a cycle until the cyclic
        # collector, which then runs more often, on the app's threads.
        keys = _read_keys(environ)
        snapshot = dict(zip(keys, map(environ.__getitem__, keys), strict=True))
        context = tx.context
        if context is None:
            tx.context = context = {}
        context["request"] = functools.partial(request_context, snapshot, config, False)


def request_context(environ: dict[str, Any], config: Config, for_error: bool) -> dict[str, Any]:
    """The intake `context.request` of a WSGI environ (redacted and cut later, on the worker);
    with the body read by `read_body` when `capture_body` asks for it here."""
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    hostname, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    port = port or str(environ.get("SERVER_PORT", ""))
    path = _path(environ)
    query = environ.get("QUERY_STRING", "")
    full = f"{scheme}://{host}{path if _QUOTED.fullmatch(path) else _quote_path(path)}"
    url: dict[str, Any] = {"full": f"{full}?{query}" if query else full, "protocol": scheme + ":",
                           "hostname": hostname, "pathname": path}
    if port.isdigit():
        url["port"] = int(port)
    if query:
        url["search"] = "?" + query
    context: dict[str, Any] = {
        "method": environ.get("REQUEST_METHOD", "GET"),
        "url": url,
        "socket": {"remote_address": environ.get("REMOTE_ADDR", "")},
    }
    protocol = environ.get("SERVER_PROTOCOL", "")
    if protocol.startswith("HTTP/"):
        context["http_version"] = protocol[5:]
    if config.capture_headers:
        headers = context["headers"] = {}
        names = _HEADER_NAMES
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = names.get(key)
                if name is None:
                    name = key[5:].replace("_", "-").title()
                    if len(names) < _KEPT:
                        names[key] = name
                headers[name] = REDACTED if key == "HTTP_BAGGAGE" else value
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").title()] = environ[key]
    cookie = environ.get("HTTP_COOKIE")
    if cookie:
        cookies = _cookies(cookie)
        if cookies is not None:
            context["cookies"] = cookies
    body = environ.get("beatlib.body")
    if body is not None and config.capture_body in ("all", "errors" if for_error else
                                                     "transactions"):
        context["body"] = body
    return context


def _quote_path(path: str) -> str:
    return quote(path, safe="/%;:@&=+$,!~*()")


def _cookies(header: str) -> dict[str, str] | None:
    """The cookies of a Cookie header (a new dict each time), None when it does not parse."""
    if header in _COOKIES:
        parsed = _COOKIES[header]
    else:
        try:
            parsed = {k: m.value for k, m in SimpleCookie(header).items()}
        except CookieError:
            parsed = None
        if len(header) <= _COOKIE_KEPT:
            if len(_COOKIES) >= _KEPT:
                _COOKIES.clear()
            _COOKIES[header] = parsed
    return None if parsed is None else dict(parsed)


def read_body(environ: dict[str, Any], config: Config) -> None:
    """With `capture_body` on, read a small request body ahead of the app (which then reads it
    from a buffer): see `keep_body`."""
    if config.capture_body == "off":
        return

    def read(length: int) -> bytes:
        raw = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(raw)
        return raw

    keep_body(environ, read, multipart="size")


def keep_body(environ: dict[str, Any], read: Callable[[int], bytes],
              multipart: str = "size") -> None:
    """Keep a small form or JSON body, parsed, as `environ["beatlib.body"]` (so its secret
    fields are redacted by name), a longer one by its size. `read(length)` reads it ahead of
    the app; multipart bodies are never read here: recorded by size (`multipart="size"`) or
    left to the integration (`"later"`, Django: its fields once the app parsed them)."""
    length = body_to_keep(environ, multipart)
    if length:
        environ["beatlib.body"] = body_value(read(length), environ.get("CONTENT_TYPE", ""))


def body_to_keep(environ: dict[str, Any], multipart: str = "size") -> int:
    """How many bytes of the request body `keep_body` reads (by its Content-Length), 0 for
    none; a body too long or multipart (with `multipart="size"`) is noted by its size here."""
    if "beatlib.body" in environ:
        return 0
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0
    if length <= 0:
        return 0
    is_multipart = environ.get("CONTENT_TYPE", "").startswith("multipart/")
    if length > BODY_LIMIT or (is_multipart and multipart == "size"):
        environ["beatlib.body"] = f"[body of {length} bytes not recorded]"
        return 0
    return 0 if is_multipart else length


def body_value(raw: bytes, content_type: str) -> str | dict[str, Any]:
    """A form or JSON object body as a mapping (so its secret fields are redacted by name),
    anything else as text; multipart bodies (files, fields we would have to parse to redact)
    are not recorded."""
    if content_type.startswith("multipart/"):
        return f"[body of {len(raw)} bytes not recorded]"
    text = raw.decode("utf-8", "replace")
    try:
        if content_type.startswith(_FORM):
            return dict(parse_qsl(text, keep_blank_values=True))
        if "json" in content_type:
            value = json.loads(text)
            if isinstance(value, dict):
                return value
    except ValueError:
        pass
    return text


def settle(tx: Transaction, status: int | str | None) -> int:
    """`tx`'s result (`HTTP 2xx`) and outcome (failure on 5xx) from the response status,
    where the app set none; returns the status code (500 for none or one that is no number)."""
    try:
        code = (status if type(status) is int else int(str(status).split(" ", 1)[0])
                if status is not None else 500)
    except ValueError:
        code = 500
    if tx.result is None:
        tx.result = f"HTTP {code // 100}xx"
    if tx.outcome is None:
        tx.outcome = "failure" if code >= 500 else "success"
    return code


def end_request(
    tx: Transaction | None,
    status: int | str | None,
    headers: Iterable[tuple[str, str]] | None = None,
    name: str | None = None,
    *,
    finished: bool = True,
    headers_sent: bool = True,
) -> None:
    """Result (`HTTP 2xx`), outcome (failure on 5xx), response context (`finished` false
    when the client left before the whole response was sent); then end `tx`."""
    if tx is None or tx.ended:
        return
    code = settle(tx, status)
    if tx.sampled:
        response: dict[str, Any] = {"status_code": code, "finished": finished,
                                    "headers_sent": headers_sent}
        if headers is not None and tx.tracer.config.capture_headers:
            response["headers"] = dict(headers)
        tx.set_context("response", response, captured=True)
    tx.end(name)


def capture_request_error(
    client: Client, environ: dict[str, Any], exc_info: Any = None
) -> str | None:
    """Capture the exception being handled (once, however many hooks see it), with the
    request; the body is added when `capture_body` is errors or all."""
    exc_info = exc_info or sys.exc_info()
    request = request_context(environ, client.config, for_error=True)
    return client.capture_exception(exc_info, handled=False, request=request)


class BeatMiddleware:
    """Traces a WSGI app: one transaction per request, errors captured with the request.

    `namer(environ)` names transactions (default: the method, since raw WSGI knows no
    routes). Uses `client` or the default client, or creates one from the environment.
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        client: Client | None = None,
        namer: Callable[[dict[str, Any]], str] | None = None,
    ) -> None:
        self.app = app
        self.client = client or get_client() or Client()
        self.namer = namer
        instrument(self.client.config)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        client = self.client
        previous = get_active()
        try:
            read_body(environ, client.config)
            tx = begin_request(client, environ, self.namer(environ) if self.namer else None)
        except Exception:  # never let tracing take the request down
            report("wsgi: beginning the request's transaction")
            tx = None
        if tx is None:
            return self.app(environ, start_response)
        status: list[Any] = []

        def traced_start_response(code: str, headers: list[tuple[str, str]],
                                  exc_info: Any = None) -> Any:
            status[:] = [code, headers]
            return start_response(code, headers, exc_info) if exc_info else start_response(
                code, headers)

        def failed() -> None:
            capture_request_error(client, environ)
            tx.outcome = tx.outcome or "failure"  # the app's own wins

        try:
            body = self.app(environ, traced_start_response)
        except BaseException:
            failed()
            end_request(tx, 500)
            raise
        finally:
            set_active(previous)  # the request's transaction never outlives the call here
        return ClosingIterator(body, lambda: end_request(tx, *status[:2] or (500,)), failed,
                               tx)


def produced(body: Iterable[bytes], segment: Any, on_error: Callable[[], Any],
             errors: type[BaseException] = Exception) -> Iterator[bytes]:
    """`body`'s chunks, each produced with `segment` active (a streamed body's queries and
    templates join the request), and put back between chunks; `on_error` (also with it
    active: the error belongs to the request) when producing raises one of `errors`."""
    try:
        previous = set_active_for(segment)
        try:
            iterator = iter(body)
        finally:
            set_active(previous)
        while True:
            previous = set_active_for(segment)
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            finally:
                set_active(previous)
            yield chunk
    except GeneratorExit:
        raise  # left unfinished (a client gone, a test not reading): not the app's error
    except errors:
        run_in(segment, on_error)
        raise


_END = guard("wsgi: ending the request's transaction")


class ClosingIterator:
    """The app's response body, passed through. `on_close` (the end of the request) runs when
    the body is exhausted or closed, whichever comes first: a body nobody closes (a test
    client, some adapters) still ends its transaction. `on_error` runs when producing the body
    raises. While the body is produced, `segment` is the active one, so work done by a
    streamed body (queries, templates) joins the request's transaction."""

    def __init__(self, body: Iterable[bytes], on_close: Callable[[], None],
                 on_error: Callable[[], Any], segment: Any = None) -> None:
        self.body = body
        self.on_close = on_close
        self.on_error = on_error
        self.segment = segment
        self.closed = False
        self.ended = False

    def __iter__(self) -> Iterator[bytes]:
        yield from produced(self.body, self.segment, self.on_error, BaseException)
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            _END.call(self.on_close)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._end()
