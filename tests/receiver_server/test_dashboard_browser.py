"""The dashboard in a real headless Chromium (Debian's `chromium` package): the pages render
the data a real client sent, and following the links of one page's DOM leads to the next.
Screenshots go to test-artifacts/ (gitignored)."""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest

import beatlib
from beatlib.receiver import Receiver

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ASSIGNEE = {"name": "Ann Author", "email": "ann@example.org", "commit": "0123456789abcdef",
            "date": "2025-06-01T10:00:00+00:00"}

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} not found: install Debian's chromium package "
           "(apt-get install chromium) to run the dashboard's browser test",
)


class Dom(HTMLParser):
    """Links (absolute URL, text) and visible text of a dumped DOM."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base
        self.links: list[tuple[str, str]] = []
        self.text: list[str] = []
        self._href: str | None = None
        self._link_text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "a":
            self._href = urljoin(self.base, dict(attrs).get("href") or "")
            self._link_text = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self._skip -= 1
        if tag == "a" and self._href is not None:
            self.links.append((self._href, " ".join("".join(self._link_text).split())))
            self._href = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._href is not None:
            self._link_text.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())

    def link(self, path: str, text: str | None = None, **params: str) -> str:
        """The first link to `path` (under /ui/) whose query has `params` (and text)."""
        for url, label in self.links:
            parts = urlsplit(url)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path == "/ui/" + path and all(query.get(k) == v for k, v in params.items()) \
                    and (text is None or text in label):
                return url
        raise AssertionError(f"no link to {path} {params} {text!r} in {self.links}")


class Browser:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs = 0

    def _run(self, *args: str) -> str:
        self.runs += 1
        profile = self.tmp / f"profile-{self.runs}"
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   "--window-size=1280,1600", *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    def open(self, url: str) -> Dom:
        dom = Dom(url)
        dom.feed(self._run("--dump-dom", url))
        assert "beatlib" in dom.visible, dom.visible[:500]
        return dom

    def screenshot(self, url: str, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"receiver-{name}.png"
        path.unlink(missing_ok=True)
        self._run(f"--screenshot={path}", "--hide-scrollbars", url)
        assert path.stat().st_size > 10_000  # a rendered page, not a blank one
        return path


class Devtools:
    """A headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out,
    each message JSON ended by NUL): to click a page's buttons as a user would."""

    def __init__(self, tmp: Path) -> None:
        commands, self._to_browser = os.pipe()
        self._from_browser, replies = os.pipe()
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{commands} 4>&{replies}', CHROMIUM,
             "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp / 'profile-devtools'}", "--window-size=1280,1600",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(commands, replies), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(replies)
        self._buffer = b""
        self._ids = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], deadline - time.monotonic())
            assert ready, "chromium did not answer"
            chunk = os.read(self._from_browser, 1 << 16)
            assert chunk, "chromium closed its pipe"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._ids:
                assert "error" not in reply, reply
                return dict(reply.get("result") or {})
            self.events.append(reply)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            for i, seen in enumerate(self.events):
                if seen.get("method") == event:
                    del self.events[: i + 1]
                    return
            self.events.append(self._message(deadline))

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", session=True, expression=expression,
                          returnByValue=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) in the middle of the element."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                            " e.scrollIntoView(); const r = e.getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        assert box, selector
        self.events.clear()
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"receiver-{name}.png"
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        assert path.stat().st_size > 10_000
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


def charge(order: dict[str, int]) -> None:
    total = order["total"]
    raise ValueError(f"cannot charge {total}")


def export(rows: list[int]) -> None:
    raise RuntimeError(f"export of {len(rows)} rows failed")


def traffic(url: str, version: str, new_error: bool) -> None:
    client = beatlib.Client(service_name="shop", server_url=url, service_version=version,
                            flush_interval="50ms", assign_errors=False)
    try:
        for i in range(12):
            client.begin_transaction("request")
            with beatlib.capture_span("SELECT * FROM orders WHERE id = ?", span_type="db",
                                      span_subtype="sqlite", span_action="query"):
                time.sleep(0.001 * (i % 4))
            with beatlib.capture_span("render orders.html", span_type="template",
                                      span_subtype="jinja2", span_action="render"):
                with beatlib.capture_span("GET https://api.example.org/stock",
                                          span_type="external", span_subtype="http"):
                    time.sleep(0.002)
            if i % 4 == 3:
                try:
                    charge({"total": 10 + i})
                except ValueError:
                    client.capture_exception(custom={"assignee": ASSIGNEE})
                client.end_transaction("POST /orders", "HTTP 5xx")
            else:
                client.end_transaction("GET /orders", "HTTP 2xx")
        if new_error:
            try:
                export([1, 2, 3])
            except RuntimeError:
                client.capture_exception()
        client.capture_message("stock service slow", level="warning")
    finally:
        client.close()


@pytest.fixture
def dashboard(tmp_path: Path) -> Receiver:
    receiver = Receiver(port=0, db_path=str(tmp_path / "apm.sqlite3")).start()
    traffic(receiver.url, "1.0", new_error=False)
    traffic(receiver.url, "1.1", new_error=True)
    assert receiver.flush(10)
    return receiver


def test_dashboard_in_chromium(dashboard: Receiver, tmp_path: Path) -> None:
    browser = Browser(tmp_path)
    try:
        services = browser.open(dashboard.dashboard_url)
        assert "shop" in services.visible and "1.1" in services.visible
        browser.screenshot(dashboard.dashboard_url, "services")

        tx_url = services.link("transactions", "shop", service="shop")
        transactions = browser.open(tx_url)
        for text in ("GET /orders", "POST /orders", "p95", "p99", "Error rate", "100.0%"):
            assert text in transactions.visible, text
        window = browser.open(transactions.link("transactions", "15m", service="shop",
                                                window="15m"))
        assert "GET /orders" in window.visible
        browser.screenshot(tx_url, "transactions")

        group = browser.open(transactions.link("transactions/group", "POST /orders",
                                               service="shop", name="POST /orders"))
        assert "Slowest" in group.visible
        sample = next(url for url, _ in group.links if "/ui/transaction?" in url)
        waterfall = browser.open(sample)
        for text in ("Waterfall", "SELECT * FROM orders WHERE id = ?", "db.sqlite.query",
                     "render orders.html", "GET https://api.example.org/stock",
                     "HTTP 5xx", "ValueError"):
            assert text in waterfall.visible, text
        browser.screenshot(sample, "waterfall")

        error_url = waterfall.link("error", "ValueError", service="shop")
        error = browser.open(error_url)
        for text in ("ValueError", "cannot charge", 'raise ValueError(f"cannot charge {total}")',
                     "total", "Ann Author", "ann@example.org", "0123456789ab",
                     f"{__name__} in charge"):
            assert text in error.visible, text
        browser.screenshot(error_url, "error")

        errors = browser.open(error.link("errors", service="shop"))
        for text in ("ValueError", "RuntimeError", "log message stock service slow"):
            assert text in errors.visible, text
        mine = browser.open(errors.link("errors", "Ann Author", assignee="ann@example.org"))
        assert "ValueError" in mine.visible and "RuntimeError" not in mine.visible
        browser.screenshot(errors.link("errors", "everyone"), "errors")

        releases_url = services.link("releases", "1.1", service="shop")
        releases = browser.open(releases_url)
        text = releases.visible
        newer, older = text.index("shop 1.1"), text.index("shop 1.0")
        assert newer < older  # newest first
        assert "RuntimeError" in text[newer:older]  # first seen in 1.1
        assert "ValueError" in text[older:] and "ValueError" not in text[newer:older]
        browser.screenshot(releases_url, "releases")
        first_in_release = browser.open(releases.link("error", "RuntimeError", service="shop"))
        assert "export of 3 rows failed" in first_in_release.visible
    finally:
        dashboard.stop()


def chart_marks(dom_html: str, chart_id: str) -> int:
    """Points, bars and segments drawn in the chart of figure `chart_id` (0: empty state)."""
    start = dom_html.index(f'id="{chart_id}"')
    end = dom_html.index("</figure>", start)
    figure = dom_html[start:end]
    assert "<svg" in figure, chart_id
    if "chart-empty" in figure:
        return 0
    return sum(figure.count(mark) for mark in ('class="point ', 'class="bar ',
                                               'class="segment '))


def test_charts_in_chromium(dashboard: Receiver, tmp_path: Path) -> None:
    # Every chart of the service, transaction group and error pages drawn with data; a
    # distribution bucket lists its transactions; the window is kept in the links.
    from tests.receiver_server.conftest import ndjson, post, transaction
    from tests.receiver_server.test_series import span

    # The client's bare capture_span names no destination; an instrumented client call does.
    _, tx = transaction(900, name="GET /orders", timestamp=time.time_ns() // 1000 - 1_000_000)
    assert post(dashboard.url, ndjson(("transaction", tx), span(
        tx, 901, "db", 2.0, tx["timestamp"], "postgresql/shop")))[0] == 202
    assert dashboard.flush(10)
    browser = Browser(tmp_path)
    charts = ("latency", "throughput", "error-rate", "span-types", "dependencies")
    try:
        tx_url = f"{dashboard.dashboard_url}transactions?service=shop&window=15m"
        html = browser._run("--dump-dom", tx_url)
        for chart in charts:
            assert chart_marks(html, chart) > 0, chart
        page = browser.open(tx_url)
        for text in ("Latency (p50, p95, p99)", "Time by dependency", "postgresql/shop", "Table"):
            assert text in page.visible, text
        browser.screenshot(tx_url, "service-charts")

        group_url = page.link("transactions/group", "GET /orders", service="shop",
                              name="GET /orders", window="15m")
        html = browser._run("--dump-dom", group_url)
        for chart in (*charts, "distribution"):
            assert chart_marks(html, chart) > 0, chart
        browser.screenshot(group_url, "transaction-group-charts")
        group = browser.open(group_url)
        bucket = next(url for url, _ in group.links if "low=" in url and "high=" in url)
        query = {k: v[0] for k, v in parse_qs(urlsplit(bucket).query).items()}
        assert query["window"] == "15m" and float(query["low"]) < float(query["high"])
        picked = browser.open(bucket)
        assert "Transactions from" in picked.visible
        listed = [url for url, _ in picked.links if "/ui/transaction?" in url]
        assert len(listed) > 2 * 12 // 2  # the bucket's samples above Latest and Slowest
        browser.screenshot(bucket, "distribution-samples")

        errors = browser.open(f"{dashboard.dashboard_url}errors?service=shop")
        error_url = errors.link("error", "ValueError", service="shop")
        assert chart_marks(browser._run("--dump-dom", error_url), "occurrences") > 0
        browser.screenshot(error_url, "error-occurrences")
    finally:
        dashboard.stop()


def test_resolve_a_group_in_chromium(dashboard: Receiver, tmp_path: Path) -> None:
    """The group page's Resolve button, clicked: the form posts (same origin, no script on
    the page), the receiver answers with the group page again, which says resolved."""
    browser = Devtools(tmp_path)
    try:
        browser.open(f"{dashboard.dashboard_url}errors?service=shop")
        href = browser.evaluate("[...document.querySelectorAll('a')].find("
                                "a => a.textContent.includes('ValueError')).href")
        browser.open(href)
        status = "document.querySelector('dl.facts dd .status').textContent"
        assert browser.evaluate(status) == "open"
        assert "Occurrence 1 of 6 (the latest)" in browser.evaluate("document.body.innerText")
        browser.click("form[action$='/resolve'] button")
        browser.wait_for("Page.loadEventFired")
        assert browser.evaluate("location.href") == href
        assert browser.evaluate(status) == "resolved"
        assert "in release 1.1" in browser.evaluate("document.querySelector('dl.facts').innerText")
        assert browser.evaluate("document.querySelector(\"form[action$='/resolve']\")") is None
        browser.screenshot("error-resolved")
        browser.open(f"{dashboard.dashboard_url}errors?service=shop&status=resolved")
        assert "ValueError" in browser.evaluate("document.querySelector('table').innerText")
    finally:
        browser.close()
        dashboard.stop()
