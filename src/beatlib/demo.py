"""`beatlib demo`: a small shop (Flask, SQLAlchemy on SQLite, Jinja2, an outgoing HTTP call,
a checkout that fails now and then) under a burst of traffic, traced by beatlib into a local
receiver; then a text report of what was recorded and the dashboard's address.

Needs the demo extra: from a checkout, `pip install -e '.[demo]'`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import quote, urlencode

SERVICE = "beatlib-demo"
PROGRESS_EVERY = 5.0  # seconds between progress lines when stdout is not a terminal

TEMPLATES = {
    "base.html": """<!doctype html><title>{% block title %}Shop{% endblock %}</title>
<h1>{{ self.title() }}</h1>{% block content %}{% endblock %}""",
    "products.html": """{% extends "base.html" %}{% block title %}Products{% endblock %}
{% block content %}<ul>{% for p in products %}
<li><a href="/products/{{ p.id }}">{{ p.name }}</a> {{ "%.2f"|format(p.price) }}</li>
{% endfor %}</ul>{% endblock %}""",
    "product.html": """{% extends "base.html" %}{% block title %}{{ product.name }}{% endblock %}
{% block content %}<p>{{ "%.2f"|format(product.price) }}</p><ul>{% for r in reviews %}
<li>{{ r.stars }}/5 {{ r.text }}</li>{% endfor %}</ul>{% endblock %}""",
}

DISCOUNTS = {"SPRING": 0.1, "VIP": 0.2}


def create_app(db_path: str) -> Any:
    """The shop. Route /checkout has a bug: an unknown discount code is a KeyError."""
    import requests
    from flask import Flask, jsonify, render_template, request
    from jinja2 import DictLoader
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{db_path}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price REAL)"))
        conn.execute(text("CREATE TABLE reviews (product_id INTEGER, stars INTEGER, text TEXT)"))
        conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, product_id INTEGER, "
                          "total REAL)"))
        rng = random.Random(3)
        for i in range(1, 41):
            conn.execute(text("INSERT INTO products VALUES (:i, :n, :p)"),
                         {"i": i, "n": f"Product {i}", "p": rng.uniform(3, 90)})
            for _ in range(rng.randrange(1, 6)):
                conn.execute(text("INSERT INTO reviews VALUES (:i, :s, 'fine')"),
                             {"i": i, "s": rng.randrange(1, 6)})
    app = Flask(SERVICE)
    app.jinja_loader = DictLoader(TEMPLATES)

    @app.route("/")
    def products() -> str:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, name, price FROM products ORDER BY name"))
            return render_template("products.html", products=rows.mappings().all())

    @app.route("/products/<int:product_id>")
    def product(product_id: int) -> Any:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT id, name, price FROM products WHERE id = :i"),
                                 {"i": product_id}).mappings().first()
            if found is None:
                return "no such product", 404
            reviews = conn.execute(text("SELECT stars, text FROM reviews WHERE product_id = :i"),
                                   {"i": product_id}).mappings().all()
        return render_template("product.html", product=found, reviews=reviews)

    @app.route("/api/prices/<int:product_id>")
    def price(product_id: int) -> Any:
        time.sleep(0.002)  # the pricing service takes its time
        return jsonify(product=product_id, price=round(10 + product_id * 1.5, 2))

    @app.route("/checkout", methods=["POST"])
    def checkout() -> Any:
        product_id = int(request.form["product"])
        quote = requests.get(f"{request.host_url}api/prices/{product_id}", timeout=5).json()
        code = request.form.get("discount")
        total = quote["price"]
        if code:
            total *= 1 - DISCOUNTS[code]  # the bug: an unknown code is a KeyError (a 500)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO orders (product_id, total) VALUES (:p, :t)"),
                         {"p": product_id, "t": total})
        return jsonify(ok=True, total=round(total, 2))

    return app


def _traffic(base: str, total: int, progress: Any) -> None:
    """`total` requests from four threads: mostly browsing, some checkouts, a few bad codes."""
    import requests

    done = [0]
    lock = threading.Lock()

    def one(rng: random.Random, session: Any) -> None:
        roll = rng.random()
        if roll < 0.35:
            session.get(base + "/", timeout=10)
        elif roll < 0.8:
            session.get(f"{base}/products/{rng.randrange(1, 45)}", timeout=10)
        else:
            code = rng.choice(["", "", "SPRING", "VIP", "SPRNG"])
            session.post(base + "/checkout", timeout=10,
                         data={"product": rng.randrange(1, 41), "discount": code})

    def worker(seed: int, count: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            for _ in range(count):
                one(rng, session)
                with lock:
                    done[0] += 1
                    progress(done[0], total)

    threads = [threading.Thread(target=worker, args=(i, total // 4 + (i < total % 4)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def progress_for(stream: TextIO, clock: Callable[[], float] = time.monotonic
                 ) -> Callable[[int, int], None]:
    """Traffic progress on `stream`: a bar redrawn in place on a terminal; elsewhere (a pipe,
    a CI log) one line every PROGRESS_EVERY seconds and one at the end, not a `\\r` per
    request."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False

    def bar(done: int, total: int) -> None:
        width = 40
        filled = width * done // total
        stream.write(f"\r  traffic [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            stream.write("\n")
        stream.flush()

    last = [clock()]

    def lines(done: int, total: int) -> None:
        now = clock()
        if done == total or now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            stream.write(f"  traffic: {done}/{total} requests\n")
            stream.flush()

    return bar if terminal else lines


def where_to_look(dashboard_url: str, service: str = SERVICE,
                  checkout_trace: str | None = None) -> list[tuple[str, str]]:
    """The dashboard pages worth opening after the demo: (what it shows, URL).
    `checkout_trace`: the trace id of a checkout, whose trace page is listed too."""
    def page(path: str, **params: str) -> str:
        return f"{dashboard_url}{path}?{urlencode({'service': service, **params})}"

    pages = [
        ("the shop's transactions, with latency and error rate", page("transactions")),
        ("the checkout: its spans, the call to the price API, its failures",
         page("transactions/group", name="POST /checkout")),
        ("the error groups (the discount-code KeyError), with stack and locals",
         page("errors")),
    ]
    if checkout_trace:
        pages.append(("one checkout's whole trace: the price API's transaction under the "
                      "call", f"{dashboard_url}traces/{quote(checkout_trace, safe='')}"))
    pages.append(("agent health: what the shop's client sent, retried and dropped",
                  f"{dashboard_url}health"))
    return pages


def checkout_trace(receiver: Any, service: str = SERVICE) -> str | None:
    """The trace id of the latest checkout that called the price API, if any."""
    from beatlib.receiver import queries

    with receiver.store.reader() as conn:
        samples = queries.transaction_samples(conn, service, "POST /checkout")["latest"]
        for sample in samples:
            tx = queries.transaction(conn, sample["id"])
            spans = [span["id"] for span in tx["spans"]] if tx else []
            if queries.child_transactions(conn, sample["trace_id"], spans):
                return str(sample["trace_id"])
    return None


def report(receiver: Any, service: str = SERVICE) -> str:
    """What the receiver stored for `service`, as text."""
    from beatlib.receiver import queries

    lines = []
    with receiver.store.reader() as conn:
        groups = queries.transaction_groups(conn, service, window="all")
        lines.append("Transactions                        count    avg ms    p95 ms  errors")
        for g in groups[:8]:
            rate = "-" if g["error_rate"] is None else f"{g['error_rate']:.0%}"
            lines.append(f"  {g['name'][:32]:<32}{g['count']:>7}{g['avg']:>10.2f}"
                         f"{g['p95']:>10.2f}{rate:>8}")
        lines.append("\nSlowest spans (by average)          count    avg ms    max ms")
        for s in queries.span_groups(conn, service)[:6]:
            name = f"{s['name']} ({s['type']})"
            lines.append(f"  {name[:32]:<32}{s['count']:>7}{s['avg']:>10.2f}{s['max']:>10.2f}")
        lines.append("\nError groups")
        for e in queries.error_groups(conn, service)[:5]:
            who = e.get("assignee_name") or "unassigned"
            lines.append(f"  {e['count']:>4} x {e['type'] or 'log'}: "
                         f"{(e['message'] or '')[:50]}  ({e['culprit']}; assignee: {who})")
    lines.append(f"\nDashboard: {receiver.dashboard_url}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beatlib demo",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--port", type=int, default=8200, help="receiver port (0: any free)")
    parser.add_argument("--requests", type=int, default=600, help="requests to send")
    parser.add_argument("--db", help="receiver database (default: a temporary file)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the receiver running afterwards, to browse the dashboard")
    args = parser.parse_args(argv)
    try:
        from werkzeug.serving import WSGIRequestHandler, make_server

        import beatlib
        from beatlib.contrib.flask import Beat
        from beatlib.receiver.server import Receiver
    except ImportError as exc:
        print("beatlib demo needs the demo extra (from a checkout: pip install -e "
              f"'.[demo]'): {exc}", file=sys.stderr)
        return 2

    workdir = tempfile.mkdtemp(prefix="beatlib-demo-")
    receiver = Receiver(port=args.port, db_path=args.db or os.path.join(workdir, "demo.sqlite3"))
    try:
        receiver.start()
    except OSError:
        print(f"port {args.port} is taken; the receiver runs on a free port instead")
        receiver.port = 0
        receiver.start()
    print(f"receiver: {receiver.url} (dashboard {receiver.dashboard_url})")
    # The shop's modules are ours but stand for an app here: their frames count as app code.
    client = beatlib.Client(service_name=SERVICE, server_url=receiver.url, environment="demo",
                            flush_interval="1s", include_paths=["beatlib.demo"])
    app = create_app(os.path.join(workdir, "shop.sqlite3"))
    app.logger.setLevel(logging.CRITICAL)  # the failing checkouts: the report tells of them
    Beat(app, client=client)
    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:  # the progress bar speaks
            pass

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = time.perf_counter()
    try:
        print(f"shop: http://127.0.0.1:{server.server_port}/; sending {args.requests} requests")
        _traffic(f"http://127.0.0.1:{server.server_port}", args.requests,
                 progress_for(sys.stdout))
    finally:
        server.shutdown()
        sent = client.close(10)
        receiver.flush(10)
    print(f"done in {time.perf_counter() - started:.1f}s"
          + ("" if sent else f"; not everything was sent: {client.transport.stats()}"))
    print()
    print(report(receiver))
    print("\nWhere to look:")
    for what, url in where_to_look(receiver.dashboard_url,
                                   checkout_trace=checkout_trace(receiver)):
        print(f"  {what}:\n    {url}")
    if args.keep:
        print("\nThe receiver keeps running; Ctrl-C stops it.", flush=True)
        try:
            receiver.wait()
        except KeyboardInterrupt:
            pass
    else:
        print("\nThe dashboard stops with the demo, now. To browse it, run the demo with "
              "--keep\n(beatlib demo --keep): the receiver then keeps running until Ctrl-C.")
    receiver.stop()
    return 0 if sent else 1


if __name__ == "__main__":
    sys.exit(main())
