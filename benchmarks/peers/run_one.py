#!/usr/bin/env python3
"""Measure one APM agent's per-request overhead on a realistic Flask (or Django) app.

    python run_one.py AGENT N [--app flask|django] [--warmup 300] [--errors 500] [--outbound 200]
    python run_one.py AGENT K --outage [--app flask|django]
    python run_one.py AGENT 0 --paired [--app flask|django]    # driven by paired.py

AGENT is one of: none | beatlib | elasticapm | sentry | ddtrace | otel
--app django runs the Django twin (djangoshop/) through the same in-process WSGI driver
(werkzeug's test Client, which Flask's test client is), each agent set up as its Django
documentation says.

In ONE process (the sink runs as a separate subprocess so that its work does
not contend for this process's GIL):
  1. start sink.py on a free loopback port
  2. configure exactly one agent with its transport pointed at the sink and
     100% sampling
  3. warm up (WARMUP x /items, 50 x /error, 20 x /outbound)
  4. time N x GET /items through Flask's test client (in-process WSGI),
     per-request time.perf_counter_ns
  5. time ERRORS x GET /error, then OUTBOUND x GET /outbound (loopback to sink)
  6. flush + shut the agent down, then ask the sink what it received
The process's RSS is read after the warm-up and after the timed /items (steady state under
load), with its high-water mark.
--outage: no sink; every agent sends to a loopback port nobody listens on (connection
refused) while K x /items run after the warm-up; RSS sampled every K/50 requests: the peak
against the RSS after the warm-up. The agent is not flushed (os._exit after the line).
Prints exactly one JSON line on stdout (diagnostics go to stderr).
"""
from __future__ import annotations

import argparse
import gc
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTS = ("none", "beatlib", "elasticapm", "sentry", "ddtrace", "otel")
SERVICE = "peerbench"


def log(*a):
    print("[run_one]", *a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# sink subprocess
# --------------------------------------------------------------------------
def start_sink():
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "sink.py"), "0"],
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    line = p.stdout.readline().strip()
    if not line.startswith("SINK_PORT "):
        p.kill()
        raise RuntimeError("sink did not start: %r" % line)
    return p, int(line.split()[1])


def sink_call(port, method, path):
    # plain http.client, outside any transaction
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request(method, path, body=b"" if method == "POST" else None)
        r = c.getresponse()
        return json.loads(r.read() or b"{}")
    finally:
        c.close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed): connections are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kb(pid="self"):
    """(VmRSS, VmHWM) of a process, in kB."""
    vals = {}
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1])
    return vals.get("VmRSS"), vals.get("VmHWM")


# --------------------------------------------------------------------------
# agent setup: each returns (app, shutdown_fn, version, notes)
# --------------------------------------------------------------------------
def setup_none(sink_url, port):
    import app as appmod

    return appmod.create_app(sink_url), (lambda: None), "-", {}


def _proc_cpu_ns(pid):
    """utime + stime of process `pid` (Linux /proc), in ns; None once it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


# CPU (ns) and RSS (kB) of an agent's helper processes, when it has any (beatlib's exporter
# process)
AGENT_CHILD_CPU = None
AGENT_CHILD_RSS = None


def watch_exporter(client):
    """With beatlib's exporter process: the hooks that read its CPU and RSS."""
    global AGENT_CHILD_CPU, AGENT_CHILD_RSS
    if not client.config.exporter_process:
        return

    def child_cpu():
        child = client.transport.worker
        return None if child is None else _proc_cpu_ns(child.pid)

    def child_rss():
        child = client.transport.worker
        return None if child is None else rss_kb(child.pid)[0]

    AGENT_CHILD_CPU, AGENT_CHILD_RSS = child_cpu, child_rss


def wake_at(client):
    """PEERBENCH_BEATLIB_WAKE=N (paired.py's `beatlib:wakeN`): the worker woken once N events
    wait instead of beatlib's default; an experiment on a private setting, for
    results/wake_*.jsonl."""
    if os.environ.get("PEERBENCH_BEATLIB_WAKE"):
        client.transport._wake_at = int(os.environ["PEERBENCH_BEATLIB_WAKE"])


def setup_beatlib(sink_url, port):
    # As a user would: the Flask integration (which calls beatlib.instrument()), defaults
    # for everything but where to send; 100% sampling is the default.
    # PEERBENCH_BEATLIB_EXPORTER=process: the variant with exporter_process=True.
    import beatlib
    from beatlib.contrib.flask import Beat

    import app as appmod

    process = os.environ.get("PEERBENCH_BEATLIB_EXPORTER") == "process"
    client = beatlib.Client(service_name=SERVICE, server_url=sink_url, environment="bench",
                            **({"exporter_process": True} if process else {}))
    app = appmod.create_app(sink_url)
    Beat(app, client=client)
    watch_exporter(client)
    wake_at(client)

    def shutdown():
        if not client.close(120):
            log("beatlib: close did not send everything:", client.transport.stats())

    return app, shutdown, beatlib.__version__, {"instrumented": "flask(signals) + sqlalchemy + jinja2 + requests (beatlib.instrument())",
                                                "exporter": "process" if process else "thread"}


def setup_elasticapm(sink_url, port):
    import elasticapm
    from elasticapm.contrib.flask import ElasticAPM

    import app as appmod

    app = appmod.create_app(sink_url)
    apm = ElasticAPM(
        app,
        server_url=sink_url,
        service_name=SERVICE,
        environment="bench",
        metrics_interval="0s",  # no periodic metricsets: other agents send none either
        cloud_provider="none",  # default 'auto' probes 169.254.169.254 etc.: off-box, forbidden here
        # everything else default: transaction_sample_rate=1.0, central_config=True,
        # api_request_time=10s, api_request_size=768kB, span_compression_enabled=True
    )

    def shutdown():
        apm.client.close()
        # Transport.close() can return before its queue is drained (it waits on a
        # _flushed event that an earlier forced flush may already have set), so
        # wait for the event-processor thread itself to finish shipping.
        t = getattr(apm.client._transport, "_thread", None)
        if t is not None:
            t.join(120)

    return app, shutdown, elasticapm.VERSION, {"instrumented": "flask(signals) + sqlite3 + jinja2 + requests/urllib3 (elasticapm.instrument())"}


def setup_sentry(sink_url, port):
    import sentry_sdk

    sentry_sdk.init(
        dsn="http://key@127.0.0.1:%d/1" % port,
        traces_sample_rate=1.0,
        environment="bench",
        # everything else default (auto-enabled Flask + SQLAlchemy + stdlib
        # integrations, transport_queue_size=100, gzip level 9)
    )
    import app as appmod

    app = appmod.create_app(sink_url)

    def shutdown():
        client = sentry_sdk.get_client()
        client.flush(timeout=120)
        client.close(timeout=30)

    integrations = sorted(sentry_sdk.get_client().integrations.keys())
    return app, shutdown, sentry_sdk.VERSION, {"integrations": integrations}


def setup_ddtrace(sink_url, port):
    os.environ["DD_TRACE_AGENT_URL"] = sink_url
    os.environ.setdefault("DD_SERVICE", SERVICE)
    os.environ.setdefault("DD_ENV", "bench")
    # explicit 100% sampling (default would also keep everything, via agent rates)
    os.environ.setdefault("DD_TRACE_SAMPLING_RULES", '[{"sample_rate": 1.0}]')
    import ddtrace

    # ddtrace-run style, restricted to the four integrations under test; must
    # happen before flask/sqlalchemy/jinja2/requests are imported.
    ddtrace.patch(flask=True, sqlalchemy=True, jinja2=True, requests=True)
    import app as appmod

    app = appmod.create_app(sink_url)
    from ddtrace.trace import tracer

    def shutdown():
        tracer.flush()
        tracer.shutdown(timeout=60)

    writer = type(tracer._span_aggregator.writer).__name__
    return app, shutdown, ddtrace.__version__, {"writer": writer, "patched": "flask,sqlalchemy,jinja2,requests"}


def setup_otel(sink_url, port):
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.jinja2 import Jinja2Instrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.version import __version__ as sdk_version

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE, "deployment.environment": "bench"}))
    # defaults: max_queue_size=2048, max_export_batch_size=512, schedule_delay=5s
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink_url + "/v1/traces")))
    trace.set_tracer_provider(provider)
    Jinja2Instrumentor().instrument()
    RequestsInstrumentor().instrument()
    import app as appmod

    app = appmod.create_app(sink_url)
    FlaskInstrumentor().instrument_app(app)
    SQLAlchemyInstrumentor().instrument(engine=app.extensions["peerbench_engine"])

    def shutdown():
        provider.force_flush()
        provider.shutdown()

    return app, shutdown, sdk_version, {"sampler": "ParentBased(AlwaysOn) (default)"}


# --------------------------------------------------------------------------
# the Django twin: each setup returns (wsgi app, shutdown_fn, version, notes)
# --------------------------------------------------------------------------
def django_settings(sink_url):
    import djangoshop

    return djangoshop.settings(sink_url, os.environ["PEERBENCH_DB_DIR"])


def django_none(sink_url, port):
    import djangoshop

    return djangoshop.wsgi_app(django_settings(sink_url)), (lambda: None), "-", {}


def django_beatlib(sink_url, port):
    # As docs/django.md says: the app in INSTALLED_APPS and a BEATLIB dict; its app config
    # creates the client, calls beatlib.instrument() and puts its middleware first.
    import beatlib
    import djangoshop

    cfg = django_settings(sink_url)
    cfg["INSTALLED_APPS"] = cfg["INSTALLED_APPS"] + ["beatlib.contrib.django"]
    cfg["BEATLIB"] = {"SERVICE_NAME": SERVICE, "SERVER_URL": sink_url, "ENVIRONMENT": "bench"}
    if os.environ.get("PEERBENCH_BEATLIB_EXPORTER") == "process":
        cfg["BEATLIB"]["EXPORTER_PROCESS"] = True
    app = djangoshop.wsgi_app(cfg)
    from django.apps import apps

    client = apps.get_app_config("beatlib").client
    watch_exporter(client)

    def shutdown():
        if not client.close(120):
            log("beatlib: close did not send everything:", client.transport.stats())

    return app, shutdown, beatlib.__version__, {"instrumented": "django app + middleware + beatlib.instrument() (sqlite3, django templates, requests)"}


def django_elasticapm(sink_url, port):
    # Elastic's Django page: the app in INSTALLED_APPS, ELASTIC_APM settings, and its
    # TracingMiddleware first in MIDDLEWARE for performance data.
    import djangoshop
    import elasticapm

    cfg = django_settings(sink_url)
    cfg["INSTALLED_APPS"] = ["elasticapm.contrib.django"] + cfg["INSTALLED_APPS"]
    cfg["MIDDLEWARE"] = ["elasticapm.contrib.django.middleware.TracingMiddleware"] + cfg["MIDDLEWARE"]
    cfg["ELASTIC_APM"] = {
        "SERVICE_NAME": SERVICE, "SERVER_URL": sink_url, "ENVIRONMENT": "bench",
        "METRICS_INTERVAL": "0s",  # no periodic metricsets: other agents send none either
        "CLOUD_PROVIDER": "none",  # 'auto' probes 169.254.169.254: off-box, forbidden here
    }
    app = djangoshop.wsgi_app(cfg)
    from elasticapm.contrib.django.client import get_client

    # the client itself: after close() the module's `client` proxy would make a new one
    apm = get_client()

    def shutdown():
        apm.close()
        t = getattr(apm._transport, "_thread", None)
        if t is not None:
            t.join(120)

    return app, shutdown, elasticapm.VERSION, {"instrumented": "django app + TracingMiddleware + elasticapm.instrument()"}


def django_sentry(sink_url, port):
    # Sentry's Django page: sentry_sdk.init() in settings.py; the Django integration is on
    # by default (it also records DB queries and template renders).
    import djangoshop
    import sentry_sdk

    sentry_sdk.init(dsn="http://key@127.0.0.1:%d/1" % port, traces_sample_rate=1.0,
                    environment="bench")
    app = djangoshop.wsgi_app(django_settings(sink_url))

    def shutdown():
        client = sentry_sdk.get_client()
        client.flush(timeout=120)
        client.close(timeout=30)

    integrations = sorted(sentry_sdk.get_client().integrations.keys())
    return app, shutdown, sentry_sdk.VERSION, {"integrations": integrations}


def django_ddtrace(sink_url, port):
    os.environ["DD_TRACE_AGENT_URL"] = sink_url
    os.environ.setdefault("DD_SERVICE", SERVICE)
    os.environ.setdefault("DD_ENV", "bench")
    os.environ.setdefault("DD_TRACE_SAMPLING_RULES", '[{"sample_rate": 1.0}]')
    import ddtrace

    # ddtrace-run style, the integrations under test, before Django is imported. By default
    # (DD_DJANGO_TRACING_MINIMAL) the Django integration records no ORM or template spans:
    # the queries are the sqlite3 integration's spans, and there are no template spans.
    ddtrace.patch(django=True, sqlite3=True, requests=True)
    import djangoshop

    app = djangoshop.wsgi_app(django_settings(sink_url))
    from ddtrace.trace import tracer

    def shutdown():
        tracer.flush()
        tracer.shutdown(timeout=60)

    return app, shutdown, ddtrace.__version__, {"patched": "django,sqlite3,requests (no template spans by default)"}


def django_otel(sink_url, port):
    # OpenTelemetry's Django page: DjangoInstrumentor().instrument() before the app is loaded;
    # queries through the sqlite3 instrumentor; there is no Django template instrumentation.
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.version import __version__ as sdk_version

    import djangoshop

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE, "deployment.environment": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink_url + "/v1/traces")))
    trace.set_tracer_provider(provider)
    cfg = django_settings(sink_url)
    from django.conf import settings

    # DjangoInstrumentor reads settings.MIDDLEWARE at instrument(): the settings first (what
    # DJANGO_SETTINGS_MODULE gives it in a project), then instrument, then the app.
    settings.configure(**cfg)
    DjangoInstrumentor().instrument()
    SQLite3Instrumentor().instrument()
    RequestsInstrumentor().instrument()
    app = djangoshop.wsgi_app(None)

    def shutdown():
        provider.force_flush()
        provider.shutdown()

    return app, shutdown, sdk_version, {"sampler": "ParentBased(AlwaysOn) (default)", "instrumented": "django + sqlite3 + requests (no template spans)"}


SETUP = {
    "none": setup_none,
    "beatlib": setup_beatlib,
    "elasticapm": setup_elasticapm,
    "sentry": setup_sentry,
    "ddtrace": setup_ddtrace,
    "otel": setup_otel,
}
DJANGO_SETUP = {name[7:]: fn for name, fn in globals().items() if name.startswith("django_") and name != "django_settings"}


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------
def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def timed(client, path, n, expect):
    get = client.get
    pc = time.perf_counter_ns
    durs = [0] * n
    bad = 0
    child0 = AGENT_CHILD_CPU() if AGENT_CHILD_CPU else None
    thread0 = time.thread_time_ns()
    cpu0 = time.process_time_ns()
    t0 = pc()
    for i in range(n):
        s = pc()
        r = get(path)
        r.close()  # what a WSGI server does; elastic/otel/ddtrace end the transaction on close
        e = pc()
        durs[i] = e - s
        if r.status_code != expect:
            bad += 1
    wall = pc() - t0
    cpu = time.process_time_ns() - cpu0
    thread_cpu = time.thread_time_ns() - thread0
    child1 = AGENT_CHILD_CPU() if AGENT_CHILD_CPU else None
    durs.sort()
    us = lambda ns: round(ns / 1000.0, 1)  # noqa: E731
    return {
        "n": n,
        "median_us": us(statistics.median(durs)),
        # for reading the machine's noise (results/noise_20261202.md); their ratios swing
        # across runs as the median's do
        "p10_us": us(pct(durs, 0.10)),
        "p25_us": us(pct(durs, 0.25)),
        "p90_us": us(pct(durs, 0.90)),
        "p99_us": us(pct(durs, 0.99)),
        "mean_us": us(sum(durs) / n),
        "min_us": us(durs[0]),
        "max_us": us(durs[-1]),
        # process CPU (all threads, incl. agent background workers) per request
        "cpu_us_per_req": us(cpu / n),
        "wall_us_per_req": us(wall / n),
        # the request thread's own CPU (it is also the load generator: the test client)
        "thread_cpu_us_per_req": us(thread_cpu / n),
        # an agent's helper process (beatlib's exporter process), when there is one
        "child_cpu_us_per_req": us((child1 - child0) / n) if child0 is not None and child1 is not None else None,
        "bad_status": bad,
    }


def test_client(app):
    """Flask's own test client; for another WSGI app (Django's), werkzeug's, of which Flask's
    is a subclass: the same driver for both."""
    if hasattr(app, "test_client"):
        return app.test_client()
    from werkzeug.test import Client

    return Client(app)


def outage(client, k):
    """K x /items with the agent's destination refusing connections; RSS sampled."""
    rss0, _ = rss_kb()
    every = max(1, k // 50)
    samples = []
    bad = 0
    t0 = time.perf_counter()
    for i in range(k):
        r = client.get("/items")
        r.close()
        if r.status_code != 200:
            bad += 1
        if i % every == every - 1:
            samples.append(rss_kb()[0])
    rss1, hwm = rss_kb()
    return {"k": k, "bad_status": bad, "s": round(time.perf_counter() - t0, 1),
            "rss_before_kb": rss0, "rss_end_kb": rss1, "rss_peak_kb": max(samples + [rss1]),
            "hwm_kb": hwm, "rss_samples_kb": samples}


def background_cpu_ns():
    """CPU of every thread of this process but the calling one, and of the agent's helper
    process if it has one: the agent's background work, while the main thread drives."""
    child = AGENT_CHILD_CPU() if AGENT_CHILD_CPU else None
    return time.process_time_ns() - time.thread_time_ns() + (child or 0)


QUIET_POLL = 0.005  # paired mode: the background threads are idle when their CPU moved less
QUIET_NS = 200_000  # than this in each of QUIET_POLLS polls (the main thread's own polling
QUIET_POLLS = 5  # shows in it a little; the helper process's CPU moves in 10 ms ticks)
QUIET_MAX = 1.0  # seconds a member waits for its background threads, at most


def paired(request, cpu):
    """--paired (paired.py drives it): after the warm-up, say "ready"; then for each line
    "slice M" on stdin run M x `request()` (True when the answer was as expected), wait
    until the agent's background work is idle (so what the slice gave it is done before the
    next member's slice), and answer one JSON line: the durations (us), the app's CPU and the
    background CPU during the slice, after it and between the last wait and this slice (what
    ran beside other members' slices: timer-driven work, flushes and exports). `cpu()` gives
    the app's and the background's CPU so far (ns). "end" ends the loop; returns the
    durations of all slices and the CPU totals."""
    pc = time.perf_counter_ns
    everything = []
    totals = {"thread_ns": 0, "bg_slice_ns": 0, "bg_after_ns": 0, "bg_between_ns": 0, "bad": 0,
              "waited_ns": 0}
    print("ready", flush=True)
    bg_end = cpu()[1]
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "end":
            break
        m = int(words[1])
        durs = [0] * m
        bad = 0
        th0, bg0 = cpu()
        between = bg0 - bg_end  # what ran after the last wait: beside another member's slice
        for i in range(m):
            s = pc()
            ok = request()
            durs[i] = pc() - s
            if not ok:
                bad += 1
        th1, bg1 = cpu()
        last = bg1
        w0 = pc()
        # At least one poll: a worker the slice woke gets the interpreter lock only once
        # this thread lets go of it.
        quiet = 0
        while True:
            time.sleep(QUIET_POLL)
            now = cpu()[1]
            quiet = quiet + 1 if now - last < QUIET_NS else 0
            last = now
            if (quiet and now - bg0 < QUIET_NS) or quiet >= QUIET_POLLS \
                    or pc() - w0 >= QUIET_MAX * 1e9:
                break  # idle through the slice and since, or idle now, or waited enough
        bg_end = cpu()[1]
        waited = pc() - w0
        everything.extend(durs)
        totals["thread_ns"] += th1 - th0
        totals["bg_slice_ns"] += bg1 - bg0
        totals["bg_after_ns"] += bg_end - bg1
        totals["bg_between_ns"] += between
        totals["bad"] += bad
        totals["waited_ns"] += waited
        print(json.dumps({"durs_us": [round(d / 1000.0, 1) for d in durs], "bad": bad,
                          "thread_us": (th1 - th0) // 1000, "bg_slice_us": (bg1 - bg0) // 1000,
                          "bg_after_us": (bg_end - bg1) // 1000,
                          "bg_between_us": between // 1000, "waited_us": waited // 1000}),
              flush=True)
    return everything, totals


def flask_request(client, path):
    """One GET of `path` through the test client, as `paired` calls it."""
    get = client.get

    def request():
        r = get(path)
        r.close()
        return r.status_code == 200

    return request


def summary(durs, totals):
    """A paired member's figures over all its slices, in the fields `timed` gives."""
    durs = sorted(durs)
    n = len(durs) or 1
    us = lambda ns: round(ns / 1000.0, 1)  # noqa: E731
    return {"n": len(durs), "median_us": us(statistics.median(durs)) if durs else None,
            "p10_us": us(pct(durs, 0.10)), "p25_us": us(pct(durs, 0.25)),
            "p90_us": us(pct(durs, 0.90)), "p99_us": us(pct(durs, 0.99)),
            "thread_cpu_us_per_req": us(totals["thread_ns"] / n),
            "cpu_us_per_req": us((totals["thread_ns"] + totals["bg_slice_ns"]
                                  + totals["bg_after_ns"] + totals["bg_between_ns"]) / n),
            "bad_status": totals["bad"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("agent", choices=AGENTS)
    ap.add_argument("n", type=int, help="timed /items requests (with --outage: K)")
    ap.add_argument("--app", choices=("flask", "django"), default="flask")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--errors", type=int, default=500)
    ap.add_argument("--outbound", type=int, default=200)
    ap.add_argument("--outage", action="store_true",
                    help="no sink: the agent sends to a refusing port during N x /items")
    ap.add_argument("--round", type=int, default=0, help="label only")
    ap.add_argument("--slot", default="", help="label only (run_all.sh: a/b for the two none runs)")
    ap.add_argument("--paired", action="store_true",
                    help="/items in slices on command from paired.py (N ignored; no /error or "
                         "/outbound timing)")
    args = ap.parse_args()
    if args.paired:
        args.errors = args.outbound = 0

    warnings.simplefilter("ignore")  # deprecation chatter must not cost time in the loop
    sys.path.insert(0, HERE)
    t_start = time.time()
    load0 = os.getloadavg()
    db_dir = tempfile.mkdtemp(prefix="peerbench-db-")
    os.environ["PEERBENCH_DB_DIR"] = db_dir  # the app puts its SQLite file here
    setup = (DJANGO_SETUP if args.app == "django" else SETUP)[args.agent]
    if args.app == "django":  # seeded by a process of its own: no agent sees the seeding
        subprocess.run([sys.executable, "-m", "djangoshop", db_dir], cwd=HERE, check=True)
    if args.outage:
        sink, port = None, closed_port()
    else:
        sink, port = start_sink()
    sink_url = "http://127.0.0.1:%d" % port
    try:
        t_setup = time.perf_counter()
        app, shutdown, version, notes = setup(sink_url, port)
        setup_s = time.perf_counter() - t_setup
        client = test_client(app)

        # sanity + warmup
        r = client.get("/items")
        assert r.status_code == 200 and b"Item Number" in r.data, (r.status_code, r.data[:300])
        r.close()
        warm = (("/items", args.warmup),) if args.outage else (
            ("/items", args.warmup), ("/error", 50), ("/outbound", 20))
        for path, n in warm:
            for _ in range(n):
                client.get(path).close()
        gc.collect()
        if args.outage:
            mem = outage(client, args.n)
            out = {"agent": args.agent, "round": args.round, "slot": args.slot, "app": args.app, "outage": True,
                   "version": version, "python": platform.python_version(), "n": args.n,
                   "memory": mem, "setup_s": round(setup_s, 3), "notes": notes,
                   "loadavg_start": [round(x, 2) for x in load0],
                   "elapsed_s": round(time.time() - t_start, 1)}
            print(json.dumps(out), flush=True)
            shutil.rmtree(db_dir, ignore_errors=True)
            os._exit(0)  # no flush to a port that refuses: some agents would retry for minutes
        rss_warm, _ = rss_kb()

        if args.paired:
            durs, totals = paired(flask_request(client, "/items"),
                                  lambda: (time.thread_time_ns(), background_cpu_ns()))
            items = summary(durs, totals)
            args.n = len(durs)
        else:
            items = timed(client, "/items", args.n, 200)
        rss_items, hwm_items = rss_kb()
        child_rss = AGENT_CHILD_RSS() if AGENT_CHILD_RSS else None
        errors = timed(client, "/error", args.errors, 500) if args.errors else None
        outbound = timed(client, "/outbound", args.outbound, 200) if args.outbound else None

        t_fl = time.perf_counter()
        shutdown()
        flush_s = time.perf_counter() - t_fl
        time.sleep(0.5)  # let the sink finish answering anything in flight
        stats = sink_call(port, "GET", "/__stats")
    finally:
        if sink is not None:
            sink.terminate()
            try:
                sink.wait(5)
            except subprocess.TimeoutExpired:
                sink.kill()
        shutil.rmtree(db_dir, ignore_errors=True)

    expected_txn = 1 + args.warmup + args.n + 50 + args.errors + 20 + args.outbound
    app_traffic = stats["by_path"].get("/outbound-target", {"requests": 0, "bytes": 0})
    out = {
        "agent": args.agent,
        "round": args.round,
        "slot": args.slot,
        "app": args.app,
        "version": version,
        "python": platform.python_version(),
        "n": args.n,
        "items": items,
        "error": errors,
        "outbound": outbound,
        "memory": {"rss_warm_kb": rss_warm, "rss_items_kb": rss_items, "hwm_items_kb": hwm_items,
                   "child_rss_items_kb": child_rss},
        "setup_s": round(setup_s, 3),
        "flush_s": round(flush_s, 3),
        "expected_transactions": expected_txn,
        # agent traffic only (the app's own /outbound GETs to the sink excluded)
        "sink_requests": stats["requests"] - app_traffic["requests"],
        "sink_bytes": stats["bytes"] - app_traffic["bytes"],
        "sink": stats,
        "notes": notes,
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(time.time() - t_start, 1),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
