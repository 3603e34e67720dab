"""The dashboard at /ui/: server-rendered HTML from `queries`, no JavaScript.

Every value from the database goes through `e()` (html.escape, quotes too) or `href()`
before it reaches a template; templates are `string.Template`s filled only with markup
built here.
"""

from __future__ import annotations

import html
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from string import Template
from typing import Any
from urllib.parse import urlencode

from beatlib.receiver import queries
from beatlib.receiver.store import Store

ROOT = "/ui/"


@dataclass
class Page:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class NotFound(Exception):
    pass


def e(value: Any) -> str:
    """Escaped text for element content and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def href(path: str, **params: Any) -> str:
    """An escaped URL under /ui/ with the non-empty `params` as its query."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return e(ROOT + path + ("?" + query if query else ""))


def render(store: Store, path: str, query: dict[str, str]) -> Page:
    """The page at `path` (under /ui/), or a 404/503 page; never raises for bad input."""
    if not path.startswith(ROOT):
        return Page(308, b"", headers={"Location": ROOT})
    route = _ROUTES.get(path[len(ROOT):].strip("/"))
    if route is None:
        return _page(404, "Not found", "<p>No such page.</p>")
    title, handler = route
    try:
        with store.reader() as conn:
            heading, content = handler(conn, query)
    except NotFound as exc:
        return _page(404, "Not found", f"<p>{e(exc)}</p>")
    except sqlite3.OperationalError as exc:
        # Locked or still being created: a reload will do, the data is not lost.
        return _page(503, "Database busy", f"<p>The database cannot be read right now "
                     f"({e(exc)}). Reload in a moment.</p>", {"Retry-After": "1"})
    return _page(200, heading or title, _writer_notice(store.health()) + content)


def _writer_notice(health: dict[str, Any]) -> str:
    """A line on every page when the store's writer stopped or failed to store data."""
    if health["writer_running"] and not health["writer_errors"]:
        return ""
    if not health["writer_running"]:
        state = "is not running"
    else:
        state = f"could not store {health['writer_errors']} batches"
    last = f" (last: {e(health['last_error'])})" if health["last_error"] else ""
    return f'<p class="notice">The database writer {state}{last}.</p>'


# --- pages ----------------------------------------------------------------------------------


def services_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    rows = []
    for s in queries.services(conn):
        name = s["name"]
        rows.append(f"""<tr>
            <td><a href="{href('transactions', service=name)}">{e(name)}</a></td>
            <td>{e(s['environment'] or '')}</td>
            <td><a href="{href('releases', service=name)}">{e(s['version'] or '')}</a></td>
            <td>{e(s['agent'])}</td><td>{e(s['framework'] or '')}</td>
            <td class="num">{s['transactions']}</td>
            <td class="num"><a href="{href('errors', service=name)}">{s['error_groups']}</a></td>
            <td class="num">{_pct(s['cpu_pct'])}</td><td class="num">{_bytes(s['rss_bytes'])}</td>
            <td>{_when(s['last_seen'])}</td></tr>""")
    if not rows:
        return "Services", _empty("No service has sent anything yet. Point a client at this "
                                  "server (server_url) and it will show up here.")
    return "Services", _table(
        ["Service", "Environment", "Version", "Agent", "Framework", "Transactions",
         "Error groups", "CPU", "RSS", "Last seen"], rows)


def transactions_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    service = _service(conn, query)
    window = query.get("window") or queries.DEFAULT_WINDOW
    if window not in queries.WINDOWS:
        window = queries.DEFAULT_WINDOW
    choices = " ".join(
        f'<a class="chip{" on" if w == window else ""}" '
        f'href="{href("transactions", service=service, window=w)}">{e(w)}</a>'
        for w in queries.WINDOWS)
    rows = []
    for g in queries.transaction_groups(conn, service, window):
        rows.append(f"""<tr>
            <td><a href="{href('transactions/group', service=service, name=g['name'])}">
                {e(g['name'] or '(unnamed)')}</a></td>
            <td>{e(g['type'])}</td><td class="num">{g['count']}</td>
            <td class="num">{g['tpm']:.1f}</td><td class="num">{_ms(g['avg'])}</td>
            <td class="num">{_ms(g['p50'])}</td><td class="num">{_ms(g['p95'])}</td>
            <td class="num">{_ms(g['p99'])}</td>
            <td class="num">{_pct(None if g['error_rate'] is None else g['error_rate'] * 100)}</td>
            </tr>""")
    table = _table(["Name", "Type", "Count", "Per minute", "Avg", "p50", "p95", "p99",
                    "Error rate"], rows) if rows else _empty(f"No transactions in the last "
                                                            f"{e(window)}.")
    content = (_service_tabs(conn, service, "transactions", window=window)
               + f'<p class="bar">Window: {choices}</p>' + table)
    return f"Transactions of {service}", content


def transaction_group_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    service, name = _required(query, "service"), query.get("name", "")
    samples = queries.transaction_samples(conn, service, name)
    if not samples["latest"]:
        raise NotFound(f"No transaction named {name!r} in {service!r}.")
    parts = [f'<p><a href="{href("transactions", service=service)}">'
             f"&larr; all transactions of {e(service)}</a></p>"]
    for label, rows in (("Latest", samples["latest"]), ("Slowest", samples["slowest"])):
        parts.append(f"<h2>{label}</h2>")
        parts.append(_table(["When", "Duration", "Result", "Outcome", "Spans"], [
            f"""<tr>
                <td><a href="{href('transaction', id=t['id'])}">{_when(t['timestamp'])}</a></td>
                <td class="num">{_ms(t['duration'])}</td><td>{e(t['result'] or '')}</td>
                <td>{_outcome(t['outcome'])}</td>
                <td class="num">{e(t['spans_started'])}</td></tr>"""
            for t in rows]))
    return name or "(unnamed)", "".join(parts)


def transaction_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    tx = queries.transaction(conn, _required(query, "id"))
    if tx is None:
        raise NotFound("No such transaction.")
    total = max(tx["duration"], 1e-6)
    facts = _facts([
        ("Service", f'<a href="{href("transactions", service=tx["service"])}">'
                    f'{e(tx["service"])}</a>'),
        ("Type", e(tx["type"])), ("Duration", _ms(tx["duration"])),
        ("Result", e(tx["result"] or "")), ("Outcome", _outcome(tx["outcome"])),
        ("When", _when(tx["timestamp"])), ("Version", e(tx["service_version"] or "")),
        ("Trace", f"<code>{e(tx['trace_id'])}</code>"),
    ])
    rows = [_waterfall_row(tx["name"] or "(transaction)", tx["type"], 0, 0.0, tx["duration"],
                           total, "transaction", "")]
    for span in tx["spans"]:
        rows.append(_waterfall_row(span["name"], _span_kind(span), span["depth"],
                                   span["offset"], span["duration"], total,
                                   _css_type(span["type"]), _span_detail(span)))
    errors = "".join(
        f"""<li><a href="{href('error', service=err['service'], key=err['grouping_key'])}">
            {e(err['type'] or 'log')}: {e(_cut(err['message'], 160))}</a>
            <span class="muted">{e(err['culprit'] or '')}</span></li>"""
        for err in tx["errors"])
    content = facts + '<h2>Waterfall</h2><div class="waterfall">' + "".join(rows) + "</div>"
    if errors:
        content += f"<h2>Errors</h2><ul>{errors}</ul>"
    if tx["context"]:
        content += f"<h2>Context</h2><pre>{e(_pretty(tx['context']))}</pre>"
    return tx["name"] or "(unnamed transaction)", content


def errors_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    service, assignee = query.get("service"), query.get("assignee")
    people = queries.assignees(conn)
    chips = [f'<a class="chip{"" if assignee else " on"}" '
             f'href="{href("errors", service=service)}">everyone</a>']
    chips += [f'<a class="chip{" on" if p["key"] == assignee else ""}" '
              f'href="{href("errors", service=service, assignee=p["key"])}">'
              f'{e(p["name"] or p["email"])} ({p["groups"]})</a>' for p in people]
    rows = []
    for g in queries.error_groups(conn, service, assignee):
        link = href("error", service=g["service"], key=g["grouping_key"])
        rows.append(f"""<tr>
            <td><a href="{link}"><b>{e(g['type'] or 'log message')}</b>
                {e(_cut(g['message'], 120))}</a>
                <div class="muted">{e(g['culprit'] or '')}</div></td>
            <td>{e(g['service'])}</td><td class="num">{g['count']}</td>
            <td>{_when(g['first_seen'])}</td><td>{_when(g['last_seen'])}</td>
            <td>{e(g['first_version'] or '')}</td><td>{_assignee(g)}</td></tr>""")
    table = _table(["Error", "Service", "Count", "First seen", "Last seen", "First release",
                    "Assignee"], rows) if rows else _empty("No errors" + (
                        " assigned to " + e(assignee) if assignee else "") + ".")
    tabs = _service_tabs(conn, service, "errors", assignee=assignee) if service else ""
    return "Errors", tabs + f'<p class="bar">Assignee: {" ".join(chips)}</p>' + table


def error_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    service, key = _required(query, "service"), _required(query, "key")
    group = queries.error_group(conn, service, key)
    if group is None:
        raise NotFound("No such error group.")
    facts = _facts([
        ("Service", f'<a href="{href("errors", service=service)}">{e(service)}</a>'),
        ("Culprit", f"<code>{e(group['culprit'] or '')}</code>"),
        ("Occurrences", str(group["count"])), ("First seen", _when(group["first_seen"])),
        ("Last seen", _when(group["last_seen"])),
        ("First release", e(group["first_version"] or "")),
        ("Assignee", _assignee(group, with_commit=True)),
        ("Grouping key", f"<code>{e(key)}</code>"),
    ])
    content = facts
    latest = group["latest"] or {}
    if latest:
        content += "<h2>Latest occurrence</h2>" + _occurrence(latest)
    content += "<h2>Occurrences</h2>" + _table(["When", "Message", "Release", "Transaction"], [
        f"""<tr><td>{_when(o['timestamp'])}</td><td>{e(_cut(o['message'], 120))}</td>
            <td>{e(o['service_version'] or '')}</td><td>{_tx_link(o)}</td></tr>"""
        for o in group["occurrences"]])
    title = f"{group['type'] or 'Log message'}: {_cut(group['message'], 100)}"
    return title, content


def releases_page(conn: sqlite3.Connection, query: dict[str, str]) -> tuple[str, str]:
    service = query.get("service")
    parts = []
    for r in queries.releases(conn, service):
        groups = "".join(
            f"""<li><a href="{href('error', service=r['service'], key=g['grouping_key'])}">
                <b>{e(g['type'] or 'log message')}</b> {e(_cut(g['message'], 100))}</a>
                <span class="muted">{e(g['culprit'] or '')} &middot; {g['count']}&times;
                &middot; {_assignee(g)}</span></li>"""
            for g in r["new_error_groups"])
        new = (f"<ul>{groups}</ul>" if groups
               else '<p class="muted">No new error groups.</p>')
        deploy = ""
        if r["deployed_at"]:
            facts = [("Deployed", e(r["deployed_at"])), ("Environment", e(r["environment"])),
                     ("Branch", e(r["branch"] or "")),
                     ("Commit", f"<code>{e((r['commit_sha'] or '')[:12])}</code>"),
                     ("Since", e(r["previous"] or ""))]
            commits = "".join(
                f"<li><code>{e(c.get('commit'))}</code> {e(c.get('subject'))} "
                f'<span class="muted">{e(c.get("author"))}</span></li>'
                for c in r["commits"] if isinstance(c, dict))
            deploy = _facts(facts) + (f"<details><summary>{len(r['commits'])} commits"
                                      f"</summary><ul>{commits}</ul></details>"
                                      if commits else "")
        parts.append(f"""<section class="release">
            <h2>{e(r['service'])} <code>{e(r['version'])}</code></h2>
            <p class="muted">first seen {_when(r['first_seen'])}, last seen
               {_when(r['last_seen'])} &middot; {r['transactions']} transactions &middot;
               {r['errors']} errors</p>{deploy}
            <h3>Error groups first seen in this release</h3>{new}</section>""")
    if not parts:
        return "Releases", _empty("No release yet: releases are the service versions "
                                  "(service_version) clients report.")
    tabs = _service_tabs(conn, service, "releases") if service else ""
    return "Releases", tabs + "".join(parts)


_Handler = Callable[[sqlite3.Connection, dict[str, str]], tuple[str, str]]
_ROUTES: dict[str, tuple[str, _Handler]] = {
    "": ("Services", services_page),
    "transactions": ("Transactions", transactions_page),
    "transactions/group": ("Transactions", transaction_group_page),
    "transaction": ("Transaction", transaction_page),
    "errors": ("Errors", errors_page),
    "error": ("Error", error_page),
    "releases": ("Releases", releases_page),
}


# --- pieces -----------------------------------------------------------------------------


def _occurrence(error: dict[str, Any]) -> str:
    """An error event: each exception of its chain with its frames, or the log record."""
    parts = []
    exc, depth = error.get("exception"), 0
    while isinstance(exc, dict) and depth < 10:
        label = "Exception" if depth == 0 else "Caused by"
        handled = exc.get("handled")
        flag = "" if handled is None else (" (handled)" if handled else " (unhandled)")
        module = f"{exc['module']}." if exc.get("module") else ""
        parts.append(f"""<h3>{label}: {e(module)}{e(exc.get('type') or '')}{flag}</h3>
            <pre class="message">{e(exc.get('message') or '')}</pre>""")
        parts.append(_frames(exc.get("stacktrace") or []))
        causes = exc.get("cause")
        exc = causes[0] if isinstance(causes, list) and causes else None
        depth += 1
    log = error.get("log")
    if isinstance(log, dict):
        parts.append(f"""<h3>Log message ({e(log.get('level') or '')}
            {e(log.get('logger_name') or '')})</h3>
            <pre class="message">{e(log.get('message') or '')}</pre>""")
        parts.append(_frames(log.get("stacktrace") or []))
    context = error.get("context")
    if context:
        parts.append(f"<h3>Context</h3><pre>{e(_pretty(context))}</pre>")
    if error.get("transaction_id"):
        tx = error.get("transaction") or {}
        link = _tx_link({"transaction_id": error["transaction_id"],
                         "transaction_name": tx.get("name") if isinstance(tx, dict) else None})
        parts.append(f"<p>In transaction {link}</p>")
    return "".join(parts)


def _frames(frames: Iterable[Any]) -> str:
    out = []
    for frame in frames:
        if not isinstance(frame, dict):
            continue
        library = bool(frame.get("library_frame"))
        lineno = frame.get("lineno")
        where = f"{frame.get('filename') or frame.get('module') or '?'}"
        if isinstance(lineno, int):
            where += f":{lineno}"
        source = _source(frame, lineno if isinstance(lineno, int) else None)
        local_vars = frame.get("vars")
        variables = ""
        if isinstance(local_vars, dict) and local_vars:
            variables = _table(["Local", "Value"], [
                f"<tr><td><code>{e(k)}</code></td><td><code>{e(_repr(v))}</code></td></tr>"
                for k, v in local_vars.items()], css="vars")
        summary = (f"<code>{e(frame.get('function') or '?')}</code> in <code>{e(where)}</code>"
                   + (' <span class="muted">library</span>' if library else ""))
        out.append(f'<details class="frame{" lib" if library else ""}"'
                   f'{"" if library else " open"}><summary>{summary}</summary>'
                   f"{source}{variables}</details>")
    return "".join(out) or '<p class="muted">No stack trace.</p>'


def _source(frame: dict[str, Any], lineno: int | None) -> str:
    line = frame.get("context_line")
    if not isinstance(line, str):
        return ""
    pre = [x for x in frame.get("pre_context") or [] if isinstance(x, str)]
    post = [x for x in frame.get("post_context") or [] if isinstance(x, str)]
    first = (lineno - len(pre)) if lineno is not None else None
    rows = []
    for i, text in enumerate([*pre, line, *post]):
        number = "" if first is None else str(first + i)
        css = ' class="hit"' if i == len(pre) else ""
        rows.append(f'<span{css}><span class="ln">{number}</span>{e(text)}</span>')
    return f'<pre class="source">{"".join(rows)}</pre>'


def _waterfall_row(name: str, kind: str, depth: int, offset: float, duration: float,
                   total: float, css: str, detail: str) -> str:
    left = min(max(offset / total * 100, 0.0), 100.0)
    width = min(max(duration / total * 100, 0.3), max(100.0 - left, 0.3))
    return (f'<div class="wf-row"><div class="wf-label" style="padding-left:{depth * 14}px">'
            f'<span class="badge {css}">{e(kind)}</span> {e(name)}'
            f'{f"<div class=muted>{detail}</div>" if detail else ""}</div>'
            f'<div class="wf-track"><div class="wf-bar {css}" '
            f'style="margin-left:{left:.3f}%;width:{width:.3f}%"></div></div>'
            f'<div class="wf-time">{_ms(duration)}</div></div>')


def _span_kind(span: dict[str, Any]) -> str:
    return ".".join(x for x in (span["type"], span["subtype"], span["action"]) if x)


def _span_detail(span: dict[str, Any]) -> str:
    context = span.get("context") or {}
    db = context.get("db") if isinstance(context, dict) else None
    http = context.get("http") if isinstance(context, dict) else None
    if isinstance(db, dict) and db.get("statement"):
        return e(_cut(db["statement"], 200))
    if isinstance(http, dict) and http.get("url"):
        status = http.get("status_code")
        return e(_cut(http["url"], 200)) + (f" &rarr; {e(status)}" if status else "")
    return ""


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


def _service_tabs(conn: sqlite3.Connection, current: str | None, page: str, **params: Any) -> str:
    names = [r["name"] for r in conn.execute("SELECT name FROM services ORDER BY name")]
    if len(names) < 2:
        return ""
    return '<p class="bar">Service: ' + " ".join(
        f'<a class="chip{" on" if n == current else ""}" href="{href(page, service=n, **params)}">'
        f"{e(n)}</a>" for n in names) + "</p>"


def _required(query: dict[str, str], name: str) -> str:
    value = query.get(name)
    if not value:
        raise NotFound(f"Missing parameter {name!r}.")
    return value


def _tx_link(o: dict[str, Any]) -> str:
    if not o.get("transaction_id"):
        return ""
    return (f'<a href="{href("transaction", id=o["transaction_id"])}">'
            f'{e(o.get("transaction_name") or o["transaction_id"])}</a>')


def _assignee(g: dict[str, Any], with_commit: bool = False) -> str:
    name, email = g.get("assignee_name"), g.get("assignee_email")
    if not name and not email:
        return '<span class="muted">unassigned</span>'
    text = e(name or email) + (f' <span class="muted">&lt;{e(email)}&gt;</span>'
                               if email and name else "")
    if with_commit and g.get("assignee_commit"):
        text += (f' <span class="muted">commit <code>{e(str(g["assignee_commit"])[:12])}</code>'
                 f' {e(g.get("assignee_date") or "")}</span>')
    return text


def _facts(items: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(
        f"<div><dt>{e(k)}</dt><dd>{v}</dd></div>" for k, v in items) + "</dl>"


def _table(headers: list[str], rows: Iterable[str], css: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _empty(text: str) -> str:
    return f'<p class="empty">{text}</p>'


def _outcome(outcome: str | None) -> str:
    css = {"success": "ok", "failure": "bad"}.get(outcome or "", "muted")
    return f'<span class="{css}">{e(outcome or "unknown")}</span>'


def _ms(value: float | None) -> str:
    if value is None:
        return "&ndash;"
    if value >= 1000:
        return f"{value / 1000:.2f}&nbsp;s"
    return f"{value:.1f}&nbsp;ms" if value >= 10 else f"{value:.2f}&nbsp;ms"


def _pct(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.1f}%"


def _bytes(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value / 2**20:.0f}&nbsp;MiB"


def _when(us: int | None) -> str:
    if not isinstance(us, int):
        return ""
    seconds = us / 1e6
    try:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return e(us)
    return f'<time datetime="{e(us)}">{text}</time>'


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


# No script runs on these pages, nothing loads from elsewhere, and no other site may frame
# them: what the app sent (names, messages, locals) is shown, escaped, and could be hostile.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' "
                               "data:; base-uri 'none'; form-action 'self'; frame-ancestors "
                               "'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _page(status: int, title: str, content: str, headers: dict[str, str] | None = None) -> Page:
    body = _LAYOUT.substitute(title=e(title), css=_CSS, content=content, nav=_NAV)
    return Page(status, body.encode("utf-8", "replace"),
                headers={**SECURITY_HEADERS, **(headers or {})})


_NAV = "".join(f'<a href="{href(path)}">{label}</a>' for path, label in (
    ("", "Services"), ("transactions", "Transactions"), ("errors", "Errors"),
    ("releases", "Releases")))
_LAYOUT = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title &middot; beatlib</title><style>$css</style></head>
<body><header><a class="brand" href="/ui/">beatlib</a><nav>$nav</nav></header>
<main><h1>$title</h1>
$content
</main></body></html>
""")
_CSS = """
.notice { background:#fff4e5; border:1px solid #f0b46c; padding:8px 12px; border-radius:4px; }
:root { --fg:#1d2330; --muted:#6b7385; --line:#e3e6ee; --bg:#f6f7fb; --accent:#3a5bd9; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
header { display:flex; gap:24px; align-items:center; padding:10px 24px; background:#1d2330; }
header a { color:#dfe5ff; text-decoration:none; margin-right:16px; }
header .brand { font-weight:700; color:#fff; font-size:16px; }
main { padding:16px 24px 48px; max-width:1400px; }
h1 { font-size:20px; margin:8px 0 16px; word-break:break-word; }
h2 { font-size:16px; margin:24px 0 8px; } h3 { font-size:14px; margin:16px 0 6px; }
a { color:var(--accent); }
table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { background:#eef0f6; font-weight:600; font-size:12px; text-transform:uppercase;
     color:var(--muted); }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.muted { color:var(--muted); font-size:12px; } .ok { color:#18794e; } .bad { color:#c62828; }
.empty { padding:24px; background:#fff; border:1px dashed var(--line); color:var(--muted); }
.bar { margin:8px 0 12px; }
.chip { display:inline-block; padding:2px 10px; margin:2px; border-radius:12px;
        border:1px solid var(--line); background:#fff; text-decoration:none; }
.chip.on { background:var(--accent); color:#fff; border-color:var(--accent); }
dl.facts { display:flex; flex-wrap:wrap; gap:8px 28px; margin:0 0 12px; }
dl.facts dt { font-size:11px; text-transform:uppercase; color:var(--muted); }
dl.facts dd { margin:0; }
pre { background:#fff; border:1px solid var(--line); padding:8px; overflow:auto;
      white-space:pre-wrap; word-break:break-word; }
pre.message { background:#fff5f5; border-color:#f3c9c9; }
pre.source { padding:0; white-space:pre; }
pre.source > span { display:block; padding:0 8px; }
pre.source .hit { background:#fff1b8; }
pre.source .ln { display:inline-block; width:44px; color:var(--muted); user-select:none; }
details.frame { background:#fff; border:1px solid var(--line); margin:4px 0; padding:4px 8px; }
details.frame.lib summary { color:var(--muted); }
table.vars td { font-size:12px; }
.waterfall { background:#fff; border:1px solid var(--line); }
.wf-row { display:grid; grid-template-columns: 38% 1fr 90px; gap:8px; padding:4px 8px;
          border-bottom:1px solid var(--line); align-items:center; }
.wf-label { overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.wf-label .muted { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.wf-track { background:#f0f2f8; height:14px; border-radius:3px; }
.wf-bar { height:14px; border-radius:3px; background:#8a93a8; }
.wf-time { text-align:right; font-variant-numeric:tabular-nums; }
.badge { font-size:11px; padding:1px 6px; border-radius:8px; color:#fff; background:#8a93a8; }
.transaction { background:#3a5bd9; } .db { background:#d97a3a; } .external { background:#2e9e6b; }
.template { background:#9a4fd1; } .cache { background:#c9a227; } .app { background:#5a6b8c; }
.release { background:#fff; border:1px solid var(--line); padding:4px 16px 12px; margin:12px 0; }
"""
