"""Sending one gzip batch: NDJSON to the APM server's intake v2 endpoint, or (exporter="otlp")
one OTLP/HTTP JSON request to the collector's path for its signal.

`Sender` owns the urllib3 pool and maps each answer to what the worker should do with the
batch; `Backoff` spaces out retries; `RateLimitedLog` keeps an outage to a few log lines.
"""

from __future__ import annotations

import enum
import html
import json
import logging
import re
import threading
import time
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from beatlib import randomness
from beatlib.protocol import otlp
from beatlib.version import __version__

logger = logging.getLogger("beatlib.transport")

INTAKE_PATH = "/intake/v2/events"


class RateLimitedLog:
    """Logs each kind of message at most once per `interval` seconds, counting the rest."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args += (suppressed,)
        logger.log(level, msg, *args, exc_info=exc_info)

    def reset(self, key: str) -> None:
        """Forget `key`, so the next message of that kind is logged at once."""
        self._last.pop(key, None)
        self._suppressed.pop(key, None)


class Verdict(enum.Enum):
    SENT = "sent"  # 2xx: the server has the batch
    RETRY = "retry"  # server away, overloaded or refusing our credentials: keep and back off
    DROP = "drop"  # the server will never take this batch (400 and other 4xx)
    FAILED = "failed"  # sending failed here, not on the network: beatlib's bug; not retried
    TOO_LARGE = "too_large"  # 413: the server takes smaller requests; split and send again
    PARTIAL = "partial"  # OTLP 200 with partialSuccess: sent, some records rejected; not retried


class Backoff:
    """Exponential backoff with jitter, capped; a server's Retry-After wins when it gives one."""

    def __init__(self, base: float = 1.0, cap: float = 60.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        self.failures += 1
        if retry_after is not None:
            # Slightly later than asked, so many clients told the same time do not stampede.
            return min(retry_after, 300.0) * randomness.generator.uniform(1.0, 1.1)
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 30))
        return randomness.generator.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.failures = 0


_MAX_REPLY = 64 * 1024  # bytes of a server reply we read; error bodies are small

def _pool() -> ModuleType:
    """beatlib.transport.pool, and with it urllib3: imported on the first request."""
    from beatlib.transport import pool

    return pool


class Sender:
    """POSTs compressed batches with one pooled, TLS-verifying urllib3 PoolManager.

    `send()` answers (verdict, Retry-After seconds or None); for Verdict.PARTIAL the second
    value is the number of records the OTLP endpoint rejected instead."""

    def __init__(self, config: Any, log: RateLimitedLog) -> None:
        self.otlp = getattr(config, "exporter", None) == "otlp"
        self.timeout = config.server_timeout
        self._log = log
        agent = f"beatlib/{__version__} ({config.service_name})"
        if self.otlp:
            self.url = config.otlp_endpoint
            self._peer = "OTLP endpoint"
            self._hint = ""
            self.headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
                            "Accept": "application/json", "User-Agent": agent,
                            **config.otlp_headers}
            self._credentials = [v for v in config.otlp_headers.values() if v]
        else:
            self.url = config.server_url + INTAKE_PATH
            self._peer = "APM server"
            self._hint = path_hint(config.server_url)
            self.headers = {
                "Content-Type": "application/x-ndjson",
                "Content-Encoding": "gzip",
                "Accept": "application/json",
                "User-Agent": agent,
                **auth_headers(config),
            }
            self._credentials = [c for c in (config.api_key, config.secret_token) if c]
        self._pool_kwargs = pool_settings(config)
        self.pool: Any = None  # made by the first request, on a sending thread

    def reset_pool(self) -> None:
        """A fresh pool; used after fork, where the parent's sockets must not be shared."""
        self.pool = None

    def send(self, body: bytes, timeout: float | None = None, signal: int | None = None
             ) -> tuple[Verdict, float | None]:
        """One attempt; never raises. Returns the verdict and the server's Retry-After, if any.
        `timeout` (default server_timeout) is a deadline for the whole request, reply read.
        `signal` (OTLP: otlp.TRACES, LOGS or METRICS) chooses the path."""
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        ident = threading.get_ident()
        deadline = threading.Timer(timeout, _pool().cut, (ident,))
        deadline.daemon = True
        try:
            deadline.start()
            started = True
        except RuntimeError:  # no new thread at interpreter shutdown: per-read timeouts only
            started = False
        try:
            if signal is not None:
                return self._send_otlp(body, timeout, signal)
            return self._send(body, timeout)
        finally:
            if started:
                deadline.cancel()
            _pool().release(ident)

    def _post(self, url: str, body: bytes, timeout: float) -> tuple[Any, bytes]:
        pool = _pool()
        if self.pool is None:
            self.pool = pool.manager(self._pool_kwargs)
        resp = self.pool.request(
            "POST",
            url,
            body=body,
            headers=self.headers,
            timeout=pool.Timeout(connect=timeout, read=timeout),
            retries=False,
            redirect=False,
            preload_content=False,
        )
        # Read a bounded reply: a broken proxy must not make us hold megabytes.
        data = resp.read(_MAX_REPLY + 1)
        if len(data) > _MAX_REPLY:
            resp.close()  # the rest stays unread, so this connection cannot be reused
        else:
            resp.release_conn()
        return resp, data

    def _send_otlp(self, body: bytes, timeout: float, signal: int
                   ) -> tuple[Verdict, float | None]:
        """OTLP/HTTP's rules: only 429, 502, 503 and 504 are retried (Retry-After honoured);
        a 200 may report a partial success, which is final."""
        url = self.url + otlp.PATHS[signal]
        attempt = self._attempt(url, body, timeout)
        if isinstance(attempt, Verdict):
            return attempt, None
        resp, data = attempt
        status = resp.status
        text = data[:_MAX_REPLY].decode("utf-8", "replace")
        if 200 <= status < 300:
            partial = otlp.rejected(signal, data) if len(data) <= _MAX_REPLY else None
            if partial is None:
                return Verdict.SENT, None
            count, message = partial
            self._log.log("partial", logging.WARNING, "OTLP endpoint %s rejected %d of the "
                          "records of a request (partial success, not retried): %s", url,
                          count, " ".join(message.split())[:500] or "no reason given")
            return (Verdict.PARTIAL, float(count)) if count else (Verdict.SENT, None)
        if status in (429, 502, 503, 504):
            self._log.log("unavailable", logging.WARNING, "OTLP endpoint busy or failing "
                          "(HTTP %d: %s); will retry", status, " ".join(text.split())[:500])
            return Verdict.RETRY, _retry_after(resp.headers.get("Retry-After"))
        if status == 413:
            return Verdict.TOO_LARGE, None
        what = "credentials rejected; check otlp_headers" if status in (401, 403) else \
            "rejected a request"
        self._log.log("rejected", logging.ERROR, "OTLP endpoint %s %s (HTTP %d), dropping it: "
                      "%s", url, what, status, server_message(text)[:2000])
        return Verdict.DROP, None

    def _attempt(self, url: str, body: bytes, timeout: float) -> tuple[Any, bytes] | Verdict:
        """`_post`, or the verdict when it raised: RETRY for the network, FAILED for ours."""
        try:
            return self._post(url, body, timeout)
        except (_pool().HTTPError, OSError) as exc:
            # refused, reset, timeout, TLS, a broken reply: all mean "try later"
            self._log.log("unreachable", logging.WARNING, "%s %s unreachable (%s); will retry",
                          self._peer, url, self._hide(exc))
            return Verdict.RETRY
        except Exception as exc:  # not the network: ours, and sending again cannot help
            self._log.log("send_failed", logging.ERROR,
                          "beatlib: could not send a batch (%s: %s); dropped it. This is a "
                          "bug in beatlib, please report it", type(exc).__name__,
                          self._hide(exc))
            return Verdict.FAILED

    def _send(self, body: bytes, timeout: float) -> tuple[Verdict, float | None]:
        attempt = self._attempt(self.url, body, timeout)
        if isinstance(attempt, Verdict):
            return attempt, None
        resp, data = attempt
        status = resp.status
        if 200 <= status < 300:
            return Verdict.SENT, None
        text = data[:_MAX_REPLY].decode("utf-8", "replace")
        if status in (401, 403):
            self._log.log("auth", logging.ERROR,
                          "APM server token rejected (HTTP %d: %s); check secret_token/api_key; "
                          "will retry", status, " ".join(text.split())[:500])
            return Verdict.RETRY, None
        if status == 429 or status >= 500:
            self._log.log("unavailable", logging.WARNING,
                          "APM server busy or failing (HTTP %d: %s); will retry",
                          status, " ".join(text.split())[:500])
            return Verdict.RETRY, _retry_after(resp.headers.get("Retry-After"))
        if status == 413:
            return Verdict.TOO_LARGE, None
        # 400 (and other 4xx): the batch itself is wrong; sending it again cannot help.
        self._log.log("rejected", logging.ERROR,
                      "APM server rejected a batch (HTTP %d), dropping it: %s%s",
                      status, server_message(text)[:2000], self._hint if status == 404 else "")
        return Verdict.DROP, None


    def _hide(self, exc: BaseException) -> str:
        """The exception's text without our credentials (a header error would show them)."""
        text = str(exc)
        for credential in self._credentials:
            text = text.replace(credential, "***")
        return text


class ServerProblem(Exception):
    """The APM server could not be reached, refused our credentials or is not one."""


def request(config: Any, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str]:
    """One request to the APM server outside the worker (the check commands, release
    records), with the transport's TLS settings and credentials: (status, reply text).
    Raises ServerProblem when it cannot be reached."""
    url = config.server_url + path
    sent = {"User-Agent": f"beatlib/{__version__} ({config.service_name})",
            **auth_headers(config), **(headers or {})}
    pool = _pool()
    try:
        reply = pool.manager(pool_settings(config), watched=False).request(
            method, url, body=body, headers=sent, retries=False, redirect=False,
            timeout=pool.Timeout(connect=config.server_timeout, read=config.server_timeout))
    except pool.HTTPError as exc:
        reason = str(exc).rsplit(">: ", 1)[-1]  # drop urllib3's "<Connection object at ...>"
        raise ServerProblem(f"cannot reach {url}: {reason}") from None
    return reply.status, reply.data[:2000].decode("utf-8", "replace").strip()


def server_version(config: Any) -> str | None:
    """GET / of the APM server: its version (None if it does not say). Raises ServerProblem
    when it is unreachable, refuses the credentials or does not answer like an APM server."""
    status, text = request(config, "GET", "/")
    if status in (401, 403):
        raise ServerProblem(f"{config.server_url} refused the credentials (HTTP {status}): "
                            f"{server_message(text)}; check secret_token / api_key")
    if not 200 <= status < 300 or is_html(text):
        shown = f' ("{excerpt(text)}")' if text.strip() else ""
        raise ServerProblem(f"{config.server_url}/ answered HTTP {status}{shown}: it does not "
                            f"look like an APM server{path_hint(config.server_url)}")
    try:
        version = json.loads(text).get("version")
    except (ValueError, AttributeError):
        return None
    return str(version) if version else None


def auth_headers(config: Any) -> dict[str, str]:
    """The Authorization header for the APM server, if credentials are set."""
    if config.api_key:
        return {"Authorization": f"ApiKey {config.api_key}"}
    if config.secret_token:
        return {"Authorization": f"Bearer {config.secret_token}"}
    return {}


def pool_settings(config: Any) -> dict[str, Any]:
    """urllib3 pool keywords: TLS verified by default (system CAs, or server_ca_cert_file);
    only an explicit verify_server_cert=false turns it off."""
    settings: dict[str, Any] = {"maxsize": 1, "ca_certs": config.server_ca_cert_file}
    if not config.verify_server_cert:
        settings.update(cert_reqs="CERT_NONE", assert_hostname=False)
    return settings


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (urllib3
    reads both); None when absent or unreadable (our own backoff then)."""
    if not value:
        return None
    try:
        return max(0.0, _pool().parse_retry_after(value))
    except Exception:  # urllib3's InvalidHeader, or a date it cannot read
        return None


def server_message(text: str) -> str:
    """The first error messages of an error reply (intake's `errors`, or one `error`), or
    a one-line excerpt of the text (a proxy's HTML error page is not worth a screenful)."""
    try:
        reply = json.loads(text)
        errors = reply.get("errors") or [reply]
        return "; ".join(str(e.get("message") or e.get("error") or e)
                         for e in errors[:3]) or excerpt(text)
    except Exception:
        return excerpt(text) or "no reason given"


def is_html(text: str) -> bool:
    """Whether a reply is an HTML page (a web server or proxy answered, not an APM server)."""
    start = text.lstrip()[:100].lower()
    return start.startswith(("<!doctype html", "<html", "<head", "<body", "<title"))


def excerpt(text: str, limit: int = 120) -> str:
    """`text` on one line, at most `limit` characters: an HTML page's head (its title is
    the heading again), scripts and tags dropped, whitespace runs made one space."""
    if is_html(text):
        text = re.sub(r"(?is)<(head|script|style)\b.*?</\1\s*>", " ", text)
        text = html.unescape(re.sub(r"(?s)<[^>]*>", " ", text))
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


def path_hint(server_url: str) -> str:
    """A hint when `server_url` carries the intake path, which beatlib adds itself (the
    server then answers 404); "" otherwise."""
    path = urlsplit(server_url).path.rstrip("/")
    for tail in (INTAKE_PATH, "/intake/v2", "/intake"):
        if path.endswith(tail):
            base = server_url.rstrip("/")[: -len(tail)]
            return (f"; server_url is the server's base address, beatlib adds {INTAKE_PATH}"
                    f" itself: drop the path (server_url={base})")
    return ""
