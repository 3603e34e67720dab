"""The dashboard in a real headless Chromium (Debian's `chromium` package): the pages render
the data a real client sent, and following the links of one page's DOM leads to the next.
Screenshots go to test-artifacts/ (gitignored)."""

from __future__ import annotations

import os
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
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
