#!/usr/bin/env python3
"""The FastAPI twin (asgi_app.py) under uvicorn with one agent set up, for run_one_asgi.py.

    python asgi_server.py AGENT SINK_PORT

Prints `READY <port> <json: version, notes>` once listening on 127.0.0.1, `THREADS <json>` on
SIGUSR1 (its threads' names by native id); on SIGTERM uvicorn stops, the agent is flushed and shut down, and `FLUSHED <seconds>` is printed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = "peerbench"


def setup_none(sink_url, port):
    import asgi_app

    return asgi_app.create_app(sink_url), (lambda: None), "-", {}


def setup_beatlib(sink_url, port):
    # As the FastAPI docs page says: a client, then the middleware the idiomatic way.
    import beatlib
    from beatlib.contrib.asgi import BeatMiddleware

    import asgi_app
    from run_one import wake_at

    # PEERBENCH_BEATLIB_EXPORTER=process: the variant with exporter_process=True.
    process = os.environ.get("PEERBENCH_BEATLIB_EXPORTER") == "process"
    client = beatlib.Client(service_name=SERVICE, server_url=sink_url, environment="bench",
                            **({"exporter_process": True} if process else {}))
    app = asgi_app.create_app(sink_url)
    app.add_middleware(BeatMiddleware, client=client)
    wake_at(client)

    def shutdown():
        if not client.close(120):
            print("beatlib: close did not send everything:", client.stats(), file=sys.stderr)

    return app, shutdown, beatlib.__version__, {"instrumented": "asgi middleware + beatlib.instrument()"}


def setup_elasticapm(sink_url, port):
    import elasticapm
    from elasticapm.contrib.starlette import ElasticAPM, make_apm_client

    import asgi_app

    apm = make_apm_client({
        "SERVER_URL": sink_url, "SERVICE_NAME": SERVICE, "ENVIRONMENT": "bench",
        "METRICS_INTERVAL": "0s",  # no periodic metricsets: other agents send none either
        "CLOUD_PROVIDER": "none",  # 'auto' probes 169.254.169.254: off-box, forbidden here
    })
    app = asgi_app.create_app(sink_url)
    app.add_middleware(ElasticAPM, client=apm)

    def shutdown():
        apm.close()
        t = getattr(apm._transport, "_thread", None)
        if t is not None:
            t.join(120)

    return app, shutdown, elasticapm.VERSION, {"instrumented": "starlette middleware + elasticapm.instrument()"}


def setup_sentry(sink_url, port):
    import sentry_sdk

    sentry_sdk.init(dsn="http://key@127.0.0.1:%d/1" % port, traces_sample_rate=1.0,
                    environment="bench")  # FastAPI/Starlette integrations enabled by default
    import asgi_app

    app = asgi_app.create_app(sink_url)

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
    os.environ.setdefault("DD_TRACE_SAMPLING_RULES", '[{"sample_rate": 1.0}]')
    import ddtrace

    ddtrace.patch(fastapi=True, starlette=True, sqlalchemy=True, jinja2=True, requests=True)
    import asgi_app

    app = asgi_app.create_app(sink_url)
    from ddtrace.trace import tracer

    def shutdown():
        tracer.flush()
        tracer.shutdown(timeout=60)

    return app, shutdown, ddtrace.__version__, {"patched": "fastapi,starlette,sqlalchemy,jinja2,requests"}


def setup_otel(sink_url, port):
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.jinja2 import Jinja2Instrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.version import __version__ as sdk_version

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE,
                                                        "deployment.environment": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=sink_url + "/v1/traces")))
    trace.set_tracer_provider(provider)
    Jinja2Instrumentor().instrument()
    RequestsInstrumentor().instrument()
    import asgi_app

    app = asgi_app.create_app(sink_url)
    FastAPIInstrumentor.instrument_app(app)
    SQLAlchemyInstrumentor().instrument(engine=app.state.peerbench_engine)

    def shutdown():
        provider.force_flush()
        provider.shutdown()

    return app, shutdown, sdk_version, {"sampler": "ParentBased(AlwaysOn) (default)"}


def say_threads(signum, frame):
    """SIGUSR1 (run_one_asgi.py --paired): print `THREADS <json: native id -> name>`, so the
    driver can tell the app's threads (the event loop's, the thread pool's) from the agent's."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    print("THREADS", json.dumps(names), flush=True)


SETUP = {name[6:]: fn for name, fn in globals().items() if name.startswith("setup_")}


def main() -> None:
    agent, sink_port = sys.argv[1], int(sys.argv[2])
    warnings.simplefilter("ignore")
    sys.path.insert(0, HERE)
    import uvicorn

    app, shutdown, version, notes = SETUP[agent]("http://127.0.0.1:%d" % sink_port, sink_port)
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else a
    # delayed ACK adds 40 ms to each keep-alive request)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts
    # The keep-alive connection stays open however long the driver waits (uvicorn closes an
    # idle one after 5 s by default: paired.py's members wait their turn longer than that).
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           timeout_keep_alive=3600))
    notes["server"] = "uvicorn %s, 1 worker" % uvicorn.__version__
    print("READY", sock.getsockname()[1], json.dumps({"version": version, "notes": notes}),
          flush=True)
    signal.signal(signal.SIGUSR1, say_threads)
    # uvicorn ends by raising the SIGTERM it caught again, under the handler it found: this
    # one lets the agent's shutdown below run (with the default one, the process just ended
    # and only agents flushing on the ASGI lifespan's shutdown sent their last events).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[sock])  # until SIGTERM
    started = time.perf_counter()
    shutdown()
    print("FLUSHED", round(time.perf_counter() - started, 3), flush=True)


if __name__ == "__main__":
    main()
