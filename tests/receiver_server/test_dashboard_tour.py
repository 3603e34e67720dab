"""The whole dashboard toured in a real headless Chromium: `beatlib demo`'s traffic (plus a
few events whose names are markup), then every same-origin link reachable from /ui/ and the
pages the demo says to open, followed breadth first. Each page must answer 200, render
without a template error, show the apps' data as text only, draw its charts with data, and
point its in-page anchors at something. One screenshot per route in test-artifacts/."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

import beatlib
from beatlib import context
from beatlib.receiver import Receiver, ui
from tests.receiver_server.test_dashboard_browser import Devtools, pytestmark  # noqa: F401
from tests.receiver_server.test_trace_browser import Rows

SRC = str(Path(__file__).resolve().parents[2] / "src")
DEMO = [sys.executable, "-c", "import sys; from beatlib.cli import main; sys.exit(main())",
        "demo", "--port", "0", "--requests", "120"]
SERVICE = "beatlib-demo"
# At most this many pages (0.3 to 0.5 s each on two shared cores): the other orderings of
# the tables come after every page that shows something else, as far as the cap allows.
MAX_PAGES = 120
PROBE = "xss-probe"  # the class of every element the probe events try to smuggle in
# The charts that are empty, in every window, on a transaction name's page: the price API
# does no I/O of its own (it sleeps); the probe's bare capture_span names no destination.
EMPTY_ON_GROUP = {"GET /api/prices/<int:product_id>": {"span-types", "dependencies"},
                  f'GET /<script class="{PROBE}">alert(1)</script>': {"dependencies"}}

# Everything one page is checked on, read from the live DOM in one evaluation.
PAGE_FACTS = """(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  return {
    status: nav ? nav.responseStatus : 0,
    title: document.title,
    text: document.body ? document.body.innerText : '',
    // (an <a> in an SVG chart has an SVGAnimatedString for its href: resolve it by hand)
    links: [...document.querySelectorAll('a[href]')].map(
      a => new URL(a.getAttribute('href'), document.baseURI).href),
    anchors: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.name),
    probes: document.querySelectorAll('.%s').length,
    charts: [...document.querySelectorAll('svg')].map(s => ({
      figure: s.closest('figure') ? s.closest('figure').id : null,
      chart: s.classList.contains('chart'),
      marks: s.querySelectorAll('.point, .bar, .segment').length,
      empty: s.querySelector('.chart-empty') !== null,
      width: s.getBoundingClientRect().width,
      height: s.getBoundingClientRect().height})),
  };
})()""" % PROBE


def probe_events(url: str) -> None:
    """A transaction, a span, a label and an error of the demo's service whose texts are
    markup: on every page they appear in, they must be text, never elements."""
    client = beatlib.Client(service_name=SERVICE, server_url=url, environment="demo",
                            flush_interval="50ms", environ={})
    try:
        client.begin_transaction("request")
        beatlib.label(note=f'<b class="{PROBE}">label</b>')
        with beatlib.capture_span(f"SELECT '<img src=x class={PROBE}>'", span_type="db",
                                  span_subtype="sqlite", span_action="query"):
            time.sleep(0.001)
        client.capture_message(f'<i class="{PROBE}">stock & prices</i>', level="warning")
        client.end_transaction(f'GET /<script class="{PROBE}">alert(1)</script>', "HTTP 2xx")
    finally:
        client.close(10)
        context.set_active(None)


@pytest.fixture
def demo(tmp_path: Path) -> Any:
    """(receiver on the demo's database, the paths the demo printed under "Where to look")."""
    db = tmp_path / "demo.sqlite3"
    result = subprocess.run([*DEMO, "--db", str(db)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": SRC})
    assert result.returncode == 0, result.stdout + result.stderr
    printed = re.findall(r"^    http://127\.0\.0\.1:\d+(/ui/\S*)$", result.stdout, re.M)
    receiver = Receiver(port=0, db_path=str(db)).start()
    try:
        probe_events(receiver.url)
        assert receiver.flush(10)
        yield receiver, printed
    finally:
        receiver.stop()


def route_of(url: str) -> str:
    """The `ui._ROUTES` key of a dashboard URL ("traces/<id>" for a trace page)."""
    path = urlsplit(url).path
    if not path.startswith(ui.ROOT):
        return path
    route = path[len(ui.ROOT):].strip("/")
    return "traces/<id>" if route.startswith(ui.TRACES) else route


def unsorted(url: str) -> str:
    """`url` without its table sort (?sort=&dir=): the same rows in another order."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("sort", "dir")]
    return urlunsplit(parts._replace(query=urlencode(query)))


def window_of(url: str) -> str:
    return parse_qs(urlsplit(url).query).get("window", [""])[0]


def check_page(url: str, facts: dict[str, Any]) -> list[str]:
    """What is wrong with the page at `url` (empty: nothing)."""
    problems = []
    text = facts["text"]
    if facts["status"] != 200:
        problems.append(f"answered {facts['status']}: {text[:200]!r}")
    if "beatlib" not in text or not facts["title"].endswith("beatlib"):
        problems.append("not a dashboard page")
    for sign in ("Traceback", "Undefined", "{{", "{%", "internal error", "&lt;", "&amp;",
                 "&gt;", "&quot;", "&#"):
        if sign in text:  # a template error, or markup escaped twice
            problems.append(f"shows {sign!r}")
    if facts["probes"]:
        problems.append(f"{facts['probes']} elements made from the apps' data")
    route = route_of(url)
    for chart in facts["charts"]:
        name = f"chart {chart['figure']!r}"
        if not chart["chart"] or not chart["figure"]:
            problems.append(f"an <svg> that is not a chart of a figure: {chart}")
        elif chart["width"] < 100 or chart["height"] < 50:
            problems.append(f"{name} not drawn: {chart}")
        elif chart["empty"] or not chart["marks"]:
            # The demo's data is less than a minute old: every window holds all of it. Only
            # the span charts of a group whose transactions do no I/O may be empty.
            group = parse_qs(urlsplit(url).query).get("name", [None])[0]
            if not (route == "transactions/group" and chart["empty"]
                    and chart["figure"] in EMPTY_ON_GROUP.get(group or "", ())):
                problems.append(f"{name} drawn without data ({window_of(url) or 'default'} "
                                f"window): {chart}")
    anchors = set(facts["anchors"])
    for link in facts["links"]:
        parts = urlsplit(link)
        if parts.fragment and urlunsplit(parts._replace(fragment="")) == url \
                and parts.fragment not in anchors:
            problems.append(f"in-page link to #{parts.fragment}, which is not on the page")
    return problems


def test_every_page_reachable_from_the_dashboard(demo: Any, tmp_path: Path) -> None:
    receiver, printed = demo
    origin = receiver.url
    started = time.monotonic()
    # Where to look: the transactions, the checkout's group, the errors, a checkout's trace,
    # the agent health (the demo's own list, so each of them must be reached).
    assert len(printed) == 5, printed
    assert any(route_of(p) == "traces/<id>" for p in printed) and f"{ui.ROOT}health" in printed
    start = [receiver.dashboard_url] + [origin + path for path in printed]
    queue, seen = deque(start), set(start)
    resorted: deque[str] = deque()  # a page seen already, sorted another way
    contents = {unsorted(url) for url in start}
    visited: dict[str, dict[str, Any]] = {}
    fragments: list[tuple[str, str, str]] = []  # (page, target page, fragment)
    problems: dict[str, list[str]] = {}
    shot: set[str] = set()
    timing = Counter[str]()
    browser = Devtools(tmp_path)
    try:
        while (queue or resorted) and len(visited) < MAX_PAGES:
            url = (queue or resorted).popleft()
            began = time.monotonic()
            browser.open(url)
            facts = browser.evaluate(PAGE_FACTS)
            timing[route_of(url)] += time.monotonic() - began
            visited[url] = facts
            found = check_page(url, facts)
            if found:
                problems[url] = found
            route = route_of(url)
            if route not in shot:
                shot.add(route)
                browser.screenshot("tour-" + (route.replace("/", "-").replace("<id>", "trace")
                                              or "services"))
            if route == "traces/<id>":
                facts["rows"] = trace_rows(browser)
            for link in facts["links"]:
                parts = urlsplit(link)
                target = urlunsplit(parts._replace(fragment=""))
                if parts.scheme + "://" + parts.netloc != origin:
                    continue  # another site: not ours to crawl (there should be none)
                if parts.fragment and target != url:
                    fragments.append((url, target, parts.fragment))
                if target not in seen:
                    seen.add(target)
                    content = unsorted(target)
                    (resorted if content in contents else queue).append(target)
                    contents.add(content)
    finally:
        browser.close()
    elapsed = time.monotonic() - started

    per_route = Counter(route_of(url) for url in visited)
    print(f"\n{len(visited)} pages in {elapsed:.1f}s; {len(seen)} distinct URLs found, "
          f"{len(contents)} once the sort is left out, {len(queue)} of those not visited; "
          f"per route: {dict(sorted(per_route.items()))}")
    print({route: round(t / per_route[route], 3) for route, t in timing.items()})
    assert not problems, "\n".join(f"{url}: {found}" for url, found in problems.items())
    assert set(per_route) == {*ui._ROUTES, "traces/<id>"}, per_route
    assert all(origin + path in visited for path in printed)
    # Links with a fragment to another page: the fragment is on that page (if visited).
    for page, target, fragment in fragments:
        if target in visited:
            assert fragment in visited[target]["anchors"], (page, target, fragment)
    # The apps' markup shown as text somewhere (so the probe check above can fail).
    assert any(f'class="{PROBE}"' in facts["text"] for facts in visited.values())
    # The 1h (default) charts of the service and of the checkout have data.
    for url, facts in visited.items():
        if route_of(url) in ("transactions", "transactions/group") and not window_of(url):
            assert len(facts["charts"]) >= 5 and any(c["marks"] for c in facts["charts"])
    checked = [facts["rows"] for facts in visited.values()
               if facts.get("rows") and "POST /checkout" in facts["rows"][0][1]]
    assert checked, "no checkout trace reached"
    for rows in checked:
        call = next(i for i, (_, text) in enumerate(rows) if text.startswith("external.http"))
        depth, text = rows[call + 1]
        assert depth == rows[call][0] + 1 and "GET /api/prices/<int:product_id>" in text, rows


def trace_rows(browser: Devtools) -> list[tuple[int, str]]:
    """The trace page's waterfall: (depth, the row's label text) in page order."""
    rows = Rows()
    rows.feed(browser.evaluate("document.documentElement.outerHTML"))
    rows.close()
    return [(row["indent"] // 14, row["text"]) for row in rows.rows]
