"""The trace page in a real headless Chromium: a shop calls a prices service over real HTTP
with a `traceparent`, and the trace page's DOM has the prices transaction nested under the
shop's HTTP span. Screenshot in test-artifacts/."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

import beatlib
from beatlib import context
from beatlib.contrib.wsgi import BeatMiddleware
from beatlib.receiver import Receiver
from tests.receiver_server.test_dashboard_browser import Browser, pytestmark  # noqa: F401


class Rows(HTMLParser):
    """The waterfall's rows in DOM order: (indent in px, classes of the row's element,
    text of its label)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._label = 0  # depth of open <div>s inside the current label

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "div" and attributes.get("class") == "wf-label":
            style = attributes.get("style") or ""
            self.rows.append({"indent": int(style.split(":")[1].rstrip("px")), "raw": ""})
            self._label = 1
        elif tag == "div" and self._label:
            self._label += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._label:
            self._label -= 1

    def handle_data(self, data: str) -> None:
        if self._label == 1:
            self.rows[-1]["raw"] += data

    def close(self) -> None:
        super().close()
        for row in self.rows:
            row["text"] = " ".join(row.pop("raw").split())


class Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def prices(tmp_path: Path) -> Iterator[tuple[Receiver, beatlib.Client, str]]:
    receiver = Receiver(port=0, db_path=str(tmp_path / "apm.sqlite3")).start()
    client = beatlib.Client(service_name="prices", server_url=receiver.url,
                            flush_interval="50ms", environ={})

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with beatlib.capture_span("SELECT price FROM prices", span_type="db",
                                  span_subtype="sqlite", span_action="query"):
            time.sleep(0.002)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"price": 12.5}']

    server = make_server("127.0.0.1", 0, BeatMiddleware(app, client=client),
                         handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, client, f"http://127.0.0.1:{server.server_port}/price"
    finally:
        server.shutdown()
        client.close(5)
        receiver.stop()


def test_trace_page_nests_the_called_transaction_under_its_exit_span(
        prices: tuple[Receiver, beatlib.Client, str], tmp_path: Path) -> None:
    receiver, prices_client, url = prices
    shop = beatlib.Client(service_name="shop", server_url=receiver.url, flush_interval="50ms",
                          environ={})
    beatlib.instrument(shop.config)  # http.client: the exit span, and its traceparent
    try:
        tx = shop.begin_transaction("request")
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == b'{"price": 12.5}'
        with beatlib.capture_span("INSERT INTO orders", span_type="db", span_subtype="sqlite"):
            pass
        shop.end_transaction("POST /checkout", "HTTP 2xx")
        trace_id = tx.trace_id
        assert shop.flush(10) and prices_client.flush(10)
    finally:
        beatlib.uninstrument()
        shop.close(5)
        context.set_active(None)
    assert receiver.flush(10)

    browser = Browser(tmp_path)
    page_url = f"{receiver.dashboard_url}traces/{trace_id}"
    dom = browser.open(page_url)
    assert "shop" in dom.visible and "prices" in dom.visible
    rows = Rows()
    rows.feed(browser._run("--dump-dom", page_url))
    rows.close()
    found = [(row["indent"] // 14, row["text"]) for row in rows.rows]
    checkout = next(i for i, (_, text) in enumerate(found) if "POST /checkout" in text)
    call = next(i for i, (_, text) in enumerate(found) if "external.http.GET shop GET" in text)
    called = next(i for i, (_, text) in enumerate(found) if "request prices GET" in text)
    query = next(i for i, (_, text) in enumerate(found) if "SELECT price" in text)
    assert found[checkout][0] == 0 and "shop" in found[checkout][1]
    assert found[call][0] == 1
    # Right under the exit span, one level deeper; its own span one deeper still.
    assert called == call + 1 and found[called][0] == 2, found
    assert query == called + 1 and found[query][0] == 3, found
    browser.screenshot(page_url, "trace")
    # The transaction page links there from its trace id.
    tx_page = browser.open(dom.link("transaction", "POST /checkout"))
    assert tx_page.link(f"traces/{trace_id}")
