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
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from beatlib.receiver import group_state, queries
from beatlib.receiver.store import Store

if TYPE_CHECKING:
    import jinja2

ROOT = "/ui/"
INSTALL_HINT = "pip install -e '.[serve]' (in a checkout of beatlib)"


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


def services_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    return View("services.html", "Services", {"services": queries.services(conn)})


def transactions_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service = _service(conn, query)
    window = query.get("window") or queries.DEFAULT_WINDOW
    if window not in queries.WINDOWS:
        window = queries.DEFAULT_WINDOW
    windows = [(w, href("transactions", service=service, window=w), w == window)
               for w in queries.WINDOWS]
    return View("transactions.html", f"Transactions of {service}", {
        "service": service, "window": window, "windows": windows,
        "services": _service_names(conn),
        "groups": queries.transaction_groups(conn, service, window)})


def transaction_group_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service, name = _required(query, "service"), query.get("name", "")
    samples = queries.transaction_samples(conn, service, name)
    if not samples["latest"]:
        raise NotFound(f"No transaction named {name!r} in {service!r}.")
    return View("transaction_group.html", name or "(unnamed)",
                {"service": service, "samples": samples})


def transaction_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    tx = queries.transaction(conn, _required(query, "id"))
    if tx is None:
        raise NotFound("No such transaction.")
    total = max(tx["duration"], 1e-6)
    waterfall = [_waterfall_row(tx["name"] or "(transaction)", tx["type"], 0, 0.0,
                                tx["duration"], total, "transaction")]
    for span in tx["spans"]:
        waterfall.append(_waterfall_row(span["name"], _span_kind(span), span["depth"],
                                        span["offset"], span["duration"], total,
                                        _css_type(span["type"]), *_span_detail(span)))
    return View("transaction.html", tx["name"] or "(unnamed transaction)",
                {"tx": tx, "waterfall": waterfall})


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
    groups = queries.error_groups(conn, service, assignee,
                                  status=None if status == "all" else status)
    # Regressed groups first among the open ones: they were thought fixed.
    groups.sort(key=lambda g: not (g["status"] == "open" and g["regressions"]))
    return View("errors.html", "Errors", {
        "service": service, "assignee": assignee, "people": people, "status": status,
        "statuses": statuses, "counts": counts,
        "services": _service_names(conn) if service else [], "groups": groups})


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
        "actions": actions, "versions": queries.service_versions(conn, service)})


def releases_page(conn: sqlite3.Connection, query: dict[str, str]) -> View:
    service = query.get("service")
    return View("releases.html", "Releases", {
        "service": service, "releases": queries.releases(conn, service),
        "services": _service_names(conn) if service else []})


_Handler = Callable[[sqlite3.Connection, dict[str, str]], View]
_ROUTES: dict[str, _Handler] = {
    "": services_page,
    "transactions": transactions_page,
    "transactions/group": transaction_group_page,
    "transaction": transaction_page,
    "errors": errors_page,
    "error": error_page,
    "releases": releases_page,
}


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
                   total: float, css: str, detail: str = "", status: Any = None
                   ) -> dict[str, Any]:
    left = min(max(offset / total * 100, 0.0), 100.0)
    width = min(max(duration / total * 100, 0.3), max(100.0 - left, 0.3))
    return {"name": name, "kind": kind, "depth": depth, "left": left, "width": width,
            "duration": duration, "css": css, "detail": detail, "status": status}


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


def _when(us: Any) -> Any:
    if not isinstance(us, int):
        return ""
    try:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(us / 1e6))
    except (OverflowError, OSError, ValueError):
        return str(us)
    return _markup(f'<time datetime="{us}">{text}</time>')


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
    environment.globals["href"] = href
    environment.filters.update(ms=_ms, pct=_pct, mib=_mib, when=_when, cut=_cut,
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
