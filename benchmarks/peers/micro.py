#!/usr/bin/env python3
"""Manual-API microbenchmark: cost of one transaction with 10 child spans.

    python micro.py                     # all agents, each in its own subprocess
    python micro.py elasticapm otel     # a subset
    python micro.py --child AGENT       # (internal) one agent in this process
    python micro.py beatlib beatlib-otlp --no-empty   # beatlib's two exporters, worker CPU

Per agent: start the sink (subprocess), configure the agent's transport to it
(100% sampling), then time ITERS iterations of

    begin transaction -> 10 x (start child span with name+type, end it) -> end transaction

and ITERS iterations of an empty transaction (no spans).  Each timing is
repeated REPS times (default 1), alternating, and the median rep is reported:

    us_per_txn      = time(txn with 10 spans) / ITERS
    us_per_empty_txn= time(txn without spans) / ITERS
    us_per_span     = (time(10 spans) - time(empty)) / (10 * ITERS)   (marginal)
    worker_cpu_us_per_txn = (process CPU - this thread's CPU) from the first warm-up
                      transaction to the end of shutdown, / transactions: what the
                      background threads (encode, gzip, send) spend per transaction
                      (--no-empty: every transaction has its 10 spans)

'beatlib-otlp' is beatlib with exporter="otlp" (OTLP/HTTP JSON to the sink's /v1/traces).

APIs: elastic-apm client.begin_transaction / elasticapm.capture_span /
client.end_transaction; sentry start_transaction / Transaction.start_child;
ddtrace tracer.trace; otel tracer.start_as_current_span.  'none' times the
same loop with contextlib.nullcontext (loop + with-statement floor).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTS = ("none", "beatlib", "beatlib-otlp", "elasticapm", "sentry", "ddtrace", "otel")
SPAN_NAMES = ["SELECT FROM table_%d" % i for i in range(10)]
SERVICE = "peerbench-micro"


def setup(agent, sink_url, port, export=True):
    """Return (txn10, txn0, shutdown, version).

    export=False keeps the agent's API + in-process pipeline but cuts the
    exporter (elastic disable_send, sentry no-op transport, otel no-op
    SpanExporter behind the same BatchSpanProcessor) to split API cost from
    encode/compress/send cost.  Not available for ddtrace (its writer is native
    code outside the GIL; there is no public no-op writer switch).
    """
    names = SPAN_NAMES
    if agent == "none":
        nc = contextlib.nullcontext

        def txn10():
            with nc():
                for n in names:
                    with nc():
                        pass

        def txn0():
            with nc():
                pass

        return txn10, txn0, (lambda: None), "-"

    if agent in ("beatlib", "beatlib-otlp"):
        import beatlib

        exporter = {"exporter": "otlp", "otlp_endpoint": sink_url} if agent == "beatlib-otlp" \
            else {}
        client = beatlib.Client(
            service_name=SERVICE, server_url=sink_url, environment="bench", enabled=export,
            **exporter
        )
        capture_span = beatlib.capture_span
        begin, end = client.begin_transaction, client.end_transaction

        def txn10():
            begin("request")
            for n in names:
                with capture_span(n, span_type="db", span_subtype="sqlite", span_action="query"):
                    pass
            end("GET /bench", "HTTP 2xx")

        def txn0():
            begin("request")
            end("GET /bench", "HTTP 2xx")

        def shutdown():
            client.close(300)

        return txn10, txn0, shutdown, beatlib.__version__

    if agent == "elasticapm":
        import elasticapm

        client = elasticapm.Client(
            service_name=SERVICE,
            server_url=sink_url,
            environment="bench",
            metrics_interval="0s",
            cloud_provider="none",
            disable_send=not export,
        )
        capture_span = elasticapm.capture_span
        begin, end = client.begin_transaction, client.end_transaction

        def txn10():
            begin("request")
            for n in names:
                with capture_span(n, span_type="db", span_subtype="sqlite", span_action="query"):
                    pass
            end("GET /bench", "HTTP 2xx")

        def txn0():
            begin("request")
            end("GET /bench", "HTTP 2xx")

        def shutdown():
            client.close()
            t = getattr(client._transport, "_thread", None)
            if t is not None:
                t.join(60)  # a stuck queue (seen at 20,000 iterations) is not waited on for 5 min

        return txn10, txn0, shutdown, elasticapm.VERSION

    if agent == "sentry":
        import sentry_sdk

        kw = {}
        if not export:
            from sentry_sdk.transport import Transport

            class NoopTransport(Transport):
                def capture_envelope(self, envelope):
                    pass

            kw["transport"] = NoopTransport
        sentry_sdk.init(dsn="http://key@127.0.0.1:%d/1" % port, traces_sample_rate=1.0, environment="bench", **kw)
        start_transaction = sentry_sdk.start_transaction

        def txn10():
            with start_transaction(op="http.server", name="GET /bench") as t:
                for n in names:
                    with t.start_child(op="db", name=n):
                        pass

        def txn0():
            with start_transaction(op="http.server", name="GET /bench"):
                pass

        def shutdown():
            c = sentry_sdk.get_client()
            c.flush(timeout=120)
            c.close(timeout=30)

        return txn10, txn0, shutdown, sentry_sdk.VERSION

    if agent == "ddtrace":
        if not export:
            raise SystemExit("--no-export is not supported for ddtrace")
        os.environ["DD_TRACE_AGENT_URL"] = sink_url
        os.environ.setdefault("DD_SERVICE", SERVICE)
        os.environ.setdefault("DD_ENV", "bench")
        os.environ.setdefault("DD_TRACE_SAMPLING_RULES", '[{"sample_rate": 1.0}]')
        import ddtrace
        from ddtrace.trace import tracer

        trace = tracer.trace

        def txn10():
            with trace("web.request", resource="GET /bench", span_type="web"):
                for n in names:
                    with trace(n, span_type="sql"):
                        pass

        def txn0():
            with trace("web.request", resource="GET /bench", span_type="web"):
                pass

        def shutdown():
            tracer.flush()
            tracer.shutdown(timeout=120)

        return txn10, txn0, shutdown, ddtrace.__version__

    if agent == "otel":
        from opentelemetry import trace as ot
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.version import __version__ as v
        from opentelemetry.trace import SpanKind

        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        class NoopExporter(SpanExporter):
            def export(self, spans):
                return SpanExportResult.SUCCESS

        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
        exporter = OTLPSpanExporter(endpoint=sink_url + "/v1/traces") if export else NoopExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        ot.set_tracer_provider(provider)
        tracer = ot.get_tracer("peerbench.micro")
        start = tracer.start_as_current_span
        server, client_kind = SpanKind.SERVER, SpanKind.CLIENT
        attrs = {"span.type": "db"}

        def txn10():
            with start("GET /bench", kind=server):
                for n in names:
                    with start(n, kind=client_kind, attributes=attrs):
                        pass

        def txn0():
            with start("GET /bench", kind=server):
                pass

        def shutdown():
            provider.force_flush()
            provider.shutdown()

        return txn10, txn0, shutdown, v

    raise SystemExit("unknown agent %r" % agent)


def timeloop(fn, iters):
    cpu0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        fn()
    return time.perf_counter_ns() - t0, time.process_time_ns() - cpu0


def child(agent, iters, reps, warm, export=True, empty=True):
    sys.path.insert(0, HERE)
    warnings.simplefilter("ignore")
    import run_one  # sink helpers

    sink, port = run_one.start_sink()
    sink_url = "http://127.0.0.1:%d" % port
    try:
        txn10, txn0, shutdown, version = setup(agent, sink_url, port, export)
        if not empty:
            txn0 = lambda: None  # noqa: E731
        all0, main0 = time.process_time_ns(), time.thread_time_ns()
        for _ in range(warm):
            txn10()
            txn0()
        w10, w0, c10, c0 = [], [], [], []
        for _ in range(reps):
            w, c = timeloop(txn10, iters)
            w10.append(w)
            c10.append(c)
            w, c = timeloop(txn0, iters)
            w0.append(w)
            c0.append(c)
        t = time.perf_counter()
        shutdown()
        flush_s = time.perf_counter() - t
        background_ns = (time.process_time_ns() - all0) - (time.thread_time_ns() - main0)
        time.sleep(0.5)
        stats = run_one.sink_call(port, "GET", "/__stats")
    finally:
        sink.terminate()
        try:
            sink.wait(5)
        except subprocess.TimeoutExpired:
            sink.kill()

    m10, m0 = statistics.median(w10), statistics.median(w0)
    mc10, mc0 = statistics.median(c10), statistics.median(c0)
    txns = (warm + iters * reps) * (2 if empty else 1)
    out = {
        "agent": agent,
        "export": export,
        "version": version,
        "iters": iters,
        "reps": reps,
        "us_per_txn": round(m10 / iters / 1000, 2),
        "us_per_empty_txn": round(m0 / iters / 1000, 2),
        "us_per_span": round((m10 - m0) / (10 * iters) / 1000, 2),
        "cpu_us_per_txn": round(mc10 / iters / 1000, 2),
        "cpu_us_per_span": round((mc10 - mc0) / (10 * iters) / 1000, 2),
        "worker_cpu_us_per_txn": round(background_ns / txns / 1000, 2),
        "rep_us_per_txn": [round(x / iters / 1000, 2) for x in w10],
        "rep_us_per_empty_txn": [round(x / iters / 1000, 2) for x in w0],
        "expected_transactions": txns,
        "expected_spans": (warm + iters * reps) * 10,
        "flush_s": round(flush_s, 2),
        "sink_requests": stats["requests"],
        "sink_bytes": stats["bytes"],
        "sink_decoded": stats.get("decoded"),
    }
    print(json.dumps(out), flush=True)


def shipped(rec):
    d = rec.get("sink_decoded") or {}
    if "elastic" in d:
        return d["elastic"].get("transaction", 0), d["elastic"].get("span", 0), ""
    if "sentry" in d:
        s = d["sentry"]
        disc = s.get("discarded") or {}
        note = ", ".join("%s=%s" % kv for kv in sorted(disc.items()))
        return s.get("item.transaction", 0), s.get("spans", 0), note
    if "datadog" in d:
        x = d["datadog"]
        return x.get("root_spans", 0), x.get("spans", 0) - x.get("root_spans", 0), ""
    if "otlp" in d:
        x = d["otlp"]
        return x.get("root_spans", 0), x.get("spans", 0) - x.get("root_spans", 0), ""
    return 0, 0, ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("agents", nargs="*")
    ap.add_argument("--child")
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warm", type=int, default=1000)
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--round", type=int, default=0, help="label only (of the --out lines)")
    ap.add_argument("--no-export", action="store_true", help="cut the exporter (see setup())")
    ap.add_argument("--no-empty", action="store_true",
                    help="skip the empty-transaction loop (worker CPU per 1+10 transaction)")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.iters, a.reps, a.warm, export=not a.no_export, empty=not a.no_empty)
        return
    agents = a.agents or ([x for x in AGENTS if x != "ddtrace"] if a.no_export else list(AGENTS))
    recs = []
    for ag in agents:
        t = time.time()
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", ag, "--iters", str(a.iters),
             "--reps", str(a.reps), "--warm", str(a.warm)] + (["--no-export"] if a.no_export else [])
            + (["--no-empty"] if a.no_empty else []),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            print("%s FAILED rc=%s\n%s" % (ag, p.returncode, p.stderr[-3000:]), file=sys.stderr)
            continue
        rec = json.loads(lines[-1])
        rec["elapsed_s"] = round(time.time() - t, 1)
        rec["kind"], rec["round"] = "micro", a.round
        recs.append(rec)
        print("%s done in %.0fs" % (ag, time.time() - t), file=sys.stderr, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    print("### Manual API: 1 transaction + 10 child spans, %d iterations x %d reps (median rep)%s\n"
          % (a.iters, a.reps, " -- EXPORT CUT (no-op exporter/transport)" if a.no_export else ""))
    print("| agent | version | µs / txn (10 spans) | µs / empty txn | µs / span (marginal) | CPU µs / txn (all threads) "
          "| worker CPU µs / txn | reps µs/txn | flush s | sink requests | sink bytes | txns shipped / expected | spans shipped / expected | drops |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for r in recs:
        tx, sp, note = shipped(r)
        print("| %s | %s | %.1f | %.1f | %.2f | %.1f | %.1f | %s | %.1f | %d | %s | %s | %s | %s |" % (
            r["agent"], r["version"], r["us_per_txn"], r["us_per_empty_txn"], r["us_per_span"],
            r["cpu_us_per_txn"], r["worker_cpu_us_per_txn"], "/".join("%.1f" % x for x in r["rep_us_per_txn"]), r["flush_s"],
            r["sink_requests"], "{:,}".format(r["sink_bytes"]),
            "-" if r["agent"] == "none" else "{:,} / {:,}".format(tx, r["expected_transactions"]),
            "-" if r["agent"] == "none" else "{:,} / {:,}".format(sp, r["expected_spans"]),
            note))


if __name__ == "__main__":
    main()
