"""The state of an error group: open, resolved or ignored; a resolved group that happens
again is a regression. The writer calls `on_occurrence` inside its transaction; the
dashboard changes the state with `set_status` (POST /ui/errors/<service>/<key>/<action>).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

OPEN, RESOLVED, IGNORED = "open", "resolved", "ignored"
ACTIONS = {"resolve": RESOLVED, "ignore": IGNORED, "reopen": OPEN}
ACTION_PREFIX = "/ui/errors/"  # + <service>/<grouping key>/<action>, each part %-encoded
MAX_FORM = 4096  # bytes of form body read for an action


@dataclass(frozen=True)
class GroupChange:
    """A group that is new, or that regressed, in a transaction the writer committed."""

    kind: str  # "new" | "regression"
    service: str
    grouping_key: str
    version: str | None  # of the occurrence
    environment: str | None
    timestamp: int  # of the occurrence, µs


def on_occurrence(conn: sqlite3.Connection, service: str, key: str, version: str | None,
                  environment: str | None, timestamp: int) -> GroupChange | None:
    """Called for each new occurrence before its group row is upserted: a change when the
    group does not exist yet, or is resolved and this occurrence happened after the resolve
    (then it is reopened here). Ignored groups stay ignored."""
    row = conn.execute("SELECT status, resolved_at FROM error_groups "
                       "WHERE service = ? AND grouping_key = ?", (service, key)).fetchone()
    if row is None:
        return GroupChange("new", service, key, version, environment, timestamp)
    status, resolved_at = row[0], row[1]
    if status != RESOLVED or (resolved_at is not None and timestamp <= resolved_at):
        return None  # open, ignored, or an occurrence from before the resolve arriving late
    conn.execute("""UPDATE error_groups SET status = 'open', regressed_in = ?, regressed_at = ?,
                    regressions = regressions + 1 WHERE service = ? AND grouping_key = ?""",
                 (version, timestamp, service, key))
    return GroupChange("regression", service, key, version, environment, timestamp)


def set_status(conn: sqlite3.Connection, service: str, key: str, action: str,
               version: str | None = None) -> bool:
    """resolve (in `version`, else the service's latest version), ignore or reopen a group;
    False when there is no such group."""
    status = ACTIONS[action]
    if status == RESOLVED:
        sql = """UPDATE error_groups SET status = 'resolved', resolved_at = ?,
                 resolved_in_version = coalesce(?, (SELECT version FROM services
                                                    WHERE name = error_groups.service))
                 WHERE service = ? AND grouping_key = ?"""
        params: tuple[Any, ...] = (time.time_ns() // 1000, version or None, service, key)
    else:
        sql = """UPDATE error_groups SET status = ?, resolved_at = NULL,
                 resolved_in_version = NULL WHERE service = ? AND grouping_key = ?"""
        params = (status, service, key)
    with conn:
        return conn.execute(sql, params).rowcount > 0


def action_path(service: str, key: str, action: str) -> str:
    """The URL path a dashboard form posts to (not HTML-escaped)."""
    return f"{ACTION_PREFIX}{quote(service, safe='')}/{quote(key, safe='')}/{action}"


def group_page(service: str, key: str) -> str:
    """The URL path of the group's page (not HTML-escaped)."""
    return f"/ui/error?service={quote(service, safe='')}&key={quote(key, safe='')}"


def parse_action(path: str) -> tuple[str, str, str] | None:
    """(service, key, action) from an action path, None if it is not one."""
    parts = path[len(ACTION_PREFIX):].split("/") if path.startswith(ACTION_PREFIX) else []
    if len(parts) != 3 or parts[2] not in ACTIONS or not parts[0] or not parts[1]:
        return None
    return unquote(parts[0]), unquote(parts[1]), parts[2]


def same_origin(headers: Any, host: str | None) -> bool:
    """False for a browser's cross-site request: Sec-Fetch-Site other than same-origin or
    none (typed in), or an Origin whose host is not the Host the request was sent to. Clients
    that send neither header (curl, scripts) are not browsers acting for another site."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return False
    origin = headers.get("Origin")
    if origin is None:
        return True
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and bool(host) and rest.rstrip("/").lower() == \
        (host or "").lower()


def form_version(body: bytes) -> str | None:
    """The optional `version` field of an action's form (the release that fixes it)."""
    fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=False))
    value = fields.get("version", "").strip()
    return value[:1024] or None
