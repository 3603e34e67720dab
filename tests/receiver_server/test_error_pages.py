"""The error group page (stepping through occurrences, the status forms, regressions), the
errors list by status and the releases page's before/after comparison: a real beatlib client
sends to the real receiver, and the pages and forms are used over its real HTTP endpoint."""

from __future__ import annotations

import html
import http.client
import math
import re
import sqlite3
import time
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlencode, urljoin

import beatlib
from beatlib.receiver import Receiver, queries
from beatlib.receiver.group_state import action_path
from tests.receiver_server.conftest import get


def client_for(receiver: Receiver, version: str) -> beatlib.Client:
    return beatlib.Client(service_name="shop", server_url=receiver.url, service_version=version,
                          flush_interval="50ms", assign_errors=False)


def charge(total: int) -> None:
    raise ValueError(f"cannot charge <b>{total}</b>")


def fail_charge(client: beatlib.Client, receiver: Receiver, total: int,
                handled: bool = True) -> None:
    """One ValueError with `total` among its locals, in a transaction, with a request."""
    client.begin_transaction("request")
    try:
        charge(total)
    except ValueError:
        client.capture_exception(handled=handled, request={
            "method": "POST", "url": {"full": f"http://shop.test/orders/{total}",
                                      "pathname": f"/orders/{total}"}})
    client.end_transaction(f"POST /orders/{total}", "HTTP 5xx")
    assert client.flush(10)
    assert receiver.flush(10)


def group_key(receiver: Receiver) -> str:
    with receiver.store.reader() as conn:
        [row] = conn.execute("SELECT grouping_key FROM error_groups").fetchall()
    return str(row[0])


def page(receiver: Receiver, path: str, **params: str) -> str:
    status, body = get(f"{receiver.url}/ui/{path}?{urlencode(params)}")
    assert status == 200, body[:500]
    return body.decode()


def link(body: str, rel: str) -> str | None:
    found = re.search(rf'<a class="chip" rel="{rel}" href="([^"]+)"', body)
    return html.unescape(found.group(1)) if found else None


class Forms(HTMLParser):
    """Every form of a page: action, method and its fields with their values (a select's
    options listed)."""

    def __init__(self, body: str) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.feed(body)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a["action"], "method": a["method"], "fields": {},
                               "options": []})
        elif tag in ("button", "select") and self.forms:
            self.forms[-1]["fields"][a["name"]] = a.get("value")
        elif tag == "option" and self.forms:
            self.forms[-1]["options"].append(a["value"])

    def by_action(self, suffix: str) -> dict[str, Any] | None:
        return next((f for f in self.forms if f["action"].endswith("/" + suffix)), None)


def submit(receiver: Receiver, form: dict[str, Any], **fields: str) -> http.client.HTTPResponse:
    """Posts the form as a browser on the dashboard's page does (same origin)."""
    assert form["method"] == "post"
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
    body = urlencode({**{k: v or "" for k, v in form["fields"].items()}, **fields})
    conn.request("POST", form["action"], body=body.encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Origin": receiver.url,
        "Sec-Fetch-Site": "same-origin"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def escaped(value: str) -> str:
    """`value` as Jinja2's autoescaping writes it."""
    return html.escape(value).replace("&quot;", "&#34;").replace("&#x27;", "&#39;")


def text(body: str) -> str:
    """The page's text without tags, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_stepping_through_occurrences_newest_first(serve: Receiver) -> None:
    client = client_for(serve, "1.0")
    try:
        for total in (1, 2, 3):
            fail_charge(client, serve, total, handled=total != 2)
    finally:
        client.close()
    key = group_key(serve)

    latest = page(serve, "error", service="shop", key=key)
    assert "Occurrence 1 of 3 (the latest)" in text(latest)
    assert "cannot charge &lt;b&gt;3&lt;/b&gt;" in latest
    assert "http://shop.test/orders/3" in latest  # its request
    assert link(latest, "prev") is None
    assert re.search(r"<dt>Handled</dt><dd>handled</dd>", latest)

    older = link(latest, "next")
    assert older is not None
    status, body = get(urljoin(serve.url, older))
    second = body.decode()
    plain = text(second)
    assert status == 200 and "Occurrence 2 of 3" in plain and "(the latest)" not in plain
    assert "cannot charge &lt;b&gt;2&lt;/b&gt;" in second
    shown = second.split('id="occurrence"')[1].split("Recent occurrences")[0]
    assert "cannot charge &lt;b&gt;3&lt;/b&gt;" not in shown
    assert "http://shop.test/orders/2" in second
    assert re.search(r"<dt>Handled</dt><dd>unhandled</dd>", second)
    assert "ValueError (unhandled)" in plain
    # Its locals: `total` was 2 in this one.
    assert re.search(r"<td><code>total</code></td><td><code>2</code></td>", second)

    status, body = get(urljoin(serve.url, link(second, "next") or ""))
    oldest = body.decode()
    assert status == 200 and "Occurrence 3 of 3" in text(oldest)
    assert link(oldest, "next") is None and link(oldest, "prev") == older
    assert re.search(r"<td><code>total</code></td><td><code>1</code></td>", oldest)

    # The recent list: newest first, each linking to itself, the one shown marked.
    rows = re.findall(r'<tr( class="current")?><td><a href="([^"]+)">', oldest)
    with serve.store.reader() as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM errors ORDER BY timestamp DESC")]
    assert [html.unescape(url).rsplit("occurrence=", 1)[1] for _, url in rows] == ids
    assert [bool(current) for current, _ in rows] == [False, False, True]
    assert "handled unhandled handled" in " ".join(
        re.findall(r"<td>(handled|unhandled)</td>", oldest))

    # An id that is not an occurrence of this group is not found.
    assert get(f"{serve.url}/ui/error?service=shop&key={key}&occurrence=nope")[0] == 404


def test_status_forms_change_the_group_and_a_regression_says_where(serve: Receiver) -> None:
    versions = ["1.0", '1.1"><b id=v>', "1.2<script>"]  # markup in versions: escaped
    client = client_for(serve, versions[0])
    try:
        fail_charge(client, serve, 1)
    finally:
        client.close()
    client = client_for(serve, versions[1])
    try:
        fail_charge(client, serve, 2)
    finally:
        client.close()
    key = group_key(serve)

    body = page(serve, "error", service="shop", key=key)
    forms = Forms(body)
    resolve, ignore = forms.by_action("resolve"), forms.by_action("ignore")
    assert resolve and ignore and forms.by_action("reopen") is None
    assert resolve["action"] == action_path("shop", key, "resolve")
    assert resolve["options"] == ["", versions[1], versions[0]]  # the latest first
    assert "<b id=v>" not in body and escaped(versions[1]) in body
    assert ">open<" in body
    assert "shop" in text(page(serve, "errors"))  # open groups are listed by default

    response = submit(serve, resolve, version=versions[0])
    assert response.status == 303
    assert response.getheader("Location") == f"/ui/error?service=shop&key={key}"
    body = page(serve, "error", service="shop", key=key)
    plain = text(body)
    assert "resolved" in plain and f"in release {versions[0]}" in plain
    forms = Forms(body)
    assert forms.by_action("resolve") is None and forms.by_action("reopen")
    assert "ValueError" not in text(page(serve, "errors"))  # not open any more
    assert "ValueError" in text(page(serve, "errors", status="resolved"))
    assert "ValueError" in text(page(serve, "errors", status="all"))
    assert "resolved (1)" in text(page(serve, "errors"))

    ignore = forms.by_action("ignore")
    assert ignore and submit(serve, ignore).status == 303
    assert "ValueError" in text(page(serve, "errors", status="ignored"))
    reopen = Forms(page(serve, "error", service="shop", key=key)).by_action("reopen")
    assert reopen and submit(serve, reopen).status == 303
    with serve.store.reader() as conn:
        assert conn.execute("SELECT status FROM error_groups").fetchone()[0] == "open"

    # Resolved (in the latest version by default), then it happens again in a later one.
    resolve = Forms(page(serve, "error", service="shop", key=key)).by_action("resolve")
    assert resolve and submit(serve, resolve).status == 303
    with serve.store.reader() as conn:
        assert conn.execute("SELECT resolved_in_version FROM error_groups").fetchone()[0] == \
            versions[1]
    time.sleep(0.01)
    client = client_for(serve, versions[2])
    try:
        fail_charge(client, serve, 3)
    finally:
        client.close()
    body = page(serve, "error", service="shop", key=key)
    assert "<script>" not in body and "<b id=v>" not in body
    assert f"regressed in {versions[2]}" in text(body) and "(1 time)" in text(body)
    assert ">open<" in body and Forms(body).by_action("resolve")
    errors = page(serve, "errors")
    assert f"regressed in {versions[2]}" in text(errors)
    assert "1 open group regressed" in text(errors)
    releases = text(page(serve, "releases", service="shop"))
    newest = releases.split(f"shop {versions[1]}")[0]
    assert f"shop {versions[2]}" in newest
    regressed = newest.split("Error groups that regressed in this release")[1]
    assert "ValueError cannot charge <b>3</b>" in regressed


def stats(rows: list[sqlite3.Row]) -> dict[str, Any]:
    """What the releases page says of one version's transactions of one name, computed here
    from the stored rows: the definitions docs/receiver.md gives."""
    def failed(r: sqlite3.Row) -> bool | None:
        if r["outcome"] in ("success", "failure"):
            return r["outcome"] == "failure"
        if (r["result"] or "").startswith("HTTP "):
            return r["result"].startswith("HTTP 5")
        return None
    outcomes = [f for f in map(failed, rows) if f is not None]
    durations = sorted(r["duration"] for r in rows)
    return {"count": len(rows), "failures": sum(outcomes),
            "error_rate": sum(outcomes) / len(outcomes) if outcomes else None,
            "p95": durations[math.ceil(len(durations) * 0.95) - 1] if durations else None}


def test_release_comparison_matches_the_stored_rows(serve: Receiver) -> None:
    # Three versions; names with different counts so the top five are a choice, some
    # names only in one version, failures at different rates.
    plan = {"1.0": {"GET /a": (30, 3), "GET /b": (20, 0), "GET /c": (8, 4), "GET /old": (9, 1)},
            "1.1": {"GET /a": (25, 10), "GET /b": (22, 2), "GET /c": (5, 0), "GET /d": (12, 6),
                    "GET /e": (7, 7), "GET /f": (3, 0), "GET /g": (2, 1)},
            "1.2": {"GET /a": (10, 0)}}
    for version, names in plan.items():
        client = client_for(serve, version)
        try:
            for name, (count, failures) in names.items():
                for i in range(count):
                    client.begin_transaction("request")
                    time.sleep(0.0002 * (i % 7))
                    client.end_transaction(name, "HTTP 5xx" if i < failures else "HTTP 2xx")
            assert client.flush(10)
        finally:
            client.close()
        assert serve.flush(10)
        time.sleep(0.01)  # versions first seen one after another
    with serve.store.reader() as conn:
        rows = conn.execute("SELECT * FROM transactions").fetchall()
        releases = queries.releases(conn, "shop")
    assert [r["version"] for r in releases] == ["1.2", "1.1", "1.0"]
    previous = {"1.2": "1.1", "1.1": "1.0", "1.0": None}
    for release in releases:
        version = release["version"]
        assert release["previous_version"] == previous[version]
        mine = [r for r in rows if r["service_version"] == version]
        counts: dict[str, int] = {}
        for r in mine:
            counts[r["name"]] = counts.get(r["name"], 0) + 1
        top = sorted(counts, key=lambda n: (-counts[n], n))[:5]
        assert [c["name"] for c in release["comparison"]] == top
        for c in release["comparison"]:
            expected = stats([r for r in mine if r["name"] == c["name"]])
            assert {k: c["after"][k] for k in expected} == expected
            if previous[version] is None:
                assert c["before"] is None
            else:
                expected = stats([r for r in rows if r["service_version"] == previous[version]
                                  and r["name"] == c["name"]])
                assert {k: c["before"][k] for k in expected} == expected
    one_one = next(r for r in releases if r["version"] == "1.1")
    assert [c["name"] for c in one_one["comparison"]] == \
        ["GET /a", "GET /b", "GET /d", "GET /e", "GET /c"]
    assert one_one["comparison"][2]["before"]["count"] == 0  # GET /d is new in 1.1

    body = page(serve, "releases", service="shop")
    plain = text(body)
    section = plain.split("shop 1.1")[1].split("shop 1.0")[0]
    assert "Before: the transactions version 1.0" in section and "those 1.1 sent" in section
    a = one_one["comparison"][0]
    assert f"GET /a 30 25 {a['before']['error_rate'] * 100:.1f}% " \
           f"{a['after']['error_rate'] * 100:.1f}%" in section
    assert "nothing before it to compare with" in plain.split("shop 1.0")[1]


def test_the_new_queries_read_through_indexes(serve: Receiver) -> None:
    """Every statement the error and releases pages run searches an index (no full scan)."""
    client = client_for(serve, "1.0")
    try:
        fail_charge(client, serve, 1)
        fail_charge(client, serve, 2)
    finally:
        client.close()
    key = group_key(serve)
    with serve.store.reader() as conn:
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        try:
            latest = queries.error_occurrence(conn, "shop", key)
            assert latest is not None
            queries.error_occurrence(conn, "shop", key, latest["older"])
            queries.group_statuses(conn, "shop")
            queries.service_versions(conn, "shop")
            queries.error_groups(conn, "shop", status="open")
            queries.releases(conn, "shop")
        finally:
            conn.set_trace_callback(None)
        plans = [row[3] for sql in statements
                 for row in conn.execute("EXPLAIN QUERY PLAN " + sql, ())]
    assert plans and not [p for p in plans if p.startswith("SCAN")], plans
