"""One trace across beatlib and the OpenTelemetry Python SDK: W3C `traceparent` and
`baggage` over real HTTP between processes on 127.0.0.1 (see tests/otel_peers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote_plus

import pytest
import requests

from tests.schemas import validate

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.instrumentation.wsgi")
pytest.importorskip("opentelemetry.instrumentation.requests")

ROOT = Path(__file__).resolve().parents[1]
BAGGAGE = "userId=alice,tenant=acme%20eu,isProduction=false"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BEATLIB_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OTEL_TRACES_EXPORTER"] = "none"  # spans stay in the process's memory exporter
    return env


class Service:
    def __init__(self, role: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.otel_peers", role], cwd=ROOT,
                                     env=_env(), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.strip().isdigit(), f"{role} did not start"
        self.url = f"http://127.0.0.1:{int(line)}"

    def get(self, path: str) -> object:
        return requests.get(self.url + path, timeout=10).json()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def services() -> Iterator[dict[str, Service]]:
    started: dict[str, Service] = {}
    try:
        for role in ("otel-service", "beatlib-service"):
            started[role] = Service(role)
        yield started
    finally:
        for service in started.values():
            service.stop()


def members(baggage: str) -> list[tuple[str, str]]:
    """A baggage header's decoded members, in order: the OpenTelemetry SDK re-encodes what it
    sends on (`%20` becomes `+`), so bytes differ after an SDK hop, the members do not."""
    return [tuple(unquote_plus(part).strip() for part in member.partition("=")[::2])
            for member in baggage.split(",")]


def run_client(role: str, url: str, baggage: str | None = None) -> dict:
    args = [sys.executable, "-m", "tests.otel_peers", role, url, *([baggage] if baggage else [])]
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def beatlib_events(service: Service) -> tuple[list[dict], list[dict]]:
    got = service.get("/events")
    for kind in ("transaction", "span"):
        for event in got[kind]:
            validate(kind, event)
    return got["transaction"], got["span"]


def test_an_otel_client_span_is_the_parent_of_the_beatlib_transaction(services):
    beat = services["beatlib-service"]
    out = run_client("otel-client", beat.url + "/hello", BAGGAGE)
    client_span = next(s for s in out["spans"] if s["kind"] == "CLIENT")
    root = next(s for s in out["spans"] if s["name"] == "otel root")
    assert client_span["parent_id"] == root["span_id"]
    transactions, _ = beatlib_events(beat)
    (tx,) = transactions
    assert tx["trace_id"] == client_span["trace_id"] == root["trace_id"]
    assert tx["parent_id"] == client_span["span_id"]
    assert tx["sampled"] is True and tx["name"] == "GET"
    # What beatlib received: the SDK's traceparent and baggage, never recorded.
    seen = out["reply"]["seen"]
    assert seen["traceparent"].split("-")[1:3] == [client_span["trace_id"],
                                                   client_span["span_id"]]
    assert members(seen["baggage"]) == members(BAGGAGE)
    assert "alice" not in json.dumps(transactions)


def test_a_beatlib_exit_span_is_the_parent_of_the_otel_server_span(services):
    otel = services["otel-service"]
    out = run_client("beatlib-client", otel.url + "/hello", BAGGAGE)
    (tx,) = out["transaction"]
    (span,) = out["span"]
    validate("transaction", tx)
    validate("span", span)
    assert span["type"] == "external" and span["parent_id"] == tx["id"]
    server = next(s for s in otel.get("/spans") if s["kind"] == "SERVER")
    assert server["trace_id"] == tx["trace_id"]
    assert server["parent_id"] == span["id"] and server["parent_remote"] is True
    assert server["flags"] & 1  # sampled, as beatlib decided
    assert out["reply"]["seen"]["baggage"] == BAGGAGE  # byte for byte
    assert out["reply"]["seen"]["traceparent"] == f"00-{tx['trace_id']}-{span['id']}-03"


def test_one_trace_across_beatlib_otel_and_beatlib_with_the_first_hops_baggage(services):
    otel, beat = services["otel-service"], services["beatlib-service"]
    # Hop 1: a beatlib script calls the OpenTelemetry service, which (hop 2) calls the
    # beatlib service (hop 3).
    out = run_client("beatlib-client", otel.url + "/call?url=" + quote(beat.url + "/end"),
                     BAGGAGE)
    (first,) = out["transaction"]
    (first_exit,) = out["span"]
    validate("transaction", first)
    otel_spans = otel.get("/spans")
    server = next(s for s in otel_spans if s["kind"] == "SERVER")
    client = next(s for s in otel_spans if s["kind"] == "CLIENT")
    (third,), _ = beatlib_events(beat)
    trace_id = first["trace_id"]
    assert {trace_id} == {first_exit["trace_id"], server["trace_id"], client["trace_id"],
                          third["trace_id"]}
    assert first.get("parent_id") is None
    assert first_exit["parent_id"] == first["id"]
    assert server["parent_id"] == first_exit["id"]
    assert client["parent_id"] == server["span_id"]
    assert third["parent_id"] == client["span_id"]
    third_seen = out["reply"]["downstream"]["seen"]
    assert members(third_seen["baggage"]) == members(BAGGAGE)  # through the SDK hop
    assert out["reply"]["seen"]["baggage"] == BAGGAGE  # beatlib's hop: byte for byte
    # The random flag beatlib set at the root went through the SDK unchanged.
    assert third_seen["traceparent"] == f"00-{trace_id}-{client['span_id']}-03"
