"""Notifications of new and regressed error groups: webhooks (generic JSON or Slack
incoming-webhook payloads) and e-mail over SMTP, sent from background threads. The writer
hands over the changes it committed (`Notifier.offer`, never blocking); each destination has
its own bounded queue and thread, retries with exponential backoff, and gives up after a bound.
"""

from __future__ import annotations

import collections
import datetime
import functools
import json
import logging
import queue
import smtplib
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import urllib3

from beatlib.receiver.group_state import GroupChange, group_page
from beatlib.version import __version__

logger = logging.getLogger("beatlib.receiver")

FORMATS = ("json", "slack")
_MESSAGE_CHARS = 500  # of the error message in a notification


@dataclass
class NotifyConfig:
    """Where notifications go, and how hard to try."""

    webhooks: list[str] = field(default_factory=list)
    format: str = "json"  # of webhook payloads: json | slack
    smtp: str | None = None  # "host:port" of a relay taking plain SMTP
    email_to: list[str] = field(default_factory=list)
    email_from: str = "beatlib@localhost"
    public_url: str | None = None  # base URL the links in notifications use
    attempts: int = 6  # per notification and destination, the first included
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    max_backoff: float = 300.0  # cap on a delay, Retry-After included
    timeout: float = 10.0  # seconds per attempt
    max_queue: int = 1000  # notifications waiting per destination; more are dropped

    @property
    def enabled(self) -> bool:
        return bool(self.webhooks or (self.smtp and self.email_to))


def split_list(text: str | None) -> list[str]:
    """Values separated by whitespace or commas (BEATLIB_SERVE_NOTIFY_WEBHOOK)."""
    return [part for part in (text or "").replace(",", " ").split() if part]


@dataclass(frozen=True)
class Notification:
    """What every destination renders: the group as it was when the change was read."""

    event: str  # "new_error_group" | "regression"
    data: dict[str, Any]


class _GiveUp(Exception):
    """A failure that retrying will not fix (a 4xx other than 429, a refused address)."""


class _Retry(Exception):
    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class Notifier:
    """`offer` from the writer after each commit; `flush` waits until everything offered was
    delivered or given up; `counts` has sent, retried, failed and dropped."""

    def __init__(self, config: NotifyConfig, db_path: str, base_url: Callable[[], str]) -> None:
        self.config = config
        self.db_path = db_path
        self.base_url = base_url
        self.counts = collections.Counter[str]()
        self._changes: queue.Queue[GroupChange] = queue.Queue(config.max_queue)
        self._pending = 0
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channels: list[_Channel] = []
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(5.0, config.timeout), read=config.timeout),
            retries=False)
        for url in config.webhooks:
            self._channels.append(_Channel(self, f"webhook {_safe_url(url)}",
                                           functools.partial(self._post, url)))
        if config.smtp and config.email_to:
            self._channels.append(_Channel(self, f"smtp {config.smtp}", self._mail))

    # --- called by the writer ----------------------------------------------------------------

    def offer(self, changes: list[GroupChange]) -> None:
        """Queues the changes for sending; drops (and counts) what does not fit. Never
        blocks and never raises: it runs on the writer thread."""
        try:
            for change in changes:
                with self._cond:
                    self._pending += 1
                try:
                    self._changes.put_nowait(change)
                except queue.Full:
                    self._done(1)
                    self._dropped("the notification queue is full")
        except Exception:  # the writer must go on whatever happens here
            logger.exception("receiver: could not queue notifications")

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Notifier:
        self._stopping.clear()
        targets: list[tuple[str, Callable[[], None]]] = [("compose", self._compose)]
        targets += [(f"send-{i}", channel.run) for i, channel in enumerate(self._channels)]
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"beatlib-notify-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def flush(self, timeout: float | None = 10.0) -> bool:
        """True once everything offered so far was sent or given up."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Sends what is queued for up to `timeout` s, then stops; says what was not sent."""
        drained = self.flush(timeout)
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=1.0)
        self._threads = []
        if not drained:
            logger.warning("receiver: stopped with %d notifications not sent", self._pending)
        self._http.clear()

    # --- the threads -------------------------------------------------------------------------

    def _compose(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self._stopping.is_set():
            try:
                change = self._changes.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if conn is None:
                    conn = sqlite3.connect(self.db_path, timeout=2.0, check_same_thread=False)
                    conn.row_factory = sqlite3.Row
                    conn.execute("PRAGMA query_only=1")
                notification = self._notification(conn, change)
                for channel in self._channels:
                    channel.offer(notification)
            except Exception:
                logger.exception("receiver: could not build a notification for %s",
                                 change.grouping_key)
                if conn is not None:
                    conn.close()
                    conn = None
            finally:
                self._done(1)
        if conn is not None:
            conn.close()

    def _notification(self, conn: sqlite3.Connection, change: GroupChange) -> Notification:
        row = conn.execute("SELECT * FROM error_groups WHERE service = ? AND grouping_key = ?",
                           (change.service, change.grouping_key)).fetchone()
        group = dict(row) if row is not None else {}
        base = (self.config.public_url or self.base_url()).rstrip("/")
        message = group.get("message")
        if message and len(message) > _MESSAGE_CHARS:
            message = message[:_MESSAGE_CHARS - 1] + "…"
        assignee = None
        if group.get("assignee_name") or group.get("assignee_email"):
            assignee = {"name": group.get("assignee_name"), "email": group.get("assignee_email")}
        # Only the group's own columns: nothing from request context (headers, bodies, locals).
        event = "new_error_group" if change.kind == "new" else "regression"
        data = {
            "event": event,
            "service": change.service,
            "environment": change.environment,
            "release": change.version,
            "type": group.get("type"),
            "message": message,
            "culprit": group.get("culprit"),
            "assignee": assignee,
            "count": group.get("count"),
            "first_seen": _iso(group.get("first_seen")),
            "last_seen": _iso(group.get("last_seen")),
            "first_release": group.get("first_version"),
            "resolved_in": group.get("resolved_in_version"),
            "regressions": group.get("regressions") or 0,
            "grouping_key": change.grouping_key,
            "url": base + group_page(change.service, change.grouping_key),
            "sender": f"beatlib-receiver/{__version__}",
        }
        return Notification(event, data)

    # --- destinations ------------------------------------------------------------------------

    def _post(self, url: str, notification: Notification) -> None:
        render = slack_payload if self.config.format == "slack" else json_payload
        body = json.dumps(render(notification)).encode()
        try:
            response = self._http.request(
                "POST", url, body=body, redirect=False,
                headers={"Content-Type": "application/json",
                         "User-Agent": f"beatlib-receiver/{__version__}"})
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        status = response.status
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            after = response.headers.get("Retry-After")
            delay = None
            if after:
                try:
                    delay = urllib3.util.Retry().parse_retry_after(after)
                except urllib3.exceptions.InvalidHeader:
                    delay = None
            raise _Retry(f"HTTP {status}", delay)
        raise _GiveUp(f"HTTP {status}")

    def _mail(self, notification: Notification) -> None:
        host, _, port = (self.config.smtp or "").rpartition(":")
        message = email_message(notification, self.config.email_from, self.config.email_to)
        try:
            with smtplib.SMTP(host.strip("[]"), int(port), timeout=self.config.timeout) as smtp:
                smtp.send_message(message)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused) as exc:
            raise _GiveUp(f"{type(exc).__name__}: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise _GiveUp(f"SMTP {exc.smtp_code}") from None
            raise _Retry(f"SMTP {exc.smtp_code}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    # --- bookkeeping -------------------------------------------------------------------------

    def _done(self, n: int) -> None:
        with self._cond:
            self._pending -= n
            self._cond.notify_all()

    def _add(self, n: int) -> None:
        with self._cond:
            self._pending += n

    def _dropped(self, why: str) -> None:
        self.counts["dropped"] += 1
        if self.counts["dropped"] in (1, 10, 100) or self.counts["dropped"] % 1000 == 0:
            logger.warning("receiver: %d notifications dropped (%s)", self.counts["dropped"], why)


class _Channel:
    """One destination: a bounded queue and a thread that delivers in order, with retries."""

    def __init__(self, notifier: Notifier, name: str,
                 deliver: Callable[[Notification], None]) -> None:
        self.notifier = notifier
        self.name = name
        self.deliver = deliver
        self.queue: queue.Queue[Notification] = queue.Queue(notifier.config.max_queue)

    def offer(self, notification: Notification) -> None:
        self.notifier._add(1)
        try:
            self.queue.put_nowait(notification)
        except queue.Full:
            self.notifier._done(1)
            self.notifier._dropped(f"{self.name} is not keeping up")

    def run(self) -> None:
        stopping = self.notifier._stopping
        while not stopping.is_set():
            try:
                notification = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._send(notification, stopping)
            finally:
                self.notifier._done(1)

    def _send(self, notification: Notification, stopping: threading.Event) -> None:
        config, counts = self.notifier.config, self.notifier.counts
        delay = config.backoff
        for attempt in range(1, config.attempts + 1):
            try:
                self.deliver(notification)
                counts["sent"] += 1
                return
            except _GiveUp as exc:
                reason = str(exc)
                break
            except _Retry as exc:
                reason = str(exc)
                if attempt == config.attempts:
                    break
                counts["retried"] += 1
                wait = min(exc.delay if exc.delay is not None else delay, config.max_backoff)
                delay = min(delay * 2, config.max_backoff)
                if stopping.wait(wait):
                    break
            except Exception as exc:  # a bug: never let it end the thread
                reason = f"{type(exc).__name__}: {exc}"
                break
        counts["failed"] += 1
        logger.warning("receiver: gave up notifying %s of %s %s after %d attempts (%s)",
                       self.name, notification.event, notification.data["grouping_key"],
                       attempt, reason)


def json_payload(notification: Notification) -> dict[str, Any]:
    """The generic payload: the notification's fields as they are (see docs/receiver.md)."""
    return dict(notification.data)


def _title(data: dict[str, Any]) -> str:
    what = "New error" if data["event"] == "new_error_group" else "Regression"
    where = data["service"] + (f" ({data['environment']})" if data["environment"] else "")
    headline = ": ".join(p for p in (data["type"], data["message"]) if p) or "error"
    return f"{what} in {where}: {headline}"


def slack_payload(notification: Notification) -> dict[str, Any]:
    """Slack incoming-webhook message: `text` (the fallback, shown in notifications) and
    Block Kit `blocks`. Text from the error is escaped as Slack's mrkdwn asks (&, <, >)."""
    data = notification.data
    assignee = data["assignee"] or {}
    fields = [("Service", data["service"]), ("Environment", data["environment"]),
              ("Release", data["release"]), ("Occurrences", data["count"]),
              ("Assignee", assignee.get("name") or assignee.get("email")),
              ("First seen", data["first_seen"])]
    if data["event"] == "regression":
        fields.append(("Resolved in", data["resolved_in"]))
    return {
        "text": _slack_escape(_title(data)),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": _cut(
                f"*<{data['url']}|{_slack_escape(_title(data))}>*", 3000)}},
            {"type": "section", "fields": [
                {"type": "mrkdwn", "text": _cut(f"*{name}*\n{_slack_escape(value)}", 2000)}
                for name, value in fields if value not in (None, "")]},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _cut(
                f"culprit `{_slack_escape(data['culprit'] or '?')}`", 2000)}]},
        ],
    }


def email_message(notification: Notification, sender: str, to: list[str]) -> EmailMessage:
    data = notification.data
    message = EmailMessage()
    message["Subject"] = _cut("[beatlib] " + _title(data), 200).replace("\n", " ")
    message["From"] = sender
    message["To"] = ", ".join(to)
    assignee = data["assignee"] or {}
    lines = [_title(data), "", data["url"], ""]
    for name, key in (("Service", "service"), ("Environment", "environment"),
                      ("Release", "release"), ("Culprit", "culprit"), ("Occurrences", "count"),
                      ("First seen", "first_seen"), ("Last seen", "last_seen"),
                      ("Resolved in", "resolved_in")):
        if data.get(key) not in (None, ""):
            lines.append(f"{name}: {data[key]}")
    if assignee:
        lines.append(f"Assignee: {assignee.get('name') or ''} <{assignee.get('email') or ''}>")
    message.set_content("\n".join(lines) + "\n")
    return message


def _slack_escape(value: Any) -> str:
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _iso(us: Any) -> str | None:
    if not isinstance(us, int):
        return None
    try:
        when = datetime.datetime.fromtimestamp(us / 1e6, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_url(url: str) -> str:
    """A webhook URL for logs: Slack's carry their secret in the path, so only the host."""
    parsed = urllib3.util.parse_url(url)
    return f"{parsed.scheme}://{parsed.netloc}/…"
