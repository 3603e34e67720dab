"""The dashboard at /ui/: pages rendered from `queries` by the Jinja2 templates in
templates/ (one per page, `base.html` the layout, `macros.html` the shared pieces), with
autoescaping: what the apps sent is only ever shown as text. No JavaScript.

A page is a handler `(conn, query) -> View` in `_ROUTES`: it reads, shapes the data, and
names its template. Jinja2 comes with the `serve` extra; without it the pages say so.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

from beatlib.receiver import group_state, health, queries, series, svg
from beatlib.receiver.store import Store

if TYPE_CHECKING:
    import jinja2

ROOT = "/ui/"
INSTALL_HINT = "pip install -e '.[serve]' (in a checkout of beatlib)"
TRACES = "traces/"  # /ui/traces/<trace_id>: the one page with its key in the path


@dataclass
class Page:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class View:
    """What a handler returns: the template to render, the page's title, its data."""
    template: str
    title: str
    context: dict[str, Any] = field(default_factory=dict)


class NotFound(Exception):
    pass


def href(path: str, **params: Any) -> str:
    """The URL under /ui/ with the non-empty `params` as its query (templates escape it)."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return ROOT + path + ("?" + query if query else "")


def trace_href(trace_id: str) -> str:
    """The trace page of `trace_id`: /ui/traces/<trace_id>."""
    return ROOT + TRACES + quote(str(trace_id), safe="")


def available() -> bool:
    """Whether the pages can be rendered (Jinja2 is installed)."""
    try:
        _environment()
    except ImportError:
        return False
    return True


def render(store: Store, path: str, query: dict[str, str]) -> Page:
    """The page at `path` (under /ui/), or a 404/503 page; never raises for bad input.

    Runs in a context of its own: a beatlib client in this process (the demo's, a test's)
    must not trace the dashboard's queries and renders into the app's transaction."""
    return contextvars.Context().run(_render, store, path, query)


def _render(store: Store, path: str, query: dict[str, str]) -> Page:
    if not path.startswith(ROOT):
        return Page(308, b"", headers={"Location": ROOT})
    try:
        environment = _environment()
    except ImportError:
        return Page(503, f"The dashboard needs Jinja2: {INSTALL_HINT}\n".encode(),
                    "text/plain; charset=utf-8")
    route = _ROUTES.get(path[len(ROOT):].strip("/"))
    if route is None and path.startswith(ROOT + TRACES):
        route, query = trace_page, {**query, "trace_id": unquote(path[len(ROOT + TRACES):])}
    if route is None:
        return _page(environment, 404, _message("Not found", "No such page."))
    try:
        with store.reader() as conn:
            view = route(conn, query)
    except NotFound as exc:
        return _page(environment, 404, _message("Not found", str(exc)))
    except sqlite3.OperationalError as exc:
        # Locked or still being created: a reload will do, the data is not lost.
        return _page(environment, 503, _message(
            "Database busy", f"The database cannot be read right now ({exc}). Reload in a "
                             "moment."), {"Retry-After": "1"})
    return _page(environment, 200, view, notice=_writer_notice(store.health()))


def _message(title: str, text: str) -> View:
    return View("message.html", title, {"message": text})


def _writer_notice(health: dict[str, Any]) -> dict[str, Any] | None:
    """A line on every page when the store's writer stopped or failed to store data."""
    if health["writer_running"] and not health["writer_errors"]:
        return None
    if not health["writer_running"]:
        state = "is not running"
    else:
        state = f"could not store {health['writer_errors']} batches"
    return {"state": state, "last_error": health["last_error"]}


# --- pages ----------------------------------------------------------------------------------


SERVICE_COLUMNS = [
    ("Service", "name", "asc"), ("Environment", "environment", "asc"),
    ("Version", "version", "asc"), ("Agent", "agent", "asc"),
    ("Framework", "framework", "asc"), ("Transactions", "transactions", "desc"),
    ("Error groups", "error_groups", "desc"), ("CPU", "cpu_pct", "desc"),
    ("RSS", "rss_bytes", "desc"), ("Last seen", "last_seen", "desc")]


def services_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    sort = sort_of(query, "", SERVICE_COLUMNS, "last_seen")
    return View("services.html", "Services", {"services": sort.rows(queries.services(conn)),
                                              "headers": sort.headers})


def transactions_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service = _service(conn, query)
    window = _window(query)
    overview = series.transaction_overview(conn, service, window)
    # Every group of the window is listed: sorting them in Python sorts the whole set.
    # Unsorted, the groups with the highest total time come first.
    sort = sort_of(query, "transactions", GROUP_COLUMNS, "total", service=service,
                   window=window)
    return View("transactions.html", f"Transactions of {service}", {
        "service": service, "window": window, "services": _service_names(conn),
        "windows": _window_chips("transactions", window, service=service),
        "headers": sort.headers, "groups": sort.rows(overview["groups"]),
        "chart_css": _chart_style(),
        "charts": _charts(conn, service, window, overview["series"])})


GROUP_COLUMNS = [
    ("Name", "name", "asc"), ("Type", "type", "asc"), ("Count", "count", "desc"),
    ("Per minute", "tpm", "desc"), ("Avg", "avg", "desc"), ("p50", "p50", "desc"),
    ("p95", "p95", "desc"), ("p99", "p99", "desc"), ("Error rate", "error_rate", "desc")]


def transaction_group_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service, name = _required(query, "service"), query.get("name", "")
    samples = queries.transaction_samples(conn, service, name)
    if not samples["latest"]:
        raise NotFound(f"No transaction named {name!r} in {service!r}.")
    window = _window(query)
    overview = series.transaction_overview(conn, service, window, name=name)

    def bucket(low: float, high: float) -> str:
        return href("transactions/group", service=service, name=name, window=window,
                    low=repr(low), high=repr(high)) + "#samples"

    picked = None
    low, high = _number(query.get("low")), _number(query.get("high"))
    if low is not None and high is not None:
        picked = {"low": low, "high": high,
                  "rows": series.samples(conn, service, name, low, high, window)}
    return View("transaction_group.html", name or "(unnamed)", {
        "service": service, "name": name, "window": window, "samples": samples,
        "windows": _window_chips("transactions/group", window, service=service, name=name),
        "charts": _charts(conn, service, window, overview["series"], name),
        "distribution": svg.distribution_chart(overview["distribution"], bucket),
        "picked": picked, "chart_css": _chart_style()})


def transaction_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    tx = queries.transaction(conn, _required(query, "id"))
    if tx is None:
        raise NotFound("No such transaction.")
    total = max(tx["duration"], 1e-6)
    waterfall = [_waterfall_row(tx["name"] or "(transaction)", tx["type"], 0, 0.0,
                                tx["duration"], total, "transaction")]
    called = queries.child_transactions(conn, tx["trace_id"],
                                        [span["id"] for span in tx["spans"]])
    for span in tx["spans"]:
        waterfall.append(_waterfall_row(span["name"], _span_kind(span), span["depth"],
                                        span["offset"], span["duration"], total,
                                        _css_type(span["type"]), *_span_detail(span),
                                        **_span_facts(span)))
        # What this exit span called in another service (or this one): its transaction.
        for child in called.get(span["id"], []):
            waterfall.append(_waterfall_row(
                child["name"] or "(transaction)", child["type"], span["depth"] + 1,
                (child["timestamp"] - tx["timestamp"]) / 1000, child["duration"], total,
                "transaction", service=child["service"],
                link=href("transaction", id=child["id"]),
                note="called by the span above: see the whole trace"))
    return View("transaction.html", tx["name"] or "(unnamed transaction)",
                {"tx": tx, "waterfall": waterfall,
                 "child_transactions": sum(len(c) for c in called.values())})


STATUSES = ("open", "resolved", "ignored", "all")  # the errors list's filter; "open" first


def errors_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service, assignee = query.get("service"), query.get("assignee")
    status = query.get("status") if query.get("status") in STATUSES else "open"
    counts = queries.group_statuses(conn, service)
    people = [("everyone", href("errors", service=service, status=status), not assignee)]
    people += [(f"{p['name'] or p['email']} ({p['groups']})",
                href("errors", service=service, assignee=p["key"], status=status),
                p["key"] == assignee)
               for p in queries.assignees(conn)]
    statuses = [(f"{s} ({counts[s]})", href("errors", service=service, assignee=assignee,
                                             status=None if s == "open" else s), s == status)
                for s in STATUSES]
    # The list is the first 500 groups: sorted in SQL, so they are the first 500 by that.
    sort = sort_of(query, "errors", ERROR_COLUMNS, "last_seen", service=service,
                   assignee=assignee, status=None if status == "open" else status)
    groups = queries.error_groups(conn, service, assignee, sort=sort.key,
                                  descending=sort.descending,
                                  status=None if status == "all" else status)
    if not query.get("sort"):  # regressed groups first: they were thought fixed
        groups.sort(key=lambda g: not (g["status"] == "open" and g["regressions"]))
    return View("errors.html", "Errors", {
        "service": service, "assignee": assignee, "people": people, "status": status,
        "statuses": statuses, "counts": counts,
        "services": _service_names(conn) if service else [], "headers": sort.headers,
        "groups": groups})


ERROR_COLUMNS = [
    ("Error", "message", "asc"), ("Status", None, "asc"), ("Service", "service", "asc"),
    ("Count", "count", "desc"), ("First seen", "first_seen", "desc"),
    ("Last seen", "last_seen", "desc"), ("First release", "first_version", "asc"),
    ("Assignee", "assignee_key", "asc")]


def error_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service, key = _required(query, "service"), _required(query, "key")
    group = queries.error_group(conn, service, key)
    if group is None:
        raise NotFound("No such error group.")
    title = f"{group['type'] or 'Log message'}: {_cut(group['message'], 100)}"
    current = queries.error_occurrence(conn, service, key, query.get("occurrence") or None)
    if current is None and query.get("occurrence"):
        raise NotFound("No such occurrence of this error group.")
    shown = None
    if current is not None:
        shown = {**current, **_occurrence(current["body"]),
                 "newer_url": current["newer"] and href(
                     "error", service=service, key=key, occurrence=current["newer"]),
                 "older_url": current["older"] and href(
                     "error", service=service, key=key, occurrence=current["older"]),
                 "latest_url": href("error", service=service, key=key)}
    for o in group["occurrences"]:
        o["url"] = href("error", service=service, key=key, occurrence=o["id"])
    actions = {action: group_state.action_path(service, key, action)
               for action in group_state.ACTIONS}
    return View("error.html", title, {
        "service": service, "key": key, "group": group, "shown": shown,
        "actions": actions, "versions": queries.service_versions(conn, service),
        **_occurrences(conn, service, key, query)})


def releases_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service = query.get("service")
    return View("releases.html", "Releases", {
        "service": service, "releases": queries.releases(conn, service),
        "services": _service_names(conn) if service else []})


def health_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    """/ui/health?window=: per service, what its clients sent, retried and dropped."""
    window = query.get("window") or queries.DEFAULT_WINDOW
    if window not in queries.WINDOWS:
        window = queries.DEFAULT_WINDOW
    windows = [(w, href("health", window=w), w == window) for w in queries.WINDOWS]
    return View("health.html", "Agent health", {
        "window": window, "windows": windows, "services": health.agent_health(conn, window)})


def trace_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    """/ui/traces/<trace_id>: every transaction and span of the trace in one waterfall,
    the errors of the trace as markers where they happened."""
    trace_id = _required(query, "trace_id")
    found = queries.trace(conn, trace_id)
    if found is None:
        raise NotFound("Nothing of this trace is stored.")
    total = max(found["duration"], 1e-6)
    rows = []
    for node in found["nodes"]:
        if node["kind"] == "transaction":
            row = _waterfall_row(
                node["name"] or "(transaction)", node["type"], node["depth"], node["offset"],
                node["duration"], total, "transaction", service=node["service"],
                link=href("transaction", id=node["id"]), facts=_transaction_facts(node))
        else:
            row = _waterfall_row(node["name"], _span_kind(node), node["depth"],
                                 node["offset"], node["duration"], total,
                                 _css_type(node["type"]), *_span_detail(node),
                                 service=node["service"], **_span_facts(node))
        if node["orphan"]:
            row["note"] = f"parent {node['parent_id']} not received"
        rows.append((node["id"], row))
    by_id = dict(rows)
    for error in found["errors"]:
        # On the span (or transaction) it was raised in; else on the trace's first row.
        row = (by_id.get(error["parent_id"]) or by_id.get(error["transaction_id"])
               or rows[0][1])
        row["markers"].append({
            "left": min(max(error["offset"] / total * 100, 0.0), 100.0),
            "title": f"{error['type'] or 'log'}: {_cut(error['message'], 160)}",
            "href": href("error", service=error["service"], key=error["grouping_key"])})
    return View("trace.html", f"Trace {trace_id}", {
        "trace": found, "waterfall": [row for _, row in rows],
        "left_out": found["spans_total"] - found["spans"]})


_Handler = Callable[[sqlite3.Connection, dict[str, str]], View]
_ROUTES: dict[str, _Handler] = {
    "": services_page,
    "transactions": transactions_page,
    "transactions/group": transaction_group_page,
    "transaction": transaction_page,
    "errors": errors_page,
    "error": error_page,
    "releases": releases_page,
    "health": health_page,
}


# --- charts ---------------------------------------------------------------------------------


def _window(query: dict[str, str]) -> str:
    window = query.get("window") or series.DEFAULT_WINDOW
    return window if window in series.WINDOWS else series.DEFAULT_WINDOW


def _window_chips(page: str, window: str, **params: Any) -> list[tuple[str, str, bool]]:
    return [(w, href(page, **params, window=w), w == window) for w in series.WINDOWS]


def _chart_style() -> Any:
    return _markup(svg.STYLESHEET)


def _charts(conn: sqlite3.Connection, service: str, window: str, data: dict[str, Any],
            name: str | None = None) -> list[tuple[str, svg.Chart]]:
    """(anchor, chart) of a service's (or one transaction name's) charts over `window`:
    latency, throughput, error rate, time by span type and by dependency."""
    kinds = series.span_type_series(conn, service, window, name=name)
    dependencies = series.dependency_series(conn, service, window, name=name)
    rate = "" if data["tpm"] is None else f": {data['tpm']:,.1f}/min over the data"
    return [("latency", svg.latency_chart(data, title="Latency (p50, p95, p99)")),
            ("throughput", svg.throughput_chart(data, title=f"Throughput{rate}")),
            ("error-rate", svg.error_rate_chart(data)),
            ("span-types", svg.stacked_time_chart(kinds, title="Time by span type")),
            ("dependencies", svg.stacked_time_chart(dependencies,
                                                    title="Time by dependency"))]


def _occurrences(conn: sqlite3.Connection, service: str, key: str,
                 query: dict[str, str]) -> dict[str, Any]:
    """The error page's occurrences chart: its window (default 24h), chips, the chart."""
    window = query.get("window") or "24h"
    window = window if window in series.WINDOWS else "24h"
    data = series.error_series(conn, service, key, window)
    rate = "" if data["per_minute"] is None else f": {data['per_minute']:,.2f}/min"
    return {"window": window, "chart_css": _chart_style(),
            "windows": _window_chips("error", window, service=service, key=key),
            "occurrences": svg.occurrences_chart(data, f"Occurrences in {window}{rate}")}


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


# --- shaping data for the templates ------------------------------------------------------


def _occurrence(error: dict[str, Any]) -> dict[str, Any]:
    """An error event as `macros.occurrence` shows it: its exception chain (up to 10
    deep), or its log record, with frames; its context; its transaction."""
    chain = []
    exc, depth = error.get("exception"), 0
    while isinstance(exc, dict) and depth < 10:
        handled = exc.get("handled")
        chain.append({
            "label": "Exception" if depth == 0 else "Caused by",
            "module": f"{exc['module']}." if exc.get("module") else "",
            "type": exc.get("type") or "", "message": exc.get("message") or "",
            "flag": "" if handled is None else (" (handled)" if handled else " (unhandled)"),
            "frames": _frames(exc.get("stacktrace") or [])})
        causes = exc.get("cause")
        exc = causes[0] if isinstance(causes, list) and causes else None
        depth += 1
    log = error.get("log")
    tx = error.get("transaction")
    return {
        "chain": chain,
        "log": {"level": log.get("level") or "", "logger_name": log.get("logger_name") or "",
                "message": log.get("message") or "",
                "frames": _frames(log.get("stacktrace") or [])}
        if isinstance(log, dict) else None,
        "context": error.get("context"),
        "transaction_id": error.get("transaction_id"),
        "trace_id": error.get("trace_id"),
        "transaction_name": tx.get("name") if isinstance(tx, dict) else None,
    }


def _frames(frames: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for frame in frames:
        if not isinstance(frame, dict):
            continue
        lineno = frame.get("lineno")
        where = f"{frame.get('filename') or frame.get('module') or '?'}"
        if isinstance(lineno, int):
            where += f":{lineno}"
        local_vars = frame.get("vars")
        out.append({
            "library": bool(frame.get("library_frame")),
            "function": frame.get("function") or "?", "where": where,
            "source": _source(frame, lineno if isinstance(lineno, int) else None),
            "vars": [(k, _repr(v)) for k, v in local_vars.items()]
            if isinstance(local_vars, dict) else []})
    return out


def _source(frame: dict[str, Any], lineno: int | None) -> list[tuple[str, str, bool]]:
    """(line number, text, is the frame's line) around the frame's line, if it was sent."""
    line = frame.get("context_line")
    if not isinstance(line, str):
        return []
    pre = [x for x in frame.get("pre_context") or [] if isinstance(x, str)]
    post = [x for x in frame.get("post_context") or [] if isinstance(x, str)]
    first = (lineno - len(pre)) if lineno is not None else None
    return [("" if first is None else str(first + i), text, i == len(pre))
            for i, text in enumerate([*pre, line, *post])]


def _waterfall_row(name: str, kind: str, depth: int, offset: float, duration: float,
                   total: float, css: str, detail: str = "", status: Any = None,
                   **extra: Any) -> dict[str, Any]:
    """A row of `macros.waterfall_row`. `extra`: service, link (of the name), note,
    markers [{left, title, href}], and the detail opened under the row: facts [(label,
    text)], labels [(key, value)], full (the whole statement or URL), frames."""
    left = min(max(offset / total * 100, 0.0), 100.0)
    width = min(max(duration / total * 100, 0.3), max(100.0 - left, 0.3))
    return {"name": name, "kind": kind, "depth": depth, "left": left, "width": width,
            "offset": offset, "duration": duration, "css": css, "detail": detail,
            "status": status, "service": None, "link": None, "note": None, "markers": [],
            "facts": [], "labels": [], "full": None, "frames": [], **extra}


def _span_facts(span: dict[str, Any]) -> dict[str, Any]:
    """What a span's detail shows (`_waterfall_row` extras): the whole statement or URL,
    destination and service target, db instance and rows affected, outcome, sync, labels,
    and its stack trace when one was recorded."""
    context = span.get("context")
    context = context if isinstance(context, dict) else {}

    def part(key: str) -> dict[str, Any]:
        value = context.get(key)
        return value if isinstance(value, dict) else {}

    db, http, destination, service, message = (
        part(key) for key in ("db", "http", "destination", "service", "message"))
    target = service.get("target")
    target = target if isinstance(target, dict) else {}
    resource = destination.get("service")
    resource = resource.get("resource") if isinstance(resource, dict) else None
    address = destination.get("address")
    if address is not None and destination.get("port") is not None:
        address = f"{address}:{destination['port']}"
    queue = message.get("queue")
    sync = span.get("sync")
    facts = [
        ("Type", _span_kind(span)), ("Outcome", span.get("outcome") or "unknown"),
        ("Sync", "" if sync is None else ("yes" if sync else "no")),
        ("Destination", address), ("Destination resource", resource),
        ("Service target", "/".join(str(target[k]) for k in ("type", "name")
                                    if target.get(k) is not None)),
        ("Database", db.get("type")), ("DB instance", db.get("instance")),
        ("DB user", db.get("user")), ("Rows affected", db.get("rows_affected")),
        ("HTTP method", http.get("method")), ("HTTP status", http.get("status_code")),
        ("Queue", queue.get("name") if isinstance(queue, dict) else None),
        ("Span id", span.get("id")),
    ]
    tags = context.get("tags")
    stacktrace = span.get("stacktrace")
    return {
        "facts": [(label, str(value)) for label, value in facts if value not in (None, "")],
        "labels": [(str(k), _repr(v)) for k, v in tags.items()] if isinstance(tags, dict)
        else [],
        "full": db.get("statement") or http.get("url") or None,
        "frames": _frames(stacktrace) if isinstance(stacktrace, list) else [],
    }


def _transaction_facts(tx: dict[str, Any]) -> list[tuple[str, str]]:
    facts = [("Service", tx["service"]), ("Version", tx.get("service_version")),
             ("Type", tx["type"]), ("Result", tx.get("result")),
             ("Outcome", tx.get("outcome") or "unknown"),
             ("Spans", tx.get("spans_started")), ("Transaction id", tx["id"])]
    return [(label, str(value)) for label, value in facts if value not in (None, "")]


def _span_kind(span: dict[str, Any]) -> str:
    return ".".join(x for x in (span["type"], span["subtype"], span["action"]) if x)


def _span_detail(span: dict[str, Any]) -> tuple[str, Any]:
    """The statement or URL shown under a span's name (cut), and an HTTP status."""
    context = span.get("context") or {}
    db = context.get("db") if isinstance(context, dict) else None
    http = context.get("http") if isinstance(context, dict) else None
    if isinstance(db, dict) and db.get("statement"):
        return _cut(db["statement"], 200), None
    if isinstance(http, dict) and http.get("url"):
        return _cut(http["url"], 200), http.get("status_code") or None
    return "", None


def _css_type(span_type: str) -> str:
    kind = span_type.split(".")[0].lower()
    return kind if kind in ("db", "external", "template", "cache", "messaging", "app") else "other"


def _service(conn: sqlite3.Connection, query: dict[str, str]) -> str:
    service = query.get("service")
    if service:
        return service
    row = conn.execute("SELECT name FROM services ORDER BY last_seen DESC LIMIT 1").fetchone()
    if row is None:
        raise NotFound("No service has sent anything yet.")
    return str(row["name"])


def _service_names(conn: sqlite3.Connection) -> list[str]:
    """Every service, for the service tabs (`macros.service_tabs`)."""
    return [r["name"] for r in conn.execute("SELECT name FROM services ORDER BY name")]


def _required(query: dict[str, str], name: str) -> str:
    value = query.get(name)
    if not value:
        raise NotFound(f"Missing parameter {name!r}.")
    return value


# --- filters: the templates' formatting of numbers, times and data ---------------------------


def _markup(text: str) -> Any:
    from markupsafe import Markup  # Jinja2's own dependency
    return Markup(text)


def _ms(value: float | None) -> Any:
    if value is None:
        return _markup("&ndash;")
    if value >= 1000:
        return _markup(f"{value / 1000:.2f}&nbsp;s")
    return _markup(f"{value:.1f}&nbsp;ms" if value >= 10 else f"{value:.2f}&nbsp;ms")


def _pct(value: float | None, scale: float = 1) -> Any:
    return _markup("&ndash;") if value is None else f"{value * scale:.1f}%"


def _mib(value: float | None) -> Any:
    return _markup("&ndash;") if value is None else _markup(f"{value / 2**20:.0f}&nbsp;MiB")


def _moment(us: Any) -> tuple[str, str] | None:
    """(ISO 8601 with the offset, "2026-12-01 14:03:07.123 UTC"): µs since the epoch in
    the receiver's local time zone, to the millisecond, the zone named."""
    if not isinstance(us, int) or isinstance(us, bool):
        return None
    try:
        seconds, micros = divmod(us, 1_000_000)
        local = time.localtime(seconds)
    except (OverflowError, OSError, ValueError):
        return None
    millis = f"{micros // 1000:03d}"
    offset = time.strftime("%z", local) or "+0000"
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{millis}{offset[:3]}:{offset[3:]}"
    zone = time.strftime("%Z", local) or f"UTC{offset}"
    return iso, time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{millis} {zone}"


def _when(us: Any) -> Any:
    """The absolute time, in a <time> element."""
    moment = _moment(us)
    if moment is None:
        return "" if not isinstance(us, int) else str(us)
    from markupsafe import escape
    return _markup(f'<time datetime="{escape(moment[0])}">{escape(moment[1])}</time>')


def _ago(us: Any, now_us: int | None = None) -> Any:
    """How long ago ("3 min ago"), computed when the page is rendered, in a <time> element
    with the absolute time as its title."""
    moment = _moment(us)
    if moment is None:
        return "" if not isinstance(us, int) else str(us)
    from markupsafe import escape
    now = time.time_ns() // 1000 if now_us is None else now_us
    return _markup(f'<time datetime="{escape(moment[0])}" title="{escape(moment[1])}">'
                   f'{escape(relative(now - us))}</time>')


def relative(delta_us: int) -> str:
    """A duration before now as people say it: "just now", "42 s ago", "3 min ago",
    "5 h ago", "2 d ago"; a time ahead of the receiver's clock (a client's clock ahead)
    is "in 3 min"."""
    seconds = abs(delta_us) / 1e6
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{int(seconds // size)} {unit}"
            break
    else:
        text = f"{int(seconds)} s"
    return f"in {text}" if delta_us < 0 else f"{text} ago"


# --- context as tables (macros.context_tables) -------------------------------------------

# Sections first in this order, titled; other keys follow by name.
_CONTEXT_SECTIONS = {"request": "Request", "response": "Response", "user": "User",
                     "tags": "Labels", "custom": "Custom", "service": "Service"}
_CONTEXT_DEPTH = 6  # nested tables this deep at most; what is below is shown as JSON


def context_sections(context: Any) -> list[dict[str, Any]]:
    """An event's context as `macros.context_tables` shows it: one section per part
    (request, response, user, labels, custom, service, then the others), each a list of
    rows {key, value, rows}: a scalar `value` as text, or nested `rows` for an object or
    a list (its items keyed by index)."""
    if context in (None, {}, []):
        return []
    if not isinstance(context, dict):
        return [{"title": "Context", "rows": _context_rows({"value": context}, 0)}]
    keys = [k for k in _CONTEXT_SECTIONS if k in context]
    keys += sorted((k for k in context if k not in _CONTEXT_SECTIONS), key=str)
    sections = []
    for key in keys:
        value = context[key]
        if value in (None, {}, []):
            continue
        rows = _context_rows(value if isinstance(value, dict | list) else {key: value}, 0)
        sections.append({"title": _CONTEXT_SECTIONS.get(key, str(key).replace("_", " ")
                                                         .capitalize()), "rows": rows})
    return sections


def _context_rows(value: dict[str, Any] | list[Any], depth: int) -> list[dict[str, Any]]:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    rows = []
    for key, item in items:
        if isinstance(item, dict | list) and item and depth < _CONTEXT_DEPTH:
            rows.append({"key": str(key), "value": None, "rows": _context_rows(item, depth + 1)})
        else:
            rows.append({"key": str(key), "rows": None,
                         "value": item if isinstance(item, str) else _pretty(item, indent=None)})
    return rows


# --- sortable tables (?sort=column&dir=asc|desc; macros.table) -------------------------------


@dataclass
class Sort:
    """The sort a table's query asks for, checked against its columns, and its headers:
    each a link that sorts by that column (the other way round if it is the current one)."""
    key: str
    descending: bool
    headers: list[Any]

    def rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`rows` sorted in Python (for a list that is complete, not a top N); missing
        values last either way."""
        present = [r for r in rows if r.get(self.key) is not None]
        missing = [r for r in rows if r.get(self.key) is None]
        present.sort(key=lambda r: _sort_value(r[self.key]), reverse=self.descending)
        return present + missing


def _sort_value(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def sort_of(query: dict[str, str], page: str, columns: Sequence[tuple[str, str | None, str]],
            default: str, default_dir: str = "desc", **params: Any) -> Sort:
    """The sort for a table of `columns` (label, sort key or None when it does not sort,
    the direction it sorts first: "asc" or "desc"); `default` names the key used when
    the query names none (or one that is not a column; it may be a key no column shows,
    sorted `default_dir` first). `params`: the page's other query."""
    directions = {key: first for _, key, first in columns if key}
    directions.setdefault(default, default_dir)
    key = query.get("sort") or default
    if key not in directions:
        key = default
    direction = query.get("dir")
    if direction not in ("asc", "desc"):
        direction = directions[key]
    headers: list[Any] = []
    for label, column, first in columns:
        if column is None:
            headers.append(label)
            continue
        on = column == key
        next_dir = ("asc" if direction == "desc" else "desc") if on else first
        headers.append({"label": label, "on": on, "dir": direction if on else None,
                        "url": href(page, **params, sort=column, dir=next_dir)})
    return Sort(key, direction == "desc", headers)


def _cut(text: Any, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _repr(value: Any) -> str:
    return _cut(value if isinstance(value, str) else _pretty(value, indent=None), 500)


def _pretty(value: Any, indent: int | None = 2) -> str:
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False)
    except RecursionError:  # very deep data: the C encoder, without indentation, copes
        return json.dumps(value, ensure_ascii=False)


@functools.cache
def _environment() -> jinja2.Environment:
    """The templates' environment, made once per process: each template is compiled on
    first use and kept (no reloading: the templates are part of the package)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("beatlib.receiver", "templates"),
        autoescape=True, auto_reload=False, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, cache_size=-1,
        finalize=lambda value: "" if value is None else value)
    environment.globals.update(href=href, trace_href=trace_href,
                               context_sections=context_sections)
    environment.filters.update(ms=_ms, pct=_pct, mib=_mib, when=_when, ago=_ago, cut=_cut,
                               pretty=_pretty, value=_repr)
    return environment


# No script runs on these pages, nothing loads from elsewhere, and no other site may frame
# them: what the app sent (names, messages, locals) is shown, escaped, and could be hostile.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' "
                               "data:; base-uri 'none'; form-action 'self'; frame-ancestors "
                               "'none'",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": with it a browser sends `Origin: null` on the pages' own form posts,
    # which the group actions must refuse (a cross-site page can send that too).
    "Referrer-Policy": "same-origin",
}


def _page(environment: jinja2.Environment, status: int, view: View,
          headers: dict[str, str] | None = None, notice: dict[str, Any] | None = None) -> Page:
    body = environment.get_template(view.template).render(
        view.context, title=view.title, notice=notice)
    return Page(status, body.encode("utf-8", "replace"),
                headers={**SECURITY_HEADERS, **(headers or {})})
