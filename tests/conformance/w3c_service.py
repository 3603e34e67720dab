"""The service the W3C trace-context test harness talks to: a Flask app traced by beatlib.

`POST /test` takes the harness's JSON list of `{"url": ..., "arguments": [...]}` and, inside
the request's transaction, POSTs each `arguments` to its `url` with an HTTP client that
beatlib instruments (requests, urllib3 or httpx), so the harness sees the `traceparent` and
`tracestate` beatlib sends on. Events go to an in-memory sender; `GET /stats` says how many
`/test` transactions and spans were recorded.

    python tests/conformance/w3c_service.py [--port 5000] [--client requests|urllib3|httpx]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

import httpx
import requests
import urllib3
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

import beatlib
from beatlib.contrib.flask import Beat
from beatlib.transport.memory import MemorySender


def poster(client: str) -> Callable[[str, Any], int]:
    """`post(url, json_body) -> status` made with the named HTTP client."""
    if client == "urllib3":
        pool = urllib3.PoolManager()
        return lambda url, body: pool.request("POST", url, json=body, timeout=5).status
    if client == "httpx":
        session = httpx.Client(timeout=5)
        return lambda url, body: session.post(url, json=body).status_code
    return lambda url, body: requests.post(url, json=body, timeout=5).status_code


def create_app(sender: MemorySender, client_name: str = "requests") -> Flask:
    app = Flask(__name__)
    client = beatlib.Client(service_name="w3c-conformance", sender=sender,
                            flush_interval=0.2)
    Beat(app, client=client)  # instruments the HTTP clients too
    post = poster(client_name)

    @app.post("/test")
    def test() -> Any:
        results = []
        for action in request.get_json(force=True) or []:
            results.append(post(action["url"], action.get("arguments") or []))
        return jsonify(results)

    @app.get("/stats")
    def stats() -> Any:
        client.flush()
        tests = [tx for tx in sender.events("transaction") if tx["name"] == "POST /test"]
        spans = [s for s in sender.events("span") if s["type"] == "external"]
        return jsonify({"transactions": len(tests), "spans": len(spans)})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--client", choices=("requests", "urllib3", "httpx"), default="requests")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = create_app(MemorySender(), args.client)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f"w3c service ({args.client}) on http://{args.host}:{server.server_port}/test",
          flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
